"""import_hf against transformers on every family it reads: random tiny models, logits equal to 1e-5 in fp32.

Each case builds a transformers model from its own config class (Llama with each RoPE scaling, Mistral with a
sliding window, Qwen2 with q/k/v biases, Qwen3 with an explicit head_dim, SmolLM2-style tied Llama, Mixtral,
Qwen3-MoE), saves it with save_pretrained, imports it, and compares logits; then exports it back and checks
transformers reads the same family with the same logits.
"""

import json
import warnings

import pytest
import torch

from ember.common.errors import UserError
from ember.model.hf import export_hf, import_hf

transformers = pytest.importorskip("transformers")

V = 96
COMMON = dict(vocab_size=V, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          # head_dim 16, theta 1e4: wavelengths 6..2e4 tokens, so 256 / 64 put frequencies in all three bands
          "original_max_position_embeddings": 256}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}
YARN_ALL = {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 128, "beta_fast": 8.0,
            "beta_slow": 2.0, "truncate": False, "attention_factor": 1.3}

# name -> (config class, extra config kwargs, expected ember fields)
CASES = {
    "llama": ("LlamaConfig", {}, {}),
    "llama-head_dim": ("LlamaConfig", {"head_dim": 24}, {"head_size": 24}),
    "smollm2-tied": ("LlamaConfig", {"tie_word_embeddings": True, "num_key_value_heads": 1}, {"tie_embeddings": True}),
    "llama-linear": ("LlamaConfig", {"rope_scaling": {"rope_type": "linear", "factor": 2.5}},
                     {"rope_scaling": "linear"}),
    "llama-dynamic": ("LlamaConfig", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0},
                                      "max_position_embeddings": 24}, {"rope_scaling": "dynamic"}),
    "llama3.1": ("LlamaConfig", {"rope_scaling": LLAMA3, "max_position_embeddings": 2048},
                 {"rope_scaling": "llama3", "rope_original_max": 256, "rope_high_rot": 4.0}),
    "llama-yarn": ("LlamaConfig", {"rope_scaling": YARN, "rope_theta": 10000.0}, {"rope_scaling": "yarn"}),
    "llama-yarn-all-params": ("LlamaConfig", {"rope_scaling": YARN_ALL},
                              {"rope_attn_factor": 1.3, "rope_truncate": False, "rope_low_rot": 2.0}),
    "llama-yarn-mscale": ("LlamaConfig", {"rope_scaling": {**YARN, "mscale": 1.0, "mscale_all_dim": 0.5}}, {}),
    "mistral-window": ("MistralConfig", {"sliding_window": 32}, {"max_seq_len": 32, "hf_model_type": "mistral"}),
    "qwen2-bias": ("Qwen2Config", {}, {"attn_bias": True}),
    "qwen2.5-tied-yarn": ("Qwen2Config", {"tie_word_embeddings": True, "rope_scaling": YARN},
                          {"attn_bias": True, "tie_embeddings": True}),
    "qwen3-head_dim": ("Qwen3Config", {"head_dim": 32}, {"head_size": 32, "qk_norm": True}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}, {"n_expert": 4}),
    "qwen3-moe": ("Qwen3MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 40,
                                     "norm_topk_prob": True, "head_dim": 16}, {"moe_norm_topk": True}),
    "qwen3-moe-raw-topk": ("Qwen3MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 40,
                                              "norm_topk_prob": False, "head_dim": 16}, {"moe_norm_topk": False}),
}
FAMILY = {"LlamaConfig": "LlamaForCausalLM", "MistralConfig": "MistralForCausalLM", "Qwen2Config": "Qwen2ForCausalLM",
          "Qwen3Config": "Qwen3ForCausalLM", "MixtralConfig": "MixtralForCausalLM",
          "Qwen3MoeConfig": "Qwen3MoeForCausalLM"}


