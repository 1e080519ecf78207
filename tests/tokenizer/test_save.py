"""Tokenizer.save: load_tokenizer(folder) rebuilds the same tokenizer, and transformers' AutoTokenizer reads the
same ids, the same chat string and adds BOS exactly when ember does (what vLLM and transformers users see)."""

from __future__ import annotations

import json

import pytest

from ember.tokenizer.core import Tokenizer
from ember.tokenizer.special import load_tokenizer

CHAT = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Count: 1 2 3"}]
TEXT = "Once upon a time, 42 ünïcode <|end|> def f(x):\n    return x\n"


def _same(a: Tokenizer, b: Tokenizer) -> None:
    for attr in ("kind", "vocab_size", "bos_id", "eos_id", "pad_id", "unk_id", "end_id", "stop_ids", "add_bos",
                 "chat_template", "ids"):
        assert getattr(a, attr) == getattr(b, attr), attr
    assert a.encode(TEXT) == b.encode(TEXT) and a.encode_prompt(TEXT) == b.encode_prompt(TEXT)
    assert a.render_chat(CHAT, add_generation_prompt=True) == b.render_chat(CHAT, add_generation_prompt=True)


def _transformers_agrees(tok: Tokenizer, folder) -> None:
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import AutoTokenizer

    raw = HFTokenizer.from_file(str(folder / "tokenizer.json"))  # what vLLM and plain `tokenizers` users run
    assert raw.encode(TEXT).ids == tok.encode_prompt(TEXT)

    hf = AutoTokenizer.from_pretrained(str(folder))
    assert hf.encode(TEXT, add_special_tokens=False) == tok.encode(TEXT, special=True)
    assert hf(TEXT)["input_ids"] == tok.encode_prompt(TEXT)  # BOS exactly when ember adds it
    if tok.chat_template is not None:
        text = hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
        assert text == tok.render_chat_text(CHAT, add_generation_prompt=True)
        out = hf.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True)
        assert list(out["input_ids"] if hasattr(out, "keys") else out) == tok.render_chat(CHAT, True)[0]
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)


def test_ember_round_trip(tok, tmp_path):
    assert tok.add_bos and tok.kind == "ember"
    tok.save(tmp_path, model_max_length=256)
    _same(tok, load_tokenizer(tmp_path))
    _transformers_agrees(tok, tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["model_max_length"] == 256 and cfg["add_bos_token"] is True and cfg["bos_token"] == "<|bos|>"
    assert json.loads((tmp_path / "special_tokens_map.json").read_text())["eos_token"] == "<|eos|>"


def test_gguf_smollm2_round_trip(smol_chat, tmp_path):
    assert not smol_chat.add_bos  # SmolLM2 prompts start without BOS (tokenizer.ggml.add_bos_token = false)
    smol_chat.save(tmp_path)
    again = load_tokenizer(tmp_path)
    _same(smol_chat, again)
    assert again.kind == "hf"
    _transformers_agrees(smol_chat, tmp_path)


def test_llama3_round_trip(llama3_dir, tmp_path):
    tok = load_tokenizer(llama3_dir)
    tok.save(tmp_path)
    _same(tok, load_tokenizer(tmp_path))
    _transformers_agrees(tok, tmp_path)


def test_sentencepiece_round_trip(stories, tmp_path):
    """llama2.c's tok.bin (transformers cannot read it; ember can), special names and stop ids kept."""
    stories.save(tmp_path)
    assert (tmp_path / "tok.bin").read_bytes() == stories.backend.llama2c_bytes()
    again = load_tokenizer(tmp_path)
    _same(stories, again)
    assert again.stop_ids == (2, 1)


def test_without_bos_no_post_processor(smol, tmp_path):
    pytest.importorskip("transformers")
    smol.save(tmp_path)
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    assert spec["post_processor"] is None and not smol.add_bos
