"""Hugging Face interop: export an ember GPT as a transformers folder, and import such a folder back.

    export_hf(model, "out/hf", tokenizer)                         # tokenizer: ember.tokenizer Tokenizer
    transformers.AutoModelForCausalLM.from_pretrained("out/hf")   # LlamaForCausalLM (MixtralForCausalLM for MoE)
    model = import_hf("out/hf")                                    # back to ember, same logits

Import reads Llama 1/2/3.x (RoPE scaling linear, dynamic, llama3, yarn), Mistral, Qwen2/2.5 (q/k/v biases),
Qwen3, SmolLM2, Mixtral and Qwen3-MoE from safetensors (single or sharded) or pytorch_model.bin (loaded with
weights_only, so no code runs). Export picks the family from the features: dense -> Llama, MoE -> Mixtral,
QK-norm -> Qwen3 / Qwen3-MoE, q/k/v biases -> Qwen2; an imported Mistral stays Mistral. Weights map 1:1 by
name (ember's RoPE uses HF's rotate_half pairing, so q/k need no permutation). Neither direction imports
transformers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import re
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from ember.common import artifacts
from ember.common.checkpoint import check_layer_count, load_state
from ember.common.errors import UserError
from ember.common.log import print0
from ember.model.gpt import GPT, GPTConfig, build_model

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "mixtral": "MixtralForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
# rope_theta when a config.json omits it: the transformers defaults of each family
DEFAULT_ROPE_THETA = {"llama": 10000.0, "mistral": 10000.0, "qwen2": 10000.0, "mixtral": 1e6, "qwen3": 10000.0,
                      "qwen3_moe": 10000.0}
# HF rope_type -> ember rope_scaling ("default" = none); longrope, su, proportional, ... have no ember equivalent
ROPE_TYPES = {"default": "", "linear": "linear", "dynamic": "dynamic", "llama3": "llama3", "yarn": "yarn"}

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
RULES = {"llama": _COMMON + _MLP, "mistral": _COMMON + _MLP, "qwen2": _COMMON + _MLP, "qwen3": _COMMON + _MLP,
         "mixtral": _COMMON + _MIXTRAL + _MLP, "qwen3_moe": _COMMON + _QWEN3_MOE + _MLP}


def _family(c: GPTConfig) -> str:
    """The HF family whose modeling code computes exactly what ember does for these features."""
    if c.attn_bias:  # Qwen2 is the family with q/k/v biases (and none on o_proj); no QK-norm, no MoE there
        return "" if c.qk_norm or c.n_expert else "qwen2"
    if c.qk_norm:
        return "qwen3_moe" if c.n_expert else "qwen3"
    if c.n_expert:  # Mixtral always renormalizes the top-k weights; only Qwen3-MoE can leave them raw
        return "mixtral" if c.moe_norm_topk else ""
    return "llama"


def model_type(config: GPTConfig) -> str:
    """HF model_type to export as: the imported family when it computes the same (Mistral = Llama's math), else
    the family chosen from the features."""
    fam = _family(config)
    if config.hf_model_type == "mistral" and fam == "llama":
        return "mistral"
    if not fam:
        raise UserError(f"model config (attn_bias={config.attn_bias}, qk_norm={config.qk_norm}, n_expert="
                        f"{config.n_expert}, moe_norm_topk={config.moe_norm_topk}) has no Hugging Face family that "
                        f"computes the same; export supports Llama, Mistral, Qwen2, Qwen3, Mixtral, Qwen3-MoE.")
    return fam


def hf_name(name: str, mtype: str) -> str:
    for pattern, repl in RULES[mtype]:
        if re.match(pattern, name):
            return re.sub(pattern, repl, name)
    raise AssertionError(f"no HF name for ember parameter {name}")


# ---------------------------------------------------------------------------- config

def _rope_parameters(c: GPTConfig) -> dict:
    """HF rope_parameters (transformers 5) of c: the rope type and the parameters its formula reads."""
    p = {"rope_type": c.rope_scaling or "default", "rope_theta": c.rope_theta}
    if c.rope_scaling:
        p["factor"] = c.rope_factor
    if c.rope_scaling == "llama3":
        p.update(low_freq_factor=c.rope_low_rot, high_freq_factor=c.rope_high_rot,
                 original_max_position_embeddings=c.rope_original_max or c.max_seq_len)
    if c.rope_scaling == "yarn":
        p.update(beta_fast=c.rope_high_rot, beta_slow=c.rope_low_rot,
                 original_max_position_embeddings=c.rope_original_max or c.max_seq_len)
        if c.rope_attn_factor:
            p["attention_factor"] = c.rope_attn_factor
        if not c.rope_truncate:
            p["truncate"] = False
    return p


def to_hf_config(c: GPTConfig, dtype: torch.dtype, special: dict[str, int] | None = None) -> dict:
    mtype = model_type(c)
    special = special or {}
    rope = _rope_parameters(c)
    # dynamic NTK grows the base past HF's max_position_embeddings, so that field holds the original context
    max_pos = (c.rope_original_max or c.max_seq_len) if c.rope_scaling == "dynamic" else c.max_seq_len
    d = {
        "architectures": [ARCHITECTURES[mtype]], "model_type": mtype,
        "vocab_size": c.vocab_size, "hidden_size": c.n_embd, "intermediate_size": c.ffn_dim,
        "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head,
        "head_dim": c.head_dim, "hidden_act": "silu", "max_position_embeddings": max_pos,
        "rms_norm_eps": c.norm_eps, "tie_word_embeddings": c.tie_embeddings,
        # rope_theta + rope_scaling for transformers 4.x, rope_parameters for 5.x (which reads rope_scaling first)
        "rope_theta": c.rope_theta, "rope_parameters": rope,
        "rope_scaling": {k: v for k, v in rope.items() if k != "rope_theta"} if c.rope_scaling else None,
        "attention_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
        "bos_token_id": special.get("bos"), "eos_token_id": special.get("eos"), "pad_token_id": special.get("pad"),
        "torch_dtype": str(dtype).removeprefix("torch."), "dtype": str(dtype).removeprefix("torch."),
    }
    if mtype == "llama":
        d["mlp_bias"] = False
    if mtype == "qwen2":
        del d["attention_bias"]  # Qwen2's q/k/v biases are built in; its attention_bias is not a setting
    if mtype in ("mistral", "mixtral"):
        d["sliding_window"] = None  # ember attends to every earlier position (see from_hf_config)
    if mtype in ("qwen2", "qwen3", "qwen3_moe"):
        d.update(use_sliding_window=False, sliding_window=None, max_window_layers=c.n_layer)
    if c.n_expert:
        # HF's aux loss is k times ember's (it counts per token, ember per routing slot; see gpt.moe_losses)
        d.update(num_experts_per_tok=c.n_expert_active, router_aux_loss_coef=c.moe_aux_coef / c.n_expert_active,
                 output_router_logits=False)
    if mtype == "mixtral":
        d.update(num_local_experts=c.n_expert, router_jitter_noise=0.0)
    if mtype == "qwen3_moe":
        d.update(num_experts=c.n_expert, moe_intermediate_size=c.ffn_dim, norm_topk_prob=c.moe_norm_topk,
                 decoder_sparse_step=1, mlp_only_layers=[])
    return d


def _rope_from_hf(d: dict, mtype: str, max_pos: int, unsupported) -> dict:
    """GPTConfig rope_* fields of an HF config's rope_scaling / rope_parameters (transformers 5 reads
    rope_scaling first when both are present, so do we)."""
    rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    unsupported(kind in ROPE_TYPES, f"rope_type={kind!r} (ember has {', '.join(ROPE_TYPES)})")
    unsupported(rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) == 1.0,
                "partial_rotary_factor (RoPE on part of each head)")
    theta = rope.get("rope_theta", d.get("rope_theta", DEFAULT_ROPE_THETA[mtype]))
    kw = dict(rope_theta=float(theta))
    if kind == "default":
        return kw
    orig = rope.get("original_max_position_embeddings") or d.get("original_max_position_embeddings") or max_pos
    kw.update(rope_scaling=ROPE_TYPES[kind], rope_original_max=int(orig if kind != "dynamic" else max_pos))
    if kind == "yarn":
        factor = rope.get("factor") or max_pos / orig  # DeepSeek-style configs give the ratio of lengths instead
        attn, mscale, mscale_all = rope.get("attention_factor"), rope.get("mscale"), rope.get("mscale_all_dim")
        if attn is None and mscale and mscale_all and factor > 1:  # YaRN's temperature, two exponents (DeepSeek-V2)
            attn = (0.1 * mscale * math.log(factor) + 1) / (0.1 * mscale_all * math.log(factor) + 1)
        kw.update(rope_factor=float(factor), rope_attn_factor=float(attn or 0.0),
                  rope_high_rot=float(rope.get("beta_fast") or 32), rope_low_rot=float(rope.get("beta_slow") or 1),
                  rope_truncate=bool(rope.get("truncate", True)))
    else:
        kw["rope_factor"] = float(rope["factor"])
    if kind == "llama3":
        kw.update(rope_low_rot=float(rope["low_freq_factor"]), rope_high_rot=float(rope["high_freq_factor"]))
    return kw


def _window(d: dict, mtype: str, max_pos: int) -> int | None:
    """The sliding-attention window some layer uses, if shorter than the context; None when attention is full."""
    types = d.get("layer_types") or []
    window = d.get("sliding_window")
    if mtype in ("qwen2", "qwen3", "qwen3_moe"):  # windowed only when switched on, in the layers it names
        on = d.get("use_sliding_window") and ("sliding_attention" in types if types else
                                              d.get("max_window_layers", 0) < d["num_hidden_layers"])
        window = window if on else None
    elif mtype == "llama":
        window = None
    elif types and "sliding_attention" not in types:
        window = None
    return window if window and window < max_pos else None


def from_hf_config(d: dict, where: str) -> GPTConfig:
    """GPTConfig for an HF config.json; anything ember cannot represent exactly is a UserError. A sliding
    attention window shorter than the context caps max_seq_len at the window: ember attends to every earlier
    position, which equals windowed attention exactly for sequences no longer than the window."""
    mtype = d.get("model_type")
    if mtype not in ARCHITECTURES:
        raise UserError(f"{where}: model_type {mtype!r} is not supported; import_hf reads {', '.join(ARCHITECTURES)}")

    def unsupported(ok: bool, what: str):
        if not ok:
            raise UserError(f"{where}: {what} has no ember equivalent, so the import would not match the original "
                            f"model. ember reads {mtype} checkpoints with silu, q/k/v biases only as in Qwen2, "
                            f"RoPE scaling {'/'.join(k for k in ROPE_TYPES if k != 'default')}.")

    unsupported(d.get("hidden_act", "silu") == "silu", f"hidden_act={d.get('hidden_act')!r}")
    # Qwen2's q/k/v biases are built into its modeling code; elsewhere attention_bias also puts one on o_proj
    unsupported(mtype == "qwen2" or not d.get("attention_bias"), "attention_bias=true (a bias on o_proj too)")
    unsupported(not d.get("mlp_bias"), "mlp_bias=true")
    types = d.get("layer_types") or []
    unsupported(set(types) <= {"full_attention", "sliding_attention"}, f"layer_types={sorted(set(types))}")
    n_embd, n_head = d["hidden_size"], d["num_attention_heads"]
    max_pos = d.get("max_position_embeddings", 2048)
    head_dim = d.get("head_dim") or n_embd // n_head
    n_expert, ffn = 0, d["intermediate_size"]
    if mtype == "mixtral":
        n_expert = d.get("num_local_experts", 8)
    elif mtype == "qwen3_moe":
        unsupported(d.get("decoder_sparse_step", 1) == 1 and not d.get("mlp_only_layers"), "dense layers in an MoE")
        # transformers 5 saves Qwen3-MoE's num_experts under Mixtral's name (its attribute_map)
        n_expert, ffn = d.get("num_experts") or d["num_local_experts"], d["moe_intermediate_size"]
    kw = dict(vocab_size=d["vocab_size"], n_layer=d["num_hidden_layers"], n_head=n_head,
              n_kv_head=d.get("num_key_value_heads") or n_head, n_embd=n_embd, ffn_hidden=ffn,
              head_size=0 if head_dim * n_head == n_embd else head_dim, attn_bias=mtype == "qwen2",
              max_seq_len=max_pos, norm_eps=d.get("rms_norm_eps", 1e-6),
              tie_embeddings=d.get("tie_word_embeddings", False), qk_norm=mtype.startswith("qwen3"),
              n_expert=n_expert, **_rope_from_hf(d, mtype, max_pos, unsupported))
    if kw.get("rope_scaling") == "dynamic" and kw.get("rope_factor", 1.0) > 1:
        # max_position_embeddings is the original context here; dynamic NTK is there to run past it (up to
        # factor times, where its base has grown by the ratio it was tuned for): the engine may go that far
        kw["max_seq_len"] = int(max_pos * kw["rope_factor"])
    if (window := _window(d, mtype, max_pos)) is not None:
        kw["max_seq_len"] = window
        print0(f"note: {where}: sliding_window={window} < max_position_embeddings={max_pos}; ember has no windowed "
               f"attention, so the imported model's max_seq_len is capped at {window}, where full attention is "
               f"the same computation", file=sys.stderr)
    if n_expert:
        k = d.get("num_experts_per_tok", 2)
        coef = d.get("router_aux_loss_coef", 0.01 / k) * k
        kw.update(n_expert_active=k, moe_aux_coef=float(f"{coef:.12g}"),  # /k on export, *k here: no float noise
                  moe_norm_topk=mtype == "mixtral" or bool(d.get("norm_topk_prob", False)))
    try:
        config = GPTConfig(**kw)
    except UserError as e:  # e.g. zero heads: name the file, not an ember config field alone
        raise UserError(f"{where}: not a usable HF config ({e}).") from None
    if ffn == dataclasses.replace(config, ffn_hidden=0).ffn_dim:
        config.ffn_hidden = 0  # the derived default, so an exported ember config round-trips exactly
    if mtype != _family(config):  # only a family the features do not imply needs remembering (Mistral)
        config.hf_model_type = mtype
    return config


# ---------------------------------------------------------------------------- export / import

def export_hf(model: GPT, out_dir: str | Path, tokenizer=None, *, tokenizer_json: str | Path | None = None,
              chat_template: str | None = None) -> Path:
    """Write config.json, model.safetensors, generation_config.json and the tokenizer files into out_dir,
    atomically. tokenizer: an ember.tokenizer Tokenizer (or tokenizer_json: a file to load one from); its
    save() writes files transformers reads with the same ids, chat template and BOS rule, and its
    bos/eos/pad/stop ids go into the configs. chat_template overrides the tokenizer's own."""
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper
    c, out_dir = model.config, Path(out_dir)
    mtype = model_type(c)
    dtype = model.tok_emb.weight.dtype
    if tokenizer is None and tokenizer_json is not None:
        from ember.tokenizer.special import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_json)
    if tokenizer is not None and tokenizer.vocab_size > c.vocab_size:
        raise UserError(f"tokenizer {tokenizer.path or ''} has {tokenizer.vocab_size} tokens but the model's vocab_size "
                        f"is {c.vocab_size}: pass the tokenizer the model was trained with.")
    with artifacts.atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        special, stop = {}, []
        if tokenizer is not None:
            tokenizer.save(tmp, model_max_length=c.max_seq_len)
            if chat_template is not None:
                cfg = json.loads((tmp / "tokenizer_config.json").read_text())
                artifacts.write_json(tmp / "tokenizer_config.json", {**cfg, "chat_template": chat_template})
            special = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id}
            stop = list(tokenizer.stop_ids)  # a chat model ends its turn with its end-of-turn token
        tensors = {hf_name(k, mtype): v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        artifacts.write_json(tmp / "config.json", to_hf_config(c, dtype, special))
        gen = {"bos_token_id": special.get("bos"), "eos_token_id": stop[0] if len(stop) == 1 else stop or None,
               "pad_token_id": special.get("pad")}
        artifacts.write_json(tmp / "generation_config.json", {k: v for k, v in gen.items() if v is not None})
    return out_dir


def _read_hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF folder: model.safetensors, the shards of model.safetensors.index.json (how large
    models are saved), or else pytorch_model.bin (+ its .index.json shards), read only with
    torch.load(weights_only=True), which refuses pickled code."""
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (folder / index).is_file():
            files = _shards(folder / index, folder)
            break
        if (folder / single).is_file():
            files = [folder / single]
            break
    else:
        raise UserError(f"{folder}: no weights (model.safetensors, pytorch_model.bin or their .index.json). Pass a "
                        f"folder written by save_pretrained or export_hf.")
    tensors = {}
    for f in files:
        if not f.is_file():
            raise UserError(f"{f}: missing, though its index lists it. Download or copy the folder again.")
        tensors.update(load_state(f)[0] if f.suffix == ".safetensors" else _load_bin(f))
    return tensors


def _shards(index: Path, folder: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = set(weight_map.values())
    except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
        kind = "safetensors" if "safetensors" in index.name else "pytorch_model.bin"
        raise UserError(f"{index}: not a {kind} index (needs a 'weight_map' object of shard file names; "
                        f"{e!r}). Re-save the model with save_pretrained.") from None
    for name in names:  # shard names come from the file: they must stay inside the folder
        if folder.resolve() not in (folder / name).resolve().parents:
            raise UserError(f"{index}: shard {name!r} lies outside {folder}; refused.")
    return sorted(folder / n for n in names)


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A pytorch_model.bin state dict: weights_only (tensors and plain containers; any other pickled object is
    refused, so loading runs no code), mmap (tensors are read from the file as they are used)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:  # torch's own text here advises turning weights_only off: never pass it on
        raise UserError(f"{path}: not a loadable weights-only PyTorch state dict: it holds pickled Python objects "
                        f"beyond tensors, which ember will not execute (unpickling them can run any code). Re-save "
                        f"the model as safetensors with save_pretrained(safe_serialization=True).") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError) as e:
        raise UserError(f"{path}: not a loadable weights-only PyTorch state dict ({str(e).splitlines()[0][:200]}): "
                        f"truncated, a legacy (pre-1.6) file, or it pickles code. Re-save it with "
                        f"save_pretrained(safe_serialization=True).") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: holds {type(state).__name__}, not a {{name: tensor}} state dict. Re-save it with "
                        f"save_pretrained(safe_serialization=True).")
    return state


def import_hf(folder: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> GPT:
    """Load an HF Llama/Mistral/Qwen2/Qwen3/Mixtral/Qwen3-MoE folder (e.g. one written by export_hf or
    save_pretrained) as an ember GPT. dtype None keeps the checkpoint's dtype."""
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
    emb = tensors.get("model.embed_tokens.weight")
    if config.tie_embeddings and "lm_head.weight" in tensors and emb is not None and \
            not torch.equal(tensors["lm_head.weight"], emb):  # a saved tied head must be the embedding itself
        extra.append("lm_head.weight (differs from embed_tokens: not tied)")
    if missing or extra:
        raise UserError(f"{folder}: weights do not match {cfg_path.name} (missing {missing[:4]}, unexpected "
                        f"{extra[:4]}). Fix config.json (e.g. tie_word_embeddings, model_type) or re-save the folder.")
    state = {}
    for hf_key, key in wanted.items():
        t, want = tensors[hf_key], expected[key].shape
        if t.shape != want:
            raise UserError(f"{folder}: {hf_key} has shape {tuple(t.shape)}, {cfg_path.name} implies "
                            f"{tuple(want)}. Fix config.json or re-save the folder.")
        state[key] = t
    dtype = dtype or tensors[hf_name("tok_emb.weight", mtype)].dtype
    model.to_empty(device=device).to(dtype)
    model.load_state_dict(state)
    return model
