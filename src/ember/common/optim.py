"""Optimizer, learning-rate schedules and the loss-spike guard every training recipe shares (pretrain, sft, align).

AdamW with decoupled weight decay on matrices only; warmup + cosine (GPT-3, Chinchilla) or
warmup-stable-decay (MiniCPM, Hägele et al. 2024) schedules as pure functions of the step, so a resumed run
needs no scheduler state beyond the step; and `SpikeGuard`, which decides from a running window of recent
losses whether a step is applied, skipped, or triggers a rollback to the last checkpoint (PaLM sec. 5.1).
"""

from __future__ import annotations

import math
from collections import deque

import torch
import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: weight-decayed matrices, and everything else (norm gains, biases, embeddings).

    Decay shrinks weights toward 0, a regularizer for matrices; on a norm gain it fights the scale the
    layer needs, and on embedding rows it punishes rare tokens for being rare (nanoGPT, Llama, OLMo).
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "emb" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_adamw(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused into one kernel on CUDA (fewer launches); the foreach path elsewhere."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=1e-8,
                             fused=device.type == "cuda")


def lr_factor(step: int, total: int, warmup: int, schedule: str = "cosine", decay_frac: float = 0.2,
              min_ratio: float = 0.1) -> float:
    """Multiplier on the peak LR for optimizer step `step` (0-based) of `total`.

    warmup: linear from 1/warmup to 1 over the first `warmup` steps (Adam's second moments are noisy at
    first). cosine: then half a cosine down to min_ratio at the last step. wsd: flat at 1, then linear down
    to min_ratio over the last decay_frac of the steps; the stable phase can be extended or branched for
    mid-training without re-planning the whole run.
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - 1 - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    assert schedule == "wsd", schedule
    decay_start = max(warmup, int(total * (1 - decay_frac)))
    if step < decay_start:
        return 1.0
    progress = (step - decay_start + 1) / max(1, total - decay_start)
    return 1.0 - (1.0 - min_ratio) * min(progress, 1.0)


class SpikeGuard:
    """Decides per step from the (globally averaged) loss: "ok", "nonfinite" or "spike".

    A spike is a loss more than `z` standard deviations above the mean of the last `window` accepted
    losses. The std is floored at 1% of the mean, so a flat loss curve does not turn noise into spikes;
    no verdict is given before `min_history` accepted losses (early loss falls fast and is not stationary).
    `rollback_after` consecutive rejected steps ask the recipe to roll back to its last checkpoint.
    """

    def __init__(self, z: float = 6.0, window: int = 50, rollback_after: int = 3, min_history: int = 20):
        self.z, self.rollback_after, self.min_history = z, rollback_after, min(min_history, window)
        self.history: deque[float] = deque(maxlen=window)
        self.bad_streak = 0  # consecutive rejected steps

    def check(self, loss: float) -> str:
        if not math.isfinite(loss):
            return "nonfinite"
        if self.z > 0 and len(self.history) >= self.min_history:
            mean = sum(self.history) / len(self.history)
            std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / len(self.history))
            if (loss - mean) / max(std, 0.01 * abs(mean), 1e-8) > self.z:
                return "spike"
        return "ok"

    def update(self, loss: float, verdict: str) -> bool:
        """Record a step's outcome; True when the recipe should roll back now."""
        if verdict == "ok":
            self.history.append(loss)
            self.bad_streak = 0
            return False
        self.bad_streak += 1
        return 0 < self.rollback_after <= self.bad_streak

    def state_dict(self) -> dict:
        return {"history": list(self.history), "bad_streak": self.bad_streak}

    def load_state_dict(self, state: dict) -> None:
        self.history.clear()
        self.history.extend(float(x) for x in state["history"])
        self.bad_streak = int(state["bad_streak"])
