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


# ---------------------------------------------------------------------------- int8 / int4 inference modules
# Post-training quantization for inference (`ember compress`): frozen modules whose weights stay in 8 or 4 bits
# in memory and on disk. On CPU the matmuls run through torch's packed-weight kernels on bf16 activations
# (measured on this machine's 1-thread decode, 1536x576 layers: fp32 212 us, int8 kernel 45 us, int4 kernel
# 26 us; the same kernels on fp32 activations are 5-50x slower than fp32, so activations go to bf16 first).
# Elsewhere (CUDA, shapes the kernels refuse) one layer's weight is de-quantized at a time, never the model.
# Every module has a `.weight` property (the de-quantized matrix) for code that reads .weight (export, merge),
# and its state is plain tensors (int8 / uint8 codes, fp16/fp32 scales) so safetensors stores it.

INT4_GROUPS = (32, 64, 128)  # group sizes the CPU int4 kernel takes (and GPTQ/AWQ papers report)


def quantize_int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 (per output channel of a Linear, per token of an Embedding).

    w (N, K) -> codes int8 (N, K) in [-127, 127], scale fp32 (N,) = absmax(row) / 127; w ~ codes * scale.
    Symmetric with 127 (not -128) levels so that negation is exact and zero is a code.
    """
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def int4_params(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min-max parameters of 4-bit groups along the input dim: w (N, K) -> scale fp32 (N, K/G),
    zero (N, K/G) fp32 integer zero-points in [0, 15]. Range widened to include 0 so zero is exact.

    Why an integer zero-point and not a float offset (w = q * s + m, Q4_1's form, which has ~15% lower weight
    RMS error): with a float offset zero is no level, so the many near-zero weights of a group all move the same
    way, and that bias adds up coherently against activations with a nonzero mean. Measured on SmolLM2-135M,
    group 64, RTN: WikiText-2 perplexity 37.3 with zero-points vs 41.7 with float offsets (fp32: 29.6)."""
    g = w.detach().float().reshape(w.shape[0], -1, group_size)
    lo, hi = g.amin(dim=2).clamp(max=0), g.amax(dim=2).clamp(min=0)
    scale = ((hi - lo) / 15.0).clamp(min=1e-8)
    return scale, torch.round(-lo / scale).clamp(0, 15)


def int4_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """Round-to-nearest codes in [0, 15]: (N, K) uint8, q = clamp(round(w / s) + z)."""
    N, K = w.shape
    g = w.detach().float().reshape(N, -1, group_size)
    q = torch.round(g / scale[..., None]) + zero[..., None]
    return q.clamp(0, 15).reshape(N, K).to(torch.uint8)


def int4_dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """(q - z) * s per group: fp32 (N, K)."""
    N, K = codes.shape
    q = codes.float().reshape(N, -1, group_size)
    return ((q - zero.float()[..., None]) * scale.float()[..., None]).reshape(N, K)


def _pack_rows(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) 4-bit codes -> (N, K/2) uint8, column 2j in the high nibble (the NF4 order)."""
    c = codes.to(torch.uint8)
    return (c[:, 0::2] << 4) | c[:, 1::2]


def _unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed >> 4, packed & 0xF), dim=2).reshape(packed.shape[0], -1)


def _int8_mm(x2: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, cache: dict) -> torch.Tensor:
    """x2 (M, K) @ (qweight * scale[:, None])^T -> (M, N): bf16 through the int8-weight kernel on CPU, else in
    x2's dtype with only this layer de-quantized."""
    if x2.device.type == "cpu" and qweight.shape[1] % 16 == 0:  # the kernel crashes on K not a multiple of 16
        if "scale_bf16" not in cache:
            cache["scale_bf16"] = scale.to(torch.bfloat16)
        return torch._weight_int8pack_mm(x2.to(torch.bfloat16).contiguous(), qweight, cache["scale_bf16"])
    return (x2 @ qweight.to(x2.dtype).t()) * scale.to(x2.dtype)


