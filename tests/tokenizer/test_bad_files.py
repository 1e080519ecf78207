"""Bad tokenizer files beside a model (tokenizer_config.json, special_tokens_map.json, generation_config.json,
GGUF tokenizer metadata, a pickled pytorch_model.bin): each is one UserError naming the file, never a traceback
and never silently ignored (a dropped BOS or a non-int stop id only failed later, blaming something else)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from ember.common.errors import UserError
from ember.tokenizer.core import load_tokenizer

from .conftest import STORIES_TOK


def _folder(tok_dir, tmp_path, file: str, value):
    """A copy of the trained tokenizer's folder with `file` set to `value` (a dict merges into the file's
    object, anything else replaces the whole file's JSON)."""
    folder = tmp_path / "tok"
    shutil.copytree(tok_dir, folder)
    path = folder / file
    if isinstance(value, dict) and path.is_file():
        value = {**json.loads(path.read_text()), **value}
    path.write_text(json.dumps(value))
    return folder


def _refused(folder, file: str, *needles: str) -> str:
    with pytest.raises(UserError) as e:
        load_tokenizer(folder)
    msg = str(e.value)
    assert str(folder / file) in msg and "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


@pytest.mark.parametrize("eos", [{"a": 1}, [[2]], "2", 1.5, -1, 10**20, True, [None, 2], 512])
def test_generation_config_eos_token_id_of_wrong_type_or_range(tok_dir, tmp_path, eos):
    folder = _folder(tok_dir, tmp_path, "generation_config.json", {"eos_token_id": eos})
    _refused(folder, "generation_config.json", "eos_token_id", "[0, 512)")


def test_generation_config_good_eos_ids_still_load(tok_dir, tmp_path):
    folder = _folder(tok_dir, tmp_path, "generation_config.json", {"eos_token_id": [0, 511]})
    assert {0, 511} <= set(load_tokenizer(folder).stop_ids)


@pytest.mark.parametrize("file", ["tokenizer_config.json", "special_tokens_map.json", "generation_config.json"])
@pytest.mark.parametrize("value", [[], [1, 2], "text", 5])
def test_settings_file_that_is_not_a_json_object(tok_dir, tmp_path, file, value):
    _refused(_folder(tok_dir, tmp_path, file, value), file, "not an object")


def test_llama2c_tokenizer_config_that_is_not_a_json_object(tmp_path):
    if not STORIES_TOK.is_file():
        pytest.skip(f"stories260K tokenizer not found at {STORIES_TOK}")
    shutil.copy(STORIES_TOK, tmp_path / "tok.bin")
    (tmp_path / "tokenizer_config.json").write_text("[]")
    with pytest.raises(UserError, match=f"{tmp_path / 'tokenizer_config.json'}: holds a JSON list"):
        load_tokenizer(tmp_path / "tok.bin")


@pytest.mark.parametrize("template", [5, {"default": "x"}, ["x", 1], [{"name": "default", "template": 5}],
                                      [{"name": "tool_use", "template": "{{ x }}"}], True])
def test_chat_template_that_is_not_a_string(tok_dir, tmp_path, template):
    folder = _folder(tok_dir, tmp_path, "tokenizer_config.json", {"chat_template": template})
    _refused(folder, "tokenizer_config.json", "chat_template", "Jinja string")


def test_chat_template_list_with_a_default_still_loads(tok_dir, tmp_path):
    t = "{% for m in messages %}{{ m['content'] }}<|end|>{% endfor %}"
    folder = _folder(tok_dir, tmp_path, "tokenizer_config.json",
                     {"chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": t}]})
    assert load_tokenizer(folder).chat_template == t


@pytest.mark.parametrize("file", ["tokenizer_config.json", "special_tokens_map.json"])
@pytest.mark.parametrize("key,value", [("bos_token", "<nonexistent>"), ("eos_token", {"content": "<nope>"}),
                                       ("pad_token", "<nope>"), ("unk_token", "<nope>"), ("bos_token", ["x"]),
                                       ("add_bos_token", "yes")])
