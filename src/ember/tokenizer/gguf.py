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


def gguf_settings(meta: dict) -> dict:
    """bos/eos/pad/unk ids, add_bos, chat template and end-of-turn id, where the metadata gives them."""
    out = {k: meta.get(f"tokenizer.ggml.{name}_token_id") for k, name in
           (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown"))}
    out = {k: v for k, v in out.items() if v is not None}
    if isinstance(meta.get("tokenizer.ggml.add_bos_token"), bool):
        out["add_bos"] = meta["tokenizer.ggml.add_bos_token"]
    if isinstance(meta.get("tokenizer.chat_template"), str):
        out["chat_template"] = meta["tokenizer.chat_template"]
    if meta.get("tokenizer.ggml.eot_token_id") is not None:
        out["end"] = meta["tokenizer.ggml.eot_token_id"]
    return out


def gguf_backend(meta: dict):
    """(backend, settings) for the metadata's tokenizer, or None when the GGUF has none."""
    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        return None
    from tokenizers import Tokenizer as HFTokenizer

    from ember.tokenizer.hf import HFBackend

    settings = gguf_settings(meta)
    if "ember.tokenizer_json" in meta:
        return HFBackend(HFTokenizer.from_str(meta["ember.tokenizer_json"])), settings
    tokens = list(meta.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise UserError(f"GGUF metadata names tokenizer model {kind!r} but has no tokenizer.ggml.tokens; re-export "
                        "the file with its vocabulary")
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    if kind == "llama":
        from ember.tokenizer.sentencepiece import SentencePiece

        scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        unk = settings.get("unk", 0)
        special = {t: i for i, t in enumerate(tokens) if types[i] in (CONTROL, USER_DEFINED) or i == unk}
        pieces = [t.replace("\u2581", " ").encode() for t in tokens]
        settings.setdefault("bos", 1)
        settings.setdefault("eos", 2)
        settings.setdefault("add_bos", True)  # llama.cpp's default for SentencePiece vocabularies
        return SentencePiece(pieces, [float(s) for s in scores], special, unk_id=unk), settings
    if kind != "gpt2":
        raise UserError(f"GGUF tokenizer model {kind!r} is not supported (llama, gpt2 are)")
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
                      "merges": list(meta.get("tokenizer.ggml.merges", []))}}
    return HFBackend(HFTokenizer.from_str(json.dumps(spec))), settings
