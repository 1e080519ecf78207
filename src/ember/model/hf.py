"""Hugging Face interop: export an ember GPT as a transformers folder, and import such a folder back.

    export_hf(model, "out/hf", tokenizer_json="runs/demo/tokenizer/tokenizer.json")
    transformers.AutoModelForCausalLM.from_pretrained("out/hf")   # LlamaForCausalLM (MixtralForCausalLM for MoE)
    model = import_hf("out/hf")                                    # back to ember, same logits

Dense -> Llama, MoE -> Mixtral, QK-norm -> Qwen3 / Qwen3-MoE (Llama has no QK-norm). Weights map 1:1 by
name (ember's RoPE uses HF's rotate_half pairing, so q/k need no permutation). The folder is plain JSON +
safetensors, so neither direction imports transformers.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ember.common import artifacts
from ember.common.checkpoint import check_layer_count, load_state
from ember.common.errors import UserError
from ember.model.gpt import GPT, GPTConfig, build_model

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
# rope_theta when a config.json omits it: the transformers defaults of each family
DEFAULT_ROPE_THETA = {"llama": 10000.0, "mixtral": 1e6, "qwen3": 10000.0, "qwen3_moe": 10000.0}

# ember name -> HF name; the first matching rule wins. Only the MoE FFN differs between families.
_COMMON = [(r"^tok_emb\.", "model.embed_tokens."), (r"^norm\.", "model.norm."), (r"^lm_head\.", "lm_head."),
           (r"^layers\.(\d+)\.attn_norm\.", r"model.layers.\1.input_layernorm."),
           (r"^layers\.(\d+)\.mlp_norm\.", r"model.layers.\1.post_attention_layernorm."),
           (r"^layers\.(\d+)\.attn\.", r"model.layers.\1.self_attn.")]
_MIXTRAL = [(r"^layers\.(\d+)\.mlp\.router\.", r"model.layers.\1.block_sparse_moe.gate."),
            (r"^layers\.(\d+)\.mlp\.experts\.(\d+)\.gate_proj\.", r"model.layers.\1.block_sparse_moe.experts.\2.w1."),
            (r"^layers\.(\d+)\.mlp\.experts\.(\d+)\.down_proj\.", r"model.layers.\1.block_sparse_moe.experts.\2.w2."),
            (r"^layers\.(\d+)\.mlp\.experts\.(\d+)\.up_proj\.", r"model.layers.\1.block_sparse_moe.experts.\2.w3.")]
_QWEN3_MOE = [(r"^layers\.(\d+)\.mlp\.router\.", r"model.layers.\1.mlp.gate.")]
_MLP = [(r"^layers\.(\d+)\.mlp\.", r"model.layers.\1.mlp.")]
RULES = {"llama": _COMMON + _MLP, "qwen3": _COMMON + _MLP,
         "mixtral": _COMMON + _MIXTRAL + _MLP, "qwen3_moe": _COMMON + _QWEN3_MOE + _MLP}


def model_type(config: GPTConfig) -> str:
    if config.qk_norm:
        return "qwen3_moe" if config.n_expert else "qwen3"
    return "mixtral" if config.n_expert else "llama"


def hf_name(name: str, mtype: str) -> str:
    for pattern, repl in RULES[mtype]:
        if re.match(pattern, name):
            return re.sub(pattern, repl, name)
    raise AssertionError(f"no HF name for ember parameter {name}")


# ---------------------------------------------------------------------------- config

def to_hf_config(c: GPTConfig, dtype: torch.dtype, special: dict[str, int] | None = None) -> dict:
    mtype = model_type(c)
    special = special or {}
    d = {
        "architectures": [ARCHITECTURES[mtype]], "model_type": mtype,
        "vocab_size": c.vocab_size, "hidden_size": c.n_embd, "intermediate_size": c.ffn_dim,
        "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head,
        "head_dim": c.head_dim, "hidden_act": "silu", "max_position_embeddings": c.max_seq_len,
        "rms_norm_eps": c.norm_eps, "tie_word_embeddings": c.tie_embeddings,
        # rope_theta for transformers 4.x, rope_parameters for 5.x
        "rope_theta": c.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "attention_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
        "bos_token_id": special.get("bos"), "eos_token_id": special.get("eos"), "pad_token_id": special.get("pad"),
        "torch_dtype": str(dtype).removeprefix("torch."), "dtype": str(dtype).removeprefix("torch."),
    }
    if mtype == "llama":
        d["mlp_bias"] = False
    if mtype in ("qwen3", "qwen3_moe"):
        d.update(use_sliding_window=False, sliding_window=None, max_window_layers=c.n_layer)
    if c.n_expert:
        # HF's aux loss is k times ember's (it counts per token, ember per routing slot; see gpt.moe_losses)
        d.update(num_experts_per_tok=c.n_expert_active, router_aux_loss_coef=c.moe_aux_coef / c.n_expert_active,
                 output_router_logits=False)
    if mtype == "mixtral":
        d.update(num_local_experts=c.n_expert, sliding_window=None, router_jitter_noise=0.0)
    if mtype == "qwen3_moe":
        d.update(num_experts=c.n_expert, moe_intermediate_size=c.ffn_dim, norm_topk_prob=True,
                 decoder_sparse_step=1, mlp_only_layers=[])
    return d


def from_hf_config(d: dict, where: str) -> GPTConfig:
    """GPTConfig for an HF config.json; anything ember cannot represent exactly is a UserError."""
    mtype = d.get("model_type")
    if mtype not in ARCHITECTURES:
        raise UserError(f"{where}: model_type {mtype!r} is not supported; import_hf reads {', '.join(ARCHITECTURES)}")

    def unsupported(ok: bool, what: str):
        if not ok:
            raise UserError(f"{where}: {what} has no ember equivalent, so the import would not match the original "
                            f"model. Only plain {mtype} checkpoints (silu, no biases, default RoPE) are supported.")

    unsupported(d.get("hidden_act", "silu") == "silu", f"hidden_act={d.get('hidden_act')!r}")
    unsupported(not d.get("attention_bias") and not d.get("mlp_bias"), "attention_bias/mlp_bias")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    unsupported(rope.get("rope_type", rope.get("type", "default")) == "default", f"RoPE scaling {rope!r}")
    n_embd, n_head = d["hidden_size"], d["num_attention_heads"]
    unsupported(d.get("head_dim") in (None, n_embd // n_head), f"head_dim={d.get('head_dim')} != hidden_size/heads")
    window = d.get("sliding_window")
    unsupported(not d.get("use_sliding_window") and (mtype in ("qwen3", "qwen3_moe") or window is None
                or window >= d.get("max_position_embeddings", 0)), f"sliding-window attention ({window})")
    n_expert, ffn = 0, d["intermediate_size"]
    if mtype == "mixtral":
        n_expert = d.get("num_local_experts", 8)
    elif mtype == "qwen3_moe":
        unsupported(d.get("norm_topk_prob", False), "norm_topk_prob=false (unnormalized top-k weights)")
        unsupported(d.get("decoder_sparse_step", 1) == 1 and not d.get("mlp_only_layers"), "dense layers in an MoE")
        n_expert, ffn = d["num_experts"], d["moe_intermediate_size"]
    theta = rope.get("rope_theta", d.get("rope_theta", DEFAULT_ROPE_THETA[mtype]))
    kw = dict(vocab_size=d["vocab_size"], n_layer=d["num_hidden_layers"], n_head=n_head,
              n_kv_head=d.get("num_key_value_heads") or n_head, n_embd=n_embd, ffn_hidden=ffn,
              max_seq_len=d.get("max_position_embeddings", 2048), rope_theta=float(theta),
              norm_eps=d.get("rms_norm_eps", 1e-6), tie_embeddings=d.get("tie_word_embeddings", False),
              qk_norm=mtype.startswith("qwen3"), n_expert=n_expert)
    if ffn == GPTConfig(n_embd=n_embd, n_head=n_head, n_kv_head=n_head).ffn_dim:
        kw["ffn_hidden"] = 0  # the derived default, so an exported ember config round-trips exactly
    if n_expert:
        k = d.get("num_experts_per_tok", 2)
        coef = d.get("router_aux_loss_coef", 0.01 / k) * k
        kw.update(n_expert_active=k, moe_aux_coef=float(f"{coef:.12g}"))  # /k on export, *k here: no float noise
    return GPTConfig(**kw)


# ---------------------------------------------------------------------------- tokenizer files

def special_tokens(tokenizer_json: Path) -> dict[str, tuple[str, int]]:
    """Guess bos/eos/pad/eot (end of turn) among the tokenizer's special added tokens by their usual names."""
    added = [t for t in json.loads(tokenizer_json.read_text()).get("added_tokens", []) if t.get("special")]
    names = {"bos": ("bos", "begin_of_text", "<s>"), "eos": ("eos", "end_of_text", "endoftext", "</s>"),
             "pad": ("pad",), "eot": ("<|end|>", "eot", "im_end", "end_of_turn")}
    found = {}
    for role, keys in names.items():
        for t in added:
            if any(k in t["content"].lower() for k in keys):
                found[role] = (t["content"], t["id"])
                break
    return found


