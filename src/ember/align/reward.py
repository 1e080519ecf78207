"""`ember reward`: train a reward model on preference pairs and report its held-out pairwise accuracy.

    ember reward                                  # from <run>/sft/final on synthetic stdlib pairs
    ember reward --data=../shared/datasets/hh-rlhf/harmless-base_test.jsonl.gz --steps=500

The reward model is the LM with its vocabulary head swapped for a scalar head (n_embd -> 1); the reward of
a prompt+response is the scalar at the last non-pad token (<|end|> in chat format), trained with the
Bradley-Terry loss (InstructGPT). Writes `<run>/reward/final/scalar_model.safetensors`, which PPO loads
as its reward model and as the initial value model.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ember.align import losses
from ember.align.data import data_inputs, preference_split
from ember.align.rollout import TEMPLATES, SeqBatch, begin_stage, collate_pairs, encode_pairs, fit_context, load_lm
from ember.common.config import require
from ember.common.dist import pick_device
from ember.common.errors import UserError
from ember.common.log import Metrics, print0, step_line

SCALAR_FILE = "scalar_model.safetensors"
SCALAR_FORMAT = "ember.scalar"  # metadata["format"]: an LM trunk with a scalar head


@dataclass
class Config:
    run: str = "runs/default"  # run folder; this stage writes <run>/reward/
    model: str = ""  # LM to start from (a save_model folder); empty = <run>/sft/final
    tokenizer: str = ""  # tokenizer.json; empty = <run>/tokenizer/tokenizer.json
    data: str = "stdlib"  # preference JSONL (ours, hh-rlhf dialogues or OpenAssistant trees), or stdlib = synthetic real-vs-corrupted code
    n_pairs: int = 2000  # stdlib: pairs to synthesize; a file: use at most this many (0 = all)
    val_frac: float = 0.1  # share of prompts held out for the reported accuracy
    template: str = "chat"  # chat: prompt as a user turn (SFT models); raw: plain text (base models)
    max_len: int = 256  # tokens per prompt+response; longer ones are truncated
    max_prompt_len: int = 192  # prompts keep their last this many tokens
    steps: int = 300  # optimizer steps
    batch_size: int = 16  # pairs per step
    lr: float = 5e-5  # peak AdamW learning rate (InstructGPT RM: 9e-6 at 6B; tiny models take more)
    weight_decay: float = 0.0  # AdamW decay on matrices
    warmup: int = 20  # linear LR warmup steps, then cosine to 10%
    grad_clip: float = 1.0  # max global gradient norm
    eval_every: int = 100  # steps between held-out evaluations (0 = only at the start and end)
    seed: int = 0  # data split, batch order and head init
    device: str = "auto"  # cpu, cuda, mps or auto

    def __post_init__(self):
        require(self.template in TEMPLATES, "template", self.template, f"one of {', '.join(TEMPLATES)}")
        require(0.0 < self.val_frac < 1.0, "val_frac", self.val_frac, "a fraction in (0, 1)")
        require(self.n_pairs >= 0, "n_pairs", self.n_pairs, "an int >= 0")
        require(self.max_len >= 8 and 1 <= self.max_prompt_len < self.max_len, "max_prompt_len",
                self.max_prompt_len, "an int in [1, max_len) with max_len >= 8")
        require(self.steps >= 1 and self.batch_size >= 1, "steps/batch_size", (self.steps, self.batch_size), "ints >= 1")
        require(self.lr > 0, "lr", self.lr, "a float > 0")


PRESETS = {
    "quickstart": lambda: Config(n_pairs=400, steps=40, batch_size=8, max_len=128, max_prompt_len=96),
    "smoke": lambda: Config(n_pairs=200, steps=10, batch_size=4, max_len=96, max_prompt_len=64, eval_every=0),
}


# ---------------------------------------------------------------------------- scalar-head models


def attach_scalar_head(model: nn.Module) -> nn.Module:
    """Swap the LM head for Linear(n_embd, 1) in place: forward(idx) then gives (B, T, 1), one scalar per
    position (works for tied embeddings too: GPT uses lm_head whenever it is set). Init as TRL's RM head."""
    d = model.config.n_embd
    w = model.tok_emb.weight
    head = nn.Linear(d, 1, bias=True, device=w.device, dtype=w.dtype)  # the model's dtype (a bf16 import too)
    nn.init.normal_(head.weight, std=1.0 / math.sqrt(d + 1))
    nn.init.zeros_(head.bias)
    model.lm_head = head
    return model


def last_token_scores(model: nn.Module, batch: SeqBatch) -> torch.Tensor:
    """The scalar at each row's last real token: (B,). Right padding, so it sits at index lens - 1."""
    out = model(batch.ids)[..., 0]  # (B, L)
    return out.gather(1, (batch.lens - 1)[:, None]).squeeze(1)


def save_scalar_model(folder: str | Path, model: nn.Module, **info) -> Path:
    """All weights (trunk + scalar head) with the GPTConfig in the header (common/checkpoint.py's format,
    tagged ember.scalar so load_model does not mistake it for an LM)."""
    from ember.common.checkpoint import save_state

    path = Path(folder) / SCALAR_FILE
    save_state(path, model.state_dict(), {"format": SCALAR_FORMAT, "config": asdict(model.config), **info})
    return path


