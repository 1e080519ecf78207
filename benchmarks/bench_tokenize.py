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
Methods run in rounds (each once per round, `--repeat` rounds) and the best (least disturbed) wall time is
reported, as timeit does, with the CPU seconds of that run (all threads of this process): on a shared machine wall time suffers from other jobs' load, while
MB per CPU-second measures the work itself; the wall-time speedup of threads needs idle cores to show.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from machine import cpu_name

from ember.common.paths import datasets_dir

GPT2_DIR = datasets_dir() / "gpt2_tokenizer"  # $EMBER_DATASETS, else ../shared/datasets
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
    from ember.tokenizer.special import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        corpus.main(corpus.Config(run=str(run), max_docs=args.max_docs))
        tok_train.main(tok_train.Config(run=str(run), vocab_size=4096, reference=""))
        artifacts.FORCE.set(True)  # each timed `ember tokenize` reruns although its config is unchanged

        texts = [d["text"] for d in read_shards(run / "corpus")]
        mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
        tok_file = run / "tokenizer" / "tokenizer.json"
        methods: list[tuple[str, object, object]] = []  # (name, timed fn, fn -> number of text tokens)

        def stage(workers: int, engine: str):
            cfg = tokenize.Config(run=str(run), val_fraction=0.0, workers=workers, engine=engine)
            label = "tiktoken" if engine == "auto" else engine

            def count() -> int:  # tokens written minus one EOS per document
                m = artifacts.read_meta(run / "tokenize")["metrics"]
                assert m["engine"] == label, f"expected engine {label}, the stage used {m['engine']}"
                return m["train_tokens"] - len(texts)
            methods.append((f"ember tokenize, {workers} thread{'s' if workers > 1 else ''}, {label}",
                            lambda: tokenize.main(cfg), count))

        stage(args.workers, "auto")
        stage(1, "auto")
        stage(args.workers, "tokenizers")
        mirror = load_tokenizer(tok_file).tiktoken()
        loop = lambda enc: lambda: [enc(t) for t in texts]
        methods.append(("tiktoken loop, ember vocab (1 thread)", loop(mirror.encode_ordinary), None))
        hf = HFTokenizer.from_file(str(tok_file))
        methods.append(("tokenizers loop, ember vocab (1 process)", loop(lambda t: hf.encode(t).ids), None))
        if (GPT2_DIR / "gpt2_vocab.json").is_file():
            enc, ref = tiktoken_gpt2(GPT2_DIR), tok_train.gpt2_reference(GPT2_DIR)
            sample = texts[:50]
            assert [enc.encode_ordinary(t) for t in sample] == [ref.encode(t).ids for t in sample], "GPT-2 mismatch"
            methods.append(("tiktoken GPT-2 loop (1 thread)", loop(enc.encode_ordinary), None))
            methods.append((f"tiktoken GPT-2 batch ({args.workers} threads)",
                            lambda: enc.encode_ordinary_batch(texts, num_threads=args.workers), None))
            methods.append(("tokenizers loop, GPT-2 vocab (1 process)", loop(lambda t: ref.encode(t).ids), None))
        else:
            print(f"(GPT-2 files not found in {GPT2_DIR}: tiktoken rows skipped)")

        # rounds: every method once per round, so drifting load from other jobs hits all of them alike
        timings = {name: [] for name, _, _ in methods}
        tokens = {}
        for _ in range(args.repeat):
            for name, fn, count in methods:
                w0, c0 = time.perf_counter(), time.process_time()
                out = fn()
                timings[name].append((time.perf_counter() - w0, time.process_time() - c0))
                tokens[name] = count() if count else sum(len(x) for x in out)
        results = [(name, min(timings[name]), tokens[name]) for name, _, _ in methods]

    base = results[0][1][0]
    print(f"\n{len(texts)} stdlib documents, {mb:.2f} MB | {cpu_name()}, {os.cpu_count()} cores | "
          f"best of {args.repeat} | load avg {os.getloadavg()[0]:.1f}")
    print(f"| {'method':<44} | {'MB/s':>6} | {'wall s':>6} | {'CPU s':>6} | {'MB/CPU-s':>8} | {'bytes/token':>11} "
          f"| {'speed vs ember':>14} |")
    print("|" + "|".join(["---"] + ["---:"] * 6) + "|")
    for name, (wall, cpu), n in results:
        print(f"| {name:<44} | {mb / wall:>6.2f} | {wall:>6.2f} | {cpu:>6.2f} | {mb / cpu:>8.2f} | {mb * 1e6 / n:>11.3f} "
              f"| {base / wall:>13.2f}x |")


if __name__ == "__main__":
    main()
