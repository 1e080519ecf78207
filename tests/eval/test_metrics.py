"""BLEU and ROUGE written here agree with the reference implementations (sacrebleu, rouge-score)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from ember.eval.metrics import bleu_stats, corpus_bleu, rouge, tokenize_13a

SENTS = [
    ("The cat sat on the mat.", "The cat is sitting on the mat."),
    ("It costs $3.50, or 3-4 euros (approx.)!", "It costs $3.50 - about 3-4 euros."),
    ("", "An empty hypothesis scores zero."),
    ("a b", "a b c d e f"),
    ("Completely unrelated words here", "Nothing in common at all"),
    ("Don't panic: the answer is 42.", "Do not panic; the answer is forty-two."),
]


def random_corpus(seed: int, n: int = 30):
    rng = random.Random(seed)
    vocab = "the a cat dog sat on mat rug is was big small , . ! 3.5 x-ray don't".split()
    mk = lambda: " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 15)))
    return [(mk(), mk()) for _ in range(n)]


def test_tokenizer_matches_sacrebleu_13a():
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    ref = Tokenizer13a()
    for hyp, r in SENTS + random_corpus(0):
        for s in (hyp, r):
            assert tokenize_13a(s) == ref(s).split()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_corpus_bleu_matches_sacrebleu(seed):
    sacrebleu = pytest.importorskip("sacrebleu")
    pairs = SENTS + random_corpus(seed)
    hyps, refs = [h for h, _ in pairs], [r for _, r in pairs]
    ours = corpus_bleu(np.stack([bleu_stats(h, r) for h, r in pairs]))
    assert ours == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score, abs=1e-9)
    for h, r in pairs[:6]:  # single-segment corpora exercise the smoothing and zero-match paths
        assert corpus_bleu(bleu_stats(h, r)) == pytest.approx(sacrebleu.corpus_bleu([h], [[r]]).score, abs=1e-9)


def test_bleu_by_hand():
    # hyp "a b c d", ref "a b c e": p1 3/4, p2 2/3, p3 1/2, p4 0 -> exp smoothing 1/(2*1); bp 1
    expected = 100 * np.exp(np.mean(np.log([3 / 4, 2 / 3, 1 / 2, 1 / 2])))
    assert corpus_bleu(bleu_stats("a b c d", "a b c e")) == pytest.approx(expected)
    assert corpus_bleu(bleu_stats("a b c d", "a b c d")) == pytest.approx(100.0)


def test_rouge_matches_rouge_score():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    for pred, ref in SENTS + random_corpus(3):
        ref_scores = scorer.score(ref, pred)
        ours = rouge(pred, ref)
        for k in ("rouge1", "rouge2", "rougeL"):
            assert ours[k] == pytest.approx(ref_scores[k].fmeasure, abs=1e-12), (k, pred, ref)


def test_rouge_by_hand():
    # pred "a b c", ref "a c d": unigram overlap 2 -> P = R = 2/3; LCS "a c" = 2 -> same; no shared bigram
    r = rouge("A b c", "a, c d")
    assert r["rouge1"] == pytest.approx(2 / 3) and r["rougeL"] == pytest.approx(2 / 3) and r["rouge2"] == 0.0
