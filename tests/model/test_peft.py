"""PEFT interop of LoRA adapters: an ember adapter loads with peft.PeftModel onto the exported base (same
logits), a peft adapter loads into ember through import_hf + load_peft_adapter (same logits, same merge), and
the adapter options ember does not implement are refused by name."""

import json
import warnings

import pytest
import torch

from ember.common.errors import UserError
from ember.model.gpt import GPTConfig, build_model
from ember.model.hf import export_hf, hf_name, import_hf, model_type
from ember.model.lora import (LoRALinear, apply_lora, load_peft_adapter, lora_modules, merge_lora,
                              read_peft_adapter, save_peft_adapter)

from .test_hf import TINY, randomize  # the same tiny config and O(1-10)-logit weights as the HF parity tests

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TOL = dict(atol=1e-4, rtol=0)  # fp32; logits are O(1-10)


def load_hf(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


def peft_from_pretrained(hf, folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(hf, str(folder)).eval()


CASES = {  # name: (GPTConfig overrides, LoRA targets)
    "llama-attn-mlp": ({}, ["attn", "mlp"]),
    "qwen3-some-and-head": ({"qk_norm": True}, ["q_proj", "v_proj", "down_proj", "lm_head"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_ember_adapter_loads_in_peft(case, tmp_path):
    kw, targets = CASES[case]
    torch.manual_seed(0)
    model = randomize(build_model(GPTConfig(**{**TINY, **kw}))).eval()
    export_hf(model, tmp_path / "base")  # the plain base: export_hf maps only un-adapted parameter names
    apply_lora(model, targets, r=4, alpha=8)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_b.copy_(0.2 * torch.randn(m.lora_b.shape, generator=g))  # B = 0 would test nothing
    save_peft_adapter(tmp_path / "adapter", model, base_model_name_or_path=str(tmp_path / "base"))

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["bias"] == "none"
    assert (config["r"], config["lora_alpha"], config["fan_in_fan_out"]) == (4, 8, False)
    leaves = {n.rsplit(".", 1)[-1] for n, _ in lora_modules(model)}
    assert set(config["target_modules"]) == leaves  # HF's leaf names are ember's for dense models
    tensors, _ = read_peft_adapter(tmp_path / "adapter")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    assert len(tensors) == 2 * len(list(lora_modules(model)))

    hf = peft_from_pretrained(load_hf(tmp_path / "base"), tmp_path / "adapter")
    idx = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
        with hf.disable_adapter():
            base_logits = hf(idx).logits
    assert (ours - base_logits).abs().max() > 0.1  # the adapter changes the output...
    torch.testing.assert_close(ours, theirs, **TOL)  # ...and peft computes the same change

    # back into ember: a fresh import of the base + the PEFT folder is the same model
    back = load_peft_adapter(tmp_path / "adapter", import_hf(tmp_path / "base")).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(idx), ours, atol=0, rtol=0)


def tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rms_norm_eps=1e-5, rope_theta=10000.0)
    torch.manual_seed(0)
    return randomize(transformers.LlamaForCausalLM(cfg), seed=2).eval()


def test_peft_adapter_loads_in_ember_and_merges_the_same(tmp_path):
    hf = tiny_llama()
    hf.save_pretrained(tmp_path / "base")
    lcfg = peft.LoraConfig(r=4, lora_alpha=12, lora_dropout=0.0, task_type="CAUSAL_LM",
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    pm = peft.get_peft_model(hf, lcfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:  # peft inits B = 0; make both factors random
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(tmp_path / "adapter")
    pm.eval()

    model = load_peft_adapter(tmp_path / "adapter", import_hf(tmp_path / "base")).eval()
    q = model.layers[0].attn.q_proj
    assert isinstance(q, LoRALinear) and (q.r, q.scale) == (4, 3.0)
    assert len(list(lora_modules(model))) == 7 * 2
    idx = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        ours, theirs = model(idx), pm(idx).logits
        with pm.disable_adapter():
            assert (pm(idx).logits - theirs).abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, **TOL)

    merged_hf = pm.merge_and_unload()
    merge_lora(model)
    assert not any(True for _ in lora_modules(model))
    theirs_sd, mtype = merged_hf.state_dict(), model_type(model.config)
    for name, w in model.state_dict().items():  # merged weights, one by one: W + alpha/r * B @ A
        torch.testing.assert_close(w, theirs_sd[hf_name(name, mtype)], atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), merged_hf(idx).logits, **TOL)


def write_adapter(tmp_path, **config_changes):
    """A valid ember-written PEFT folder, then config_changes written over its adapter_config.json."""
    torch.manual_seed(0)
    model = apply_lora(build_model(GPTConfig(**TINY)), ["attn"], r=2, alpha=4)
    folder = save_peft_adapter(tmp_path / "a", model)
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config_changes}))
    return folder


@pytest.mark.parametrize("field,value", [("use_rslora", True), ("use_dora", True), ("rank_pattern", {"q_proj": 8}),
                                         ("layers_to_transform", [0]), ("modules_to_save", ["lm_head"]),
                                         ("bias", "all"), ("peft_type", "IA3")])
def test_unimplemented_options_are_refused_by_name(field, value, tmp_path):
    folder = write_adapter(tmp_path, **{field: value})
    with pytest.raises(UserError, match=field):
        load_peft_adapter(folder, build_model(GPTConfig(**TINY)))


def test_wrong_folders_and_models(tmp_path):
    with pytest.raises(UserError, match="adapter_config.json"):
        load_peft_adapter(tmp_path, build_model(GPTConfig(**TINY)))
    folder = write_adapter(tmp_path)
    with pytest.raises(UserError, match="does not fit|shape"):  # a deeper model: layers 2-3 get no adapter
        load_peft_adapter(folder, build_model(GPTConfig(**{**TINY, "n_layer": 4})))
    with pytest.raises(UserError, match="shape"):  # a wider model
        load_peft_adapter(folder, build_model(GPTConfig(**{**TINY, "n_embd": 128})))


def test_moe_experts_refused_attention_exports(tmp_path):
    torch.manual_seed(0)
    cfg = GPTConfig(**TINY, n_expert=4, n_expert_active=2)
    with pytest.raises(UserError, match="experts"):
        save_peft_adapter(tmp_path / "x", apply_lora(build_model(cfg), ["attn", "mlp"], r=2, alpha=4))
    model = randomize(apply_lora(build_model(cfg), ["attn"], r=2, alpha=4)).eval()
    save_peft_adapter(tmp_path / "a", model)
    back = build_model(cfg)
    back.load_state_dict({k.replace(".base.", "."): v for k, v in model.state_dict().items() if "lora_" not in k})
    load_peft_adapter(tmp_path / "a", back.eval())
    idx = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(back(idx), model(idx), atol=0, rtol=0)
