"""`ember ppo`: RLHF raises the reward model's mean score on held-out prompts while KL stays under target."""

import shutil

import pytest

from ember.align import ppo
from ember.common.errors import UserError


def test_ppo_raises_heldout_reward_within_kl_target(reward_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reward_run[0], run)
    m = ppo.main(ppo.Config(run=str(run), steps=20, rollouts_per_step=16, minibatch_size=8, lr=1e-4, value_lr=1e-4,
                            kl_target=3.0, max_new_tokens=16, n_val=32, eval_every=0, device="cpu"))
    assert m["val_reward"] > m["val_reward_before"] + 0.5, m
    assert m["val_kl"] < m["kl_target"], m
    rows = [r for r in (run / "ppo" / "metrics.jsonl").read_text().splitlines() if '"entropy"' in r]
    assert len(rows) == 20 and '"clip_frac"' in rows[0] and '"kl_coef"' in rows[0]


def test_ppo_needs_a_reward_model(base_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(base_run[0], run)
    with pytest.raises(UserError, match="reward_model"):
        ppo.main(ppo.Config(run=str(run), steps=1, rollouts_per_step=2, minibatch_size=2, device="cpu"))


def test_config_validation():
    with pytest.raises(UserError, match="minibatch_size"):
        ppo.Config(rollouts_per_step=4, minibatch_size=8)
