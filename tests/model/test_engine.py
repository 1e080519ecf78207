"""The generation engine: KV-cached greedy decoding equals argmax of full forward passes, batched and
continuous-batching outputs equal one-at-a-time outputs, stop strings, sampling filters by hand."""

import math

import pytest
import torch

from ember.common.errors import UserError
from ember.model.engine import (BatchParams, Engine, QueueFull, SamplingParams, apply_penalties, filter_logits, generate,
                                holdback, sample)
from ember.model.gpt import GPTConfig, build_model


def full_forward_greedy(model, prompt, n):
    """Reference: recompute the whole sequence every step, no cache."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_equals_argmax_of_full_forward(any_model):
    model, tok = any_model
    prompts = [tok.encode_prompt("once upon a time"), tok.encode_prompt("the cat sat")]
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
    prompts = [tok.encode_prompt(t) for t in texts]
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
    prompts = [tok.encode_prompt(t) for t in ("once upon", "the cat", "we went to the park")]
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
    p = tok.encode_prompt("hello")
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
    r = engine.generate([tok.encode_prompt("hello")], SamplingParams(max_tokens=100, temperature=0))[0]
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
    prompts = [tok.encode_prompt(t) for t in ("abc", "hello world", "zz")]
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

def rows(*params, uniform=None):
    return BatchParams.of(list(params), "cpu", uniform)


def test_filters_by_hand():
    logits = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    keep = lambda **kw: torch.isfinite(filter_logits(logits[None], rows(SamplingParams(**kw))))[0].tolist()
    assert keep(top_k=2) == [True, True, False, False, False]
    assert keep(top_p=0.6) == [True, True, False, False, False]  # 0.5 < 0.6, 0.5 + 0.2 >= 0.6
    assert keep(top_p=0.5) == [True, False, False, False, False]
    assert keep(top_p=0.86) == [True, True, True, True, False]
    assert keep(min_p=0.25) == [True, True, True, False, False]  # p >= 0.25 * 0.5
    out = filter_logits(logits[None], rows(SamplingParams(temperature=2.0)))[0]
    assert torch.allclose(out.softmax(-1), torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]).sqrt() / sum(
        math.sqrt(x) for x in (0.5, 0.2, 0.15, 0.1, 0.05)))
    # per-row settings in one batch: each row is filtered as it would be alone
    params = [SamplingParams(top_k=2), SamplingParams(top_p=0.86), SamplingParams(min_p=0.25), SamplingParams()]
    both = torch.isfinite(filter_logits(logits.expand(4, -1), rows(*params))).tolist()
    assert both == [keep(top_k=2), keep(top_p=0.86), keep(min_p=0.25), [True] * 5]


def test_inverse_cdf_by_hand():
    """The uniform u picks the first token whose cumulative probability (vocabulary order) exceeds u."""
    logits = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    pick = lambda u, **kw: sample(logits[None], rows(SamplingParams(**kw), uniform=[u])).item()
    assert [pick(u) for u in (0.0, 0.49, 0.5, 0.69, 0.7, 0.84, 0.85, 0.949, 0.95, 0.999)] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert pick(0.99, top_k=2) == 1 and pick(0.99, top_k=1) == 0  # filtered tokens get no share of [0, 1)
    assert pick(1.0, top_k=3) == 2  # a u that rounds to 1.0 still lands on a kept token
    assert pick(0.99, temperature=0) == 0  # greedy ignores u


def test_extreme_settings_sample_a_valid_token():
    """fp32 overflow (temperature 1e-30, repetition_penalty 1e-300 -> 0) must not give NaN or a crash."""
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]] * 3)
    seen, counts = torch.tensor([[True, False, False, True]] * 3), torch.zeros(3, 4)
    params = [SamplingParams(temperature=1e-30), SamplingParams(repetition_penalty=1e-300),
              SamplingParams(repetition_penalty=1e-300, top_p=0.5, min_p=0.5)]
    ids = sample(logits, rows(*params, uniform=[0.3, 0.3, 0.9]), seen, counts).tolist()
    # 3e30 wins; ids 0 and 3 overflow to +inf (2 / 0, 3 / 0), capped at the largest float: an even draw between them
    assert ids == [3, 0, 3]


def test_penalties_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([[True, True, False, False]])
    counts = torch.tensor([[0.0, 0.0, 0.0, 2.0]])
    out = apply_penalties(logits, rows(SamplingParams(repetition_penalty=2.0)), seen, counts)
    assert out.tolist() == [[1.0, -2.0, 0.5, 1.5]]  # ids 0, 1 in the prompt, id 3 generated
    out = apply_penalties(logits, rows(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)), seen, counts)
    assert out.tolist() == [[2.0, -1.0, 0.5, 3.0 - 0.5 - 0.5]]  # only generated tokens count (OpenAI)


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


# ---------------------------------------------------------------------------- batched sampling, one-shot, parity

def test_a_request_does_not_depend_on_its_batch_mates(tiny):
    model, tok = tiny
    prompt = tok.encode_prompt("once upon a time")
    mine = SamplingParams(max_tokens=30, temperature=0.8, top_p=0.9, seed=7)
    alone = Engine(model, tok, n_slots=1).generate([prompt], [mine])[0].tokens
    mates = [SamplingParams(max_tokens=12, temperature=0), SamplingParams(max_tokens=40, top_k=3, seed=1),
             SamplingParams(max_tokens=25, temperature=1.3, min_p=0.1, repetition_penalty=1.5, presence_penalty=1.0,
                            seed=2)]
    others = [tok.encode_prompt(t) for t in ("the dog", "hello there friend", "x")]
    for order in ([0, 1, 2, 3], [3, 2, 1, 0]):  # first or last row of the batch
        prompts, params = [prompt] + others, [mine] + mates
        got = Engine(model, tok, n_slots=4).generate([prompts[i] for i in order], [params[i] for i in order])
        assert got[order.index(0)].tokens == alone


def test_one_host_sync_per_step(tiny, monkeypatch):
    """All rows of a step come to the host in one transfer (the per-row sampler made one per row)."""
    model, tok = tiny
    engine = Engine(model, tok, n_slots=4)
    params = [SamplingParams(max_tokens=20, temperature=t, top_k=k, repetition_penalty=r, seed=i)
              for i, (t, k, r) in enumerate([(0, 0, 1.0), (1.0, 5, 1.0), (0.7, 0, 1.3), (1.2, 0, 1.0)])]
    reqs = [engine.submit(tok.encode_prompt(t), q) for t, q in zip(("ab", "cde", "f", "ghij"), params)]
    calls = []
    for name in ("tolist", "item", "cpu", "numpy", "__int__", "__float__", "__bool__", "__index__"):
        orig = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=orig, _n=name, **k: (calls.append(_n), _o(self, *a, **k))[1])
    for _ in range(3):  # the admission step (4 prefills) and two decode steps of 4 rows
        calls.clear()
        assert engine.step()
        assert calls == ["tolist"]
    monkeypatch.undo()
    assert all(len(r.tokens) == 3 for r in reqs)


def test_one_shot_generate_sizes_the_engine_and_restores_the_mode(tiny):
    model, tok = tiny
    prompts = [tok.encode_prompt(t) for t in ("once", "the cat sat on")]
    params = [SamplingParams(max_tokens=10, seed=1), SamplingParams(max_tokens=15, temperature=0)]
    expected = [r.tokens for r in Engine(model, tok, n_slots=2).generate(prompts, params)]
    model.train()
    try:
        got = generate(model, prompts, params, tok, n_slots=1)  # one slot: the second waits for the first
        assert model.training
    finally:
        model.eval()
    assert [r.tokens for r in got] == expected and [r.text for r in got] == [tok.decode(e) for e in expected]
    assert generate(model, [], SamplingParams()) == []
    with pytest.raises(UserError, match="one per prompt"):
        generate(model, prompts, params[:1])
    long = generate(model, [[0] * 120], SamplingParams(max_tokens=50, temperature=0))[0]  # context 128
    assert long.finish_reason == "length" and len(long.tokens) == 128 - 120 + 1


def test_greedy_equals_transformers_generate(tmp_path):
    """Prompts of different lengths decode together in the engine; each equals HF's greedy generate alone."""
    transformers = pytest.importorskip("transformers")
    from ember.model.hf import import_hf

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rms_norm_eps=1e-5, rope_theta=10000.0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # weights large enough that logits are O(1-10): no near-ties for argmax to flip
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.3 * torch.randn(p.shape) if name.endswith("norm.weight") else 0.15 * torch.randn(p.shape))
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    model = import_hf(tmp_path / "hf").eval()
    prompts = [torch.randint(0, 128, (n,)).tolist() for n in (3, 11, 7)]
    got = generate(model, prompts, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True),
                   stop_ids=(cfg.eos_token_id,) if cfg.eos_token_id is not None else ())
    with torch.no_grad():
        for p, r in zip(prompts, got):
            ref = hf.generate(torch.tensor([p]), max_new_tokens=20, min_new_tokens=20, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
            assert r.tokens == ref and r.finish_reason == "length"


def test_dynamic_rope_row_does_not_take_its_batch_mates_base():
    """Dynamic NTK scaling sets the RoPE base from the sequence length: in a batched decode each row must use its
    own length, not the longest row's, or a request's text would depend on who it shares the batch with."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=40, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, max_seq_len=128,
                    rope_scaling="dynamic", rope_factor=2.0, rope_original_max=16)
    model = build_model(cfg, "cpu").eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    short, long = list(range(2, 21)), [3 + i % 30 for i in range(52)]  # 19 and 52 tokens: past orig = 16
    greedy = SamplingParams(max_tokens=12, temperature=0)
    alone = Engine(model, n_slots=1).generate([short], greedy)[0].tokens
    batched = Engine(model, n_slots=2).generate([short, long], greedy)[0].tokens
    assert batched == alone == full_forward_greedy(model, short, 12)
