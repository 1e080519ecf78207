"""NF4 with double quantization: the code table, hand-computed blocks, parity with bitsandbytes and torchao
(where they import), the reconstruction bound, and the frozen NF4 modules (on-the-fly de-quantization)."""

import math

import pytest
import torch
import torch.nn as nn

from ember.model.quant import (DYNAMIC8, NF4_CODE, NF4Embedding, NF4Linear, dequantize_blockwise, dequantize_nf4_,
                               frozen_weight_bytes, pack_nibbles, quantize_blockwise, quantize_nf4,
                               quantize_nf4_, unpack_nibbles)


def test_nf4_table_is_normal_quantiles():
    # QLoRA App. E: 8 positive levels = N(0,1) quantiles of linspace(delta, 1/2, 9)[:-1], 7 negative of
    # linspace(delta, 1/2, 8)[:-1], plus 0, normalized by the largest; delta = 1 - 0.9677083 (bitsandbytes).
    offset = 0.9677083
    q = lambda p: math.sqrt(2) * torch.erfinv(2 * p.double() - 1)  # N(0,1) quantile
    pos = q(torch.linspace(offset, 0.5, 9)[:-1])
    neg = -q(torch.linspace(offset, 0.5, 8)[:-1])
    vals = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    torch.testing.assert_close(vals / vals.max(), NF4_CODE.double(), atol=1e-6, rtol=0)


def test_dynamic_code_shape():
    assert DYNAMIC8.numel() == 256 and torch.all(DYNAMIC8[1:] >= DYNAMIC8[:-1])
    assert DYNAMIC8[0] == -0.9929687 or abs(DYNAMIC8[0].item() + 0.99296875) < 1e-6  # -(1 - 0.9/64/2)
    assert DYNAMIC8[-1] == 1.0 and (DYNAMIC8 == 0).sum() == 1
    # the smallest non-zero magnitude is 1e-6 * 0.55 (exponent -6 has one fraction level: mid of [0.1, 1])
    assert abs(DYNAMIC8[DYNAMIC8 > 0].min().item() - 0.55e-6) < 1e-12


def test_hand_computed_block():
    # one block of 4: absmax 2.0 -> scaled [-1, 0.5, 0.1, -0.3]; nearest NF4 levels by index:
    # -1 -> 0; 0.5 -> 12 (0.4407 vs 0.5626: |0.0593| < |0.0626|); 0.1 -> 8 (0.0796); -0.3 -> 4 (-0.2844)
    x = torch.tensor([-2.0, 1.0, 0.2, -0.6])
    codes, absmax = quantize_blockwise(x, NF4_CODE, block=4)
    assert codes.tolist() == [0, 12, 8, 4] and absmax.tolist() == [2.0]
    back = dequantize_blockwise(codes, absmax, NF4_CODE, 4)
    torch.testing.assert_close(back, 2.0 * NF4_CODE[[0, 12, 8, 4]])
    # a midpoint between two levels goes to the lower one; an all-zero block codes to the 0 level (index 7)
    mid = (NF4_CODE[9] + NF4_CODE[10]).item() / 2
    codes, _ = quantize_blockwise(torch.tensor([1.0, mid, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]), NF4_CODE, 4)
    assert codes.tolist() == [15, 9, 7, 7, 7, 7, 7, 7]
    # nibble packing: first code in the high nibble
    assert pack_nibbles(torch.tensor([1, 2, 15, 0])).tolist() == [0x12, 0xF0]
    assert unpack_nibbles(pack_nibbles(torch.tensor([3, 4, 5])), 3).tolist() == [3, 4, 5]


def test_reconstruction_within_bound():
    torch.manual_seed(0)
    w = torch.randn(256, 320) * 0.02
    q = quantize_nf4(w)
    err = (q.dequantize() - w).abs().view(-1, 64)
    absmax = w.abs().view(-1, 64).amax(dim=1)
    scales = q.scales()
    # |w - w^| <= s^ * (largest half-gap of NF4) + |s - s^| (the scale error hits every |code| <= 1)
    half_gap = (NF4_CODE[1:] - NF4_CODE[:-1]).max() / 2
    bound = scales * half_gap + (absmax - scales).abs()
    assert torch.all(err <= bound[:, None] + 1e-7)
    # double quantization costs little: scales within half a DYNAMIC8 step (<= 0.00704 of the scale range)
    assert ((absmax - scales).abs() <= 0.00704 * q.scale_absmax.repeat_interleave(256)[: absmax.numel()] + 1e-9).all()
    # and the typical error of NF4 on Gaussian weights: RMS error ~10% of the weight RMS
    rel = ((q.dequantize() - w).pow(2).mean() / w.pow(2).mean()).sqrt()
    assert 0.05 < rel < 0.12, rel
    # 4 bits + 8 bits / 64 + 32 bits / (64 * 256) per weight (+ one fp32 offset)
    assert q.nbytes() == w.numel() // 2 + w.numel() // 64 + 4 * math.ceil(w.numel() / 64 / 256) + 4


