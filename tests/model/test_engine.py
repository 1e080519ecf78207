"""The generation engine: KV-cached greedy decoding equals argmax of full forward passes, batched and
continuous-batching outputs equal one-at-a-time outputs, stop strings, sampling filters by hand."""

import math
import threading

import pytest
import torch

from ember.common.errors import UserError
from ember.model.engine import (Engine, QueueFull, SamplingParams, apply_penalties, filter_logits, holdback)
from ember.model.gpt import GPTConfig, build_model
from ember.model.llama2c import Llama2cTokenizer, load_llama2c, stories260k_paths


class CharTokenizer:
    """ids 0 (BOS) and 1 (EOS), then one id per character of ALPHABET."""

    ALPHABET = "abcdefghijklmnopqrstuvwxyz .,!?\n"
    bos_id, eos_id = 0, 1
    vocab_size = 2 + len(ALPHABET)
    stop_ids = (1,)

    def encode(self, text: str, bos: bool = False) -> list[int]:
        return ([0] if bos else []) + [2 + self.ALPHABET.index(c) for c in text.lower() if c in self.ALPHABET]

    def decode(self, ids) -> str:
        return "".join(self.ALPHABET[i - 2] for i in ids if i >= 2)


@pytest.fixture(scope="module")
def tiny():
    """(model, tokenizer): a random 2-layer GQA model, deterministic weights."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=CharTokenizer.vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, max_seq_len=128)
    model = build_model(cfg, "cpu").eval()
    with torch.no_grad():  # larger logits than init's N(0, 0.02) so sampling is far from uniform
        model.lm_head.weight.mul_(50)
    return model, CharTokenizer()


@pytest.fixture(scope="module")
def stories():
    """(model, tokenizer) of the real pretrained stories260K (llama2.c), or skip."""
    paths = stories260k_paths()
    if paths is None:
        pytest.skip("../shared/datasets/models/stories260K is absent (see INVENTORY.md)")
    model = load_llama2c(paths[0])
    return model, Llama2cTokenizer.load(paths[1], model.config.vocab_size)


@pytest.fixture(params=["tiny", "stories"])
def any_model(request):
    return request.getfixturevalue(request.param)


def full_forward_greedy(model, prompt, n):
    """Reference: recompute the whole sequence every step, no cache."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_equals_argmax_of_full_forward(any_model):
    model, tok = any_model
    prompts = [tok.encode("once upon a time", bos=True), tok.encode("the cat sat", bos=True)]
    engine = Engine(model, tok, n_slots=2)  # no stop ids: exactly n tokens
    got = engine.generate(prompts, SamplingParams(max_tokens=40, temperature=0))
    for p, r in zip(prompts, got):
        assert r.tokens == full_forward_greedy(model, p, 40)
        assert r.finish_reason == "length" and r.text == tok.decode(r.tokens)


def test_stories260k_greedy_text(stories):
    """The documented greedy output of stories260K (llama2.c doc/stories260K.md), through the engine."""
    model, tok = stories
    engine = Engine(model, tok, stop_ids=tok.stop_ids)
    r = engine.generate([[tok.bos_id]], SamplingParams(max_tokens=60, temperature=0))[0]
    assert r.text.startswith("Once upon a time, there was a little girl named Lily. She loved to play outside "
                             "in the park. One day, she saw a big, red ball.")


def sampling_params(i, max_tokens):
    return SamplingParams(max_tokens=max_tokens, temperature=0.9, top_k=20, top_p=0.95, min_p=0.02,
                          repetition_penalty=1.1, frequency_penalty=0.1, seed=100 + i)


def test_batched_equals_one_at_a_time(any_model):
    model, tok = any_model
    texts = ["once", "the dog", "a big red ball", "lily", "hello there", "x"]
    prompts = [tok.encode(t, bos=True) for t in texts]
    params = [sampling_params(i, max_tokens=8 + 5 * i) for i in range(len(texts))]
    single = [Engine(model, tok, n_slots=1).generate([p], [q])[0].tokens for p, q in zip(prompts, params)]
    # 3 slots for 6 prompts of different lengths: requests finish at different steps and waiting ones join
    engine = Engine(model, tok, n_slots=3)
    batched = engine.generate(prompts, params)
    assert [r.tokens for r in batched] == single
    assert all(len(r.tokens) == q.max_tokens for r, q in zip(batched, params))
    assert engine.steps < sum(q.max_tokens for q in params) * 0.6  # they really shared decode steps


