"""`ember grpo`: reinforcement learning with verifiable rewards (GRPO, Shao et al. 2024).

    ember grpo                                                 # <run>/sft/final on generated arithmetic
    ember grpo --data=../shared/datasets/gsm8k/train.jsonl --max_new_tokens=256
    ember grpo --lora_r=8 --advantage=dr_grpo
    ember grpo --data=code_tasks.jsonl --max_new_tokens=256      # {"prompt","entry_point","test"}: rewards run in the sandbox

Each step samples `group_size` replies per prompt from the policy (KV-cache sampling), rewards each 1/0 by
exact match of its final number with the task's answer (or, for code tasks, by the task's tests passing against
the reply in the code sandbox, common/sandbox), and normalizes rewards within the group (no value
model: the group mean is the baseline). The loss is PPO's clipped surrogate plus a k3 KL penalty to the
frozen reference (align/losses.py: grpo_loss). Reports held-out exact-answer accuracy (greedy decoding)
before and after. Writes `<run>/grpo/final/` (LoRA merged; adapter.safetensors beside it).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import torch

from ember.align import losses
from ember.align.data import arithmetic_tasks, data_inputs, load_tasks, prompt_key, task_rewards
from ember.align.rollout import (TEMPLATES, PolicyWithReference, begin_stage, collate, decode_response, encode_prompt,
                                 generate, keep_end, load_lm, prompt_budget, stop_ids, token_logps)
from ember.common.config import require
from ember.common.dist import pick_device
from ember.common.errors import UserError
from ember.common.log import Metrics, print0, step_line

# variant -> (advantage function of align/losses.py, does grpo_loss divide token sums by a constant length)
ADVANTAGES = {"grpo": (losses.grpo_advantages, False), "dr_grpo": (losses.dr_grpo_advantages, True)}


@dataclass
class Config:
    run: str = "runs/default"  # run folder; this stage writes <run>/grpo/
    model: str = ""  # policy to start from (and reference); empty = <run>/sft/final
    tokenizer: str = ""  # tokenizer.json; empty = <run>/tokenizer/tokenizer.json
    data: str = "arithmetic"  # {"prompt","answer"} or GSM8K JSONL, or arithmetic = generated tasks
    n_tasks: int = 5000  # arithmetic: tasks to generate; a file: use at most this many (0 = all)
    n_val: int = 200  # held-out tasks for the reported accuracy (taken from the data, never trained on)
    max_operand: int = 20  # arithmetic: operands in [0, max_operand] (products use factors <= 12)
    word_problems: bool = True  # arithmetic: half the tasks as one-sentence word problems
    operations: str = "+-*"  # arithmetic: which of + - * to draw from
    template: str = "chat"  # chat: prompt as a user turn (SFT models); raw: plain text (base models)
    max_prompt_len: int = 192  # prompts keep their last this many tokens
    max_new_tokens: int = 16  # reply length cap (arithmetic answers are a few tokens; GSM8K needs ~256)
    group_size: int = 8  # replies sampled per prompt (GRPO's G); the group mean is the baseline
    prompts_per_step: int = 8  # prompts per step; a step trains on prompts_per_step * group_size replies
    steps: int = 100  # rollout + update rounds
    updates_per_step: int = 1  # optimizer steps on each batch of rollouts (GRPO's mu); > 1 makes clipping matter
    advantage: str = "grpo"  # grpo: (r-mean)/std, token mean per reply; dr_grpo: r-mean, token sum / max_new_tokens
    clip_eps: float = 0.2  # PPO clip range of the probability ratio
    kl_coef: float = 0.04  # weight of the k3 KL penalty to the reference (GRPO paper: 0.04)
    temperature: float = 1.0  # sampling temperature of rollouts (exploration); evaluation is greedy
    top_k: int = 0  # sample among the top_k tokens only (0 = all)
    lr: float = 2e-5  # peak AdamW learning rate (tiny models / LoRA take more)
    weight_decay: float = 0.0  # AdamW decay on matrices
    warmup: int = 5  # linear LR warmup steps, then constant
    grad_clip: float = 1.0  # max global gradient norm
    lora_r: int = 0  # 0 = full fine-tuning (reference = frozen copy); >0 = LoRA rank (reference = adapters off)
    lora_alpha: float = 16.0  # LoRA scale numerator: the update is (alpha / r) * B A
    lora_targets: list[str] = field(default_factory=lambda: ["attn", "mlp"])  # layer groups/names LoRA wraps
    eval_every: int = 50  # steps between held-out evaluations (0 = only at the start and end)
    seed: int = 0  # tasks, sampling, LoRA init
    device: str = "auto"  # cpu, cuda, mps or auto
    sandbox_timeout: float = 5.0  # code tasks: wall-clock seconds per reply's test run in the sandbox
    sandbox_workers: int = 2  # code tasks: sandboxed test runs at once
    allow_weak_sandbox: bool = False  # code tasks: run replies even where bubblewrap/seccomp are missing (unsafe)

    def __post_init__(self):
        require(self.template in TEMPLATES, "template", self.template, f"one of {', '.join(TEMPLATES)}")
        require(self.advantage in ADVANTAGES, "advantage", self.advantage, f"one of {', '.join(ADVANTAGES)}")
        require(self.group_size >= 2, "group_size", self.group_size, "an int >= 2 (advantages compare replies in a group)")
        for name in ("prompts_per_step", "steps", "updates_per_step", "max_new_tokens", "n_val", "max_prompt_len"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "an int >= 1")
        require(self.n_tasks >= 0 and self.max_operand >= 1, "n_tasks/max_operand", (self.n_tasks, self.max_operand),
                "n_tasks >= 0 and max_operand >= 1")
        require(0 < self.clip_eps < 1, "clip_eps", self.clip_eps, "a float in (0, 1)")
        require(self.kl_coef >= 0 and self.temperature > 0, "kl_coef/temperature", (self.kl_coef, self.temperature),
                "kl_coef >= 0 and temperature > 0")
        require(self.lr > 0, "lr", self.lr, "a float > 0")
        require(self.lora_r >= 0, "lora_r", self.lora_r, "0 (full fine-tuning) or a rank >= 1")
        require(self.sandbox_timeout > 0 and self.sandbox_workers >= 1, "sandbox_timeout/sandbox_workers",
                (self.sandbox_timeout, self.sandbox_workers), "timeout > 0 seconds and workers >= 1")


PRESETS = {
    "quickstart": lambda: Config(steps=15, prompts_per_step=4, group_size=8, n_val=50, max_new_tokens=8),
    "smoke": lambda: Config(steps=3, prompts_per_step=2, group_size=4, n_val=8, n_tasks=100, eval_every=0),
}


def split_tasks(cfg: Config) -> tuple[list[dict], list[dict]]:
    """(train, held-out) tasks; held-out prompts never appear in training."""
    if cfg.data == "arithmetic":
        tasks = arithmetic_tasks(cfg.n_tasks + cfg.n_val, cfg.seed, cfg.max_operand, cfg.word_problems, cfg.operations)
    else:
        tasks = load_tasks(cfg.data)
        if cfg.n_tasks:
            tasks = tasks[:cfg.n_tasks + cfg.n_val]
    random.Random(cfg.seed).shuffle(tasks)
    unique = list({prompt_key(t["prompt"]): t for t in tasks}.values())  # generated tasks repeat
    val = unique[:cfg.n_val]
    seen = {prompt_key(t["prompt"]) for t in val}
    train = [t for t in tasks if prompt_key(t["prompt"]) not in seen]
    if not train:
        raise UserError(f"data={cfg.data}: no training tasks left after holding out n_val={cfg.n_val}")
    return train, val


@torch.no_grad()
def accuracy(model, tok, tasks: list[dict], cfg: Config, device) -> float:
    """Share of tasks whose greedy reply is right (the exact answer, or code that passes the task's tests)."""
    keep = prompt_budget(model, cfg.max_prompt_len, cfg.max_new_tokens)
    prompts = [keep_end(encode_prompt(tok, t["prompt"], cfg.template), keep) for t in tasks]
    replies = generate(model, prompts, cfg.max_new_tokens, stop_ids(tok, cfg.template), temperature=0.0)
    return sum(rewards(tasks, [decode_response(tok, r, cfg.template) for r in replies], cfg)) / len(tasks)


def rewards(tasks: list[dict], completions: list[str], cfg: Config) -> list[float]:
    return task_rewards(tasks, completions, cfg.sandbox_timeout, cfg.sandbox_workers)


def check_sandbox(tasks: list[dict], cfg: Config) -> dict | None:
    """For code tasks: the sandbox's layers (recorded with the run); refuses a weak sandbox unless allowed."""
    if not any("test" in t for t in tasks):
        return None
    from ember.common import sandbox

    status = sandbox.status()
    print0(f"[grpo] code rewards run in the sandbox: {', '.join(status['layers'])}")
    if not status["strong"]:
        why = "; ".join(f"{k}: {v}" for k, v in status["missing"].items())
        if not cfg.allow_weak_sandbox:
            raise UserError(f"data={cfg.data} holds code tasks, whose rewards run model-written code, but the sandbox "
                            f"here lacks its strong layers ({why}). Install them, or pass --allow_weak_sandbox=true "
                            f"to run it anyway")
        print0(f"[grpo] warning: running model-written code in a weak sandbox ({why})")
    return {"layers": status["layers"], "missing": status["missing"]}


def main(cfg: Config) -> dict:
    from ember.common.optim import build_adamw, lr_factor

    run, paths = begin_stage("grpo", cfg, **data_inputs(cfg.data))
    if run.cached:
        return run.metrics
    device = pick_device(cfg.device)
    gen = torch.Generator().manual_seed(cfg.seed)
    lm, tok = load_lm(paths["model"], device, cfg)
    stop = stop_ids(tok, cfg.template)

    train, val = split_tasks(cfg)
    print0(f"[grpo] {len(train)} train / {len(val)} held-out tasks from {cfg.data}")
    sandbox_layers = check_sandbox(train + val, cfg)
    pr = PolicyWithReference(lm, cfg.lora_r, cfg.lora_alpha, cfg.lora_targets)
    policy = pr.model.train()
    keep = prompt_budget(policy, cfg.max_prompt_len, cfg.max_new_tokens)
    opt = build_adamw(policy, cfg.lr, cfg.weight_decay, (0.9, 0.95), device)
    advantage_fn, constant_length = ADVANTAGES[cfg.advantage]
    const_len = cfg.max_new_tokens if constant_length else None  # Dr. GRPO: the longest a reply can be
    metrics_log = Metrics(run.dir)
    acc_before = accuracy(policy, tok, val, cfg, device)
    print0(f"[grpo] held-out exact-answer accuracy before: {acc_before:.3f}")
    metrics_log.log(0, val_accuracy=acc_before)

    rng = random.Random(cfg.seed)
    rewards_seen = []
    for step in range(1, cfg.steps + 1):
        t0 = time.perf_counter()
        # rollouts: G replies per prompt, groups contiguous
        tasks = rng.sample(train, min(cfg.prompts_per_step, len(train)))
        prompts = [keep_end(encode_prompt(tok, t["prompt"], cfg.template), keep) for t in tasks]
        prompts = [p for p in prompts for _ in range(cfg.group_size)]
        replies = generate(policy, prompts, cfg.max_new_tokens, stop, cfg.temperature, cfg.top_k, generator=gen)
        group_tasks = [t for t in tasks for _ in range(cfg.group_size)]
        reward_t = torch.tensor(rewards(group_tasks, [decode_response(tok, r, cfg.template) for r in replies], cfg))
        adv = advantage_fn(reward_t, cfg.group_size).to(device)  # (N,)
        batch = collate(prompts, replies, tok.pad_id).to(device)
        with torch.no_grad():
            old = token_logps(policy.eval(), batch, temperature=cfg.temperature)
            ref = pr.ref_logps(batch, cfg.temperature)
        policy.train()

        lr = cfg.lr * lr_factor(step - 1, cfg.steps, cfg.warmup, schedule="constant")
        for g in opt.param_groups:
            g["lr"] = lr
        for _ in range(cfg.updates_per_step):
            logps = token_logps(policy, batch, temperature=cfg.temperature)
            loss, clip_frac, kl = losses.grpo_loss(logps, old, ref, adv, batch.mask, cfg.clip_eps, cfg.kl_coef, const_len)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
            opt.step()

        reward = reward_t.mean().item()
        rewards_seen.append(reward)
        length = batch.mask.sum(1).mean().item()
        metrics_log.log(step, loss=loss.item(), reward=reward, kl=kl.item(), clip_frac=clip_frac.item(),
                        reply_len=length, lr=lr)
        if step % 5 == 0 or step == cfg.steps:
            print0(step_line(step, cfg.steps, loss=loss.item(), reward=reward, kl=kl.item(),
                             clip=clip_frac.item(), len=length, dt=time.perf_counter() - t0))
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            acc = accuracy(policy, tok, val, cfg, device)
            metrics_log.log(step, val_accuracy=acc)
            print0(f"[grpo] step {step}: held-out accuracy {acc:.3f}")

    acc_after = accuracy(policy, tok, val, cfg, device)
    metrics_log.log(cfg.steps, val_accuracy=acc_after)
    metrics_log.close()
    print0(f"[grpo] held-out exact-answer accuracy {acc_before:.3f} -> {acc_after:.3f} on {len(val)} tasks")
    pr.save(run.dir / "final")
    if sandbox_layers:
        run.meta["sandbox"] = sandbox_layers  # which layers held the model-written code, in the run's lineage
    k = max(1, len(rewards_seen) // 5)
    return run.finish({
        "val_accuracy": acc_after, "val_accuracy_before": acc_before, "val_tasks": len(val),
        "train_reward_first": sum(rewards_seen[:k]) / k, "train_reward_last": sum(rewards_seen[-k:]) / k,
        "final_kl": kl.item(), "lora_r": cfg.lora_r,
    })


if __name__ == "__main__":
    from ember.cli import module_main

    module_main(__name__)
