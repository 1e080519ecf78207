"""GGUF (llama.cpp's format) export and import for dense ember models, via the `gguf` package.

    export_gguf(model, "out/model.gguf", tokenizer)          # llama arch, f32 or f16, tokenizer in the metadata
    model, tok = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")  # any llama GGUF, quantized ones dequantized

Written the way llama.cpp's convert_hf_to_gguf.py writes a Llama: tensor names token_embd / blk.N.attn_q /
... / output, (out, in) weights, norms in f32, and the q/k rows PERMUTED to Meta's interleaved RoPE layout
(llama.cpp rotates adjacent pairs; ember, like HF, rotates halves), undone on import. Tokenizers: ember's
byte-level BPE as tokenizer.ggml.model "gpt2" (+ the exact tokenizer.json under "ember.tokenizer_json"),
SentencePiece-style vocabularies (llama2.c) as "llama" with scores.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ember.common import artifacts
from ember.common.checkpoint import check_layer_count
from ember.common.errors import UserError
from ember.model.gpt import GPT, GPTConfig, build_model
from ember.model.llama2c import hf_to_meta, meta_to_hf

# ember parameter name (per layer: "layers.{i}." + suffix) -> GGUF tensor name
LAYER_NAMES = {"attn_norm.weight": "attn_norm", "attn.q_proj.weight": "attn_q", "attn.k_proj.weight": "attn_k",
               "attn.v_proj.weight": "attn_v", "attn.o_proj.weight": "attn_output", "mlp_norm.weight": "ffn_norm",
               "mlp.gate_proj.weight": "ffn_gate", "mlp.up_proj.weight": "ffn_up", "mlp.down_proj.weight": "ffn_down"}
TOP_NAMES = {"tok_emb.weight": "token_embd", "norm.weight": "output_norm", "lm_head.weight": "output"}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise UserError("GGUF needs the `gguf` package: pip install gguf (it is in ember's dev extra)") from None
    return gguf


def gguf_name(name: str) -> str:
    if name in TOP_NAMES:
        return TOP_NAMES[name] + ".weight"
    _, i, rest = name.split(".", 2)
    return f"blk.{i}.{LAYER_NAMES[rest]}.weight"


def to_gguf_tensors(model: GPT) -> dict[str, np.ndarray]:
    """GGUF name -> fp32 numpy array in (out, in) layout, q/k permuted for llama.cpp's RoPE."""
    c, out = model.config, {}
    for name, t in model.state_dict().items():
        t = t.detach().float().cpu()
        if name.endswith("q_proj.weight"):
            t = hf_to_meta(t, c.n_head)
        elif name.endswith("k_proj.weight"):
            t = hf_to_meta(t, c.n_kv_head)
        out[gguf_name(name)] = t.numpy()
    return out


# ---------------------------------------------------------------------------- export

def check_exportable(c: GPTConfig) -> None:
    """GGUF export writes plain llama-architecture files: a feature it would drop (the model would run as another
    model in llama.cpp) is refused, naming it, before anything is written."""
    dropped = [name for name, on in (("MoE", c.n_expert), ("QK-norm", c.qk_norm), ("q/k/v biases", c.attn_bias),
                                     ("an explicit head size", c.head_size), (f"RoPE scaling {c.rope_scaling!r}",
                                                                               c.rope_scaling)) if on]
    if dropped:
        raise UserError(f"GGUF export covers dense Llama-style models without {', '.join(dropped)}: the file would "
                        f"describe another model. Export it with `ember export --format=hf` instead.")


def export_gguf(model: GPT, path: str | Path, tokenizer=None, *, dtype: str = "f32", name: str = "ember") -> Path:
    """Write `model` (+ tokenizer: ember's Tokenizer, a plain HF one, or a Llama2cTokenizer) as one GGUF file,
    atomically.
    dtype: "f32" or "f16" for the matrices (norm gains stay f32, as llama.cpp keeps them)."""
    gguf = _gguf()
    c = model.config
    check_exportable(c)
    if dtype not in ("f32", "f16"):
        raise UserError(f"GGUF dtype {dtype!r}: use f32 or f16")
    path = Path(path)
    with artifacts.atomic_path(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), "llama")
        w.add_name(name)
        w.add_context_length(c.max_seq_len)
        w.add_embedding_length(c.n_embd)
        w.add_block_count(c.n_layer)
        w.add_feed_forward_length(c.ffn_dim)
        w.add_head_count(c.n_head)
        w.add_head_count_kv(c.n_kv_head)
        w.add_rope_dimension_count(c.head_dim)
        w.add_rope_freq_base(c.rope_theta)
        w.add_layer_norm_rms_eps(c.norm_eps)
        w.add_vocab_size(c.vocab_size)
        w.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
        if tokenizer is not None:
            _write_tokenizer(w, gguf, tokenizer, c.vocab_size)
        for tname, arr in to_gguf_tensors(model).items():
            w.add_tensor(tname, arr.astype(np.float16) if dtype == "f16" and arr.ndim == 2 else arr)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


