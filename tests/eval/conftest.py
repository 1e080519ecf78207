"""Shared fixtures for eval tests: a byte tokenizer and a fixed-logit bigram model with known log-probs, which
generation reaches through FixedLogitModel (the GPT interface the engine decodes with)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ember.model.gpt import GPTConfig

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


class _Prefix(torch.nn.Module):
    """The one 'block' of FixedLogitModel: the engine's KV cache stores each row's token ids (as keys), so the
    block reads back every row's whole prefix and returns fn(prefix)'s last scores, (B, T, V) broadcast over T."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, cos, sin, mask, is_causal, cache):
        k = x[:, None]  # (B, 1, T, 2): the ids, as the engine's 1 kv head of dim 2
        keys, _ = cache.update(0, k, k)  # (B, 1, end, 2), every position this row's cache holds so far
        ids = keys[:, 0, :, 0].long()  # (B, end)
        if is_causal:  # prefill of one fresh slot: the keys are exactly the prompt
            prefixes = [ids[0]]
        else:  # decode: mask (B, 1, 1, end) marks each row's own positions
            prefixes = [row[m] for row, m in zip(ids, mask[:, 0, 0])]
        last = torch.stack([self.fn(p[None])[0, -1].float() for p in prefixes])  # (B, V)
        return last[:, None].expand(-1, x.shape[1], -1), None


class FixedLogitModel(torch.nn.Module):
    """A scoring callable fn(idx (B, T)) -> (B, T, V) with the minimal GPT interface the generation engine uses
    (config, tok_emb, layers, norm, head): the engine's own decode loop drives test models whose outputs are
    known by hand. Each decode step re-runs fn on the row's prefix (fine for tiny fixed models)."""

    def __init__(self, fn, vocab_size: int = 258, max_len: int = 64):
        super().__init__()
        self.config = GPTConfig(vocab_size=vocab_size, max_seq_len=max_len, n_layer=1, n_head=1, n_kv_head=1, n_embd=2)
        self.tok_emb = torch.nn.Embedding(vocab_size, 2)
        with torch.no_grad():  # embedding of id i = (i, i): ids up to 2^24 are exact in fp32
            self.tok_emb.weight.copy_(torch.arange(vocab_size, dtype=torch.float)[:, None].expand(-1, 2))
        self.layers = torch.nn.ModuleList([_Prefix(fn)])
        self.norm = torch.nn.Identity()

    def head(self, x):
        return x


def fixed_lm(fn, max_len: int = 64, **kw) -> EvalLM:
    """An EvalLM over fn that can also generate (through FixedLogitModel)."""
    return EvalLM(fn=fn, tokenizer=ByteTokenizer(), max_len=max_len, model=FixedLogitModel(fn, max_len=max_len), **kw)


@pytest.fixture
def bigram():
    g = torch.Generator().manual_seed(0)
    return Bigram(torch.randn(258, 258, generator=g) * 2)


@pytest.fixture
def lm(bigram):
    return fixed_lm(bigram, 64, batch_size=4)


def datasets_or_skip(*parts: str) -> Path:
    p = DATASETS.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} not present (the shared datasets folder is absent)")
    return p


def close(a: float, b: float, tol: float = 1e-4) -> bool:
    return math.isclose(a, b, rel_tol=tol, abs_tol=tol)
