"""4-bit post-training quantization with calibration data: GPTQ and AWQ, block by block through the model.

GPTQ (Frantar et al. 2022, arXiv:2210.17323): quantize a Linear's columns one at a time and spread each
column's rounding error over the not-yet-quantized columns through the inverse Hessian of the layer's
squared output error, H = 2 X X^T / n (X: the layer's calibration inputs). AWQ (Lin et al. 2023,
arXiv:2306.00978): scale input channel k of the weights by s_k = mean|x_k|^alpha (alpha grid-searched on the
calibration activations), so the salient channels get finer steps, and fold 1/s into the previous op (the
RMSNorm gain, or the rows of the previous Linear), so the float model is unchanged; then round to nearest.
Both walk the blocks in order: a block's calibration inputs are the outputs of the blocks already quantized.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ember.model.quant import Int4Linear, int4_codes, int4_dequantize, int4_params


# ---------------------------------------------------------------------------- GPTQ on one matrix

def _group_params(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int4_params with the scale rounded to the fp16 that Int4Linear stores (codes are rounded against it)."""
    scale, zero = int4_params(w, group_size)
    return scale.half().float(), zero


def gptq_quantize(w: torch.Tensor, H: torch.Tensor, group_size: int = 64, block_size: int = 128,
                  damp: float = 0.01, act_order: bool = False):
    """GPTQ codes of w (N, K) given H (K, K) = X^T X / n of the layer's inputs (any positive factor).

    Returns (codes uint8 (N, K), scale fp32 (N, K/G), zero (N, K/G)) in Int4Linear's layout. damp: fraction
    of mean(diag H) added to the diagonal (the paper's 1%) so H is invertible. act_order: columns in order of
    decreasing diag(H) (most salient first); group parameters are then fixed up front from w ("static groups",
    AutoGPTQ) so a group still means G consecutive input columns.
    """
    W = w.detach().float().clone()
    N, K = W.shape
    H = H.detach().float().clone()
    dead = torch.diag(H) == 0  # inputs that were always zero: their weights do not matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    static = _group_params(W, group_size) if act_order else None
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(K)
    W, H = W[:, perm], H[perm][:, perm]
    Hinv = _inverse_cholesky(H, damp)  # upper Cholesky factor of H^-1: row i = the update of column i

    codes = torch.zeros(N, K, dtype=torch.uint8)
    scale = torch.zeros(N, K // group_size)
    zero = torch.zeros(N, K // group_size)
    block_size = max(block_size, group_size) // group_size * group_size  # a group never straddles two blocks
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            g = int(perm[col]) // group_size  # the group of this column in the original order
            if static is not None:
                s, z = static[0][:, g], static[1][:, g]
            elif col % group_size == 0:  # a new group: its range from the error-updated weights
                s, z = _group_params(W1[:, i:i + group_size], group_size)
                s, z = s[:, 0], z[:, 0]
                scale[:, g], zero[:, g] = s, z
            q = torch.clamp(torch.round(W1[:, i] / s) + z, 0, 15)
            codes[:, col] = q.to(torch.uint8)
            err = (W1[:, i] - (q - z) * s) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]  # compensate in the remaining block columns
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # and, lazily, in the columns after the block
    if static is not None:
        scale, zero = static
    inv = torch.argsort(perm)
    return codes[:, inv], scale, zero


def _inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) I)^-1; more damping if H is too ill-conditioned."""
    mean_diag = float(torch.diag(H).mean())
    for attempt in range(5):
        Hd = H + (damp * 10 ** attempt) * mean_diag * torch.eye(H.shape[0])
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U
    raise RuntimeError("GPTQ: the Hessian stays singular after damping x1e4")  # an internal failure, not input


# ---------------------------------------------------------------------------- AWQ scale search

def awq_scales(X: torch.Tensor, weights: list[torch.Tensor], group_size: int, n_grid: int = 20) -> torch.Tensor:
    """Per-input-channel scales s (K,) for the Linears in `weights` (each (N_i, K)) that read X (n, K).

    s = mean|x|^alpha normalized by sqrt(max * min), alpha in {0, 1/n_grid, ..., (n_grid-1)/n_grid}, picked by the
    squared output error of RTN(W * s) / s against W on X (AWQ sec. 3.2). alpha = 0 (all ones) is plain RTN,
    so the result is never worse than RTN on X.
    """
    X = X.float()
    W = torch.cat([w.detach().float() for w in weights], dim=0)  # (sum N_i, K)
    ref = X @ W.t()
    x_mag = X.abs().mean(dim=0).clamp(min=1e-6)  # (K,)
    best, best_err = torch.ones_like(x_mag), math.inf
    for j in range(n_grid):
        s = x_mag ** (j / n_grid)
        s = s / (s.max() * s.min()).sqrt()
        Ws = W * s
        scale, zero = int4_params(Ws, group_size)
        Wq = int4_dequantize(int4_codes(Ws, scale, zero, group_size), scale, zero, group_size) / s
        err = float((X @ Wq.t() - ref).square().sum())
        if err < best_err:
            best, best_err = s, err
    return best


# ---------------------------------------------------------------------------- through the model

@torch.no_grad()
def _walk_blocks(model, calib: torch.Tensor, per_block, batch: int = 8) -> None:
    """Feed calib (n, T) through the blocks in order; per_block(block, run) quantizes one block, where run()
    pushes the current block inputs through it (so hooks can record). Then the quantized block's outputs
    become the next block's inputs, so later blocks calibrate on what they will really see."""
    T = calib.shape[1]
    cos, sin = model.config.rope(torch.arange(T).unsqueeze(0))
    xs = [model.tok_emb(calib[i:i + batch]).float() for i in range(0, len(calib), batch)]  # (b, T, D) each

    for block in model.layers:
        def run(block=block):
            return [block(x, cos, sin, None, True, None)[0] for x in xs]
        per_block(block, run)
        xs = run()


