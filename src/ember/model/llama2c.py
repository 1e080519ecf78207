"""Load Karpathy's llama2.c checkpoints (e.g. stories260K.bin) into ember's GPT, and their tok*.bin tokenizers.

    model = load_llama2c("../shared/datasets/models/stories260K/stories260K.bin")
    tok = Llama2cTokenizer.load("../shared/datasets/models/stories260K/tok512.bin")
    model(torch.tensor([tok.encode("Once upon a time", bos=True)]))          # real pretrained logits

A tiny real model makes tests of sampling, evaluation and serving meaningful on a CPU in milliseconds.
llama2.c rotates ADJACENT pairs in RoPE (Meta's layout); ember rotates halves (HF's), so q/k rows are permuted.
"""

from __future__ import annotations

import heapq
import re
import struct
from pathlib import Path

import numpy as np
import torch

from ember.common.errors import UserError
from ember.common.paths import datasets_dir
from ember.model.gpt import GPT, GPTConfig, build_model


def meta_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q/k projection rows from Meta's interleaved RoPE layout (pairs 2i, 2i+1) to HF's halves (i, i+hd/2).

    Per head, row 2i goes to i and row 2i+1 to i + head_dim/2: exactly transformers'
    convert_llama_weights_to_hf `permute`. w: (n_heads * head_dim, in).
    """
    out, d_in = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, d_in).transpose(1, 2).reshape(out, d_in)


def hf_to_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of meta_to_hf: llama.cpp's convert_hf_to_gguf `permute` (GGUF llama q/k rows)."""
    out, d_in = w.shape
    return w.view(n_heads, 2, out // n_heads // 2, d_in).transpose(1, 2).reshape(out, d_in)


# ---------------------------------------------------------------------------- model

def load_llama2c(path: str | Path, device: torch.device | str = "cpu") -> GPT:
    """A llama2.c legacy (version 0) checkpoint as an fp32 ember GPT.

    Layout: 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size (negative = untied
    classifier), seq_len), then fp32 arrays in nn.Linear (out, in) layout: tok_emb (V, d), rms_att (L, d),
    wq (L, d, d), wk (L, kv, d), wv (L, kv, d), wo (L, d, d), rms_ffn (L, d), w1 (L, h, d), w2 (L, d, h),
    w3 (L, h, d), rms_final (d), freq_cos/sin (S, hd/2, unused: ember computes RoPE), [wcls (V, d)].
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no llama2.c checkpoint at {path}: pass the .bin file written by llama2.c's export")
    raw = path.read_bytes()
    if len(raw) < 28:
        raise UserError(f"{path}: {len(raw)} bytes is too short for a llama2.c checkpoint (28-byte header)")
    dim, hidden, n_layer, n_head, n_kv, vocab, seq_len = struct.unpack("7i", raw[:28])
    tied, vocab = vocab > 0, abs(vocab)
    if min(dim, hidden, n_layer, n_head, n_kv, vocab, seq_len) <= 0 or dim % n_head or n_head % n_kv:
        raise UserError(f"{path}: header {(dim, hidden, n_layer, n_head, n_kv, vocab, seq_len)} is not a llama2.c "
                        f"legacy checkpoint (version-1/2 exports with a magic number are not supported)")
    hd, kv = dim // n_head, n_kv * (dim // n_head)
    flat = np.frombuffer(raw, dtype=np.float32, offset=28)
    shapes = [("tok_emb", (vocab, dim)), ("rms_att", (n_layer, dim)), ("wq", (n_layer, dim, dim)),
              ("wk", (n_layer, kv, dim)), ("wv", (n_layer, kv, dim)), ("wo", (n_layer, dim, dim)),
              ("rms_ffn", (n_layer, dim)), ("w1", (n_layer, hidden, dim)), ("w2", (n_layer, dim, hidden)),
              ("w3", (n_layer, hidden, dim)), ("rms_final", (dim,)), ("freq_cos", (seq_len, hd // 2)),
              ("freq_sin", (seq_len, hd // 2))] + ([] if tied else [("wcls", (vocab, dim))])
    need = sum(int(np.prod(s)) for _, s in shapes)
    if flat.size != need:
        raise UserError(f"{path}: holds {flat.size} floats after the header, the header implies {need}; "
                        f"the file is truncated or not a llama2.c legacy checkpoint")
    w, o = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        w[name] = torch.from_numpy(flat[o:o + n].copy()).view(shape)
        o += n

    config = GPTConfig(vocab_size=vocab, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv, n_embd=dim,
                       ffn_hidden=hidden, max_seq_len=seq_len, rope_theta=10000.0, norm_eps=1e-5,
                       tie_embeddings=tied)
    sd = {"tok_emb.weight": w["tok_emb"], "norm.weight": w["rms_final"]}
    if not tied:
        sd["lm_head.weight"] = w["wcls"]
    for i in range(n_layer):
        p = f"layers.{i}."
        sd[p + "attn_norm.weight"] = w["rms_att"][i]
        sd[p + "attn.q_proj.weight"] = meta_to_hf(w["wq"][i], n_head)
        sd[p + "attn.k_proj.weight"] = meta_to_hf(w["wk"][i], n_kv)
        sd[p + "attn.v_proj.weight"] = w["wv"][i]
        sd[p + "attn.o_proj.weight"] = w["wo"][i]
        sd[p + "mlp_norm.weight"] = w["rms_ffn"][i]
        sd[p + "mlp.gate_proj.weight"] = w["w1"][i]
        sd[p + "mlp.down_proj.weight"] = w["w2"][i]
        sd[p + "mlp.up_proj.weight"] = w["w3"][i]
    model = build_model(config, device, init=False)
    model.load_state_dict(sd, strict=True)
    return model.eval()


# ---------------------------------------------------------------------------- tokenizer

_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class Llama2cTokenizer:
    """SentencePiece-style BPE of llama2.c (run.c's `encode`/`decode`), from a tok*.bin file.

    Ids 0, 1, 2 are <unk>, <s> (BOS), </s> (EOS); pieces use ' ' where SentencePiece writes '▁' and
    "<0x0A>"-style byte tokens cover what the pieces do not. Same interface as ember's Tokenizer where they
    overlap: encode, decode, bos_id, eos_id, vocab_size, id_to_token. No chat template (a base model).
    """

    unk_id, bos_id, eos_id = 0, 1, 2

    def __init__(self, pieces: list[bytes], scores: list[float]):
        self.pieces, self.scores = pieces, scores
        self.vocab_size = len(pieces)
        self.index = {p: i for i, p in enumerate(pieces)}
        self.byte_ids = {}  # byte value -> id of its <0xXX> token
        for i, p in enumerate(pieces):
            m = _BYTE.match(p.decode("latin-1"))
            if m:
                self.byte_ids[int(m.group(1), 16)] = i
        self.byte_of = {i: b for b, i in self.byte_ids.items()}  # id -> byte value
        self.stop_ids = (self.bos_id, self.eos_id)  # a story ends where the model starts the next one (BOS)

    @classmethod
    def load(cls, path: str | Path, vocab_size: int | None = None) -> "Llama2cTokenizer":
        """vocab_size: how many entries to read (the .bin does not store it; default = until the file ends)."""
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
        return cls(pieces, scores)

    def id_to_token(self, i: int) -> str | None:
        return self.pieces[i].decode("utf-8", "replace") if 0 <= i < self.vocab_size else None

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """SentencePiece encoding: a leading space (the "dummy prefix"), one token per character (or its
        UTF-8 bytes if the character is not a piece), then repeatedly merge the adjacent pair whose merged
        piece has the highest score (the leftmost on ties), until no pair merges: llama2.c's `encode`."""
        ids = []
        if text:
            text = " " + text
        for ch in text:
            b = ch.encode("utf-8")
            if b in self.index:
                ids.append(self.index[b])
            else:
                ids += [self.byte_ids.get(x, self.unk_id) for x in b]
        return ([self.bos_id] if bos else []) + self._merge(ids) + ([self.eos_id] if eos else [])

    def _merge(self, sym: list[int]) -> list[int]:
        """The greedy merges in O(n log n), so a long hostile prompt cannot stall a server: a linked list of
        symbols and a heap of candidate pairs (-score, left position, left id, right id, merged id); an entry
        whose symbols changed since it was pushed is stale and skipped. Positions keep their original order,
        so the heap's tie-break on position is llama2.c's leftmost-first rule."""
        n = len(sym)
        nxt, prev, alive = list(range(1, n + 1)), list(range(-1, n - 1)), [True] * n
        heap: list[tuple] = []

        def push(i: int) -> None:
            j = nxt[i]
            if j < n:
                m = self.index.get(self.pieces[sym[i]] + self.pieces[sym[j]])
                if m is not None:
                    heap.append((-self.scores[m], i, sym[i], sym[j], m))

        for i in range(n - 1):
            push(i)
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
                    j = nxt[k]
                    if j < n:
                        mm = self.index.get(self.pieces[sym[k]] + self.pieces[sym[j]])
                        if mm is not None:
                            heapq.heappush(heap, (-self.scores[mm], k, sym[k], sym[j], mm))
        return [t for t, ok in zip(sym, alive) if ok]

    def decode(self, ids) -> str:
        """Concatenate pieces (byte tokens as raw bytes); the space after a BOS is the dummy prefix, dropped.
        BOS/EOS themselves produce no text."""
        out, prev = bytearray(), None
        for t in ids:
            t = int(t)
            if t in (self.bos_id, self.eos_id) or not 0 <= t < self.vocab_size:
                prev = t
                continue
            p = self.pieces[t]
            if t in self.byte_of:
                out.append(self.byte_of[t])
            else:
                out += p[1:] if prev == self.bos_id and p.startswith(b" ") else p
            prev = t
        return out.decode("utf-8", "replace")


def stories260k_paths(root: str | Path | None = None) -> tuple[Path, Path] | None:
    """(stories260K.bin, tok512.bin) in ../shared/datasets/models/stories260K, or None when absent."""
    if root is None:
        root = datasets_dir() / "models" / "stories260K"
    root = Path(root)
    model, tok = root / "stories260K.bin", root / "tok512.bin"
    return (model, tok) if model.is_file() and tok.is_file() else None
