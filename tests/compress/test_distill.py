"""`ember distill` on a tiny teacher trained here on counting documents: the KL falls, the distilled student beats
the same student trained from scratch on the same tokens (held-out loss), the top-k teacher cache round-trips and
is reused, the KL functions against hand values, chat data, and one-line errors; a failed run is not finished."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ember.common import artifacts
from ember.common.checkpoint import load_state, save_model
from ember.common.errors import UserError
from ember.compress import distill
from ember.compress.distill import Config, kl_full, kl_topk
from ember.data.loader import TokenLoader
from ember.model.gpt import GPTConfig, build_model

V, EOS, T = 64, 1, 32


def write_tokens(folder: Path, splits: dict) -> Path:
    """{split}_00000.bin (uint16) + meta.json, as `ember tokenize` writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"dtype": "uint16", "vocab_size": V, "eos_id": EOS, "tokenizer_sha256": "fixture", "splits": {}}
    for split, toks in splits.items():
        (folder / f"{split}_00000.bin").write_bytes(np.asarray(toks, dtype=np.uint16).tobytes())
        meta["splits"][split] = {"shards": [{"file": f"{split}_00000.bin", "tokens": len(toks), "documents": 1,
                                             "bytes": len(toks)}]}
    artifacts.write_json(folder / "meta.json", meta)
    return folder


