"""ember's special tokens, its pre-tokenization split, and small helpers every tokenizer backend shares.

The trained `tokenizer.json` is a standard HF `tokenizers` file (ids 0..6 are the special tokens below).
Text is encoded with special-token strings kept as ordinary text by default: a document that contains the
string "<|eos|>" is encoded as bytes, so special ids only come from code that inserts them by id (EOS between
documents) or from a chat template's own text — the same rule as tiktoken's `disallowed_special`.
`Tokenizer` and `load_tokenizer` (in tokenizer/core.py) are importable from here, as callers always did.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, END]  # in id order: 0..6 in a trained tokenizer
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

# Pre-tokenization split: GPT-4's (cl100k) pattern, as nanochat uses it. Words keep their leading space,
# numbers split into groups of at most 3 digits, and runs of spaces (Python indentation) stay whole so BPE
# can merge them into single tokens; no merge ever crosses a split boundary.
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                 r"""|\s*[\r\n]|\s+(?!\S)|\s+""")


def byte_decoder() -> dict[str, int]:
    """Byte-level BPE's printable character -> byte value (GPT-2's bytes_to_unicode, inverted)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]  # control bytes, space... -> chr(256), chr(257), ...
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def no_lone_surrogates(text: str) -> str:
    """A JSON escape like "\\ud800" gives Python a string no UTF-8 can hold (tokenizers raises TypeError):
    each such code point becomes U+FFFD, as tiktoken does. Every backend calls this first."""
    return _LONE_SURROGATE.sub("\ufffd", text) if not text.isascii() else text


def sha256_file(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def __getattr__(name: str):
    # `from ember.tokenizer.special import Tokenizer, load_tokenizer`: resolved lazily, because core.py
    # imports this module's constants (a top-level import both ways would be circular)
    if name in ("Tokenizer", "load_tokenizer"):
        from ember.tokenizer import core

        return getattr(core, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
