"""Quantized modules and PTQ algorithms: int8/W8A8/int4 modules match the matmul of their de-quantized weights,
rounding stays within half a step, GPTQ and AWQ beat round-to-nearest where they should (a no-op GPTQ/AWQ
fails), and a quantized checkpoint reloads as quantized modules (smaller) with the same logits."""

import copy

import pytest
import torch
import torch.nn as nn

from ember.common.checkpoint import save_model
from ember.compress.quantize import awq_, awq_scales, gptq_, gptq_quantize
from ember.model import quant as Q
from ember.model.gpt import GPTConfig, build_model
from ember.model.load import load_model


def linear(n_out=48, n_in=128, bias=False, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        lin.weight.normal_()
    return lin


def tiny_model(tie=True, seed=0):
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=96, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, max_seq_len=64, tie_embeddings=tie)
    return build_model(cfg, "cpu").eval()


def rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("cls", [Q.Int8Linear, Q.W8A8Linear])
@pytest.mark.parametrize("n_in", [128, 40])  # 40: not a multiple of 16, the de-quantizing fallback
def test_int8_modules_match_dequantized_matmul(cls, n_in):
    lin = linear(n_in=n_in, bias=True)
    m = cls.from_float(lin)
    assert m.qweight.dtype == torch.int8 and m.scale.shape == (48,)
    # per-channel symmetric rounding: every weight within half a step of its row
    assert ((m.weight - lin.weight).abs() <= m.scale[:, None] / 2 + 1e-6).all()
    x = torch.randn(3, 5, n_in)
    with torch.no_grad():
        y = m(x)
        if cls is Q.W8A8Linear:  # activations rounded per token to int8 too
            sx = x.abs().amax(-1, keepdim=True) / 127
            x = torch.round(x / sx) * sx
        ref = x @ m.weight.t() + lin.bias
    assert y.shape == (3, 5, 48) and rel(y, ref) < 1e-2  # bf16 activations in the CPU kernel
    assert rel(y, lin(x)) < 3e-2