def test_special_token_missing_from_the_vocabulary_or_of_wrong_type(tok_dir, tmp_path, file, key, value):
    folder = tmp_path / "tok"
    shutil.copytree(tok_dir, folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    if file == "special_tokens_map.json":  # a setting tokenizer_config.json does not override
        cfg.pop(key, None)
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    (folder / file).write_text(json.dumps({**json.loads((folder / file).read_text()), key: value}))
    _refused(folder, file, key)


def _gguf_tokenizer(tmp_path, **meta):
    """Write a GGUF holding only tokenizer metadata and read its tokenizer as `ember eval` does."""
    gguf = pytest.importorskip("gguf")
    from ember.model.gguf import read_gguf_tokenizer

    path = tmp_path / "bad.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(meta.pop("model", "gpt2"))
    w.add_token_list(meta.pop("tokens", [f"t{i}" for i in range(8)]))
    for add, v in meta.items():
        getattr(w, add)(v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, lambda: read_gguf_tokenizer(path)


@pytest.mark.parametrize("meta,needle", [
    ({"add_token_merges": ["t1 t2 t3", "zz"]}, "tokenizer.ggml.merges"),
    ({"add_token_merges": ["t1 t9"]}, "tokenizer.ggml.tokens/merges"),  # a merge of tokens the vocabulary lacks
    ({"add_token_types": [3]}, "tokenizer.ggml.token_type"),
    ({"model": "llama", "add_token_types": [3]}, "tokenizer.ggml.token_type"),
    ({"model": "llama", "add_token_scores": [0.0]}, "tokenizer.ggml.scores"),
    ({"model": "bert", "tokens": ["a"]}, "'bert' is not supported"),
    ({"add_bos_token_id": 10**6}, "bos_token_id = 1000000"),
    ({"add_eos_token_id": 8}, "eos_token_id = 8"),
    ({"add_chat_template": "{% for m in messages %}{{ m.content }}<|eot_id|>{% endfor %}"}, "<|eot_id|>"),
])
def test_gguf_tokenizer_metadata(tmp_path, meta, needle):
    path, read = _gguf_tokenizer(tmp_path, **meta)
    with pytest.raises(UserError) as e:
        read()
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and needle in msg and "\n" not in msg, msg


def test_gguf_good_tokenizer_metadata_still_loads(tmp_path):
    path, read = _gguf_tokenizer(tmp_path, tokens=["a", "b", "ab", "c"], add_token_merges=["a b"], add_eos_token_id=3)
    assert read().stop_ids == (3,)


class Payload:  # any pickled object beyond tensors: weights_only refuses it
    pass


def test_pickled_pytorch_model_bin_is_refused_without_torch_advice(tmp_path):
    import torch

    from ember.model.hf import _load_bin

    path = tmp_path / "pytorch_model.bin"
    torch.save({"model.norm.weight": torch.ones(4), "x": Payload()}, path)
    with pytest.raises(UserError) as e:
        _load_bin(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and "safe_serialization=True" in msg and "\n" not in msg, msg
    for torch_advice in ("load failed", "can still be loaded", "Re-running", "weights_only", "\x1b"):
        assert torch_advice not in msg, msg  # torch's text tells how to switch the protection off


def test_cli_prints_one_error_line_and_exits_2(tok_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "model"
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    for f in tok_dir.iterdir():
        shutil.copy(f, folder / f.name)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": {"a": 1}}))
    cmd = [sys.executable, "-m", "ember", "eval", f"--checkpoint={folder}", "--tasks=arc_easy", "--limit=2",
           f"--run={tmp_path / 'run'}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    lines = (out.stdout + out.stderr).strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stdout + out.stderr
    assert lines[0].startswith("error: ") and str(folder / "generation_config.json") in lines[0], lines
