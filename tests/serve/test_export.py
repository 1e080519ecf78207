"""`ember export`: a run's checkpoint becomes an HF folder that transformers loads with the same logits and
greedy text as ember's engine, and a GGUF that reads back equal; the stage caches and fails clearly."""

import pytest
import torch

from ember.common.errors import UserError
from ember.model.gpt import GPTConfig, build_model
from ember.model.engine import Engine, SamplingParams
from ember.serve.export import Config, main

pytest.importorskip("gguf", reason="the gguf package is in the dev extra")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder with a tokenizer and a (random) pretrain/final checkpoint, as the pipeline leaves them."""
    from ember.common.checkpoint import save_model
    from ember.tokenizer.train import save, train_tokenizer

    run = tmp_path_factory.mktemp("run")
    tok = train_tokenizer(["hello world, this is ember. " * 5, "def f(x):\n    return x + 1\n" * 3], 290, 1)
    save(tok, run / "tokenizer")
    torch.manual_seed(0)
    model = build_model(GPTConfig(vocab_size=320, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, max_seq_len=64), "cpu")
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # peaked next-token distributions: greedy text is not a coin toss
    save_model(run / "pretrain" / "final", model)
    return run, model, tok


def test_export_both_and_transformers_parity(run_dir):
    transformers = pytest.importorskip("transformers")
    run, model, tok = run_dir
    metrics = main(Config(run=str(run)))
    assert metrics["hf_max_abs_diff"] == 0.0 and metrics["gguf_max_abs_diff"] == 0.0 and metrics["gguf_bytes"] > 0
    hf_dir = run / "export" / "hf"
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    text = "hello world"
    ids = [tok.bos_id] + tok.encode(text)
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), rtol=1e-4, atol=1e-4)
        out = hf.generate(x, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_id)
    ours = Engine(model, tok).generate([ids], SamplingParams(max_tokens=20, temperature=0))[0]
    assert out[0, len(ids):].tolist() == ours.tokens
    assert main(Config(run=str(run))) == metrics  # a finished export with the same inputs is cached


def test_export_gguf_f16_and_errors(run_dir, tmp_path):
    run, *_ = run_dir
    m = main(Config(run=str(run), format="gguf", dtype="f16"))
    assert "hf_max_abs_diff" not in m and 0 < m["gguf_max_abs_diff"] < 1e-2
    assert (run / "export" / "model.gguf").is_file() and not (run / "export" / "hf").exists()
    with pytest.raises(UserError, match="no checkpoint"):
        main(Config(run=str(tmp_path)))


def test_hf_export_keeps_the_chat_template_and_a_gguf_tokenizer(run_dir, tmp_path):
    """sft/final holds tokenizer.json but no tokenizer_config.json: the HF folder still gets the chat template.
    A GGUF carries ember's tokenizer inside: exporting it to HF writes that tokenizer too."""
    transformers = pytest.importorskip("transformers")
    import shutil

    run, model, tok = run_dir
    from ember.common.checkpoint import save_model

    final = tmp_path / "run" / "sft" / "final"
    save_model(final, model)
    shutil.copyfile(run / "tokenizer" / "tokenizer.json", final / "tokenizer.json")  # as sft leaves it
    main(Config(run=str(tmp_path / "run"), checkpoint=str(final), format="both"))
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "run" / "export" / "hf")
    ids = hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                     return_dict=True)["input_ids"]
    from ember.tokenizer.chat import render_chat

    assert list(ids) == render_chat(tok, [{"role": "user", "content": "hi"}], add_generation_prompt=True)[0]

    gguf = tmp_path / "run" / "export" / "model.gguf"
    main(Config(run=str(tmp_path / "gguf_run"), checkpoint=str(gguf), format="hf"))
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "gguf_run" / "export" / "hf")
    assert hf_tok("hello world", add_special_tokens=False)["input_ids"] == tok.encode("hello world")


def test_raw_prompt_gives_the_same_greedy_text_in_serve_transformers_and_llama_cpp(run_dir):
    """An exported ember model answers a raw prompt alike everywhere: ember's server path (BOS + the prompt with
    special-token strings parsed), plain transformers (`tokenizer(prompt)` then `generate`: the exported
    tokenizer adds BOS as ember does) and llama.cpp on the GGUF (add_bos_token in its metadata)."""
    transformers = pytest.importorskip("transformers")
    from ember.serve.models import load_served

    run, model, tok = run_dir
    main(Config(run=str(run), format="both"))
    prompt = "hello world, def"
    served = load_served(run / "pretrain" / "final", run=str(run))
    ids = served.encode_prompt(prompt)
    assert ids[0] == tok.bos_id
    ours = Engine(served.model, served.tokenizer).generate([ids], SamplingParams(max_tokens=12, temperature=0,
                                                                                 ignore_eos=True))[0]
    hf_dir = run / "export" / "hf"
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    x = hf_tok(prompt, return_tensors="pt")["input_ids"]
    assert x[0].tolist() == ids  # the same prompt: BOS included
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    out = hf.generate(x, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_id)
    assert out[0, len(ids):].tolist() == ours.tokens
    assert hf_tok.decode(out[0, len(ids):]) == ours.text
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (built by .ci/run) is not installed")
    llm = llama_cpp.Llama(model_path=str(run / "export" / "model.gguf"), n_ctx=64, n_threads=1, verbose=False)
    assert llm.tokenize(prompt.encode(), add_bos=True, special=True) == ids
    # token by token (the random model writes stray bytes, whose text llama.cpp holds back as incomplete UTF-8)
    theirs = [t for _, t in zip(range(12), llm.generate(ids, top_k=1, temp=0.0, reset=True))]
    assert theirs == ours.tokens
