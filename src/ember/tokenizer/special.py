"""Special tokens and the thin tokenizer wrapper every stage uses (`load_tokenizer(path)`).

The trained `tokenizer.json` is a standard HF `tokenizers` file (ids 0..6 are the special tokens below).
The wrapper encodes text with `encode_special_tokens=True`: a document that contains the string
"<|eos|>" is encoded as ordinary bytes, so special ids only ever come from code that inserts them by id
(EOS between documents, role tokens in chat) — the same rule as tiktoken's `disallowed_special`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ember.common.errors import UserError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, END]  # in id order: 0..6 in a trained tokenizer
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}


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
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many texts at once, in parallel on all cores (tokenizers' Rust thread pool)."""
        batch = getattr(self.hf, "encode_batch_fast", self.hf.encode_batch)  # _fast (no offsets) since 0.21
        return [e.ids for e in batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        """Ids back to text; special tokens are kept, written as their names ("<|end|>")."""
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def id_to_token(self, i: int) -> str | None:
        return self.hf.id_to_token(i)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer.json file or the folder holding it (e.g. <run>/tokenizer)."""
    return Tokenizer.load(path)


def sha256_file(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
