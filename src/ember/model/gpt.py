"""The model: a Llama-style decoder-only transformer in one file (GPTConfig, Attention, MLP, MoE, Block, GPT).

RMSNorm, rotary position embeddings (HF Llama's rotate_half convention, so weights map 1:1 to
transformers), grouped-query attention through `F.scaled_dot_product_attention`, SwiGLU MLP or a top-k
mixture of experts, optional QK-norm, optional tied embeddings, and a preallocated KV cache.
Build on the meta device, then materialize: `model = build_model(GPTConfig(...), "cpu")`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ember.common.config import require
from ember.common.errors import UserError
from ember.model.loss import _head_nll, _LinearCrossEntropy, token_logprobs  # noqa: F401  (token_logprobs: re-exported)


ROPE_SCALINGS = ("", "linear", "dynamic", "llama3", "yarn")


@dataclass
class GPTConfig:
    vocab_size: int = 8192  # tokens in the vocabulary; 0 = not set yet (the stage fills it from the tokenizer)
    n_layer: int = 4  # transformer blocks (the `depth` of GPTConfig.from_depth)
    n_head: int = 4  # query heads; head_dim = head_size or n_embd / n_head
    n_kv_head: int = 4  # key/value heads (GQA): each serves n_head / n_kv_head query heads; = n_head is plain MHA
    n_embd: int = 256  # residual stream width
    ffn_hidden: int = 0  # SwiGLU hidden width per MLP/expert; 0 = 8/3 * n_embd rounded up to a multiple of 64
    max_seq_len: int = 512  # longest sequence the model is trained/served on (KV cache default, HF max_position_embeddings)
    rope_theta: float = 10000.0  # RoPE base; larger = slower-rotating low frequencies for long context
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = False  # share the token embedding with the output head (saves V*n_embd params)
    qk_norm: bool = False  # RMSNorm on each query/key head before RoPE (stabilizes attention logits; Qwen3/OLMo2)
    n_expert: int = 0  # experts per MoE layer; 0 = dense SwiGLU MLP
    n_expert_active: int = 2  # experts each token is routed to (top-k), when n_expert > 0
    moe_aux_coef: float = 0.01  # weight of the load-balancing loss (Switch Transformer, 1 at perfect balance)
    moe_z_coef: float = 0.001  # weight of the router z-loss (ST-MoE: keeps router logits small)
    moe_norm_topk: bool = True  # rescale the top-k router weights to sum to 1 (Mixtral; Qwen3-MoE's norm_topk_prob)
    head_size: int = 0  # width of each q/k/v head; 0 = n_embd // n_head (Qwen3 fixes it, e.g. 128 at any width)
    attn_bias: bool = False  # biases on the q/k/v projections (Qwen2/2.5); o_proj never has one
    rope_scaling: str = ""  # RoPE context extension: "" none, linear, dynamic (NTK), llama3, yarn (see rope_inv_freq)
    rope_factor: float = 1.0  # how many times the context is stretched beyond rope_original_max
    rope_original_max: int = 0  # the pretraining context (tokens) the scaling stretches; 0 = max_seq_len
    rope_low_rot: float = 1.0  # llama3 low_freq_factor / yarn beta_slow: frequencies turning fewer times: / factor
    rope_high_rot: float = 32.0  # llama3 high_freq_factor (4) / yarn beta_fast (32): turning more times: kept as is
    rope_attn_factor: float = 0.0  # yarn's multiplier on cos/sin (attention temperature); 0 = 0.1 ln(rope_factor) + 1
    rope_truncate: bool = True  # yarn: round the ramp's bounds to whole dims, as the paper's code (gpt-oss: false)
    hf_model_type: str = ""  # HF family an import came from (mistral, qwen2, ...) for export; "" = from the features

    def __post_init__(self):
        require(self.vocab_size >= 0, "model.vocab_size", self.vocab_size, "an int >= 1 (0 = set from the tokenizer)")
        for name in ("n_layer", "n_head", "n_kv_head", "n_embd", "max_seq_len"):
            require(getattr(self, name) >= 1, f"model.{name}", getattr(self, name), "an int >= 1")
        require(self.head_size >= 0 and (self.head_size or self.n_embd / self.n_head) % 2 == 0, "model.head_size",
                (self.head_size, self.n_embd), f"an even head_size, or 0 with n_embd a multiple of 2 * n_head "
                f"(= {2 * self.n_head}): heads need an even RoPE width")
        require(self.n_head % self.n_kv_head == 0, "model.n_kv_head", self.n_kv_head,
                f"a divisor of n_head = {self.n_head}")
        require(self.ffn_hidden >= 0, "model.ffn_hidden", self.ffn_hidden, "an int >= 0 (0 = derived)")
        require(self.rope_theta > 0, "model.rope_theta", self.rope_theta, "a float > 0")
        require(self.norm_eps > 0, "model.norm_eps", self.norm_eps, "a float > 0")
        require(self.n_expert >= 0, "model.n_expert", self.n_expert, "an int >= 0 (0 = dense)")
        if self.n_expert:
            require(1 <= self.n_expert_active <= self.n_expert, "model.n_expert_active", self.n_expert_active,
                    f"an int in [1, n_expert = {self.n_expert}]")
        require(self.moe_aux_coef >= 0 and self.moe_z_coef >= 0, "model.moe_aux_coef/moe_z_coef",
                (self.moe_aux_coef, self.moe_z_coef), "floats >= 0")
        require(self.rope_scaling in ROPE_SCALINGS, "model.rope_scaling", self.rope_scaling, f"one of {ROPE_SCALINGS}")
        require(self.rope_factor > 0 and self.rope_original_max >= 0 and self.rope_high_rot > self.rope_low_rot > 0,
                "model.rope_*", (self.rope_factor, self.rope_original_max, self.rope_low_rot, self.rope_high_rot),
                "rope_factor > 0, rope_original_max >= 0, 0 < rope_low_rot < rope_high_rot")

    @property
    def head_dim(self) -> int:
        return self.head_size or self.n_embd // self.n_head

    def rope(self, positions: torch.Tensor):
        """cos, sin (B or 1, T, 1, head_dim) of this model's RoPE, scaling included, at positions (B or 1, T)."""
        # unscaled (the training default): not one op more than plain RoPE
        return _cos_sin(positions, *rope_inv_freq(self, positions)) if self.rope_scaling else \
            rope_cos_sin(positions, self.head_dim, self.rope_theta)

    @property
    def ffn_dim(self) -> int:
        # SwiGLU has 3 matrices instead of 2, so 8/3*d keeps the MLP at the 8*d^2 params of a 4*d GELU MLP
        # (Shazeer 2020, Llama); rounding to 64 keeps matmuls on aligned tiles.
        return self.ffn_hidden or 64 * math.ceil(8 * self.n_embd / 3 / 64)

    @classmethod
    def from_depth(cls, depth: int, vocab_size: int, **overrides) -> "GPTConfig":
        """One dial for model size: width and heads follow from the number of layers.

        n_embd = 64 * depth (aspect ratio 64, as nanochat) and 64-wide heads (n_head = depth). Kaplan et al.
        2020 (sec. 3.1) find loss depends on the parameter count and only weakly on the depth/width shape over
        a wide range, so one line through shape space is enough to sweep sizes: depth 4 -> 256 wide, ~3M
        non-embedding params; depth 12 -> 768 wide (GPT-2 small); depth 20 -> 1280 wide (~400M).
        """
        require(depth >= 1, "depth", depth, "an int >= 1")
        n_embd = 64 * depth
        kw = dict(vocab_size=vocab_size, n_layer=depth, n_embd=n_embd, n_head=n_embd // 64)
        kw.update(overrides)
        kw.setdefault("n_kv_head", kw["n_head"])
        return cls(**kw)


# ---------------------------------------------------------------------------- layers

class RMSNorm(nn.Module):
    """x / rms(x) * weight (Zhang & Sennrich 2019): LayerNorm without centering or bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float):
    """cos, sin of shape (B or 1, T, 1, head_dim) of plain RoPE for integer positions (B or 1, T); a model's own
    (scaling included) is `config.rope(positions)`. Computed on the fly (a few thousand trig ops per forward): no
    buffer to materialize after meta-device construction. Same formula and fp32 arithmetic as HF Llama's."""
    return _cos_sin(positions, 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float,
                                                              device=positions.device) / head_dim)))