def randomize(model, seed=1):
    """Weights (and biases) large enough that logits are O(1-10); norm gains away from 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g) if name.endswith("norm.weight")
                    else 0.15 * torch.randn(p.shape, generator=g))
    return model


def load_hf(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


def hf_model(cls_name: str, kw: dict):
    cfg = getattr(transformers, cls_name)(**{**COMMON, **kw})
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    return randomize(model).eval()


@pytest.mark.parametrize("case", list(CASES))
def test_import_matches_transformers_and_exports_back(case, tmp_path):
    cls_name, kw, fields = CASES[case]
    hf = hf_model(cls_name, kw)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    model = import_hf(tmp_path / "hf").eval()
    for k, v in fields.items():
        assert getattr(model.config, k) == v, k
    T = min(20, model.config.max_seq_len)
    idx = torch.randint(0, V, (3, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    assert ours.abs().max() > 1.0
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    if case == "llama-dynamic":  # NTK's base grows with the length: past max_position_embeddings (24) too
        assert (model.config.max_seq_len, model.config.rope_original_max) == (48, 24)  # the engine may go there
        long = torch.randint(0, V, (1, 40), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            torch.testing.assert_close(model(long), hf(long).logits, atol=1e-5, rtol=1e-5)

    export_hf(model, tmp_path / "back")
    back = load_hf(tmp_path / "back")
    assert type(back).__name__ == FAMILY[cls_name]
    with torch.no_grad():
        torch.testing.assert_close(back(idx).logits, theirs, atol=1e-5, rtol=1e-5)
    assert import_hf(tmp_path / "back").config == model.config  # and ember -> HF -> ember is exact


def test_mistral_window_cap_is_reported(tmp_path, capsys):
    hf_model("MistralConfig", {"sliding_window": 32}).save_pretrained(tmp_path / "hf")
    assert import_hf(tmp_path / "hf").config.max_seq_len == 32
    assert "sliding_window=32 < max_position_embeddings=64" in capsys.readouterr().err
    hf_model("MistralConfig", {"sliding_window": None}).save_pretrained(tmp_path / "full")
    assert import_hf(tmp_path / "full").config.max_seq_len == 64  # no window: nothing to cap


def test_kv_cache_decode_equals_full_forward_scaled_biased_wide_heads(tmp_path):
    """Prefill + one-token steps through the KV cache give the full forward's logits (and HF's), on a Qwen2 with
    yarn RoPE and head_dim 32 at hidden 64 (n_head * head_dim = 128 != n_embd)."""
    hf = hf_model("Qwen2Config", {"head_dim": 32, "rope_scaling": YARN})
    hf.save_pretrained(tmp_path / "hf")
    model = import_hf(tmp_path / "hf").eval()
    assert model.config.head_dim == 32 and model.config.attn_bias and model.config.rope_scaling == "yarn"
    idx = torch.randint(0, V, (2, 14), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(idx)
        torch.testing.assert_close(full, hf(idx).logits, atol=1e-5, rtol=1e-5)
        cache = model.new_cache(batch_size=2)
        steps = [model(idx[:, :6], cache=cache)]
        steps += [model(idx[:, t:t + 1], cache=cache) for t in range(6, 14)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- formats and bad input

def test_pytorch_model_bin_single_and_sharded(tmp_path):
    hf = hf_model("Qwen2Config", {})
    hf.save_pretrained(tmp_path / "ref")
    want = import_hf(tmp_path / "ref").state_dict()
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    one = tmp_path / "bin"
    one.mkdir()
    (one / "config.json").write_text((tmp_path / "ref" / "config.json").read_text())
    torch.save(state, one / "pytorch_model.bin")
    got = import_hf(one).state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)

    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "config.json").write_text((tmp_path / "ref" / "config.json").read_text())
    names = sorted(state)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        torch.save({k: state[k] for k in part}, shards / f"pytorch_model-0000{i + 1}-of-00002.bin")
        weight_map.update({k: f"pytorch_model-0000{i + 1}-of-00002.bin" for k in part})
    (shards / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    got = import_hf(shards).state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


class Payload:  # any pickled object other than tensors and containers: weights_only must refuse it
    pass


def test_bin_that_pickles_an_object_or_is_truncated_is_refused(tmp_path):
    hf = hf_model("LlamaConfig", {})
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    path = tmp_path / "hf" / "pytorch_model.bin"
    torch.save({"model.norm.weight": torch.ones(64), "x": Payload()}, path)
    with pytest.raises(UserError, match=r"pytorch_model\.bin: not a loadable weights-only"):
        import_hf(tmp_path / "hf")
    torch.save(hf.state_dict(), path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(UserError, match=r"pytorch_model\.bin: not a loadable weights-only"):
        import_hf(tmp_path / "hf")
    path.unlink()
    with pytest.raises(UserError, match="no weights"):
        import_hf(tmp_path / "hf")


def test_truncated_safetensors_names_the_file(tmp_path):
    hf_model("LlamaConfig", {}).save_pretrained(tmp_path / "hf")
    f = tmp_path / "hf" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(UserError, match=r"model\.safetensors is not a readable safetensors file.*truncated"):
        import_hf(tmp_path / "hf")


def test_config_not_matching_tensors_and_unsupported_fields(tmp_path):
    hf_model("Qwen2Config", {}).save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    cfg = json.loads(path.read_text())

    def bad(patch, match):
        path.write_text(json.dumps({**cfg, **patch}))
        with pytest.raises(UserError, match=match):
            import_hf(tmp_path / "hf")

    bad({"tie_word_embeddings": True}, r"weights do not match config\.json .*unexpected \[.lm_head.weight \(differs")
    bad({"model_type": "llama"}, r"weights do not match config\.json .*unexpected .*q_proj\.bias")  # no biases there
    bad({"head_dim": 8}, r"has shape .*config\.json implies")
    bad({"model_type": "gemma"}, r"config\.json: model_type 'gemma' is not supported; import_hf reads llama, mistral")
    bad({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, r"config\.json: rope_type='longrope'")
    bad({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
        "partial_rotary_factor")
    bad({"model_type": "llama", "attention_bias": True}, "attention_bias=true")
    bad({"layer_types": ["full_attention", "chunked_attention"]}, "layer_types")


def test_sliding_window_rules_per_family():
    """Which configs window some layer (and so cap max_seq_len): Qwen only with use_sliding_window, from
    max_window_layers on (or where layer_types says so); Mistral/Mixtral whenever the window is shorter."""
    from ember.model.hf import from_hf_config

    base = dict(vocab_size=V, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, sliding_window=16)
    cap = lambda **kw: from_hf_config({**base, **kw}, "config.json").max_seq_len
    assert cap(model_type="qwen2") == 64  # use_sliding_window false: the window is not used
    assert cap(model_type="qwen2", use_sliding_window=True, max_window_layers=2) == 64  # no layer from 2 on
    assert cap(model_type="qwen2", use_sliding_window=True, max_window_layers=1) == 16
    assert cap(model_type="qwen3", use_sliding_window=True, layer_types=["full_attention", "sliding_attention"]) == 16
    assert cap(model_type="mistral") == 16 and cap(model_type="mistral", sliding_window=None) == 64
    assert cap(model_type="mistral", sliding_window=4096) == 64  # longer than the context: nothing to cap
    assert cap(model_type="mixtral", num_local_experts=2) == 16
    assert cap(model_type="llama") == 64
