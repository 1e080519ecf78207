"""LoRA: identity at init, only adapters train, merge equals base + adapter, adapter files round-trip,
the disabled context gives the base model, and QLoRA (NF4 base) trains and merges the same way."""

import pytest
import torch
import torch.nn as nn

from ember.common.errors import UserError
from ember.model.gpt import GPTConfig, build_model
from ember.model.lora import (LoRALinear, apply_lora, load_adapter, lora_disabled, lora_state_dict, merge_lora,
                              read_adapter, save_adapter)
from ember.model.quant import NF4Linear, quantize_nf4_


CFG = GPTConfig(vocab_size=128, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, max_seq_len=32)


def tiny(seed=0):
    torch.manual_seed(seed)
    return build_model(CFG)


def train_steps(model, steps=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        idx = torch.randint(0, CFG.vocab_size, (2, 16), generator=g)
        loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def test_identity_at_init_and_trainable_set():
    base, model = tiny(), tiny()
    idx = torch.randint(0, CFG.vocab_size, (2, 12))
    apply_lora(model, targets=["attn", "mlp"], r=4, alpha=8, dropout=0.1)
    model.eval()
    torch.testing.assert_close(model(idx), base(idx), atol=0, rtol=0)  # B = 0 exactly
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_a", ".lora_b")) for n in trainable)
    assert len(trainable) == 2 * 7 * CFG.n_layer  # q k v o gate up down in each layer
    assert isinstance(model.layers[0].attn.q_proj, LoRALinear) and not isinstance(model.lm_head, LoRALinear)
    a = model.layers[0].attn.k_proj
    assert a.lora_a.shape == (4, 64) and a.lora_b.shape == (CFG.n_kv_head * CFG.head_dim, 4) and a.scale == 2.0


def test_targets():
    model = apply_lora(tiny(), targets=["q_proj", "v_proj"], r=2, alpha=2)
    assert isinstance(model.layers[1].attn.v_proj, LoRALinear)
    assert not isinstance(model.layers[1].attn.k_proj, LoRALinear) and not isinstance(model.layers[1].mlp.up_proj, LoRALinear)
    with pytest.raises(UserError, match="unknown"):
        apply_lora(tiny(), targets=["qproj"], r=2, alpha=2)


def test_training_moves_only_adapters_then_merge_matches():
    base = tiny()
    model = apply_lora(tiny(), targets=["all"], r=4, alpha=8)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    train_steps(model)
    model.eval()
    # frozen base weights are untouched
    for k, v in before.items():
        key = k if k in model.state_dict() else k.replace(".weight", ".base.weight")
        assert torch.equal(model.state_dict()[key], v), k
    assert model.layers[0].mlp.down_proj.lora_b.abs().sum() > 0
    idx = torch.randint(0, CFG.vocab_size, (2, 12))
    with torch.no_grad():
        lora_logits = model(idx)
        with lora_disabled(model):
            torch.testing.assert_close(model(idx), base(idx), atol=0, rtol=0)
        assert not torch.allclose(lora_logits, base(idx))
        merged = merge_lora(model)
        assert not any(isinstance(m, LoRALinear) for m in merged.modules())
        assert set(merged.state_dict()) == set(base.state_dict())  # plain GPT keys again: save/export as usual
        torch.testing.assert_close(merged(idx), lora_logits, atol=1e-5, rtol=1e-5)


def test_adapter_round_trip(tmp_path):
    model = apply_lora(tiny(), targets=["attn"], r=4, alpha=16)
    train_steps(model, steps=2)
    path = save_adapter(tmp_path, model, note="test")
    tensors, meta = read_adapter(tmp_path)
    assert set(tensors) == set(lora_state_dict(model)) and meta["r"] == 4 and meta["alpha"] == 16
    assert meta["targets"] == ["k_proj", "o_proj", "q_proj", "v_proj"] and meta["note"] == "test"
    assert path.stat().st_size < 0.25 * sum(p.numel() * 4 for p in model.parameters())  # adapter only
    fresh = load_adapter(tmp_path, tiny())  # same base (seed 0) + the adapter
    idx = torch.randint(0, CFG.vocab_size, (1, 10))
    model.eval(), fresh.eval()
    torch.testing.assert_close(fresh(idx), model(idx), atol=0, rtol=0)
    wrong = GPTConfig(vocab_size=128, n_layer=2, n_head=4, n_kv_head=4, n_embd=64, max_seq_len=32)
    with pytest.raises(UserError, match="does not fit|shape"):
        load_adapter(tmp_path, build_model(wrong))
    (tmp_path / "adapter.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="not a readable|corrupt"):
        read_adapter(tmp_path)


def test_qlora_trains_and_merges():
    model = tiny()
    quantize_nf4_(model)
    apply_lora(model, targets=["attn", "mlp"], r=4, alpha=8)
    assert isinstance(model.layers[0].attn.q_proj.base, NF4Linear)
    assert all(n.endswith((".lora_a", ".lora_b")) for n, p in model.named_parameters() if p.requires_grad)
    idx = torch.randint(0, CFG.vocab_size, (2, 12))
    with torch.no_grad():
        start = model(idx[:, :-1], idx[:, 1:]).item()
    g = torch.Generator().manual_seed(0)
    fixed = torch.randint(0, CFG.vocab_size, (4, 16), generator=g)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(20):  # overfit one batch through the NF4 base: gradients reach the adapters
        loss = model(fixed[:, :-1], fixed[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < start - 0.5
    model.eval()
    with torch.no_grad():
        want = model(idx)
        merge_lora(model)  # adapters merged into the de-quantized base (what training saw)
        assert isinstance(model.layers[0].attn.q_proj, nn.Linear)
        torch.testing.assert_close(model(idx), want, atol=1e-5, rtol=1e-5)


def test_a_head_target_on_a_tied_model_is_reported(capsys):
    """A tied model's head is the embedding, so 'lm_head' adapts nothing: said, not silently skipped."""
    from ember.model.gpt import GPTConfig, build_model
    from ember.model.lora import LoRALinear, apply_lora

    model = build_model(GPTConfig(vocab_size=64, n_layer=1, n_head=2, n_kv_head=1, n_embd=16, tie_embeddings=True))
    apply_lora(model, ["attn", "lm_head"], 4, 8)
    assert "no layer named lm_head to adapt (this model ties its head to the embedding)" in capsys.readouterr().out
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 4  # q, k, v, o
