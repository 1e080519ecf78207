"""A tiny run folder shared by the alignment tests: a BPE tokenizer and a 2-layer GPT fine-tuned for a few
seconds on chat-formatted arithmetic (so it answers some held-out problems right and RL has room to help),
written where the stages look: <run>/tokenizer/tokenizer.json and <run>/sft/final/."""

from __future__ import annotations

import contextlib
import random
import shutil
from pathlib import Path

import pytest
import torch

from ember.align.data import arithmetic_tasks, stdlib_pairs
from ember.tokenizer.chat import render_chat

TASKS = dict(max_operand=19, word_problems=False, operations="+")


def sft_arithmetic(model, tok, steps: int, seed: int = 0, batch_size: int = 32, lr: float = 3e-3) -> None:
    """Next-token loss on the assistant tokens of chat-formatted arithmetic tasks."""
    rng = random.Random(seed)
    tasks = arithmetic_tasks(4000, seed=1000 + seed, **TASKS)
    convs = [render_chat(tok, [{"role": "user", "content": t["prompt"]}, {"role": "assistant", "content": t["answer"]}])
             for t in tasks]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        rows = rng.sample(convs, batch_size)
        L = max(len(ids) for ids, _ in rows)
        idx = torch.full((batch_size, L), tok.pad_id)
        tgt = torch.full((batch_size, L), -100)
        for i, (ids, mask) in enumerate(rows):
            idx[i, :len(ids)] = torch.tensor(ids)
            tgt[i, :len(ids) - 1] = torch.tensor([t if m else -100 for t, m in zip(ids[1:], mask[1:])])
        loss = model(idx, tgt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@contextlib.contextmanager
def one_thread():
    """Tiny models run faster on one thread than on two (less sync per op); the old setting comes back."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture
def arith() -> dict:
    """The arithmetic settings (grpo.Config fields) of the fixture model's training tasks."""
    return dict(TASKS)


@pytest.fixture(scope="session")
def base_run(tmp_path_factory):
    """(run folder, tokenizer) with <run>/tokenizer and <run>/sft/final; copy it before writing into it."""
    from ember.common.checkpoint import save_model
    from ember.model.gpt import GPTConfig, build_model
    from ember.tokenizer.train import train_tokenizer

    run = tmp_path_factory.mktemp("align_base")
    texts = [p["prompt"] + "\n" + p["chosen"] for p in stdlib_pairs(400, seed=7)]
    texts += [t["prompt"] + " " + t["answer"] for t in arithmetic_tasks(500, seed=7)]
    tok = train_tokenizer(texts, vocab_size=512)
    (run / "tokenizer").mkdir()
    tok.hf.save(str(run / "tokenizer" / "tokenizer.json"))
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=64, max_seq_len=256)
    model = build_model(config, "cpu")
    with one_thread():
        sft_arithmetic(model, tok, steps=300)
    save_model(run / "sft" / "final", model)
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