def _write_tokenizer(w, gguf, tok, vocab_size: int) -> None:
    T = gguf.TokenType
    if tok.hf is None:  # SentencePiece (llama2.c): pieces + scores
        sp, tokens, scores, types = tok.backend, [], [], []
        control = {tok.bos_id, tok.eos_id}
        for i, p in enumerate(sp.pieces):
            # special ids by their names (llama2.c files store BOS/EOS as "\n<s>\n"); SentencePiece writes spaces as ▁
            tokens.append(tok.id_to_token(i) if i in control else p.decode("utf-8", "replace").replace(" ", "\u2581"))
            scores.append(float(sp.scores[i]))
            types.append(T.UNKNOWN if i == tok.unk_id else T.CONTROL if i in control
                         else T.BYTE if i in sp.byte_of else T.NORMAL)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_unk_token_id(tok.unk_id)
    else:  # ember's byte-level BPE (an HF tokenizers.Tokenizer inside)
        hf = tok.hf
        vocab = hf.get_vocab(with_added_tokens=True)
        special = {t.content for t in hf.get_added_tokens_decoder().values() if t.special}
        by_id = {i: t for t, i in vocab.items()}
        tokens = [by_id.get(i, f"<|unused_{i}|>") for i in range(max(vocab.values()) + 1)]
        types = [T.CONTROL if t in special else T.UNUSED if i not in by_id else T.NORMAL for i, t in enumerate(tokens)]
        scores = None
        merges = json.loads(hf.to_str())["model"].get("merges", [])
        w.add_tokenizer_model("gpt2")
        # llama.cpp's "llama-bpe" pre-tokenizer is the GPT-4-style split regex ember's tokenizer trains with
        w.add_tokenizer_pre("llama-bpe")
        w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
        w.add_string("ember.tokenizer_json", hf.to_str())  # exact round trip into ember
        w.add_pad_token_id(tok.pad_id)
    # llama.cpp wants one token per embedding row: pad a tokenizer smaller than the (rounded-up) vocabulary
    for i in range(len(tokens), vocab_size):
        tokens.append(f"<|unused_{i}|>")
        types.append(T.UNUSED)
        if scores is not None:
            scores.append(-1e9)
    if tok.end_id is not None:  # the end-of-turn token of the model's own chat template
        w.add_eot_token_id(tok.end_id)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)
    w.add_add_bos_token(tok.add_bos)  # llama.cpp then adds BOS to a raw prompt exactly when ember does
    w.add_token_list(tokens)
    w.add_token_types([int(t) for t in types])
    if scores is not None:
        w.add_token_scores(scores)
    if tok.bos_id is not None:  # a plain HF tokenizer may have no BOS, and name its end token otherwise
        w.add_bos_token_id(tok.bos_id)
    eos = tok.eos_id if tok.eos_id is not None else next(iter(getattr(tok, "stop_ids", ())), None)
    if eos is not None:
        w.add_eos_token_id(eos)


# ---------------------------------------------------------------------------- import

