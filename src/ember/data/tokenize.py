"""`ember tokenize`: encode documents into flat token shards `<run>/tokenize/tokens/{train,val}_NNNNN.bin`.

    ember tokenize                                   # <run>/curate (or <run>/corpus with no curate), <run>/tokenizer
    ember tokenize --workers=8 --val_fraction=0.01
    ember tokenize --tokenizer=SmolLM2-135M-Instruct.Q4_1.gguf   # continued pretraining of an open model

--tokenizer takes ember's tokenizer, an HF model folder or tokenizer.json, a .gguf file (its metadata) or a
llama2.c tok*.bin. A shard is a raw little-endian array of uint16 token ids (uint32 when the vocabulary
exceeds 65536), no header, as in nanoGPT: `np.memmap(path, dtype, mode="r")` reads it. Each document is
followed by the tokenizer's EOS (and preceded by its BOS when the model adds one: loader.document_frame);
text never encodes to a special id (see tokenizer/special.py), so EOS positions are the document boundaries.
Encoding runs in tiktoken's BPE engine when the tokenizer can be mirrored there with the same ids
(checked on a sample first; several times faster than `tokenizers`), else in `tokenizers`.
A document goes to val when the hash of its id falls below val_fraction: deterministic, independent of
order and of the other documents. `tokens/meta.json` records dtype, tokenizer hash and counts.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal

import numpy as np

from ember.common import artifacts
from ember.common.config import require
from ember.common.errors import UserError
from ember.common.log import Progress, print0
from ember.data.documents import read_shards
from ember.data.loader import document_frame, vocab_sha256
from ember.model.load import load_tokenizer_any

CHUNK_BYTES = 1 << 20  # text per task given to a thread: amortizes per-task overhead, keeps memory bounded
CHECK_BYTES = 128 << 10  # text encoded by both engines before tiktoken is trusted with the rest


@dataclass
class Config:
    run: str = "runs/default"  # run folder; this stage writes <run>/tokenize/
    docs: str = ""  # document shards; empty = <run>/curate, or <run>/corpus if the run has no curate stage
    tokenizer: str = ""  # tokenizer.json or its folder (an HF model's), a .gguf, a tok*.bin; empty = <run>/tokenizer
    val_fraction: float = 0.05  # share of documents (by id hash) in the val split; keep equal to the tokenizer's
    workers: int = 0  # encoding threads (the engines release the GIL); 0 = one per core
    engine: Literal["auto", "tiktoken", "tokenizers"] = "auto"  # BPE engine; auto = tiktoken when it gives the same ids
    shard_tokens: int = 1 << 27  # start a new .bin shard after ~this many tokens (134M = 256 MiB of uint16)

    def __post_init__(self):
        require(0.0 <= self.val_fraction < 1.0, "val_fraction", self.val_fraction, "a fraction in [0, 1)")
        require(self.workers >= 0, "workers", self.workers, "0 (one per core) or a thread count")
        require(self.shard_tokens > 0, "shard_tokens", self.shard_tokens, "a positive token count")


PRESETS = {
    "quickstart": lambda: Config(),
    "smoke": lambda: Config(),
}


def is_val(doc_id: str, fraction: float) -> bool:
    """True for about `fraction` of ids: the first 64 bits of sha256(id) as a number in [0, 1)."""
    h = int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big")
    return h < fraction * 2**64


def docs_input(docs: str, run: str) -> Path:
    """The documents a stage reads: the configured path, else <run>/curate, else (no curate stage in this
    run) <run>/corpus. A curate folder that did not finish is an error, not a silent fall back to documents
    that were never cleaned, PII-scrubbed or deduplicated."""
    if docs:
        return Path(docs)
    curate = Path(run) / "curate"
    if not curate.exists():
        return Path(run) / "corpus"
    if not artifacts.is_finished(curate):
        status = (artifacts.read_meta(curate) or {}).get("status", "no meta.json")
        raise UserError(f"{curate} did not finish (status: {status}): rerun `ember curate --run={run}`, or pass "
                        f"--docs=<folder> to read other documents")
    return curate


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


# ---------------------------------------------------------------------------- encoding

def flatten(ids: list[list[int]], eos_id: int, dtype, prefix: list[int] = ()) -> np.ndarray:
    """Encoded documents -> one flat array: [prefix] doc0 EOS [prefix] doc1 EOS ... (prefix: BOS or nothing)"""
    out = np.empty(sum(len(x) for x in ids) + len(ids) * (len(prefix) + 1), dtype=dtype)
    o = 0
    for x in ids:
        out[o:o + len(prefix)] = prefix
        o += len(prefix)
        out[o:o + len(x)] = x
        o += len(x)
        out[o] = eos_id
        o += 1
    return out


def batch_encoder(tok, engine: str) -> Callable[[list[str]], list[list[int]]]:
    if engine == "tiktoken":
        enc = tok.tiktoken()
        return lambda texts: [enc.encode_ordinary(t) for t in texts]
    return tok.encode_batch


def chunks(docs: Iterator[dict], val_fraction: float) -> Iterator[tuple[str, list[str]]]:
    """(split, texts) groups of about CHUNK_BYTES, in document order within each split."""
    buf = {"train": [], "val": []}
    size = {"train": 0, "val": 0}
    for d in docs:
        if not d["text"]:
            continue
        split = "val" if is_val(d["id"], val_fraction) else "train"
        buf[split].append(d["text"])
        size[split] += len(d["text"])
        if size[split] >= CHUNK_BYTES:
            yield split, buf[split]
            buf[split], size[split] = [], 0
    for split in ("train", "val"):
        if buf[split]:
            yield split, buf[split]


def pick_engine(tok, wanted: str, sample: list[str]) -> str:
    """"tiktoken" when asked or allowed (auto) and its ids equal the tokenizer's on the sample, else "tokenizers"."""
    if wanted == "tokenizers":
        return "tokenizers"
    enc = tok.tiktoken()
    same = enc is not None and [enc.encode_ordinary(t) for t in sample] == tok.encode_batch(sample)
    if not same and wanted == "tiktoken":
        why = ("tiktoken is not installed or the tokenizer is not ember's byte-level BPE" if enc is None
               else "its ids differ from the tokenizer's on the first documents")
        raise UserError(f"engine=tiktoken: {why}; use engine=tokenizers (or auto)")
    if not same and enc is not None:
        print0("[tokenize] tiktoken's ids differ from the tokenizer's on the first documents: using tokenizers")
    return "tiktoken" if same else "tokenizers"


