"""Recovery fine-tune after pruning: a short next-token training run that keeps the pruned weights at zero.

    model, info = recover(model, batches, steps=100, lr=1e-4, lora=False)   # info: loss_before, loss_after

batches: a LongTensor (N, T + 1) of token windows (cut into rows of 8; x = w[:, :-1], y = w[:, 1:]) or a list
of (x, y) pairs of (B, T) int64 tensors, cycled when shorter than `steps`. Full: every weight trains and after
each optimizer step the zeros of each pruned matrix are written back (the mask is "was zero before recovery").
LoRA: adapters on the attention and MLP matrices; a pruned matrix's low-rank update is masked in the forward
(W + (B A) * M), so what trains is what merging gives, and the merged matrix keeps its zeros.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F

from ember.common.errors import UserError
from ember.model.lora import LoRALinear, apply_lora, merge_lora

ROWS = 8  # rows per batch when `batches` is a tensor of windows
EVAL_BATCHES = 4  # loss_before/after: mean over the first batches (the same ones before and after)


class _MaskedLoRA(nn.Module):
    """A LoRALinear whose update is masked to the base matrix's nonzeros: y = x (W + scale * (B A) * M)^T + b."""

    def __init__(self, lora: LoRALinear, mask: torch.Tensor):
        super().__init__()
        self.lora = lora
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x):
        base = self.lora.base
        w = base.weight + (self.lora.delta_weight() * self.mask).to(base.weight.dtype)  # (out, in)
        return F.linear(x, w, base.bias)


def _batches(batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if torch.is_tensor(batches):
        if batches.dim() != 2 or batches.size(1) < 2 or batches.dtype not in (torch.int64, torch.int32):
            raise UserError(f"recovery data is a {tuple(batches.shape)} {batches.dtype} tensor: pass token windows "
                            f"(N, T + 1) int64 with T >= 1, or a list of (x, y) batches")
        return [(w[:, :-1].long(), w[:, 1:].long()) for w in batches.split(ROWS)]
    out = list(batches)
    if not out or not all(isinstance(b, (tuple, list)) and len(b) == 2 for b in out):
        raise UserError("recovery data must be a non-empty list of (x, y) token batches or a (N, T + 1) tensor")
    return out


def _masks(model) -> dict[str, torch.Tensor]:
    """{module name: bool mask of the nonzeros} for every block matrix holding zeros (a pruned one)."""
    out = {}
    for name, m in model.layers.named_modules():
        if isinstance(m, nn.Linear) and (m.weight == 0).any():
            out[f"layers.{name}"] = m.weight != 0
    return out


@torch.no_grad()
def _loss(model, batches, device) -> float:
    was = model.training
    model.eval()
    losses = [model(x.to(device), y.to(device)).item() for x, y in batches[:EVAL_BATCHES]]
    model.train(was)
    return sum(losses) / len(losses)


def recover(model, batches, steps: int, lr: float, lora: bool, *, r: int = 16, alpha: float = 32.0,
            grad_clip: float = 1.0) -> tuple[nn.Module, dict]:
    """Fine-tune `model` for `steps` AdamW steps at a constant `lr` (short runs: no schedule) on next-token loss,
    full or LoRA (rank r, merged at the end), keeping every zero of the pruned block matrices. In place (LoRA
    swaps modules and merges back to plain Linears); returns (model, {"loss_before", "loss_after", ...}) with the
    losses the mean over the first EVAL_BATCHES batches (training data: this measures recovery, not generalization).
    """
    if steps < 0 or not lr > 0:
        raise UserError(f"recovery steps = {steps}, lr = {lr}: steps must be >= 0 and lr > 0")
    data = _batches(batches)
    device = model.tok_emb.weight.device
    masks = _masks(model)
    loss_before = _loss(model, data, device)
    if lora:
        apply_lora(model, ("attn", "mlp"), r, alpha)
        modules = dict(model.named_modules())
        for name, mask in masks.items():  # masked forward for pruned matrices (names as before the swap)
            parent, leaf = name.rsplit(".", 1)
            setattr(modules[parent], leaf, _MaskedLoRA(modules[name], mask))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)  # no decay: it would move zeros
    model.train()
    for x, y in itertools.islice(itertools.cycle(data), steps):
        loss = model(x.to(device), y.to(device))
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if not lora:
            with torch.no_grad():
                modules = dict(model.named_modules())
                for name, mask in masks.items():
                    modules[name].weight.mul_(mask)  # Adam moves every weight: put the pruned ones back to 0
    if lora:
        modules = dict(model.named_modules())
        for name in masks:
            parent, leaf = name.rsplit(".", 1)
            setattr(modules[parent], leaf, modules[name].lora)  # back to the LoRALinear, then merge all
        merge_lora(model)
        with torch.no_grad():  # base is 0 where the mask is: W + delta * M == (W + delta) * M
            modules = dict(model.named_modules())
            for name, mask in masks.items():
                modules[name].weight.mul_(mask)
    loss_after = _loss(model, data, device)
    return model, {"loss_before": loss_before, "loss_after": loss_after, "steps": steps, "lora": lora,
                   "masked_matrices": len(masks)}
