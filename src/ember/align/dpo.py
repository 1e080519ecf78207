"""`ember dpo`: direct preference optimization of an SFT model against its frozen reference.

    ember dpo                                        # <run>/sft/final on synthetic stdlib pairs
    ember dpo --lora_r=8 --data=../shared/datasets/oasst/oasst_en_100_tree.jsonl
    ember dpo --objective=ipo --beta=0.5

The reference is the starting model: with LoRA it is the same weights with adapters disabled (no second
copy); with full fine-tuning a frozen copy. Its log-probs are computed once up front (it never changes).
Reports the implicit reward margin beta * [(log pi - log ref)(chosen) - (...)(rejected)] and the share of
held-out pairs where it is positive; both are 0 / undefined at the start, where the loss is exactly log 2.
Writes `<run>/dpo/final/` (LoRA merged; adapter.safetensors beside it).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import torch

from ember.align import losses
from ember.align.data import data_inputs, preference_split
from ember.align.rollout import (TEMPLATES, PolicyWithReference, begin_stage, collate_pairs, encode_pairs, fit_context,
                                 load_lm, token_logps)
from ember.common.config import require
from ember.common.dist import pick_device
from ember.common.log import Metrics, print0, step_line

# objective name -> (loss function of align/losses.py, whether it takes per-token mean log-probs)
OBJECTIVES = {
    "dpo": (losses.dpo_loss, False),
    "ipo": (losses.ipo_loss, True),  # IPO's paper and TRL average log-probs over the response tokens
}


@dataclass
class Config:
    run: str = "runs/default"  # run folder; this stage writes <run>/dpo/
    model: str = ""  # policy to start from (and reference); empty = <run>/sft/final
    tokenizer: str = ""  # tokenizer.json; empty = <run>/tokenizer/tokenizer.json
    data: str = "stdlib"  # preference JSONL (ours, hh-rlhf dialogues or OpenAssistant trees), or stdlib = synthetic real-vs-corrupted code
    n_pairs: int = 2000  # stdlib: pairs to synthesize; a file: use at most this many (0 = all)
    val_frac: float = 0.1  # share of prompts held out for the reported margin/accuracy
    template: str = "chat"  # chat: prompt as a user turn (SFT models); raw: plain text (base models)
    max_len: int = 256  # tokens per prompt+response; longer ones are truncated
    max_prompt_len: int = 192  # prompts keep their last this many tokens
    objective: str = "dpo"  # dpo (Rafailov et al. 2023) or ipo (Azar et al. 2023): a function of align/losses.py
    beta: float = 0.1  # strength of the KL anchor to the reference (DPO's beta, IPO's tau)
    steps: int = 200  # optimizer steps
    batch_size: int = 16  # pairs per step
    lr: float = 5e-5  # peak AdamW learning rate (DPO paper: 5e-7 at 7B full FT; tiny models / LoRA take more)
    weight_decay: float = 0.0  # AdamW decay on matrices
    warmup: int = 10  # linear LR warmup steps, then cosine to 10%
    grad_clip: float = 1.0  # max global gradient norm
    lora_r: int = 0  # 0 = full fine-tuning (reference = frozen copy); >0 = LoRA rank (reference = adapters off)
    lora_alpha: float = 16.0  # LoRA scale numerator: the update is (alpha / r) * B A
    lora_targets: list[str] = field(default_factory=lambda: ["attn", "mlp"])  # layer groups/names LoRA wraps
    eval_every: int = 100  # steps between held-out evaluations (0 = only at the start and end)
    seed: int = 0  # data split, batch order, LoRA init
    device: str = "auto"  # cpu, cuda, mps or auto

    def __post_init__(self):
        require(self.template in TEMPLATES, "template", self.template, f"one of {', '.join(TEMPLATES)}")
        require(self.objective in OBJECTIVES, "objective", self.objective, f"one of {', '.join(OBJECTIVES)}")
        require(self.beta > 0, "beta", self.beta, "a float > 0")
        require(0.0 < self.val_frac < 1.0, "val_frac", self.val_frac, "a fraction in (0, 1)")
        require(self.n_pairs >= 0, "n_pairs", self.n_pairs, "an int >= 0")
        require(self.max_len >= 8 and 1 <= self.max_prompt_len < self.max_len, "max_prompt_len",
                self.max_prompt_len, "an int in [1, max_len) with max_len >= 8")
        require(self.steps >= 1 and self.batch_size >= 1, "steps/batch_size", (self.steps, self.batch_size), "ints >= 1")
        require(self.lr > 0, "lr", self.lr, "a float > 0")
        require(self.lora_r >= 0, "lora_r", self.lora_r, "0 (full fine-tuning) or a rank >= 1")


PRESETS = {
    "quickstart": lambda: Config(n_pairs=400, steps=40, batch_size=8, max_len=128, max_prompt_len=96),
    "smoke": lambda: Config(n_pairs=200, steps=10, batch_size=4, max_len=96, max_prompt_len=64, eval_every=0),
}


def pair_logps(model, encoded, pad_id: int, device, average: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) log-probs (B,) of the model for B encoded pairs, in one forward of 2B rows.
    average=True gives per-token means instead of sums."""
    batch = collate_pairs(encoded, pad_id).to(device)
    seq = losses.sequence_logps(token_logps(model, batch), batch.mask)
    if average:
        seq = seq / batch.mask.sum(-1).clamp(min=1)
    return seq[:len(encoded)], seq[len(encoded):]


