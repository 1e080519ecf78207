"""SFT data: format conversion (and real files when present), assistant-only labels for multi-turn and packed
batches, and packing that leaves each conversation's loss exactly what it is when run alone."""

import json
from pathlib import Path

import pytest
import torch

from ember.common.errors import UserError
from ember.sft import data as D

DATASETS = Path(__file__).resolve().parents[3] / "shared" / "datasets"  # ../shared/datasets of the checkout

MULTI = [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": "What does len do?"},
         {"role": "assistant", "content": "It counts items."},
         {"role": "user", "content": "And sorted?"},
         {"role": "assistant", "content": "It returns a sorted list."}]


def expected_labels(tok, ids: list[int]) -> list[int]:
    """Independent of render_chat's mask: a token is trained iff it lies after an <|assistant|> token and up to
    and including the next <|end|> (special ids never occur inside text: the tokenizer encodes them as bytes)."""
    asst, end = tok.role_id("assistant"), tok.end_id
    labels, inside = [], False
    for t in ids:
        labels.append(t if inside else -100)
        if t == asst:
            inside = True
        elif t == end:
            inside = False
    return labels[1:]  # targets are the ids shifted by one


# ---------------------------------------------------------------------------- formats

def test_formats_convert():
    assert D.to_messages({"messages": MULTI}, "x") == MULTI
    share = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "hi"},
                               {"from": "gpt", "value": "hello"}]}
    assert [m["role"] for m in D.to_messages(share, "x")] == ["system", "user", "assistant"]
    alpaca = D.to_messages({"instruction": "Sort these.", "input": "b, a", "output": "a, b"}, "x")
    assert alpaca == [{"role": "user", "content": "Sort these.\n\nb, a"}, {"role": "assistant", "content": "a, b"}]
    assert D.to_messages({"instruction": "Hi.", "input": "", "output": "Hello."}, "x")[0]["content"] == "Hi."
    templated = {"prompt": "Below is an instruction that describes a task. Write a response that appropriately "
                           "completes the request.\n\n### Instruction:\nName a color.\n\n### Response:",
                 "answer": "Blue.###eos_token###"}
    assert D.to_messages(templated, "x") == [{"role": "user", "content": "Name a color."},
                                             {"role": "assistant", "content": "Blue."}]
    tree = {"message_tree_id": "t", "prompt": {"role": "prompter", "text": "Q1", "replies": [
        {"role": "assistant", "text": "worse", "rank": 1, "replies": []},
        {"role": "assistant", "text": "best", "rank": 0, "replies": [
            {"role": "prompter", "text": "Q2", "replies": [{"role": "assistant", "text": "A2", "rank": 0}]}]}]}}
    assert [m["content"] for m in D.to_messages(tree, "x")] == ["Q1", "best", "Q2", "A2"]


