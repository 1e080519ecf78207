"""Unit tests of model/gpt.py on tiny configs: RoPE, GQA, masking, packing, KV cache, MoE, losses, counts."""

import math

import pytest
import torch
import torch.nn.functional as F

from ember.common.errors import UserError
from ember.model import loss as loss_module
from ember.model.gpt import (GPT, Attention, GPTConfig, MoE, apply_rope, build_model, doc_positions, moe_losses,
                             rope_cos_sin, token_logprobs)

TINY = dict(vocab_size=128, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, max_seq_len=64)


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    return build_model(GPTConfig(**{**TINY, **kw})).eval()


# ---------------------------------------------------------------------------- config

def test_config_validation_names_the_field():
    with pytest.raises(UserError, match="n_kv_head"):
        GPTConfig(n_head=4, n_kv_head=3)
    with pytest.raises(UserError, match="n_expert_active"):
        GPTConfig(n_expert=4, n_expert_active=5)
    with pytest.raises(UserError, match="n_embd"):
        GPTConfig(n_embd=100, n_head=8)  # head_dim 12.5
    with pytest.raises(UserError, match="vocab_size"):
        GPT(GPTConfig(vocab_size=0))


def test_from_depth_and_derived_widths():
    c = GPTConfig.from_depth(4, vocab_size=1000)
    assert (c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.head_dim) == (4, 256, 4, 4, 64)
    assert c.ffn_dim == 704  # 8/3 * 256 = 682.7 -> next multiple of 64
    assert GPTConfig(n_embd=64, n_head=4, n_kv_head=4).ffn_dim == 192
    assert GPTConfig(ffn_hidden=100).ffn_dim == 100
    c = GPTConfig.from_depth(8, vocab_size=1000, n_head=4)  # an n_head override carries n_kv_head along
    assert (c.n_embd, c.n_head, c.n_kv_head) == (512, 4, 4)


def test_init_is_deterministic_and_meta_build_allocates_nothing():
    a, b = tiny(), tiny()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    torch.manual_seed(1)
    c = build_model(a.config)
    assert not torch.equal(a.tok_emb.weight, c.tok_emb.weight)
    with torch.device("meta"):
        m = GPT(a.config)
    assert all(p.is_meta for p in m.parameters())
    # residual projections start smaller (1/sqrt(2L)), norms at 1
    assert a.layers[0].attn.o_proj.weight.std() < 0.7 * a.layers[0].attn.q_proj.weight.std()
    assert torch.equal(a.norm.weight, torch.ones(64))


# ---------------------------------------------------------------------------- RoPE, attention, masking

def test_rope_hand_checked():
    # head_dim 4, theta 100: frequencies [1, 0.1]; dim 0 pairs with dim 2, dim 1 with dim 3 (rotate_half)
    cos, sin = rope_cos_sin(torch.tensor([[0, 1, 2]]), head_dim=4, theta=100.0)
    assert cos.shape == (1, 3, 1, 4)
    x = torch.tensor([1.0, 0.0, 0.0, 0.0]).expand(1, 3, 1, 4)
    y = apply_rope(x, cos, sin)[0, :, 0]
    for pos in range(3):
        assert torch.allclose(y[pos], torch.tensor([math.cos(pos), 0, math.sin(pos), 0]), atol=1e-6)
    x = torch.tensor([0.0, 1.0, 0.0, 0.0]).expand(1, 3, 1, 4)
    y = apply_rope(x, cos, sin)[0, 2, 0]
    assert torch.allclose(y, torch.tensor([0, math.cos(0.2), 0, math.sin(0.2)]), atol=1e-6)


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m, n):
        cm, sm = rope_cos_sin(torch.tensor([[m]]), 16, 10000.0)
        cn, sn = rope_cos_sin(torch.tensor([[n]]), 16, 10000.0)
        return (apply_rope(q, cm, sm) * apply_rope(k, cn, sn)).sum()

    assert torch.allclose(score(5, 2), score(13, 10), atol=1e-5)
    assert not torch.allclose(score(5, 2), score(5, 3), atol=1e-3)
    cos, sin = rope_cos_sin(torch.tensor([[7]]), 16, 10000.0)
    assert torch.allclose(apply_rope(q, cos, sin).norm(), q.norm(), atol=1e-5)  # a rotation


def reference_attention(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """Plain softmax attention with an explicit causal mask and k/v heads copied per query group."""
    B, T, _ = x.shape
    H, Hkv, hd = attn.n_head, attn.n_kv_head, attn.head_dim
    cos, sin = rope_cos_sin(torch.arange(T)[None], hd, 10000.0)
    q = apply_rope(attn.q_proj(x).view(B, T, H, hd), cos, sin).transpose(1, 2)
    k = apply_rope(attn.k_proj(x).view(B, T, Hkv, hd), cos, sin).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, Hkv, hd).transpose(1, 2)
    k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)  # query head h -> kv h // g
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = scores.softmax(-1) @ v
    return attn.o_proj(y.transpose(1, 2).reshape(B, T, -1))


