"""Tokenization throughput (MB/s of UTF-8 text) of `ember tokenize` vs a plain `tokenizers` loop vs tiktoken.

    python benchmarks/bench_tokenize.py                  # the whole stdlib corpus (~12 MB), ~2-3 min on 2 cores
    python benchmarks/bench_tokenize.py --max_docs=200 --repeat=1

All methods encode the same texts: the stdlib corpus as `ember corpus` collects it. ember's tokenizer is
trained first (vocab 4096, the quickstart preset); that time is not measured.
  ember tokenize              the stage end to end: read Parquet, encode on N threads, write .bin shards;
                              engine auto (= tiktoken mirror of ember's vocab) and engine=tokenizers
  tiktoken loop, ember vocab  the engine `ember tokenize` uses, without the stage's reading and writing
  tokenizers loop             `Tokenizer.from_file(ember's tokenizer.json).encode(text)` per document, 1 process
  tiktoken GPT-2              tiktoken's Rust BPE with GPT-2's vocab (built from the local GPT-2 files, since
                              tiktoken cannot download them here): encode_ordinary per document, 1 thread,
                              and encode_ordinary_batch on N threads
  tokenizers GPT-2 loop       HF tokenizers with the same GPT-2 files, to separate vocabulary from engine
Each method runs `--repeat` times; the best (least disturbed) time is reported, as timeit does.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

GPT2_DIR = Path(__file__).resolve().parents[1] / "../shared/datasets/gpt2_tokenizer"
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""  # tiktoken r50k_base


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (openai/gpt-2 encoder.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tiktoken_gpt2(folder: Path):
    """tiktoken's GPT-2 Encoding from gpt2_vocab.json: ranks = ids (the vocab is in merge order)."""
    import tiktoken

    decoder = {c: b for b, c in bytes_to_unicode().items()}
    vocab = json.loads((folder / "gpt2_vocab.json").read_text())
    ranks = {bytes(decoder[c] for c in tok): i for tok, i in vocab.items() if tok != "<|endoftext|>"}
    return tiktoken.Encoding("gpt2-local", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": vocab["<|endoftext|>"]})


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max_docs", type=int, default=0, help="stdlib documents to use (0 = all)")
    ap.add_argument("--workers", type=int, default=2, help="threads for ember tokenize and tiktoken's batch encode")
    ap.add_argument("--repeat", type=int, default=3, help="runs per method; the best time is reported")
    args = ap.parse_args()

    from tokenizers import Tokenizer as HFTokenizer

    from ember.common import artifacts
    from ember.data import corpus, tokenize
    from ember.data.documents import read_shards
    from ember.tokenizer import train as tok_train

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        corpus.main(corpus.Config(run=str(run), max_docs=args.max_docs))
        tok_train.main(tok_train.Config(run=str(run), vocab_size=4096, reference=""))
        artifacts.FORCE.set(True)  # each timed `ember tokenize` reruns although its config is unchanged

        texts = [d["text"] for d in read_shards(run / "corpus")]
        mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
        tok_file = run / "tokenizer" / "tokenizer.json"
        results: list[tuple[str, float, int]] = []  # (method, seconds, tokens)

        def stage(workers: int, engine: str) -> None:
            cfg = tokenize.Config(run=str(run), val_fraction=0.0, workers=workers, engine=engine)
            s = best_of(lambda: tokenize.main(cfg), args.repeat)
            m = artifacts.read_meta(run / "tokenize")["metrics"]
            name = f"ember tokenize, {workers} thread{'s' if workers > 1 else ''}, {m['engine']}"
            results.append((name, s, m["train_tokens"] - len(texts)))  # minus one EOS per document

        stage(args.workers, "auto")
        stage(1, "auto")
        stage(args.workers, "tokenizers")

        from ember.tokenizer.special import load_tokenizer

        mirror = load_tokenizer(tok_file).tiktoken()
        results.append(("tiktoken loop, ember vocab (1 thread)",
                        best_of(lambda: [mirror.encode_ordinary(t) for t in texts], args.repeat),
                        sum(len(mirror.encode_ordinary(t)) for t in texts)))
        hf = HFTokenizer.from_file(str(tok_file))
        n = sum(len(hf.encode(t).ids) for t in texts)
        results.append(("tokenizers loop, ember vocab (1 process)",
                        best_of(lambda: [hf.encode(t).ids for t in texts], args.repeat), n))

        if (GPT2_DIR / "gpt2_vocab.json").is_file():
            enc = tiktoken_gpt2(GPT2_DIR)
            ref = tok_train.gpt2_reference(GPT2_DIR)
            sample = texts[:50]
            assert [enc.encode_ordinary(t) for t in sample] == [ref.encode(t).ids for t in sample], "GPT-2 mismatch"
            n = sum(len(enc.encode_ordinary(t)) for t in texts)
            results.append(("tiktoken GPT-2 loop (1 thread)",
                            best_of(lambda: [enc.encode_ordinary(t) for t in texts], args.repeat), n))
            results.append((f"tiktoken GPT-2 batch ({args.workers} threads)",
                            best_of(lambda: enc.encode_ordinary_batch(texts, num_threads=args.workers), args.repeat), n))
            results.append(("tokenizers loop, GPT-2 vocab (1 process)",
                             best_of(lambda: [ref.encode(t).ids for t in texts], args.repeat),
                             sum(len(ref.encode(t).ids) for t in texts)))
        else:
            print(f"(GPT-2 files not found in {GPT2_DIR}: tiktoken rows skipped)")

    base = results[0][1]
    print(f"\n{len(texts)} stdlib documents, {mb:.2f} MB | {cpu_model()}, {os.cpu_count()} cores | "
          f"best of {args.repeat} | load avg {os.getloadavg()[0]:.1f}")
    print(f"{'method':<46} {'MB/s':>7} {'bytes/token':>12} {'time s':>8} {'speed vs ember':>15}")
    for name, s, n in results:
        print(f"{name:<46} {mb / s:>7.2f} {mb * 1e6 / n:>12.3f} {s:>8.2f} {base / s:>14.2f}x")


if __name__ == "__main__":
    main()
