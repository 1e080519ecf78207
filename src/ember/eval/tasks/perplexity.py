"""Perplexity and bits-per-byte on held-out text.

Texts: records with "text" (JSONL(.gz), JSON, or a dataset as hf:NAME[[:CONFIG]:SPLIT]), Parquet document
shards (a file or a folder of docs_*.parquet), or a .txt(.gz) file. Every text is cut at paragraph (else
line) boundaries into items of ~4,000 characters, so a --limit and the bootstrap see comparable units however
long the documents are. Each item is scored in windows of the model's context (scoring.rolling_windows),
every token predicted once.
perplexity = exp(sum nll / tokens); bits_per_byte = sum nll / ln 2 / UTF-8 bytes, which is comparable
across tokenizers. The bootstrap resamples these ~4,000-character items, not whole documents: pieces of one
long document are correlated, so with few long documents the intervals come out narrower than they should.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ember.common.errors import UserError
from ember.eval.scoring import EvalLM, loglikelihood, rolling_windows
from ember.eval.tasks.common import Options, Scored, Task, open_text, read_rows

CHUNK_CHARS = 4000


def chunks(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """Cut text into pieces of about `size` characters, after a blank line where possible, else after a
    line; lossless: "".join(chunks(t)) == t."""
    out, cur, n, blank_at = [], [], 0, 0  # blank_at: lines of cur up to the last blank line
    for line in text.splitlines(keepends=True):
        while cur and n + len(line) > size:  # at most twice: after the last blank line, then after any line
            cut = blank_at or len(cur)
            out.append("".join(cur[:cut]))
            cur = cur[cut:]
            n, blank_at = sum(map(len, cur)), 0
        cur.append(line)
        n += len(line)
        if not line.strip():
            blank_at = len(cur)
    if cur:
        out.append("".join(cur))
    return out


def _items(texts: list[str], ids: list[str] | None = None) -> list[dict]:
    ids = ids or [str(i) for i in range(len(texts))]
    return [{"id": f"{i}#{k}" if k else i, "text": c} for i, t in zip(ids, texts) for k, c in enumerate(chunks(t))
            if c.strip()]


def load(path: Path) -> list[dict]:
    spec = str(path)  # an hf: spec is a name, not a path
    path = Path(path)
    name = path.name.removesuffix(".gz")
    if spec.startswith("hf:") or name.endswith((".jsonl", ".json")):  # records (file rows or a dataset's), each a text
        texts = []
        for where, row in read_rows(spec):
            if not isinstance(row.get("text"), str):
                raise UserError(f"{where}: a perplexity record needs a string field 'text'")
            texts.append(row["text"])
    elif path.is_dir() or name.endswith(".parquet"):
        from ember.data.documents import read_shards
        texts = [d["text"] for d in read_shards(path)]
    elif path.is_file():
        with open_text(path) as f:
            texts = [f.read()]
    else:
        raise UserError(f"held-out text {path} not found; pass ppl:PATH (.txt, .jsonl, .json, .parquet, a docs folder) "
                        f"or ppl:hf:NAME")
    return _items(texts)


def heldout_split(run: str | Path) -> tuple[Path, float] | None:
    """(documents folder, val_fraction) of the run's tokenize stage: its val documents were never trained on."""
    from ember.common import artifacts

    meta = artifacts.read_meta(Path(run) / "tokenize")
    if not meta or meta.get("status") != "finished" or "docs" not in meta.get("inputs", {}):
        return None
    frac = float(meta["config"].get("val_fraction", 0.0))
    return (Path(meta["inputs"]["docs"]["path"]), frac) if frac > 0 else None


def load_heldout(docs: Path, val_fraction: float) -> list[dict]:
    """The val documents of a tokenize run: same id-hash rule as `ember tokenize`."""
    from ember.data.documents import read_shards
    from ember.data.tokenize import is_val

    held = [d for d in read_shards(docs) if is_val(d["id"], val_fraction)]
    return _items([d["text"] for d in held], [d["id"] for d in held])


def _stat(cols):
    nll, tok, byt = cols["nll"].sum(), cols["tokens"].sum(), cols["bytes"].sum()
    return {"perplexity": math.exp(nll / max(tok, 1)), "bits_per_byte": nll / math.log(2) / max(byt, 1),
            "nll_per_token": nll / max(tok, 1)}


def run(lm: EvalLM, items: list[dict], pool: list[dict], shots: int, opts: Options) -> Scored:
    reqs, owner = [], []
    for j, it in enumerate(items):
        ids = lm.prefix + lm.tokenizer.encode(it["text"])
        for s, a, b in rolling_windows(len(ids), lm.max_len, opts.stride):
            reqs.append((ids[s:a], ids[a:b]))
            owner.append(j)
    nll = np.zeros(len(items))
    tokens = np.zeros(len(items))
    for (lp, _), j, (_, cont) in zip(loglikelihood(lm, reqs), owner, reqs):
        nll[j] -= lp
        tokens[j] += len(cont)
    nbytes = np.array([len(it["text"].encode("utf-8")) for it in items], dtype=float)
    per_item = [{"id": it["id"], "nll": float(n), "tokens": int(t)} for it, n, t in zip(items, nll, tokens)]
    return Scored({"nll": nll, "tokens": tokens, "bytes": nbytes}, _stat, per_item=per_item)


TASK = Task("ppl", "ppl", "tinystories/tinystories_validation_head_moe-routing-bench.txt", load, run,
            lambda it: it["text"], main_metric="bits_per_byte")
