"""`ember chat` on models of any format: the prompt is the model's own chat template (with its generation
prompt), a reply ends at any of its stop ids, and the tokenizer is the model's own (an HF Llama folder with a
ChatML tokenizer, llama2.c stories260K with its SentencePiece tok512.bin)."""

from __future__ import annotations

import io

import pytest
import torch

from ember.model.llama2c import stories260k_paths
from ember.sft import chat

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """An HF Llama folder (random weights, save_pretrained) + its ChatML byte-level BPE (Tokenizer.save)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    from ember.tokenizer.special import Tokenizer

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer, hf.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    hf.train_from_iterator(["Hello there, how are you?\n", "I am fine. What is a list?\n"] * 20, trainers.BpeTrainer(
        vocab_size=280, min_frequency=1, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = Tokenizer(hf, eos="<|endoftext|>", chat_template=CHATML)
    folder = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=128, eos_token_id=tok.eos_id)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save(folder)
    return folder


def run_chat(cfg: chat.Config, lines: str, monkeypatch) -> tuple[str, list]:
    """chat.main on `lines`; returns its output and (prompt ids, stop ids) of every generate call."""
    import ember.model.engine as engine

    calls, real = [], engine.generate
    monkeypatch.setattr(engine, "generate", lambda model, prompts, params, stop_ids=(), **kw: (
        calls.append((prompts[0], tuple(stop_ids))), real(model, prompts, params, stop_ids=stop_ids, **kw))[1])
    out = io.StringIO()
    assert chat.main(cfg, stdin=io.StringIO(lines), stdout=out)["turns"] == lines.count("\n")
    return out.getvalue(), calls


def test_chat_with_an_hf_folder_uses_its_template_and_stop_ids(hf_folder, monkeypatch):
    from ember.model.load import load

    _, tok = load(hf_folder)
    assert tok.end_id == tok.token_to_id("<|im_end|>") and set(tok.stop_ids) == {tok.eos_id, tok.end_id}
    cfg = chat.Config(model=str(hf_folder), temperature=0, max_new_tokens=8, system="Be brief.", device="cpu")
    out, calls = run_chat(cfg, "Hello there\nWhat is a list?\n", monkeypatch)
    first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    assert calls[0] == (tok.render_chat(first, add_generation_prompt=True)[0], tok.stop_ids)
    assert tok.decode(calls[1][0]).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello")
    assert tok.decode(calls[1][0]).endswith("<|im_start|>user\nWhat is a list?<|im_end|>\n<|im_start|>assistant\n")
    assert len(out.splitlines()) == 2


def test_a_reply_stops_at_the_end_of_turn(hf_folder):
    """A model that always says <|im_end|> replies with nothing (the stop token is not text of the reply)."""
    from ember.model.load import load

    model, tok = load(hf_folder)
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[tok.end_id] = 1.0
    cfg = chat.Config(temperature=0, max_new_tokens=8)
    assert chat.reply(model, tok, [{"role": "user", "content": "Hello"}], cfg, torch.Generator()) == ""


def test_chat_with_stories260k(monkeypatch):
    paths = stories260k_paths()
    if paths is None:
        pytest.skip("stories260K.bin + tok512.bin not in ../shared/datasets/models/stories260K")
    cfg = chat.Config(model=str(paths[0]), temperature=0, max_new_tokens=20, device="cpu")
    out, calls = run_chat(cfg, "Once upon a time\n", monkeypatch)
    from ember.model.load import load

    _, tok = load(paths[0])  # no chat template: the plain one (BOS + the text); run.c's stops (EOS, BOS)
    assert calls == [([tok.bos_id] + tok.encode("Once upon a time"), (2, 1))]
    assert out.startswith(", there was a")


def test_a_missing_tokenizer_is_a_user_error(tmp_path):
    from ember.common.checkpoint import save_model
    from ember.common.errors import UserError
    from ember.model.gpt import GPTConfig, build_model

    save_model(tmp_path / "m", build_model(GPTConfig(vocab_size=64, n_layer=1, n_head=2, n_kv_head=1, n_embd=16)))
    with pytest.raises(UserError, match="no tokenizer found .* pass --tokenizer"):
        chat.main(chat.Config(model=str(tmp_path / "m"), run=str(tmp_path / "run"), device="cpu"),
                  stdin=io.StringIO("hi\n"), stdout=io.StringIO())
