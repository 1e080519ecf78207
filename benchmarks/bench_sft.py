"""Fine-tuning cost and effect: full vs LoRA vs QLoRA (ember vs transformers+PEFT), NF4 vs bitsandbytes/torchao,
and what SFT on the default data does to a briefly pretrained model.

    python benchmarks/bench_sft.py --part=memory      # peak memory + tokens/s per method, ember and HF+PEFT (~4 min)
    python benchmarks/bench_sft.py --part=nf4         # NF4 quantize/dequantize time and error vs bitsandbytes, torchao
    python benchmarks/bench_sft.py --part=behaviour   # quickstart pipeline to pretrain, then `ember sft` quickstart

memory: each (library, method) runs in its own process, so peak RSS is its own; "peak - base" subtracts the
RSS after imports and before the model is built. Frozen weights are counted in bytes (NF4 codes + scales for
QLoRA) against the same weights in bf16. The peer is transformers' Llama exported from the same ember model,
with PEFT LoRA on the same layers (QLoRA: bitsandbytes 4-bit NF4 + double quant), same batch and steps.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch

DEPTH, VOCAB, BATCH, SEQ, R = 8, 8192, 2, 128, 16  # a small batch: weights, not activations, dominate


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def ember_model(method: str):
    from ember.model.gpt import GPTConfig, build_model
    from ember.model.lora import apply_lora
    from ember.model.quant import quantize_nf4_

    torch.manual_seed(0)
    model = build_model(GPTConfig.from_depth(DEPTH, VOCAB, n_kv_head=4, max_seq_len=SEQ))
    if method == "qlora":
        quantize_nf4_(model)
    if method != "full":
        apply_lora(model, ["attn", "mlp"], r=R, alpha=2 * R)
    return model, lambda idx, tgt: model(idx, tgt)


def hf_model(method: str):
    import transformers
    from peft import LoraConfig, get_peft_model

    from ember.model.gpt import GPTConfig, build_model
    from ember.model.hf import export_hf

    torch.manual_seed(0)
    ember = build_model(GPTConfig.from_depth(DEPTH, VOCAB, n_kv_head=4, max_seq_len=SEQ))
    kw = {}
    if method == "qlora":
        kw["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_hf(ember, d)
        del ember
        model = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="sdpa", **kw)
    if method != "full":
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(model, LoraConfig(r=R, lora_alpha=2 * R, lora_dropout=0.0, target_modules=targets))
    model.train()
    return model, lambda idx, tgt: model(input_ids=idx, labels=idx).loss


def _quant_state_bytes(p) -> int:
    """bitsandbytes Params4bit keep their (double-quantized) scales in a QuantState beside the packed data."""
    qs = getattr(p, "quant_state", None)
    if qs is None:
        return 0
    parts = (qs.absmax, qs.offset, qs.state2.absmax if qs.state2 is not None else None)
    return sum(t.numel() * t.element_size() for t in parts if isinstance(t, torch.Tensor))


def frozen_bytes(model) -> int:
    """Bytes of every weight that does not train: frozen parameters and quantized storage with its scales."""
    n = sum(p.numel() * p.element_size() + _quant_state_bytes(p) for p in model.parameters() if not p.requires_grad)
    return n + sum(b.numel() * b.element_size() for b in model.buffers())  # NF4 storage (+ HF's RoPE table)


def state_bytes(model, opt) -> int:
    """Weights (all, as stored) + gradients + optimizer states + quantization scales: what a method must hold
    besides activations, counted tensor by tensor."""
    n = frozen_bytes(model)
    for p in model.parameters():
        if p.requires_grad:
            n += p.numel() * p.element_size() * (2 if p.grad is not None else 1)
    for st in opt.state.values():
        n += sum(t.numel() * t.element_size() for t in st.values() if isinstance(t, torch.Tensor))
    return n


def child(lib: str, method: str, steps: int) -> dict:
    """One (library, method) in this process: build, train `steps` AdamW steps, report speed and memory."""
    from ember.model.quant import frozen_weight_bytes

    torch.manual_seed(0)
    base = rss_mib()
    model, loss_fn = (ember_model if lib == "ember" else hf_model)(method)
    n_weights = sum(p.numel() for n, p in model.named_parameters() if "lora" not in n)  # the base model only
    if lib == "ember":
        assert frozen_weight_bytes(model) == frozen_bytes(model)  # the library's own count agrees with ours
        n_weights += sum(m.packed.numel() * 2 for m in model.modules() if hasattr(m, "packed"))  # NF4 buffers
    else:  # a Params4bit holds 2 weights per uint8 element
        n_weights += sum(p.numel() for p in model.parameters() if getattr(p, "quant_state", None) is not None)
    frozen = frozen_bytes(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    idx = torch.randint(0, VOCAB, (BATCH, SEQ))
    tgt = torch.cat([idx[:, 1:], torch.full((BATCH, 1), -100)], dim=1)
    times = []
    for i in range(steps + 1):  # the first step warms up allocators and kernels
        t0 = time.perf_counter()
        loss = loss_fn(idx, tgt)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    opt.zero_grad(set_to_none=False)  # count the gradients as they exist during a step
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    state = state_bytes(model, opt)
    return {"lib": lib, "method": method, "tok_s": BATCH * SEQ / statistics.median(times[1:]), "state_mib": state / 2**20,
            "peak_mib": peak_mib(), "base_mib": base, "frozen_mib": frozen / 2**20, "trainable": trainable,
            "bf16_weights_mib": 2 * n_weights / 2**20, "loss": loss.item()}


def part_memory(steps: int, libs: list[str], timeout: int) -> None:
    rows = []
    for lib in libs:
        for method in ("full", "lora", "qlora"):
            cmd = [sys.executable, __file__, "--child", lib, method, "--steps", str(steps)]
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                print(f"{lib} {method}: did not finish {steps + 1} steps in {timeout}s (skipped)")
                continue
            line = [x for x in res.stdout.splitlines() if x.startswith("{")]
            if res.returncode or not line:
                err = (res.stderr.strip().splitlines() or ["?"])[-1]
                print(f"{lib} {method}: failed ({err[:160]})")
                continue
            rows.append(json.loads(line[-1]))
            print(f"  done {lib} {method}", file=sys.stderr)
    print(f"\nGPT depth {DEPTH} (from_depth), vocab {VOCAB}, batch {BATCH} x {SEQ} tokens, fp32 compute, "
          f"LoRA r={R} on attn+mlp, AdamW, {steps} timed steps (median)\n")
    print("| library | method | trainable params | frozen weights MiB | frozen / bf16 weights | weights+grads+optim MiB "
          "| peak RSS - base MiB | tokens/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['lib']} | {r['method']} | {r['trainable'] / 1e6:.2f}M | {r['frozen_mib']:.1f} | "
              f"{r['frozen_mib'] / r['bf16_weights_mib']:.3f}x | {r['state_mib']:.0f} | "
              f"{r['peak_mib'] - r['base_mib']:.0f} | {r['tok_s']:.0f} |")
    by = {(r["lib"], r["method"]): r for r in rows}
    for m in ("full", "lora", "qlora"):
        if ("ember", m) in by and ("hf+peft", m) in by:
            e, h = by[("ember", m)], by[("hf+peft", m)]
            print(f"{m}: ember/peer tokens/s {e['tok_s'] / h['tok_s']:.2f}x, weights+grads+optim "
                  f"{e['state_mib'] / h['state_mib']:.2f}x, peak RSS - base "
                  f"{(e['peak_mib'] - e['base_mib']) / max(h['peak_mib'] - h['base_mib'], 1):.2f}x")


def part_nf4(reps: int) -> None:
    from ember.model.quant import quantize_nf4

    torch.manual_seed(0)
    w = torch.randn(4096, 4096) * 0.02  # one 7B-model-sized projection, 16.8M weights
    rows = []

    def timed(fn):
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            out = fn()
            ts.append(time.perf_counter() - t0)
        return min(ts), out

    tq, q = timed(lambda: quantize_nf4(w))
    td, d = timed(lambda: q.dequantize())
    rows.append(("ember", tq, td, (d - w).pow(2).mean().sqrt().item(), q.nbytes()))
    try:
        import bitsandbytes.functional as bnb

        tq, (p, st) = timed(lambda: bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True))
        td, d = timed(lambda: bnb.dequantize_4bit(p, st))
        nbytes = p.numel() + st.absmax.numel() + 4 * st.state2.absmax.numel() + 4
        rows.append(("bitsandbytes", tq, td, (d - w).pow(2).mean().sqrt().item(), nbytes))
        same = torch.equal(q.packed, p.view(-1))
        print(f"bitsandbytes {getattr(sys.modules.get('bitsandbytes'), '__version__', '?')}: NF4 codes identical: {same}")
    except ImportError:
        print("bitsandbytes not installed: skipped")
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor

        tq, t = timed(lambda: NF4Tensor.from_tensor(w, 64, 256))
        td, d = timed(lambda: t.get_original_weight())
        nbytes = t.quantized_data.numel() + t.quantized_scalers.numel() + 4 * t.quantization_factor.numel() + 4
        rows.append(("torchao", tq, td, (d - w).pow(2).mean().sqrt().item(), nbytes))
    except ImportError:
        print("torchao not installed: skipped")
    print(f"\nNF4 (block 64, double-quantized scales, block 256) of a 4096 x 4096 fp32 weight, best of {reps}\n")
    print("| library | quantize ms | dequantize ms | RMS error / RMS weight | bytes per weight |")
    print("|---|---:|---:|---:|---:|")
    for name, tq, td, rmse, nbytes in rows:
        print(f"| {name} | {tq * 1e3:.0f} | {td * 1e3:.0f} | {rmse / w.pow(2).mean().sqrt().item():.4f} | "
              f"{nbytes / w.numel():.4f} |")
    for name, tq, td, *_ in rows[1:]:
        print(f"ember/{name}: quantize time {rows[0][1] / tq:.2f}x, dequantize time {rows[0][2] / td:.2f}x")


def part_behaviour(run: str, method: str) -> None:
    """The quickstart pipeline up to pretraining, then SFT: held-out loss and stop rate before/after."""
    from ember import pipeline
    from ember.sft import train as sft

    steps = [s for s in pipeline.quickstart(run)]
    names = [n for n, _, _ in steps]
    t0 = time.time()
    pipeline.run_steps(pipeline.select(steps, "", "pretrain" if "pretrain" in names else names[-1]))
    print(f"[bench] pipeline up to pretrain: {time.time() - t0:.0f}s")
    cfg = sft.PRESETS["quickstart"]()
    cfg.run, cfg.method = run, method
    t0 = time.time()
    m = sft.main(cfg)
    print(f"[bench] sft quickstart ({method}): {time.time() - t0:.0f}s wall")
    keys = ("method", "steps", "train_conversations", "val_conversations", "trained_tokens", "val_loss_before",
            "val_loss", "stop_rate_before", "stop_rate", "tokens_per_s", "train_seconds")
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    print("| " + " | ".join(str(m.get(k)) for k in keys) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["memory", "nf4", "behaviour"], default="memory")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--libs", default="ember,hf+peft")
    ap.add_argument("--timeout", type=int, default=600, help="seconds allowed per (library, method) process")
    ap.add_argument("--run", default="runs/bench_sft")
    ap.add_argument("--method", default="lora")
    ap.add_argument("--child", nargs=2, metavar=("LIB", "METHOD"))
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], a.child[1], a.steps)))
    elif a.part == "memory":
        part_memory(a.steps, a.libs.split(","), a.timeout)
    elif a.part == "nf4":
        part_nf4(max(a.steps, 1))
    else:
        part_behaviour(a.run, a.method)


if __name__ == "__main__":
    main()
