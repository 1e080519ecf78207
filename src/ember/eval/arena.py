"""`ember arena`: ratings of models from pairwise votes — Bradley-Terry and Elo, with bootstrap intervals.

    ember arena --run=runs/demo                                   # votes from the chat page (<run>/serve/votes.jsonl)
    ember arena --models=base=runs/demo/pretrain/final,sft=runs/demo/sft/final --judge=runs/demo/sft/final
    ember arena --models=ours=runs/demo/sft/final,smol=SmolLM2-135M-Instruct.Q4_1.gguf --judge=out/hf   # any format

Votes are JSONL, one comparison per line, as the serving UI writes them:
    {"a": "sft", "b": "base", "winner": "a", "prompt": "...", "answer_a": "...", "answer_b": "..."}
winner is "a", "b", "tie" or "both_bad" (a tie for the ratings); a vote of a model against itself (two
seeds) carries no rating information and is only counted. With --models, the models answer --prompts and
a judge votes: an LLM judge (a checkpoint asked which answer is better, in both orders to cancel position
bias) or, from Python, any reward function `score(prompt, answer) -> float` (`reward_judge`). Models and
judge are read by `model.load` (ember, HF folder, GGUF, llama2.c), each with its own tokenizer.
Bradley-Terry: P(i beats j) = p_i / (p_i + p_j), fitted by minorization-maximization (Hunter 2004) and
shown on the Elo scale (400 log10 p, mean 1000), like Chatbot Arena; Elo is the online update, order-dependent.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ember.common import artifacts
from ember.common.config import require
from ember.common.errors import UserError
from ember.common.jsonl import read_jsonl
from ember.common.log import print0

WINNERS = ("a", "b", "tie", "both_bad")
Judge = Callable[[str, str, str], str]  # (prompt, answer_a, answer_b) -> "a" | "b" | "tie"


def read_votes(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"votes file {path} not found; votes come from `ember serve` (the chat page's compare "
                        f"mode) or from --models with a --judge")
    votes = []
    for line, v in read_jsonl(path):
        if not (isinstance(v.get("a"), str) and isinstance(v.get("b"), str) and v.get("winner") in WINNERS):
            raise UserError(f"{path}:{line}: a vote needs string 'a', 'b' and 'winner' in {WINNERS}, got {str(v)[:120]}")
        votes.append(v)
    return votes


def read_prompts(path: str | Path) -> list[str]:
    """The "prompt" (or Alpaca's "instruction") of each record: battles need no reference answers."""
    prompts = []
    for line, rec in read_jsonl(path, missing="pass --prompts=<JSONL with a \"prompt\" per line>"):
        p = rec.get("prompt", rec.get("instruction"))
        if not isinstance(p, str) or not p.strip():
            raise UserError(f"{path}:{line}: needs a non-empty string 'prompt' (or 'instruction')")
        prompts.append(p)
    return prompts


def _score(v: dict) -> float:
    """1 if a won, 0 if b won, 0.5 for a tie."""
    return {"a": 1.0, "b": 0.0}.get(v["winner"], 0.5)


def bradley_terry(votes: list[dict], prior: float = 1.0, iters: int = 10_000, tol: float = 1e-10) -> dict[str, float]:
    """Ratings on the Elo scale (mean 1000). prior: virtual ties added to each pair that met, so a model that
    never lost still gets a finite rating (a MAP estimate under a weak prior)."""
    votes = [v for v in votes if v["a"] != v["b"]]
    names = sorted({v["a"] for v in votes} | {v["b"] for v in votes})
    if not names:
        return {}
    ix = {n: i for i, n in enumerate(names)}
    m = len(names)
    wins = np.zeros((m, m))  # wins[i, j]: points i took from j (ties count 0.5)
    for v in votes:
        i, j, s = ix[v["a"]], ix[v["b"]], _score(v)
        wins[i, j] += s
        wins[j, i] += 1 - s
    games = wins + wins.T
    met = games > 0
    wins = wins + prior / 2 * met
    games = games + prior * met
    p = np.ones(m)
    for _ in range(iters):
        denom = (games / (p[:, None] + p[None, :])).sum(axis=1)
        new = np.where(denom > 0, wins.sum(axis=1) / np.maximum(denom, 1e-300), p)
        new = new / np.exp(np.log(np.maximum(new, 1e-300)).mean())  # fix the scale: geometric mean 1
        done = np.max(np.abs(new - p)) < tol
        p = new
        if done:
            break
    r = 400 * np.log10(np.maximum(p, 1e-300))
    return {n: float(x) for n, x in zip(names, r - r.mean() + 1000)}


def elo(votes: list[dict], k: float = 4.0, base: float = 1000.0) -> dict[str, float]:
    """Online Elo in vote order: r_a += k (s_a - 1 / (1 + 10^((r_b - r_a) / 400)))."""
    r: dict[str, float] = {}
    for v in votes:
        a, b = v["a"], v["b"]
        if a == b:
            continue
        ra, rb = r.setdefault(a, base), r.setdefault(b, base)
        e = 1 / (1 + 10 ** ((rb - ra) / 400))
        r[a], r[b] = ra + k * (_score(v) - e), rb - k * (_score(v) - e)
    return r


def ratings(votes: list[dict], n_boot: int = 1000, seed: int = 0, prior: float = 1.0) -> dict[str, dict]:
    """name -> Bradley-Terry rating with a 95% bootstrap interval (votes resampled), Elo, games, wins, ties."""
    bt = bradley_terry(votes, prior)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {n: [] for n in bt}
    for _ in range(n_boot if votes else 0):
        sample = [votes[i] for i in rng.integers(0, len(votes), len(votes))]
        for n, x in bradley_terry(sample, prior, iters=2000, tol=1e-8).items():
            draws[n].append(x)
    el = elo(votes)
    out = {}
    for n in sorted(bt, key=lambda n: -bt[n]):
        mine = [v for v in votes if n in (v["a"], v["b"]) and v["a"] != v["b"]]
        won = sum(1 for v in mine if (v["winner"] == "a" and v["a"] == n) or (v["winner"] == "b" and v["b"] == n))
        ties = sum(1 for v in mine if v["winner"] in ("tie", "both_bad"))
        d = draws[n]
        out[n] = {"rating": round(bt[n], 2), "ci95": [round(float(np.percentile(d, 2.5)), 2),
                  round(float(np.percentile(d, 97.5)), 2)] if d else None,
                  "elo": round(el.get(n, 1000.0), 2), "games": len(mine), "wins": won, "ties": ties}
    return out


# ---------------------------------------------------------------------------- judges

JUDGE_PROMPT = ("Which answer to the question is more helpful, correct and clear?\n\nQuestion: {prompt}\n\n"
                "Answer A: {a}\n\nAnswer B: {b}\n\nThe better answer is")


def llm_judge(lm, template: str = JUDGE_PROMPT) -> Judge:
    """A model as judge: log p(" A") vs log p(" B") after the template, asked in both orders; a verdict that
    flips with the order (position bias) is a tie. Question and answers are each cut to a third of what the
    judge's context leaves (else the scorer keeps only the end, and the judge never sees the question)."""
    enc = lm.tokenizer.encode
    room = max(3, lm.max_len - len(enc(template.format(prompt="", a="", b=""))) - 4)  # 4: BOS, " A", slack

    def cut(text: str) -> str:
        ids = enc(text)
        return text if len(ids) <= room // 3 else lm.tokenizer.decode(ids[:room // 3])

    def judge(prompt: str, a: str, b: str) -> str:
        if len(enc(prompt)) + len(enc(a)) + len(enc(b)) > room:
            prompt, a, b = cut(prompt), cut(a), cut(b)
        (la, _), (lb, _), (la2, _), (lb2, _) = lm.loglikelihood_text([
            (template.format(prompt=prompt, a=a, b=b), " A"), (template.format(prompt=prompt, a=a, b=b), " B"),
            (template.format(prompt=prompt, a=b, b=a), " A"), (template.format(prompt=prompt, a=b, b=a), " B")])
        first, second = ("a" if la > lb else "b"), ("b" if la2 > lb2 else "a")
        return first if first == second else "tie"
    return judge


def reward_judge(score: Callable[[str, str], float], margin: float = 0.0) -> Judge:
    """A reward model as judge: the answer with the higher score wins; within `margin` it is a tie."""
    def judge(prompt: str, a: str, b: str) -> str:
        sa, sb = score(prompt, a), score(prompt, b)
        return "tie" if abs(sa - sb) <= margin else ("a" if sa > sb else "b")
    return judge


def battle(answer: dict[str, Callable[[str], str]], prompts: list[str], judge: Judge, seed: int = 0) -> list[dict]:
    """Every pair of models on every prompt, sides shuffled; returns votes in the serving format."""
    rng = random.Random(seed)
    cache = {(m, i): fn(p) for m, fn in answer.items() for i, p in enumerate(prompts)}
    votes = []
    for i, p in enumerate(prompts):
        for x, y in itertools.combinations(sorted(answer), 2):
            a, b = (x, y) if rng.random() < 0.5 else (y, x)
            votes.append({"a": a, "b": b, "winner": judge(p, cache[a, i], cache[b, i]), "prompt": p,
                          "answer_a": cache[a, i], "answer_b": cache[b, i], "judge": "model"})
    return votes


# ---------------------------------------------------------------------------- stage

@dataclass
class Config:
    run: str = "runs/default"  # run folder; this stage writes <run>/arena/
    votes: str = ""  # votes JSONL to rate; empty = <run>/serve/votes.jsonl when it exists
    models: list[str] = field(default_factory=list)  # name=checkpoint pairs that battle on --prompts (judge votes)
    judge: str = ""  # the LLM judge, any format (needed with --models)
    tokenizer: str = ""  # one tokenizer for models and judge; empty = each model's own (beside it, <run>/tokenizer)
    prompts: str = ""  # JSONL with "prompt" (or "instruction"); empty = alpaca_eval from the datasets folder
    n_prompts: int = 20  # prompts per battle
    max_new_tokens: int = 128  # answer length per model
    bootstrap: int = 1000  # resamples for the rating intervals
    prior: float = 1.0  # virtual ties per pair (keeps an unbeaten model's rating finite)
    seed: int = 0  # prompt choice, side shuffling, bootstrap

    def __post_init__(self):
        require(all("=" in m for m in self.models), "models", self.models, "name=checkpoint pairs")
        require(not self.models or (len(self.models) >= 2 and bool(self.judge)), "models", self.models,
                "at least two name=checkpoint pairs, together with --judge=CHECKPOINT")
        require(self.prior >= 0, "prior", self.prior, "a float >= 0")


PRESETS = {"smoke": lambda: Config(bootstrap=100)}


def main(cfg: Config) -> dict:
    from ember.common.paths import datasets_dir
    from ember.eval.scoring import generate, load_lm

    votes_path = Path(cfg.votes) if cfg.votes else Path(cfg.run) / "serve" / "votes.jsonl"
    inputs = {"votes": votes_path} if votes_path.exists() or cfg.votes else {}
    if cfg.models:
        # each model's file or folder is hashed; its own tokenizer is hashed with it (beside it or inside a GGUF)
        # except an ember checkpoint's in <run>/tokenizer, which --tokenizer or the run's lineage covers
        inputs.update({f"model_{m.split('=', 1)[0]}": m.split("=", 1)[1] for m in cfg.models})
        inputs.update(judge=cfg.judge, **({"tokenizer": cfg.tokenizer} if cfg.tokenizer else {}))
    if not inputs:
        raise UserError(f"nothing to rate: no votes at {votes_path} and no --models; collect votes with `ember serve` "
                        f"or pass --models=a=CKPT,b=CKPT --judge=CKPT")
    run = artifacts.begin("arena", cfg, inputs=inputs)
    if run.cached:
        return run.metrics
    votes = read_votes(votes_path) if "votes" in inputs else []
    if cfg.models:
        src = Path(cfg.prompts) if cfg.prompts else datasets_dir() / "alpaca_eval" / "alpaca_eval.jsonl"
        prompts = read_prompts(src)
        prompts = random.Random(cfg.seed).sample(prompts, min(cfg.n_prompts, len(prompts)))
        lms = {m.split("=", 1)[0]: load_lm(m.split("=", 1)[1], cfg.tokenizer, run=cfg.run) for m in cfg.models}
        answer = {n: (lambda p, lm=lm: generate(lm, f"{p}\n\n", cfg.max_new_tokens, ("\n\n",))[0].strip())
                  for n, lm in lms.items()}
        judged = battle(answer, prompts, llm_judge(load_lm(cfg.judge, cfg.tokenizer, run=cfg.run)), cfg.seed)
        artifacts.write_text(run.dir / "judge_votes.jsonl", "".join(json.dumps(v) + "\n" for v in judged))
        votes += judged
    table = ratings(votes, cfg.bootstrap, cfg.seed, cfg.prior)
    lines = ["| model | Bradley-Terry rating | 95% CI | Elo (online) | games | wins | ties |", "|---|---|---|---|---|---|---|"]
    for n, r in table.items():
        ci = f"[{r['ci95'][0]:.0f}, {r['ci95'][1]:.0f}]" if r["ci95"] else "–"
        lines.append(f"| {n} | {r['rating']:.0f} | {ci} | {r['elo']:.0f} | {r['games']} | {r['wins']} | {r['ties']} |")
    self_votes = sum(v["a"] == v["b"] for v in votes)
    if not votes:
        print0("[arena] no votes: record some on the chat page's compare mode, or battle models with --models")
    elif self_votes == len(votes):
        print0(f"[arena] all {len(votes)} votes compare a model with itself (one model served, two seeds): they "
               f"are counted but rate nothing; serve two models (--models) to rate them")
    artifacts.write_json(run.dir / "ratings.json", {"ratings": table, "votes": len(votes), "self_votes": self_votes})
    artifacts.write_text(run.dir / "ratings.md", "# Arena ratings\n\n" + "\n".join(lines) + "\n")
    print0("\n".join(lines))
    return run.finish({"votes": len(votes), "models": len(table),
                       **{f"rating/{n}": r["rating"] for n, r in table.items()}})


if __name__ == "__main__":
    from ember.cli import module_main

    module_main(__name__)
