"""`ember ppo`: RLHF with PPO against a learned reward model (Ziegler et al. 2019; Ouyang et al. 2022).

    ember ppo                                    # policy <run>/sft/final, reward model <run>/reward/final
    ember ppo --kl_target=3 --rollouts_per_step=64 --lora_r=8

Each step: sample replies from the policy (KV-cache sampling); score them with the reward model (scalar at
the last token, normalized to mean 0 / std 1 on the initial policy's samples); per-token reward =
-kl_coef * (log pi - log ref) plus the score on the last token; GAE advantages from a value model
(initialized from the reward model, as InstructGPT); then `ppo_epochs` passes of clipped policy and value
updates over minibatches. kl_coef adapts toward `kl_target` nats per
reply (Ziegler et al.'s proportional controller). Logs reward, KL, entropy and clip fraction; reports mean
reward and KL of held-out prompts before and after. Writes `<run>/ppo/final/` (the policy; LoRA merged).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ember.align import losses
from ember.align.data import arithmetic_tasks, conversation_key, data_inputs, prompt_key, read_prompts, stdlib_pairs
from ember.align.reward import last_token_scores, load_scalar_model
from ember.align.rollout import (TEMPLATES, PolicyWithReference, SeqBatch, begin_stage, collate, encode_prompt, generate,
                                 keep_end, load_lm, prompt_budget, stop_ids, token_logps)
from ember.common.config import require
from ember.common.dist import pick_device
from ember.common.errors import UserError
from ember.common.log import Metrics, print0, step_line


@dataclass
class Config:
    run: str = "runs/default"  # run folder; this stage writes <run>/ppo/
    model: str = ""  # policy to start from (and reference); empty = <run>/sft/final
    reward_model: str = ""  # scalar model from `ember reward`; empty = <run>/reward/final
    tokenizer: str = ""  # tokenizer.json; empty = <run>/tokenizer/tokenizer.json
    data: str = "stdlib"  # prompts: any JSONL with a "prompt" key, stdlib (code prompts) or arithmetic
    n_prompts: int = 2000  # prompts to use (generated ones: to make)
    n_val: int = 64  # held-out prompts for the before/after reward and KL
    template: str = "chat"  # chat: prompt as a user turn (SFT models); raw: plain text (base models)
    max_prompt_len: int = 128  # prompts keep their last this many tokens
    max_new_tokens: int = 32  # reply length cap
    steps: int = 40  # rollout + update rounds
    rollouts_per_step: int = 32  # replies sampled per step
    minibatch_size: int = 8  # replies per optimizer step
    ppo_epochs: int = 2  # passes over each step's rollouts
    lr: float = 1e-5  # policy AdamW learning rate (tiny models / LoRA take more)
    value_lr: float = 3e-5  # value model AdamW learning rate
    clip_eps: float = 0.2  # clip range of the policy probability ratio
    value_clip: float = 0.2  # clip range of the value update (in reward units)
    gamma: float = 1.0  # discount per token (1: the score at the end counts fully for every token)
    lam: float = 0.95  # GAE lambda: bias/variance trade-off of the advantage
    kl_coef: float = 0.1  # initial weight of the per-token KL penalty to the reference
    kl_target: float = 6.0  # KL (nats per reply) the adaptive controller steers toward; 0 = fixed kl_coef
    kl_horizon: int = 1000  # controller horizon in replies: kl_coef moves by up to 20% per horizon (Ziegler: 10k)
    normalize_reward: bool = True  # scores -> mean 0, std 1 over the initial policy's samples (Ziegler et al.), so kl_coef means the same for any reward model
    missing_stop_penalty: float = 1.0  # subtracted from the (normalized) score of a reply cut at max_new_tokens without ending
    temperature: float = 1.0  # sampling temperature of rollouts and held-out samples
    top_k: int = 0  # sample among the top_k tokens only (0 = all)
    grad_clip: float = 1.0  # max global gradient norm (policy and value model each)
    lora_r: int = 0  # 0 = full fine-tuning (reference = frozen copy); >0 = LoRA rank (reference = adapters off)
    lora_alpha: float = 16.0  # LoRA scale numerator: the update is (alpha / r) * B A
    lora_targets: list[str] = field(default_factory=lambda: ["attn", "mlp"])  # layer groups/names LoRA wraps
    eval_every: int = 20  # steps between held-out evaluations (0 = only at the start and end)
    seed: int = 0  # prompts, sampling, LoRA init
    device: str = "auto"  # cpu, cuda, mps or auto

    def __post_init__(self):
        require(self.template in TEMPLATES, "template", self.template, f"one of {', '.join(TEMPLATES)}")
        for name in ("n_prompts", "n_val", "max_prompt_len", "max_new_tokens", "steps", "rollouts_per_step",
                     "minibatch_size", "ppo_epochs", "kl_horizon"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "an int >= 1")
        require(self.minibatch_size <= self.rollouts_per_step, "minibatch_size", self.minibatch_size,
                f"at most rollouts_per_step = {self.rollouts_per_step}")
        require(self.lr > 0 and self.value_lr > 0, "lr/value_lr", (self.lr, self.value_lr), "floats > 0")
        require(0 < self.clip_eps < 1 and self.value_clip > 0, "clip_eps/value_clip", (self.clip_eps, self.value_clip),
                "clip_eps in (0, 1), value_clip > 0")
        require(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "gamma/lam", (self.gamma, self.lam), "floats in [0, 1]")
        require(self.kl_coef >= 0 and self.kl_target >= 0, "kl_coef/kl_target", (self.kl_coef, self.kl_target), "floats >= 0")
        require(self.temperature > 0, "temperature", self.temperature, "a float > 0")
        require(self.lora_r >= 0, "lora_r", self.lora_r, "0 (full fine-tuning) or a rank >= 1")


PRESETS = {
    "quickstart": lambda: Config(steps=8, rollouts_per_step=8, minibatch_size=4, max_new_tokens=16, n_val=8),
    "smoke": lambda: Config(steps=2, rollouts_per_step=4, minibatch_size=2, n_prompts=50, n_val=4,
                            max_new_tokens=8, eval_every=0),
}


def load_prompts(cfg: Config) -> tuple[list, list]:
    """(train, held-out) prompts: from the synthetic stdlib pairs, the arithmetic generator, or a file: any
    preference file `ember reward`/`dpo` read (ours, hh-rlhf, OpenAssistant trees: the prompt of each pair), a
    task file `ember grpo` reads (ours, GSM8K), or {"prompt"} records. Held-out prompts differ from training's."""
    if cfg.data == "stdlib":
        prompts = [p["prompt"] for p in stdlib_pairs(cfg.n_prompts + cfg.n_val, cfg.seed)]
    elif cfg.data == "arithmetic":
        prompts = [t["prompt"] for t in arithmetic_tasks(cfg.n_prompts + cfg.n_val, cfg.seed)]
    else:
        prompts = read_prompts(cfg.data)
    # held out by whole conversations (data.conversation_key), as reward/dpo: every depth of an OpenAssistant
    # tree or hh-rlhf thread is another prompt of the same conversation, and must not be on both sides
    groups: dict[str, list] = {}
    for p in {prompt_key(p): p for p in prompts}.values():
        groups.setdefault(conversation_key(p), []).append(p)
    keys = list(groups)
    rng = random.Random(cfg.seed)
    rng.shuffle(keys)
    val, train = [], []
    for k in keys:
        (val if len(val) < cfg.n_val else train).extend(groups[k])
    val = val[:cfg.n_val]  # a conversation cut here goes to neither side
    rng.shuffle(train)
    train = train[:cfg.n_prompts]
    if not train:
        raise UserError(f"data={cfg.data}: {len(unique)} distinct prompts leave none to train on after n_val={cfg.n_val}")
    return train, val