def docs(n_tokens: int, seed: int) -> np.ndarray:
    """Documents counting upward by a per-document stride (1 or 2) mod V from a random start, each ended by EOS:
    the next token is predictable once the stride is seen, so a trained teacher has confident, structured outputs."""
    rng = np.random.default_rng(seed)
    out, n = [], 0
    while n < n_tokens:
        start, length, stride = rng.integers(3, V), rng.integers(8, 40), rng.integers(1, 3)
        d = np.append(3 + (start - 3 + stride * np.arange(length)) % (V - 3), EOS)
        out.append(d)
        n += len(d)
    return np.concatenate(out)[:n_tokens]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(token folder, teacher checkpoint): the teacher is 2 layers x 64 wide, 150 steps (~2 s)."""
    root = tmp_path_factory.mktemp("distill")
    tokens = write_tokens(root / "tokens", {"train": docs(60_000, 0), "val": docs(6_000, 1)})
    torch.manual_seed(0)
    teacher = build_model(GPTConfig(vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, max_seq_len=T), "cpu")
    opt = torch.optim.AdamW(teacher.parameters(), lr=1e-2)
    loader = TokenLoader(tokens, "train", 16, T, seed=123)  # another order than the students see
    for _ in range(150):
        x, y = loader.next_batch()
        teacher(x, y).backward()
        opt.step()
        opt.zero_grad()
    save_model(root / "teacher", teacher)
    return tokens, root / "teacher"


def cfg(run: Path, setup, **kw) -> Config:
    tokens, teacher = setup
    base = dict(run=str(run), teacher=str(teacher), data=str(tokens), student="from_depth:1", seq_len=T,
                batch_size=8, steps=40, lr=1e-2, warmup_steps=4, eval_every=0, eval_batches=8, log_every=20,
                temperature=2.0, alpha=0.9, dtype="fp32", seed=0)
    base.update(kw)
    return Config(**base)


def test_distilled_student_beats_scratch_on_same_tokens(tmp_path, setup):
    kd = distill.main(cfg(tmp_path / "kd", setup))
    scratch = distill.main(cfg(tmp_path / "scratch", setup, alpha=0.0))  # same init, same batches, CE only
    assert kd["val_kl"] < kd["val_kl_before"] / 2  # the student moved toward the teacher
    assert kd["val_loss"] < scratch["val_loss"] - 0.05, (kd, scratch)
    assert kd["student_params"] < kd["teacher_params"]
    final = tmp_path / "kd" / "distill" / "final"
    assert (final / "model.safetensors").is_file() and artifacts.is_finished(tmp_path / "kd" / "distill")
    again = distill.main(cfg(tmp_path / "kd", setup))  # same config and inputs: cached
    assert again == kd


def test_topk_cache_round_trip_and_reuse(tmp_path, setup, capsys):
    c = cfg(tmp_path / "a", setup, steps=6, cache_topk=8, cache_dir=str(tmp_path / "cache"))
    out = distill.main(c)
    assert out["cached_topk"] == 8
    shard, _ = load_state(tmp_path / "cache" / "shard_00000.safetensors")
    assert shard["values"].shape == (6, 8, T, 8) and shard["values"].dtype == torch.float16
    assert shard["indices"].dtype == torch.int32 and shard["x"].shape == (6, 8, T)
    teacher = distill.load_model(setup[1])  # the cached x are the training batches: the teacher's top-k at them
    with torch.no_grad():
        logits = teacher(shard["x"][2].long())
    vals, idx = logits.topk(8, dim=-1)
    assert torch.equal(shard["indices"][2].long(), idx)
    assert torch.allclose(shard["values"][2].float(), vals, atol=2e-2)
    assert torch.allclose(shard["logz"][2], (logits / 2.0).logsumexp(-1), atol=1e-5)
    mtime = (tmp_path / "cache" / "meta.json").stat().st_mtime_ns
    capsys.readouterr()
    distill.main(cfg(tmp_path / "b", setup, steps=6, cache_topk=8, cache_dir=str(tmp_path / "cache"), lr=5e-3))
    assert "reusing the teacher cache" in capsys.readouterr().out  # another student config: the same cache
    assert (tmp_path / "cache" / "meta.json").stat().st_mtime_ns == mtime
    distill.main(cfg(tmp_path / "c", setup, steps=6, cache_topk=4, cache_dir=str(tmp_path / "cache")))
    assert artifacts.read_json(tmp_path / "cache" / "meta.json")["topk"] == 4  # another k: rebuilt


def test_kl_functions():
    s, t = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])  # p_s = (1/2, 1/2), p_t = (3/4, 1/4)
    fwd = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    rev = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert kl_full(s, t, 1.0).item() == pytest.approx(fwd, abs=1e-6)
    assert kl_full(s, t, 1.0, reverse=True).item() == pytest.approx(rev, abs=1e-6)
    assert kl_full(t, t, 2.0).abs().max() < 1e-6
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(16, 50, generator=g), 3 * torch.randn(16, 50, generator=g)
    full = kl_full(s, t, 2.0)
    for reverse in (False, True):
        ref = kl_full(s, t, 2.0, reverse=reverse)
        vals, idx = t.topk(50, dim=-1)  # k = V: no tail, the exact KL
        exact = kl_topk(s, vals, idx, (t / 2.0).logsumexp(-1), 2.0, reverse=reverse)
        assert torch.allclose(exact, ref, atol=1e-4)
    vals, idx = t.topk(5, dim=-1)  # k < V: a lower bound (data processing), and not a trivial one
    approx = kl_topk(s, vals, idx, (t / 2.0).logsumexp(-1), 2.0)
    assert (approx <= full + 1e-5).all() and approx.mean() > 0.3 * full.mean()
    # gradients flow to the student through the top-k form
    s.requires_grad_(True)
    kl_topk(s, vals, idx, (t / 2.0).logsumexp(-1), 2.0).sum().backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_reverse_kl_and_hidden_mse_with_projection(tmp_path, setup):
    out = distill.main(cfg(tmp_path, setup, steps=5, reverse_kl=0.5, hidden_mse=1.0, student="from_depth:2",
                           dtype="bf16"))  # autocast: the losses are computed in fp32 all the same
    assert math.isfinite(out["val_loss"])  # from_depth:2 is 128 wide, the teacher 64: a projection between them
    from ember.common.log import read_metrics

    logged = [r for r in read_metrics(tmp_path / "distill" / "metrics.jsonl") if "mse" in r]
    assert len(logged) == 5 and logged[-1]["mse"] < logged[0]["mse"]


def test_pruned_student_from_a_path(tmp_path, setup):
    from ember.compress.prune import prune_structured

    teacher = distill.load_model(setup[1])
    small, _ = prune_structured(teacher, torch.randint(3, V, (4, T)), ffn=0.5)
    save_model(tmp_path / "pruned", small)
    out = distill.main(cfg(tmp_path / "run", setup, student=str(tmp_path / "pruned"), steps=10, lr=1e-3))
    assert out["val_loss"] < out["val_loss_before"]


def test_chat_data(tmp_path):
    from ember.tokenizer.train import train_tokenizer

    tok = train_tokenizer(["what is two plus two? four. hello there, how are you? fine. " * 4], 300, 1)
    torch.manual_seed(0)
    teacher = build_model(GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=1, n_embd=32,
                                    max_seq_len=64), "cpu")
    save_model(tmp_path / "teacher", teacher)
    tok.save(tmp_path / "teacher")
    convs = [{"messages": [{"role": "user", "content": f"what is {i} plus {i}?"},
                           {"role": "assistant", "content": f"it is {2 * i}."}]} for i in range(20)]
    artifacts.write_text(tmp_path / "chat.jsonl", "".join(__import__("json").dumps(c) + "\n" for c in convs))
    x, y = distill.chat_rows(str(tmp_path / "chat.jsonl"), tok, 64)
    assert x.shape == (20, 64) and ((y != -100).sum(dim=1) > 0).all() and (y == -100).any()
    out = distill.main(Config(run=str(tmp_path / "run"), teacher=str(tmp_path / "teacher"),
                              data=str(tmp_path / "chat.jsonl"), student="from_depth:1", seq_len=64, batch_size=4,
                              steps=3, eval_every=0, dtype="fp32", val_fraction=0.2))
    assert math.isfinite(out["val_loss"])
    assert (tmp_path / "run" / "distill" / "final" / "tokenizer.json").is_file()  # the teacher's, beside the student


def test_bad_inputs(tmp_path, setup):
    with pytest.raises(UserError, match="from_depth takes a layer count"):
        cfg(tmp_path, setup, student="from_depth:0")
    with pytest.raises(UserError, match="cache_topk' and 'hidden_mse'"):
        cfg(tmp_path, setup, cache_topk=4, hidden_mse=1.0)
    with pytest.raises(UserError, match="alpha"):
        cfg(tmp_path, setup, alpha=1.5)
    other = build_model(GPTConfig(vocab_size=V + 8, n_layer=1, n_head=2, n_kv_head=2, n_embd=32, max_seq_len=T), "cpu")
    save_model(tmp_path / "other", other)
    with pytest.raises(UserError, match="vocabulary"):
        distill.main(cfg(tmp_path / "r1", setup, student=str(tmp_path / "other")))
    with pytest.raises(UserError, match="seq_len"):
        distill.main(cfg(tmp_path / "r2", setup, seq_len=T * 2))


def test_failed_run_does_not_look_finished(tmp_path, setup, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("killed while saving")

    monkeypatch.setattr(distill, "save_model", boom)
    with pytest.raises(RuntimeError):
        distill.main(cfg(tmp_path, setup, steps=2))
    stage = tmp_path / "distill"
    assert not artifacts.is_finished(stage) and not (stage / "final").exists()
    assert artifacts.read_json(stage / "meta.json")["status"] == "running"