def encode_chunks(items: Iterator[tuple[str, list[str]]], tok, engine: str, workers: int):
    """(split, texts, tokens) in input order, chunks encoded on `workers` threads with 2 each in flight.

    Threads, not processes: both engines run in Rust with the GIL released (tiktoken's encode_ordinary,
    tokenizers' encode_batch), so threads use every core without a process start or pickling.
    """
    encode, dtype = batch_encoder(tok, engine), token_dtype(tok.vocab_size)
    prefix, eos = document_frame(tok)
    with ThreadPoolExecutor(workers) as pool:
        pending: collections.deque = collections.deque()
        for split, texts in items:
            pending.append((split, texts, pool.submit(lambda t: flatten(encode(t), eos, dtype, prefix), texts)))
            if len(pending) >= 2 * workers:
                s, t, f = pending.popleft()
                yield s, t, f.result()
        while pending:
            s, t, f = pending.popleft()
            yield s, t, f.result()


# ---------------------------------------------------------------------------- shards

class ShardWriter:
    """Appends token arrays to <split>_00000.bin, <split>_00001.bin, ...; a shard ends after the first EOS
    at or past shard_tokens, so no document straddles two shards."""

    def __init__(self, folder: Path, split: str, dtype, shard_tokens: int, eos_id: int):
        self.folder, self.split, self.dtype = folder, split, dtype
        self.shard_tokens, self.eos_id = shard_tokens, eos_id
        self.shards: list[dict] = []
        self.file, self.tmp = None, None

    def add(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self.file is None:
                name = f"{self.split}_{len(self.shards):05d}.bin"
                self.tmp = self.folder / f".{name}.tmp"  # hidden until complete (artifacts ignore dot files)
                self.file = open(self.tmp, "wb")
                self.shards.append({"file": name, "tokens": 0, "documents": 0})
            cur = self.shards[-1]
            full_at = max(0, self.shard_tokens - cur["tokens"] - 1)  # index where the shard reaches its size
            ends = np.flatnonzero(tokens[full_at:] == self.eos_id)
            cut = full_at + int(ends[0]) + 1 if len(ends) else len(tokens)  # just after the next EOS
            piece, tokens = tokens[:cut], tokens[cut:]
            self.file.write(piece.astype(self.dtype, copy=False).tobytes())
            cur["tokens"] += len(piece)
            cur["documents"] += int(np.count_nonzero(piece == self.eos_id))
            if cur["tokens"] >= self.shard_tokens:
                self.close()

    def close(self) -> None:
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.folder / self.shards[-1]["file"])
            self.file = None

    def summary(self) -> dict:
        return {"shards": self.shards, **{k: sum(s[k] for s in self.shards) for k in ("tokens", "documents")}}


