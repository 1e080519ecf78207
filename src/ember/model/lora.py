"""LoRA by module swap (Hu et al. 2021, arXiv:2106.09685): y = base(x) + (alpha / r) * B(A(dropout(x))).

    apply_lora(model, targets=["attn", "mlp"], r=8, alpha=16, dropout=0.0)   # freezes all but A, B
    with lora_disabled(model): ref_logits = model(idx)                       # the base model (DPO reference)
    save_adapter(dir, model); load_adapter(dir, model); merge_lora(model)    # back to plain nn.Linear
The base may be an nn.Linear or a frozen NF4Linear (QLoRA); the adapter is always full precision.
"""

from __future__ import annotations

import contextlib
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
