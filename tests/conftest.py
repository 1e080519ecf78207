"""Settings for every test (tiny models run on one torch thread) and the models the engine and serving tests
share: the real stories260K (skipped when absent) and a tiny random GPT with a character tokenizer."""

import pytest
import torch

from ember.model.gpt import GPTConfig, build_model
from ember.model.llama2c import load_llama2c, stories260k_paths
from ember.tokenizer.special import load_tokenizer


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls are latency-bound: a second intra-op thread adds a sync per op and, on a busy 2-core
    machine, waits for a core. The previous setting comes back after each test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class CharTokenizer:
    """ids 0 (BOS) and 1 (EOS), then one id per character of ALPHABET."""

    ALPHABET = "abcdefghijklmnopqrstuvwxyz .,!?\n"
    bos_id, eos_id = 0, 1
    vocab_size = 2 + len(ALPHABET)
    stop_ids = (1,)

    def encode(self, text: str) -> list[int]:
        return [2 + self.ALPHABET.index(c) for c in text.lower() if c in self.ALPHABET]

    def encode_prompt(self, text: str) -> list[int]:
        return [self.bos_id] + self.encode(text)

    def render_chat(self, messages, add_generation_prompt=False, where="messages"):
        """A base model's rendering (no template): BOS + the contents joined by blank lines."""
        ids = self.encode_prompt("\n\n".join(m["content"] for m in messages))
        return ids, [0] * len(ids)

    def decode(self, ids) -> str:
        return "".join(self.ALPHABET[i - 2] for i in ids if i >= 2)


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer): a random 2-layer GQA model, deterministic weights."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=CharTokenizer.vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                    max_seq_len=128)
    model = build_model(cfg, "cpu").eval()
    with torch.no_grad():  # larger logits than init's N(0, 0.02) so sampling is far from uniform
        model.lm_head.weight.mul_(50)
    return model, CharTokenizer()


@pytest.fixture(scope="session")
def stories():
    """(model, tokenizer) of the real pretrained stories260K (llama2.c), or skip."""
    paths = stories260k_paths()
    if paths is None:
        pytest.skip("../shared/datasets/models/stories260K is absent (see INVENTORY.md)")
    model = load_llama2c(paths[0])
    return model, load_tokenizer(paths[1], model.config.vocab_size)


@pytest.fixture(params=["tiny", "stories"])
def any_model(request):
    return request.getfixturevalue(request.param)
