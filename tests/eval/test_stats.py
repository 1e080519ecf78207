"""pass@k against brute-force enumeration; bootstrap intervals behave as intervals should."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from ember.eval.stats import bootstrap, pass_at_k


@pytest.mark.parametrize("n,c,k", [(5, 0, 1), (5, 2, 1), (5, 2, 2), (6, 3, 4), (4, 4, 2), (7, 1, 7)])
def test_pass_at_k_equals_enumeration(n, c, k):
    outcomes = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    brute = sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)
    assert pass_at_k(n, c, k) == pytest.approx(brute)


def test_pass_at_k_formula_and_limits():
    assert pass_at_k(200, 10, 1) == pytest.approx(10 / 200)
    assert pass_at_k(200, 10, 100) == pytest.approx(1 - math.comb(190, 100) / math.comb(200, 100))
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 5)


def test_bootstrap_interval_brackets_the_mean_and_is_seeded():
    rng = np.random.default_rng(0)
    x = (rng.random(400) < 0.3).astype(float)
    point, ci = bootstrap({"acc": x}, n_boot=500, seed=1)
    lo, hi = ci["acc"]
    assert lo < point["acc"] < hi
    se = math.sqrt(point["acc"] * (1 - point["acc"]) / len(x))  # normal approximation of the 95% half-width
    assert (hi - lo) / 2 == pytest.approx(1.96 * se, rel=0.2)
    assert bootstrap({"acc": x}, n_boot=500, seed=1) == (point, ci)


def test_bootstrap_resamples_rows_together():
    # ratio statistic: if rows were resampled independently per column, sum(a)/sum(b) would drift off 2
    a = np.arange(1, 51, dtype=float)
    point, ci = bootstrap({"a": 2 * a, "b": a}, lambda c: {"r": c["a"].sum() / c["b"].sum()}, n_boot=200)
    assert point["r"] == 2 and ci["r"] == (2, 2)