def test_parquet_and_hf_sources(tmp_path):
    """Parquet files and hf: datasets (here a local folder, read by `datasets` as the hub's would be) give the
    same conversations as JSONL: no_robots' messages, Dolly's hub fields; a bad row is named by its place."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pytest.importorskip("datasets")
    dolly = {"instruction": "Name a color.", "context": "", "response": "Blue.", "category": "open_qa"}
    recs = [{"prompt": "What does len do?", "messages": MULTI, "category": "chat"}]
    (tmp_path / "hub").mkdir()
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "hub" / "train.parquet")
    pq.write_table(pa.Table.from_pylist([dolly]), tmp_path / "dolly.parquet")
    assert D.load_conversations(f"hf:{tmp_path / 'hub'}") == [MULTI]
    assert D.load_conversations(tmp_path / "dolly.parquet") == [[{"role": "user", "content": "Name a color."},
                                                                 {"role": "assistant", "content": "Blue."}]]
    bad = recs + [{"prompt": "x", "messages": [{"role": "bot", "content": "x"}], "category": "chat"}]
    pq.write_table(pa.Table.from_pylist(bad), tmp_path / "hub" / "train.parquet")
    with pytest.raises(UserError, match=r"hf:.*hub\[train\]#1: message 0"):
        D.load_conversations(f"hf:{tmp_path / 'hub'}")


def test_bad_records_name_the_line(tmp_path):
    f = tmp_path / "chat.jsonl"
    f.write_text(json.dumps({"messages": MULTI}) + "\n\n" + json.dumps({"messages": [{"role": "bot", "content": "x"}]}) + "\n")
    with pytest.raises(UserError, match=r"chat.jsonl:3: message 0"):
        D.load_conversations(f)
    f.write_text('{"messages": [\n')
    with pytest.raises(UserError, match=r"chat.jsonl:1: not valid JSON"):
        D.load_conversations(f)
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "only a question"}]}) + "\n")
    with pytest.raises(UserError, match="no assistant message"):
        D.load_conversations(f)
    for rec, msg in (({"instruction": None, "output": "x"}, "Alpaca field 'instruction' must be a string"),
                     ({"instruction": "hi", "input": 5, "output": "x"}, "Alpaca field 'input' must be a string"),
                     ({"conversations": None}, "'conversations' must be a list")):
        f.write_text(json.dumps({"messages": MULTI}) + "\n" + json.dumps(rec) + "\n")
        with pytest.raises(UserError, match=rf"chat.jsonl:2: {msg}"):
            D.load_conversations(f)
    f.write_text(json.dumps({"text": "plain"}) + "\n")
    with pytest.raises(UserError, match="unknown record format"):
        D.load_conversations(f)


@pytest.mark.parametrize("rel, n, multi", [("alpaca/alpaca_5000.json", 5000, False),
                                           ("oasst/oasst_en_100_tree.jsonl", 100, True),
                                           ("dolly/dolly_151_alpaca_prompt_format.jsonl", 151, False),
                                           ("cs336_fixtures/sft_sample.jsonl", 5, False)])
def test_real_files(rel, n, multi):
    path = DATASETS / rel
    if not path.is_file():
        pytest.skip(f"{path} not present (shared datasets absent)")
    convs = D.load_conversations(path)
    assert len(convs) == n
    assert all(c[-1]["role"] == "assistant" and c[0]["role"] == "user" for c in convs)
    assert any(len(c) > 2 for c in convs) == multi
    text = " ".join(m["content"] for c in convs for m in c)
    assert "### Instruction" not in text and "###eos_token###" not in text


def test_stdlib_set_is_deterministic(convs):
    again = D.stdlib_conversations(max_examples=400, seed=0, max_files=60)
    assert again == convs and len(convs) >= 150
    kinds = {c[-1]["content"].startswith("```python") for c in convs}
    assert kinds == {True, False}  # "write" turns (code answers) and explain/name turns
    assert any(len(c) >= 4 for c in convs)  # multi-turn ones
    train, val = D.split(convs, 0.1)
    assert len(train) + len(val) == len(convs) and 0 < len(val) < 0.25 * len(convs)
    assert D.split(list(reversed(convs)), 0.1)[1] == list(reversed(val))  # by content, not position


# ---------------------------------------------------------------------------- masking

def test_multi_turn_labels(tok):
    ex = D.encode(tok, MULTI)
    ids, _ = D.render_chat(tok, MULTI)
    assert ex.inputs == ids[:-1]
    assert ex.targets == expected_labels(tok, ids)
    trained = [t for t in ex.targets if t != -100]
    want = tok.encode("It counts items.") + [tok.end_id] + tok.encode("It returns a sorted list.") + [tok.end_id]
    assert trained == want
    everything = D.encode(tok, MULTI, train_on_all=True)
    assert everything.targets == ids[1:]
    first = next(i for i, t in enumerate(ex.targets) if t != -100)
    cut = D.encode(tok, MULTI, max_len=first + 2)
    assert len(cut.inputs) == first + 2 and cut.targets == ex.targets[:first + 2]
    assert D.encode(tok, MULTI, max_len=first) is None  # truncated before any reply: nothing to train


def test_packed_batch_labels_and_doc_ids(tok, convs):
    pairs = [(c, e) for c in convs[:14] if (e := D.encode(tok, c, max_len=96)) is not None]
    exs = [e for _, e in pairs]
    rows = D.make_rows(exs, 256, packed=True)
    assert len(rows) < len(exs)  # several conversations share rows
    b = D.collate(rows, tok.pad_id, packed=True, seq_len=256)
    assert b.inputs.shape == (len(rows), 256) and b.doc_ids.shape == b.inputs.shape
    for r, row in enumerate(rows):
        pos = 0
        for d, ex in enumerate(row):
            n = len(ex.inputs)
            assert b.inputs[r, pos:pos + n].tolist() == ex.inputs and ex.inputs[0] == tok.bos_id
            assert (b.doc_ids[r, pos:pos + n] == d).all()
            conv = next(c for c, e in pairs if e is ex)
            full = D.render_chat(tok, conv)[0][:n + 1]  # its ids (truncated like the example), one past the inputs
            assert b.targets[r, pos:pos + n].tolist() == expected_labels(tok, full), (r, d)
            pos += n
        assert (b.targets[r, pos:] == -100).all() and (b.inputs[r, pos:] == tok.pad_id).all()
        assert (b.doc_ids[r, pos:] == len(row)).all()


def per_conversation_loss(model, batch, use_doc_ids: bool = True) -> list[float]:
    """Mean loss of each conversation of a batch, in row-major order (use_doc_ids=False: the model is not told
    where conversations start, so they attend to each other and positions run on)."""
    nll = model(batch.inputs, batch.targets, doc_ids=batch.doc_ids if use_doc_ids else None, reduction="none")
    out = []
    for r in range(batch.inputs.size(0)):
        ids = batch.doc_ids[r] if batch.doc_ids is not None else torch.zeros_like(batch.inputs[r])
        for d in ids.unique().tolist():
            keep = (ids == d) & (batch.targets[r] != -100)
            if keep.any():
                out.append((nll[r][keep].sum() / keep.sum()).item())
    return out


@pytest.mark.parametrize("packed", [True, False])
def test_packing_keeps_each_loss(tok, convs, tiny_model, packed):
    exs = [e for c in convs[:10] if (e := D.encode(tok, c, max_len=60)) is not None]
    rows = D.make_rows(exs, 128, packed)
    assert not packed or len(rows) < len(exs)
    with torch.no_grad():
        together = per_conversation_loss(tiny_model, D.collate(rows, tok.pad_id, packed, 128))
        alone = [tiny_model(torch.tensor([e.inputs]), torch.tensor([e.targets])).item() for e in exs]
    torch.testing.assert_close(torch.tensor(together), torch.tensor(alone), atol=1e-5, rtol=1e-5)
    if packed:  # and packing mattered: without doc_ids the same rows give different losses
        b = D.collate(rows, tok.pad_id, True, 128)
        with torch.no_grad():
            leaky = per_conversation_loss(tiny_model, b, use_doc_ids=False)
        assert not torch.allclose(torch.tensor(leaky), torch.tensor(alone), atol=1e-4)


def test_stats_and_batches(tok, convs):
    exs = [e for c in convs[:20] if (e := D.encode(tok, c, max_len=64)) is not None]
    rows = D.make_rows(exs, 64, True)
    s = D.stats(rows, 64, True)
    assert s["conversations"] == len(exs) and s["tokens"] == sum(len(e.inputs) for e in exs) and 0 < s["fill"] <= 1
    got = list(D.batches(rows, 3, tok.pad_id, True, 64))
    assert sum(b.inputs.size(0) for b in got) == len(rows)


def test_a_template_rejection_names_the_record(tmp_path, tok):
    """A chat template that refuses a conversation (here: a system turn) is reported with the record's file:line,
    not as an anonymous 'messages' error."""
    from ember.tokenizer.core import Tokenizer

    strict = Tokenizer(tok.hf, chat_template="{% for m in messages %}{% if m['role'] == 'system' %}"
                       "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}<|end|>"
                       "{% endfor %}", kind="hf", bos="<|bos|>", eos="<|eos|>")
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
                    + "\n" + json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"},
                                                     {"role": "assistant", "content": "yo"}]}) + "\n")
    good, bad = D.load_conversations(path)
    assert D.encode(strict, good) is not None
    with pytest.raises(UserError, match=r"chat\.jsonl:2: the chat template .* System role not supported"):
        D.encode(strict, bad)
