"""Serving speed: ember's engine vs transformers' `generate`, and `ember serve` under concurrent HTTP streams.

    python benchmarks/bench_serve.py                     # ~2-4 min on 2 cores
    python benchmarks/bench_serve.py --threads=2 --new_tokens=64 --concurrency=1,4,16

1. Decode tokens/s at batch 1: the same weights in ember's Engine (KV-cache slots, greedy) and, exported with
   model/hf.py's export_hf, in transformers' LlamaForCausalLM.generate (greedy, its default dynamic KV cache),
   both forced to generate exactly --new_tokens tokens after the same prompt, same torch thread count; the
   decode rate excludes the prefill (time of a 1-token run subtracted); runs interleaved, best of 5. Models: stories260K (real, 0.26M
   params, when ../shared/datasets has it) and a random d256 x 4-layer GPT (~6M params with its 8k vocabulary).
2. Aggregate tokens/s of `ember serve` (a second process on 127.0.0.1, n_slots=16) at 1, 4 and 16 concurrent
   SSE streams from this process: each stream runs requests of --new_tokens tokens (ignore_eos) back to back;
   total completion tokens / wall time, and the median time to first token. Bounded: --requests per stream,
   a per-request timeout, and the server is killed at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import timeit
from pathlib import Path

import torch

from ember.model.gpt import GPTConfig, build_model
from ember.model.engine import Engine, SamplingParams


def models():
    from ember.model.llama2c import load_llama2c, stories260k_paths

    out = {}
    paths = stories260k_paths()
    if paths:
        out["stories260K"] = (load_llama2c(paths[0]), str(paths[0]), str(paths[1]))
    torch.manual_seed(0)
    out["random d256 L4"] = (build_model(GPTConfig(vocab_size=8192, n_layer=4, n_head=4, n_kv_head=4, n_embd=256,
                                                   max_seq_len=1024), "cpu").eval(), None, None)
    return out


def best_of(fn, repeat: int) -> float:
    return min(timeit.repeat(fn, number=1, repeat=repeat))  # seconds of the fastest run


def decode_rate(model, prompt: list[int], n: int, repeat: int, hf_dir: Path) -> tuple[float, float]:
    """(ember tok/s, transformers tok/s) for n greedy tokens after `prompt`, prefill excluded. The four timed
    runs (each side with n and with 1 new token) are interleaved and each keeps its fastest of `repeat`, so a
    change in the machine's load hits both sides alike."""
    import transformers

    from ember.model.hf import export_hf

    engine = Engine(model, None, n_slots=1)
    ours = lambda k: engine.generate([prompt], SamplingParams(max_tokens=k, temperature=0, ignore_eos=True))
    export_hf(model, hf_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    x = torch.tensor([prompt])
    theirs = lambda k: hf.generate(x, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        assert theirs(n)[0, len(prompt):].tolist() == ours(n)[0].tokens, "ember and transformers disagree"
        runs = [(ours, n), (ours, 1), (theirs, n), (theirs, 1)]
        best = [float("inf")] * 4
        for _ in range(repeat):
            for i, (fn, k) in enumerate(runs):
                best[i] = min(best[i], best_of(lambda: fn(k), 1))
    return (n - 1) / (best[0] - best[1]), (n - 1) / (best[2] - best[3])


# ---------------------------------------------------------------------------- HTTP load

def stream_once(host: str, port: int, n: int, timeout: float) -> tuple[int, float]:
    """One streaming completion; (completion tokens, seconds to the first text)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": n, "stream": True, "ignore_eos": True,
                       "temperature": 0.8, "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    ttft, tokens = None, 0
    for line in resp:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        obj = json.loads(line[6:])
        if ttft is None and obj.get("choices") and obj["choices"][0]["text"]:
            ttft = time.perf_counter() - t0
        if obj.get("usage"):
            tokens = obj["usage"]["completion_tokens"]
    conn.close()
    return tokens, ttft  # None: no text came (counted as missing, not as 0 ms)


def load(port: int, concurrency: int, requests: int, n: int) -> tuple[float, float]:
    """(aggregate completion tok/s, median time to first token) with `concurrency` parallel streams."""
    results, lock = [], threading.Lock()

    def worker():
        for _ in range(requests):
            r = stream_once("127.0.0.1", port, n, timeout=120)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    wall = time.perf_counter() - t0
    ttfts = [r[1] for r in results if r[1] is not None]
    return sum(r[0] for r in results) / wall, statistics.median(ttfts) if ttfts else float("nan")


def start_server(args: list[str], threads: int):
    proc = subprocess.Popen([sys.executable, "-m", "ember.serve.server", "--port=0", "--n_slots=16",
                             "--max_queue=64", "--log_level=warning", f"--threads={threads}", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        if m:
            return proc, int(m.group(1))
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError("server did not start")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads in both processes")
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests", type=int, default=2, help="requests per stream")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.new_tokens} new tokens, prompt 16 tokens")

    ms = models()
    print("\n| model | ember tok/s | transformers tok/s | ember / transformers |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (model, *_rest) in ms.items():
            prompt = [(7 * i + 3) % model.config.vocab_size for i in range(16)]
            e, h = decode_rate(model, prompt, args.new_tokens, args.repeat, Path(tmp) / name.replace(" ", "_"))
            print(f"| {name} | {e:.0f} | {h:.0f} | {e / h:.2f}x |", flush=True)

        # ember alone: no peer HTTP server (vLLM, llama.cpp's) is installed on this machine to run beside it
        print("\n| model (ember serve only, no peer) | streams | aggregate tok/s | median TTFT ms |\n|---|---|---|---|")
        for name, (model, bin_path, tok_path) in ms.items():
            if bin_path is None:  # the random model: an ember checkpoint + a small trained tokenizer
                from ember.common.checkpoint import save_model
                from ember.tokenizer.train import save, train_tokenizer

                ck = Path(tmp) / "ckpt"
                tok = train_tokenizer([Path(torch.__file__).read_text()] * 2, 1000)
                save(tok, Path(tmp) / "tok")
                # the same shape with the tokenizer's vocabulary: ids past it would decode to no text, and
                # the first streamed text (TTFT) would wait for a random id under 1000
                torch.manual_seed(0)
                save_model(ck, build_model(dataclasses.replace(model.config, vocab_size=tok.vocab_size), "cpu"))
                server_args = [f"--checkpoint={ck}", f"--tokenizer={Path(tmp) / 'tok' / 'tokenizer.json'}"]
            else:
                server_args = [f"--checkpoint={bin_path}", f"--tokenizer={tok_path}"]
            proc, port = start_server(server_args, args.threads)
            try:
                stream_once("127.0.0.1", port, 4, 60)  # warm-up
                for c in (int(x) for x in args.concurrency.split(",")):
                    rate, ttft = load(port, c, args.requests, args.new_tokens)
                    print(f"| {name} | {c} | {rate:.0f} | {ttft * 1000:.0f} |", flush=True)
            finally:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()


if __name__ == "__main__":
    main()
