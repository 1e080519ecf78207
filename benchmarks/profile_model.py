"""Where a forward+backward step goes: torch.profiler over ember's GPT and transformers' Llama, side by side.

    python benchmarks/profile_model.py                                   # small config, fp32, CPU
    python benchmarks/profile_model.py --device=cuda --configs=medium,gpu --dtype=bf16

Same models, weights and batches as benchmarks/bench_model.py. Prints, per model, the time per step summed
over the profiled ops (CPU: self CPU time of every op; CUDA: the kernels' time) and their count, then the ops
and kernels that differ most between the two, in ms per step. On a CPU it also prints the ceiling: how much
faster than HF's step any implementation of the same model could be if everything but its matmuls and
attention took no time (HF's step / the time of those kernels, which both models share).
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from bench_model import CONFIGS, models_and_batch, step_ember, step_hf

# The work any implementation of the model must do, as CPU ops: the matmuls and flash attention (forward, backward)
SHARED_CPU_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
                  "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def per_step_ops(model, fn, idx, targets, device, autocast, steps=3):
    """({op or kernel name: (ms per step, calls per step)}, (total ms, kernels) per step): self CPU time of
    the ops on a CPU; on a GPU the kernels' time, each kernel listed and also counted in the op that launched
    it, so the total sums the kernels alone."""
    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            fn(model, idx, targets)
    for _ in range(3):
        step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    out, total, kernels = {}, 0.0, 0
    for e in prof.key_averages():
        us = e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total
        if us > 0:
            out[e.key] = (us / steps / 1e3, e.count // steps)
            if device.type != "cuda" or e.device_type.name == "CUDA":  # a kernel, not the op around it
                total, kernels = total + us / steps / 1e3, kernels + e.count // steps
    return out, (total, kernels)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="small", help="comma-separated: " + ",".join(CONFIGS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16 = autocast, as bench_model")
    p.add_argument("--top", type=int, default=15, help="ops listed per config")
    args = p.parse_args()
    device = torch.device(args.device)
    for name in args.configs.split(","):
        ember, hf, idx, targets = models_and_batch(*CONFIGS[name], device)
        ops, totals = {}, {}
        for who, m, fn in (("ember", ember, step_ember), ("hf", hf, step_hf)):
            ops[who], totals[who] = per_step_ops(m, fn, idx, targets, device, args.dtype == "bf16")
        print(f"\n== {name} {args.dtype} on {device}")
        unit = "kernels" if device.type == "cuda" else "op calls"
        for who, (ms, n) in totals.items():
            print(f"{who:6s}: {ms:8.1f} ms per step in {n:5d} {unit}")
        if device.type == "cpu":
            shared = {who: sum(ops[who].get(k, (0.0, 0))[0] for k in SHARED_CPU_OPS) for who in ops}
            print(f"matmuls + attention: ember {shared['ember']:.1f} ms, HF {shared['hf']:.1f} ms per step; ceiling "
                  f"ember / HF <= {totals['hf'][0] / min(shared.values()):.2f}x (were all other ops free)")
        keys = sorted(set(ops["ember"]) | set(ops["hf"]),
                      key=lambda k: -abs(ops["ember"].get(k, (0, 0))[0] - ops["hf"].get(k, (0, 0))[0]))
        print(f"{'op (largest ember-HF differences first)':70s} {'ember ms':>9s} {'calls':>6s} {'HF ms':>9s} {'calls':>6s}")
        for k in keys[:args.top]:
            (em, ec), (hm, hc) = ops["ember"].get(k, (0.0, 0)), ops["hf"].get(k, (0.0, 0))
            print(f"{k[:70]:70s} {em:9.2f} {ec:6d} {hm:9.2f} {hc:6d}")


if __name__ == "__main__":
    main()
