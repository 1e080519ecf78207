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


def test_value_model_starts_on_the_normalized_reward_scale():
    import torch

    from ember.align.reward import attach_scalar_head
    from ember.model.gpt import GPTConfig, build_model

    torch.manual_seed(0)
    rm = attach_scalar_head(build_model(GPTConfig(vocab_size=64, n_layer=1, n_head=2, n_kv_head=1, n_embd=16)))
    idx = torch.randint(0, 64, (3, 7))
    with torch.no_grad():
        raw = rm(idx)
        ppo.rescale_head(rm, mean=0.4, std=2.5)
        assert torch.allclose(rm(idx), (raw - 0.4) / 2.5, atol=1e-6)


@pytest.mark.parametrize("rel", ["hh-rlhf/harmless-base_test.jsonl.gz", "oasst/oasst_en_100_tree.jsonl",
                                 "gsm8k/test.jsonl"])
def test_prompts_from_real_preference_and_task_files(shared_file, rel):
    """The files reward/dpo (hh-rlhf, OpenAssistant trees) and grpo (GSM8K) read give PPO their prompts too."""
    train, val = ppo.load_prompts(ppo.Config(data=str(shared_file(rel)), n_prompts=50, n_val=5))
    assert len(train) == 50 and len(val) == 5
    from ember.align.data import conversation_key

    assert not {conversation_key(p) for p in train} & {conversation_key(p) for p in val}  # no thread on both sides
    for p in train + val:  # chat turns or plain text, never an OpenAssistant node dict
        assert isinstance(p, str) or all(isinstance(m["content"], str) for m in p)
