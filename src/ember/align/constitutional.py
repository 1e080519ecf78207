"""`ember constitution`: constitutional AI (Bai et al. 2022) — the model improves its own data from principles.

    ember constitution                                   # <run>/sft/final, the built-in principles and prompts
    ember constitution --principles=my.json --prompts=../shared/datasets/redteam/malicious_instruct.txt

SL-CAI: for each prompt the model answers, then `revisions` times critiques its last answer against a
sampled principle and rewrites it; the final revision becomes SFT data (`sft.jsonl`, {"messages"}).
RLAIF: the model answers each prompt twice and, asked a principle's choice question, labels which answer
is better by comparing the probability it gives to "A" and "B" — with the answers in both orders, so a
position bias cancels — giving `preferences.jsonl` ({"prompt","chosen","rejected"}) for `ember reward`
/ `ember dpo --data=...`. `trace.jsonl` keeps every intermediate text. Principles file: JSON with
"principles": [{"name","critique","revision","choice"}] and optional "prompts" (default: constitution.json).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ember.align.data import read_jsonl
from ember.align.rollout import begin_stage, decode_response, encode_prompt, generate, keep_end, load_lm, prompt_budget, stop_ids
from ember.common.config import require
from ember.common.dist import pick_device
from ember.common.errors import UserError
from ember.common.jsonl import write_jsonl
from ember.common.log import print0

DEFAULT_PRINCIPLES = Path(__file__).with_name("constitution.json")
KEYS = ("name", "critique", "revision", "choice")


@dataclass
class Config:
    run: str = "runs/default"  # run folder; this stage writes <run>/constitution/
    model: str = ""  # the model that answers, critiques, revises and judges; empty = <run>/sft/final
    tokenizer: str = ""  # tokenizer.json; empty = <run>/tokenizer/tokenizer.json
    principles: str = ""  # constitution JSON file; empty = the built-in align/constitution.json
    prompts: str = ""  # JSONL with "prompt" fields or a .txt with one prompt per line; empty = the constitution's prompts
    n_prompts: int = 0  # use at most this many prompts (0 = all)
    revisions: int = 1  # critique -> revision rounds per prompt (a new principle sampled each round)
    max_prompt_len: int = 384  # tokens of context kept for each generation (critique turns grow the chat)
    max_new_tokens: int = 64  # tokens per answer, critique or revision
    temperature: float = 0.7  # sampling temperature (the two RLAIF answers must differ)
    top_k: int = 50  # sample among the top_k tokens only (0 = all)
    pairs: bool = True  # also write RLAIF preference pairs
    seed: int = 0  # principle choice and sampling
    device: str = "auto"  # cpu, cuda, mps or auto
    template: str = "chat"  # critique/revision are chat turns, so only chat models make sense here

    def __post_init__(self):
        require(self.template == "chat", "template", self.template, "chat (constitutional AI converses with the model)")
        require(self.n_prompts >= 0 and self.revisions >= 0, "n_prompts/revisions", (self.n_prompts, self.revisions),
                "ints >= 0")
        require(self.max_new_tokens >= 1 and self.max_prompt_len >= 8, "max_new_tokens/max_prompt_len",
                (self.max_new_tokens, self.max_prompt_len), "max_new_tokens >= 1, max_prompt_len >= 8")
        require(self.temperature > 0, "temperature", self.temperature, "a float > 0 (sampled answers must differ)")


PRESETS = {
    "quickstart": lambda: Config(n_prompts=12, revisions=1, max_new_tokens=48),
    "smoke": lambda: Config(n_prompts=4, revisions=1, max_new_tokens=8),
}


def load_constitution(path: str | Path) -> dict:
    """{"principles": [...], "prompts": [...]} from a JSON file, checked."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"principles file {path} not found; pass --principles=<a JSON file> or leave it empty") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"principles file {path} is not valid JSON ({e})") from None
    principles = doc.get("principles") if isinstance(doc, dict) else None
    if not isinstance(principles, list) or not principles:
        raise UserError(f"{path}: needs a non-empty \"principles\" list of {{{', '.join(KEYS)}}} objects")
    for i, p in enumerate(principles):
        if not isinstance(p, dict) or not all(isinstance(p.get(k), str) and p[k].strip() for k in KEYS):
            raise UserError(f"{path}: principle {i} must have non-empty string fields {', '.join(KEYS)}")
    prompts = doc.get("prompts", [])
    if not isinstance(prompts, list) or not all(isinstance(x, str) for x in prompts):
        raise UserError(f"{path}: \"prompts\" must be a list of strings")
    return {"principles": principles, "prompts": prompts}


def load_prompt_file(path: str | Path) -> list:
    path = Path(path)
    if path.suffix == ".txt":
        if not path.is_file():
            raise UserError(f"prompts file {path} not found")
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    prompts = []
    for i, rec in read_jsonl(path):
        if "prompt" not in rec:
            raise UserError(f"{path}:{i}: each record needs a \"prompt\" field")
        prompts.append(rec["prompt"])
    return prompts


