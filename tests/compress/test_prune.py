"""Pruning on tiny random models: exact sparsity, Wanda beating magnitude on outlier channels, the 2:4 pattern,
structured pruning that really shrinks (and saves/loads), the near-identity layer dropped, recovery that lowers
the loss and keeps the zeros, and one-line errors for methods that do not fit."""

import pytest
import torch

from ember.common.checkpoint import save_model
from ember.common.errors import UserError
from ember.compress.prune import (_plan_heads, layer_scores, prunable, prune_2_4, prune_magnitude, prune_structured,
                                  prune_wanda)
from ember.compress.recover import recover
from ember.model.gpt import GPTConfig, build_model
from ember.model.load import load
from ember.tokenizer.train import train_tokenizer

V, T = 64, 32


def tiny(n_layer=2, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=V, n_layer=n_layer, n_head=4, n_kv_head=2, n_embd=32, ffn_hidden=64, max_seq_len=T)
    cfg.update(kw)
    return build_model(GPTConfig(**cfg), "cpu").eval()


def windows(n, seed=1, length=T):
    """Counting sequences mod V from random starts: (n, length) int64 (learnable structure for recovery)."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, V, (n, 1), generator=g)
    return (start + torch.arange(length)) % V


def clone(model):
    m = build_model(model.config, "cpu", init=False)
    m.load_state_dict(model.state_dict())
    return m.eval()


def test_magnitude_reaches_exact_sparsity_per_matrix():
    model, info = prune_magnitude(tiny(), 0.5)
    for name, m in prunable(model):
        assert int((m.weight == 0).sum()) == m.weight.numel() // 2, name
    assert info["sparsity"] == 0.5 and info["matrices"] == 2 * 7
    assert (model.tok_emb.weight != 0).all() and (model.lm_head.weight != 0).all()  # embedding and head untouched


def test_wanda_exact_per_row_and_differs_from_magnitude():
    calib = windows(8)
    model, info = prune_wanda(tiny(), calib, 0.25)
    for name, m in prunable(model):
        assert ((m.weight == 0).sum(dim=1) == m.in_features // 4).all(), name  # 25% of every output row
    assert info["sparsity"] == 0.25
    mag, _ = prune_magnitude(tiny(), 0.25)
    assert any(not torch.equal(a.weight == 0, b.weight == 0) for (_, a), (_, b) in zip(prunable(model), prunable(mag)))


def test_wanda_beats_magnitude_with_outlier_channels():
    """LLM activations have a few huge input channels (Dettmers et al. 2022). Made here by the norm gains: small
    weights on those channels carry much output, which magnitude pruning throws away and Wanda keeps."""
    dense = tiny(n_layer=2, seed=3)
    with torch.no_grad():
        for block in dense.layers:
            for norm in (block.attn_norm, block.mlp_norm):
                norm.weight[:4] = 20.0  # 4 outlier channels of 32
    calib, held_out = windows(16, seed=1), windows(16, seed=2)
    with torch.no_grad():
        ref = dense(held_out)

        def err(model):
            return (model(held_out) - ref).square().mean().item()

        e_mag = err(prune_magnitude(clone(dense), 0.5)[0])
        e_wanda = err(prune_wanda(clone(dense), calib, 0.5)[0])
    assert e_wanda < 0.7 * e_mag, (e_wanda, e_mag)


@pytest.mark.parametrize("score", ["wanda", "magnitude"])
def test_2_4_pattern_in_every_group(score):
    model, info = prune_2_4(tiny(), windows(8), score=score)
    for name, m in prunable(model):
        groups = (m.weight == 0).reshape(m.out_features, -1, 4).sum(dim=-1)
        assert (groups == 2).all(), name
    assert info["sparsity"] == 0.5 and info["score"] == score


def test_2_4_refuses_width_not_divisible_by_4():
    model = tiny(n_embd=30, n_head=1, n_kv_head=1)  # q/k/v/gate/up see 30 inputs
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match=r"layers\.0\.attn\.q_proj has 30"):
        prune_2_4(model, score="magnitude")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing was touched


def test_structured_shrinks_runs_and_round_trips(tmp_path):
    tok = train_tokenizer(["hello world, this is ember. " * 5], 280, 1)
    model = tiny(n_layer=3, vocab_size=tok.vocab_size)
    calib = windows(8)
    small, info = prune_structured(model, calib, heads=0.5, ffn=0.25, layers=1)
    c = small.config
    assert (c.n_layer, c.n_head, c.n_kv_head, c.head_dim, c.ffn_hidden) == (2, 2, 1, 8, 48)
    assert info["params_after"] == small.num_params() < model.num_params() == info["params_before"]
    a = small.layers[0].attn
    assert a.q_proj.weight.shape == (16, 32) and a.k_proj.weight.shape == (8, 32) and a.o_proj.weight.shape == (32, 16)
    assert small.layers[0].mlp.down_proj.weight.shape == (32, 48)
    assert model.config.n_layer == 3  # the input model is left as it was
    x = windows(2, seed=5)
    with torch.no_grad():
        logits = small(x)
        loss = small(x[:, :-1], x[:, 1:])
    assert logits.shape == (2, T, tok.vocab_size) and torch.isfinite(loss)
    save_model(tmp_path / "m", small)
    tok.save(tmp_path / "m")
    again, _ = load(tmp_path / "m")  # the one loader: config from the file, tokenizer beside it
    assert again.config == small.config
    with torch.no_grad():
        assert torch.allclose(again(x), logits, atol=1e-6)


def test_structured_queries_within_groups_and_mha():
    c = GPTConfig(vocab_size=V, n_layer=1, n_head=8, n_kv_head=2, n_embd=64, max_seq_len=T)
    assert _plan_heads(c, 0.5) == ("groups", 1)  # 1 of 2 groups
    assert _plan_heads(c, 0.25) == ("queries", 1)  # 0.25 * 2 groups rounds to 0: 1 of 4 queries in each group
    small, info = prune_structured(tiny(n_head=8, n_kv_head=2, n_embd=64), windows(4), heads=0.25)
    assert (small.config.n_head, small.config.n_kv_head, small.config.head_dim) == (6, 2, 8)
    assert info["head_mode"] == "queries"
    mha, _ = prune_structured(tiny(n_head=4, n_kv_head=4), windows(4), heads=0.25)  # MHA: groups of one head
    assert (mha.config.n_head, mha.config.n_kv_head) == (3, 3)
    with torch.no_grad():
        assert torch.isfinite(small(windows(2))).all() and torch.isfinite(mha(windows(2))).all()


def test_layer_pruning_drops_the_near_identity_block():
    model = tiny(n_layer=4, seed=2)
    with torch.no_grad():  # block 2 adds almost nothing to the residual stream: its removal changes least
        model.layers[2].attn.o_proj.weight.mul_(1e-3)
        model.layers[2].mlp.down_proj.weight.mul_(1e-3)
        for i in (0, 1, 3):  # the others turn it clearly
            model.layers[i].attn.o_proj.weight.mul_(20)
            model.layers[i].mlp.down_proj.weight.mul_(20)
    calib = windows(8)
    scores = layer_scores(model, calib)
    assert min(range(4), key=lambda i: scores[i]) == 2
    small, info = prune_structured(model, calib, layers=1)
    assert info["removed_layers"] == [2] and small.config.n_layer == 3
    x = windows(2, seed=7)
    with torch.no_grad():
        assert torch.allclose(small(x), model(x), atol=1e-2)
        assert torch.equal(small.layers[2].attn.q_proj.weight, model.layers[3].attn.q_proj.weight)  # renumbered


@pytest.mark.parametrize("lora", [False, True])
def test_recovery_lowers_loss_and_keeps_zeros(lora):
    model, _ = prune_magnitude(tiny(seed=4), 0.5)
    zeros = {n: (m.weight == 0).clone() for n, m in prunable(model)}
    torch.manual_seed(0)
    model, info = recover(model, windows(32, seed=3, length=T + 1), steps=30, lr=1e-2 if not lora else 3e-3, lora=lora)
    assert info["loss_after"] < info["loss_before"] - 0.3, info
    for n, m in prunable(model):
        assert type(m) is torch.nn.Linear, n  # LoRA merged back
        assert (m.weight[zeros[n]] == 0).all(), n
        assert (m.weight[~zeros[n]] != 0).any(), n
    assert info["masked_matrices"] == 14


def test_bad_inputs_are_user_errors():
    model = tiny()
    for call, match in [
        (lambda: prune_magnitude(model, 1.5), "sparsity = 1.5"),
        (lambda: prune_wanda(model, torch.rand(4, 8), 0.5), "LongTensor"),
        (lambda: prune_wanda(model, torch.full((2, 8), V), 0.5), "outside the model's vocabulary"),
        (lambda: prune_wanda(model, torch.zeros(2, T + 1, dtype=torch.long), 0.5), "longer than"),
        (lambda: prune_2_4(model, None, score="wanda"), "needs calibration"),
        (lambda: prune_2_4(model, None, score="l2"), "score = 'l2'"),
        (lambda: prune_structured(model, windows(2), layers=2), "layers = 2"),
        (lambda: prune_structured(model, windows(2), heads=1.0), "heads = 1.0"),
        (lambda: prune_structured(tiny(n_expert=2), windows(2), ffn=0.5), "MoE"),
        (lambda: recover(model, [], 1, 1e-3, False), "non-empty"),
    ]:
        with pytest.raises(UserError, match=match):
            call()