def test_gqa_attention_matches_reference_and_shares_kv_heads():
    model = tiny()
    attn = model.layers[0].attn
    x = torch.randn(2, 9, 64)
    cos, sin = rope_cos_sin(torch.arange(9)[None], attn.head_dim, 10000.0)
    with torch.no_grad():
        y = attn(x, cos, sin, None, True, None)
        assert torch.allclose(y, reference_attention(attn, x), atol=1e-5)
        # make o_proj the identity so each head's output is visible, then change only kv head 1's values:
        # with 4 query heads on 2 kv heads, query heads 2 and 3 (and only those) read kv head 1
        attn.o_proj.weight.copy_(torch.eye(64))
        before = attn(x, cos, sin, None, True, None).view(2, 9, 4, 16)
        attn.v_proj.weight[16:32] += 1.0
        after = attn(x, cos, sin, None, True, None).view(2, 9, 4, 16)
    changed = [(after[:, :, h] - before[:, :, h]).abs().max().item() > 1e-3 for h in range(4)]
    assert changed == [False, False, True, True]


def test_causal_masking():
    model = tiny()
    idx = torch.randint(0, 128, (1, 12))
    idx2 = idx.clone()
    idx2[0, 7] = (idx[0, 7] + 1) % 128
    with torch.no_grad():
        a, b = model(idx), model(idx2)
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6)  # the past does not see the future
    assert not torch.allclose(a[:, 7:], b[:, 7:], atol=1e-4)


def test_doc_positions_hand_checked():
    ids = torch.tensor([[7, 7, 7, 9, 9], [1, 2, 2, 2, 3]])
    assert doc_positions(ids).tolist() == [[0, 1, 2, 0, 1], [0, 0, 1, 2, 0]]


@pytest.mark.parametrize("kw", [{}, {"n_expert": 4, "qk_norm": True}])
def test_packed_documents_equal_separate_runs(kw):
    model = tiny(**kw)
    a, b, c = (torch.randint(0, 128, (1, n)) for n in (5, 7, 4))
    packed = torch.cat([a, b, c], dim=1)
    doc_ids = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4])
    with torch.no_grad():
        out = model(packed, doc_ids=doc_ids)
        sep = torch.cat([model(a), model(b), model(c)], dim=1)
        plain = model(packed)
    assert torch.allclose(out, sep, atol=1e-5)
    assert not torch.allclose(plain[:, 5:], sep[:, 5:], atol=1e-3)  # without doc_ids they do attend across


def test_explicit_positions_shift_rope():
    model = tiny()
    idx = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        default = model(idx)
        same = model(idx, positions=torch.arange(6)[None])
        shifted = model(idx, positions=torch.arange(6)[None] + 3)
    assert torch.equal(default, same)
    # RoPE is relative: a constant shift of all positions leaves attention scores (and logits) unchanged
    assert torch.allclose(default, shifted, atol=1e-5)
    with torch.no_grad():
        gapped = model(idx, positions=torch.tensor([[0, 1, 2, 10, 11, 12]]))
    assert not torch.allclose(default[:, 3:], gapped[:, 3:], atol=1e-4)


# ---------------------------------------------------------------------------- KV cache

@pytest.mark.parametrize("kw", [{}, {"n_kv_head": 1, "tie_embeddings": True}, {"n_expert": 4, "qk_norm": True}])
def test_kv_cache_decoding_equals_full_forward(kw):
    model = tiny(**kw)
    idx = torch.randint(0, 128, (3, 14))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(batch_size=3)
        # prefill 5, a chunk of 4 (offset causal mask), then one token at a time
        parts = [model(idx[:, :5], cache=cache), model(idx[:, 5:9], cache=cache)]
        parts += [model(idx[:, t:t + 1], cache=cache) for t in range(9, 14)]
    assert cache.pos == 14
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)


def test_kv_cache_full_is_a_user_error():
    model = tiny()
    cache = model.new_cache(batch_size=1, max_len=8)
    with torch.no_grad():
        model(torch.zeros(1, 6, dtype=torch.long), cache=cache)
        with pytest.raises(UserError, match="KV cache is full"):
            model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    cache.reset()
    assert cache.pos == 0


# ---------------------------------------------------------------------------- MoE