@torch.no_grad()
def rescale_head(model, mean: float, std: float) -> None:
    """Make a scalar model (the value model, a copy of the reward model) output (score - mean) / std: the scale of
    the normalized rewards its returns are made of. Otherwise it starts off by the reward model's own scale, and
    value clipping lets it catch up only slowly."""
    head = model.lm_head
    head.weight.div_(std)
    head.bias.sub_(mean).div_(std)


def select(batch: SeqBatch, idx: torch.Tensor) -> SeqBatch:
    return SeqBatch(batch.ids[idx], batch.mask[idx], batch.prompt_lens[idx], batch.lens[idx])


def rollout(pr, reward_model, tok, prompts: list, cfg: Config, device, generator) -> tuple[SeqBatch, dict]:
    """Sample replies and score them: the batch plus old log-probs, reference log-probs, the reward model's
    raw scores and which replies never stopped."""
    stop = stop_ids(tok, cfg.template)
    keep = prompt_budget(pr.model, cfg.max_prompt_len, cfg.max_new_tokens)
    ids = [keep_end(encode_prompt(tok, p, cfg.template), keep) for p in prompts]
    replies = generate(pr.model, ids, cfg.max_new_tokens, stop, cfg.temperature, cfg.top_k, generator=generator)
    batch = collate(ids, replies, tok.pad_id).to(device)
    with torch.no_grad():
        pr.model.eval()
        old, entropy = token_logps(pr.model, batch, return_entropy=True, temperature=cfg.temperature)
        ref = pr.ref_logps(batch, cfg.temperature)
        scores = last_token_scores(reward_model.eval(), batch).float()
        unfinished = torch.tensor([not set(stop) & set(r) for r in replies], device=device, dtype=torch.float)
    kl = losses.sequence_logps(old - ref, batch.mask)  # (B,) sampled estimate of KL(pi || ref) per reply
    return batch, {"old": old, "ref": ref, "scores": scores, "unfinished": unfinished, "kl": kl,
                   "entropy": losses.masked_mean(entropy, batch.mask).item()}


