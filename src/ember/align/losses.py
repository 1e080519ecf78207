"""Alignment objectives as pure tensor functions: reward model, DPO, IPO, PPO (+ GAE, KL control), GRPO.

No model, no config object, no `loss_type` switch: each function takes tensors and returns tensors, and a
new variant is a new function. Shapes: B = sequences, T = response tokens; `mask` (B, T) is 1.0 on tokens
that count (response tokens, not prompt or padding). Log-probs are per token, fp32.
Each function is unit-tested against hand-computed numbers in tests/align/test_losses.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------- masked statistics


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over positions where mask is 1 (over all of them, or along `dim`)."""
    return masked_sum(x, mask, dim) / (mask.sum() if dim is None else mask.sum(dim)).clamp(min=1e-8)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked positions (unbiased variance, as TRL/OpenRLHF); 0 outside the mask."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_sum((x - mean) ** 2, mask) / (n - 1).clamp(min=1.0)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Log-probability of each whole response: sum of its token log-probs. (B, T) -> (B,)."""
    return masked_sum(token_logps, mask, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the next-token distribution at each position: (..., V) -> (...)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


# ---------------------------------------------------------------------------- reward model


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Reward-model loss: -log sigmoid(r_chosen - r_rejected), mean over pairs (B,) -> scalar.

    The Bradley-Terry model says P(chosen > rejected) = sigmoid(r_c - r_r); this is its negative
    log-likelihood (Ouyang et al. 2022, eq. 1). logsigmoid is exact for large margins where log(sigmoid) is 0.
    """
    return -F.logsigmoid(chosen_rewards - rejected_rewards).mean()


def bradley_terry_margin_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                              margin: torch.Tensor) -> torch.Tensor:
    """Llama-2's reward loss: -log sigmoid(r_c - r_r - m(r)) with a per-pair margin m from the rating gap
    (Touvron et al. 2023, eq. 2): pairs labelled "clearly better" must be separated by more."""
    return -F.logsigmoid(chosen_rewards - rejected_rewards - margin).mean()


# ---------------------------------------------------------------------------- direct preference optimization


def dpo_logits(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
               ref_chosen: torch.Tensor, ref_rejected: torch.Tensor) -> torch.Tensor:
    """h = (log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r)) per pair (B,): the implicit reward
    gap before scaling by beta. All four are whole-response log-probs (B,)."""
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float):
    """DPO (Rafailov et al. 2023, eq. 7): -log sigmoid(beta * h), mean over pairs.

    Returns (loss, chosen_rewards, rejected_rewards); the implicit rewards beta * (log pi - log ref) are
    detached (B,) for logging: their mean difference is the "margin", the share with chosen > rejected the
    "accuracy". For a policy equal to its reference h = 0 and the loss is log 2.
    """
    h = dpo_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    loss = -F.logsigmoid(beta * h).mean()
    return loss, beta * (policy_chosen - ref_chosen).detach(), beta * (policy_rejected - ref_rejected).detach()


def ipo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float):
    """IPO (Azar et al. 2023, eq. 17): (h - 1/(2 beta))^2, mean over pairs; beta plays the paper's tau.

    A squared loss regresses the log-ratio gap to a finite target instead of pushing it to infinity, so it
    does not overfit deterministic preferences. The paper (and TRL) use length-averaged log-probs here:
    pass per-token means instead of sums if you follow that. Returns (loss, chosen_rewards, rejected_rewards).
    """
    h = dpo_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    loss = ((h - 1.0 / (2.0 * beta)) ** 2).mean()
    return loss, beta * (policy_chosen - ref_chosen).detach(), beta * (policy_rejected - ref_rejected).detach()


# ---------------------------------------------------------------------------- PPO (RLHF)


def kl_penalized_rewards(scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor,
                         mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards for RLHF: -kl_coef * (log pi - log ref) at every response token, plus the
    sequence's scalar score (reward model output) at its last response token (Ziegler et al. 2019).

    scores (B,), logps/ref_logps/mask (B, T) -> rewards (B, T), 0 outside the mask.
    """
    rewards = -kl_coef * (logps - ref_logps) * mask
    last = (mask * torch.arange(mask.size(1), device=mask.device)).argmax(dim=1)  # (B,) last masked index
    return rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalized advantage estimation (Schulman et al. 2016) over each response. (B, T) in, (B, T) out.

    delta_t = r_t + gamma * V_{t+1} - V_t ;  A_t = delta_t + gamma * lam * A_{t+1}, with V and A taken as 0
    after the last response token. Returns (advantages, returns = advantages + values), both 0 outside the
    mask and detached. Masked positions must be a contiguous run per row (the response).
    """
    rewards, values, mask = rewards.detach(), values.detach() * mask, mask.to(rewards.dtype)
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_adv = torch.zeros_like(next_value)
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = (delta + gamma * lam * next_adv) * mask[:, t]
        adv[:, t] = a
        # positions after the response (mask 0) leave the carried values at 0 for its last token
        next_value = torch.where(mask[:, t] > 0, values[:, t], next_value)
        next_adv = torch.where(mask[:, t] > 0, a, next_adv)
    return adv, (adv + values) * mask


def ppo_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip_eps: float):
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), mean over masked tokens.

    ratio = pi / pi_old per token; loss = -min(ratio * A, clip(ratio, 1-eps, 1+eps) * A). Returns
    (loss, clip_frac = share of tokens where the clipped term was chosen, approx_kl = mean of k3(old||new)).
    """
    log_ratio = logps - old_logps
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_frac = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(ratio - 1.0 - log_ratio, mask)  # k3 estimate of KL(pi_old || pi), >= 0
    return loss, clip_frac, approx_kl


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                   mask: torch.Tensor, clip_eps: float):
    """Clipped value loss: 0.5 * max((V - R)^2, (V_clip - R)^2), V_clip = old_V + clip(V - old_V, +-eps),
    mean over masked tokens (as OpenAI baselines / TRL). Returns (loss, clip_frac)."""
    v_clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    err, err_clipped = (values - returns) ** 2, (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        clip_frac = masked_mean((err_clipped > err).float(), mask)
    return loss, clip_frac


def adaptive_kl_coef(kl_coef: float, kl: float, target: float, n_steps: int, horizon: int) -> float:
    """Adaptive KL controller (Ziegler et al. 2019, sec. 2.2): beta <- beta * (1 + K * e * n/H), with the
    proportional error e = clip(KL / target - 1, -0.2, 0.2) and K = 1 (their K_beta = 0.1 is folded into
    H). KL above target raises the penalty, below lowers it; n = samples seen since the last update."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * n_steps / horizon)


# ---------------------------------------------------------------------------- GRPO (RL with verifiable rewards)


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || ref) from samples of pi (Schulman 2020, "Approximating KL"):
    exp(ref - logp) - (ref - logp) - 1. Unbiased, always >= 0, low variance; the estimator GRPO uses."""
    d = ref_logps - logps
    return d.exp() - d - 1.0


def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's outcome advantage (Shao et al. 2024, sec. 4.1.2): each completion's reward normalized within
    its group of `group_size` completions of the same prompt: (r - mean_g) / (std_g + eps).

    rewards (N,) with N = n_prompts * group_size, groups contiguous -> (N,). std is the unbiased sample std
    (as TRL). A group whose completions all score the same gets advantage 0: it carries no signal.
    """
    g = rewards.view(-1, group_size).float()
    return ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + eps)).view(-1)


def dr_grpo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Dr. GRPO's advantage (Liu et al. 2025): r - mean_g, without dividing by the group std, which
    over-weights groups that are nearly all right or all wrong. (N,) -> (N,)."""
    g = rewards.view(-1, group_size).float()
    return (g - g.mean(1, keepdim=True)).view(-1)


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, clip_eps: float, kl_coef: float, const_len: int | None = None):
    """GRPO objective (Shao et al. 2024, eq. 3), negated to a loss.

    Per token: -[min(ratio * A, clip(ratio, 1-eps, 1+eps) * A) - kl_coef * k3(pi || ref)], with A (N,)
    the sequence's group advantage broadcast over its tokens; averaged over each sequence's tokens
    (the paper's 1/|o_i|), then over sequences. const_len (Dr. GRPO, Liu et al. 2025): every sequence's
    token sum is divided by this same length instead of its own, so a long reply's tokens weigh as much
    as a short one's (1/|o_i| favours long wrong replies). logps/old_logps/ref_logps/mask (N, T).
    Returns (loss, clip_frac, kl = mean k3 to the reference).
    """
    ratio = (logps - old_logps).exp()
    adv = advantages[:, None]
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv)
    kl = kl_k3(logps, ref_logps)
    per_token = -(surrogate - kl_coef * kl)
    if const_len is None:
        per_seq = masked_mean(per_token, mask, dim=1)
    else:
        per_seq = masked_sum(per_token, mask, dim=1) / const_len
    loss = per_seq.mean()
    with torch.no_grad():
        clip_frac = masked_mean(((ratio * adv) > (ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv)).float(), mask)
        kl_mean = masked_mean(kl, mask)
    return loss, clip_frac, kl_mean


LOG2 = math.log(2.0)  # DPO's loss at h = 0: the reference point a freshly initialized DPO run starts from
