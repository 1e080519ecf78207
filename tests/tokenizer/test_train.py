"""Tokenizer training: lossless round trip (property test and the stdlib corpus), special tokens, the
saved file loaded by `tokenizers` and transformers, GPT-2 reference ids, and the `ember tokenizer` stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from ember.common import artifacts
from ember.common.errors import UserError
from ember.data.documents import make_doc, write_shards
from ember.data.sources import iter_documents
from ember.data.tokenize import is_val
from ember.tokenizer import train as tok_train
from ember.tokenizer.special import SPECIAL_TOKENS, Tokenizer, load_tokenizer

GPT2_DIR = Path(__file__).resolve().parents[2] / "../shared/datasets/gpt2_tokenizer"

# Text that stresses byte-level BPE: every Unicode plane hypothesis draws from, plus hand-picked cases.
texts = st.one_of(
    st.text(max_size=200),
    st.lists(st.sampled_from(list("ab \t\n\r") + ["<|eos|>", "<|user|>", "é", "😀", "\u0301", "\x00", "    "]),
             max_size=40).map("".join),
)


@settings(max_examples=300, deadline=None)
@given(texts)
def test_round_trip_arbitrary_unicode(tok, text):
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("text", ["", " ", "\r\n\r\n", "naïve café 東京 🎉👩‍👩‍👧", "x" * 5000, "\ufeffbom", "\U0010ffff"])
def test_round_trip_edge_cases(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_lone_surrogates_encode_as_the_replacement_character(tok):
    """JSON "\\ud800" escapes give strings UTF-8 cannot hold: U+FFFD, as tiktoken, not a TypeError."""
    assert tok.encode("a\ud800b") == tok.encode("a\ufffdb") == tok.encode_batch(["a\ud800b"])[0]


def test_round_trip_stdlib_sample(tok):
    """150 stdlib documents (about 2 MB of code and docs) in the corpus stage's spread order."""
    docs = [d["text"] for d, _ in zip(iter_documents("stdlib"), range(150))]
    assert [tok.decode(ids) for ids in tok.encode_batch(docs)] == docs


@pytest.mark.slow
def test_whole_stdlib_round_trips_and_tiktoken_mirror_agrees(tok):
    """Every document of the stdlib corpus (~800 documents, ~12 MB; ~15-30 s on 2 cores): decode(encode(d))
    == d, and the tiktoken mirror `ember tokenize` uses gives the same ids."""
    docs = [d["text"] for d in iter_documents("stdlib")]
    assert len(docs) > 500
    enc = tok.tiktoken()
    ids = tok.encode_batch(docs)
    assert [i for i, (x, d) in enumerate(zip(ids, docs)) if tok.decode(x) != d] == []
    assert [i for i, (x, d) in enumerate(zip(ids, docs)) if enc.encode_ordinary(d) != x] == []


@settings(max_examples=200, deadline=None)
@given(texts)
def test_tiktoken_mirror_gives_the_same_ids(tok, text):
    assert tok.tiktoken().encode_ordinary(text) == tok.encode(text)


def test_tiktoken_mirror_on_stdlib_sample(tok):
    docs = [d["text"] for d, _ in zip(iter_documents("stdlib"), range(150))]
    enc = tok.tiktoken()
    assert [enc.encode_ordinary(d) for d in docs] == tok.encode_batch(docs)


def test_special_tokens_come_first_and_text_never_encodes_to_them(tok):
    assert [tok.id_to_token(i) for i in range(len(SPECIAL_TOKENS))] == SPECIAL_TOKENS
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.end_id) == (0, 1, 2, 6)
    assert tok.vocab_size == 512
    ids = tok.encode("a<|eos|>b<|user|>")
    assert not set(ids) & set(range(len(SPECIAL_TOKENS)))
    assert tok.decode([tok.eos_id]) == "<|eos|>"


def test_indentation_is_merged(tok):
    """The split pattern keeps runs of spaces whole, so BPE learns 4/8-space indentation tokens."""
    ids = tok.encode("        return x")
    assert tok.decode(ids[:1]) in ("        ", "       ")


def test_saved_file_loads_in_tokenizers_and_transformers(tok, tok_dir):
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import PreTrainedTokenizerFast

    text = "def f(x):\n    return x + 1  # ünïcode\n"
    raw = HFTokenizer.from_file(str(tok_dir / "tokenizer.json"))
    assert raw.encode(text, add_special_tokens=False).ids == tok.encode(text)
    assert raw.encode(text).ids == [tok.bos_id] + tok.encode(text)  # BOS, as ember trains and serves
    hf = PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    assert hf(text)["input_ids"] == tok.encode_prompt(text)
    assert hf.decode(tok.encode(text)) == text
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    direct = PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"))
    assert direct.encode(text, add_special_tokens=False) == tok.encode(text)


