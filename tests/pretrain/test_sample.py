"""`ember sample`: cached decoding equals full recomputation, seeds reproduce, the stage writes its files, and any
model format samples with its own tokenizer and prompt convention (an HF folder, llama2.c stories260K)."""

import json

import pytest
import torch

from ember.common.checkpoint import save_model
from ember.model.gpt import GPTConfig, build_model
from ember.pretrain import sample


def tiny_model(vocab=50):
    torch.manual_seed(0)
    return build_model(GPTConfig(vocab_size=vocab, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, max_seq_len=64)).eval()


def test_greedy_with_cache_equals_full_recompute():
    model = tiny_model()
    prompt = [3, 14, 15, 9, 2]
    got = sample.generate(model, prompt, 12, temperature=0)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):  # no cache: the whole sequence every step
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert got == ids[len(prompt):]
    assert sample.generate(model, prompt, 12, temperature=1.0, top_k=1) == got  # top-1 sampling is greedy


def test_sampling_is_seeded_and_stops_at_the_limit():
    model = tiny_model()
    a = sample.generate(model, [1, 2], 20, generator=torch.Generator().manual_seed(7))
    b = sample.generate(model, [1, 2], 20, generator=torch.Generator().manual_seed(7))
    assert a == b and len(a) == 20
    assert len(sample.generate(model, [5] * 60, 20)) == 4  # max_seq_len 64 bounds prompt + new tokens


def test_stage_writes_samples(tmp_path):
    from ember.tokenizer.train import train_tokenizer

    texts = ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())\n"] * 20
    tok = train_tokenizer(texts, vocab_size=300, min_frequency=1)
    (tmp_path / "tokenizer").mkdir()
    tok.hf.save(str(tmp_path / "tokenizer" / "tokenizer.json"))
    save_model(tmp_path / "pretrain" / "final", tiny_model(tok.vocab_size))
    cfg = sample.Config(run=str(tmp_path), prompts=["def ", "import "], max_new_tokens=8, device="cpu")
    out = sample.main(cfg)
    assert out["samples"] == 2 and 0 < out["tokens"] <= 16
    rows = [json.loads(line) for line in (tmp_path / "sample" / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["def ", "import "]
    assert "def " in (tmp_path / "sample" / "samples.md").read_text()
    again = sample.sample_prompts(tiny_model(tok.vocab_size), tok, ["def ", "import "], 8, seed=0)
    assert [r["completion"] for r in again] == [r["completion"] for r in rows]  # same seed, same text


# ---------------------------------------------------------------- open models: any format, their own tokenizer

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
TEXTS = ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())\n",
         "Once upon a time there was a cat. The cat liked to sleep.\n", "naïve 東京 🎉\r\n"] * 25


def open_tokenizer(texts=TEXTS, vocab_size: int = 300):
    """A Llama-style byte-level BPE that is not ember's: BOS <s> added to every input, EOS </s>, a ChatML
    template with <|im_end|> closing turns."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    from ember.tokenizer.special import Tokenizer

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=1, special_tokens=["<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return Tokenizer(hf, bos="<s>", eos="</s>", add_bos=True, chat_template=CHATML)


def tiny_open_model(folder, tok=None):
    """<folder>: an HF Llama (random weights, save_pretrained) with its tokenizer saved by Tokenizer.save."""
    transformers = pytest.importorskip("transformers")
    tok = tok or open_tokenizer()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=128, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save(folder)
    return folder


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return tiny_open_model(tmp_path_factory.mktemp("hf"))


def test_sample_an_hf_folder_with_its_own_tokenizer(hf_folder, tmp_path):
    from ember.model.load import load

    model, tok = load(hf_folder)
    assert tok.kind == "hf" and tok.add_bos
    assert sample.prompt_ids(tok, "def") == [tok.bos_id] + tok.encode("def")  # the model's own convention
    out = sample.main(sample.Config(run=str(tmp_path / "a"), checkpoint=str(hf_folder), prompts=["def", "x"],
                                    max_new_tokens=6, temperature=0, device="cpu"))
    assert out["samples"] == 2 and 0 < out["tokens"] <= 12
    rows = [json.loads(line) for line in (tmp_path / "a" / "sample" / "samples.jsonl").read_text().splitlines()]
    assert [r["completion"] for r in rows] == [s["completion"] for s in
                                               sample.sample_prompts(model, tok, ["def", "x"], 6, temperature=0)]
    # --tokenizer overrides the model's own (here a folder holding the same vocabulary: the same text)
    other = tok.save(tmp_path / "tok")
    again = sample.main(sample.Config(run=str(tmp_path / "b"), checkpoint=str(hf_folder), tokenizer=str(other),
                                      prompts=["def", "x"], max_new_tokens=6, temperature=0, device="cpu"))
    assert again["tokens"] == out["tokens"]


def test_a_sample_ends_at_the_models_stop_ids():
    """An open model stops on any of its stop ids (EOS, end of turn), which are not part of the completion."""
    tok = open_tokenizer()
    torch.manual_seed(0)
    model = build_model(GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=1, n_embd=16,
                                  max_seq_len=64)).eval()
    with torch.no_grad():  # the output head always favours <|im_end|>
        model.lm_head.weight.zero_()
        model.lm_head.weight[tok.end_id] = 1.0
        model.norm.weight.fill_(1.0)
    s = sample.sample_prompts(model, tok, ["def"], 8, temperature=0)[0]
    assert tok.end_id in tok.stop_ids and s["tokens"] == 0 and s["completion"] == ""


def test_sample_stories260k():
    from ember.model.llama2c import stories260k_paths

    paths = stories260k_paths()
    if paths is None:
        pytest.skip("stories260K.bin + tok512.bin not in ../shared/datasets/models/stories260K")
    from ember.model.load import load

    model, tok = load(paths[0])
    assert tok.kind == "sentencepiece" and sample.prompt_ids(tok, "Once")[0] == tok.bos_id
    s = sample.sample_prompts(model, tok, ["Once upon a time"], 30, temperature=0)[0]
    assert s["completion"].startswith(", there was a little") and s["tokens"] == 30  # the real model's story


def test_stage_reads_a_llama2c_checkpoint(tmp_path):
    from ember.model.llama2c import stories260k_paths

    paths = stories260k_paths()
    if paths is None:
        pytest.skip("stories260K.bin + tok512.bin not in ../shared/datasets/models/stories260K")
    out = sample.main(sample.Config(run=str(tmp_path), checkpoint=str(paths[0]), prompts=["Once upon a time"],
                                    max_new_tokens=12, temperature=0, device="cpu"))
    assert out["tokens"] == 12
    assert "Once upon a time, there was a" in (tmp_path / "sample" / "samples.md").read_text()
