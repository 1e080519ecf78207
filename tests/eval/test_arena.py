"""Arena ratings: Bradley-Terry by hand and by recovery of known strengths, Elo, votes format, judges, stage."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ember.common.errors import UserError
from ember.eval import arena


def v(a, b, w):
    return {"a": a, "b": b, "winner": w}


def test_two_models_closed_form():
    votes = [v("x", "y", "a")] * 3 + [v("x", "y", "b")]
    r = arena.bradley_terry(votes, prior=0)
    assert r["x"] - r["y"] == pytest.approx(400 * math.log10(3), abs=1e-6)
    assert (r["x"] + r["y"]) / 2 == pytest.approx(1000)


def test_fit_is_a_stationary_point_of_the_likelihood():
    rng = np.random.default_rng(0)
    names = ["a", "b", "c", "d"]
    votes = [v(*rng.choice(names, 2, replace=False), rng.choice(["a", "b", "tie"])) for _ in range(300)]
    r = arena.bradley_terry(votes, prior=0)
    s = {n: 10 ** (x / 400) for n, x in r.items()}  # strengths p
    grad = {n: 0.0 for n in names}  # d loglik / d log p_i = (points of i) - sum over games of P(i wins)
    for x in votes:
        pa = s[x["a"]] / (s[x["a"]] + s[x["b"]])
        sc = arena._score(x)
        grad[x["a"]] += sc - pa
        grad[x["b"]] += (1 - sc) - (1 - pa)
    assert max(abs(g) for g in grad.values()) < 1e-6


def test_recovers_known_strengths_within_intervals():
    rng = np.random.default_rng(1)
    true = {"strong": 1150.0, "mid": 1000.0, "weak": 850.0}
    votes = []
    for _ in range(1500):
        a, b = rng.choice(list(true), 2, replace=False)
        pa = 1 / (1 + 10 ** ((true[b] - true[a]) / 400))
        votes.append(v(a, b, "a" if rng.random() < pa else "b"))
    table = arena.ratings(votes, n_boot=200, seed=0, prior=0)
    assert list(table) == ["strong", "mid", "weak"]
    for n, t in true.items():
        lo, hi = table[n]["ci95"]
        assert lo <= t <= hi and hi - lo < 80, (n, table[n])
    assert table["strong"]["elo"] > table["mid"]["elo"] > table["weak"]["elo"]


def test_unbeaten_model_stays_finite_with_prior_and_self_votes_are_ignored():
    votes = [v("x", "y", "a")] * 5 + [v("x", "x", "a")]
    r = arena.bradley_terry(votes, prior=1.0)
    assert math.isfinite(r["x"]) and r["x"] > r["y"]
    # prior=1 adds one virtual tie: 5.5 : 0.5 points -> ratio 11
    assert r["x"] - r["y"] == pytest.approx(400 * math.log10(11), abs=1e-6)


def test_elo_update_by_hand():
    r = arena.elo([v("x", "y", "a")], k=32)
    assert r == {"x": 1016.0, "y": 984.0}


def test_read_votes_serving_format_and_errors(tmp_path):
    p = tmp_path / "votes.jsonl"
    rows = [{"a": "sft", "b": "base", "winner": "both_bad", "prompt": "hi", "answer_a": "x", "answer_b": "y",
             "seed_a": 1, "seed_b": 2, "temperature": 0.7, "time": "2025-01-01T00:00:00+00:00"}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows) + '\n{"a": "x", "b": "y", "winner": "left"}\n')
    with pytest.raises(UserError, match=r"votes.jsonl:3: a vote needs"):  # the file's line, blank lines counted
        arena.read_votes(p)
    p.write_bytes(b'{"a": "x", "b": "y", "winner": "a", "prompt": "\xff"}\n')
    with pytest.raises(UserError, match=r"votes.jsonl:1: not UTF-8 text"):
        arena.read_votes(p)
    p.write_text(json.dumps(rows[0]) + "\n")
    assert arena.read_votes(p)[0]["winner"] == "both_bad"


def test_judges_and_battle(lm):
    class Prefers:  # an LM stub whose log-likelihoods favour " A" whatever the order: pure position bias
        tokenizer, max_len = lm.tokenizer, 4096

        def loglikelihood_text(self, pairs):
            self.contexts = [c for c, _ in pairs]
            return [(0.0 if c == " A" else -1.0, True) for _, c in pairs]
    stub = Prefers()
    assert arena.llm_judge(stub)("q", "x", "y") == "tie"
    stub.max_len = 200  # a small judge: the question and both answers are cut to fit, none is lost
    arena.llm_judge(stub)("QUESTION " + "q" * 300, "ANSWER-A " + "a" * 300, "ANSWER-B " + "b" * 300)
    ctx = stub.contexts[0]
    assert len(lm.tokenizer.encode(ctx)) + 2 <= 200 and all(w in ctx for w in ("QUESTION", "ANSWER-A", "ANSWER-B"))
    assert arena.llm_judge(lm)("q", "x", "y") in ("a", "b", "tie")
    rj = arena.reward_judge(lambda p, a: len(a))
    assert rj("q", "long answer", "short") == "a" and rj("q", "ab", "cd") == "tie"
    votes = arena.battle({"m1": lambda p: "a", "m2": lambda p: "bbbb", "m3": lambda p: "cc"}, ["p1", "p2"], rj)
    assert len(votes) == 6 and all(set(x) >= {"a", "b", "winner", "prompt", "answer_a", "answer_b"} for x in votes)
    table = arena.ratings(votes, n_boot=50)
    assert list(table) == ["m2", "m3", "m1"]


def test_stage_rates_a_votes_file(tmp_path):
    votes = tmp_path / "serve" / "votes.jsonl"
    votes.parent.mkdir()
    votes.write_text("".join(json.dumps(v("x", "y", w)) + "\n" for w in "aaab"))
    m = arena.main(arena.Config(run=str(tmp_path), bootstrap=50))
    assert m["votes"] == 4 and m["rating/x"] > m["rating/y"]
    assert (tmp_path / "arena" / "ratings.md").read_text().count("|") > 10
    with pytest.raises(UserError, match="nothing to rate"):
        arena.main(arena.Config(run=str(tmp_path / "empty")))


def test_stage_judge_battle_with_a_real_model(tmp_path):
    from .conftest import ASSETS, datasets_or_skip

    root = datasets_or_skip("models", "stories260K")
    ckpt = str(root / "stories260K.bin")
    m = arena.main(arena.Config(run=str(tmp_path), models=[f"greedy={ckpt}", f"same={ckpt}"], judge=ckpt,
                                tokenizer=str(root / "tok512.bin"), prompts=str(ASSETS / "reference_tiny.jsonl"),
                                n_prompts=2, max_new_tokens=8, bootstrap=20))
    judged = arena.read_votes(tmp_path / "arena" / "judge_votes.jsonl")
    assert m["votes"] == 2 and len(judged) == 2 and {v["judge"] for v in judged} == {"model"}
    # identical models give identical answers, and the order-swapped judge then cannot prefer a side
    assert all(v["answer_a"] == v["answer_b"] and v["winner"] == "tie" for v in judged)


def test_battle_prompts_need_no_reference(tmp_path):
    f = tmp_path / "prompts.jsonl"
    f.write_text('{"prompt": "What is a cat?"}\n{"instruction": "Name a color."}\n')
    assert arena.read_prompts(f) == ["What is a cat?", "Name a color."]
    f.write_text('{"prompt": "ok"}\n{"question": "?"}\n')
    with pytest.raises(UserError, match=r"prompts.jsonl:2: needs a non-empty string 'prompt'"):
        arena.read_prompts(f)
