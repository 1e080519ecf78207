"""A tiny run folder shared by the alignment tests: a BPE tokenizer and a 2-layer GPT fine-tuned for a few
seconds on chat-formatted arithmetic (so it answers some held-out problems right and RL has room to help),
written where the stages look: <run>/tokenizer/tokenizer.json and <run>/sft/final/."""

from __future__ import annotations

import random
import shutil

import pytest
import torch

from ember.align.data import arithmetic_tasks, stdlib_pairs
from ember.tokenizer.chat import render_chat

import os
TASKS = dict(max_operand=int(os.environ.get("MO", 19)), word_problems=False, operations="+")


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
    sft_arithmetic(model, tok, steps=150)
    save_model(run / "sft" / "final", model)
    return run, tok


@pytest.fixture
def run_dir(base_run, tmp_path):
    """A fresh copy of the base run folder for one test."""
    run = tmp_path / "run"
    shutil.copytree(base_run[0], run)
    return run
