"""Fixtures for the tokenizer tests: a small BPE tokenizer trained on a stdlib sample (about a second),
saved the way `ember tokenizer` saves it (tokenizer.json + tokenizer_config.json)."""

from __future__ import annotations

import pytest

from ember.data.sources import iter_documents
from ember.tokenizer.special import load_tokenizer
from ember.tokenizer.train import save, train_tokenizer


@pytest.fixture(scope="session")
def stdlib_docs():
    return [d for d, _ in zip(iter_documents("stdlib"), range(80))]


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory, stdlib_docs):
    folder = tmp_path_factory.mktemp("tokenizer")
    save(train_tokenizer([d["text"] for d in stdlib_docs], vocab_size=512), folder)
    return folder


@pytest.fixture(scope="session")
def tok(tok_dir):
    return load_tokenizer(tok_dir)
