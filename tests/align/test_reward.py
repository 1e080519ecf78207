"""`ember reward`: the scalar head, its file format, and held-out pairwise accuracy above chance."""

import pytest
import torch

from ember.align import reward
from ember.align.rollout import collate
from ember.common.checkpoint import load_model
from ember.common.errors import UserError


def test_reward_model_beats_chance_on_heldout_pairs(reward_run):
    _, m = reward_run
    assert m["val_pairs"] >= 30
    assert m["val_accuracy"] > 0.6, m  # chance is 0.5
    assert m["val_accuracy"] > m["val_accuracy_before"], m
    assert m["val_margin"] > 0


def test_saved_reward_model_reproduces_the_reported_accuracy(reward_run):
    from ember.align.data import preference_split
    from ember.align.rollout import encode_pairs
    from ember.tokenizer.special import load_tokenizer

    run, m = reward_run
    model = reward.load_scalar_model(run / "reward" / "final", "cpu")
    tok = load_tokenizer(run / "tokenizer" / "tokenizer.json")
    _, val = preference_split("stdlib", 400, 0.1, 0)
    ev = reward.evaluate(model, encode_pairs(tok, val, "chat", 128, 96), tok.pad_id, "cpu")
    assert ev["accuracy"] == pytest.approx(m["val_accuracy"])


def test_score_is_read_at_the_last_real_token(base_run):
    run, tok = base_run
    model = reward.attach_scalar_head(load_model(run / "sft" / "final")).eval()
    short, long = ([5, 6, 7], [8]), ([5, 6, 7, 9, 10, 11], [12, 13, 14, 15])
    with torch.no_grad():
        alone = reward.last_token_scores(model, collate([short[0]], [short[1]], tok.pad_id))
        padded = reward.last_token_scores(model, collate([short[0], long[0]], [short[1], long[1]], tok.pad_id))
        direct = model(torch.tensor([[5, 6, 7, 8]]))[0, -1, 0]
    assert torch.allclose(alone[0], padded[0], atol=1e-5)  # right padding does not change the score
    assert torch.allclose(alone[0], direct, atol=1e-5)


def test_scalar_model_file_errors(tmp_path, base_run):
    with pytest.raises(UserError, match="no reward model"):
        reward.load_scalar_model(tmp_path, "cpu")
    (tmp_path / reward.SCALAR_FILE).write_bytes(b"garbage")
    with pytest.raises(UserError):
        reward.load_scalar_model(tmp_path, "cpu")
    with pytest.raises(UserError, match="not a scalar"):  # an LM checkpoint is not a reward model
        reward.load_scalar_model(base_run[0] / "sft" / "final" / "model.safetensors", "cpu")


def test_a_reward_model_is_used_with_its_own_template_and_tokenizer(reward_run):
    run, _ = reward_run
    final = run / "reward" / "final"
    assert reward.load_scalar_model(final, "cpu", template="chat") is not None
    with pytest.raises(UserError, match="trained with template 'chat', this stage uses 'raw'"):
        reward.load_scalar_model(final, "cpu", template="raw")
    with pytest.raises(UserError, match="trained with tokenizer_sha256"):
        reward.load_scalar_model(final, "cpu", tokenizer_sha256="0" * 64)


def test_finished_run_is_cached(reward_run):
    run, m = reward_run
    again = reward.main(reward.Config(run=str(run), n_pairs=400, steps=60, batch_size=16, lr=1e-3, max_len=128,
                                      max_prompt_len=96, eval_every=0, device="cpu"))
    assert again == m


def test_config_validation():
    with pytest.raises(UserError, match="template"):
        reward.Config(template="jinja")
    with pytest.raises(UserError, match="max_prompt_len"):
        reward.Config(max_len=64, max_prompt_len=64)


def test_scalar_head_takes_the_models_dtype():
    """A bf16 model (e.g. imported from an HF folder saved in bf16) gets a bf16 head, so scoring runs."""
    from ember.model.gpt import GPTConfig, build_model

    model = build_model(GPTConfig(vocab_size=64, n_layer=1, n_head=2, n_kv_head=1, n_embd=16, max_seq_len=32))
    model = reward.attach_scalar_head(model.to(torch.bfloat16))
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model(torch.randint(0, 64, (2, 5))).shape == (2, 5, 1)
