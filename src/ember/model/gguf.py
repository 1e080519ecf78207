"""GGUF (llama.cpp's format) export and import for dense ember models, via the `gguf` package.

    export_gguf(model, "out/model.gguf", tokenizer)          # llama arch, tokenizer in the metadata
    export_gguf(model, "out/q4.gguf", tokenizer, dtype="q4_k_m")  # f32 f16 bf16 q8_0 q6_k q4_0 q4_k q4_k_m
    model, tok = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")  # any llama GGUF, quantized ones dequantized

Written the way llama.cpp's convert_hf_to_gguf.py writes a Llama: tensor names token_embd / blk.N.attn_q /
... / output, (out, in) weights, norms in f32, and the q/k rows PERMUTED to Meta's interleaved RoPE layout
(llama.cpp rotates adjacent pairs; ember, like HF, rotates halves), undone on import. Tokenizers: ember's
byte-level BPE as tokenizer.ggml.model "gpt2" (+ the exact tokenizer.json under "ember.tokenizer_json"),
SentencePiece-style vocabularies (llama2.c) as "llama" with scores.
Quantized types pick each tensor's type as llama.cpp's `llama-quantize` does (tensor_types) and write the
block formats of ggml-quants.c: Q8_0/Q4_0/Q5_0 through the `gguf` package, Q4_K/Q6_K (which it only reads)
in numpy below.
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


# ---------------------------------------------------------------------------- quantized tensor types

QK_K = 256  # weights per K-quant super-block (8 sub-blocks of 32 for Q4_K, 16 of 16 for Q6_K)

# ember's name -> (GGML type of most matrices, general.file_type). q4_k: Q4_K everywhere llama.cpp's Q4_K_M keeps
# it, without Q4_K_M's Q6_K attn_v/ffn_down (no llama.cpp ftype is exactly that; Q4_K_S is the nearest label).
GGUF_TYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
              "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q6_k": ("Q6_K", "MOSTLY_Q6_K"), "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
              "q4_k": ("Q4_K", "MOSTLY_Q4_K_S"), "q4_k_m": ("Q4_K", "MOSTLY_Q4_K_M")}
# what llama.cpp falls back to when a row's length is not a whole number of blocks (tensor_type_fallback);
# a type without a fallback there (Q8_0, Q4_0: llama.cpp refuses the tensor) becomes F16 here
FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}


def check_gguf_type(dtype: str) -> None:
    if dtype not in GGUF_TYPES:
        raise UserError(f"GGUF type {dtype!r} is not one ember writes; use one of {', '.join(GGUF_TYPES)} "
                        f"(q4_k_m = llama.cpp's Q4_K_M mix)")


def tensor_types(shapes: dict[str, tuple[int, ...]], dtype: str, n_layer: int) -> dict[str, str]:
    """GGUF tensor name -> GGML type name, chosen as llama.cpp's llama_tensor_get_type does for this ftype without
    an importance matrix: 1-D tensors (norm gains) stay F32; the output matrix (the token embedding when tied)
    gets Q6_K in every quantized type but Q8_0; q4_k_m also gives Q6_K to attn_v and ffn_down in the layers
    llama.cpp's use_more_bits picks (first and last eighth, every third between); a row length (shape[-1], GGUF's
    ne[0]) that is not a whole number of blocks falls back as llama.cpp does (Q4_K->Q5_0, Q6_K->Q8_0), else F16."""
    import gguf

    check_gguf_type(dtype)
    base = GGUF_TYPES[dtype][0]
    block = lambda t: gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t]][0]
    quantized = block(base) > 1
    tied = "output.weight" not in shapes
    more_bits = lambda i: i < n_layer // 8 or i >= 7 * n_layer // 8 or (i - n_layer // 8) % 3 == 2
    out = {}
    for name, shape in shapes.items():
        t, cols = base, shape[-1]
        if len(shape) == 1:
            t = "F32"
        elif quantized and (name == "output.weight" or (tied and name == "token_embd.weight")):
            t = "Q8_0" if base == "Q8_0" or cols % block(base) else "Q6_K"
        elif dtype == "q4_k_m" and name.endswith(("attn_v.weight", "ffn_down.weight")) \
                and more_bits(int(name.split(".")[1])):
            t = "Q6_K"
        if cols % block(t):
            t = FALLBACK.get(t, "F16")
            t = "F16" if cols % block(t) else t
        out[name] = t
    return out


def _f16(x: np.ndarray) -> np.ndarray:
    """fp32 rounded through fp16, as ggml stores the block scales."""
    return x.astype(np.float16).astype(np.float32)


def _fit_scale_min(x: np.ndarray, w: np.ndarray, nmax: int = 15, rmin: float = -1.0, rdelta: float = 0.1,
                   nstep: int = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of x (m, 32): levels L in 0..nmax and (scale, m) with x ~ scale*L - m, minimizing the w-weighted
    squared error. Facts of ggml's make_qkx2_quants: start from the min/max grid, then try nstep+1 slightly
    stretched grids (iscale = (nmax + rmin + rdelta*i) / (max - min)), least-squares-fit scale and min to each
    rounding, keep the best; the min is never above 0. Returns (scale (m,), m = -min (m,), L (m, 32) float)."""
    x, w = x.astype(np.float64), w.astype(np.float64)  # exact enough sums: near ties go to the better fit
    lo, hi = np.minimum(x.min(1), 0), x.max(1)
    flat = hi == lo
    sw, sx = w.sum(1), (w * x).sum(1)
    mn = lo.copy()
    span = np.where(flat, 1, hi - mn)
    L = np.clip(np.rint(nmax / span[:, None] * (x - mn[:, None])), 0, nmax)
    scale = span / nmax
    best = (w * (scale[:, None] * L + mn[:, None] - x) ** 2).sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        for i in range(nstep + 1):
            span = np.where(hi > mn, hi - mn, 1)  # mn moves with each improvement, as in ggml
            La = np.clip(np.rint((rmin + rdelta * i + nmax) / span[:, None] * (x - mn[:, None])), 0, nmax)
            sl, sl2, sxl = (w * La).sum(1), (w * La * La).sum(1), (w * La * x).sum(1)
            D = sw * sl2 - sl * sl
            s_new, m_new = (sw * sxl - sx * sl) / D, (sl2 * sx - sl * sxl) / D
            pos = m_new > 0  # a positive min is not representable: refit the scale alone
            s_new, m_new = np.where(pos, sxl / sl2, s_new), np.where(pos, 0, m_new)
            err = (w * (s_new[:, None] * La + m_new[:, None] - x) ** 2).sum(1)
            better = (D > 0) & (err < best) & ~flat
            L = np.where(better[:, None], La, L)
            best, scale, mn = np.where(better, err, best), np.where(better, s_new, scale), np.where(better, m_new, mn)
    scale, L = np.where(flat, 0, scale), np.where(flat[:, None], 0, L)
    return scale.astype(np.float32), (-mn).astype(np.float32), L


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """(n, 256) fp32 super-blocks -> (n, 144) bytes of GGML's block_q4_K: d, dmin (fp16), 12 bytes holding 8
    six-bit sub-block scales and 8 six-bit mins, 128 bytes of 4-bit levels. Weight = d*sc*L - dmin*m. The steps
    of ggml's quantize_row_q4_K_ref: fit (scale, min) per 32-weight sub-block (weights av|x| + |x|, so large
    weights count more), quantize the 8 scales and 8 mins to 6 bits against their maxima, then re-round the
    levels against the scales as stored."""
    n = x.shape[0]
    xs = x.reshape(n * 8, 32)
    w = np.sqrt((xs * xs).mean(1, keepdims=True)) + np.abs(xs)
    scales, mins, L = _fit_scale_min(xs, w)
    scales, mins, L = scales.reshape(n, 8), mins.reshape(n, 8), L.reshape(n, 8, 32)
    max_s, max_m = scales.max(1, keepdims=True), mins.max(1, keepdims=True)
    ls = np.minimum(63, np.rint(np.where(max_s > 0, 63 / np.where(max_s > 0, max_s, 1), 0) * scales)).astype(np.uint8)
    lm = np.minimum(63, np.rint(np.where(max_m > 0, 63 / np.where(max_m > 0, max_m, 1), 0) * mins)).astype(np.uint8)
    d, dmin = (max_s[:, 0] / 63).astype(np.float16), (max_m[:, 0] / 63).astype(np.float16)
    sub_d = d.astype(np.float32)[:, None] * ls  # (n, 8) the scales as llama.cpp will read them
    sub_m = dmin.astype(np.float32)[:, None] * lm
    with np.errstate(divide="ignore", invalid="ignore"):
        L2 = np.clip(np.rint((x.reshape(n, 8, 32) + sub_m[..., None]) / sub_d[..., None]), 0, 15)
    L = np.where(sub_d[..., None] != 0, L2, L).astype(np.uint8).reshape(n, 4, 2, 32)
    sc = np.concatenate([ls[:, :4] | (ls[:, 4:] >> 4) << 6, lm[:, :4] | (lm[:, 4:] >> 4) << 6,
                         (ls[:, 4:] & 0xF) | (lm[:, 4:] & 0xF) << 4], axis=1)
    qs = (L[:, :, 0] | L[:, :, 1] << 4).reshape(n, 128)  # 64-weight chunks: low nibbles 0..31, high 32..63
    return np.concatenate([d.view(np.uint8).reshape(n, 2), dmin.view(np.uint8).reshape(n, 2), sc, qs], axis=1)


