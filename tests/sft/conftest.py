"""Fixtures for the SFT tests: a small BPE tokenizer trained on the stdlib instruction set (seconds) and a
tiny random GPT; `run_folder` writes them where `ember sft` looks (<run>/tokenizer, <run>/pretrain/final)."""

from __future__ import annotations

import json

import pytest
import torch

from ember.model.gpt import GPTConfig, build_model
from ember.sft.data import stdlib_conversations

MAX_FILES = 60  # stdlib files parsed for the fixtures: a few hundred conversations in about a second


@pytest.fixture(scope="session")
def convs():
    return stdlib_conversations(max_examples=400, seed=0, max_files=MAX_FILES)


@pytest.fixture(scope="session")
def chat_file(convs, tmp_path_factory):
    """The fixture conversations as a {"messages": ...} JSONL file (saves re-parsing the stdlib per run)."""
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    return path


@pytest.fixture(scope="session")
def tok(convs):
    from ember.tokenizer.train import train_tokenizer

    texts = [m["content"] for c in convs for m in c]
    return train_tokenizer(texts, vocab_size=512)


def tiny_config(vocab_size: int, max_seq_len: int = 128) -> GPTConfig:
    return GPTConfig(vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=1, n_embd=64, max_seq_len=max_seq_len)


@pytest.fixture(scope="session")
def tiny_model(tok):
    torch.manual_seed(0)
    return build_model(tiny_config(tok.vocab_size)).eval()


@pytest.fixture
def run_folder(tmp_path, tok, tiny_model):
    """<run>/tokenizer/tokenizer.json + <run>/pretrain/final/ holding the tiny model."""
    from ember.common.checkpoint import save_model

    run = tmp_path / "run"
    (run / "tokenizer").mkdir(parents=True)
    tok.hf.save(str(run / "tokenizer" / "tokenizer.json"))
    save_model(run / "pretrain" / "final", tiny_model)
    return run