def test_matches_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes not installed")
    torch.manual_seed(0)
    torch.testing.assert_close(DYNAMIC8, bnb.create_dynamic_map(signed=True), atol=0, rtol=0)
    for shape in [(64, 128), (96, 200), (3, 70), (1024, 1024)]:
        w = torch.randn(shape) * 0.02
        q = quantize_nf4(w)
        packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        assert torch.equal(q.packed, packed.view(-1)), shape  # NF4 codes: bit-identical
        assert torch.equal(q.scale_absmax, state.state2.absmax) and torch.equal(q.scale_offset, state.offset)
        # scale codes: exact nearest-level rounding here; bitsandbytes' CPU kernel runs an approximate
        # binary search, so at near-ties it may pick a level up to ~2e-5 (of the block range) farther away.
        # Ours is never farther than theirs, and the two agree everywhere else.
        diff = q.scale_codes != state.absmax
        assert diff.float().mean() < 0.01, shape
        if diff.any():
            _, absmax = quantize_blockwise(w, NF4_CODE, 64)
            scaled = ((absmax - q.scale_offset) / q.scale_absmax.repeat_interleave(256)[: absmax.numel()])[diff]
            ours = (scaled - DYNAMIC8[q.scale_codes[diff].long()]).abs()
            theirs = (scaled - DYNAMIC8[state.absmax[diff].long()]).abs()
            assert (ours <= theirs).all() and (theirs - ours).max() < 3e-5, (theirs - ours).max()
        else:
            torch.testing.assert_close(q.dequantize(), bnb.dequantize_4bit(packed, state), atol=0, rtol=0)


def test_matches_torchao():
    nf4 = pytest.importorskip("torchao.quantization.quantize_.workflows.nf4.nf4_tensor",
                              reason="torchao (with NF4Tensor) not installed")
    torch.manual_seed(1)
    w = torch.randn(256, 768) * 0.02
    t = nf4.NF4Tensor.from_tensor(w, 64, 256)
    codes, absmax = quantize_blockwise(w, NF4_CODE, 64)
    torch.testing.assert_close(absmax, nf4.get_block_absmax(w.flatten(), 64), atol=0, rtol=0)
    theirs = unpack_nibbles(t.quantized_data, w.numel())
    # torchao rounds the NF4 table to 4 decimals, which moves each midpoint by < 1e-4: codes may differ
    # only for values that close to a midpoint
    diff = codes != theirs
    assert diff.float().mean() < 1e-3
    scaled = (w.view(-1, 64) / absmax[:, None]).reshape(-1)[diff]
    mids = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
    assert ((scaled[:, None] - mids).abs().min(dim=1).values < 1e-4).all()


def test_nf4_linear_forward_backward():
    torch.manual_seed(0)
    lin = nn.Linear(128, 64, bias=True)
    q = NF4Linear(lin)
    w_hat = quantize_nf4(lin.weight).dequantize()
    torch.testing.assert_close(q.weight, w_hat)
    x = torch.randn(2, 5, 128, requires_grad=True)
    y = q(x)
    torch.testing.assert_close(y, x @ w_hat.t() + lin.bias, atol=1e-6, rtol=1e-5)
    y.square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    (x2 @ w_hat.t() + lin.bias).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in q.parameters())


def test_quantize_model_memory():
    from ember.model.gpt import GPTConfig, build_model

    torch.manual_seed(0)
    model = build_model(GPTConfig(vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=128, max_seq_len=64))
    idx = torch.randint(0, 512, (2, 16))
    bf16_bytes = 2 * sum(p.numel() for p in model.parameters())
    quantize_nf4_(model)
    assert isinstance(model.tok_emb, NF4Embedding) and isinstance(model.layers[0].attn.q_proj, NF4Linear)
    assert isinstance(model.lm_head, NF4Linear)
    # the swapped model computes exactly what a full-precision model holding the de-quantized weights does
    ref = build_model(model.config, init=False)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            owner = model.get_submodule(name.rsplit(".", 1)[0])
            p.copy_(owner.dequantize() if hasattr(owner, "dequantize") else owner.weight)
    torch.testing.assert_close(model(idx), ref(idx), atol=1e-5, rtol=1e-5)
    for p in model.parameters():
        p.requires_grad_(False)
    assert frozen_weight_bytes(model) <= 0.3 * bf16_bytes
    want = model(idx)
    dequantize_nf4_(model)  # back to plain modules, same function, ordinary state-dict keys
    assert set(model.state_dict()) == set(ref.state_dict()) and type(model.lm_head) is nn.Linear
    torch.testing.assert_close(model(idx), want, atol=1e-6, rtol=1e-6)


def test_qlora_dequantizes_to_the_autocast_dtype():
    """Under bf16 autocast the input of q/k/v/gate/up/head is still fp32 (from RMSNorm): the NF4 weight must be
    rebuilt in bf16 directly, not in fp32 and then cast (3x the temporary memory)."""
    from ember.model.gpt import GPTConfig, build_model
    from ember.model.lora import apply_lora
    from ember.model.quant import quantize_nf4_

    torch.manual_seed(0)
    model = build_model(GPTConfig(vocab_size=128, n_layer=1, n_head=2, n_kv_head=1, n_embd=64))
    quantize_nf4_(model)
    apply_lora(model, ["attn", "mlp"], 4, 8)
    seen = set()
    for mod in model.modules():
        if isinstance(mod, NF4Linear):
            mod.dequantize = (lambda f: lambda dtype=None: (seen.add(dtype), f(dtype))[1])(mod.dequantize)
    x = torch.randint(0, 128, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, x)
    loss.backward()
    assert seen == {torch.bfloat16}
