"""Special tokens and the thin tokenizer wrapper every stage uses (`load_tokenizer(path)`).

The trained `tokenizer.json` is a standard HF `tokenizers` file (ids 0..6 are the special tokens below).
The wrapper encodes text with `encode_special_tokens=True`: a document that contains the string
"<|eos|>" is encoded as ordinary bytes, so special ids only ever come from code that inserts them by id
(EOS between documents, role tokens in chat) — the same rule as tiktoken's `disallowed_special`.
`Tokenizer.tiktoken()` mirrors an ember tokenizer in tiktoken's faster BPE engine (the same ids) for bulk
encoding in `ember tokenize`.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from ember.common.errors import UserError

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


class Tokenizer:
    """Text <-> ids for a trained tokenizer.json; special tokens are reachable only by id."""

    def __init__(self, hf, path: str | Path | None = None):
        self.hf = hf  # a tokenizers.Tokenizer
        self.hf.encode_special_tokens = True
        self.path = Path(path) if path is not None else None
        missing = [t for t in SPECIAL_TOKENS if hf.token_to_id(t) is None]
        if missing:
            raise UserError(f"tokenizer {path or ''} lacks the special tokens {missing}; train it with "
                            f"`ember tokenizer` (which adds {', '.join(SPECIAL_TOKENS)})")
        self.ids = {t: hf.token_to_id(t) for t in SPECIAL_TOKENS}
        self.bos_id, self.eos_id, self.pad_id, self.end_id = (self.ids[t] for t in (BOS, EOS, PAD, END))
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        self.sha256 = hashlib.sha256(hf.to_str().encode()).hexdigest() if path is None else sha256_file(path)

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"no tokenizer at {path}. Run `ember tokenizer` first, or point the config at a "
                            f"tokenizer.json (or the folder holding it).")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            raise UserError(f"{path}: not a readable tokenizer.json ({e}). Rerun `ember tokenizer`.") from None
        return cls(hf, path)

    def role_id(self, role: str) -> int:
        return self.ids[ROLE_TOKENS[role]]

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(_no_lone_surrogates(text), add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many texts at once, in parallel on all cores (tokenizers' Rust thread pool)."""
        batch = getattr(self.hf, "encode_batch_fast", self.hf.encode_batch)  # _fast (no offsets) since 0.21
        return [e.ids for e in batch([_no_lone_surrogates(t) for t in texts], add_special_tokens=False)]

    def decode(self, ids) -> str:
        """Ids back to text; special tokens are kept, written as their names ("<|end|>")."""
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def id_to_token(self, i: int) -> str | None:
        return self.hf.id_to_token(i)

    def tiktoken(self):
        """A tiktoken Encoding giving the same ids as this tokenizer (for text without special tokens), or None.

        Only for the layout `ember tokenizer` trains: SPLIT_PATTERN + ByteLevel, no normalizer, plain BPE whose
        merge k creates a new token with a larger id than merge k-1, so that the rank tiktoken gives a token
        (its id) orders merges as HF's merge list does. The two rules (HF: lowest-ranked listed pair; tiktoken:
        the adjacent pair whose concatenation has the lowest id) could still differ where a token is reachable
        from a pair other than its own merge; they agree on every stdlib document (tested), and `ember
        tokenize` compares both on a sample before using this. None when tiktoken is not installed or the
        tokenizer has another layout.
        """
        try:
            import tiktoken
        except ImportError:
            return None
        spec = json.loads(self.hf.to_str())
        model, pre = spec["model"], spec.get("pre_tokenizer") or {}
        steps = pre.get("pretokenizers", [])
        layout_ok = (
            spec.get("normalizer") is None and pre.get("type") == "Sequence" and len(steps) == 2
            and steps[0].get("type") == "Split" and steps[0].get("pattern") == {"Regex": SPLIT_PATTERN}
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")
            and steps[1].get("type") == "ByteLevel" and not steps[1].get("add_prefix_space")
            and not steps[1].get("use_regex")
            and model.get("type") == "BPE" and not model.get("dropout") and not model.get("byte_fallback")
            and not model.get("continuing_subword_prefix") and not model.get("end_of_word_suffix")
        )
        if not layout_ok:
            return None
        vocab = model["vocab"]
        merged = [vocab.get("".join(m) if isinstance(m, list) else m.replace(" ", "")) for m in model["merges"]]
        if None in merged or any(a >= b for a, b in zip(merged, merged[1:])):
            return None  # a merge that repeats or reorders tokens: merge order != id order
        dec = byte_decoder()
        specials = set(self.ids.values())
        ranks = {bytes(dec[c] for c in tok): i for tok, i in vocab.items() if i not in specials}
        if any(bytes([b]) not in ranks for b in range(256)):
            return None
        return tiktoken.Encoding(f"ember-{self.sha256[:12]}", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks,
                                 special_tokens={})


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _no_lone_surrogates(text: str) -> str:
    """A JSON escape like "\\ud800" gives Python a string no UTF-8 can hold (tokenizers raises TypeError):
    each such code point becomes U+FFFD, as tiktoken does."""
    return _LONE_SURROGATE.sub("\ufffd", text) if not text.isascii() else text


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer.json file or the folder holding it (e.g. <run>/tokenizer)."""
    return Tokenizer.load(path)


def sha256_file(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
