"""The tokenizer stored in GGUF metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`) as an ember Tokenizer.

ember's exact tokenizer.json when the file carries "ember.tokenizer_json"; a SentencePiece backend for
tokenizer.ggml.model "llama"; a byte-level BPE rebuilt from tokens + merges for "gpt2" (pre-tokenizer by
tokenizer.ggml.pre: "smollm" = digits alone then GPT-2's regex, "llama-bpe" = ember's/GPT-4's split regex).
"""

from __future__ import annotations

import json

from ember.common.errors import UserError
from ember.tokenizer.special import SPLIT_PATTERN

CONTROL, USER_DEFINED = 3, 4  # gguf TokenType values of tokens only special parsing (or code) may produce


def gguf_settings(meta: dict, n_tokens: int) -> dict:
    """bos/eos/pad/unk ids, add_bos, chat template and end-of-turn id, where the metadata gives them; a value
    of the wrong type (or an id outside the n_tokens-entry vocabulary) is an error, not a silent default."""
    out = {}
    for k, name in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown"), ("end", "eot")):
        key, v = f"tokenizer.ggml.{name}_token_id", meta.get(f"tokenizer.ggml.{name}_token_id")
        if v is not None and (type(v) is not int or not 0 <= v < n_tokens):
            raise UserError(f"GGUF metadata {key} = {v!r} is not a token id of its {n_tokens}-token vocabulary; "
                            f"fix the value (e.g. with gguf's gguf_set_metadata.py) or re-export the file")
        if v is not None:
            out[k] = v
    add_bos, template = meta.get("tokenizer.ggml.add_bos_token"), meta.get("tokenizer.chat_template")
    if add_bos is not None and not isinstance(add_bos, bool):
        raise UserError(f"GGUF metadata tokenizer.ggml.add_bos_token = {add_bos!r} is not a bool; re-export the file")
    if add_bos is not None:
        out["add_bos"] = add_bos
    if template is not None and not isinstance(template, str):
        raise UserError(f"GGUF metadata tokenizer.chat_template = {str(template)[:80]!r} is not a Jinja string; "
                        f"re-export the file")
    if template is not None:
        out["chat_template"] = template
    return out


def _list(meta: dict, key: str, kind, what: str, n: int | None) -> list | None:
    """The metadata array `key` (None when absent), each entry a `kind` (`what`, in words), n entries when n is
    given."""
    v = meta.get(key)
    if v is None:
        return None
    if not isinstance(v, list) or not all(isinstance(x, kind) and not isinstance(x, bool) for x in v):
        raise UserError(f"GGUF metadata {key} is not an array of {what}; re-export the file")
    if n is not None and len(v) != n:
        raise UserError(f"GGUF metadata {key} has {len(v)} entries for {n} tokens (tokenizer.ggml.tokens): one "
                        f"per token is needed; the file is damaged or mis-exported. Re-export it")
    return v


def _from_str(spec: str, what: str):
    from tokenizers import Tokenizer as HFTokenizer

    try:
        return HFTokenizer.from_str(spec)
    except Exception as e:  # tokenizers raises a bare Exception on a malformed tokenizer
        raise UserError(f"GGUF metadata {what} does not make a tokenizer ({e}); re-export the file") from None


def gguf_backend(meta: dict):
    """(backend, settings) for the metadata's tokenizer, or None when the GGUF has none."""
    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        return None
    from ember.tokenizer.hf import HFBackend

    if "ember.tokenizer_json" in meta:
        if not isinstance(meta["ember.tokenizer_json"], str):
            raise UserError("GGUF metadata ember.tokenizer_json is not a string; re-export the file")
        backend = HFBackend(_from_str(meta["ember.tokenizer_json"], "ember.tokenizer_json"))
        return backend, gguf_settings(meta, backend.vocab_size)
    if kind not in ("llama", "gpt2"):
        raise UserError(f"GGUF tokenizer.ggml.model {kind!r} is not supported (llama, gpt2 are); "
                        f"pass the model's tokenizer.json with --tokenizer")
    tokens = _list(meta, "tokenizer.ggml.tokens", str, "strings", None) or []
    if not tokens:
        raise UserError(f"GGUF metadata names tokenizer model {kind!r} but has no tokenizer.ggml.tokens; re-export "
                        "the file with its vocabulary")
    settings = gguf_settings(meta, len(tokens))
    types = _list(meta, "tokenizer.ggml.token_type", int, "integers", len(tokens)) or [1] * len(tokens)
    if kind == "llama":
        from ember.tokenizer.sentencepiece import SentencePiece

        scores = _list(meta, "tokenizer.ggml.scores", (int, float), "numbers", len(tokens)) or [0.0] * len(tokens)
        unk = settings.get("unk", 0)
        special = {t: i for i, t in enumerate(tokens) if types[i] in (CONTROL, USER_DEFINED) or i == unk}
        pieces = [t.replace("\u2581", " ").encode() for t in tokens]
        settings.setdefault("bos", 1)
        settings.setdefault("eos", 2)
        settings.setdefault("add_bos", True)  # llama.cpp's default for SentencePiece vocabularies
        return SentencePiece(pieces, [float(s) for s in scores], special, unk_id=unk), settings
    merges = _list(meta, "tokenizer.ggml.merges", str, "strings", None) or []
    bad = next((i for i, m in enumerate(merges) if len(m.split(" ")) != 2 or "" in m.split(" ")), None)
    if bad is not None:  # llama.cpp and tokenizers read "left right": two tokens, one space
        raise UserError(f"GGUF metadata tokenizer.ggml.merges entry {bad} = {merges[bad][:80]!r} is not two tokens "
                        f"joined by one space; the file is damaged or mis-exported. Re-export it")
    pre = meta.get("tokenizer.ggml.pre", "default")
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    if pre == "smollm":  # SmolLM2: each digit alone, then GPT-2's byte-level regex
        pre_tok = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    elif pre == "llama-bpe":
        pre_tok = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": SPLIT_PATTERN}, "behavior": "Isolated", "invert": False},
            {**byte_level, "use_regex": False}]}
    else:
        pre_tok = byte_level
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for i, t in enumerate(tokens) if types[i] in (CONTROL, USER_DEFINED)]
    spec = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": pre_tok, "post_processor": None, "decoder": {**byte_level, "add_prefix_space": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "vocab": {t: i for i, t in enumerate(tokens)},
                      "merges": merges}}
    return HFBackend(_from_str(json.dumps(spec), "tokenizer.ggml.tokens/merges")), settings
