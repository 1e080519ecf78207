"""Alignment losses against numbers worked out by hand (the arithmetic is in the comments)."""

import math

import pytest
import torch

from ember.align import losses as L


def t(*xs):
    return torch.tensor(xs, dtype=torch.float32)


def close(a, b, tol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol)


def test_bradley_terry():
    # pair 1: margin 1 -> -log sigmoid(1) = 0.3132617; pair 2: margin -1 -> 1.3132617; mean 0.8132617
    assert close(L.bradley_terry_loss(t(2.0, 0.0), t(1.0, 1.0)), 0.8132617)
    # a margin of 1 shifts pair 1 to -log sigmoid(0) = log 2
    assert close(L.bradley_terry_margin_loss(t(2.0), t(1.0), t(1.0)), math.log(2))
    # huge margin: the loss is ~0, not nan (logsigmoid, not log(sigmoid))
    assert close(L.bradley_terry_loss(t(1000.0), t(-1000.0)), 0.0)


def test_dpo_hand_computed():
    # h = (-1 - -1.5) - (-2 - -1.5) = 1; loss = -log sigmoid(0.1 * 1) = log(1 + e^-0.1) = 0.6443967
    loss, rc, rr = L.dpo_loss(t(-1.0), t(-2.0), t(-1.5), t(-1.5), beta=0.1)
    assert close(loss, 0.6443967)
    assert close(rc, t(0.05)) and close(rr, t(-0.05))  # implicit rewards beta * (pi - ref)


def test_dpo_is_log2_when_policy_equals_reference():
    torch.manual_seed(0)
    pc, pr = torch.randn(8) * 20, torch.randn(8) * 20
    loss, rc, rr = L.dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.3)
    assert close(loss, math.log(2)) and close(loss, L.LOG2)
    assert torch.all(rc == 0) and torch.all(rr == 0)


def test_dpo_gradient_raises_chosen_lowers_rejected():
    pc, pr = t(-3.0).requires_grad_(), t(-3.0).requires_grad_()
    loss, _, _ = L.dpo_loss(pc, pr, t(-3.0), t(-3.0), beta=0.5)
    loss.backward()
    # d/dpc of -log sigmoid(beta h) at h=0 is -beta * sigmoid(0) = -0.25; the rejected gets +0.25
    assert close(pc.grad, t(-0.25)) and close(pr.grad, t(0.25))


def test_ipo():
    # h = 1; tau = 0.1 -> (1 - 1/0.2)^2 = 16; tau = 0.5 -> target 1 reached, loss 0
    assert close(L.ipo_loss(t(-1.0), t(-2.0), t(-1.5), t(-1.5), beta=0.1)[0], 16.0)
    assert close(L.ipo_loss(t(-1.0), t(-2.0), t(-1.5), t(-1.5), beta=0.5)[0], 0.0)


def test_masked_helpers():
    x, m = t(1.0, 2.0, 3.0, 100.0), t(1, 1, 1, 0)
    assert close(L.masked_mean(x, m), 2.0)
    assert close(L.masked_whiten(x, m), t(-1.0, 0.0, 1.0, 0.0), tol=1e-4)  # unbiased var of 1,2,3 is 1
    assert close(L.sequence_logps(torch.stack([x, x]), torch.stack([m, t(1, 0, 0, 0)])), t(6.0, 1.0))
    assert close(L.entropy_from_logits(torch.zeros(2, 4)), t(math.log(4), math.log(4)))


def test_kl_penalized_rewards():
    # -0.1 * (logp - ref) = [-0.05, 0.05, 0, 0]; score 2 added at the last response token (index 2)
    r = L.kl_penalized_rewards(t(2.0), t(-1.0, -2.0, -3.0, 0.0)[None], t(-1.5, -1.5, -3.0, 0.0)[None],
                               t(1, 1, 1, 0)[None], kl_coef=0.1)
    assert close(r, t(-0.05, 0.05, 2.0, 0.0)[None])


def test_gae_hand_computed():
    # gamma = lam = 1: A_t = sum of future rewards - V_t: deltas -0.1, -0.1, 0.7 -> A = 0.5, 0.6, 0.7; R = 1, 1, 1
    adv, ret = L.gae(t(0.0, 0.0, 1.0)[None], t(0.5, 0.4, 0.3)[None], t(1, 1, 1)[None], gamma=1.0, lam=1.0)
    assert close(adv, t(0.5, 0.6, 0.7)[None]) and close(ret, t(1.0, 1.0, 1.0)[None])
    # gamma .9, lam .5: delta2 = 0.7, delta1 = .9*.3 - .4 = -0.13, delta0 = .9*.4 - .5 = -0.14
    # A2 = 0.7, A1 = -0.13 + .45*.7 = 0.185, A0 = -0.14 + .45*.185 = -0.05675
    adv, _ = L.gae(t(0.0, 0.0, 1.0)[None], t(0.5, 0.4, 0.3)[None], t(1, 1, 1)[None], gamma=0.9, lam=0.5)
    assert close(adv, t(-0.05675, 0.185, 0.7)[None])


def test_gae_ignores_padding_after_the_response():
    # padded position (reward 99, value 50) must not leak: delta1 = 1 - .6 = .4, delta0 = .9*.6 - .2 = .34
    # A1 = .4, A0 = .34 + .45 * .4 = .52
    adv, ret = L.gae(t(0.0, 1.0, 99.0)[None], t(0.2, 0.6, 50.0)[None], t(1, 1, 0)[None], gamma=0.9, lam=0.5)
    assert close(adv, t(0.52, 0.4, 0.0)[None]) and close(ret, t(0.72, 1.0, 0.0)[None])


