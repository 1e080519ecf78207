"""`ember grpo`: RL with exact-answer rewards raises held-out accuracy of a tiny arithmetic model."""

import pytest

from ember.align import grpo
from ember.common.errors import UserError


def test_grpo_raises_heldout_arithmetic_accuracy(run_dir, arith):
    m = grpo.main(grpo.Config(run=str(run_dir), steps=60, lr=3e-4, prompts_per_step=8, group_size=8, n_val=100,
                              n_tasks=2000, max_new_tokens=6, eval_every=0, device="cpu", **arith))
    assert 0.05 < m["val_accuracy_before"] < 0.9, m  # room to improve, and some right answers to reinforce
    assert m["val_accuracy"] > m["val_accuracy_before"] + 0.04, m
    assert m["train_reward_last"] > m["train_reward_first"], m


def test_heldout_tasks_are_never_trained_on(arith):
    cfg = grpo.Config(n_val=50, n_tasks=3000, **arith)
    train, val = grpo.split_tasks(cfg)
    assert len(val) == 50 and len({t["prompt"] for t in val}) == 50
    assert not {t["prompt"] for t in train} & {t["prompt"] for t in val}


def test_grpo_lora_smoke(run_dir, arith):
    m = grpo.main(grpo.Config(run=str(run_dir), steps=2, prompts_per_step=2, group_size=4, n_val=8, lora_r=4,
                              max_new_tokens=4, device="cpu", **arith))
    assert 0.0 <= m["val_accuracy"] <= 1.0 and m["lora_r"] == 4
    assert (run_dir / "grpo" / "final" / "adapter.safetensors").is_file()


def test_config_validation():
    with pytest.raises(UserError, match="group_size"):
        grpo.Config(group_size=1)
    with pytest.raises(UserError, match="advantage"):
        grpo.Config(advantage="ppo")
