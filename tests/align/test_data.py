"""Preference/RL data: format conversions (hh-rlhf, OpenAssistant, GSM8K), splits, generators, answer checks."""

import gzip
import json

import pytest

from ember.align import data as D
from ember.common.errors import UserError


def test_hh_dialogue_to_pair():
    c = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how do I bake?\n\nAssistant: Preheat the oven."
    r = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how do I bake?\n\nAssistant: No idea."
    pair = D.hh_pair(c, r)
    assert pair["prompt"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                              {"role": "user", "content": "how do I bake?"}]
    assert pair["chosen"] == "Preheat the oven." and pair["rejected"] == "No idea."
    assert D.hh_pair(c, "\n\nHuman: other\n\nAssistant: x") is None  # different histories: not a pair


def test_oasst_ranked_siblings_to_pairs():
    tree = {"role": "prompter", "text": "Q?", "replies": [
        {"role": "assistant", "text": "second", "rank": 1, "replies": []},
        {"role": "assistant", "text": "best", "rank": 0, "replies": [
            {"role": "prompter", "text": "more?", "replies": [
                {"role": "assistant", "text": "ok", "rank": 0, "replies": []},
                {"role": "assistant", "text": "meh", "rank": 1, "replies": []}]}]},
        {"role": "assistant", "text": "worst", "rank": 2, "replies": []},
        {"role": "assistant", "text": "unranked", "rank": None, "replies": []}]}
    pairs = D.oasst_pairs(tree)
    top = [(p["chosen"], p["rejected"]) for p in pairs if len(p["prompt"]) == 1]
    assert sorted(top) == sorted([("best", "second"), ("best", "worst"), ("second", "worst")])
    deep = [p for p in pairs if len(p["prompt"]) == 3]
    assert [(p["chosen"], p["rejected"]) for p in deep] == [("ok", "meh")]
    assert deep[0]["prompt"][1] == {"role": "assistant", "content": "best"}