def _write_tokenizer(src: Path, out: Path, config: GPTConfig, chat_template: str | None) -> dict[str, int]:
    """Copy tokenizer.json; tokenizer_config.json = the one beside it (ember's tokenizer stage writes one with
    the chat template) or a minimal one, with model_max_length set. Returns the special-token ids found."""
    if not src.is_file():
        raise UserError(f"tokenizer_json={src}: no such file. Pass the tokenizer.json written by `ember tokenizer`.")
    beside = src.with_name("tokenizer_config.json")
    try:
        vocab = json.loads(src.read_text())
        n = max([*vocab["model"]["vocab"].values(), *(t["id"] for t in vocab.get("added_tokens", []))]) + 1
        tok_cfg = json.loads(beside.read_text()) if beside.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"tokenizer_json={src} (or the tokenizer_config.json beside it) is not a Hugging Face "
                        f"tokenizers file ({e!r}). Pass the tokenizer.json written by `ember tokenizer`.") from None
    if n > config.vocab_size:
        raise UserError(f"tokenizer_json={src} has {n} tokens but the model's vocab_size is {config.vocab_size}: "
                        f"pass the tokenizer the model was trained with.")
    shutil.copyfile(src, out / "tokenizer.json")
    special = special_tokens(src)
    roles = {f"{r}_token": s for r, (s, _) in special.items() if r != "eot"}
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False, **roles,
               **tok_cfg, "model_max_length": config.max_seq_len}
    if chat_template:
        tok_cfg["chat_template"] = chat_template
    artifacts.write_json(out / "tokenizer_config.json", tok_cfg)
    artifacts.write_json(out / "special_tokens_map.json", roles)
    return {r: i for r, (_, i) in special.items()}


