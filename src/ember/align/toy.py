"""A toy run folder for the alignment tests and benchmarks: seconds to build, no pipeline needed.

A BPE tokenizer trained on stdlib code and arithmetic, and a 2-layer GPT fine-tuned for a few hundred steps
on chat-formatted addition, written where the stages look (<run>/tokenizer/tokenizer.json,
<run>/sft/final/). The model answers some held-out problems right, so RL has signal and room to improve.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from ember.align.data import arithmetic_tasks, stdlib_pairs

TASKS = dict(max_operand=19, word_problems=False, operations="+")  # the problem family the toy model learns


def sft_arithmetic(model, tok, steps: int, seed: int = 0, batch_size: int = 32, lr: float = 3e-3) -> None:
    """Next-token loss on the assistant tokens of chat-formatted TASKS problems."""
    from ember.tokenizer.chat import render_chat

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


def make_toy_run(run: str | Path, sft_steps: int = 300, n_layer: int = 2, n_embd: int = 64, seed: int = 0):
    """Write the toy tokenizer and model into `run`; returns the tokenizer."""
    from ember.common.checkpoint import save_model
    from ember.model.gpt import GPTConfig, build_model
    from ember.tokenizer.train import train_tokenizer

    run = Path(run)
    texts = [p["prompt"] + "\n" + p["chosen"] for p in stdlib_pairs(400, seed=7)]
    texts += [t["prompt"] + " " + t["answer"] for t in arithmetic_tasks(500, seed=7)]
    tok = train_tokenizer(texts, vocab_size=512)
    tok.save(run / "tokenizer")
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=tok.vocab_size, n_layer=n_layer, n_head=2, n_kv_head=2, n_embd=n_embd, max_seq_len=256)
    model = build_model(config, "cpu")
    sft_arithmetic(model, tok, steps=sft_steps, seed=seed)
    save_model(run / "sft" / "final", model)
    return tok
