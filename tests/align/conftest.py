"""Fixtures of the alignment tests: the toy run folder of ember.align.toy (a BPE tokenizer and a 2-layer GPT
fine-tuned for a few seconds on chat-formatted addition, so RL has signal and room to improve), a reward
model trained on it once per session, and the path to the shared real data."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import pytest
import torch

from ember.align.toy import TASKS, make_toy_run


@contextlib.contextmanager
def one_thread():
    """Tiny models run faster on one thread than on two (less sync per op); the old setting comes back."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture
def arith() -> dict:
    """The arithmetic settings (grpo.Config fields) of the fixture model's training tasks."""
    return dict(TASKS)


@pytest.fixture(scope="session")
def base_run(tmp_path_factory):
    """(run folder, tokenizer) with <run>/tokenizer and <run>/sft/final; copy it before writing into it."""
    run = tmp_path_factory.mktemp("align_base")
    with one_thread():
        tok = make_toy_run(run, sft_steps=300)
    return run, tok


@pytest.fixture
def run_dir(base_run, tmp_path):
    """A fresh copy of the base run folder for one test."""
    run = tmp_path / "run"
    shutil.copytree(base_run[0], run)
    return run


SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "datasets"  # ../shared/datasets from the repo root


@pytest.fixture
def shared_file():
    """shared_file(rel) -> a file of the shared real-data folder; skips the test when this machine lacks it."""
    def get(rel: str) -> Path:
        path = SHARED / rel
        if not path.is_file():
            pytest.skip(f"{path} not present (real data lives in ../shared/datasets)")
        return path
    return get


@pytest.fixture(scope="session")
def reward_run(base_run, tmp_path_factory):
    """(run folder, metrics) after `ember reward` on 400 synthetic stdlib pairs; PPO tests reuse its model."""
    from ember.align import reward

    run = tmp_path_factory.mktemp("align_reward") / "run"
    shutil.copytree(base_run[0], run)
    with one_thread():
        metrics = reward.main(reward.Config(run=str(run), n_pairs=400, steps=60, batch_size=16, lr=1e-3, max_len=128,
                                            max_prompt_len=96, eval_every=0, device="cpu"))
    return run, metrics
