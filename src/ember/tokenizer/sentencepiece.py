"""SentencePiece-style BPE as llama2.c's run.c and llama.cpp's SPM tokenizer run it: the backend behind
llama2.c tok*.bin files and GGUF "llama" vocabularies.

Pieces use ' ' where SentencePiece writes '▁'; "<0x0A>"-style byte tokens cover what the pieces do not. A
text fragment that opens the input or follows a special token gets a leading space (the "dummy prefix"),
as llama.cpp (and transformers' legacy Llama tokenizer) do. Special tokens (control, user-defined, unk) are
never produced by merging text: only `special=True` parsing or code inserting them by id yields them.
"""

from __future__ import annotations

import heapq
import re
import struct
from pathlib import Path

from ember.common.errors import UserError
from ember.tokenizer.special import no_lone_surrogates

_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
LLAMA2C_NAMES = {0: "<unk>", 1: "<s>", 2: "</s>"}  # llama2.c writes BOS/EOS as "\n<s>\n"; these are their names


class SentencePiece:
    """pieces[i] (UTF-8 bytes) with merge score scores[i]; `special` maps a special token's name to its id."""

    kind = "sentencepiece"

    def __init__(self, pieces: list[bytes], scores: list[float], special: dict[str, int], unk_id: int | None = 0):
        self.pieces, self.scores = pieces, scores
        self.vocab_size = len(pieces)
        self.special = dict(special)
        self.unk_id = unk_id
        self.names = {i: s for s, i in self.special.items()}  # special id -> the name decode writes
        # text never merges into a special piece ("\n<s" + ">\n" must not become BOS)
        self.index = {p: i for i, p in enumerate(pieces) if i not in self.names}
        self.byte_ids = {}  # byte value -> id of its <0xXX> token
        for i, p in enumerate(pieces):
            m = _BYTE.match(p.decode("latin-1"))
            if m:
                self.byte_ids[int(m.group(1), 16)] = i
        self.byte_of = {i: b for b, i in self.byte_ids.items()}  # id -> byte value
        self._special_re = re.compile("|".join(map(re.escape, sorted(self.special, key=len, reverse=True))) or "(?!)")

    # ------------------------------------------------------------------ files
    @classmethod
    def load_llama2c(cls, path: str | Path, vocab_size: int | None = None) -> "SentencePiece":
        """A llama2.c tok*.bin; vocab_size = how many entries to read (the file does not store it; default:
        until the file ends). Ids 0, 1, 2 are <unk>, BOS, EOS in every llama2.c export."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"no llama2.c tokenizer at {path}: pass a tok*.bin written by llama2.c's tokenizer.py")
        raw = path.read_bytes()
        pieces, scores, o = [], [], 4  # int32 max_token_length first
        while o < len(raw) and (vocab_size is None or len(pieces) < vocab_size):
            if o + 8 > len(raw):
                raise UserError(f"{path}: truncated at byte {o} (entry {len(pieces)})")
            score, n = struct.unpack("fi", raw[o:o + 8])
            if n < 0 or o + 8 + n > len(raw):
                raise UserError(f"{path}: entry {len(pieces)} has a bad length {n}; not a llama2.c tokenizer")
            pieces.append(raw[o + 8:o + 8 + n])
            scores.append(score)
            o += 8 + n
        if len(pieces) < 3 or (vocab_size is not None and len(pieces) != vocab_size):
            raise UserError(f"{path}: read {len(pieces)} tokens, expected {vocab_size or 'at least 3'}")
        return cls(pieces, scores, {name: i for i, name in LLAMA2C_NAMES.items()}, unk_id=0)

    def llama2c_bytes(self) -> bytes:
        """This vocabulary as a llama2.c tok.bin (the same bytes `load_llama2c` read)."""
        out = [struct.pack("i", max((len(p) for p in self.pieces), default=0))]
        for p, s in zip(self.pieces, self.scores):
            out.append(struct.pack("fi", s, len(p)) + p)
        return b"".join(out)

    # ------------------------------------------------------------------ interface
    def token_to_id(self, token: str) -> int | None:
        if token in self.special:
            return self.special[token]
        return self.index.get(token.replace("\u2581", " ").encode("utf-8", "replace"))

    def id_to_token(self, i: int) -> str | None:
        if i in self.names:
            return self.names[i]
        return self.pieces[i].decode("utf-8", "replace") if 0 <= i < self.vocab_size else None

    def encode(self, text: str, special: bool = False, start: bool = True) -> list[int]:
        return self.encode_offsets(text, special, start)[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_offsets(self, text: str, special: bool, start: bool = True) -> tuple[list[int], list[int]]:
        """(ids, start character of each token in `text`). start=False: `text` continues an earlier piece of
        the same input, so it gets no dummy prefix (a fragment after a special token still does)."""
        text = no_lone_surrogates(text)
        ids, offs, prefix, pos = [], [], start, 0
        for m in (self._special_re.finditer(text) if special else ()):
            self._text(text, pos, m.start(), prefix, ids, offs)
            ids.append(self.special[m.group(0)])
            offs.append(m.start())
            prefix, pos = True, m.end()
        self._text(text, pos, len(text), prefix, ids, offs)
        return ids, offs

    def _text(self, text: str, a: int, b: int, prefix: bool, ids: list[int], offs: list[int]) -> None:
        """Encode text[a:b]: one symbol per character (or its UTF-8 bytes if the character is not a piece),
        then merge greedily (llama2.c's `encode`)."""
        if a >= b:
            return
        sym, pos = [], []
        if prefix:
            sym.append(self.index.get(b" ", self.byte_ids.get(32, self.unk_id)))
            pos.append(a)
        for k in range(a, b):
            ch = text[k].encode("utf-8")
            if ch in self.index:
                sym.append(self.index[ch])
                pos.append(k)
            else:
                for x in ch:
                    sym.append(self.byte_ids.get(x, self.unk_id))
                    pos.append(k)
        keep = self._merge(sym)
        ids += [sym[i] for i in keep]
        offs += [pos[i] for i in keep]

    def _merge(self, sym: list[int]) -> list[int]:
        """Merge in place, returning the positions still alive: repeatedly the adjacent pair whose merged piece
        has the highest score (the leftmost on ties). O(n log n), so a long hostile prompt cannot stall a
        server: a linked list of symbols and a heap of candidate pairs (-score, left position, left id, right
        id, merged id); an entry whose symbols changed since it was pushed is stale and skipped."""
        n = len(sym)
        nxt, prev, alive = list(range(1, n + 1)), list(range(-1, n - 1)), [True] * n
        heap: list[tuple] = []

        def push(i: int, out: list) -> None:
            j = nxt[i]
            if j < n and sym[i] is not None and sym[j] is not None:
                m = self.index.get(self.pieces[sym[i]] + self.pieces[sym[j]])
                if m is not None:
                    out.append((-self.scores[m], i, sym[i], sym[j], m))

        for i in range(n - 1):
            push(i, heap)
        heapq.heapify(heap)
        while heap:
            _, i, a, b, m = heapq.heappop(heap)
            j = nxt[i]
            if not alive[i] or j >= n or sym[i] != a or sym[j] != b:
                continue  # stale
            sym[i], alive[j] = m, False
            nxt[i] = nxt[j]
            if nxt[j] < n:
                prev[nxt[j]] = i
            for k in (prev[i], i):
                if k >= 0:
                    new: list = []
                    push(k, new)
                    for e in new:
                        heapq.heappush(heap, e)
        return [i for i in range(n) if alive[i]]

    def decode(self, ids, skip_special: bool = False) -> str:
        """Pieces concatenated (byte tokens as raw bytes); the space after a BOS is the dummy prefix, dropped.
        BOS and EOS write no text (as llama2.c's run.c and llama.cpp's detokenizer: a story ends where the next
        begins); other special tokens are written by name unless skip_special."""
        out, prev = bytearray(), None
        bos = self.special.get("<s>")
        silent = {bos, self.special.get("</s>")}
        for t in ids:
            t = int(t)
            if t in self.names or not 0 <= t < self.vocab_size:
                if t in self.names and not skip_special and t not in silent:
                    out += self.names[t].encode()
                prev = t
                continue
            p = self.pieces[t]
            if t in self.byte_of:
                out.append(self.byte_of[t])
            else:
                out += p[1:] if prev == bos and p.startswith(b" ") else p
            prev = t
        return out.decode("utf-8", "replace")
