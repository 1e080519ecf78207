"""Pretraining throughput: the ember recipe (`pretrain.train.main`) vs transformers' Llama in a plain loop.

    python benchmarks/bench_pretrain.py                  # ~10M-parameter config, ~5 minutes on 2 idle CPU cores
    python benchmarks/bench_pretrain.py --steps=10 --depth=4 --rounds=1

Both train the same architecture (depth 6: 6 layers, 384 wide, SwiGLU 1024, vocab 4096 -> 10.6M parameters
in the blocks, 12.2M with the output head, 13.8M in all) from the same initial weights (the HF model is exported from the ember one) on random tokens,
with AdamW, gradient clipping and a warmup schedule, batch 8 x 256 tokens, fp32. The ember side is the whole
recipe as a user runs it (data loader, spike guard, metrics; checkpoints off); the peer is the textbook loop
around `LlamaForCausalLM`. The two alternate (ember, hf, ember, hf) and the best round of each is reported,
so a change in machine load hits both. MFU = tokens/s x GPT.flops_per_token / the measured fp32 matmul peak.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ember.common.dist import peak_flops
from ember.common.log import read_metrics
from ember.model.gpt import GPTConfig, build_model
from ember.model.hf import export_hf

VOCAB, BATCH, SEQ = 4096, 8, 256


def write_tokens(folder: Path, n_tokens: int, seed: int = 0) -> None:
    """A token folder in the tokenize stage's format (raw uint16 .bin + meta.json) of random ids: throughput
    does not depend on what the tokens say."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    splits = {}
    for split, n in (("train", n_tokens), ("val", 1 << 15)):
        (folder / f"{split}_00000.bin").write_bytes(rng.integers(0, VOCAB, n, dtype=np.uint16).tobytes())
        splits[split] = {"shards": [{"file": f"{split}_00000.bin", "tokens": n, "documents": 1, "bytes": n}]}
    (folder / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": VOCAB, "splits": splits}))


def bench_ember(model_cfg: GPTConfig, tokens: Path, run: Path, steps: int, warmup: int) -> float:
    """tokens/s of the recipe over its steps after `warmup` (from the wall times in its metrics.jsonl)."""
    from ember.pretrain import train

    cfg = train.Config(run=str(run), data=str(tokens), model=model_cfg, dtype="fp32", steps=warmup + steps,
                       batch_size=BATCH, seq_len=SEQ, lr=1e-3, warmup_steps=2, eval_every=0, eval_batches=1, save_every=0,
                       log_every=1000, spike_z=0.0)
    train.main(cfg)
    t = [r["time"] for r in read_metrics(run / "pretrain" / "metrics.jsonl") if "loss" in r]  # after each step
    return BATCH * SEQ * steps / (t[warmup + steps - 1] - t[warmup - 1])


def bench_hf(model_cfg: GPTConfig, steps: int, warmup: int) -> float:
    """The plain loop: HF Llama with the same weights, AdamW, clipping, a warmup schedule."""
    import transformers  # the peer; only at the edges of ember

    torch.manual_seed(1337)
    ember = build_model(model_cfg)
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_hf(ember, d)
        model = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="sdpa").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 2))
    data = torch.from_numpy(np.random.default_rng(0).integers(0, VOCAB, (warmup + steps) * BATCH * SEQ))
    t0 = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            t0 = time.perf_counter()
        x = data[step * BATCH * SEQ:(step + 1) * BATCH * SEQ].view(BATCH, SEQ)
        loss = model(input_ids=x, labels=x).loss  # HF shifts the labels inside
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # a host sync each step, as any loop that logs its loss has
    return BATCH * SEQ * steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (>= 1: timing starts at the end of one)")
    ap.add_argument("--rounds", type=int, default=2, help="alternate ember, hf this many times; best of each")
    args = ap.parse_args()
    if args.warmup < 1 or args.steps < 1:
        ap.error("--warmup and --steps must be >= 1 (the timed window starts when the last warm-up step ends)")
    model_cfg = GPTConfig.from_depth(args.depth, VOCAB, max_seq_len=SEQ)
    model = build_model(model_cfg, "meta", init=False)
    fpt = model.flops_per_token(SEQ)
    peak = peak_flops("cpu", torch.float32)
    print(f"config: depth {args.depth}, {model.num_params(exclude_embedding=True) / 1e6:.1f}M non-embedding / "
          f"{model.num_params() / 1e6:.1f}M total params, batch {BATCH}x{SEQ}, fp32, {torch.get_num_threads()} threads")
    print(f"measured fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s; model: {fpt / 1e6:.1f} MFLOP/token (6N + attention)")
    ember_tps, hf_tps = 0.0, 0.0
    with tempfile.TemporaryDirectory() as d:
        tokens = Path(d) / "tokens"
        write_tokens(tokens, (args.steps + args.warmup + 2) * BATCH * SEQ + 1)
        for r in range(args.rounds):  # alternating, so a change in machine load hits both sides
            ember_tps = max(ember_tps, bench_ember(model_cfg, tokens, Path(d) / f"run{r}", args.steps, args.warmup))
            hf_tps = max(hf_tps, bench_hf(model_cfg, args.steps, args.warmup))
            print(f"round {r + 1}: best so far ember {ember_tps:.0f} tok/s, transformers {hf_tps:.0f} tok/s")
    rows = [("ember recipe (pretrain.train.main)", ember_tps), ("transformers Llama + plain loop", hf_tps)]
    print(f"\n| {'trainer':<36} | {'tok/s':>8} | {'MFU':>6} |\n|{'-' * 38}|{'-' * 10}|{'-' * 8}|")
    for name, tps in rows:
        print(f"| {name:<36} | {tps:8.0f} | {100 * tps * fpt / peak:5.1f}% |")
    print(f"\nratio ember / transformers: {ember_tps / hf_tps:.2f}x   (load average during the run: "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}; > the core count means other work shared the CPU)")


if __name__ == "__main__":
    main()