def load_scalar_model(folder: str | Path, device, template: str | None = None,
                      tokenizer_sha256: str | None = None) -> nn.Module:
    """A model saved by save_scalar_model. Given the template and tokenizer hash of the stage that will use
    it, a reward model trained with others is refused (it would score sequences it never learned to read)."""
    from ember.common.checkpoint import check_fit, check_layer_count, load_state
    from ember.common.config import from_dict
    from ember.model.gpt import GPTConfig, build_model

    path = Path(folder)
    path = path / SCALAR_FILE if path.suffix != ".safetensors" else path
    if not path.is_file():
        raise UserError(f"no reward model at {path}: run `ember reward` first or point --reward_model at its final/ folder")
    tensors, meta = load_state(path, device)
    if meta.get("format") != SCALAR_FORMAT or not isinstance(meta.get("config"), dict):
        raise UserError(f"{path} is not a scalar (reward/value) model written by `ember reward`; rerun it")
    for name, want in (("template", template), ("tokenizer_sha256", tokenizer_sha256)):
        if want is not None and meta.get(name) not in (None, want):
            raise UserError(f"{path}: the reward model was trained with {name} {meta[name]!r}, this stage uses "
                            f"{want!r}; train a reward model with the same template and tokenizer")
    config = from_dict(GPTConfig, meta["config"], where=str(path))
    check_layer_count(config, tensors, path)
    model = attach_scalar_head(build_model(config, "meta", init=False))
    check_fit(model, tensors, path)  # shapes checked before allocating
    model.to_empty(device=device)
    model.load_state_dict(tensors, strict=True)
    return model


# ---------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: nn.Module, encoded, pad_id: int, device, batch_size: int = 32) -> dict:
    """Held-out pairwise accuracy (share of pairs scored chosen > rejected), mean margin and loss."""
    was_training = model.training
    model.eval()
    correct, margin, loss, n = 0.0, 0.0, 0.0, 0
    for s in range(0, len(encoded), batch_size):
        chunk = encoded[s:s + batch_size]
        scores = last_token_scores(model, collate_pairs(chunk, pad_id).to(device))
        sc, sr = scores[:len(chunk)], scores[len(chunk):]
        correct += (sc > sr).float().sum().item()
        margin += (sc - sr).sum().item()
        loss += losses.bradley_terry_loss(sc, sr).item() * len(chunk)
        n += len(chunk)
    model.train(was_training)
    return {"accuracy": correct / n, "margin": margin / n, "loss": loss / n}


# ---------------------------------------------------------------------------- the recipe


def main(cfg: Config) -> dict:
    from ember.common.optim import build_adamw, lr_factor

    run, paths = begin_stage("reward", cfg, **data_inputs(cfg.data))
    if run.cached:
        return run.metrics
    device = pick_device(cfg.device)
    lm, tok = load_lm(paths["model"], device, cfg)

    # data: pairs -> token ids within the model's context, split by conversation so held-out ones are unseen
    max_len, max_prompt_len = fit_context(lm, cfg.max_len, cfg.max_prompt_len, "reward")
    train_pairs, val_pairs = preference_split(cfg.data, cfg.n_pairs, cfg.val_frac, cfg.seed)
    train = encode_pairs(tok, train_pairs, cfg.template, max_len, max_prompt_len)
    val = encode_pairs(tok, val_pairs, cfg.template, max_len, max_prompt_len)
    print0(f"[reward] {len(train)} train / {len(val)} held-out pairs from {cfg.data}")

    # model: the LM with a scalar head
    model = attach_scalar_head(lm)
    model.train()
    opt = build_adamw(model, cfg.lr, cfg.weight_decay, (0.9, 0.95), device)
    metrics_log = Metrics(run.dir)
    before = evaluate(model, val, tok.pad_id, device)
    print0(f"[reward] held-out before training: accuracy {before['accuracy']:.3f}")
    metrics_log.log(0, **{f"val_{k}": v for k, v in before.items()})

    rng = random.Random(cfg.seed)
    order: list[int] = []
    for step in range(1, cfg.steps + 1):
        t0 = time.perf_counter()
        if len(order) < cfg.batch_size:
            order += rng.sample(range(len(train)), len(train))  # epochs of shuffled pairs
        idx, order = order[:cfg.batch_size], order[cfg.batch_size:]
        batch = collate_pairs([train[i] for i in idx], tok.pad_id).to(device)
        lr = cfg.lr * lr_factor(step - 1, cfg.steps, cfg.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        scores = last_token_scores(model, batch)
        sc, sr = scores[:len(idx)], scores[len(idx):]
        loss = losses.bradley_terry_loss(sc, sr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        acc = (sc > sr).float().mean().item()
        metrics_log.log(step, loss=loss.item(), accuracy=acc, lr=lr)
        if step % 10 == 0 or step == cfg.steps:
            print0(step_line(step, cfg.steps, loss=loss.item(), acc=acc, lr=lr, dt=time.perf_counter() - t0))
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            ev = evaluate(model, val, tok.pad_id, device)
            metrics_log.log(step, **{f"val_{k}": v for k, v in ev.items()})
            print0(f"[reward] step {step}: held-out accuracy {ev['accuracy']:.3f} margin {ev['margin']:.3f}")

    after = evaluate(model, val, tok.pad_id, device)
    metrics_log.log(cfg.steps, **{f"val_{k}": v for k, v in after.items()})
    metrics_log.close()
    print0(f"[reward] held-out accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f} on {len(val)} pairs")
    save_scalar_model(run.dir / "final", model, template=cfg.template, tokenizer_sha256=tok.sha256)
    return run.finish({
        "val_accuracy": after["accuracy"], "val_accuracy_before": before["accuracy"],
        "val_margin": after["margin"], "val_loss": after["loss"], "val_pairs": len(val), "train_pairs": len(train),
        "final_train_loss": loss.item(),
    })


if __name__ == "__main__":
    from ember.cli import module_main

    module_main(__name__)
