"""Reference-based generation metrics, written out: BLEU (as sacrebleu's defaults) and ROUGE-1/2/L (as rouge-score).

BLEU is a corpus metric: per-item sufficient statistics (n-gram matches/totals and lengths) are summed
before the geometric mean, so `bleu_stats` gives the per-item row and `corpus_bleu` combines rows (which is
also what the bootstrap resamples). Tokenization is sacrebleu's 13a; smoothing its default "exp" (NIST).
ROUGE uses rouge-score's default tokenizer (lowercase, alphanumeric tokens, no stemming) and F-measure.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np

MAX_ORDER = 4
# sacrebleu TokenizerRegexp (mteval-v13a): punctuation split, period/comma unless next to a digit, dash after digit
_13A = [
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),
]


def tokenize_13a(line: str) -> list[str]:
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    line = f" {line} "
    for pattern, repl in _13A:
        line = pattern.sub(repl, line)
    return line.split()


def _ngrams(tokens: list, n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu_stats(hypothesis: str, reference: str) -> np.ndarray:
    """[hyp_len, ref_len, matches_1..4, totals_1..4] for one segment with one reference."""
    hyp, ref = tokenize_13a(hypothesis), tokenize_13a(reference)
    row = [len(hyp), len(ref)]
    matches, totals = [], []
    for n in range(1, MAX_ORDER + 1):
        h, r = _ngrams(hyp, n), _ngrams(ref, n)
        matches.append(sum(min(c, r[g]) for g, c in h.items()))
        totals.append(max(len(hyp) - n + 1, 0))
    return np.array(row + matches + totals, dtype=np.int64)


def corpus_bleu(stats: np.ndarray) -> float:
    """BLEU in [0, 100] from summed per-segment stats (rows of bleu_stats), sacrebleu's corpus_bleu defaults."""
    s = np.asarray(stats).reshape(-1, 2 + 2 * MAX_ORDER).sum(axis=0)
    sys_len, ref_len = int(s[0]), int(s[1])
    correct, total = s[2:2 + MAX_ORDER], s[2 + MAX_ORDER:]
    if not correct.any():
        return 0.0
    bp = 1.0 if sys_len >= ref_len else (math.exp(1 - ref_len / sys_len) if sys_len > 0 else 0.0)
    log_p, smooth = [], 1.0
    for n in range(MAX_ORDER):
        if total[n] == 0:  # fewer than n+1 tokens in the whole corpus: sacrebleu stops and counts 0 precision
            log_p += [-9999999999.0] * (MAX_ORDER - n)
            break
        if correct[n] == 0:
            smooth *= 2  # "exp" smoothing: 1 / (2^k * total) for the k-th zero-match order
            log_p.append(math.log(100.0 / (smooth * total[n])))
        else:
            log_p.append(math.log(100.0 * correct[n] / total[n]))
    return bp * math.exp(sum(log_p) / MAX_ORDER)


_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def tokenize_rouge(text: str) -> list[str]:
    return [t for t in _NON_ALNUM.sub(" ", text.lower()).split() if t]


def _f1(overlap: int, n_pred: int, n_ref: int) -> float:
    if n_pred == 0 or n_ref == 0:
        return 0.0
    p, r = overlap / n_pred, overlap / n_ref
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1, ROUGE-2 and ROUGE-L F-measures in [0, 1] of one prediction against one reference."""
    pred, ref = tokenize_rouge(prediction), tokenize_rouge(reference)
    out = {}
    for n in (1, 2):
        p, r = _ngrams(pred, n), _ngrams(ref, n)
        out[f"rouge{n}"] = _f1(sum((p & r).values()), sum(p.values()), sum(r.values()))
    out["rougeL"] = _f1(_lcs(ref, pred), len(pred), len(ref)) if pred and ref else 0.0
    return out
