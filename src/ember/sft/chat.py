"""`ember chat`: talk to a fine-tuned checkpoint in the terminal, one user message per line.

    ember chat                                        # <run>/sft/final
    echo "Suggest a name for a function that sorts a list." | ember chat --temperature=0
    ember chat --model=runs/demo/sft/final --system="You are terse."
    ember chat --model=SmolLM2-135M-Instruct.Q4_1.gguf        # any format model/load.py reads

Each line read from stdin is a user turn; the reply is generated with the model's own chat template (its
tokenizer's: ember's, ChatML, Llama 3's ...) until one of its stop tokens (end of turn, EOS).
`/reset` forgets the conversation, `/quit` (or end of input) exits. Works the same when stdin is a pipe,
so it can be scripted and tested; the `you>` prompt is shown only on a terminal.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ember.common.config import require
from ember.common.log import print0


@dataclass
class Config:
    run: str = "runs/default"  # run folder; the model defaults to <run>/sft/final (nothing is written)
    model: str = ""  # ember checkpoint, HF folder, .gguf or llama2.c .bin; empty = <run>/sft/final
    tokenizer: str = ""  # tokenizer.json, folder or tok*.bin; empty = the model's own (beside it, else <run>/tokenizer)
    system: str = ""  # system message that opens every conversation; empty = none
    max_new_tokens: int = 256  # reply length cap in tokens
    temperature: float = 0.7  # softmax temperature; 0 = greedy (deterministic)
    top_k: int = 50  # sample among the k most likely tokens; 0 = all
    seed: int = 0  # sampling seed
    device: str = "auto"  # cpu, cuda, mps; auto = the best available

    def __post_init__(self):
        require(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "an int >= 1")
        require(self.temperature >= 0, "temperature", self.temperature, "a float >= 0 (0 = greedy)")
        require(self.top_k >= 0, "top_k", self.top_k, "an int >= 0 (0 = no cut)")


def fit_history(tok, messages: list[dict], room: int) -> list[int]:
    """Prompt ids for the conversation, dropping the oldest exchanges (never the system message nor the
    latest user turn) until it leaves `room` tokens of the context for the reply."""
    from ember.tokenizer.chat import render_chat

    msgs = list(messages)
    while True:
        ids, _ = render_chat(tok, msgs, add_generation_prompt=True)
        first = 1 if msgs[0]["role"] == "system" else 0
        if len(ids) <= room:
            return ids
        if len(msgs) - first <= 1:  # one over-long user turn: keep the frame (BOS, system, role tokens) and the
            return _cut_last_turn(tok, msgs, ids, room)  # end of its text
        del msgs[first:first + 2]  # one user turn and its reply


def _cut_last_turn(tok, msgs: list[dict], ids: list[int], room: int) -> list[int]:
    """ids with the last message's text cut from the left to fit room; what surrounds the text (found by
    rendering the same conversation with that text empty) is kept whole."""
    from ember.tokenizer.chat import render_chat

    frame, _ = render_chat(tok, msgs[:-1] + [{**msgs[-1], "content": ""}], add_generation_prompt=True)
    head = next((i for i, (a, b) in enumerate(zip(frame, ids)) if a != b), len(frame))
    tail = len(frame) - head  # the text sits between frame[:head] and frame[head:]
    keep = room - len(frame)
    if keep < 1:  # not even the frame fits: the end, as a last resort
        return ids[-room:]
    return ids[:head] + ids[head:len(ids) - tail][-keep:] + ids[len(ids) - tail:]


def reply(model, tok, messages: list[dict], cfg: Config, gen: torch.Generator) -> str:
    from ember.model.engine import SamplingParams, generate

    limit = model.config.max_seq_len
    max_new = min(cfg.max_new_tokens, limit // 2)
    ids = fit_history(tok, messages, limit - max_new)
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=gen))  # each reply's seed from the session's generator
    stops = tuple(tok.stop_ids)  # the end-of-turn token, EOS and generation_config's extra ids
    out = generate(model, [ids], SamplingParams(max_tokens=max_new, temperature=cfg.temperature, top_k=cfg.top_k,
                                                seed=seed), stop_ids=stops)[0].tokens
    return tok.decode(out[:-1] if out and out[-1] in stops else out).strip()


def main(cfg: Config, stdin=None, stdout=None) -> dict:
    from ember.common.dist import pick_device
    from ember.model.load import load

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    model_dir = Path(cfg.model or Path(cfg.run) / "sft" / "final")
    # the tokenizer the model came with: beside it (sft saves final/tokenizer.json), in its run, or in cfg.run's
    model, tok = load(model_dir, device=pick_device(cfg.device), tokenizer=cfg.tokenizer, run=cfg.run)
    gen = torch.Generator().manual_seed(cfg.seed)
    tty = hasattr(stdin, "isatty") and stdin.isatty()
    start = [{"role": "system", "content": cfg.system}] if cfg.system else []
    messages, turns = list(start), 0
    if tty:
        print0(f"[chat] {model_dir} — type a message; /reset starts over, /quit exits")
    while True:
        if tty:
            stdout.write("you> ")
            stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == "/quit":
            break
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            messages = list(start)
            continue
        messages.append({"role": "user", "content": text})
        answer = reply(model, tok, messages, cfg, gen)
        messages.append({"role": "assistant", "content": answer})
        turns += 1
        stdout.write(f"{answer}\n" if not tty else f"bot> {answer}\n")
        stdout.flush()
    return {"turns": turns}


if __name__ == "__main__":
    from ember.cli import module_main

    module_main(__name__)
