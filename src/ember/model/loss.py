"""The output head fused into the cross-entropy loss, and per-token log-probs: what GPT.forward's loss uses.

Split from gpt.py (the one model file) because it is a kernel-level concern of the loss, not of the
architecture: the (N, V) logits are never materialized whole in training (Liger / Cut Cross-Entropy style).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position: logits (B, T, V), targets (B, T) -> (B, T) fp32; 0 where target == -100."""
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none")
    return -nll.view_as(targets)


# ---------------------------------------------------------------------------- the output head fused into the loss

LOSS_CHUNK_BYTES = 256 * 2**20  # one chunk of rows' fp32 logits: bounds the loss's memory on a GPU


def _head_nll(x, weight, targets, dtype, grad_x=None, grad_w=None) -> torch.Tensor:
    """-log p(target) per row of the logits x @ weight.T, (N,) fp32 (0 where target == -100), computed chunk
    by chunk of rows so the (N, V) logits never exist whole. Given the buffers grad_x (N, D) and grad_w (V, D)
    fp32, it also writes into them the gradients of the summed loss (softmax - one_hot, times weight for x and
    times x for weight). x (N, D), weight (V, D), targets (N,); dtype: the matmuls' (bf16 under autocast)."""
    N, V = x.size(0), weight.size(0)
    rows = max(1, min(N, LOSS_CHUNK_BYTES // (4 * V)))
    w = weight.to(dtype)
    logits = torch.empty(rows, V, dtype=dtype, device=x.device)  # both reused by every chunk
    logp = torch.empty(rows, V, dtype=torch.float32, device=x.device)
    nll = torch.empty(N, dtype=torch.float32, device=x.device)
    with torch.autocast(x.device.type, enabled=False):  # dtypes are explicit here
        for s in range(0, N, rows):
            e = min(s + rows, N)
            xc, keep = x[s:e].to(dtype), targets[s:e] != -100
            t = targets[s:e].clamp(min=0).unsqueeze(1)  # (n, 1); ignored rows point at 0 and are masked
            lg, lp = logits[:e - s], logp[:e - s]
            torch.log_softmax(torch.mm(xc, w.t(), out=lg), dim=-1, dtype=torch.float32, out=lp)
            nll[s:e] = -lp.gather(1, t).squeeze(1) * keep
            if grad_x is None and grad_w is None:
                continue
            g = lp.exp_()  # softmax (n, V): d loss_row / d logits = softmax - one_hot(target)
            g.scatter_add_(1, t, -keep.unsqueeze(1).float())
            g.mul_(keep.unsqueeze(1))  # ignored rows contribute nothing
            g = lg.copy_(g) if dtype != torch.float32 else g
            if grad_x is not None:
                torch.mm(g, w, out=grad_x[s:e])
            if grad_w is not None:  # the first chunk writes grad_w, later ones add to it (fp32 sums of dtype matmuls)
                if dtype == torch.float32:
                    torch.mm(g.t(), xc, out=grad_w) if s == 0 else grad_w.addmm_(g.t(), xc)
                else:
                    grad_w.copy_(g.t() @ xc) if s == 0 else grad_w.add_(g.t() @ xc)
    return nll


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of x @ weight.T against targets, the (N, V) logits never whole (Liger, Cut CE).

    Each chunk's logits become its loss and at once its gradients (_head_nll), so forward also does
    backward's work and backward only scales by the incoming gradient. What it saves: the N x V logits,
    log-probs and their gradient, which eager autograd keeps or allocates every step (3 x 64 MiB at N = 2048,
    V = 8192, fp32), and on CPU the page faults of touching that much fresh memory (30% of the head + loss
    time of the small benchmark model under glibc's default allocator).
    """

    @staticmethod
    def forward(ctx, x, weight, targets, dtype):
        (N, D), V = x.shape, weight.size(0)
        need_x, need_w = ctx.needs_input_grad[:2]
        ctx.dtypes = x.dtype, weight.dtype
        grad_x = torch.empty(N, D, dtype=dtype, device=x.device) if need_x else None
        grad_w = torch.empty(V, D, dtype=torch.float32, device=x.device) if need_w else None
        total = _head_nll(x, weight, targets, dtype, grad_x, grad_w).sum()
        ctx.save_for_backward(grad_x, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad):
        grad_x, grad_w = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        return (None if grad_x is None else (grad_x * grad).to(x_dtype),
                None if grad_w is None else (grad_w * grad).to(w_dtype), None, None)