def _linears(block: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in block.named_modules() if type(m) is nn.Linear and not n.endswith("router")}


def _swap(block: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(block.get_submodule(parent) if parent else block, child, new)


@torch.no_grad()
def gptq_(model, calib: torch.Tensor, group_size: int = 64, damp: float = 0.01, act_order: bool = False,
          batch: int = 8) -> nn.Module:
    """GPTQ every Linear of the blocks (in place) into Int4Linear, on calibration windows calib (n, T)."""
    def per_block(block, run):
        lins = _linears(block)
        H = {n: torch.zeros(m.in_features, m.in_features) for n, m in lins.items()}
        count = dict.fromkeys(lins, 0)

        def hook(name):
            def f(mod, inp, out):
                x = inp[0].detach().float().reshape(-1, inp[0].shape[-1])  # (tokens, K)
                H[name].addmm_(x.t(), x)
                count[name] += x.shape[0]
            return f

        handles = [m.register_forward_hook(hook(n)) for n, m in lins.items()]
        run()
        for h in handles:
            h.remove()
        for n, m in lins.items():
            if count[n] == 0:  # an MoE expert no calibration token reached: round to nearest
                _swap(block, n, Int4Linear.from_float(m, group_size))
                continue
            codes, scale, zero = gptq_quantize(m.weight, H[n] / count[n], group_size, damp=damp, act_order=act_order)
            _swap(block, n, Int4Linear.from_codes(codes, scale, zero, group_size, m.bias))

    _walk_blocks(model, calib, per_block, batch)
    return model


@torch.no_grad()
def awq_(model, calib: torch.Tensor, group_size: int = 64, n_grid: int = 20, max_tokens: int = 4096,
         batch: int = 8, round_weights: bool = True) -> nn.Module:
    """AWQ (in place): per block, search and fold activation-aware scales, then round each Linear to 4 bits.

    Scaled groups, as the paper's Llama recipe: q/k/v after attn_norm, gate/up after mlp_norm (the 1/s goes
    into the norm gain), down after up_proj (into up's rows), o_proj after v_proj when every query head has
    its own value head (with GQA one v row feeds several o columns, so o_proj is rounded as is). MoE experts
    share one norm with different inputs: they are rounded to nearest. max_tokens: calibration tokens kept
    per group for the search (evenly strided), which bounds its cost (n_grid matmuls of max_tokens rows).
    round_weights=False only folds the scales (the Linears stay float, e.g. for GPTQ to round them next).
    """
    def per_block(block, run):
        attn, mlp = block.attn, block.mlp
        groups = [("attn_norm", block.attn_norm, [attn.q_proj, attn.k_proj, attn.v_proj])]
        if attn.n_kv_head == attn.n_head:
            groups.append(("v_proj", attn.v_proj, [attn.o_proj]))
        if hasattr(mlp, "gate_proj"):
            groups += [("mlp_norm", block.mlp_norm, [mlp.gate_proj, mlp.up_proj]), ("up_proj", mlp.up_proj, [mlp.down_proj])]
        X: dict[int, list[torch.Tensor]] = {id(g[2][0]): [] for g in groups}
        handles = [g[2][0].register_forward_hook(lambda mod, inp, out: X[id(mod)].append(
            inp[0].detach().float().reshape(-1, inp[0].shape[-1]))) for g in groups]
        run()
        for h in handles:
            h.remove()
        for _, prev, lins in groups:
            x = torch.cat(X[id(lins[0])])
            x = x[torch.linspace(0, len(x) - 1, min(max_tokens, len(x))).long()]
            s = awq_scales(x, [m.weight for m in lins], group_size, n_grid)
            for m in lins:
                m.weight.mul_(s)  # columns: W' = W diag(s)
            if isinstance(prev, nn.Linear):  # its output channels are our inputs: divide its rows
                prev.weight.div_(s[:, None])
                if prev.bias is not None:
                    prev.bias.div_(s)
            else:  # RMSNorm: y = x / rms * g, so g / s
                prev.weight.div_(s)
        if round_weights:
            for n, m in _linears(block).items():
                _swap(block, n, Int4Linear.from_float(m, group_size))

    _walk_blocks(model, calib, per_block, batch)
    return model