def test_moe_routing_hand_checked():
    torch.manual_seed(0)
    cfg = GPTConfig(**{**TINY, "n_expert": 4, "n_expert_active": 2})
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(1, 3, 64)
    # router: token t's logits are chosen by hand through a router that reads only dim 0..2 of x
    x[0, :, :3] = torch.eye(3)
    router = torch.zeros(4, 64)
    router[:, :3] = torch.tensor([[2.0, 0, 0], [1.0, 0, 3.0], [0, 1.0, 0], [0, 2.0, 1.0]])  # (E, 3)
    with torch.no_grad():
        moe.router.weight.copy_(router)
        y, _ = moe(x)
    logits = x[0] @ router.T  # (3 tokens, 4 experts)
    for t in range(3):
        p = logits[t].softmax(-1)
        top = p.topk(2)
        expected = sum(w / top.values.sum() * moe.experts[e](x[0, t]) for w, e in zip(top.values, top.indices))
        assert torch.allclose(y[0, t], expected, atol=1e-6)
    # token 0 logits (2, 1, 0, 0) -> experts 0 and 1; token 2 logits (0, 3, 0, 1) -> experts 1 and 3
    assert set(logits[0].topk(2).indices.tolist()) == {0, 1}
    assert set(logits[2].topk(2).indices.tolist()) == {1, 3}


def test_moe_losses_hand_checked():
    # 4 tokens, 2 experts, top-1. Router probabilities (0.75, 0.25) x3 and (0.25, 0.75).
    probs = torch.tensor([[0.75, 0.25]] * 3 + [[0.25, 0.75]])
    top_i = probs.argmax(-1, keepdim=True)
    aux, z = moe_losses(probs.log(), top_i, n_expert=2)
    # f = (3/4, 1/4), P = (0.625, 0.375): aux = 2 * (0.75*0.625 + 0.25*0.375) = 1.125
    assert aux.item() == pytest.approx(1.125)
    assert z.item() == pytest.approx(0.0, abs=1e-12)  # logsumexp(log p) = log 1 = 0
    aux2, z2 = moe_losses(probs.log() + 3.0, top_i, n_expert=2)  # softmax-invariant shift
    assert aux2.item() == pytest.approx(1.125) and z2.item() == pytest.approx(9.0, rel=1e-6)
    # perfect balance gives 1; everything on one expert with certainty gives E
    assert moe_losses(torch.zeros(4, 4), torch.tensor([[0], [1], [2], [3]]), 4)[0].item() == pytest.approx(1.0)
    onehot = torch.tensor([[30.0, 0, 0, 0]] * 4)
    assert moe_losses(onehot, torch.zeros(4, 1, dtype=torch.long), 4)[0].item() == pytest.approx(4.0)