def main(cfg: Config) -> dict:
    docs_dir = docs_input(cfg.docs, cfg.run)
    tok_path = Path(cfg.tokenizer or Path(cfg.run) / "tokenizer")
    if (tok_path / "tokenizer.json").is_file():  # a folder: hash its tokenizer.json, not an HF model's weights
        tok_path = tok_path / "tokenizer.json"
    run = artifacts.begin("tokenize", cfg, inputs={"docs": docs_dir, "tokenizer": tok_path})
    if run.cached:
        return run.metrics
    tok = load_tokenizer_any(tok_path)
    prefix, eos = document_frame(tok)
    dtype = token_dtype(tok.vocab_size)
    out = run.dir / "tokens"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.bin"):  # a resumed (unfinished) folder may hold shards of an interrupted run
        old.unlink()
    writers = {s: ShardWriter(out, s, dtype, cfg.shard_tokens, eos) for s in ("train", "val")}
    n_bytes = {"train": 0, "val": 0}
    workers = cfg.workers or os.cpu_count() or 1

    t0 = time.time()
    docs = read_shards(docs_dir)
    head, size = [], 0
    for d in docs:  # the first documents, for the engine check
        head.append(d)
        size += len(d["text"])
        if size >= CHECK_BYTES:
            break
    engine = pick_engine(tok, cfg.engine, [d["text"] for d in head])
    docs = itertools.chain(head, docs)
    with Progress(None, "tokenize", unit="doc") as bar:
        for split, texts, tokens in encode_chunks(chunks(docs, cfg.val_fraction), tok, engine, workers):
            writers[split].add(tokens)
            n_bytes[split] += sum(len(t.encode("utf-8")) for t in texts)
            bar.update(len(texts))
    for w in writers.values():
        w.close()
    seconds = time.time() - t0
    splits = {s: {**w.summary(), "bytes": n_bytes[s]} for s, w in writers.items()}
    if splits["train"]["documents"] == 0:
        raise UserError(f"tokenize: no training documents in {docs_dir} (all empty, or val_fraction="
                        f"{cfg.val_fraction} took them all); add documents or lower val_fraction")
    if cfg.val_fraction > 0 and splits["val"]["documents"] == 0:
        raise UserError(f"tokenize: no document of {docs_dir} hashed into the val split "
                        f"({splits['train']['documents']} documents, val_fraction={cfg.val_fraction}); "
                        f"raise val_fraction or add documents")
    meta = {
        "dtype": np.dtype(dtype).name, "vocab_size": tok.vocab_size, "eos_id": eos, "bos_id": tok.bos_id,
        "bos_per_document": bool(prefix),
        # the model's tokenizer is checked against these before training on the shards (loader.check_tokenizer)
        "tokenizer": str(tok_path), "tokenizer_sha256": tok.sha256, "tokenizer_vocab_sha256": vocab_sha256(tok),
        "doc_boundaries": f"every document ends with eos_id ({tok.id_to_token(eos)})"
                          + (f" and starts with bos_id ({tok.id_to_token(tok.bos_id)})" if prefix else "")
                          + "; text never encodes to a special id",
        "val_fraction": cfg.val_fraction, "splits": splits,
    }
    artifacts.write_json(out / "meta.json", meta)
    total_bytes = splits["train"]["bytes"] + splits["val"]["bytes"]
    total_tokens = splits["train"]["tokens"] + splits["val"]["tokens"]
    metrics = {
        **{f"{s}_{k}": splits[s][k] for s in splits for k in ("tokens", "documents")},
        "bytes": total_bytes, "dtype": meta["dtype"], "engine": engine, "workers": workers,
        "seconds": round(seconds, 2),
        "mb_per_s": round(total_bytes / 1e6 / max(seconds, 1e-9), 2),
        "bytes_per_token": round(total_bytes / max(total_tokens - (1 + len(prefix)) * sum(splits[s]["documents"]
                                                                                  for s in splits), 1), 4),
    }
    print0(f"[tokenize] {metrics['train_tokens']:,} train + {metrics['val_tokens']:,} val tokens "
           f"({metrics['train_documents']} + {metrics['val_documents']} docs, {meta['dtype']}) in {seconds:.1f}s "
           f"= {metrics['mb_per_s']} MB/s on {workers} thread(s) ({engine}) -> {out}")
    return run.finish(metrics)


if __name__ == "__main__":
    from ember.cli import module_main

    module_main(__name__)
