"""`ember constitution`: SL-CAI and RLAIF outputs in the fixed formats; the AI judge's position-bias cancels."""

import json

import pytest
import torch
import torch.nn as nn

from ember.align import constitutional as C
from ember.align.data import load_preferences, read_jsonl
from ember.common.checkpoint import load_model
from ember.common.errors import UserError


def test_constitution_writes_sft_and_preference_data(run_dir):
    m = C.main(C.Config(run=str(run_dir), n_prompts=6, revisions=1, max_new_tokens=12, device="cpu"))
    out = run_dir / "constitution"
    sft = [r for _, r in read_jsonl(out / "sft.jsonl")]
    assert m["sft_examples"] == len(sft) > 0
    for rec in sft:
        roles = [msg["role"] for msg in rec["messages"]]
        assert roles == ["user", "assistant"] and rec["messages"][1]["content"]
    traces = [r for _, r in read_jsonl(out / "trace.jsonl")]
    assert len(traces) == 6 and all(len(t["rounds"]) == 1 and t["rounds"][0]["critique"] is not None for t in traces)
    assert m["preference_pairs"] > 0  # a judge stuck at 0 (no preference) would write none
    pairs = load_preferences(out / "preferences.jsonl")  # readable by reward/dpo as is
    assert len(pairs) == m["preference_pairs"] and all(p["chosen"] != p["rejected"] for p in pairs)


def test_default_constitution_is_valid():
    doc = C.load_constitution(C.DEFAULT_PRINCIPLES)
    assert len(doc["principles"]) >= 6 and len(doc["prompts"]) >= 20


def test_bad_constitution_files(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"principles": [{"name": "x", "critique": "y"}]}))
    with pytest.raises(UserError, match="principle 0"):
        C.load_constitution(f)
    f.write_text("{oops")
    with pytest.raises(UserError, match="not valid JSON"):
        C.load_constitution(f)


def test_judge_score_is_antisymmetric_and_cancels_position_bias(base_run):
    run, tok = base_run
    model = load_model(run / "sft" / "final").eval()
    principle = {"name": "p", "critique": "c", "revision": "r", "choice": "Which is better?"}
    s_ab = C.preference_score(model, tok, "Q?", principle, "first answer", "second", 256)
    s_ba = C.preference_score(model, tok, "Q?", principle, "second", "first answer", 256)
    assert s_ab == pytest.approx(-s_ba, abs=1e-4) and abs(s_ab) > 1e-3  # a real model has some preference
    # a judge that says "A" whatever it reads (a huge bias on that token) has no preference after debiasing
    head = nn.Linear(model.config.n_embd, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tok.encode("A")[0]] = 10.0
    model.lm_head = head
    assert C.preference_score(model, tok, "Q?", principle, "first answer", "second", 256) == pytest.approx(0.0, abs=1e-4)