@torch.no_grad()
def all_pair_logps(model, encoded, pad_id, device, average, batch_size: int = 32) -> torch.Tensor:
    """(N, 2) chosen/rejected log-probs of every pair, in eval mode."""
    was_training = model.training
    model.eval()
    out = [torch.stack(pair_logps(model, encoded[s:s + batch_size], pad_id, device, average), dim=1)
           for s in range(0, len(encoded), batch_size)]
    model.train(was_training)
    return torch.cat(out).cpu()


def evaluate(policy_logps: torch.Tensor, ref_logps: torch.Tensor, cfg: Config) -> dict:
    """Held-out DPO metrics from (N, 2) policy and reference log-probs."""
    fn, _ = OBJECTIVES[cfg.objective]
    loss, rc, rr = fn(policy_logps[:, 0], policy_logps[:, 1], ref_logps[:, 0], ref_logps[:, 1], cfg.beta)
    return {"loss": loss.item(), "margin": (rc - rr).mean().item(), "accuracy": (rc > rr).float().mean().item(),
            "chosen_reward": rc.mean().item(), "rejected_reward": rr.mean().item(),
            "logp_gap": (policy_logps[:, 0] - policy_logps[:, 1]).mean().item()}


def main(cfg: Config) -> dict:
    from ember.common.optim import build_adamw, lr_factor

    run, paths = begin_stage("dpo", cfg, **data_inputs(cfg.data))
    if run.cached:
        return run.metrics
    device = pick_device(cfg.device)
    lm, tok = load_lm(paths["model"], device, cfg)
    loss_fn, average = OBJECTIVES[cfg.objective]

    # data, cut to the model's context
    max_len, max_prompt_len = fit_context(lm, cfg.max_len, cfg.max_prompt_len, "dpo")
    train_pairs, val_pairs = preference_split(cfg.data, cfg.n_pairs, cfg.val_frac, cfg.seed)
    train = encode_pairs(tok, train_pairs, cfg.template, max_len, max_prompt_len)
    val = encode_pairs(tok, val_pairs, cfg.template, max_len, max_prompt_len)
    print0(f"[dpo] {len(train)} train / {len(val)} held-out pairs from {cfg.data}")

    # model: policy + reference; the reference's log-probs are fixed, so compute them once
    pr = PolicyWithReference(lm, cfg.lora_r, cfg.lora_alpha, cfg.lora_targets)
    policy = pr.model.train()
    with pr.as_reference() as ref:
        ref_train = all_pair_logps(ref, train, tok.pad_id, device, average)
        ref_val = all_pair_logps(ref, val, tok.pad_id, device, average)
    print0(f"[dpo] {cfg.objective}, beta {cfg.beta}, {pr.trainable() / 1e6:.2f}M trainable parameters"
           f"{f' (LoRA r={cfg.lora_r})' if pr.lora else ''}")
    opt = build_adamw(policy, cfg.lr, cfg.weight_decay, (0.9, 0.95), device)
    metrics_log = Metrics(run.dir)
    before = evaluate(all_pair_logps(policy, val, tok.pad_id, device, average), ref_val, cfg)
    metrics_log.log(0, **{f"val_{k}": v for k, v in before.items()})

    rng = random.Random(cfg.seed)
    order: list[int] = []
    first_loss = None
    for step in range(1, cfg.steps + 1):
        t0 = time.perf_counter()
        if len(order) < cfg.batch_size:
            order += rng.sample(range(len(train)), len(train))
        idx, order = order[:cfg.batch_size], order[cfg.batch_size:]
        lr = cfg.lr * lr_factor(step - 1, cfg.steps, cfg.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        pc, prj = pair_logps(policy, [train[i] for i in idx], tok.pad_id, device, average)
        ref = ref_train[idx].to(device)
        loss, rc, rr = loss_fn(pc, prj, ref[:, 0], ref[:, 1], cfg.beta)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
        opt.step()
        first_loss = loss.item() if first_loss is None else first_loss
        margin, acc = (rc - rr).mean().item(), (rc > rr).float().mean().item()
        metrics_log.log(step, loss=loss.item(), margin=margin, accuracy=acc, lr=lr)
        if step % 10 == 0 or step == cfg.steps:
            print0(step_line(step, cfg.steps, loss=loss.item(), margin=margin, acc=acc, lr=lr,
                             dt=time.perf_counter() - t0))
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            ev = evaluate(all_pair_logps(policy, val, tok.pad_id, device, average), ref_val, cfg)
            metrics_log.log(step, **{f"val_{k}": v for k, v in ev.items()})
            print0(f"[dpo] step {step}: held-out margin {ev['margin']:.4f} accuracy {ev['accuracy']:.3f}")

    after = evaluate(all_pair_logps(policy, val, tok.pad_id, device, average), ref_val, cfg)
    metrics_log.log(cfg.steps, **{f"val_{k}": v for k, v in after.items()})
    metrics_log.close()
    print0(f"[dpo] held-out reward margin {before['margin']:.4f} -> {after['margin']:.4f}, "
           f"accuracy {after['accuracy']:.3f}, log-prob gap {before['logp_gap']:.3f} -> {after['logp_gap']:.3f}")
    pr.save(run.dir / "final")
    return run.finish({
        "loss_at_init": first_loss, "val_margin": after["margin"], "val_margin_before": before["margin"],
        "val_accuracy": after["accuracy"], "val_loss": after["loss"], "val_loss_before": before["loss"],
        "val_logp_gap": after["logp_gap"], "val_logp_gap_before": before["logp_gap"],
        "val_pairs": len(val), "train_pairs": len(train), "lora_r": cfg.lora_r,
    })


if __name__ == "__main__":
    from ember.cli import module_main

    module_main(__name__)
