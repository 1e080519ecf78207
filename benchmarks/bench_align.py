"""Alignment recipes on a toy model: does each one move its own held-out metric, and how far?

    python benchmarks/bench_align.py            # ~5-10 min on 2 CPU cores
    python benchmarks/bench_align.py --quick    # fewer steps, for a look

The peer is the starting model itself, measured in the same run on the same held-out data: reward-model
pairwise accuracy (chance 0.5 / the untrained head), DPO's implicit reward margin and accuracy (0 / 0.5 at
the start by construction), PPO's mean reward-model score and KL on held-out prompts (KL target 3 nats),
GRPO's exact-answer accuracy on held-out addition problems (greedy). The toy model is ember.align.toy:
a 2-layer, 64-wide GPT fine-tuned for 300 steps on chat-formatted addition (a few seconds).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from machine import cpu_name


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer steps")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for a toy model)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    q = 3 if args.quick else 1  # divide step counts

    from ember.align import dpo, grpo, ppo, reward
    from ember.align.toy import TASKS, make_toy_run

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        t0 = time.perf_counter()
        make_toy_run(run, sft_steps=300)
        print(f"toy model ready in {time.perf_counter() - t0:.1f}s")
        common = dict(run=str(run), device="cpu", eval_every=0)
        pairs = dict(n_pairs=2000, max_len=128, max_prompt_len=96, batch_size=16)

        t0 = time.perf_counter()
        m = reward.main(reward.Config(**common, **pairs, steps=300 // q, lr=1e-3))
        rows.append(("reward: held-out pairwise accuracy", m["val_accuracy_before"], m["val_accuracy"],
                     f"{m['val_pairs']} pairs", time.perf_counter() - t0))

        t0 = time.perf_counter()
        m = dpo.main(dpo.Config(**common, **pairs, steps=100 // q, lr=1e-3))
        rows.append(("dpo (full): held-out reward margin", m["val_margin_before"], m["val_margin"],
                     f"acc {m['val_accuracy']:.3f}, loss@init {m['loss_at_init']:.4f}", time.perf_counter() - t0))
        dpo_dir = run / "dpo"
        dpo_dir.rename(run / "dpo_full")
        t0 = time.perf_counter()
        m = dpo.main(dpo.Config(**common, **pairs, steps=100 // q, lr=3e-3, lora_r=8))
        rows.append(("dpo (LoRA r=8): held-out reward margin", m["val_margin_before"], m["val_margin"],
                     f"acc {m['val_accuracy']:.3f}, loss@init {m['loss_at_init']:.4f}", time.perf_counter() - t0))

        t0 = time.perf_counter()
        m = ppo.main(ppo.Config(**common, steps=40 // q, rollouts_per_step=32, minibatch_size=8, lr=1e-4,
                                value_lr=1e-4, kl_target=3.0, max_new_tokens=16, n_val=64))
        rows.append(("ppo: held-out mean reward", m["val_reward_before"], m["val_reward"],
                     f"KL {m['val_kl']:.2f} (target {m['kl_target']:g})", time.perf_counter() - t0))

        t0 = time.perf_counter()
        m = grpo.main(grpo.Config(**common, steps=100 // q, lr=3e-4, prompts_per_step=8, group_size=8, n_val=200,
                                  n_tasks=4000, max_new_tokens=6, **TASKS))
        rows.append(("grpo: held-out exact-answer accuracy", m["val_accuracy_before"], m["val_accuracy"],
                     f"{m['val_tasks']} problems", time.perf_counter() - t0))

    print(f"\nmachine: {cpu_name()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}")
    print(f"{'metric':42s} {'start (peer)':>12s} {'after':>9s} {'delta':>9s}  {'seconds':>7s}  notes")
    for name, before, after, note, secs in rows:
        print(f"{name:42s} {before:12.3f} {after:9.3f} {after - before:+9.3f}  {secs:7.1f}  {note}")


if __name__ == "__main__":
    main()
