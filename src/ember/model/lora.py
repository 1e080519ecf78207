"""LoRA by module swap (Hu et al. 2021, arXiv:2106.09685): y = base(x) + (alpha / r) * B(A(dropout(x))).

    apply_lora(model, targets=["attn", "mlp"], r=8, alpha=16, dropout=0.0)   # freezes all but A, B
    with lora_disabled(model): ref_logits = model(idx)                       # the base model (DPO reference)
    save_adapter(dir, model); load_adapter(dir, model); merge_lora(model)    # back to plain nn.Linear
    save_peft_adapter(dir, model); load_peft_adapter(dir, model)             # the `peft` library's folder format
The base may be an nn.Linear or a frozen NF4Linear (QLoRA); the adapter is always full precision.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from ember.common.errors import UserError
from ember.common.log import print0

# Target groups by the leaf names in model/gpt.py; a target may also be one leaf name ("q_proj", "lm_head").
GROUPS = {
    "attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),  # also each MoE expert's
}
GROUPS["all"] = GROUPS["attn"] + GROUPS["mlp"]
ADAPTER_FILE = "adapter.safetensors"
ADAPTER_FORMAT = "ember.lora"  # metadata["format"] of an adapter file


class LoRALinear(nn.Module):
    """A frozen base linear plus a trainable low-rank update. B starts at zero, so at init the output is
    exactly the base's; A starts Kaiming-uniform as in the reference implementations (PEFT, torchtune)."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        dev = next(iter([*base.parameters(), *base.buffers()])).device  # NF4 bases hold buffers only
        self.lora_a = nn.Parameter(torch.empty(r, self.in_features, device=dev))  # (r, in)
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, r, device=dev))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True
        for p in self.base.parameters():
            p.requires_grad_(False)

    def forward(self, x):
        y = self.base(x)
        if not self.enabled:
            return y
        a, b = self.lora_a.to(x.dtype), self.lora_b.to(x.dtype)
        return y + F.linear(F.linear(self.dropout(x), a), b) * self.scale  # (..., in) -> (..., r) -> (..., out)

    def delta_weight(self) -> torch.Tensor:
        """scale * B @ A in fp32: (out, in), what merging adds to the base weight."""
        return (self.lora_b.float() @ self.lora_a.float()) * self.scale

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}"


def resolve_targets(targets: list[str] | tuple[str, ...]) -> set[str]:
    """Group names and leaf names -> the set of leaf module names to wrap."""
    leaves = set()
    known = set(GROUPS["all"]) | {"lm_head"}
    for t in targets:
        if t in GROUPS:
            leaves |= set(GROUPS[t])
        elif t in known:
            leaves.add(t)
        else:
            raise UserError(f"LoRA target '{t}' is unknown: use groups {', '.join(GROUPS)} or layer names "
                            f"{', '.join(sorted(known))}")
    return leaves


def apply_lora(model: nn.Module, targets=("attn", "mlp"), r: int = 8, alpha: float = 16.0,
               dropout: float = 0.0) -> nn.Module:
    """Wrap the target linear layers in LoRALinear (in place) and freeze everything but the adapters.

    Returns model. Adapter init draws from torch's RNG, so seed first for reproducible runs.
    """
    if r < 1:
        raise UserError(f"LoRA rank r = {r} must be >= 1")
    leaves = resolve_targets(targets)
    for p in model.parameters():
        p.requires_grad_(False)
    n, matched = 0, set()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in leaves and not isinstance(child, LoRALinear) and hasattr(child, "in_features"):
                setattr(module, name, LoRALinear(child, r, alpha, dropout))
                n, matched = n + 1, matched | {name}
    if n == 0:
        raise UserError(f"LoRA targets {list(targets)} matched no linear layer of {type(model).__name__}")
    if missed := sorted(set(leaves) - matched):  # e.g. lm_head of a tied model (the head is the embedding)
        print0(f"[lora] no layer named {', '.join(missed)} to adapt"
               + (" (this model ties its head to the embedding)" if getattr(model.config, "tie_embeddings", False)
                  and "lm_head" in missed else ""))
    return model


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear))


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter weights: {'layers.0.attn.q_proj.lora_a': (r, in), '...lora_b': (out, r), ...}."""
    return {k: v for k, v in model.state_dict().items() if k.endswith((".lora_a", ".lora_b"))}


@contextlib.contextmanager
def lora_disabled(model: nn.Module):
    """Run the model as its frozen base inside the block (e.g. the DPO reference policy); re-enables after."""
    mods = [m for _, m in lora_modules(model)]
    before = [m.enabled for m in mods]
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m, e in zip(mods, before):
            m.enabled = e


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Replace each LoRALinear by a plain nn.Linear with W + (alpha/r) B A (in place); returns model.

    An NF4 base is de-quantized first, so the merged model computes what was trained (base as seen in
    training + adapter). The merged model has all parameters trainable again, like a freshly loaded one.
    """
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                base = child.base
                w = base.weight.float()  # NF4Linear.weight de-quantizes
                dtype = base.weight_dtype if hasattr(base, "weight_dtype") else base.weight.dtype
                lin = nn.Linear(child.in_features, child.out_features, bias=base.bias is not None,
                                device=w.device, dtype=dtype)
                lin.weight.copy_((w + child.delta_weight()).to(dtype))
                if base.bias is not None:
                    lin.bias.copy_(base.bias)
                setattr(module, name, lin)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# ---------------------------------------------------------------------------- adapter files

