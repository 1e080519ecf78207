"""Distillation and pruning on the quickstart model: held-out loss of a distilled student vs the same student from
scratch on the same tokens, and of the pruned model (50% magnitude, 50% Wanda, 2:4, structured) before and after
a short recovery fine-tune.

    python benchmarks/bench_distill.py                       # both parts (~15-25 min on 2 shared CPU cores)
    python benchmarks/bench_distill.py --part=distill --steps=300
    python benchmarks/bench_distill.py --part=prune --recover_steps=0    # held-out loss right after pruning

Setup: the quickstart pipeline up to pretraining (stdlib tokens, 4096-token BPE, depth-4 teacher, 256 wide, 500
steps); cached in --run, so a rerun starts at once. distill: student `from_depth:2` (2 layers, 128 wide) for
--steps steps of 8 x 256 tokens, (a) alpha=0 (cross-entropy only: from scratch), (b) alpha=0.9, T=2 (forward KL
to the teacher), (c) as (b) from the teacher's top-64 cache. Same seed: same init and the same batches in the same
order. Held-out loss = mean next-token cross-entropy over 20 x 8 x 256 tokens of the val split.
prune: the teacher pruned by each method, then `recover` (full fine-tune, 100 steps of 8 x 256 train tokens).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

EVAL_BATCHES, B, T = 20, 8, 256


def quickstart_teacher(run: str) -> Path:
    from ember import pipeline

    steps = pipeline.quickstart(run)
    t0 = time.time()
    pipeline.run_steps(pipeline.select(steps, "", "pretrain"))
    print(f"[bench] quickstart pipeline up to pretrain: {time.time() - t0:.0f}s")
    return Path(run) / "pretrain" / "final"


def part_distill(run: str, steps: int) -> None:
    from ember.compress import distill

    rows = []
    for name, sub, kw in [("student from scratch (alpha=0, CE only)", "scratch", dict(alpha=0.0)),
                          ("student distilled (alpha=0.9, T=2, full logits)", "kd", dict(alpha=0.9)),
                          ("student distilled (alpha=0.9, T=2, top-64 cache)", "kd_top64", dict(alpha=0.9, cache_topk=64))]:
        cfg = distill.Config(run=str(Path(run) / "bench_distill" / sub),
                             teacher=str(Path(run) / "pretrain" / "final"), data=str(Path(run) / "tokenize" / "tokens"),
                             cache_dir=str(Path(run) / "bench_distill" / "teacher_cache"),
                             student="from_depth:2", steps=steps, batch_size=B, seq_len=T, lr=3e-3, warmup_steps=20,
                             eval_every=0, eval_batches=EVAL_BATCHES, log_every=50, seed=0, **kw)
        t0 = time.time()
        m = distill.main(cfg)
        rows.append((name, m, time.time() - t0))
    m0 = rows[0][1]
    print(f"\nteacher depth 4 ({m0['teacher_params'] / 1e6:.2f}M params): held-out loss {m0['teacher_val_loss']:.4f}; "
          f"student from_depth:2 ({m0['student_params'] / 1e6:.2f}M), {steps} steps x {B} x {T} = {m0['tokens']} tokens")
    print("| student | held-out loss | held-out KL to teacher | wall s |")
    print("|---|---|---|---|")
    for name, m, s in rows:
        print(f"| {name} | {m['val_loss']:.4f} | {m['val_kl']:.4f} | {s:.0f} |")


def part_prune(run: str, recover_steps: int) -> None:
    from ember.compress.prune import prune_2_4, prune_magnitude, prune_structured, prune_wanda
    from ember.compress.recover import recover
    from ember.data.loader import TokenLoader, val_batches
    from ember.model.load import load_model

    tokens = Path(run) / "tokenize" / "tokens"
    teacher = load_model(Path(run) / "pretrain" / "final", "cpu", torch.float32).eval()
    val = list(val_batches(tokens, B, T, EVAL_BATCHES))
    loader = TokenLoader(tokens, "train", B, T, seed=7)
    calib = torch.cat([loader.next_batch()[0] for _ in range(4)])  # (32, T) calibration windows of the train split
    train = [loader.next_batch() for _ in range(recover_steps)]

    @torch.no_grad()
    def held_out(model) -> float:
        model.eval()
        return sum(model(x, y).item() for x, y in val) / len(val)

    dense = held_out(teacher)
    print(f"\n[bench] dense quickstart model: {teacher.num_params() / 1e6:.2f}M params, held-out loss {dense:.4f}")
    methods = [("magnitude 50%", lambda m: prune_magnitude(m, 0.5)),
               ("Wanda 50%", lambda m: prune_wanda(m, calib, 0.5)),
               ("2:4 (Wanda score)", lambda m: prune_2_4(m, calib, "wanda")),
               ("structured heads 25% + FFN 25%", lambda m: prune_structured(m, calib, heads=0.25, ffn=0.25)),
               ("structured 1 layer of 4", lambda m: prune_structured(m, calib, layers=1))]
    print(f"| method | params | sparsity / removed | held-out loss | after recovery ({recover_steps} steps, full) | prune s |")
    print("|---|---|---|---|---|---|")
    print(f"| dense | {teacher.num_params() / 1e6:.2f}M | 0 | {dense:.4f} | - | - |")
    for name, fn in methods:
        t0 = time.time()
        model, info = fn(copy.deepcopy(teacher))
        dt = time.time() - t0
        before = held_out(model)
        after = "-"
        if recover_steps:
            torch.manual_seed(0)
            model, _ = recover(model, train, steps=recover_steps, lr=3e-4, lora=False)
            after = f"{held_out(model):.4f}"
        frac = info.get("removed_fraction", info.get("sparsity"))
        print(f"| {name} | {model.num_params() / 1e6:.2f}M | {frac:.1%} | {before:.4f} | {after} | {dt:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["all", "distill", "prune"], default="all")
    ap.add_argument("--run", default="runs/bench_distill")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--recover_steps", type=int, default=100)  # 0 = prune only (each recovery step is a training step)
    args = ap.parse_args()
    quickstart_teacher(args.run)
    if args.part in ("all", "distill"):
        part_distill(args.run, args.steps)
    if args.part in ("all", "prune"):
        part_prune(args.run, args.recover_steps)


if __name__ == "__main__":
    main()
