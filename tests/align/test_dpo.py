"""`ember dpo`: log 2 at init, a rising held-out margin, and LoRA's reference = the adapter-disabled model."""

import math

import pytest
import torch

from ember.align import dpo
from ember.align.rollout import PolicyWithReference
from ember.common.checkpoint import load_model
from ember.model import lora

FAST = dict(n_pairs=300, steps=30, batch_size=16, max_len=128, max_prompt_len=96, eval_every=0, device="cpu")


def test_dpo_full_finetune_raises_heldout_margin(run_dir):
    m = dpo.main(dpo.Config(run=str(run_dir), lr=1e-3, **FAST))
    assert m["loss_at_init"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 1
    assert m["val_margin_before"] == pytest.approx(0.0, abs=1e-5)
    assert m["val_margin"] > 0.5, m
    assert m["val_accuracy"] > 0.6, m
    assert m["val_logp_gap"] > m["val_logp_gap_before"]  # chosen gained log-prob relative to rejected
    model = load_model(run_dir / "dpo" / "final")
    assert model.config.n_layer == 2


def test_dpo_lora_raises_heldout_margin_and_saves_merged_model(run_dir):
    m = dpo.main(dpo.Config(run=str(run_dir), lr=3e-3, lora_r=8, **FAST))
    assert m["loss_at_init"] == pytest.approx(math.log(2), abs=1e-5)
    assert m["val_margin"] > 0.2, m
    final = run_dir / "dpo" / "final"
    assert (final / "adapter.safetensors").is_file()
    merged = load_model(final)  # a plain model: LoRA merged into the weights
    assert not any(isinstance(mod, lora.LoRALinear) for mod in merged.modules())


def test_ipo_objective_runs(run_dir):
    m = dpo.main(dpo.Config(run=str(run_dir), objective="ipo", beta=0.5, lr=1e-3, **{**FAST, "steps": 5}))
    # IPO at init: (0 - 1/(2 beta))^2 = 1
    assert m["loss_at_init"] == pytest.approx(1.0, abs=1e-5)


def test_lora_reference_is_the_adapter_disabled_model(base_run):
    run, _ = base_run
    base = load_model(run / "sft" / "final").eval()
    idx = torch.randint(10, 200, (2, 12))
    with torch.no_grad():
        want = base(idx)
    pr = PolicyWithReference(load_model(run / "sft" / "final"), lora_r=4, lora_alpha=8, lora_targets=["attn", "mlp"])
    assert pr.reference is None  # no second copy of the weights
    with torch.no_grad():
        for _, mod in lora.lora_modules(pr.model):
            mod.lora_b.normal_()  # a trained adapter: the policy now differs from the base
        assert not torch.allclose(pr.model(idx), want, atol=1e-3)
        with pr.as_reference() as ref:
            assert torch.allclose(ref(idx), want, atol=1e-5)
        assert not torch.allclose(pr.model(idx), want, atol=1e-3)  # adapters back on afterwards