def save_adapter(folder: str | Path, model: nn.Module, **info) -> Path:
    """Write `<folder>/adapter.safetensors` (adapter weights only) with r, alpha and targets in the metadata."""
    from ember.common.checkpoint import save_state

    mods = list(lora_modules(model))
    assert mods, "save_adapter: the model has no LoRA layers"
    _, first = mods[0]
    meta = {"r": first.r, "alpha": first.alpha, "targets": sorted({n.rsplit(".", 1)[-1] for n, _ in mods}), **info}
    path = Path(folder) / ADAPTER_FILE
    save_state(path, lora_state_dict(model), {"format": ADAPTER_FORMAT, "lora": meta})
    return path


def read_adapter(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of an adapter file or of the folder that holds it."""
    from ember.common.checkpoint import load_state

    path = Path(path)
    if path.is_dir():
        path = path / ADAPTER_FILE
    if not path.is_file():
        raise UserError(f"no LoRA adapter at {path}: point to a folder written by `ember sft --method=lora`")
    tensors, meta = load_state(path)
    if meta.get("format") != ADAPTER_FORMAT or not isinstance(meta.get("lora"), dict):
        raise UserError(f"{path} is not a LoRA adapter written by ember (format {meta.get('format')!r})")
    return tensors, meta["lora"]


def load_adapter(path: str | Path, model: nn.Module, dropout: float = 0.0) -> nn.Module:
    """Apply LoRA to model as the file says (if not applied yet) and load the adapter weights; returns model."""
    tensors, meta = read_adapter(path)
    if not any(True for _ in lora_modules(model)):
        apply_lora(model, meta.get("targets", ["attn", "mlp"]), int(meta["r"]), float(meta["alpha"]), dropout)
    have = lora_state_dict(model)
    if set(have) != set(tensors):
        missing, extra = sorted(set(have) - set(tensors)), sorted(set(tensors) - set(have))
        raise UserError(f"{path}: adapter does not fit this model (missing {missing[:3]}, unexpected "
                        f"{extra[:3]}); load it into the model it was trained on")
    for k, v in tensors.items():
        if v.shape != have[k].shape:
            raise UserError(f"{path}: adapter tensor {k} has shape {tuple(v.shape)}, the model needs "
                            f"{tuple(have[k].shape)}; load it into the model it was trained on")
    model.load_state_dict(tensors, strict=False)
    return model


# ---------------------------------------------------------------------------- PEFT folders (Hugging Face `peft`)
# A PEFT LoRA folder is adapter_config.json + adapter_model.safetensors with keys
# `base_model.model.<HF module>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r): the same tensors as
# ember's lora_a / lora_b, and the same scale lora_alpha / r, so only the names change (through hf.hf_name).
PEFT_CONFIG, PEFT_WEIGHTS, PEFT_PREFIX = "adapter_config.json", "adapter_model.safetensors", "base_model.model."
# adapter_config.json fields whose non-default values change what the adapter computes, and ember does not
# implement: field -> the values that mean "off". Init-only fields (init_lora_weights, loftq/eva/corda) don't matter
# once the weights exist; fields we don't know are ignored, as peft ignores them.
PEFT_UNSUPPORTED = {
    "use_rslora": (False, None), "use_dora": (False, None), "fan_in_fan_out": (False, None),
    "bias": ("none", None), "lora_bias": (False, None), "rank_pattern": ({}, None), "alpha_pattern": ({}, None),
    "layers_to_transform": (None, []), "layer_replication": (None, []), "modules_to_save": (None, []),
    "target_parameters": (None, []), "trainable_token_indices": (None, {}, []), "use_qalora": (False, None),
    "alora_invocation_tokens": (None, []), "use_bdlora": (None, False), "arrow_config": (None,),
}


def _peft_module_names(model: nn.Module) -> dict[str, str]:
    """ember module name -> HF module name, for every layer LoRA could adapt (the LoRALinear itself, if wrapped)."""
    from ember.model.hf import hf_name, model_type

    mtype = model_type(model.config)
    known = set(GROUPS["all"]) | {"lm_head"}
    return {n: hf_name(f"{n}.weight", mtype).removesuffix(".weight") for n, m in model.named_modules()
            if n.rsplit(".", 1)[-1] in known and hasattr(m, "in_features")}


def save_peft_adapter(folder: str | Path, model: nn.Module, base_model_name_or_path: str = "") -> Path:
    """Write the model's LoRA adapters as `peft` writes them (adapter_config.json + adapter_model.safetensors),
    for `PeftModel.from_pretrained(<export_hf of the base>, folder)`. Returns folder."""
    from safetensors.torch import save_file

    from ember.common import artifacts

    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper
    mods = list(lora_modules(model))
    assert mods, "save_peft_adapter: the model has no LoRA layers"
    if experts := [n for n, _ in mods if ".experts." in n]:
        # transformers 5 fuses each layer's experts into 3-D parameters (mlp.experts.gate_up_proj), which peft
        # adapts only through target_parameters, not as per-expert linear layers like ember's
        raise UserError(f"save_peft_adapter: LoRA on MoE experts ({experts[0]}, ...) has no per-expert linear "
                        f"layer in transformers' MoE models to attach to. Train with lora targets that leave out "
                        f"the experts (e.g. --lora.targets=attn) to export a PEFT adapter, or use save_adapter.")
    (_, first), names = mods[0], _peft_module_names(model)
    if odd := [(n, m) for n, m in mods if (m.r, m.alpha) != (first.r, first.alpha)]:
        raise UserError(f"save_peft_adapter: {odd[0][0]} has r/alpha {odd[0][1].r}/{odd[0][1].alpha}, {mods[0][0]} "
                        f"has {first.r}/{first.alpha}; ember writes one r and alpha per PEFT folder (no rank_pattern)")
    tensors = {}
    for n, m in mods:
        key = PEFT_PREFIX + names[n]
        tensors[f"{key}.lora_A.weight"] = m.lora_a.detach().to("cpu").contiguous()  # (r, in)
        tensors[f"{key}.lora_B.weight"] = m.lora_b.detach().to("cpu").contiguous()  # (out, r)
    dropout = next((m.dropout.p for _, m in mods if isinstance(m.dropout, nn.Dropout)), 0.0)
    # the fields peft has written since 0.10, in its order (sorted keys); later versions accept them all
    config = {
        "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": base_model_name_or_path or None,
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "layer_replication": None, "layers_pattern": None, "layers_to_transform": None, "loftq_config": {},
        "lora_alpha": first.alpha, "lora_dropout": dropout, "megatron_config": None, "megatron_core": "megatron.core",
        "modules_to_save": None, "peft_type": "LORA", "r": first.r, "rank_pattern": {}, "revision": None,
        "target_modules": sorted({names[n].rsplit(".", 1)[-1] for n, _ in mods}), "task_type": "CAUSAL_LM",
        "use_dora": False, "use_rslora": False,
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with artifacts.atomic_path(folder / PEFT_WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})  # peft's metadata, a plain string
    artifacts.write_json(folder / PEFT_CONFIG, config)
    return folder


def read_peft_adapter(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, adapter_config) of a PEFT LoRA folder; anything ember cannot compute exactly is a UserError."""
    from ember.common.checkpoint import load_state

    folder = Path(folder)
    cfg_path, weights = folder / PEFT_CONFIG, folder / PEFT_WEIGHTS
    if not cfg_path.is_file():
        raise UserError(f"{folder}: no {PEFT_CONFIG}. Pass a folder written by save_peft_adapter or by "
                        f"peft's save_pretrained.")
    if not weights.is_file():
        old = " (adapter_model.bin is not read: pickles are unsafe; re-save with safe_serialization=True)" \
            if (folder / "adapter_model.bin").is_file() else ""
        raise UserError(f"{folder}: no {PEFT_WEIGHTS}{old}.")
    try:
        config = json.loads(cfg_path.read_text())
        assert isinstance(config, dict)
    except (json.JSONDecodeError, UnicodeDecodeError, AssertionError) as e:
        raise UserError(f"{cfg_path}: not a JSON object ({e!r}). Re-save the adapter with save_pretrained.") from None
    if config.get("peft_type") != "LORA":
        raise UserError(f"{cfg_path}: peft_type {config.get('peft_type')!r}; ember loads only LoRA adapters "
                        f"(peft_type \"LORA\").")
    for field, off in PEFT_UNSUPPORTED.items():
        if field in config and config[field] not in off:
            raise UserError(f"{cfg_path}: {field} = {config[field]!r} is not implemented by ember's LoRA, so the "
                            f"adapter would not compute what it was trained to. Use an adapter trained with "
                            f"{field} = {off[0]!r}, or load it with peft.")
    for field in ("r", "lora_alpha"):
        if not isinstance(config.get(field), (int, float)) or config[field] <= 0:
            raise UserError(f"{cfg_path}: {field} = {config.get(field)!r}; it needs a number > 0.")
    tensors, _ = load_state(weights)
    return tensors, config


def load_peft_adapter(folder: str | Path, model: nn.Module) -> nn.Module:
    """Apply LoRA to an ember GPT as a PEFT folder says (if not applied yet) and load its A/B weights; returns
    model. The base must be the model the adapter was trained on (e.g. import_hf of its base folder)."""
    folder = Path(folder)
    tensors, config = read_peft_adapter(folder)
    model = getattr(model, "_orig_mod", model)
    to_ember = {h: n for n, h in _peft_module_names(model).items()}  # HF module name -> ember module name
    state = {}
    for key, t in tensors.items():
        module, dot, part = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        if not dot or part not in ("A.weight", "B.weight") or module not in to_ember:
            raise UserError(f"{folder / PEFT_WEIGHTS}: tensor {key!r} is not a LoRA A/B weight of a linear layer "
                            f"ember has (embedding LoRA, DoRA magnitudes, biases and extra modules are not "
                            f"supported); load the adapter with peft instead.")
        state[f"{to_ember[module]}.lora_{part[0].lower()}"] = t
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    if not any(True for _ in lora_modules(model)):
        leaves = sorted({k.rsplit(".", 2)[-2] for k in state})
        apply_lora(model, leaves, r, alpha, float(config.get("lora_dropout") or 0.0))
    if odd := [n for n, m in lora_modules(model) if m.alpha / m.r != alpha / r]:
        raise UserError(f"{folder}: the model's LoRA layer {odd[0]} already has scale alpha/r = "
                        f"{dict(lora_modules(model))[odd[0]].scale:g}, the adapter's is {alpha:g}/{r}; load it into "
                        f"a model without LoRA applied.")
    have = lora_state_dict(model)
    if set(have) != set(state):
        missing, extra = sorted(set(have) - set(state)), sorted(set(state) - set(have))
        raise UserError(f"{folder}: adapter does not fit this model (missing {missing[:3]}, unexpected {extra[:3]}; "
                        f"an adapter on only some layers, or a model with LoRA already applied differently?). "
                        f"Load it into a fresh copy of the model it was trained on.")
    for k, v in state.items():
        if v.shape != have[k].shape:
            raise UserError(f"{folder}: adapter tensor {k} has shape {tuple(v.shape)}, the model needs "
                            f"{tuple(have[k].shape)} (r = {r} in {PEFT_CONFIG}); load it into the model it was "
                            f"trained on.")
    model.load_state_dict(state, strict=False)
    return model
