"""Contamination: word n-gram overlap between eval items and the training data recorded in a run's lineage.

    sources = training_sources(artifacts.lineage(stage_dir))       # curated docs + SFT/preference files
    report = overlap({"hellaswag": [(id, text), ...]}, iter_texts(sources), n=13)

An item is "dirty" when any of its word n-grams (lowercased, alphanumeric words) occurs in a training
document — GPT-3's definition (Brown et al. 2020, app. C) with its n = 13; an item shorter than n words
counts as one n-gram of its full length when it has at least MIN_WORDS words (shorter ones would match
common phrases and are reported as unchecked). Items' n-grams go into one hash table, the training text streams
past it once, so memory follows the eval sets, not the corpus.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Iterator

_WORD = re.compile(r"[a-z0-9]+")
MIN_WORDS = 8  # shortest item (in words) checked as a whole
DOC_STAGES = ("curate", "corpus")  # stages whose docs_*.parquet are the pretraining text (curate wins if present)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngram_hashes(text: str, n: int, whole_if_short: bool = False) -> set[int]:
    w = words(text)
    if len(w) < n:
        return {hash(tuple(w))} if (whole_if_short and len(w) >= MIN_WORDS) else set()
    return {hash(tuple(w[i:i + n])) for i in range(len(w) - n + 1)}


def training_sources(metas: list[dict]) -> list[Path]:
    """The training text of a lineage: docs_*.parquet of the curate stage (else corpus), plus JSONL/Parquet
    files other stages consumed directly (SFT conversations, preference pairs, RL prompts)."""
    by_stage = {m.get("stage"): m for m in metas}
    out: list[Path] = []
    for stage in DOC_STAGES:
        if stage in by_stage:
            out += sorted(Path(by_stage[stage]["dir"]).glob("docs_*.parquet"))
            break
    for m in metas:
        if m.get("stage") in DOC_STAGES or m.get("stage") == "eval":
            continue
        for inp in m.get("inputs", {}).values():
            p = Path(inp["path"])
            if p.is_file() and p.name.endswith((".jsonl", ".jsonl.gz", ".parquet", ".json")):
                out.append(p)
    return out


def _strings(obj) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def iter_texts(paths: Iterable[Path], val_fraction: float = 0.0) -> Iterator[str]:
    """Every training text: Parquet documents' `text` (minus the tokenize stage's val split, which is held
    out from training), and all string fields of JSON/JSONL records."""
    from ember.data.documents import read_shard
    from ember.data.tokenize import is_val
    from ember.eval.tasks.common import open_text

    for p in paths:
        if p.name.endswith(".parquet"):
            for d in read_shard(p):
                if not (val_fraction and is_val(d["id"], val_fraction)):
                    yield d["text"]
        elif p.name.endswith(".json"):
            yield " \n".join(_strings(json.loads(p.read_text(encoding="utf-8"))))
        else:
            with open_text(p) as f:
                for line in f:
                    if line.strip():
                        try:
                            yield " \n".join(_strings(json.loads(line)))
                        except json.JSONDecodeError:
                            continue


def overlap(eval_sets: dict[str, list[tuple[str, str]]], texts: Iterable[str], n: int = 13) -> dict[str, dict]:
    """eval_sets: task -> [(item id, item text)]. Returns task -> {"items", "dirty", "dirty_frac", "unchecked",
    "dirty_ids", "n"}."""
    index: dict[int, list[tuple[str, str]]] = {}  # n-gram hash -> [(task, item id)]
    for task, items in eval_sets.items():
        for item_id, text in items:
            for h in ngram_hashes(text, n, whole_if_short=True):
                index.setdefault(h, []).append((task, item_id))
    short = {len(words(t)) for items in eval_sets.values() for _, t in items if MIN_WORDS <= len(words(t)) < n}
    dirty: set[tuple[str, str]] = set()
    for text in texts:
        w = words(text)
        for k in {n, *short}:  # short items are matched as whole word sequences of their own length
            for i in range(len(w) - k + 1):
                hit = index.get(hash(tuple(w[i:i + k])))
                if hit:
                    dirty.update(hit)
    out = {}
    for task, items in eval_sets.items():
        ids = sorted({i for t, i in dirty if t == task})
        unchecked = sum(len(words(t)) < min(n, MIN_WORDS) for _, t in items)
        out[task] = {"items": len(items), "dirty": len(ids), "dirty_frac": len(ids) / max(len(items), 1),
                     "unchecked": unchecked, "dirty_ids": ids, "n": n}
    return out
