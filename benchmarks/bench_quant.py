"""Post-training quantization of SmolLM2-135M-Instruct: WikiText-2 perplexity, file size and CPU decode speed.

    python benchmarks/bench_quant.py                 # ~10-15 min on 2 busy CPU cores
    python benchmarks/bench_quant.py --quick         # 4 windows, fewer methods, for a look

The model is the PyPI Q4_1 GGUF (ember.common.paths.smollm2_gguf) de-quantized to fp32: that fp32 model is the
reference ("bf16" is it cast to bf16). Each method runs through ember's own code path: quantize, save with
save_model, reload with ember.model.load.load_model (quantized modules, as eval/serve see them); the size is
the saved model.safetensors. Perplexity: the first --windows windows of --seq_len tokens of WikiText-2 test;
calibration (GPTQ/AWQ): --calib windows of WikiText-2 valid. Decode: greedy tokens/s of one sequence through
ember's engine (the serve path), 1 torch thread. Peer, in the same run: torchao's int8 weight-only
(`quantize_(model, Int8WeightOnlyConfig())`) on the same fp32 model and on its bf16 copy.
"""

from __future__ import annotations

import argparse
import copy
import gc
import tempfile
import time
from pathlib import Path

import torch

from machine import cpu_name

WIKI = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "wikitext2"


def decode_tps(model, tok, n: int) -> float:
    from ember.model.engine import SamplingParams, generate

    prompt = tok.encode("The history of the city begins in the")
    torch.set_num_threads(1)
    generate(model, [prompt], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))  # warm-up
    t = time.perf_counter()
    out = generate(model, [prompt], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))[0]
    dt = time.perf_counter() - t
    return len(out.tokens) / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--windows", type=int, default=16, help="WikiText-2 test windows for perplexity")
    ap.add_argument("--seq_len", type=int, default=512)
    ap.add_argument("--calib", type=int, default=32, help="WikiText-2 valid windows for GPTQ/AWQ")
    ap.add_argument("--decode", type=int, default=48, help="tokens generated for the decode speed")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for perplexity and quantization")
    ap.add_argument("--methods", default="fp32,bf16,int8,w8a8,rtn4-64,gptq-64,gptqa-64,awq-64,rtn4-32,gptq-32,awq-32,torchao-int8,torchao-int8-bf16")
    args = ap.parse_args()
    if args.quick:
        args.windows, args.calib, args.decode, args.methods = 4, 8, 16, "fp32,bf16,int8,rtn4-64,gptq-64,awq-64,torchao-int8"
    if not (WIKI / "test.txt").is_file():
        raise SystemExit(f"skip: {WIKI} is absent (see ../shared/datasets/INVENTORY.md)")

    from ember.common.checkpoint import save_model
    from ember.common.paths import smollm2_gguf
    from ember.compress.calibration import perplexity, text_windows
    from ember.compress.quantize import awq_, gptq_
    from ember.model import quant as Q
    from ember.model.load import load, load_model

    torch.set_num_threads(args.threads)
    base, tok = load(smollm2_gguf())
    base = base.float().eval()
    n_params = sum(p.numel() for p in base.parameters())
    test = text_windows((WIKI / "test.txt").read_text(), tok, args.seq_len)[: args.windows]
    calib = text_windows((WIKI / "valid.txt").read_text(), tok, args.seq_len)[: args.calib]
    print(f"SmolLM2-135M-Instruct (Q4_1 GGUF -> fp32), {n_params / 1e6:.1f} M params | {cpu_name()} | "
          f"torch {torch.__version__}, {args.threads} threads (decode: 1) | perplexity on {len(test)} x "
          f"{args.seq_len} WikiText-2 test tokens, calibration {len(calib)} x {args.seq_len} valid tokens")

    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="bench_quant_"))
    for name in args.methods.split(","):
        t0 = time.perf_counter()
        torch.set_num_threads(args.threads)
        size = None
        if name == "fp32":
            model, size = base, 4 * n_params
        elif name == "bf16":
            model, size = copy.deepcopy(base).to(torch.bfloat16), 2 * n_params
        elif name.startswith("torchao"):
            from torchao.quantization import Int8WeightOnlyConfig, quantize_

            model = copy.deepcopy(base)
            if name.endswith("bf16"):
                model = model.to(torch.bfloat16)
            quantize_(model, Int8WeightOnlyConfig())  # the blocks' nn.Linear (tied head: the fp32 embedding stays)
        else:
            method, _, g = name.partition("-")
            group = int(g or 64)
            model = copy.deepcopy(base)
            with torch.no_grad():
                if method in ("gptq", "gptqa"):  # gptqa: act-order (static groups)
                    gptq_(model, calib, group, act_order=method == "gptqa")
                elif method == "awqgptq":  # AWQ's scales folded in, then GPTQ rounds
                    awq_(model, calib, group, n_grid=10, max_tokens=1024, round_weights=False)
                    gptq_(model, calib, group)
                elif method == "awq":
                    awq_(model, calib, group, n_grid=10, max_tokens=1024)
                linear = method if method in ("int8", "w8a8") else "int4"
                Q.quantize_model_(model, Q.quant_scheme(linear, group, embedding=True, method=method))
            path = save_model(tmp / name, model)
            size = path.stat().st_size
            del model
            model = load_model(path).eval()  # as eval/serve load it: quantized modules
        q_s = time.perf_counter() - t0
        ppl = perplexity(model, test)
        tps = decode_tps(model, tok, args.decode)
        rows.append((name, ppl, size, tps, q_s))
        print(f"  {name:18s} ppl {ppl:8.3f}  size {'' if size is None else f'{size / 1e6:7.1f} MB'}  "
              f"decode {tps:6.1f} tok/s  (quantize+load {q_s:.0f} s)", flush=True)
        if model is not base:
            del model
        gc.collect()

    ref = {r[0]: r for r in rows}
    bf16_ppl = ref["bf16"][1] if "bf16" in ref else float("nan")
    fp32_tps = ref["fp32"][3] if "fp32" in ref else float("nan")
    print("\n| method | WikiText-2 ppl | vs bf16 | size MB | x bf16 size | decode tok/s | x fp32 |")
    print("|---|---|---|---|---|---|---|")
    for name, ppl, size, tps, _ in rows:
        sz = "n/a" if size is None else f"{size / 1e6:.1f}"
        ratio = "n/a" if size is None else f"{size / (2 * n_params):.3f}"
        print(f"| {name} | {ppl:.3f} | {100 * (ppl / bf16_ppl - 1):+.2f}% | {sz} | {ratio} | {tps:.1f} | "
              f"{tps / fp32_tps:.2f} |")


if __name__ == "__main__":
    main()
