"""The model's CUDA paths: parity with transformers' Llama on the GPU, the fused head loss, KV-cache decoding.

CI has no GPU, so these skip there; on a CUDA machine `python -m pytest tests/model/test_gpu.py` runs them
(benchmarks/gpu_check.sh does, with the GPU benchmark and the pipelines).
"""

import tempfile
import warnings

import pytest
import torch
import torch.nn.functional as F

from ember.model.gpt import GPTConfig, build_model
from ember.model.hf import export_hf

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")

CFG = GPTConfig(vocab_size=1000, n_layer=2, n_embd=128, n_head=4, n_kv_head=2, max_seq_len=128)


def model_and_batch():
    torch.manual_seed(0)
    model = build_model(CFG, "cuda").train()
    idx = torch.randint(0, CFG.vocab_size, (4, 64), device="cuda")
    targets = torch.cat([idx[:, 1:], torch.full((4, 1), -100, device="cuda")], dim=1)
    return model, idx, targets


def test_logits_match_transformers_llama_on_gpu():
    transformers = pytest.importorskip("transformers")
    model, idx, _ = model_and_batch()
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_hf(model, d)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="sdpa").cuda().eval()
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(idx), hf(input_ids=idx).logits, atol=1e-4)


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_head_loss_equals_the_logits_path_on_gpu(autocast):
    model, idx, targets = model_and_batch()
    grads = []
    for fused in (True, False):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = model(idx, targets) if fused else \
                F.cross_entropy(model(idx).float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        assert (type(loss.grad_fn.next_functions[0][0]).__name__ == "_LinearCrossEntropyBackward") == fused
        loss.backward()
        grads.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (fused_loss, fused_g), (ref_loss, ref_g) = grads
    assert fused_loss == pytest.approx(ref_loss, rel=1e-3 if autocast else 1e-6)
    for n in ref_g:  # bf16: the paths round the logits' gradient to bf16 before/after scaling by 1/tokens
        err = (fused_g[n] - ref_g[n]).norm() / ref_g[n].norm()
        assert err < (2e-2 if autocast else 1e-5), (n, err.item())


def test_kv_cache_decoding_equals_full_forward_on_gpu():
    model, idx, _ = model_and_batch()
    model.eval()
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(idx.size(0))
        steps = [model(idx[:, :16], cache=cache)] + [model(idx[:, t:t + 1], cache=cache) for t in range(16, 64)]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-4)


@pytest.mark.parametrize("gen_device", ["cpu", "cuda"])
def test_rollout_sampling_on_gpu(gen_device):
    """align's generate() (PPO, GRPO, constitution rollouts) with a model on the GPU: seeded, reproducible."""
    from ember.align.rollout import generate

    model, idx, _ = model_and_batch()
    prompts = [idx[0, :5].tolist(), idx[1, :9].tolist()]
    runs = [generate(model, prompts, 8, stop=0, generator=torch.Generator(device=gen_device).manual_seed(1))
            for _ in range(2)]
    assert runs[0] == runs[1] and all(len(r) == 8 or r[-1] == 0 for r in runs[0])
