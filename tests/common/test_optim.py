"""LR schedules against hand-computed values, AdamW parameter groups, and the spike guard's verdicts."""

import math

import pytest

from ember.model.gpt import GPTConfig, build_model
from ember.common.optim import SpikeGuard, lr_factor, param_groups


def test_warmup_then_cosine():
    f = [lr_factor(s, total=13, warmup=2, schedule="cosine", min_ratio=0.1) for s in range(13)]
    assert f[:2] == [0.5, 1.0]  # warmup: (step+1)/2
    assert f[2] == pytest.approx(1.0)  # cosine starts at the peak after warmup ...
    assert f[7] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # ... 0.55 halfway ...
    assert f[12] == pytest.approx(0.1)  # ... and ends at min_ratio on the last step
    assert [lr_factor(s, 100, 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_warmup_stable_decay():
    f = [lr_factor(s, total=10, warmup=2, schedule="wsd", decay_frac=0.2, min_ratio=0.0) for s in range(10)]
    assert f == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.0])


def test_no_weight_decay_on_norms_and_embeddings():
    model = build_model(GPTConfig(vocab_size=32, n_layer=1, n_head=2, n_kv_head=2, n_embd=16, max_seq_len=8))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert sorted(names[id(p)] for p in no_decay["params"]) == [
        "layers.0.attn_norm.weight", "layers.0.mlp_norm.weight", "norm.weight", "tok_emb.weight"]
    assert "lm_head.weight" in {names[id(p)] for p in decay["params"]}


def test_spike_guard_verdicts():
    g = SpikeGuard(z=6.0, window=20, rollback_after=2, min_history=10)
    assert g.check(float("nan")) == "nonfinite" and g.check(float("inf")) == "nonfinite"
    assert g.check(100.0) == "ok"  # too little history to judge a spike
    for i in range(10):
        g.update(3.0 + 0.1 * (i % 2), "ok")  # mean 3.05, std 0.05, floored at 1% of the mean = 0.0305... -> 0.05
    assert g.check(3.3) == "ok"  # z = 5
    assert g.check(3.4) == "spike"  # z = 7
    assert g.update(3.4, "spike") is False  # one bad step: skip
    assert g.update(float("nan"), "nonfinite") is True  # two in a row: roll back
    assert g.update(3.0, "ok") is False and g.bad_streak == 0


def test_spike_guard_std_floor_and_state_roundtrip():
    g = SpikeGuard(z=3.0, window=5, min_history=5)
    for _ in range(5):
        g.update(2.0, "ok")  # zero variance: the floor (1% of the mean = 0.02) keeps noise from being a spike
    assert g.check(2.05) == "ok" and g.check(2.07) == "spike"
    h = SpikeGuard(z=3.0, window=5, min_history=5)
    h.load_state_dict(g.state_dict())
    assert list(h.history) == list(g.history) and h.check(2.07) == "spike"