# ---------------------------------------------------------------------------- export / import

def export_hf(model: GPT, out_dir: str | Path, tokenizer_json: str | Path | None = None, *,
              chat_template: str | None = None) -> Path:
    """Write config.json, model.safetensors, generation_config.json (+ tokenizer files) into out_dir,
    atomically. bos/eos/pad ids come from the tokenizer's special tokens when one is given; chat_template
    overrides the one in a tokenizer_config.json beside tokenizer_json."""
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper
    c, out_dir = model.config, Path(out_dir)
    mtype = model_type(c)
    dtype = model.tok_emb.weight.dtype
    with artifacts.atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        special = _write_tokenizer(Path(tokenizer_json), tmp, c, chat_template) if tokenizer_json else {}
        tensors = {hf_name(k, mtype): v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        artifacts.write_json(tmp / "config.json", to_hf_config(c, dtype, special))
        stop = [special[r] for r in ("eos", "eot") if r in special]  # a chat model ends its turn with eot
        gen = {"bos_token_id": special.get("bos"), "eos_token_id": stop[0] if len(stop) == 1 else stop or None,
               "pad_token_id": special.get("pad")}
        artifacts.write_json(tmp / "generation_config.json", {k: v for k, v in gen.items() if v is not None})
    return out_dir


def _read_hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, or the shards listed in model.safetensors.index.json (how large models are saved)."""
    index = folder / "model.safetensors.index.json"
    files = [folder / "model.safetensors"]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({folder / f for f in weight_map.values()})
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
            raise UserError(f"{index}: not a safetensors index (needs a 'weight_map' object of shard file names; "
                            f"{e!r}). Re-save the model with save_pretrained.") from None
        for name in set(weight_map.values()):  # shard names come from the file: they must stay inside the folder
            if folder.resolve() not in (folder / name).resolve().parents:
                raise UserError(f"{index}: shard {name!r} lies outside {folder}; refused.")
    tensors = {}
    for f in files:
        if not f.is_file():
            raise UserError(f"{f}: missing. An HF folder needs model.safetensors (pytorch_model.bin is not read: "
                            f"pickles are unsafe; re-save with save_pretrained(safe_serialization=True)).")
        tensors.update(load_state(f)[0])
    return tensors


def import_hf(folder: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> GPT:
    """Load an HF Llama/Mixtral/Qwen3(-MoE) folder (e.g. one written by export_hf) as an ember GPT.
    dtype None keeps the checkpoint's dtype."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{folder}: no config.json. Pass a folder written by export_hf or save_pretrained.")
    try:
        config = from_hf_config(json.loads(cfg_path.read_text()), str(cfg_path))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError) as e:
        raise UserError(f"{cfg_path}: not a usable HF config ({e!r}).") from None
    tensors = _read_hf_tensors(folder)
    check_layer_count(config, tensors, folder)
    model = build_model(config, "meta", init=False)  # shapes first: config.json may claim any size
    mtype = model_type(config)
    expected = model.state_dict()
    wanted = {hf_name(k, mtype): k for k in expected}
    # checkpoints from older transformers carry the RoPE table; a tied head may be saved anyway
    extra = [k for k in tensors if k not in wanted and not k.endswith("rotary_emb.inv_freq")
             and not (k == "lm_head.weight" and config.tie_embeddings)]
    missing = [k for k in wanted if k not in tensors]
    if missing or extra:
        raise UserError(f"{folder}: weights do not match its config.json (missing {missing[:4]}, unexpected "
                        f"{extra[:4]}). Re-export the folder, or check it holds a plain {mtype} model.")
    state = {}
    for hf_key, key in wanted.items():
        t, want = tensors[hf_key], expected[key].shape
        if t.shape != want:
            raise UserError(f"{folder}: {hf_key} has shape {tuple(t.shape)}, config.json implies {tuple(want)}.")
        state[key] = t
    dtype = dtype or tensors[hf_name("tok_emb.weight", mtype)].dtype
    model.to_empty(device=device).to(dtype)
    model.load_state_dict(state)
    return model