def test_load_preferences_our_format_and_errors(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n\n")
    assert D.load_preferences(f) == [{"prompt": "a", "chosen": "b", "rejected": "c"}]
    f.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n{not json\n")
    with pytest.raises(UserError, match=r"p.jsonl:2"):
        D.load_preferences(f)
    f.write_text(json.dumps({"question": "a"}) + "\n")
    with pytest.raises(UserError, match="prompt, chosen, rejected"):
        D.load_preferences(f)
    g = tmp_path / "p.jsonl.gz"
    with gzip.open(g, "wt") as fh:
        fh.write(json.dumps({"chosen": "\n\nHuman: q\n\nAssistant: yes", "rejected": "\n\nHuman: q\n\nAssistant: no"}) + "\n")
    assert D.load_preferences(g) == [{"prompt": [{"role": "user", "content": "q"}], "chosen": "yes", "rejected": "no"}]


def test_preferences_and_tasks_from_hf_and_parquet(tmp_path):
    """hh-rlhf transcripts and GSM8K rows read through hf: (a local folder, as `datasets` reads the hub's
    Parquet) and from a Parquet file; the run records the dataset's identity instead of hashing a path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pytest.importorskip("datasets")
    hh = [{"chosen": f"\n\nHuman: q{i}\n\nAssistant: yes", "rejected": f"\n\nHuman: q{i}\n\nAssistant: no"}
          for i in range(3)]
    (tmp_path / "hh").mkdir()
    pq.write_table(pa.Table.from_pylist(hh), tmp_path / "hh" / "train.parquet")
    spec = f"hf:{tmp_path / 'hh'}"
    pairs = D.load_preferences(spec)
    assert pairs[0] == {"prompt": [{"role": "user", "content": "q0"}], "chosen": "yes", "rejected": "no"}
    assert len(pairs) == 3 and len(D.load_preferences(spec, limit=2)) == 2
    assert D.read_prompts(spec) == [p["prompt"] for p in pairs]
    ident = D.data_inputs(spec)["data"]
    assert ident["path"] == spec and ident["split"] == "train" and len(ident["sha256"]) == 64
    assert D.data_inputs("p.jsonl") == {"data": "p.jsonl"} and D.data_inputs("stdlib") == {}

    gsm = [{"question": "2+2?", "answer": "2+2=4\n#### 4"}, {"question": "3+3?", "answer": "six"}]
    pq.write_table(pa.Table.from_pylist(gsm[:1]), tmp_path / "gsm.parquet")
    assert D.load_tasks(tmp_path / "gsm.parquet") == [{"prompt": "2+2?", "answer": "4"}]
    (tmp_path / "gsm").mkdir()
    (tmp_path / "gsm" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gsm))
    with pytest.raises(UserError, match=r"hf:.*gsm\[test\]#1: GSM8K answer without"):
        D.load_tasks(f"hf:{tmp_path / 'gsm'}:test")


def test_real_hh_rlhf_file(shared_file):
    pairs = D.load_preferences(shared_file("hh-rlhf/harmless-base_test.jsonl.gz"))
    assert len(pairs) > 2200  # 2,312 records, a few without a shared history
    assert all(p["chosen"] != p["rejected"] and p["prompt"][-1]["role"] == "user" for p in pairs)


def test_real_oasst_file(shared_file):
    pairs = D.load_preferences(shared_file("oasst/oasst_en_100_tree.jsonl"))
    assert len(pairs) > 300
    assert all(p["prompt"][0]["role"] == "user" and p["prompt"][-1]["role"] == "user" for p in pairs)


def test_gsm8k_loader(shared_file):
    assert D.gsm8k_answer("so 3 + 4 = 7\n#### 1,007") == "1007"
    tasks = D.load_tasks(shared_file("gsm8k/test.jsonl"))
    assert len(tasks) == 1319 and tasks[0]["answer"] == "18"


def test_split_keeps_prompts_together_and_is_stable():
    recs = [{"prompt": f"p{i // 3}", "chosen": "a", "rejected": str(i)} for i in range(300)]
    train, val = D.split_heldout(recs, 0.2, seed=0)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in val}
    assert 30 <= len(val) <= 90
    assert D.split_heldout(list(reversed(recs)), 0.2, seed=0)[1] == list(reversed(val))


def test_split_keeps_conversations_together():
    """OpenAssistant pairs at every depth of one tree share the root prompt; hh-rlhf follow-ups share their first
    question: all on one side, so held-out prompts were never trained on (60 of 84 leaked before)."""
    recs = []
    for t in range(40):
        root = {"role": "user", "content": f"tree {t}"}
        recs += [{"prompt": [root], "chosen": "a", "rejected": "b"},
                 {"prompt": [root, {"role": "assistant", "content": "x"}, {"role": "user", "content": f"more {t}"}],
                  "chosen": "c", "rejected": "d"}]
    train, val = D.split_heldout(recs, 0.2, seed=0)
    assert val and not {D.conversation_key(r["prompt"]) for r in train} & {D.conversation_key(r["prompt"]) for r in val}
    one = [{"prompt": [{"role": "user", "content": "q"}], "chosen": str(i), "rejected": "b"} for i in range(6)]
    with pytest.raises(UserError, match="all 6 records come from one conversation"):
        D.split_heldout(one, 0.1)


def test_stdlib_pairs_are_deterministic_and_corrupted():
    a, b = D.stdlib_pairs(50, seed=3), D.stdlib_pairs(50, seed=3)
    assert a == b
    assert all(p["chosen"] != p["rejected"] and p["prompt"].startswith("Continue this Python code:") for p in a)


def test_corrupt_terminates_on_repeated_lines():
    import random

    out = D.corrupt("x = 1\nx = 1", random.Random(0))
    assert isinstance(out, str)


def test_arithmetic_answers_are_right():
    for t in D.arithmetic_tasks(300, seed=1, word_problems=False):
        expr = t["prompt"].removeprefix("What is ").removesuffix("?")
        assert str(eval(expr)) == t["answer"]  # noqa: S307 (our own generated "a op b")
    assert any("How many" in t["prompt"] for t in D.arithmetic_tasks(50, seed=1))
    with pytest.raises(UserError):
        D.arithmetic_tasks(5, operations="/")


@pytest.mark.parametrize("text,answer,ok", [
    ("12", "12", True), (" 12.", "12", True), ("It is 1,000", "1000", True), ("3 + 4 = 7", "7", True),
    ("7 or maybe 8", "7", False), ("the answer is 7, since 3 + 4 = 7.0", "7", True), ("", "7", False),
    ("#### -5", "-5", True), ("12.50", "12.5", True),
])
def test_exact_match(text, answer, ok):
    assert D.exact_match(text, answer) is ok
