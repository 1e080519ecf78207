"""Scoring against a fixed-logit bigram model whose log-likelihoods are computed by hand; generation through
the shared engine, with that model behind the GPT interface and with a tiny GPT."""

from __future__ import annotations

import pytest
import torch

from ember.common.errors import UserError
from ember.eval.scoring import EvalLM, cut_at_stop, generate, loglikelihood, rolling_loglikelihood, rolling_windows

from .conftest import ByteTokenizer, close, fixed_lm


def hand(bigram, ids: list[int], start: int) -> float:
    return sum(bigram.logp(ids[i - 1], ids[i]) for i in range(start, len(ids)))


def test_loglikelihood_matches_hand_computation_in_input_order(lm, bigram):
    reqs = [([256, 1, 2, 3], [4, 5]), ([256, 7], [9]), ([256] + list(range(20)), [30, 31, 32])]
    got = loglikelihood(lm, reqs)
    for (ctx, cont), (lp, _) in zip(reqs, got):
        assert close(lp, hand(bigram, ctx + cont, len(ctx)))


def test_greedy_flag(bigram):
    lm = EvalLM(fn=bigram, tokenizer=ByteTokenizer(), max_len=64)
    best = int(bigram.table[65].argmax())
    worst = int(bigram.table[65].argmin())
    (_, g1), (_, g2) = loglikelihood(lm, [([65], [best]), ([65], [worst])])
    assert g1 is True and g2 is False


def test_batching_does_not_change_scores(bigram):
    reqs = [([256] + [i % 250] * (i % 7 + 1), [i % 200, (i * 3) % 200]) for i in range(23)]
    one = EvalLM(fn=bigram, tokenizer=ByteTokenizer(), max_len=64, batch_size=1)
    many = EvalLM(fn=bigram, tokenizer=ByteTokenizer(), max_len=64, batch_size=8)
    a, b = loglikelihood(one, reqs), loglikelihood(many, reqs)
    assert all(close(x[0], y[0], 1e-5) for x, y in zip(a, b))
    assert bigram.calls == 23 + 3


def test_long_context_is_truncated_from_the_left(bigram):
    lm = EvalLM(fn=bigram, tokenizer=ByteTokenizer(), max_len=8)
    ctx, cont = list(range(1, 30)), [40, 41]
    (lp, _), = loglikelihood(lm, [(ctx, cont)])
    assert close(lp, hand(bigram, ctx + cont, len(ctx)))  # a bigram only needs the previous token
    assert bigram.longest <= 8  # the model never saw more than its context (it would accept any length)


def test_long_continuation_is_scored_in_windows(bigram):
    lm = EvalLM(fn=bigram, tokenizer=ByteTokenizer(), max_len=8, batch_size=3)
    ctx, cont = [256, 5, 6], list(range(10, 40))
    (lp, greedy), (lp2, _) = loglikelihood(lm, [(ctx, cont), (ctx, cont[:4])])
    assert close(lp, hand(bigram, ctx + cont, len(ctx))) and close(lp2, hand(bigram, ctx + cont[:4], len(ctx)))
    assert bigram.longest <= 8
    with pytest.raises(UserError, match="empty context"):
        loglikelihood(lm, [([], [1, 2])])


def test_encode_pair_moves_trailing_space_and_adds_bos(lm):
    ctx, cont = lm.encode_pair("Question: 2+2 ", "4")
    assert ctx == [256] + list(b"Question: 2+2") and cont == list(b" 4")
    lm.add_bos = False
    assert lm.encode_pair("Q ", "4") == (list(b"Q"), list(b" 4"))  # no BOS before a context (SmolLM2, Qwen)
    assert lm.encode_pair("", "ab") == ([256], list(b"ab"))  # an empty context is BOS still: lm-eval's prefix token
    lm.tokenizer = type("NoBos", (ByteTokenizer,), {"bos_id": None})()
    assert lm.encode_pair("", "ab") == ([257], list(b"ab"))  # else EOS
    assert lm.encode_pair("Q:\n\t", "4")[1] == list(b"\n\t4")  # all trailing whitespace moves, as lm-eval


def test_text_pairs_and_empty_continuation(lm, bigram):
    (lp, _), = lm.loglikelihood_text([("ab", " c")])
    assert close(lp, hand(bigram, [256, 97, 98, 32, 99], 3))
    with pytest.raises(UserError, match="empty continuation"):
        loglikelihood(lm, [([1], [])])


@pytest.mark.parametrize("n,max_len,stride", [(10, 4, 0), (10, 4, 2), (3, 8, 0), (17, 5, 3)])
def test_rolling_windows_predict_every_token_once_within_context(n, max_len, stride):
    wins = rolling_windows(n, max_len, stride)
    predicted = [p for _, a, b in wins for p in range(a, b)]
    assert predicted == list(range(1, n))
    for s, a, b in wins:
        assert 0 <= s < a and b - 1 - s <= max_len


def test_rolling_loglikelihood_equals_full_sum(bigram):
    lm = EvalLM(fn=bigram, tokenizer=ByteTokenizer(), max_len=6)
    ids = [256] + list(b"hello, world")
    parts = rolling_loglikelihood(lm, ids, stride=4)
    assert sum(t for _, t in parts) == len(ids) - 1
    assert close(sum(lp for lp, _ in parts), hand(bigram, ids, 1))


def test_greedy_generation_follows_argmax_and_stops(bigram):
    lm = fixed_lm(bigram, 64, stop_ids=(256, 257))
    out = generate(lm, "a", max_new_tokens=8)[0]
    expect, prev = [], ord("a")
    for _ in range(8):
        prev = int(bigram.table[prev].argmax())
        if prev in (256, 257):
            break
        expect.append(prev)
    assert out == ByteTokenizer().decode(expect) and len(out) >= 3
    stop = out[2:4]
    assert generate(lm, "a", max_new_tokens=8, stop=(stop,))[0] == out[:out.find(stop)]


def test_sampling_is_seeded_and_batched(bigram):
    lm = fixed_lm(bigram, 64)
    a = generate(lm, "x", max_new_tokens=6, n=4, temperature=1.0, seed=3)
    b = generate(lm, "x", max_new_tokens=6, n=4, temperature=1.0, seed=3)
    assert a == b and len(a) == 4 and len(set(a)) > 1


def test_cut_at_stop():
    assert cut_at_stop("abc\ndef\nclass", ("\nclass", "\ndef")) == "abc"
    assert cut_at_stop("abc", ()) == "abc"


def test_gpt_generation_with_kv_cache_matches_recompute():
    from ember.model.gpt import GPTConfig, build_model
    from ember.eval.scoring import gpt_lm

    torch.manual_seed(0)
    model = build_model(GPTConfig(vocab_size=258, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, max_seq_len=64)).eval()
    with torch.no_grad():  # logits far from uniform, so greedy has no near-ties
        model.lm_head.weight.mul_(30)
    ids = [256] + list(b"hi")
    with torch.no_grad():
        for _ in range(12):  # no cache: the whole sequence every step
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    new = ids[3:]
    new = new[:new.index(257)] if 257 in new else new  # EOS ends the generation, and is not text
    assert generate(gpt_lm(model, ByteTokenizer()), "hi", max_new_tokens=12) == [ByteTokenizer().decode(new)]
    plain = EvalLM(fn=lambda idx: model(idx), tokenizer=ByteTokenizer(), max_len=64)  # no .model to decode with
    with pytest.raises(UserError, match="needs the model"):
        generate(plain, "hi")