@pytest.mark.parametrize("group", Q.INT4_GROUPS)
@pytest.mark.parametrize("n_out", [48, 40])  # 40: not a multiple of 16, the de-quantizing fallback
def test_int4_linear_matches_dequantized_matmul(group, n_out):
    lin = linear(n_out=n_out, n_in=256)
    m = Q.Int4Linear.from_float(lin, group)
    assert m.packed.shape == (n_out, 128) and m.packed.dtype == torch.uint8 and m.scale.shape == (n_out, 256 // group)
    steps = m.scale.float().repeat_interleave(group, dim=1)
    err = (m.weight - lin.weight).abs()
    # half a step inside the grid; up to one step at a group's ends (the integer zero-point shifts the grid)
    assert (err <= steps + 1e-5).all() and (err <= steps / 2 + 1e-5).float().mean() > 0.95
    x = torch.randn(4, 256)
    with torch.no_grad():
        assert rel(m(x), x @ m.weight.t()) < 1e-2
        assert rel(m(x), lin(x)) < 0.15  # 4 bits: ~1/15 of each group's range per weight


def test_gptq_beats_rtn_on_correlated_inputs():
    torch.manual_seed(0)
    W = torch.randn(64, 128)
    X = torch.randn(2048, 128) @ (torch.randn(128, 128) / 128 ** 0.5) + 0.1 * torch.randn(2048, 128)
    H = X.t() @ X / len(X)
    err = lambda Wq: float((X @ (Wq - W).t()).square().mean())
    s, z = Q.int4_params(W, 32)
    rtn = err(Q.int4_dequantize(Q.int4_codes(W, s.half().float(), z, 32), s.half().float(), z, 32))
    for act_order in (False, True):
        codes, s2, z2 = gptq_quantize(W, H, 32, act_order=act_order)
        assert codes.max() <= 15 and s2.shape == (64, 4)
        assert err(Q.int4_dequantize(codes, s2, z2, 32)) < 0.7 * rtn  # measured ~0.54x; a no-op GPTQ gives 1.0x


def test_awq_beats_rtn_with_outlier_channels():
    torch.manual_seed(0)
    W = torch.randn(64, 128)
    X = torch.randn(2048, 128)
    X[:, :4] *= 30  # a few salient input channels, as LLM activations have
    err = lambda Wq: float((X @ (Wq - W).t()).square().mean())
    s, z = Q.int4_params(W, 32)
    rtn = err(Q.int4_dequantize(Q.int4_codes(W, s, z, 32), s, z, 32))
    a = awq_scales(X, [W], 32)
    Ws = W * a
    s, z = Q.int4_params(Ws, 32)
    assert err(Q.int4_dequantize(Q.int4_codes(Ws, s, z, 32), s, z, 32) / a) < 0.5 * rtn  # measured ~0.31x


def test_gptq_and_awq_on_a_model_stay_close_and_beat_rtn():
    model = tiny_model(tie=False)
    calib = torch.randint(0, 96, (8, 32))
    x = torch.randint(0, 96, (2, 32))
    with torch.no_grad():
        ref = model(x)
        err = {}
        for name, fn in (("rtn", None), ("gptq", gptq_), ("awq", awq_)):
            m = copy.deepcopy(model)
            if fn is not None:
                fn(m, calib, 32)
            Q.quantize_model_(m, Q.quant_scheme("int4", 32, embedding=False))
            assert all(type(l) is not nn.Linear for l in m.layers.modules())
            err[name] = rel(m(calib[:, :-1]), model(calib[:, :-1]))
            assert rel(m(x), ref) < 0.2
    assert err["gptq"] < err["rtn"] and err["awq"] <= err["rtn"] * 1.01, err  # on the calibration data


def test_awq_folding_keeps_the_float_function():
    """The scales folded into the norm / previous linear leave the unquantized model's output unchanged."""
    # n_kv_head = n_head: o_proj's scales fold into v_proj too (one v head per q head)
    cfg = GPTConfig(vocab_size=96, n_layer=2, n_head=4, n_kv_head=4, n_embd=64, max_seq_len=64)
    torch.manual_seed(0)
    model = build_model(cfg, "cpu").eval()
    x = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        ref = model(x)
        orig = Q.Int4Linear.from_float
        Q.Int4Linear.from_float = classmethod(lambda cls, lin, g=64: lin)  # keep each scaled Linear unrounded
        try:
            awq_(model, torch.randint(0, 96, (4, 16)), 32, n_grid=5)  # linears stay float (captured, not rounded)
        finally:
            Q.Int4Linear.from_float = orig
        assert torch.allclose(model(x), ref, atol=1e-4)


@pytest.mark.parametrize("scheme", ["int8", "w8a8", "int4"])
@pytest.mark.parametrize("tie", [True, False])
def test_quantized_checkpoint_reloads_quantized_with_same_logits(tmp_path, scheme, tie):
    model = tiny_model(tie)
    q = Q.quantize_model_(copy.deepcopy(model), Q.quant_scheme(scheme, 32))
    x = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        before = q(x)
    save_model(tmp_path, q)
    r = load_model(tmp_path).eval()
    kind = {"int8": Q.Int8Linear, "w8a8": Q.W8A8Linear, "int4": Q.Int4Linear}[scheme]
    assert type(r.layers[0].attn.q_proj) is kind and type(r.tok_emb) is Q.Int8Embedding
    assert type(r.lm_head) is (Q.Int8TiedHead if tie else Q.Int8Linear)
    assert Q.model_bytes(r) < 0.35 * Q.model_bytes(model)
    with torch.no_grad():
        assert torch.equal(r(x), before)
        assert rel(before, model(x)) < (0.02 if scheme != "int4" else 0.2)
    # de-quantized back to plain modules (export): the same function, ordinary state_dict names
    Q.dequantize_model_(r)
    assert "tok_emb.weight" in r.state_dict() and ("lm_head.weight" in r.state_dict()) != tie
    with torch.no_grad():
        assert rel(r(x), before) < 1e-2


def test_damaged_scheme_is_a_user_error(tmp_path):
    import dataclasses

    from ember.common.checkpoint import save_state
    from ember.common.errors import UserError

    model = Q.quantize_model_(tiny_model(), Q.quant_scheme("int8"))
    save_state(tmp_path / "model.safetensors", model.state_dict(),
               {"format": "ember.gpt", "config": dataclasses.asdict(model.config), "quant": {"linear": "int3"}})
    with pytest.raises(UserError, match="int3|linear"):
        load_model(tmp_path)