class _Frozen(nn.Module):
    """Shared parts: a bias, the cached kernel layouts (rebuilt after load_state_dict or .to())."""

    def _set_bias(self, bias: torch.Tensor | None) -> None:
        b = bias.detach().clone().float() if bias is not None else None
        self.register_buffer("bias", b, persistent=b is not None)
        self._cache: dict = {}

    def _load_from_state_dict(self, *args, **kwargs):
        self._cache = {}
        return super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self._cache = {}
        return super()._apply(fn, *args, **kwargs)

    def _cached(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def extra_repr(self) -> str:
        return f"in_features={getattr(self, 'in_features', '')}, out_features={getattr(self, 'out_features', '')}"

    def _finish(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = y.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class Int8Linear(_Frozen):
    """A frozen Linear with per-output-channel symmetric int8 weights: y = (x @ codes^T) * scale + bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self._set_bias(torch.zeros(out_features, device=device) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear) -> "Int8Linear":
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.device)
        m.qweight, m.scale = quantize_int8_rows(linear.weight)
        if linear.bias is not None:
            m.bias = linear.bias.detach().float().clone()
        return m

    @property
    def weight(self) -> torch.Tensor:  # de-quantized (N, K) fp32, for export / merge code
        return self.qweight.float() * self.scale[:, None]

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        return _int8_mm(x2, self.qweight, self.scale, self._cache)

    def forward(self, x):
        y = self._matmul(x.reshape(-1, self.in_features))
        return self._finish(y.view(*x.shape[:-1], self.out_features), x)


class W8A8Linear(Int8Linear):
    """Int8 weights and dynamic per-token int8 activations (LLM.int8 / SmoothQuant's W8A8 numerics without
    outlier handling): x ~ xq * sx with sx = absmax(token) / 127, y = (xq @ codes^T) * sx * scale.
    xq holds integers |xq| <= 127, exact in bf16, so the int8-weight kernel computes the integer products."""

    def forward(self, x):
        x2 = x.reshape(-1, self.in_features).float()
        sx = (x2.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-12)  # (M, 1)
        xq = torch.round(x2 / sx).clamp(-127, 127)
        y = self._matmul(xq).float() * sx
        return self._finish(y.view(*x.shape[:-1], self.out_features), x)


class Int4Linear(_Frozen):
    """A frozen Linear with 4-bit group-wise asymmetric weights: w = (q - zero) * scale per group of
    `group_size` input columns. Stored as packed (N, K/2) uint8 (two codes per byte), scale fp16 (N, K/G),
    zero uint8 (N, K/G): 4 + 24/G bits per weight. On CPU the forward repacks once into the layout of
    torch's int4 kernel (`_weight_int4pack_mm_for_cpu`, w = (q - 8) * s + m, so m = (8 - zero) * s)."""

    def __init__(self, in_features: int, out_features: int, group_size: int = 64, bias: bool = False, device=None):
        super().__init__()
        assert in_features % group_size == 0 and in_features % 2 == 0, (in_features, group_size)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        n_groups = in_features // group_size
        self.register_buffer("packed", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.ones(out_features, n_groups, dtype=torch.float16, device=device))
        self.register_buffer("zero", torch.zeros(out_features, n_groups, dtype=torch.uint8, device=device))
        self._set_bias(torch.zeros(out_features, device=device) if bias else None)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                   bias: torch.Tensor | None = None) -> "Int4Linear":
        """codes (N, K) in [0, 15], scale/zero (N, K/G) (as int4_params returns; GPTQ writes its own)."""
        N, K = codes.shape
        m = cls(K, N, group_size, bias is not None, codes.device)
        m.packed = _pack_rows(codes)
        m.scale, m.zero = scale.to(torch.float16), zero.to(torch.uint8)
        if bias is not None:
            m.bias = bias.detach().float().clone()
        return m

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int = 64) -> "Int4Linear":
        """Round-to-nearest (RTN) 4-bit: min-max range per group."""
        w = linear.weight
        scale, zero = int4_params(w, group_size)
        scale = scale.half().float()  # the stored fp16 scale is the one the codes are rounded against
        return cls.from_codes(int4_codes(w, scale, zero, group_size), scale, zero, group_size, linear.bias)

    def codes(self) -> torch.Tensor:
        return _unpack_rows(self.packed)

    @property
    def weight(self) -> torch.Tensor:  # de-quantized (N, K) fp32
        return int4_dequantize(self.codes(), self.scale, self.zero, self.group_size)

    def _kernel_args(self):
        q = self.codes().to(torch.int32)
        s = self.scale.float()
        m = (8.0 - self.zero.float()) * s  # (N, K/G): the kernel's additive offset
        return (torch._convert_weight_to_int4pack_for_cpu(q, 1),
                torch.stack((s.t(), m.t()), dim=-1).to(torch.bfloat16).contiguous())  # (K/G, N, 2)

    def forward(self, x):
        x2 = x.reshape(-1, self.in_features)
        if x2.device.type == "cpu" and self.out_features % 16 == 0:  # the kernel wants N divisible by 16
            packed, sz = self._cached("int4pack", self._kernel_args)
            y = torch._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16).contiguous(), packed, self.group_size, sz)
        else:
            y = x2 @ self.weight.to(x2.dtype).t()  # this one layer de-quantized, then freed
        return self._finish(y.view(*x.shape[:-1], self.out_features), x)