def test_requests_joining_mid_flight(any_model):
    """Continuous batching by hand: B arrives while A decodes; C arrives while both run."""
    model, tok = any_model
    prompts = [tok.encode(t, bos=True) for t in ("once upon", "the cat", "we went to the park")]
    params = [sampling_params(i, max_tokens=30) for i in range(3)]
    single = [Engine(model, tok, n_slots=1).generate([p], [q])[0].tokens for p, q in zip(prompts, params)]
    engine = Engine(model, tok, n_slots=4)
    a = engine.submit(prompts[0], params[0])
    for _ in range(5):
        engine.step()
    b = engine.submit(prompts[1], params[1])
    for _ in range(7):
        engine.step()
    c = engine.submit(prompts[2], params[2])
    while engine.step():
        pass
    assert [a.tokens, b.tokens, c.tokens] == single
    assert engine.steps < 30 + 5 + 7 + 5


def test_seed_reproducible_and_seeds_differ(tiny):
    model, tok = tiny
    engine = Engine(model, tok, n_slots=2)
    p = tok.encode("hello", bos=True)
    runs = [engine.generate([p], SamplingParams(max_tokens=30, seed=s))[0].tokens for s in (1, 1, 2)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_stop_strings_and_streaming(stories):
    model, tok = stories
    engine = Engine(model, tok, stop_ids=tok.stop_ids)
    prompt = [tok.bos_id]
    full = engine.generate([prompt], SamplingParams(max_tokens=60, temperature=0))[0].text
    for stop in ("Lily", " park.", "d, s", "\u00e9"):  # a word, a multi-token string, a mid-token cut, absent
        params = SamplingParams(max_tokens=60, temperature=0, stop=(stop, "zzz"))
        r = engine.generate([prompt], params)[0]
        i = full.find(stop)
        assert r.text == (full[:i] if i >= 0 else full)
        assert r.finish_reason == ("stop" if i >= 0 else "length")
        deltas = list(engine.stream(prompt, params))
        assert "".join(deltas) == r.text and len(deltas) > 1 and all(stop not in d for d in deltas)


def test_stop_token_ids_and_ignore_eos(stories):
    model, tok = stories
    engine = Engine(model, tok, stop_ids=tok.stop_ids)
    full = engine.generate([[tok.bos_id]], SamplingParams(max_tokens=40, temperature=0))[0]
    stop_id = full.tokens[10]
    r = engine.generate([[tok.bos_id]], SamplingParams(max_tokens=40, temperature=0, stop_token_ids=(stop_id,)))[0]
    first = full.tokens.index(stop_id)
    assert r.tokens == full.tokens[:first + 1] and r.finish_reason == "stop"
    assert r.text == tok.decode([tok.bos_id] + full.tokens[:first])  # the stop token itself is not text
    eos_engine = Engine(model, tok, stop_ids=(stop_id,))  # the same id as the engine's end-of-text
    assert eos_engine.generate([[tok.bos_id]], SamplingParams(max_tokens=40, temperature=0))[0].tokens == r.tokens
    r = eos_engine.generate([[tok.bos_id]], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0]
    assert r.tokens == full.tokens and r.finish_reason == "length"


def test_length_limit_of_the_cache(tiny):
    model, tok = tiny
    engine = Engine(model, tok, max_len=20)
    r = engine.generate([tok.encode("hello", bos=True)], SamplingParams(max_tokens=100, temperature=0))[0]
    assert r.finish_reason == "length" and len(r.tokens) == 20 - 6 + 1  # 6 prompt ids, the last token is not fed
    with pytest.raises(UserError, match="context"):
        engine.submit(list(range(2, 22)))
    with pytest.raises(UserError, match="empty"):
        engine.submit([])
    with pytest.raises(UserError, match="token ids"):
        engine.submit([10**6])


def test_queue_full_and_cancel(tiny):
    model, tok = tiny
    engine = Engine(model, tok, n_slots=1, max_queue=1)
    a = engine.submit([0, 5], SamplingParams(max_tokens=50))
    b = engine.submit([0, 6], SamplingParams(max_tokens=50))
    with pytest.raises(QueueFull):
        engine.submit([0, 7])
    engine.step()
    a.cancel()
    engine.step()  # frees a's slot, b joins
    assert a.finish_reason == "cancelled" and b.slot == 0 and engine.in_flight() == 1
    b.cancel()
    engine.step()
    assert engine.in_flight() == 0


def test_background_thread_matches_sync_and_timeout(tiny):
    model, tok = tiny
    prompts = [tok.encode(t, bos=True) for t in ("abc", "hello world", "zz")]
    params = [sampling_params(i, max_tokens=25) for i in range(3)]
    expected = [r.tokens for r in Engine(model, tok, n_slots=3).generate(prompts, params)]
    engine = Engine(model, tok, n_slots=2).start()
    try:
        texts = {i: [] for i in range(3)}
        reqs = [engine.submit(p, q, on_event=lambda r, d, i=i: texts[i].append(d)) for i, (p, q) in enumerate(zip(prompts, params))]
        assert all(r.done.wait(30) for r in reqs)
        assert [r.tokens for r in reqs] == expected
        assert ["".join(texts[i]) for i in range(3)] == [r.text for r in reqs]
        slow = engine.submit(prompts[0], SamplingParams(max_tokens=100, timeout_s=1e-9))
        assert slow.done.wait(30) and slow.finish_reason == "timeout"
    finally:
        engine.stop()
    assert engine.thread is None
    with pytest.raises(QueueFull):
        engine.submit(prompts[0])  # stopped engines refuse work


# ---------------------------------------------------------------------------- sampling, by hand

def test_filters_by_hand():
    logits = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    keep = lambda **kw: torch.isfinite(filter_logits(logits, SamplingParams(**kw))).tolist()
    assert keep(top_k=2) == [True, True, False, False, False]
    assert keep(top_p=0.6) == [True, True, False, False, False]  # 0.5 < 0.6, 0.5 + 0.2 >= 0.6
    assert keep(top_p=0.5) == [True, False, False, False, False]
    assert keep(top_p=0.86) == [True, True, True, True, False]
    assert keep(min_p=0.25) == [True, True, True, False, False]  # p >= 0.25 * 0.5
    out = filter_logits(logits, SamplingParams(temperature=2.0))
    assert torch.allclose(out.softmax(-1), torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]).sqrt() / sum(
        math.sqrt(x) for x in (0.5, 0.2, 0.15, 0.1, 0.05)))