def _cos_sin(positions, inv_freq, mult: float = 1.0):
    freqs = positions[..., None].float() * inv_freq  # (B, T, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, head_dim): frequency i drives dims i and i + head_dim/2
    cos, sin = emb.cos()[:, :, None, :], emb.sin()[:, :, None, :]
    return (cos, sin) if mult == 1.0 else (cos * mult, sin * mult)


def rope_inv_freq(c: GPTConfig, positions: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim/2,) fp32 of c's scaled RoPE ((B, 1, head_dim/2) for dynamic: per row), and
    the multiplier of its cos/sin.

    Frequency i turns orig * inv[i] / 2pi times over the original context orig; the scalings slow the ones that
    turn few times, so positions past orig look like ones seen in pretraining. Formulas and fp32 order of
    operations as transformers' modeling_rope_utils, so imported models match it to 1e-5.
    """
    d, s, orig, dev = c.head_dim, c.rope_factor, c.rope_original_max or c.max_seq_len, positions.device
    exps = torch.arange(0, d, 2, dtype=torch.float, device=dev) / d  # 2i/d, (d/2,)
    if c.rope_scaling == "dynamic":  # NTK-aware (bloc97, emozilla 2023): a larger base once T outgrows orig
        # each row's own length (B, 1, 1), so a row in a batched decode does not take its batch mates' base;
        # a tensor, no host sync; for one sequence the same as HF's length of the forward
        T = (positions.amax(dim=-1, keepdim=True) + 1).clamp(min=orig).float()[..., None]
        return 1.0 / (c.rope_theta * (s * T / orig - (s - 1)) ** (d / (d - 2))) ** exps, 1.0  # (B, 1, d/2)
    inv = 1.0 / (c.rope_theta ** exps)
    if c.rope_scaling == "linear":  # position interpolation (Chen et al. 2023, arXiv:2306.15595): m -> m / s
        return inv / s, 1.0
    # llama3 and yarn blend interpolated (inv / s) and original frequencies by a ramp `keep` (1 = original)
    if c.rope_scaling == "llama3":  # Meta's Llama 3.1 apply_scaling: ramp linear in turns over orig
        return _blend(inv, s, (orig / (2 * math.pi / inv) - c.rope_low_rot) / (c.rope_high_rot - c.rope_low_rot)), 1.0
    # yarn (Peng et al. 2023, arXiv:2309.00071, eq. 18-21): ramp linear in the dim index, between the dims that
    # turn beta_fast and beta_slow times; cos/sin times the attention temperature sqrt(1/t) = 0.1 ln s + 1
    lo, hi = (d * math.log(orig / (turns * 2 * math.pi)) / (2 * math.log(c.rope_theta))
              for turns in (c.rope_high_rot, c.rope_low_rot))  # fractional dim index turning `turns` times
    lo, hi = (max(math.floor(lo), 0), min(math.ceil(hi), d - 1)) if c.rope_truncate else (max(lo, 0), min(hi, d - 1))
    ramp = (torch.arange(d // 2, dtype=torch.float, device=dev) - lo) / (hi - lo if hi != lo else 0.001)
    return _blend(inv, s, 1 - ramp), c.rope_attn_factor or (0.1 * math.log(s) + 1 if s > 1 else 1.0)


def _blend(inv, s, keep):
    keep = keep.clamp(0, 1)
    return inv / s * (1 - keep) + inv * keep


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, H, head_dim) by position. Pairs dim i with dim i + head_dim/2 ("rotate_half", as HF
    Llama and Meta's HF checkpoints), not adjacent pairs (2i, 2i+1) as the original RoPE paper/Meta code."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache:
    """Keys/values of past positions for incremental decoding, preallocated per layer.

    k, v: (n_layer, B, n_kv_head, max_len, head_dim). `pos` is the number of positions already written (the
    same for every row of the batch); GPT.forward writes the new positions and then advances `pos`.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        self.max_len = max_len or config.max_seq_len
        shape = (config.n_layer, batch_size, config.n_kv_head, self.max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, n_kv_head, T, head_dim) at [pos, pos+T); return all keys/values so far."""
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise UserError(f"KV cache is full: {end} positions needed, room for {self.max_len}. "
                            f"Shorten the prompt/generation or create the cache with a larger max_len.")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reset(self) -> None:
        self.pos = 0


class Attention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        d = config.n_embd
        self.q_proj = nn.Linear(d, self.n_head * self.head_dim, bias=config.attn_bias)
        self.k_proj = nn.Linear(d, self.n_kv_head * self.head_dim, bias=config.attn_bias)
        self.v_proj = nn.Linear(d, self.n_kv_head * self.head_dim, bias=config.attn_bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, d, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None

    def forward(self, x, cos, sin, mask, is_causal, cache):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, head_dim)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, n_kv_head, pos+T, head_dim)
        # enable_gqa lets query head h read kv head h // (n_head / n_kv_head) without copying k, v
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           enable_gqa=self.n_kv_head != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)) (Shazeer 2020)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.ffn_dim, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.ffn_dim, bias=False)
        self.down_proj = nn.Linear(config.ffn_dim, config.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Top-k mixture of SwiGLU experts (Mixtral routing: softmax over all experts, keep the top k,
    renormalize their weights to sum to 1 unless moe_norm_topk is off). Returns the output and (aux, z) losses."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_expert, self.k, self.norm_topk = config.n_expert, config.n_expert_active, config.moe_norm_topk
        self.router = nn.Linear(config.n_embd, config.n_expert, bias=False)
        self.experts = nn.ModuleList(MLP(config) for _ in range(config.n_expert))

    def forward(self, x):
        B, T, D = x.shape
        x = x.reshape(-1, D)  # (N, D) with N = B*T tokens
        logits = self.router(x).float()  # (N, E); routing in fp32 even under autocast
        probs = logits.softmax(dim=-1)
        top_p, top_i = probs.topk(self.k, dim=-1)  # (N, k)
        if self.norm_topk:
            top_p = top_p / top_p.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            # every expert runs (on possibly zero rows) so all get a gradient and there is no host sync
            tok, slot = torch.where(top_i == e)  # tokens routed to e, and in which of their k slots
            y = expert(x[tok]) * top_p[tok, slot, None].to(x.dtype)
            out.index_add_(0, tok, y.to(out.dtype))
        aux, z = moe_losses(logits, top_i, self.n_expert)
        return out.view(B, T, D), torch.stack((aux, z))


def moe_losses(logits: torch.Tensor, top_i: torch.Tensor, n_expert: int):
    """Load-balancing and z losses of one MoE layer from router logits (N, E) and chosen experts (N, k).

    aux = E * sum_e f_e * P_e (Switch Transformer eq. 4), f_e = share of the N*k routing slots that went to
    expert e, P_e = mean router probability of e. Perfect balance gives 1, everything on one expert gives E.
    (HF's load_balancing_loss_func counts f_e per token, not per slot, so its value is k times this.)
    z = mean over tokens of logsumexp(logits)^2 (ST-MoE, Zoph et al. 2022).
    """
    probs = logits.softmax(dim=-1)
    counts = torch.zeros(n_expert, device=logits.device, dtype=torch.float32)
    counts.index_add_(0, top_i.reshape(-1), torch.ones(top_i.numel(), device=logits.device))
    aux = n_expert * (counts / top_i.numel() * probs.mean(dim=0)).sum()
    z = torch.logsumexp(logits, dim=-1).square().mean()
    return aux, z


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = Attention(config, layer_idx)
        self.mlp_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MoE(config) if config.n_expert else MLP(config)

    def forward(self, x, cos, sin, mask, is_causal, cache):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, is_causal, cache)
        if isinstance(self.mlp, MoE):
            y, moe = self.mlp(self.mlp_norm(x))
            return x + y, moe
        return x + self.mlp(self.mlp_norm(x)), None


# ---------------------------------------------------------------------------- the model

def doc_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token inside its document, for packed rows: doc_ids (B, T) -> (B, T).
    Documents are contiguous runs of equal id: [7,7,7,9,9] -> [0,1,2,0,1]."""
    idx = torch.arange(doc_ids.size(1), device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return idx - torch.where(starts, idx, 0).cummax(dim=1).values


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.vocab_size < 1:
            raise UserError("model.vocab_size is 0 (unset): set --model.vocab_size to the tokenizer's vocabulary size")
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        # Tied: the head reads tok_emb.weight in forward (no shared Parameter, so meta -> to_empty, FSDP and
        # safetensors all see one tensor).
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.moe_stats = None  # MoE only: (aux, z) of the last forward, averaged over layers, for logging

    @torch.no_grad()
    def init_weights(self) -> None:
        """Fill every parameter (after `to_empty`); deterministic given torch.manual_seed on one device.

        Normal(0, 0.02) everywhere (GPT-2), residual output projections (o_proj, down_proj) scaled by
        1/sqrt(2 * n_layer) so the residual stream's variance does not grow with depth; norm gains 1, biases 0.
        """
        std = 0.02
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        p = self.tok_emb.weight
        return KVCache(self.config, batch_size, max_len, device=p.device, dtype=p.dtype)

    def forward(self, idx, targets=None, *, positions=None, doc_ids=None, cache=None, reduction="mean"):
        """idx (B, T) int64 -> logits (B, T, V); with targets (B, T) -> the loss.

        targets: next-token ids, -100 = ignored. reduction "mean" gives the scalar mean cross-entropy over
        non-ignored targets plus the MoE aux losses; "none" gives per-token cross-entropy (B, T) (0 where
        ignored, no aux losses). positions (B, T): explicit RoPE positions. doc_ids (B, T): attention is causal
        AND within equal ids (packed documents do not see each other); positions then restart per document
        unless given. cache: a KVCache; idx holds the next T positions after cache.pos, which then advances.
        """
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if positions is None:
            positions = doc_positions(doc_ids) if doc_ids is not None else \
                torch.arange(start, start + T, device=idx.device).unsqueeze(0)
        cos, sin = self.config.rope(positions)
        mask, is_causal = self._attn_mask(T, start, doc_ids, cache, idx.device)

        x = self.tok_emb(idx)  # (B, T, n_embd)
        moe = []
        for block in self.layers:
            x, m = block(x, cos, sin, mask, is_causal, cache)
            if m is not None:
                moe.append(m)
        if cache is not None:
            cache.pos += T
        x = self.norm(x)  # (B, T, n_embd)
        if moe:
            self.moe_stats = torch.stack(moe).mean(dim=0).detach()
        if targets is None:
            return self.head(x)  # (B, T, V)
        assert reduction in ("mean", "none"), reduction
        w, grad = self._fusable_head_weight(), torch.is_grad_enabled()
        if w is None or (reduction == "none" and grad):  # a head with its own forward, or per-token gradients
            nll = -token_logprobs(self.head(x), targets)  # (B, T), through the (B, T, V) logits
        else:
            dev = x.device.type
            dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else w.dtype  # matmuls'
            x, flat = x.flatten(0, 1), targets.flatten()
            nll = _LinearCrossEntropy.apply(x, w, flat, dtype) if grad else \
                _head_nll(x, w, flat, dtype).view_as(targets)  # training: the summed loss; evaluation: (B, T)
        if reduction == "none":
            return nll
        loss = nll.sum() / (targets != -100).sum().clamp(min=1)
        if moe:
            aux, z = torch.stack(moe).mean(dim=0)
            loss = loss + self.config.moe_aux_coef * aux + self.config.moe_z_coef * z
        return loss

    def head(self, x):
        """Logits (..., V) of the final hidden states x (..., n_embd)."""
        return self.lm_head(x) if self.lm_head is not None else F.linear(x, self.tok_emb.weight)

    def _fusable_head_weight(self):
        """The head's (V, n_embd) matrix when the fused loss can read it directly; None for a head with its
        own forward (LoRA, quantized, a reward head) or a distributed tensor: those go through head()."""
        w = self.tok_emb.weight if self.lm_head is None else \
            self.lm_head.weight if type(self.lm_head) is nn.Linear and self.lm_head.bias is None else None
        return w if w is not None and type(w.data) is torch.Tensor else None

    @staticmethod
    def _attn_mask(T, start, doc_ids, cache, device):
        """(attn_mask, is_causal) for SDPA. A boolean mask (True = may attend) only where is_causal cannot
        express it, so the common cases stay on the fused causal kernel without a (T, T) tensor."""
        if doc_ids is not None:
            assert cache is None, "doc_ids (packed documents) are for training; decode one document per row"
            causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
            return ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal).unsqueeze(1), False  # (B, 1, T, T)
        if cache is None or start == 0:
            return None, True  # keys are exactly the T query positions: plain causal
        if T == 1:
            return None, False  # one new token attends to every cached position
        # T new queries at positions start..start+T-1 over start+T keys: causal with an offset
        q_pos = torch.arange(start, start + T, device=device)[:, None]
        return torch.arange(start + T, device=device)[None, :] <= q_pos, False

    def num_params(self, exclude_embedding: bool = False, active: bool = False) -> int:
        """Parameter count. exclude_embedding drops the input embedding table (a lookup, no FLOPs); a tied
        table also serves as the output head, so it stays counted. active counts only the n_expert_active
        experts a token uses (the compute-relevant size of an MoE)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding and self.lm_head is not None:
            n -= self.tok_emb.weight.numel()
        c = self.config
        if active and c.n_expert:
            per_expert = 3 * c.n_embd * c.ffn_dim
            n -= c.n_layer * (c.n_expert - c.n_expert_active) * per_expert
        return n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward) for MFU: 6 N + 12 L H Q T.

        6N: each active non-embedding weight does a multiply-add (2 FLOPs) forward and twice that backward
        (Kaplan et al. 2020). 12 L H Q T: attention scores and the weighted sum of values, 2 matmuls of
        2*H*Q*T FLOPs per layer forward, x3 for backward, counted over the full T x T square as in
        PaLM (Chowdhery et al. 2022, app. B) and nanochat although the causal mask skips half of it.
        L = n_layer, H = n_head, Q = head_dim, T = seq_len.
        """
        c = self.config
        return 6 * self.num_params(exclude_embedding=True, active=True) + 12 * c.n_layer * c.n_head * c.head_dim * seq_len


def build_model(config: GPTConfig, device: torch.device | str = "cpu", init: bool = True) -> GPT:
    """Construct on the meta device (no memory, no init cost), allocate on `device`, then init_weights().
    init=False leaves the memory uninitialized for a caller that loads weights next."""
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    if init:
        model.init_weights()
    return model