def as_messages(prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


class Sampler:
    """Chat in, assistant text out, for many conversations at once (batched KV-cache sampling)."""

    def __init__(self, model, tok, cfg: Config, generator: torch.Generator):
        self.model, self.tok, self.cfg, self.gen = model, tok, cfg, generator
        self.keep = prompt_budget(model, cfg.max_prompt_len, cfg.max_new_tokens)  # growing chats keep their end

    def __call__(self, chats: list[list[dict]]) -> list[str]:
        ids = [keep_end(encode_prompt(self.tok, c, "chat"), self.keep) for c in chats]
        out = generate(self.model, ids, self.cfg.max_new_tokens, stop_ids(self.tok, "chat"), self.cfg.temperature,
                       self.cfg.top_k, generator=self.gen)
        return [decode_response(self.tok, r, "chat").strip() for r in out]


def choice_question(prompt, principle: dict, first: str, second: str) -> list[dict]:
    """The RLAIF feedback query (CAI paper, sec. 4.1): the conversation, a principle's question, two options."""
    convo = "\n".join(f"{m['role'].upper()}: {m['content']}" for m in as_messages(prompt))
    text = (f"Consider this conversation:\n{convo}\n\n{principle['choice']}\n"
            f"(A) {first}\n(B) {second}\nAnswer with A or B.")
    return [{"role": "user", "content": text}]


@torch.no_grad()
def preference_score(model, tok, prompt, principle: dict, a: str, b: str, max_len: int) -> float:
    """log-odds that `a` beats `b` under the principle: [log p(A) - log p(B)] with a first, plus
    [log p(B) - log p(A)] with b first, each from the first token of the model's reply. A judge that
    always says "A" whatever the answers scores 0; swapping a and b negates the score."""
    id_a, id_b = tok.encode("A")[0], tok.encode("B")[0]
    device = next(model.parameters()).device
    rows = [encode_prompt(tok, choice_question(prompt, principle, x, y), "chat")[-max_len:] for x, y in ((a, b), (b, a))]
    scores = []
    for ids in rows:
        logp = model(torch.tensor([ids], device=device))[0, -1].float().log_softmax(-1)
        scores.append((logp[id_a] - logp[id_b]).item())
    return scores[0] - scores[1]


def main(cfg: Config) -> dict:

    principles_path = cfg.principles or str(DEFAULT_PRINCIPLES)
    run, paths = begin_stage("constitution", cfg, principles=principles_path,
                             **({"prompts": cfg.prompts} if cfg.prompts else {}))
    if run.cached:
        return run.metrics
    rng = random.Random(cfg.seed)
    device = pick_device(cfg.device)
    lm, tok = load_lm(paths["model"], device, cfg)
    constitution = load_constitution(principles_path)
    prompts = load_prompt_file(cfg.prompts) if cfg.prompts else constitution["prompts"]
    prompts = prompts[:cfg.n_prompts] if cfg.n_prompts else prompts
    if not prompts:
        raise UserError(f"no prompts: {principles_path} has no \"prompts\" list; pass --prompts=FILE")
    model = lm.eval()
    sample = Sampler(model, tok, cfg, torch.Generator().manual_seed(cfg.seed))
    principles = constitution["principles"]
    print0(f"[constitution] {len(prompts)} prompts, {len(principles)} principles, {cfg.revisions} revision round(s)")

    # SL-CAI: answer -> (critique -> revision) x revisions, all prompts batched at each step
    chats = [as_messages(p) for p in prompts]
    answers = sample(chats)
    traces = [{"prompt": p, "initial": a, "rounds": []} for p, a in zip(prompts, answers)]
    for _ in range(cfg.revisions):
        used = [rng.choice(principles) for _ in prompts]
        chats = [c + [{"role": "assistant", "content": a}, {"role": "user", "content": pr["critique"]}]
                 for c, a, pr in zip(chats, answers, used)]
        critiques = sample(chats)
        chats = [c + [{"role": "assistant", "content": k}, {"role": "user", "content": pr["revision"]}]
                 for c, k, pr in zip(chats, critiques, used)]
        answers = sample(chats)
        for t, pr, k, a in zip(traces, used, critiques, answers):
            t["rounds"].append({"principle": pr["name"], "critique": k, "revision": a})
    sft = [{"messages": as_messages(p) + [{"role": "assistant", "content": a}]} for p, a in zip(prompts, answers) if a]

    # RLAIF: two sampled answers per prompt, labelled by the model's own choice under a principle
    pairs, margins = [], []
    if cfg.pairs:
        first, second = sample([as_messages(p) for p in prompts]), sample([as_messages(p) for p in prompts])
        for t, p, a, b in zip(traces, prompts, first, second):
            if not a or not b or a == b:
                continue
            pr = rng.choice(principles)
            score = preference_score(model, tok, p, pr, a, b, sample.keep)
            if score == 0.0:
                continue  # no preference: not a training signal
            chosen, rejected = (a, b) if score > 0 else (b, a)
            pairs.append({"prompt": p, "chosen": chosen, "rejected": rejected})
            margins.append(abs(score))
            t["rlaif"] = {"principle": pr["name"], "a": a, "b": b, "log_odds_a": score}

    write_jsonl(run.dir / "sft.jsonl", sft)
    write_jsonl(run.dir / "preferences.jsonl", pairs)
    write_jsonl(run.dir / "trace.jsonl", traces)
    changed = sum(t["rounds"][-1]["revision"] != t["initial"] for t in traces if t["rounds"])
    print0(f"[constitution] {len(sft)} SFT conversations, {len(pairs)} preference pairs -> {run.dir}")
    return run.finish({
        "prompts": len(prompts), "sft_examples": len(sft), "preference_pairs": len(pairs),
        "revised_changed": changed, "mean_abs_log_odds": sum(margins) / len(margins) if margins else 0.0,
    })


if __name__ == "__main__":
    from ember.cli import module_main

    module_main(__name__)
