"""Shared fixtures for eval tests: a byte tokenizer and a fixed-logit bigram model with known log-probs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ember.eval.scoring import EvalLM

DATASETS = Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets"
ASSETS = Path(__file__).resolve().parents[1] / "assets" / "eval"


class ByteTokenizer:
    """ids 0..255 = bytes, 256 = BOS, 257 = EOS."""
    bos_id, eos_id, vocab_size = 256, 257, 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class Bigram:
    """Logits depend only on the current token: logits[b, t] = table[idx[b, t]]. Log-probs are known by hand."""

    def __init__(self, table: torch.Tensor):
        self.table = table  # (V, V) logits
        self.calls = 0
        self.longest = 0  # the longest input seen: windowing tests check it stays within max_len

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.longest = max(self.longest, idx.shape[1])
        return self.table[idx]  # (B, T, V)

    def logp(self, prev: int, nxt: int) -> float:
        return float(torch.log_softmax(self.table[prev].double(), -1)[nxt])


@pytest.fixture
def bigram():
    g = torch.Generator().manual_seed(0)
    return Bigram(torch.randn(258, 258, generator=g) * 2)


@pytest.fixture
def lm(bigram):
    return EvalLM(fn=bigram, tokenizer=ByteTokenizer(), max_len=64, batch_size=4)


def datasets_or_skip(*parts: str) -> Path:
    p = DATASETS.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} not present (the shared datasets folder is absent)")
    return p


def close(a: float, b: float, tol: float = 1e-4) -> bool:
    return math.isclose(a, b, rel_tol=tol, abs_tol=tol)
