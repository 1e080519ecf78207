"""Token fixtures in the tokenize stage's format (flat .bin + meta.json), written here, and tiny recipe configs."""

from pathlib import Path

import numpy as np
import pytest

from ember.common import artifacts
from ember.model.gpt import GPTConfig
from ember.pretrain import train

VOCAB, EOS = 64, 1  # ids 0 and 2 never occur in counting_docs: tests use them as markers


def write_tokens(folder: Path, splits: dict[str, np.ndarray], vocab_size: int = VOCAB) -> Path:
    """<folder>/{split}_00000.bin (uint16) + meta.json, as `ember tokenize` writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"dtype": "uint16", "vocab_size": vocab_size, "eos_id": EOS, "tokenizer_sha256": "fixture", "splits": {}}
    for split, toks in splits.items():
        name = f"{split}_00000.bin"
        (folder / name).write_bytes(np.asarray(toks, dtype=np.uint16).tobytes())
        meta["splits"][split] = {"shards": [{"file": name, "tokens": len(toks), "documents": 1, "bytes": len(toks)}]}
    artifacts.write_json(folder / "meta.json", meta)
    return folder


def counting_docs(n_tokens: int, seed: int) -> np.ndarray:
    """Documents that count upward mod the vocabulary from a random start (ids 3..63), each ended by EOS:
    learnable in a few steps, so losses fall visibly."""
    rng = np.random.default_rng(seed)
    out = []
    while sum(len(d) for d in out) < n_tokens:
        start, length = rng.integers(3, VOCAB), rng.integers(8, 40)
        out.append(np.append(3 + (start - 3 + np.arange(length)) % (VOCAB - 3), EOS))
    return np.concatenate(out)[:n_tokens]


@pytest.fixture(scope="session")
def tokens(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokens")
    return write_tokens(folder, {"train": counting_docs(40_000, 0), "val": counting_docs(4_000, 1)})


def tiny_config(run: Path, data: Path, **kw) -> train.Config:
    """2 layers x 32 wide on 4 x 32-token batches: a step takes milliseconds."""
    base = dict(run=str(run), data=str(data), seed=0, dtype="fp32", steps=10, batch_size=4, seq_len=32, lr=1e-2,
                warmup_steps=2, eval_every=5, eval_batches=2, save_every=0, log_every=5, sample_every=0,
                model=GPTConfig(vocab_size=0, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, max_seq_len=32))
    base.update(kw)
    return train.Config(**base)
