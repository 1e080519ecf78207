"""Parity of ember's GPT with transformers' Llama / Mixtral / Qwen3 in both directions of conversion."""

import json
import warnings

import pytest
import torch

from ember.common.errors import UserError
from ember.model.gpt import GPTConfig, build_model
from ember.model.hf import export_hf, import_hf

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=128, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, max_seq_len=64, rope_theta=500.0,
            norm_eps=1e-6)


def randomize(model, seed=0):
    """Weights large enough that logits are O(1-10) (a real parity test), norm gains away from 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    return model


def load_hf(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


CASES = {
    "llama": ({}, "LlamaForCausalLM"),
    "llama-tied-mha": ({"tie_embeddings": True, "n_kv_head": 4}, "LlamaForCausalLM"),
    "mixtral": ({"n_expert": 4, "n_expert_active": 2}, "MixtralForCausalLM"),
    "qwen3-qknorm": ({"qk_norm": True}, "Qwen3ForCausalLM"),
    "qwen3-moe": ({"qk_norm": True, "n_expert": 4, "n_expert_active": 2}, "Qwen3MoeForCausalLM"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_export_parity(case, tmp_path):
    kw, arch = CASES[case]
    torch.manual_seed(0)
    model = randomize(build_model(GPTConfig(**{**TINY, **kw}))).eval()
    export_hf(model, tmp_path / "hf")
    hf = load_hf(tmp_path / "hf")
    assert type(hf).__name__ == arch
    idx = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    assert ours.abs().max() > 1.0
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    back = import_hf(tmp_path / "hf")
    assert back.config == model.config
    with torch.no_grad():
        torch.testing.assert_close(back(idx), ours, atol=0, rtol=0)


def hf_model(kind: str):
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**common, rope_theta=10000.0)
        cls = transformers.LlamaForCausalLM
    else:
        cfg = transformers.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)
        cls = transformers.MixtralForCausalLM
    torch.manual_seed(0)
    return randomize(cls(cfg), seed=1).eval()


@pytest.mark.parametrize("kind", ["llama", "mixtral"])
def test_import_parity_from_transformers(kind, tmp_path):
    hf = hf_model(kind)
    hf.save_pretrained(tmp_path / "hf")
    model = import_hf(tmp_path / "hf").eval()
    assert model.config.ffn_dim == 96 and model.config.n_expert == (4 if kind == "mixtral" else 0)
    idx = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    assert ours.abs().max() > 1.0
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_kv_cache_greedy_decode_matches_hf_generate(tmp_path):
    hf = hf_model("llama")
    hf.save_pretrained(tmp_path / "hf")
    model = import_hf(tmp_path / "hf").eval()
    prompt = torch.randint(0, 128, (2, 6))
    hf.generation_config.eos_token_id = None  # decode exactly 10 tokens, as the ember loop does
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)[:, 6:]
        cache = model.new_cache(batch_size=2)
        logits, out = model(prompt, cache=cache), []
        for _ in range(10):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out.append(nxt)
            logits = model(nxt, cache=cache)
    assert torch.equal(torch.cat(out, dim=1), expected)


def test_moe_aux_loss_relates_to_hf_by_k():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from ember.model.gpt import moe_losses
    torch.manual_seed(0)
    logits = torch.randn(50, 8)
    for k in (1, 2, 3):
        ours, _ = moe_losses(logits, logits.topk(k).indices, 8)
        theirs = load_balancing_loss_func((logits,), num_experts=8, top_k=k)
        assert theirs.item() == pytest.approx(k * ours.item(), rel=1e-5)


def make_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<|bos|>", "<|eos|>", "<|pad|>", "<|end|>"])
    tok.train_from_iterator(["hello world, the model speaks", "def f(x): return x + 1"] * 20, trainer)
    tok.save(str(path))
    return tok


def test_export_writes_a_tokenizer_autotokenizer_loads(tmp_path):
    tok = make_tokenizer(tmp_path / "tokenizer.json")
    template = "{% for m in messages %}{{ m.role }}: {{ m.content }}<|end|>{% endfor %}"  # <|end|> closes a turn
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    model = build_model(GPTConfig(**TINY))
    export_hf(model, tmp_path / "hf", tokenizer_json=tmp_path / "tokenizer.json")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "hello world, def f(x)"
    assert hf_tok(text)["input_ids"] == tok.encode(text).ids
    assert (hf_tok.bos_token, hf_tok.eos_token, hf_tok.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert hf_tok.model_max_length == 64
    ids = {t: tok.token_to_id(t) for t in ("<|bos|>", "<|eos|>", "<|end|>")}
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (ids["<|bos|>"], ids["<|eos|>"])
    gen = transformers.GenerationConfig.from_pretrained(tmp_path / "hf")
    assert gen.eos_token_id == [ids["<|eos|>"], ids["<|end|>"]]  # generate() stops at the end of a chat turn too


def test_export_carries_the_tokenizer_config_beside_it(tmp_path):
    make_tokenizer(tmp_path / "tokenizer.json")
    template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "add_bos_token": False}))
    model = build_model(GPTConfig(**TINY))
    export_hf(model, tmp_path / "hf", tokenizer_json=tmp_path / "tokenizer.json")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    chat = hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<|user|>hi<|end|>"
    export_hf(model, tmp_path / "hf2", tokenizer_json=tmp_path / "tokenizer.json", chat_template="{{ 'x' }}")
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf2").chat_template == "{{ 'x' }}"


def test_export_rejects_a_tokenizer_bigger_than_the_vocab(tmp_path):
    make_tokenizer(tmp_path / "tokenizer.json")
    model = build_model(GPTConfig(**{**TINY, "vocab_size": 50}))
    with pytest.raises(UserError, match="vocab_size is 50"):
        export_hf(model, tmp_path / "hf", tokenizer_json=tmp_path / "tokenizer.json")
    assert not (tmp_path / "hf").exists()  # nothing half-written


def test_import_errors_name_the_folder_and_problem(tmp_path):
    model = build_model(GPTConfig(**TINY))
    out = export_hf(model, tmp_path / "hf")
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "hidden_act": "gelu"}))
    with pytest.raises(UserError, match="hidden_act='gelu'"):
        import_hf(out)
    cfg_path.write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(UserError, match="model_type 'gpt2' is not supported"):
        import_hf(out)
    cfg_path.write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(UserError, match="config says 3 layers but its tensors hold 2"):
        import_hf(out)
    for bad in ({"num_attention_heads": 0}, {"hidden_size": "32"}, {"rope_parameters": [1]}):
        cfg_path.write_text(json.dumps({**cfg, **bad}))
        with pytest.raises(UserError, match="not a usable HF config"):
            import_hf(out)
    cfg_path.write_text(json.dumps({**cfg, "intermediate_size": 100}))
    with pytest.raises(UserError, match="shape"):
        import_hf(out)
    with pytest.raises(UserError, match="no config.json"):
        import_hf(tmp_path)


def test_import_keeps_to_the_folder(tmp_path):
    """Shard names in model.safetensors.index.json come from the file: one pointing outside is refused."""
    out = export_hf(build_model(GPTConfig(**TINY)), tmp_path / "hf")
    (out / "model.safetensors").rename(tmp_path / "outside.safetensors")
    index = out / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"model.norm.weight": "../outside.safetensors"}}))
    with pytest.raises(UserError, match="shard '../outside.safetensors' lies outside"):
        import_hf(out)
    index.write_text(json.dumps({"weight_map": {"model.norm.weight": str(tmp_path / "outside.safetensors")}}))
    with pytest.raises(UserError, match="outside.safetensors' lies outside"):  # an absolute path too
        import_hf(out)
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(UserError, match="not a safetensors index"):
        import_hf(out)