def test_ppo_policy_loss():
    # ratios 1.5, 0.5, 1.1 with A = 1, -1, 2 and eps .2:
    # tok1 max(-1.5, -1.2) = -1.2 (clipped); tok2 max(0.5, 0.8) = 0.8 (clipped); tok3 -2.2 (inside)
    logps = torch.log(t(1.5, 0.5, 1.1))[None]
    loss, clip_frac, approx_kl = L.ppo_policy_loss(logps, torch.zeros(1, 3), t(1.0, -1.0, 2.0)[None],
                                                   torch.ones(1, 3), clip_eps=0.2)
    assert close(loss, (-1.2 + 0.8 - 2.2) / 3)
    assert close(clip_frac, 2 / 3)
    assert close(approx_kl, 0.0974573)  # mean of r - 1 - log r


def test_ppo_value_loss():
    # tok1: V 1 (clipped to .7), R 2: max(1, 1.69); tok2: V 0 (-> .3), R 0: max(0, .09); tok3 inside: .3025
    loss, clip_frac = L.ppo_value_loss(t(1.0, 0.0, 0.55)[None], t(0.5, 0.5, 0.5)[None], t(2.0, 0.0, 0.0)[None],
                                       torch.ones(1, 3), clip_eps=0.2)
    assert close(loss, 0.5 * (1.69 + 0.09 + 0.3025) / 3)
    assert close(clip_frac, 2 / 3)


def test_adaptive_kl_coef():
    # KL 12 vs target 6: error clipped to +0.2 -> 0.1 * (1 + 0.2 * 256/10000) = 0.100512
    assert math.isclose(L.adaptive_kl_coef(0.1, 12.0, 6.0, 256, 10000), 0.100512)
    # KL 5.4: error -0.1 -> 0.1 * (1 - 0.1 * 0.0256) = 0.09974400
    assert math.isclose(L.adaptive_kl_coef(0.1, 5.4, 6.0, 256, 10000), 0.099744)


def test_kl_k3():
    assert close(L.kl_k3(t(-1.0), t(-2.0)), math.exp(-1))  # d = -1: e^-1 + 1 - 1
    assert close(L.kl_k3(t(-1.0), t(-1.0)), 0.0)
    assert bool((L.kl_k3(torch.randn(100), torch.randn(100)) >= 0).all())


def test_grpo_advantages():
    # group [1, 0, 0, 1]: mean .5, unbiased std sqrt(1/3) = .57735 -> +-.5 / (.57735 + 1e-4) = +-.8658754
    # group [1, 1, 1, 1]: no signal -> 0
    a = L.grpo_advantages(t(1, 0, 0, 1, 1, 1, 1, 1), group_size=4)
    assert close(a, t(0.8658754, -0.8658754, -0.8658754, 0.8658754, 0, 0, 0, 0))
    assert close(L.dr_grpo_advantages(t(1, 0, 0, 1), group_size=4), t(0.5, -0.5, -0.5, 0.5))


def test_grpo_loss_hand_computed():
    # ratio 1 everywhere, so the surrogate is A. seq1 (A=1): tokens -(1 - 0) = -1 and -(1 - .1 * e^-1) =
    # -.9632121, mean -.9816061; seq2 (A=-1, one token): 1. loss = (-.9816061 + 1) / 2 = .0091970
    logps = torch.full((2, 2), -1.0)
    ref = t(-1.0, -2.0, -1.0, -1.0).view(2, 2)
    mask = t(1, 1, 1, 0).view(2, 2)
    loss, clip_frac, kl = L.grpo_loss(logps, logps.clone(), ref, t(1.0, -1.0), mask, clip_eps=0.2, kl_coef=0.1)
    assert close(loss, 0.0091970)
    assert close(clip_frac, 0.0)
    assert close(kl, math.exp(-1) / 3)  # k3 mean over the 3 counted tokens


def test_dr_grpo_weighs_every_token_alike():
    """A right 2-token reply (A = +.5) and a wrong 10-token one (A = -.5), ratio 1, no KL. GRPO's per-reply mean
    gives each token -A / len / 2: -.125 vs +.025, the long wrong reply 5x weaker. Dr. GRPO (sums / 10): -A / 10 / 2
    = -.025 vs +.025, as Liu et al. 2025 and TRL's dr_grpo."""
    mask = torch.zeros(2, 10)
    mask[0, :2], mask[1] = 1, 1
    adv = t(0.5, -0.5)
    for const_len, right, wrong in ((None, -0.125, 0.025), (10, -0.025, 0.025)):
        logps = torch.zeros(2, 10, requires_grad=True)
        loss, _, _ = L.grpo_loss(logps, logps.detach(), logps.detach(), adv, mask, 0.2, 0.0, const_len=const_len)
        loss.backward()
        assert close(logps.grad[0, 0], right) and close(logps.grad[1, 0], wrong)


def test_grpo_loss_clips_large_ratios():
    # ratio e^1 = 2.718 with A = 1 and eps .2: the surrogate is clipped to 1.2, so the gradient is 0
    logps = t(0.0).view(1, 1).requires_grad_()
    loss, clip_frac, _ = L.grpo_loss(logps, t(-1.0).view(1, 1), logps.detach(), t(1.0), torch.ones(1, 1),
                                     clip_eps=0.2, kl_coef=0.0)
    loss.backward()
    assert close(loss, -1.2) and close(clip_frac, 1.0)
    assert logps.grad.abs().item() == pytest.approx(0.0)
