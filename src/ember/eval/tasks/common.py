"""What every task shares: the Task record, reading data rows (JSONL, JSON, Parquet, hf:) with errors that name
the record's place, item subsets, few-shot draws."""

from __future__ import annotations

import gzip
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ember.common.errors import UserError
from ember.common.records import read_records
from ember.eval.stats import Statistic, means


@dataclass
class Options:
    """Task settings from the eval Config (one object so task signatures stay short)."""
    seed: int = 0  # few-shot draws and sampling
    max_new_tokens: int = 256  # generation budget per answer
    n_samples: int = 1  # generations per code problem (pass@k needs n >= k)
    ks: tuple[int, ...] = (1,)  # the k of pass@k
    temperature: float = 0.0  # 0 = greedy; code sampling with n > 1 wants ~0.8
    top_p: float = 0.95  # nucleus for sampled generations
    timeout: float = 5.0  # sandbox wall-clock seconds per program
    workers: int = 2  # sandbox programs run at once
    stride: int = 0  # perplexity window stride in tokens (0 = the model's max_len)


@dataclass
class Scored:
    cols: dict[str, np.ndarray]  # per-item values (bootstrap resamples rows)
    stat: Statistic = means  # columns -> metrics
    samples: list[dict] = field(default_factory=list)  # a few worked items for the report
    per_item: list[dict] = field(default_factory=list)  # one dict per item (id + its scores), for contamination splits


@dataclass
class Task:
    name: str
    kind: str  # mc | gen | code | ppl | ref
    path: str  # default data file/folder, relative to the datasets folder
    load: Callable[[Path], list[dict]]  # path -> normalized items (each with an "id")
    run: Callable[..., Scored]  # (lm, items, pool, shots, opts) -> Scored
    text: Callable[[dict], str]  # an item's full text (question + gold answer), for contamination checks
    shots: int = 0  # default few-shot count
    pool_path: str | None = None  # where few-shot examples come from; None = the other items of the same file
    main_metric: str = "acc"


def open_text(path: str | Path):
    path = Path(path)
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def read_rows(spec: str | Path) -> list[tuple[str, dict]]:
    """(place, record) of an eval data source: .jsonl(.gz), .json, .parquet or hf:NAME[[:CONFIG]:SPLIT]
    (common/records.py); place ("file:line", "file:row N", "hf:NAME[split]#i") is what errors name."""
    return list(read_records(str(spec), "eval data", fix="pass the task as name:PATH or set --data_dir"))


def need(row: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise UserError(f"{where}: missing field(s) {missing}; this task expects {list(keys)}")


def subset(items: list[Any], limit: int, seed: int) -> list[Any]:
    """All items, or a seeded random `limit` of them kept in file order (a representative, stable subset)."""
    if limit <= 0 or limit >= len(items):
        return items
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]


def draw_fewshot(pool: list[dict], k: int, rng: random.Random, exclude: Any = None,
                 group_key: str | None = None, group: Any = None, first: bool = False) -> list[dict]:
    """k examples from pool, never the item itself; restricted to pool rows with row[group_key] == group
    when given (MMLU: same subject). first=True takes the first k (MMLU's dev convention), else a random k."""
    cands = [p for p in pool if p.get("id") != exclude and (group_key is None or p.get(group_key) == group)]
    if k <= 0 or not cands:
        return []
    return cands[:k] if first else rng.sample(cands, min(k, len(cands)))