def _open(path: str | Path):
    """(GGUFReader, metadata key -> value): the tensors are only mapped, nothing is read or dequantized yet."""
    gguf = _gguf()
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no GGUF file at {path}")
    try:
        r = gguf.GGUFReader(str(path))
    except (ValueError, OSError, KeyError, IndexError) as e:
        raise UserError(f"{path}: not a readable GGUF file ({e}): truncated (an interrupted download or copy?) or "
                        f"not GGUF. Download or copy it again.") from None
    return r, {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


def read_gguf_tokenizer(path: str | Path):
    """The tokenizer in a GGUF's metadata, without reading its tensors (seconds, not a dequantized model);
    None when the file carries none."""
    return gguf_tokenizer(_open(path)[1], path)


def read_gguf(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(metadata key -> value, tensor name -> fp32 numpy array in (out, in) layout); quantized tensors
    (F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K, ...) are dequantized by the gguf package."""
    from gguf.quants import dequantize

    r, meta = _open(path)
    tensors = {}
    for t in r.tensors:
        shape = [int(x) for x in reversed(t.shape)]  # GGUF lists dims innermost first
        try:
            tensors[t.name] = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        except NotImplementedError:
            raise UserError(f"{path}: tensor {t.name} is {t.tensor_type.name}, which the gguf package cannot "
                            f"dequantize; use a GGUF in F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q4_K/Q6_K.") from None
    return meta, tensors


def gguf_param_name(name: str) -> str:
    """gguf_name for weights and biases alike: layers.0.attn.q_proj.bias -> blk.0.attn_q.bias."""
    stem, kind = name.rsplit(".", 1)
    return gguf_name(stem + ".weight").removesuffix("weight") + kind


ARCHS = ("llama", "qwen2")  # qwen2: q/k/v biases, and llama.cpp's NEOX RoPE = HF's pairing (no q/k permutation)


def _llama3_scaling(path, inv_divisors: np.ndarray, kw: dict) -> GPTConfig:
    """GPTConfig RoPE fields for a GGUF with rope_freqs.weight: llama.cpp stores Llama 3.1's scaling as a
    divisor per frequency, not its parameters. Those of Llama 3.1/3.2 (factor = the largest divisor, low 1,
    high 4, original context 8192) are accepted when they reproduce the divisors."""
    from ember.model.gpt import rope_inv_freq

    cfg = GPTConfig(**{**kw, "rope_scaling": "llama3", "rope_factor": float(inv_divisors.max()),
                       "rope_original_max": 8192, "rope_low_rot": 1.0, "rope_high_rot": 4.0})
    plain = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim)
    got = plain.float() / rope_inv_freq(cfg, torch.zeros(1, 1))[0]
    if got.shape != inv_divisors.shape or not np.allclose(got.numpy(), inv_divisors, rtol=1e-3):
        raise UserError(f"{path}: rope_freqs.weight holds RoPE frequency factors other than Llama 3.1's (factor "
                        f"{inv_divisors.max():g}, low 1, high 4, original context 8192); ember cannot represent "
                        f"them. Import the original Hugging Face folder instead (ember.model.hf.import_hf).")
    return cfg


def load_gguf(path: str | Path, device: torch.device | str = "cpu"):
    """A llama- or qwen2-architecture GGUF as (ember GPT in fp32, tokenizer or None)."""
    meta, tensors = read_gguf(path)
    arch = meta.get("general.architecture")
    if arch not in ARCHS:
        raise UserError(f"{path}: architecture {arch!r}; ember reads {'/'.join(ARCHS)} GGUFs only")
    get = lambda k, default=None: meta.get(f"{arch}.{k}", default)
    f32 = lambda x: float(f"{float(x):.7g}")  # GGUF stores floats in fp32: 1e-6 comes back 9.99999997e-07
    try:
        n_embd, n_head = int(get("embedding_length")), int(get("attention.head_count"))
        head_dim = int(get("attention.key_length", n_embd // n_head))  # written when it is not n_embd / n_head
        if int(get("attention.value_length", head_dim)) != head_dim:
            raise UserError(f"{path}: key and value head sizes differ; ember's attention needs them equal")
        emb = tensors["token_embd.weight"]
        kw = dict(vocab_size=emb.shape[0], n_layer=int(get("block_count")), n_head=n_head,
                  n_kv_head=int(get("attention.head_count_kv", n_head)), n_embd=n_embd,
                  head_size=0 if head_dim * n_head == n_embd else head_dim, attn_bias=arch == "qwen2",
                  ffn_hidden=int(get("feed_forward_length")), max_seq_len=int(get("context_length", 2048)),
                  rope_theta=f32(get("rope.freq_base", 10000.0)),
                  norm_eps=f32(get("attention.layer_norm_rms_epsilon", 1e-5)),
                  tie_embeddings="output.weight" not in tensors)
        scaling = get("rope.scaling.type", "none")
        if scaling == "linear":  # llama.cpp's rope_freq_scale = 1 / factor
            kw.update(rope_scaling="linear", rope_factor=f32(get("rope.scaling.factor")))
        elif scaling not in ("none", None):
            raise UserError(f"{path}: {arch}.rope.scaling.type={scaling!r}; ember reads GGUFs with linear or no "
                            f"RoPE scaling (import the Hugging Face folder for yarn/dynamic)")
        config = _llama3_scaling(path, tensors.pop("rope_freqs.weight"), kw) if "rope_freqs.weight" in tensors \
            else GPTConfig(**kw)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise UserError(f"{path}: {arch} metadata or token_embd.weight missing or malformed ({e!r}); not a plain "
                        f"{arch} GGUF") from None
    check_layer_count(config, tensors, path)
    model = build_model(config, "meta", init=False)  # shapes first: the header may claim any size
    state = {}
    for name, ref in model.state_dict().items():
        g = gguf_param_name(name)
        if g not in tensors:
            raise UserError(f"{path}: tensor {g} is missing; not a plain {arch} GGUF")
        t = torch.from_numpy(np.array(tensors[g]))  # a copy: the reader maps the file read-only
        if arch == "llama" and name.endswith("q_proj.weight"):  # llama.cpp rotates adjacent pairs: undo
            t = meta_to_hf(t, config.n_head)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            t = meta_to_hf(t, config.n_kv_head)
        if t.shape != ref.shape:
            raise UserError(f"{path}: {g} has shape {tuple(t.shape)}, the metadata implies {tuple(ref.shape)}")
        state[name] = t
    model.to_empty(device=device)
    model.load_state_dict(state)
    return model.eval(), gguf_tokenizer(meta, path)


def gguf_tokenizer(meta: dict, path: str | Path | None = None):
    """The tokenizer stored in GGUF metadata (ember's exact tokenizer.json when present, SentencePiece for
    model "llama", byte-level BPE for "gpt2", with its chat template and BOS/EOS/EOT), or None if absent.
    path: the GGUF the metadata came from, named in the errors (the tokenizer code sees only the metadata)."""
    from ember.tokenizer.core import Tokenizer

    try:
        return Tokenizer.from_gguf(meta)
    except UserError as e:
        if path is None or str(path) in str(e):
            raise
        raise UserError(f"{path}: {e}") from None
