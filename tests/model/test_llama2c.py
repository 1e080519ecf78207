"""llama2.c checkpoints and tokenizers into ember: a synthetic checkpoint against a numpy reference forward
(Meta's adjacent-pair RoPE, as llama2.c), and the real stories260K against its documented greedy text."""

import random
import struct

import numpy as np
import pytest
import torch

from ember.common.errors import UserError
from ember.tokenizer.special import load_tokenizer
from ember.model.llama2c import hf_to_meta, load_llama2c, meta_to_hf


def write_llama2c(path, dim=16, hidden=40, L=2, H=4, KV=2, V=32, S=24, tied=True, seed=0):
    rng = np.random.default_rng(seed)
    hd, kv = dim // H, KV * (dim // H)
    shapes = [(V, dim), (L, dim), (L, dim, dim), (L, kv, dim), (L, kv, dim), (L, dim, dim), (L, dim),
              (L, hidden, dim), (L, dim, hidden), (L, hidden, dim), (dim,), (S, hd // 2), (S, hd // 2)]
    shapes += [] if tied else [(V, dim)]
    arrays = [rng.normal(0, 0.3, s).astype(np.float32) for s in shapes]
    arrays[1] += 1.0  # rms gains near 1
    path.write_bytes(struct.pack("7i", dim, hidden, L, H, KV, V if tied else -V, S) + b"".join(a.tobytes() for a in arrays))
    names = ["emb", "rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3", "rms_f", "fc", "fs"]
    w = dict(zip(names + ([] if tied else ["wcls"]), arrays))
    w["wcls"] = w["emb"] if tied else w["wcls"]
    return w, (dim, hidden, L, H, KV, V, S)


def numpy_forward(w, cfg, tokens):
    """llama2.c's math in float64 numpy: RMSNorm, RoPE on ADJACENT pairs, GQA, SwiGLU."""
    dim, hid, L, H, KV, V, S = cfg
    hs, T = dim // H, len(tokens)
    rms = lambda x, g: x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * g
    ang = np.arange(T)[:, None] * (1.0 / (10000.0 ** (np.arange(0, hs, 2) / hs)))
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]

    def rope(q):
        q2 = q.reshape(T, q.shape[1], hs // 2, 2)
        a, b = q2[..., 0], q2[..., 1]
        return np.stack([a * cos - b * sin, a * sin + b * cos], -1).reshape(q.shape)

    x = w["emb"][tokens].astype(np.float64)
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for l in range(L):
        h = rms(x, w["rms_att"][l])
        q = rope((h @ w["wq"][l].T).reshape(T, H, hs))
        k = np.repeat(rope((h @ w["wk"][l].T).reshape(T, KV, hs)), H // KV, 1)
        v = np.repeat((h @ w["wv"][l].T).reshape(T, KV, hs), H // KV, 1)
        att = np.einsum("thd,shd->hts", q, k) / np.sqrt(hs) + mask
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        x = x + np.einsum("hts,shd->thd", att, v).reshape(T, dim) @ w["wo"][l].T
        h = rms(x, w["rms_ffn"][l])
        a = h @ w["w1"][l].T
        x = x + ((a / (1 + np.exp(-a))) * (h @ w["w3"][l].T)) @ w["w2"][l].T
    return rms(x, w["rms_f"]) @ w["wcls"].T


@pytest.mark.parametrize("tied", [True, False])
def test_synthetic_checkpoint_matches_numpy_reference(tmp_path, tied):
    w, cfg = write_llama2c(tmp_path / "m.bin", tied=tied)
    model = load_llama2c(tmp_path / "m.bin")
    assert model.config.tie_embeddings == tied and model.config.n_kv_head == 2 and model.config.ffn_dim == 40
    tokens = [1, 5, 9, 3, 30, 7, 7, 2]
    with torch.no_grad():
        got = model(torch.tensor([tokens]))[0].double().numpy()
    np.testing.assert_allclose(got, numpy_forward(w, cfg, tokens), rtol=1e-4, atol=1e-4)


def test_permutations_are_inverse_and_turn_adjacent_rope_into_rotate_half():
    w = torch.randn(4 * 8, 5)
    assert torch.equal(hf_to_meta(meta_to_hf(w, 4), 4), w)
    # rotating adjacent pairs (2i, 2i+1) of w @ x equals rotating halves (i, i + 4) of meta_to_hf(w) @ x
    x, theta = torch.randn(5), 0.7
    y = (w @ x).view(4, 4, 2)
    adj = torch.stack([y[..., 0] * np.cos(theta) - y[..., 1] * np.sin(theta),
                       y[..., 0] * np.sin(theta) + y[..., 1] * np.cos(theta)], -1)
    z = (meta_to_hf(w, 4) @ x).view(4, 2, 4)
    halves = torch.stack([z[:, 0] * np.cos(theta) - z[:, 1] * np.sin(theta),
                          z[:, 0] * np.sin(theta) + z[:, 1] * np.cos(theta)], 1)
    assert torch.allclose(meta_to_hf(adj.reshape(-1, 1), 4).view(4, 2, 4), halves, atol=1e-6)


def test_corrupt_files_are_user_errors(tmp_path):
    write_llama2c(tmp_path / "m.bin")
    data = (tmp_path / "m.bin").read_bytes()
    (tmp_path / "short.bin").write_bytes(data[:-8])
    with pytest.raises(UserError, match="truncated"):
        load_llama2c(tmp_path / "short.bin")
    (tmp_path / "junk.bin").write_bytes(b"\xff" * 40)
    with pytest.raises(UserError, match="not a llama2.c"):
        load_llama2c(tmp_path / "junk.bin")
    with pytest.raises(UserError, match="no llama2.c checkpoint"):
        load_llama2c(tmp_path / "missing.bin")
    (tmp_path / "tok.bin").write_bytes(struct.pack("i", 4) + struct.pack("fi", 0.0, 99) + b"ab")
    with pytest.raises(UserError, match="bad length"):
        load_tokenizer(tmp_path / "tok.bin")


# ---------------------------------------------------------------------------- the real stories260K

def test_stories260k_greedy_matches_documented_output(stories):
    model, tok = stories
    ids = [tok.bos_id]
    with torch.no_grad():
        for _ in range(45):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert tok.decode(ids).startswith("Once upon a time, there was a little girl named Lily. She loved to play "
                                      "outside in the park.")  # llama2.c doc/stories260K.md
    assert tok.encode_prompt(tok.decode(ids[:20], skip_special=True)) == ids[:20]  # the model's own tokens re-encode identically


def naive_encode(tok, text):
    """llama2.c's run.c encode, literally: scan all pairs, merge the best, repeat."""
    ids = []
    for ch in " " + text:
        b = ch.encode()
        ids += [tok.backend.index[b]] if b in tok.backend.index else [tok.backend.byte_ids[x] for x in b]
    while True:
        best, at = None, -1
        for i in range(len(ids) - 1):
            j = tok.backend.index.get(tok.backend.pieces[ids[i]] + tok.backend.pieces[ids[i + 1]])
            if j is not None and (best is None or tok.backend.scores[j] > tok.backend.scores[best]):
                best, at = j, i
        if best is None:
            return ids
        ids[at:at + 2] = [best]


def test_tokenizer_against_naive_encoder_and_round_trip(stories):
    _, tok = stories
    text = ("Once upon a time, Tom's dog ran to the park. \"Wow!\" said Mia; 3 + 4 = 7?\n\n"
            "Café, naïve, 日本, emoji 😀 and tabs\tend.")
    rng = random.Random(0)
    for _ in range(100):
        a = rng.randrange(len(text))
        piece = text[a:a + 1 + rng.randrange(60)]
        assert tok.encode(piece) == naive_encode(tok, piece)
        assert tok.decode(tok.encode_prompt(piece), skip_special=True) == piece
    assert tok.encode("") == [] and tok.encode_prompt("hi") == [1] + tok.encode("hi") and tok.stop_ids[:1] == (2,)
