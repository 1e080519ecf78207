"""Weight quantization: pure functions on tensors, plus the frozen quantized modules built from them.

NF4 (QLoRA, Dettmers et al. 2023, arXiv:2305.14314): 4-bit codes into the NormalFloat table, one absmax
scale per block of 64 weights, and "double quantization" of those scales to 8 bits (blocks of 256, the
8-bit dynamic-tree code, mean subtracted) -- bit-for-bit the bitsandbytes layout, so ~4.127 bits/weight.
    w = NF4_CODE[codes] * (DYNAMIC8[scale_codes] * scale_absmax + scale_offset)    # per block
`quantize_nf4_(model)` swaps every frozen matrix (Linear, Embedding) for an NF4 module de-quantized on the fly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# The 16 NF4 levels: quantiles of N(0, 1) normalized to [-1, 1] with an exact zero, 8 positive and 7
# negative levels (QLoRA App. E; the values bitsandbytes ships). tests/model/test_quant.py re-derives them.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], dtype=torch.float32)


def dynamic_code() -> torch.Tensor:
    """The signed 8-bit dynamic-tree code (Dettmers 2016, arXiv:1511.04561): 256 sorted values in [-1, 1].

    A float-like code: value = +-10^e * fraction with e in -6..0, the fraction getting more levels as e grows
    (2^e' of them), so small magnitudes keep relative precision. This is the "8-bit float" QLoRA double
    quantization uses for the block scales (bitsandbytes' create_dynamic_map(signed=True), 7 exponent bits).
    """
    data: list[float] = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0  # fraction levels: midpoints of a linear grid on [0.1, 1]
        mag = 10 ** (i - 6)  # the exponent: 1e-6 ... 1
        data += (mag * means).tolist() + (-mag * means).tolist()  # fp32 products, as bitsandbytes
    data += [0.0, 1.0]  # 2 * 127 levels above, zero and one: 256
    return torch.tensor(sorted(data), dtype=torch.float32)


DYNAMIC8 = dynamic_code()
_NF4_PAIRS = torch.stack([NF4_CODE.repeat_interleave(16), NF4_CODE.repeat(16)], dim=1)  # byte -> (hi, lo) levels


_COPIES: dict[tuple[int, torch.device], torch.Tensor] = {}


def _on(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A constant table on `device`, copied there once (dequantize runs in every QLoRA forward)."""
    if table.device == device or not any(table is t for t in (NF4_CODE, DYNAMIC8, _NF4_PAIRS)):
        return table.to(device)
    key = (id(table), device)
    if key not in _COPIES:
        _COPIES[key] = table.to(device)
    return _COPIES[key]


# ---------------------------------------------------------------------------- block-wise absmax codes

def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """Flatten x to fp32 and zero-pad to whole blocks: (n_blocks, block). A zero pad never changes an absmax."""
    flat = x.detach().reshape(-1).float()
    pad = -flat.numel() % block
    return F.pad(flat, (0, pad)).view(-1, block)


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-level codes of x / absmax(block) in `code` (sorted, in [-1, 1]).

    Returns (codes uint8 (numel,), absmax fp32 (ceil(numel / block),)). Ties at a midpoint go to the lower
    level and x is scaled by the reciprocal of absmax, both as bitsandbytes, so codes match it exactly.
    """
    blocks = _blocks(x, block)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1)
    code = _on(code, scaled.device)
    codes = torch.bucketize(scaled.reshape(-1), (code[:-1] + code[1:]) / 2)
    return codes[: x.numel()].to(torch.uint8), absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, block: int) -> torch.Tensor:
    """code[codes] * absmax of each block: fp32 (numel,)."""
    vals = _on(code, absmax.device)[codes.long()]
    pad = -vals.numel() % block
    return (F.pad(vals, (0, pad)).view(-1, block) * absmax[:, None]).reshape(-1)[: codes.numel()]


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, the first in the high nibble: (n,) -> (ceil(n / 2),) uint8."""
    c = F.pad(codes.to(torch.uint8), (0, codes.numel() % 2))
    return (c[0::2] << 4) | c[1::2]


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    return torch.stack((packed >> 4, packed & 0xF), dim=1).reshape(-1)[:n]


# ---------------------------------------------------------------------------- NF4 with double quantization

@dataclass
class NF4:
    """One NF4 tensor: 4-bit codes + double-quantized block scales (the bitsandbytes QuantState fields)."""
    packed: torch.Tensor  # (ceil(numel / 2),) uint8: NF4 codes, two per byte
    scale_codes: torch.Tensor  # (n_blocks,) uint8: block absmax - offset, coded in DYNAMIC8
    scale_absmax: torch.Tensor  # (ceil(n_blocks / scale_block),) fp32: absmax of each block of scales
    scale_offset: torch.Tensor  # () fp32: mean of the block absmaxes (removed so the scales are centred)
    shape: tuple[int, ...]
    block: int = 64  # weights per absmax scale (QLoRA: 64)
    scale_block: int = 256  # scales per second-level scale (QLoRA: 256)

    def scales(self) -> torch.Tensor:
        """The de-quantized block absmaxes, fp32 (n_blocks,)."""
        return dequantize_blockwise(self.scale_codes, self.scale_absmax, DYNAMIC8, self.scale_block) + self.scale_offset

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n = math.prod(self.shape)
        if n % self.block or self.block % 2:  # ragged last block: the general path
            codes = unpack_nibbles(self.packed, n)
            return dequantize_blockwise(codes, self.scales(), NF4_CODE, self.block).view(self.shape).to(dtype)
        # one gather per byte from a (256, 2) table of its two levels, then one in-place scale per block:
        # ~3x faster than unpacking nibbles and gathering per weight (this runs in every QLoRA forward/backward)
        pairs = F.embedding(self.packed.int(), _on(_NF4_PAIRS, self.packed.device))  # (numel / 2, 2)
        return pairs.view(-1, self.block).mul_(self.scales()[:, None]).view(self.shape).to(dtype)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale_codes, self.scale_absmax, self.scale_offset))


