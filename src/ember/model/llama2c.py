"""Load Karpathy's llama2.c checkpoints (e.g. stories260K.bin) into ember's GPT (their tok*.bin tokenizers
are read by ember.tokenizer's SentencePiece backend).

    model = load_llama2c("../shared/datasets/models/stories260K/stories260K.bin")
    tok = load_tokenizer("../shared/datasets/models/stories260K/tok512.bin")   # ember.tokenizer (SentencePiece)
    model(torch.tensor([tok.encode_prompt("Once upon a time")]))              # real pretrained logits

A tiny real model makes tests of sampling, evaluation and serving meaningful on a CPU in milliseconds.
llama2.c rotates ADJACENT pairs in RoPE (Meta's layout); ember rotates halves (HF's), so q/k rows are permuted.
"""

from __future__ import annotations

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


def stories260k_paths(root: str | Path | None = None) -> tuple[Path, Path] | None:
    """(stories260K.bin, tok512.bin) in ../shared/datasets/models/stories260K, or None when absent."""
    if root is None:
        root = datasets_dir() / "models" / "stories260K"
    root = Path(root)
    model, tok = root / "stories260K.bin", root / "tok512.bin"
    return (model, tok) if model.is_file() and tok.is_file() else None