class Int8Embedding(_Frozen):
    """A frozen Embedding with per-row symmetric int8: a lookup gathers int8 rows and scales them. A tied
    output head reads the same codes through `Int8TiedHead` (per-row = per-output-channel of the head)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, device=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("qweight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(num_embeddings, dtype=torch.float32, device=device))
        self._cache = {}

    @classmethod
    def from_float(cls, emb: nn.Embedding) -> "Int8Embedding":
        m = cls(emb.num_embeddings, emb.embedding_dim, emb.weight.device)
        m.qweight, m.scale = quantize_int8_rows(emb.weight)
        return m

    @property
    def weight(self) -> torch.Tensor:
        return self.qweight.float() * self.scale[:, None]

    def forward(self, idx):
        return F.embedding(idx, self.qweight).float() * self.scale[idx][..., None]


class Int8TiedHead(nn.Module):
    """The output head of a tied-embedding model, reading the Int8Embedding's codes (not a copy, and not in
    state_dict: the embedding is held in a tuple, invisible to nn.Module). Rebuilt by quantize_model_."""

    def __init__(self, emb: Int8Embedding):
        super().__init__()
        self._emb = (emb,)

    @property
    def weight(self) -> torch.Tensor:
        return self._emb[0].weight

    def forward(self, x):
        emb = self._emb[0]
        y = _int8_mm(x.reshape(-1, x.shape[-1]), emb.qweight, emb.scale, emb._cache)
        return y.to(x.dtype).view(*x.shape[:-1], emb.num_embeddings)


# ---------------------------------------------------------------------------- whole-model swaps

LINEAR_SCHEMES = ("int8", "w8a8", "int4")
_SKIP = ("router",)  # MoE routers stay in full precision: tiny, and a flipped top-k changes the computation


def quant_scheme(linear: str, group_size: int = 64, embedding: bool = True, **info) -> dict:
    """The scheme saved in a checkpoint's metadata ("quant"): what load_model rebuilds before loading."""
    assert linear in LINEAR_SCHEMES, linear
    return {"linear": linear, "group_size": group_size, "embedding": "int8" if embedding else "", **info}


def _layer_linears(model: nn.Module):
    """(parent, child name, full name, Linear) of every plain nn.Linear inside the transformer blocks."""
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and full.startswith("layers.") and child_name not in _SKIP:
                yield module, child_name, full, child


