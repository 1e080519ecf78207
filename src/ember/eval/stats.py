"""Statistics for eval scores: percentile-bootstrap confidence intervals and the unbiased pass@k estimator.

Every score ember reports carries a 95% interval from resampling the evaluated items with replacement
(Efron & Tibshirani 1993), so two checkpoints whose intervals overlap are not called different.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

Columns = dict[str, np.ndarray]  # per-item values, one array of length n per name
Statistic = Callable[[Columns], dict[str, float]]  # resampled columns -> metric name -> value


def means(cols: Columns) -> dict[str, float]:
    return {k: float(np.mean(v)) if len(v) else float("nan") for k, v in cols.items()}


def bootstrap(cols: Columns, stat: Statistic = means, n_boot: int = 1000, seed: int = 0,
              alpha: float = 0.05) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
    """Point estimates stat(cols) and percentile intervals over n_boot resamples of the items (rows).

    The same row indices are drawn for every column, so ratio metrics (ppl = exp(sum nll / sum tokens))
    and corpus metrics (BLEU from summed n-gram counts) resample whole items, not their parts."""
    point = stat(cols)
    n = len(next(iter(cols.values()))) if cols else 0
    if n == 0 or n_boot <= 0:
        return point, {k: (float("nan"), float("nan")) for k in point}
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {k: [] for k in point}
    for _ in range(n_boot):
        idx = rng.integers(0, n, size=n)
        for k, v in stat({c: a[idx] for c, a in cols.items()}).items():
            draws[k].append(v)
    lo, hi = 100 * alpha / 2, 100 * (1 - alpha / 2)
    ci = {k: (float(np.nanpercentile(v, lo)), float(np.nanpercentile(v, hi))) for k, v in draws.items()}
    return point, ci


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k samples passes) given c of n passed: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021).

    Computed as a product to stay exact for large n; unbiased, unlike 1 - (1 - c/n)^k."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))