def _fit_symmetric(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of x (m, 16): signed levels L in -nmax..nmax-1 and a scale with x ~ scale*L, minimizing the
    x^2-weighted squared error (ggml's make_qx_quants, rmse_type 1): the grid through the largest |x| and 18
    stretched ones (nmax +- 0.1*i), each with its least-squares scale. Returns (scale (m,), L (m, 16) float)."""
    x = x.astype(np.float64)  # exact enough sums: near ties go to the better fit
    big = np.take_along_axis(x, np.abs(x).argmax(1)[:, None], 1)[:, 0]
    zero = np.abs(big) < 1e-15
    big = np.where(zero, 1, big)
    w = x * x

    def grid(k):
        L = np.clip(np.rint(-(nmax + 0.1 * k) / big[:, None] * x), -nmax, nmax - 1)
        return L, (w * x * L).sum(1), (w * L * L).sum(1)

    L, slx, sl2 = grid(0)
    scale = np.where(sl2 > 0, slx / np.where(sl2 > 0, sl2, 1), 0)
    best = scale * slx
    for k in [*range(-9, 0), *range(1, 10)]:
        La, a, b = grid(k)
        better = (b > 0) & (a * a > best * b)
        L = np.where(better[:, None], La, L)
        scale = np.where(better, a / np.where(b > 0, b, 1), scale)
        best = np.where(better, scale * a, best)
    return np.where(zero, 0, scale).astype(np.float32), np.where(zero[:, None], 0, L)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """(n, 256) fp32 super-blocks -> (n, 210) bytes of GGML's block_q6_K: 128 bytes of low 4 bits, 64 of high
    2 bits, 16 int8 sub-block scales, d (fp16). Weight = d*sc*(L-32). As ggml's quantize_row_q6_K_ref: fit a
    scale per 16 weights (_fit_symmetric, 6-bit levels), quantize the 16 scales to int8 against the largest,
    re-round the levels against the stored scales."""
    n = x.shape[0]
    scales, L = _fit_symmetric(x.reshape(n * 16, 16), 32)
    scales, L = scales.reshape(n, 16), L.reshape(n, 16, 16)
    big = np.take_along_axis(scales, np.abs(scales).argmax(1)[:, None], 1)  # (n, 1), signed
    zero = np.abs(big) < 1e-15
    iscale = np.where(zero, 0, -128 / np.where(zero, 1, big))
    d = np.where(zero, 0, 1 / np.where(zero, 1, iscale))[:, 0].astype(np.float16)
    sc = np.minimum(127, np.rint(iscale * scales)).astype(np.int8)
    sub_d = d.astype(np.float32)[:, None] * sc
    with np.errstate(divide="ignore", invalid="ignore"):
        L2 = np.clip(np.rint(x.reshape(n, 16, 16) / sub_d[..., None]), -32, 31)
    L = (np.where(sub_d[..., None] != 0, L2, L) + 32).astype(np.uint8).reshape(n, 2, 4, 32)  # halves of 128
    ql = np.concatenate([L[:, :, 0] & 0xF | (L[:, :, 2] & 0xF) << 4, L[:, :, 1] & 0xF | (L[:, :, 3] & 0xF) << 4],
                        axis=2).reshape(n, 128)
    qh = (L[:, :, 0] >> 4 | (L[:, :, 1] >> 4) << 2 | (L[:, :, 2] >> 4) << 4 | (L[:, :, 3] >> 4) << 6).reshape(n, 64)
    out = np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8).reshape(n, 2)], axis=1)
    out[zero[:, 0]] = 0
    return out


def quantize(x: np.ndarray, kind: str) -> np.ndarray:
    """(rows, cols) fp32 -> the tensor's bytes in GGML type `kind`: fp32/fp16 arrays, else (rows, bytes per row)
    uint8. The `gguf` package quantizes F16/BF16/Q8_0/Q4_0/Q5_0 (bit-exact with ggml's reference); Q4_K and Q6_K,
    which it only dequantizes, are quantized above, 16k super-blocks at a time to bound the temporaries.
    Tried and dropped: fitting each Q4_0/Q5_0 block's scale by weighted least squares (make_qx_quants with
    weights sqrt(mean x^2 + x^2), llama.cpp's imatrix-free weighting) lowered SmolLM2-135M's tensor errors ~10%
    but raised its Q4_0 perplexity 31.07 -> 31.84 (benchmarks/bench_gguf_quant.py): the max-based scale keeps
    each block's largest weight exact, and those outliers matter more than the mean squared error."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize as gguf_quantize

    x = np.ascontiguousarray(x, dtype=np.float32)
    if kind not in ("Q4_K", "Q6_K"):
        return gguf_quantize(x, GGMLQuantizationType[kind])
    fn = quantize_q4_k if kind == "Q4_K" else quantize_q6_k
    blocks = x.reshape(-1, QK_K)
    out = np.concatenate([fn(blocks[i:i + 16384]) for i in range(0, len(blocks), 16384)])
    return out.reshape(x.shape[0], -1)


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
    atomically (a temp file renamed when complete: a killed export leaves no model.gguf).
    dtype: one of GGUF_TYPES; each tensor's own type follows tensor_types (norm gains stay f32, as llama.cpp
    keeps them)."""
    gguf = _gguf()
    c = model.config
    check_exportable(c)
    check_gguf_type(dtype)
    tensors = to_gguf_tensors(model)
    kinds = tensor_types({k: v.shape for k, v in tensors.items()}, dtype, c.n_layer)
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
        w.add_file_type(gguf.LlamaFileType[GGUF_TYPES[dtype][1]])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if tokenizer is not None:
            _write_tokenizer(w, gguf, tokenizer, c.vocab_size)
        for tname, arr in tensors.items():
            kind = gguf.GGMLQuantizationType[kinds[tname]]
            data = quantize(arr, kind.name) if arr.ndim == 2 else arr
            # block types are raw bytes: the writer needs their GGML type to record the logical shape
            w.add_tensor(tname, data, raw_dtype=kind if data.dtype == np.uint8 else None)
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


def read_gguf_types(path: str | Path) -> dict[str, str]:
    """GGUF tensor name -> its GGML type name as stored (F32, Q4_K, ...), without reading the tensors."""
    return {t.name: t.tensor_type.name for t in _open(path)[0].tensors}


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