def main(cfg: Config) -> dict:
    from ember.common.optim import build_adamw

    rm_dir = cfg.reward_model or str(Path(cfg.run) / "reward" / "final")
    run, paths = begin_stage("ppo", cfg, reward_model=rm_dir, **data_inputs(cfg.data))
    if run.cached:
        return run.metrics
    device = pick_device(cfg.device)
    lm, tok = load_lm(paths["model"], device, cfg)
    train, val = load_prompts(cfg)
    print0(f"[ppo] {len(train)} train / {len(val)} held-out prompts from {cfg.data}")

    # models: policy (+ reference), frozen reward model, value model initialized from the reward model
    pr = PolicyWithReference(lm, cfg.lora_r, cfg.lora_alpha, cfg.lora_targets)
    reward_model = load_scalar_model(rm_dir, device, cfg.template, tok.sha256).requires_grad_(False).eval()
    value_model = load_scalar_model(rm_dir, device, cfg.template, tok.sha256).train()
    opt = build_adamw(pr.model, cfg.lr, 0.0, (0.9, 0.95), device)
    value_opt = build_adamw(value_model, cfg.value_lr, 0.0, (0.9, 0.95), device)
    metrics_log = Metrics(run.dir)
    val_gen = lambda: torch.Generator().manual_seed(cfg.seed + 1)  # same held-out samples each time

    def evaluate() -> dict:
        _, r = rollout(pr, reward_model, tok, val, cfg, device, val_gen())
        return {"reward": r["scores"].mean().item(), "kl": r["kl"].mean().item()}

    before = evaluate()
    print0(f"[ppo] held-out before: reward {before['reward']:.4f}, KL {before['kl']:.4f}")
    metrics_log.log(0, **{f"val_{k}": v for k, v in before.items()})

    rng = random.Random(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    score_mean, score_std = 0.0, 1.0
    if cfg.normalize_reward:  # gain and bias from samples of the initial policy on training prompts
        _, r = rollout(pr, reward_model, tok, rng.sample(train, min(len(train), max(64, cfg.rollouts_per_step))),
                       cfg, device, gen)
        score_mean, score_std = r["scores"].mean().item(), max(r["scores"].std().item(), 1e-3)
        print0(f"[ppo] reward normalization: mean {score_mean:.4f}, std {score_std:.4f} on the initial policy")
        rescale_head(value_model, score_mean, score_std)  # its values start on the normalized returns' scale
    kl_coef = cfg.kl_coef
    for step in range(1, cfg.steps + 1):
        t0 = time.perf_counter()
        prompts = [rng.choice(train) for _ in range(cfg.rollouts_per_step)]
        batch, r = rollout(pr, reward_model, tok, prompts, cfg, device, gen)
        mask = batch.mask
        with torch.no_grad():
            old_values = value_model(batch.ids[:, :-1])[..., 0].float() * mask  # (B, L-1): V of the state before each token
            score = (r["scores"] - score_mean) / score_std - cfg.missing_stop_penalty * r["unfinished"]
            rewards = losses.kl_penalized_rewards(score, r["old"], r["ref"], mask, kl_coef)
            adv, returns = losses.gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
            adv = losses.masked_whiten(adv, mask)

        pr.model.train()
        stats = {"pg_loss": 0.0, "vf_loss": 0.0, "clip_frac": 0.0, "vf_clip_frac": 0.0, "approx_kl": 0.0}
        n_updates = 0
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(rng.randrange(2 ** 31)))
            for s in range(0, len(prompts), cfg.minibatch_size):
                idx = perm[s:s + cfg.minibatch_size].to(device)
                mb = select(batch, idx)
                logps = token_logps(pr.model, mb, temperature=cfg.temperature)
                pg_loss, clip_frac, approx_kl = losses.ppo_policy_loss(logps, r["old"][idx], adv[idx], mb.mask, cfg.clip_eps)
                opt.zero_grad(set_to_none=True)
                pg_loss.backward()
                torch.nn.utils.clip_grad_norm_(pr.model.parameters(), cfg.grad_clip)
                opt.step()
                values = value_model(mb.ids[:, :-1])[..., 0].float()
                vf_loss, vf_clip = losses.ppo_value_loss(values, old_values[idx], returns[idx], mb.mask, cfg.value_clip)
                value_opt.zero_grad(set_to_none=True)
                vf_loss.backward()
                torch.nn.utils.clip_grad_norm_(value_model.parameters(), cfg.grad_clip)
                value_opt.step()
                for k, v in (("pg_loss", pg_loss), ("vf_loss", vf_loss), ("clip_frac", clip_frac),
                             ("vf_clip_frac", vf_clip), ("approx_kl", approx_kl)):
                    stats[k] += v.item()
                n_updates += 1
        stats = {k: v / n_updates for k, v in stats.items()}

        kl = r["kl"].mean().item()
        if cfg.kl_target > 0:
            kl_coef = losses.adaptive_kl_coef(kl_coef, kl, cfg.kl_target, len(prompts), cfg.kl_horizon)
        reward = r["scores"].mean().item()
        metrics_log.log(step, reward=reward, kl=kl, kl_coef=kl_coef, entropy=r["entropy"],
                        reply_len=mask.sum(1).mean().item(), **stats)
        if step % 5 == 0 or step == cfg.steps:
            print0(step_line(step, cfg.steps, reward=reward, kl=kl, kl_coef=kl_coef, entropy=r["entropy"],
                             clip=stats["clip_frac"], vf_loss=stats["vf_loss"], dt=time.perf_counter() - t0))
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            ev = evaluate()
            metrics_log.log(step, **{f"val_{k}": v for k, v in ev.items()})
            print0(f"[ppo] step {step}: held-out reward {ev['reward']:.4f}, KL {ev['kl']:.4f}")

    after = evaluate()
    metrics_log.log(cfg.steps, **{f"val_{k}": v for k, v in after.items()})
    metrics_log.close()
    print0(f"[ppo] held-out reward {before['reward']:.4f} -> {after['reward']:.4f}, KL {after['kl']:.4f} "
           f"(target {cfg.kl_target})")
    pr.save(run.dir / "final")
    return run.finish({
        "val_reward": after["reward"], "val_reward_before": before["reward"], "val_kl": after["kl"],
        "kl_target": cfg.kl_target, "final_kl_coef": kl_coef, "score_mean": score_mean, "score_std": score_std, "val_prompts": len(val), "lora_r": cfg.lora_r,
    })


if __name__ == "__main__":
    from ember.cli import module_main

    module_main(__name__)