def test_moe_loss_adds_aux_terms_and_every_expert_gets_gradient():
    model = tiny(n_expert=4, n_expert_active=2, moe_aux_coef=0.1, moe_z_coef=0.01).train()
    idx, targets = torch.randint(0, 128, (2, 16)), torch.randint(0, 128, (2, 16))
    loss = model(idx, targets)
    aux, z = model.moe_stats
    ce = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten())
    assert loss.item() == pytest.approx((ce + 0.1 * aux + 0.01 * z).item(), rel=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


# ---------------------------------------------------------------------------- losses and counts

def test_loss_ignore_index_reduction_and_token_logprobs():
    model = tiny()
    idx = torch.randint(0, 128, (2, 8))
    targets = torch.randint(0, 128, (2, 8))
    targets[0, :3] = -100
    with torch.no_grad():
        logits = model(idx)
        loss = model(idx, targets)
        per_tok = model(idx, targets, reduction="none")
    keep = targets != -100
    ref = F.cross_entropy(logits[keep], targets[keep])
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert per_tok.shape == (2, 8) and torch.all(per_tok[~keep] == 0)
    lp = token_logprobs(logits, targets)
    assert torch.allclose(lp, -per_tok)
    assert lp[1, 2].item() == pytest.approx(logits[1, 2].log_softmax(-1)[targets[1, 2]].item(), rel=1e-6)


def graph_ops(t: torch.Tensor) -> set[str]:
    """Names of the autograd nodes behind t: shows which loss path built it."""
    names, stack, seen = set(), [t.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    return names


def reference_loss(model, idx, targets):
    """The loss through the whole (B, T, V) logits tensor, as transformers computes it."""
    logits = model(idx).float()
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)


@pytest.mark.parametrize("kw,chunk_rows", [({}, None), ({"tie_embeddings": True}, None), ({}, 5),
                                           ({"n_expert": 4, "moe_aux_coef": 0.0, "moe_z_coef": 0.0}, 7)])
def test_fused_head_loss_equals_the_logits_path(monkeypatch, kw, chunk_rows):
    """The loss fuses the head into cross-entropy and computes its gradients in forward; loss and every
    parameter's gradient equal autograd through the full logits, also when rows go through in chunks
    (chunk_rows: 16 rows = 5 + 5 + 5 + 1, 7 + 7 + 2)."""
    if chunk_rows:
        monkeypatch.setattr(loss_module, "LOSS_CHUNK_BYTES", chunk_rows * 4 * TINY["vocab_size"])
    model = tiny(**kw).train()
    idx = torch.randint(0, 128, (2, 8))
    targets = torch.randint(0, 128, (2, 8))
    targets[0, :3] = -100
    targets[1, 7] = -100
    fused = model(idx, targets)
    assert "_LinearCrossEntropyBackward" in graph_ops(fused)  # the fused path, not the logits one, was taken
    fused.backward()
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = reference_loss(model, idx, targets)  # (the MoE case without its aux losses: they are not the head's)
    assert "_LinearCrossEntropyBackward" not in graph_ops(ref)
    ref.backward()
    assert fused.item() == pytest.approx(ref.item(), rel=1e-6)
    for n, p in model.named_parameters():
        assert torch.allclose(fused_grads[n], p.grad, rtol=1e-5, atol=1e-7), n
    with torch.no_grad():  # the no-grad chunked path (evaluation) gives the same numbers
        assert model(idx, targets).item() == pytest.approx(ref.item(), rel=1e-6)
        per_tok = model(idx, targets, reduction="none")
        assert torch.allclose(per_tok, -token_logprobs(model(idx), targets), atol=1e-6)


def test_fused_head_loss_bf16_autocast_and_frozen_head():
    model = tiny().train()
    idx = torch.randint(0, 128, (2, 8))
    targets = torch.randint(0, 128, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = model(idx, targets)
    fused.backward()
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = reference_loss(model, idx, targets)
    ref.backward()
    assert fused.dtype == torch.float32 and fused.item() == pytest.approx(ref.item(), rel=1e-3)
    for n, p in model.named_parameters():  # both round the logits' gradient to bf16, before/after the 1/tokens scale
        assert fused_grads[n].dtype == torch.float32
        assert (fused_grads[n] - p.grad).norm() / p.grad.norm() < 2e-2, n
    assert "_LinearCrossEntropyBackward" in graph_ops(fused)
    model.zero_grad(set_to_none=True)
    model.lm_head.weight.requires_grad_(False)  # a frozen head: no gradient computed for it
    model(idx, targets).backward()
    assert model.lm_head.weight.grad is None and model.tok_emb.weight.grad is not None


def test_heads_with_their_own_forward_and_per_token_gradients_use_the_logits():
    """A LoRA head (its own forward) and reduction="none" with grad (per-token gradients, as DPO) go through
    the logits; the loss still equals the reference."""
    from ember.model.lora import apply_lora

    model = tiny().train()
    idx, targets = torch.randint(0, 128, (2, 8)), torch.randint(0, 128, (2, 8))
    per_token = model(idx, targets, reduction="none")
    assert "_LinearCrossEntropyBackward" not in graph_ops(per_token)
    assert torch.allclose(per_token, -token_logprobs(model(idx), targets))
    apply_lora(model, ["lm_head"], r=4, alpha=8)
    loss = model(idx, targets)
    assert "_LinearCrossEntropyBackward" not in graph_ops(loss)
    assert loss.item() == pytest.approx(reference_loss(model, idx, targets).item(), rel=1e-6)


def test_num_params_and_flops_by_hand():
    V, D, L, H, Hkv, hd, Fh = 128, 64, 2, 4, 2, 16, 192
    per_layer = 2 * D + D * H * hd * 2 + 2 * D * Hkv * hd + 3 * D * Fh
    model = tiny()
    assert model.num_params() == V * D + L * per_layer + D + V * D
    assert model.num_params(exclude_embedding=True) == L * per_layer + D + V * D
    assert model.flops_per_token(64) == 6 * (L * per_layer + D + V * D) + 12 * L * H * hd * 64
    tied = tiny(tie_embeddings=True)
    assert tied.lm_head is None and tied.num_params() == V * D + L * per_layer + D
    assert tied.num_params(exclude_embedding=True) == tied.num_params()  # the shared table is the head
    moe = tiny(n_expert=4, n_expert_active=1)
    moe_layer = 2 * D + D * H * hd * 2 + 2 * D * Hkv * hd + 4 * 3 * D * Fh + 4 * D
    assert moe.num_params() == V * D + L * moe_layer + D + V * D
    assert moe.num_params(active=True) == moe.num_params() - L * 3 * 3 * D * Fh


def test_bf16_autocast_and_bf16_weights_run():
    model = tiny()
    idx = torch.randint(0, 128, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(idx, idx)
    assert torch.isfinite(loss)
    model.to(torch.bfloat16)
    cache = model.new_cache(2)
    assert cache.k.dtype == torch.bfloat16
    with torch.no_grad():
        assert model(idx, cache=cache).dtype == torch.bfloat16
