"""Pruning: zero the weights that matter least (unstructured, 2:4), or cut whole heads, FFN channels and layers.

    model, info = prune_magnitude(model, 0.5)                       # |W| smallest half of every block matrix
    model, info = prune_wanda(model, calib, 0.5)                    # |W| * ||X_j||, per output row (Sun et al. 2023)
    model, info = prune_2_4(model, calib, score="wanda")            # 2 of every 4 consecutive inputs kept
    model, info = prune_structured(model, calib, heads=0.25, ffn=0.25, layers=1)   # smaller matrices, new config

calib: (N, T) int64 token windows. The linear layers inside the blocks are pruned (q/k/v/o, gate/up/down, MoE
experts; not the router, embedding or head, as Wanda and SparseGPT). Unstructured pruning leaves zeros in the
dense matrices (no masks at rest: the zeros are the mask, `recover` keeps them); structured pruning returns a
new, smaller GPT whose config describes it, so it saves and loads as any ember model.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from ember.common.errors import UserError
from ember.model.gpt import build_model

CALIB_BATCH = 8  # calibration windows per forward: bounds activation memory, not results


# ---------------------------------------------------------------------------- helpers

def prunable(model) -> list[tuple[str, nn.Linear]]:
    """(name, Linear) of every matrix inside the blocks, router excluded (it picks experts, it is tiny)."""
    return [(f"layers.{name}", m) for name, m in model.layers.named_modules()
            if isinstance(m, nn.Linear) and not name.endswith("router")]


def _check_sparsity(sparsity: float) -> None:
    if not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise UserError(f"sparsity = {sparsity!r} is not allowed: a fraction in [0, 1) of each matrix's weights "
                        f"to zero, e.g. 0.5")


def _check_calib(model, calib) -> torch.Tensor:
    if not torch.is_tensor(calib) or calib.dim() != 2 or calib.dtype not in (torch.int64, torch.int32) \
            or calib.numel() == 0:
        got = f"{tuple(calib.shape)} {calib.dtype}" if torch.is_tensor(calib) else type(calib).__name__
        raise UserError(f"calibration data is {got}: pass a LongTensor (N, T) of token windows (N >= 1, T >= 1), "
                        f"e.g. 128 windows of 512 tokens of the training text")
    V = model.config.vocab_size
    if int(calib.min()) < 0 or int(calib.max()) >= V:
        raise UserError(f"calibration token ids span [{int(calib.min())}, {int(calib.max())}], outside the model's "
                        f"vocabulary [0, {V}); tokenize the calibration text with the model's own tokenizer")
    if calib.size(1) > model.config.max_seq_len:
        raise UserError(f"calibration windows of {calib.size(1)} tokens are longer than the model's max_seq_len = "
                        f"{model.config.max_seq_len}; cut them shorter")
    return calib.long().to(model.tok_emb.weight.device)


@torch.no_grad()
def _blockwise(model, calib, visit) -> None:
    """Run the calibration windows through the blocks one block at a time.

    visit(i, block, run) is called before block i's outputs are computed; run() feeds every window's input
    (B, T, n_embd) through the block once (where visit's hooks collect statistics). The inputs of block i + 1
    are computed after visit returns, so they see block i as visit left it: pruning is sequential, each block
    calibrated on the activations of the already-pruned blocks before it (Wanda's and SparseGPT's order).
    Memory: the hidden states of all N windows, N * T * n_embd floats.
    """
    T = calib.size(1)
    cos, sin = model.config.rope(torch.arange(T, device=calib.device).unsqueeze(0))
    xs = [model.tok_emb(c) for c in calib.split(CALIB_BATCH)]  # [(B, T, n_embd)]
    for i, block in enumerate(model.layers):
        visit(i, block, lambda: [block(x, cos, sin, None, True, None) for x in xs])
        xs = [block(x, cos, sin, None, True, None)[0] for x in xs]


def _input_sq_norms(block, run) -> dict[nn.Linear, torch.Tensor]:
    """Squared L2 norm over all calibration tokens of each input feature of each Linear in the block:
    {linear: (in_features,) fp32} = ||X_j||^2, X the (tokens, in) matrix the layer saw."""
    sums, hooks = {}, []

    def hook(mod, args, out):
        x = args[0].detach().float().reshape(-1, args[0].size(-1))  # (tokens, in)
        sums[mod] = sums.get(mod, 0) + x.square().sum(dim=0)

    for name, m in block.named_modules():
        if isinstance(m, nn.Linear) and not name.endswith("router"):
            hooks.append(m.register_forward_hook(hook))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    for name, m in block.named_modules():  # an expert no token was routed to saw nothing: zero norms
        if isinstance(m, nn.Linear) and not name.endswith("router") and m not in sums:
            sums[m] = torch.zeros(m.in_features, device=m.weight.device)
    return sums


def _zero_lowest(weight: torch.Tensor, score: torch.Tensor, k: int, dim_rows: bool) -> None:
    """Zero the k lowest-scoring weights: per output row (dim_rows) or of the whole matrix. argsort, not a
    threshold, so exactly k go even among ties."""
    if k == 0:
        return
    if dim_rows:
        idx = score.argsort(dim=1)[:, :k]  # (out, k)
        weight.scatter_(1, idx, 0.0)
    else:
        weight.view(-1)[score.flatten().argsort()[:k]] = 0.0


def _info(method: str, model, extra: dict | None = None) -> dict:
    layers = prunable(model)
    total = sum(m.weight.numel() for _, m in layers)
    zeros = sum(int((m.weight == 0).sum()) for _, m in layers)
    return {"method": method, "matrices": len(layers), "weights": total, "zeros": zeros,
            "sparsity": zeros / max(total, 1), **(extra or {})}


# ---------------------------------------------------------------------------- unstructured

@torch.no_grad()
def prune_magnitude(model, sparsity: float) -> tuple[nn.Module, dict]:
    """Zero the round(sparsity * numel) smallest |W| of every block matrix (layer-wise magnitude pruning, the
    baseline of Han et al. 2015 and of the Wanda paper). In place; returns (model, info)."""
    _check_sparsity(sparsity)
    for _, m in prunable(model):
        w = m.weight
        _zero_lowest(w, w.abs(), round(sparsity * w.numel()), dim_rows=False)
    return model, _info("magnitude", model)


@torch.no_grad()
def prune_wanda(model, calib: torch.Tensor, sparsity: float) -> tuple[nn.Module, dict]:
    """Wanda (Sun et al. 2023, arXiv:2306.11695): score S_ij = |W_ij| * ||X_j||_2 with X the layer's calibration
    inputs; zero the round(sparsity * in_features) lowest scores of each output row. A weight on an input
    channel with large activations (LLM outlier features) is kept even when it is small, which magnitude pruning
    gets wrong. Block by block: each block's input norms come from the already-pruned blocks before it, as the
    paper's code does. In place; returns (model, info)."""
    _check_sparsity(sparsity)
    calib = _check_calib(model, calib)

    def visit(i, block, run):
        for m, sq in _input_sq_norms(block, run).items():
            w = m.weight
            _zero_lowest(w, w.abs().float() * sq.sqrt()[None, :], round(sparsity * w.size(1)), dim_rows=True)

    _blockwise(model, calib, visit)
    return model, _info("wanda", model, {"calib_tokens": calib.numel()})


@torch.no_grad()
def prune_2_4(model, calib: torch.Tensor | None = None, score: str = "wanda") -> tuple[nn.Module, dict]:
    """2:4 semi-structured sparsity (NVIDIA Ampere+ sparse tensor cores): in every group of 4 consecutive input
    weights of a row, the 2 lowest-scoring are zeroed (50% exactly). score "wanda" (|W| * ||X_j||, needs calib)
    or "magnitude" (|W|). Every matrix's in_features must be a multiple of 4; checked before anything changes."""
    if score not in ("wanda", "magnitude"):
        raise UserError(f"2:4 score = {score!r} is not allowed: 'wanda' (needs calibration data) or 'magnitude'")
    for name, m in prunable(model):
        if m.in_features % 4:
            raise UserError(f"2:4 pruning needs in_features divisible by 4, but {name} has {m.in_features}; use "
                            f"unstructured pruning (magnitude or wanda) for this model")
    if score == "wanda":
        if calib is None:
            raise UserError("2:4 with score='wanda' needs calibration windows (calib); pass them, or score='magnitude'")
        calib = _check_calib(model, calib)

    def apply(m: nn.Linear, s: torch.Tensor) -> None:
        out, inp = m.weight.shape
        groups = s.reshape(out, inp // 4, 4)  # (out, in/4, 4)
        drop = groups.argsort(dim=-1)[..., :2]  # the 2 lowest of each group
        mask = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False)
        m.weight.mul_(mask.reshape(out, inp).to(m.weight.dtype))

    if score == "magnitude":
        for _, m in prunable(model):
            apply(m, m.weight.abs())
    else:
        def visit(i, block, run):
            for m, sq in _input_sq_norms(block, run).items():
                apply(m, m.weight.abs().float() * sq.sqrt()[None, :])

        _blockwise(model, calib, visit)
    return model, _info("2:4", model, {"score": score})


# ---------------------------------------------------------------------------- structured

def _check_fraction(name: str, frac: float) -> None:
    if not isinstance(frac, (int, float)) or not 0 <= frac < 1:
        raise UserError(f"structured pruning {name} = {frac!r} is not allowed: a fraction in [0, 1) of the "
                        f"{'attention heads' if name == 'heads' else 'FFN channels'} of every layer to remove")


@torch.no_grad()
def layer_scores(model, calib: torch.Tensor) -> list[float]:
    """Block influence per layer (ShortGPT, Men et al. 2024, arXiv:2403.03853; Gromov et al. 2024,
    arXiv:2403.17887): 1 - mean over calibration tokens of cos(block input, block output). A block that barely
    turns the residual stream changes the model least when removed. One pass on the unpruned model."""
    calib = _check_calib(model, calib)
    T = calib.size(1)
    cos, sin = model.config.rope(torch.arange(T, device=calib.device).unsqueeze(0))
    xs = [model.tok_emb(c) for c in calib.split(CALIB_BATCH)]  # [(B, T, n_embd)]
    scores = []
    for block in model.layers:
        ys = [block(x, cos, sin, None, True, None)[0] for x in xs]
        cos_sum = sum(F.cosine_similarity(x.float(), y.float(), dim=-1).sum().item() for x, y in zip(xs, ys))
        scores.append(1 - cos_sum / (calib.size(0) * T))
        xs = ys
    return scores


def _head_and_channel_importance(model, calib):
    """Per layer: importance of each query head (n_head,) and of each FFN channel (ffn_dim,), from one pass.

    Head h: mean over tokens of ||W_o[:, h] y_h||, the norm of what the head adds to the residual stream (its
    attention output y_h through its o_proj columns). Channel c: mean |h_c| * ||W_down[:, c]||, with
    h = silu(gate x) * up x the SwiGLU activation: the size of the channel's contribution (activation-weighted,
    as LLM-Pruner's first-order and FLAP's fluctuation criteria reduce to for one channel)."""
    head_imp, chan_imp = [], []
    hd = model.config.head_dim

    def visit(i, block, run):
        acc = {"heads": 0, "chan": 0, "n": 0}
        o, down = block.attn.o_proj, getattr(block.mlp, "down_proj", None)

        def o_hook(mod, args, out):
            y = args[0].detach().float()  # (B, T, n_head * hd)
            B, T, _ = y.shape
            w = mod.weight.float().view(mod.out_features, -1, hd)  # (n_embd, n_head, hd)
            contrib = torch.einsum("bthd,ehd->bthe", y.view(B, T, -1, hd), w)  # (B, T, n_head, n_embd)
            acc["heads"] = acc["heads"] + contrib.norm(dim=-1).sum(dim=(0, 1))
            acc["n"] += B * T

        def down_hook(mod, args, out):
            h = args[0].detach().float()  # (B, T, ffn_dim)
            acc["chan"] = acc["chan"] + h.abs().sum(dim=(0, 1)) * mod.weight.float().norm(dim=0)

        hooks = [o.register_forward_hook(o_hook)]
        if down is not None:
            hooks.append(down.register_forward_hook(down_hook))
        try:
            run()
        finally:
            for h in hooks:
                h.remove()
        head_imp.append(acc["heads"] / acc["n"])
        chan_imp.append(acc["chan"] / acc["n"] if down is not None else None)

    _blockwise(model, calib, visit)
    return head_imp, chan_imp


def _plan_heads(c, frac: float) -> tuple[str, int]:
    """("groups", g) = remove g whole KV groups (a KV head and its query heads: k/v shrink too, and the KV cache),
    or ("queries", q) = remove q query heads inside every group (KV heads kept). Whole groups when the fraction
    removes at least one and leaves one; MHA is the case of one query head per group."""
    per = c.n_head // c.n_kv_head
    g = round(frac * c.n_kv_head)
    if 1 <= g < c.n_kv_head:
        return "groups", g
    q = round(frac * per)
    if 1 <= q < per:
        return "queries", q
    if frac == 0:
        return "groups", 0
    raise UserError(f"structured pruning heads = {frac} removes no whole head group of this model ({c.n_head} "
                    f"query heads in {c.n_kv_head} KV groups of {per}) or would remove all of them; use a fraction "
                    f"near a multiple of 1/{c.n_kv_head} (whole groups) or 1/{per} (heads in each group)")


@torch.no_grad()
def prune_structured(model, calib: torch.Tensor, heads: float = 0.0, ffn: float = 0.0,
                     layers: int = 0) -> tuple[nn.Module, dict]:
    """Remove whole layers, attention heads and FFN channels: the matrices really shrink, and the returned model
    (a new GPT; the input one is left as it was) has a plain config describing it.

    layers: drop the `layers` blocks of lowest block influence (layer_scores), scored once on the input model.
    heads: fraction of attention heads per layer (whole KV groups, or query heads inside every group; see
    _plan_heads); n_head/n_kv_head shrink and head_size is set so head_dim stays. ffn: fraction of SwiGLU channels
    per layer (gate/up rows, down columns), the same count in every layer so config.ffn_hidden describes them.
    Heads and channels are scored on the calibration data after the layers are dropped. Returns (model, info).
    """
    _check_fraction("heads", heads)
    _check_fraction("ffn", ffn)
    c = model.config
    if not isinstance(layers, int) or not 0 <= layers < c.n_layer:
        raise UserError(f"structured pruning layers = {layers!r} is not allowed: an int in [0, {c.n_layer - 1}] "
                        f"(this model has {c.n_layer} layers and must keep one)")
    if ffn and c.n_expert:
        raise UserError(f"structured pruning ffn = {ffn}: this model's FFNs are {c.n_expert} MoE experts; FFN "
                        f"channel pruning is for dense models (prune heads or layers, or use unstructured pruning)")
    calib = _check_calib(model, calib)
    before = model.num_params()
    sd = dict(model.state_dict())
    info = {"method": "structured", "params_before": before}

    # ---- layers: drop the least influential blocks, renumber the rest
    keep_layers = list(range(c.n_layer))
    if layers:
        scores = layer_scores(model, calib)
        dropped = sorted(sorted(range(c.n_layer), key=lambda i: scores[i])[:layers])
        keep_layers = [i for i in keep_layers if i not in dropped]
        info.update(removed_layers=dropped, layer_scores=[round(s, 6) for s in scores])
        new = {}
        for k, v in sd.items():
            if k.startswith("layers."):
                i = int(k.split(".")[1])
                if i in keep_layers:
                    new[f"layers.{keep_layers.index(i)}." + k.split(".", 2)[2]] = v
            else:
                new[k] = v
        sd = new
    cfg = dataclasses.replace(c, n_layer=len(keep_layers))
    model = _rebuild(cfg, sd, model)

    # ---- heads and FFN channels, scored on the model without the dropped layers
    if heads or ffn:
        head_imp, chan_imp = _head_and_channel_importance(model, calib)
        sd = dict(model.state_dict())
        hd, per = c.head_dim, c.n_head // c.n_kv_head
        if heads:
            mode, n = _plan_heads(c, heads)
            for i in range(cfg.n_layer):
                imp = head_imp[i].view(c.n_kv_head, per)  # query head h is in group h // per (SDPA's enable_gqa)
                if mode == "groups":
                    kv_keep = imp.sum(dim=1).argsort(descending=True)[:c.n_kv_head - n].sort().values
                    q_keep = (kv_keep[:, None] * per + torch.arange(per, device=kv_keep.device)).flatten()
                else:
                    kv_keep = torch.arange(c.n_kv_head, device=imp.device)
                    in_group = imp.argsort(dim=1, descending=True)[:, :per - n].sort(dim=1).values
                    q_keep = (kv_keep[:, None] * per + in_group).flatten()
                _slice_heads(sd, f"layers.{i}.attn.", q_keep, kv_keep, hd)
            n_kv = c.n_kv_head - n if mode == "groups" else c.n_kv_head
            n_q = n_kv * (per if mode == "groups" else per - n)
            cfg = dataclasses.replace(cfg, n_head=n_q, n_kv_head=n_kv, head_size=hd)
            info.update(head_mode=mode, n_head=n_q, n_kv_head=n_kv)
        if ffn:
            width = c.ffn_dim - round(ffn * c.ffn_dim)
            if width < 1:
                raise UserError(f"structured pruning ffn = {ffn} leaves no FFN channel of {c.ffn_dim}; use less")
            for i in range(cfg.n_layer):
                keep = chan_imp[i].argsort(descending=True)[:width].sort().values
                p = f"layers.{i}.mlp."
                sd[p + "gate_proj.weight"] = sd[p + "gate_proj.weight"][keep]
                sd[p + "up_proj.weight"] = sd[p + "up_proj.weight"][keep]
                sd[p + "down_proj.weight"] = sd[p + "down_proj.weight"][:, keep]
            cfg = dataclasses.replace(cfg, ffn_hidden=width)
            info["ffn_hidden"] = width
        model = _rebuild(cfg, sd, model)
    info.update(n_layer=cfg.n_layer, n_head=cfg.n_head, n_kv_head=cfg.n_kv_head, ffn_hidden=cfg.ffn_dim,
                params_after=model.num_params())
    info["removed_fraction"] = 1 - info["params_after"] / before
    return model, info


def _slice_heads(sd: dict, p: str, q_keep: torch.Tensor, kv_keep: torch.Tensor, hd: int) -> None:
    """Keep the rows of q (query heads q_keep) and k/v (KV heads kv_keep) and the matching o_proj columns."""
    rows = lambda heads: (heads[:, None] * hd + torch.arange(hd, device=heads.device)).flatten()  # noqa: E731
    qr, kvr = rows(q_keep).cpu(), rows(kv_keep).cpu()
    for name, r in (("q_proj", qr), ("k_proj", kvr), ("v_proj", kvr)):
        for kind in ("weight", "bias"):
            if p + f"{name}.{kind}" in sd:
                sd[p + f"{name}.{kind}"] = sd[p + f"{name}.{kind}"][r.to(sd[p + f"{name}.{kind}"].device)]
    w = sd[p + "o_proj.weight"]
    sd[p + "o_proj.weight"] = w[:, qr.to(w.device)]


def _rebuild(cfg, sd: dict, old) -> nn.Module:
    """A GPT of config cfg holding the tensors of sd (copied contiguous: slices must not pin the old storage)."""
    model = build_model(cfg, "meta", init=False)
    model.load_state_dict({k: v.contiguous().clone() for k, v in sd.items()}, assign=True)
    return model.train(old.training)