def quantize_nf4(w: torch.Tensor, block: int = 64, scale_block: int = 256) -> NF4:
    """NF4-quantize w with block-wise absmax, then 8-bit-quantize the absmaxes (QLoRA double quantization)."""
    codes, absmax = quantize_blockwise(w, NF4_CODE, block)
    offset = absmax.mean()
    scale_codes, scale_absmax = quantize_blockwise(absmax - offset, DYNAMIC8, scale_block)
    return NF4(pack_nibbles(codes), scale_codes, scale_absmax, offset, tuple(w.shape), block, scale_block)


# ---------------------------------------------------------------------------- frozen NF4 modules

class _NF4Matmul(torch.autograd.Function):
    """y = x @ W^T with W re-dequantized in backward instead of saved, so a training step never holds more
    than one layer's full-precision weight (the point of QLoRA). W is frozen: only x gets a gradient."""

    @staticmethod
    def forward(ctx, x, module):
        ctx.module = module
        # the compute dtype: under autocast the input is often still fp32 (from RMSNorm); an fp32 weight would
        # be built and then cast again, 3x the temporary memory of a bf16 one
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        return x.to(dtype) @ module.dequantize(dtype).t()

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.module.dequantize(grad.dtype), None


class _NF4Module(nn.Module):
    """Holds one NF4 weight as buffers (so .to(), state_dict and safetensors see plain tensors)."""

    def _store(self, w: torch.Tensor, block: int, scale_block: int) -> None:
        q = quantize_nf4(w, block, scale_block)
        for name in ("packed", "scale_codes", "scale_absmax", "scale_offset"):
            self.register_buffer(name, getattr(q, name).to(w.device))
        self.shape, self.block, self.scale_block, self.weight_dtype = q.shape, block, scale_block, w.dtype

    def nf4(self) -> NF4:
        return NF4(self.packed, self.scale_codes, self.scale_absmax, self.scale_offset, self.shape, self.block,
                   self.scale_block)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.nf4().dequantize(dtype or self.weight_dtype)


class NF4Linear(_NF4Module):
    """A frozen nn.Linear whose weight lives in NF4 and is de-quantized on the fly in forward and backward."""

    def __init__(self, linear: nn.Linear, block: int = 64, scale_block: int = 256):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._store(linear.weight, block, scale_block)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:  # the de-quantized weight, for code that reads .weight (merge, export)
        return self.dequantize()

    def forward(self, x):
        y = _NF4Matmul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class NF4Embedding(_NF4Module):
    """A frozen nn.Embedding in NF4. `.weight` de-quantizes (a tied output head reads it in GPT.forward)."""

    def __init__(self, emb: nn.Embedding, block: int = 64, scale_block: int = 256):
        super().__init__()
        self.num_embeddings, self.embedding_dim = emb.num_embeddings, emb.embedding_dim
        self._store(emb.weight, block, scale_block)

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantize()

    def forward(self, idx):
        return F.embedding(idx, self.dequantize())


def quantize_nf4_(model: nn.Module, block: int = 64, scale_block: int = 256) -> nn.Module:
    """Swap every nn.Linear / nn.Embedding of model (in place) for its frozen NF4 version; returns model.

    Norm gains and other 1-D parameters stay in full precision (a negligible share of the weights). Apply
    LoRA afterwards (or before: adapters are not Linear modules and are left alone).
    """
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, child_name, NF4Linear(child, block, scale_block))
            elif type(child) is nn.Embedding:
                setattr(module, child_name, NF4Embedding(child, block, scale_block))
    return model


@torch.no_grad()
def dequantize_nf4_(model: nn.Module) -> nn.Module:
    """The inverse swap: every NF4Linear / NF4Embedding back to a plain module holding its de-quantized weight
    (e.g. to save a QLoRA-trained model in the ordinary format after merge_lora)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, NF4Linear):
                plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                  device=child.packed.device, dtype=child.weight_dtype)
                if child.bias is not None:
                    plain.bias.copy_(child.bias)
            elif isinstance(child, NF4Embedding):
                plain = nn.Embedding(child.num_embeddings, child.embedding_dim, device=child.packed.device,
                                     dtype=child.weight_dtype)
            else:
                continue
            plain.weight.copy_(child.dequantize())
            setattr(module, name, plain)
    return model


def frozen_weight_bytes(model: nn.Module) -> int:
    """Bytes of every frozen weight: parameters without grad plus quantized buffers."""
    n = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    n += sum(m.nf4().nbytes() for m in model.modules() if isinstance(m, _NF4Module))
    return n
