"""Forward+backward tokens/s of ember's GPT vs transformers' LlamaForCausalLM with identical config and weights.

    python benchmarks/bench_model.py                 # both configs, fp32 and bf16 autocast (~5 min on 2 idle cores)
    python benchmarks/bench_model.py --steps=5 --configs=small
    python benchmarks/bench_model.py --device=cuda --configs=small,medium,gpu   # on a GPU machine

The HF model is exported from the ember one (export_hf), so both hold the same weights; their losses are
printed to show they compute the same thing. Steps alternate between the two models (ember, hf, ember, ...)
so drift in machine speed hits both alike. tok/s = tokens / median wall step time; the ratios are medians
of per-pair ratios, of wall time and of process CPU time (steadier when other jobs share the cores).
On a GPU the peak memory of a step (torch.cuda.max_memory_allocated) is printed for both.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings

import torch

import ember
from ember.model.gpt import GPT, GPTConfig, build_model
from ember.model.hf import export_hf

# name -> (GPTConfig, batch, seq_len): the depth-4 model of the CPU quickstart, and a wider/longer one
CONFIGS = {
    "small": (GPTConfig.from_depth(4, vocab_size=8192, n_kv_head=2, max_seq_len=256), 8, 256),
    "medium": (GPTConfig.from_depth(8, vocab_size=32768, n_kv_head=4, max_seq_len=512), 2, 512),
    "gpu": (GPTConfig.from_depth(12, vocab_size=32768, n_kv_head=4, max_seq_len=1024), 16, 1024),  # GPT-2 small size
}


def step_ember(model, idx, targets):
    loss = model(idx, targets)
    loss.backward()
    return loss.item()


def step_hf(model, idx, targets):
    # HF shifts labels internally, so labels = the input; the work (T logits, T-1 scored) is the same
    loss = model(input_ids=idx, labels=idx).loss
    loss.backward()
    return loss.item()


def models_and_batch(cfg, batch, seq, device):
    """ember's GPT (seed 0), transformers' LlamaForCausalLM with the same weights, and one batch (idx, targets)."""
    import transformers  # the peer; only the benchmarks and the interop tests import it

    torch.manual_seed(0)
    ember = build_model(cfg, device).train()
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_hf(ember, d)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="sdpa").to(device).train()
    idx = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    targets = torch.cat([idx[:, 1:], torch.full((batch, 1), -100, device=device)], dim=1)
    return ember, hf, idx, targets


def measure(name, cfg, batch, seq, steps, autocast, device):
    ember, hf, idx, targets = models_and_batch(cfg, batch, seq, device)
    cuda = torch.device(device).type == "cuda"
    peak = {"ember": 0, "hf": 0}  # bytes, GPU only
    wall = {"ember": [], "hf": []}
    cpu = {"ember": [], "hf": []}  # process CPU seconds (all threads): steadier than wall on a shared machine
    losses = {}
    for i in range(steps + 2):  # the first 2 rounds warm up allocators and kernels
        for who, model, fn in (("ember", ember, step_ember), ("hf", hf, step_hf)):
            model.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0, c0 = time.perf_counter(), time.process_time()
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
                losses[who] = fn(model, idx, targets)  # .item() waits for the GPU
            if cuda:
                peak[who] = max(peak[who], torch.cuda.max_memory_allocated())
            if i >= 2:
                wall[who].append(time.perf_counter() - t0)
                cpu[who].append(time.process_time() - c0)
    tok = batch * seq
    med = statistics.median
    # ratios of back-to-back steps, then the median: load from other processes hits both sides of a pair alike
    return dict(config=name, dtype="bf16-autocast" if autocast else "fp32", params=ember.num_params(),
                ember=tok / med(wall["ember"]), hf=tok / med(wall["hf"]),
                ratio=med([h / e for e, h in zip(wall["ember"], wall["hf"])]),
                cpu_ratio=med([h / e for e, h in zip(cpu["ember"], cpu["hf"])]),
                loss_ember=losses["ember"], loss_hf=losses["hf"], peak=peak)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10, help="timed steps per model (after 2 warm-up steps)")
    p.add_argument("--configs", default="small,medium", help="comma-separated: " + ",".join(CONFIGS))
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--unfused-loss", action="store_true",
                   help="ablation: ember's loss through the full logits, as HF (not the fused head + loss)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.unfused_loss:
        GPT._fusable_head_weight = lambda self: None  # forward then takes its logits path
    import transformers
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else "-"
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f}, glibc keeps freed memory: {ember.KEEPS_FREED_MEMORY}, GPU {gpu}, "
          f"ember loss {'unfused (ablation)' if args.unfused_loss else 'fused'}")
    rows = []
    for name in args.configs.split(","):
        cfg, batch, seq = CONFIGS[name]
        for autocast in (False, True):
            rows.append(measure(name, cfg, batch, seq, args.steps, autocast, args.device))
            r = rows[-1]
            print(f"  measured {name} {r['dtype']}: loss ember {r['loss_ember']:.4f} hf {r['loss_hf']:.4f}", flush=True)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")
    print("| config | shape (L x d, heads/kv, vocab, B x T) | dtype | params | ember tok/s | HF Llama tok/s "
          "| ember / HF (wall) | ember / HF (CPU s) | peak GPU memory ember / HF |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        cfg, batch, seq = CONFIGS[r["config"]]
        mem = f"{r['peak']['ember'] / 2**30:.2f} / {r['peak']['hf'] / 2**30:.2f} GiB" if r["peak"]["hf"] else "-"
        shape = f"{cfg.n_layer} x {cfg.n_embd}, {cfg.n_head}/{cfg.n_kv_head}, {cfg.vocab_size}, {batch} x {seq}"
        print(f"| {r['config']} | {shape} | {r['dtype']} | {r['params'] / 1e6:.1f}M | {r['ember']:,.0f} | "
              f"{r['hf']:,.0f} | {r['ratio']:.2f}x | {r['cpu_ratio']:.2f}x | {mem} |")


if __name__ == "__main__":
    main()