def test_penalties_by_hand():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    seen = torch.tensor([True, True, False, False])
    counts = torch.tensor([0.0, 0.0, 0.0, 2.0])
    out = apply_penalties(logits, SamplingParams(repetition_penalty=2.0), seen, counts)
    assert out.tolist() == [1.0, -2.0, 0.5, 1.5]  # ids 0, 1 in the prompt, id 3 generated
    out = apply_penalties(logits, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), seen, counts)
    assert out.tolist() == [2.0, -1.0, 0.5, 3.0 - 0.5 - 0.5]  # only generated tokens count (OpenAI)


def test_holdback():
    assert holdback("hello", ()) == 0
    assert holdback("hello\nUs", ("\nUser:",)) == 3
    assert holdback("hello\n", ("\nUser:", "lo\nX")) == 3
    assert holdback("caf\ufffd", ()) == 1
    assert holdback("abc", ("abc",)) == 0  # a whole stop string is cut by the caller, not held


def test_params_validation():
    for bad in (dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(min_p=2), dict(top_k=-1),
                dict(repetition_penalty=0), dict(presence_penalty=3), dict(stop=("",))):
        with pytest.raises(UserError):
            SamplingParams(**bad)


def test_a_failing_callback_cancels_only_its_request(tiny):
    model, tok = tiny
    engine = Engine(model, tok, n_slots=2)

    def boom(r, delta):
        raise RuntimeError("client gone")

    bad = engine.submit([0, 5, 6], SamplingParams(max_tokens=20, seed=1), on_event=boom)
    good = engine.submit([0, 5, 6], SamplingParams(max_tokens=20, seed=1))
    while engine.step():
        pass
    assert bad.finish_reason == "cancelled" and good.finish_reason == "length" and len(good.tokens) == 20


def test_a_kv_cache_larger_than_memory_is_refused():
    """max_seq_len shapes no weight, so a checkpoint may claim any context: the cache is sized before allocating."""
    model = build_model(GPTConfig(vocab_size=64, n_layer=1, n_head=2, n_kv_head=1, n_embd=16, max_seq_len=2 ** 31 - 1))
    with pytest.raises(UserError, match=r"KV cache for 8 slots x 2147483647 positions needs 1024.0 GiB.*--context"):
        Engine(model, n_slots=8)
    assert Engine(model, n_slots=2, max_len=128).max_len == 128  # serve --context=128