def quantize_model_(model: nn.Module, scheme: dict) -> nn.Module:
    """Swap (in place) every plain nn.Linear of the blocks for the scheme's module (RTN for int4); linears
    already quantized (by GPTQ/AWQ) are left as they are. With scheme["embedding"] the token embedding
    becomes Int8Embedding and the head int8 (a tied head reads the embedding's codes). Returns model."""
    make = {"int8": Int8Linear.from_float, "w8a8": W8A8Linear.from_float,
            "int4": lambda lin: Int4Linear.from_float(lin, scheme["group_size"])}[scheme["linear"]]
    with torch.no_grad():
        for parent, child_name, _, lin in list(_layer_linears(model)):
            setattr(parent, child_name, make(lin))
        if scheme.get("embedding"):
            _quantize_ends(model, from_float=True)
    model.quant = scheme
    return model


def _quantize_ends(model, from_float: bool) -> None:
    """Embedding -> Int8Embedding, head -> Int8Linear (untied) or Int8TiedHead (tied)."""
    emb = model.tok_emb
    if type(emb) is nn.Embedding:
        model.tok_emb = Int8Embedding.from_float(emb) if from_float else \
            Int8Embedding(emb.num_embeddings, emb.embedding_dim, emb.weight.device)
    if model.lm_head is None or isinstance(model.lm_head, Int8TiedHead):  # tied: lm_head is None in GPT
        model.lm_head = Int8TiedHead(model.tok_emb)
    elif type(model.lm_head) is nn.Linear:
        h = model.lm_head
        model.lm_head = Int8Linear.from_float(h) if from_float else \
            Int8Linear(h.in_features, h.out_features, h.bias is not None, h.weight.device)


def quant_skeleton_(model: nn.Module, scheme: dict) -> nn.Module:
    """Empty quantized modules of the scheme's shapes (on the model's device, meta included), so a quantized
    checkpoint loads into them with load_state_dict: the weights are never de-quantized up front."""
    linear, g = scheme.get("linear"), scheme.get("group_size", 64)
    if linear not in LINEAR_SCHEMES or not isinstance(g, int) or g not in INT4_GROUPS and linear == "int4":
        from ember.common.errors import UserError

        raise UserError(f"quantization scheme {scheme} in the checkpoint's metadata: 'linear' must be one of "
                        f"{LINEAR_SCHEMES} and 'group_size' one of {INT4_GROUPS}; the file was not written by "
                        f"`ember compress` or is damaged. Re-run `ember compress` on the original model.")
    for parent, child_name, _, lin in list(_layer_linears(model)):
        args = (lin.in_features, lin.out_features)
        kw = dict(bias=lin.bias is not None, device=lin.weight.device)
        new = {"int8": lambda: Int8Linear(*args, **kw), "w8a8": lambda: W8A8Linear(*args, **kw),
               "int4": lambda: Int4Linear(*args, group_size=g, **kw)}[linear]()
        setattr(parent, child_name, new)
    if scheme.get("embedding"):
        _quantize_ends(model, from_float=False)
    model.quant = scheme
    return model


@torch.no_grad()
def dequantize_model_(model: nn.Module) -> nn.Module:
    """Every quantized module back to a plain one holding its de-quantized weight (export to HF/GGUF, further
    training); a tied head goes back to reading the embedding (lm_head None). Returns model."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, (Int8Linear, Int4Linear)):
                plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                  device=child.scale.device)
                plain.weight.copy_(child.weight)
                if child.bias is not None:
                    plain.bias.copy_(child.bias)
            elif isinstance(child, Int8Embedding):
                plain = nn.Embedding(child.num_embeddings, child.embedding_dim, device=child.scale.device)
                plain.weight.copy_(child.weight)
            elif isinstance(child, Int8TiedHead):
                plain = None
            else:
                continue
            setattr(module, name, plain)
    if hasattr(model, "quant"):
        del model.quant
    return model


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer in memory (what a checkpoint holds, kernel caches excluded)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