def test_training_is_deterministic(stdlib_docs):
    texts_ = [d["text"] for d in stdlib_docs[:30]]
    a = tok_train.train_tokenizer(texts_, vocab_size=400)
    b = tok_train.train_tokenizer(texts_, vocab_size=400)
    assert a.hf.to_str() == b.hf.to_str()


def test_gpt2_reference_matches_known_ids():
    ref = tok_train.gpt2_reference(GPT2_DIR)
    if ref is None:
        pytest.skip(f"GPT-2 tokenizer files not found in {GPT2_DIR}")
    # ids from OpenAI's GPT-2 encoder: "Hello" 15496, " world" 995, "!" 0
    assert ref.encode("Hello world!").ids == [15496, 995, 0]
    assert ref.get_vocab_size() == 50257  # 50000 merges + 256 bytes + <|endoftext|>


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="no tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="not a readable tokenizer.json"):
        load_tokenizer(tmp_path)
    hf, trainer = tok_train.build(300)
    from tokenizers import trainers
    hf.train_from_iterator(["abc abc"], trainers.BpeTrainer(vocab_size=300, show_progress=False))
    plain = Tokenizer(hf)  # no ember special tokens: a plain HF tokenizer, without ember's role tokens
    assert plain.kind == "hf" and plain.chat_template is None and not plain.add_bos
    with pytest.raises(UserError, match="no role tokens"):
        plain.role_id("user")


def test_config_validation():
    with pytest.raises(UserError, match="vocab_size"):
        tok_train.Config(vocab_size=100)
    with pytest.raises(UserError, match="val_fraction"):
        tok_train.Config(val_fraction=1.0)


# ---------------------------------------------------------------------------- the stage

def _corpus(run: Path, stage: str, docs: list[dict], finished: bool = True) -> Path:
    folder = run / stage
    write_shards(docs, folder)
    if finished:
        artifacts.write_json(folder / "meta.json", {"stage": stage, "status": "finished"})
    return folder


def test_stage_trains_holds_out_val_docs_and_reports_compression(tmp_path, stdlib_docs, monkeypatch):
    run = tmp_path / "run"
    _corpus(run, "corpus", stdlib_docs)
    monkeypatch.chdir(tmp_path)  # the GPT-2 reference is found through $EMBER_DATASETS, as every stage finds data
    monkeypatch.setenv("EMBER_DATASETS", str(GPT2_DIR.parent.resolve()))
    cfg = tok_train.Config(run=str(run), vocab_size=600, val_fraction=0.2)
    m = tok_train.main(cfg)
    n_val = sum(is_val(d["id"], 0.2) for d in stdlib_docs)
    assert 0 < n_val < len(stdlib_docs)
    assert m["held_out_docs"] == n_val and m["train_docs"] == len(stdlib_docs) - n_val
    assert m["vocab_size"] == 600 and 1.5 < m["bytes_per_token"] < 6
    if GPT2_DIR.is_dir():
        assert 1.5 < m["gpt2_bytes_per_token"] < 6
    tok = load_tokenizer(run / "tokenizer")
    assert tok.vocab_size == 600 and tok.sha256 == m["sha256"]
    cfg_json = json.loads((run / "tokenizer" / "tokenizer_config.json").read_text())
    assert cfg_json["eos_token"] == "<|eos|>" and "chat_template" in cfg_json
    assert tok_train.main(cfg) == m  # cached: same config and inputs


def test_stage_reads_curate_else_corpus_never_an_unfinished_curate(tmp_path, stdlib_docs):
    run = tmp_path / "run"
    _corpus(run, "corpus", stdlib_docs[:40])
    cfg = tok_train.Config(run=str(run), vocab_size=300, val_fraction=0.0, reference="")
    assert tok_train.main(cfg)["train_docs"] == 40  # no curate stage in this run: the corpus
    _corpus(run, "curate", stdlib_docs[40:], finished=False)
    with pytest.raises(UserError, match=r"curate did not finish .* rerun `ember curate"):
        tok_train.main(cfg)  # not a silent fall back to uncleaned documents
    _corpus(run, "curate", stdlib_docs[40:45])
    m = tok_train.main(cfg)
    assert m["train_docs"] == 5 and "bytes_per_token" not in m  # no held-out documents: nothing to report


def test_stage_missing_input_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        tok_train.main(tok_train.Config(run=str(tmp_path / "nowhere")))


def test_max_train_bytes_caps_training_text(tmp_path):
    docs = [make_doc(f"d{i}", "word " * 200 + str(i), "t") for i in range(50)]
    _corpus(tmp_path, "corpus", docs)
    m = tok_train.main(tok_train.Config(run=str(tmp_path), vocab_size=300, max_train_bytes=3000, val_fraction=0.0))
    assert m["train_docs"] == 3 and m["train_bytes"] >= 3000
