"""Hashing, MinHash estimates, LSH clustering of planted near-duplicates (recall and precision against exact
Jaccard), and benchmark decontamination with real GSM8K/ARC items when ../shared has them."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from ember.common.errors import UserError
from ember.data.dedup import (EvalIndex, MinHasher, UnionFind, content_hash, eval_items, jaccard, lsh_candidates,
                              near_duplicate_roots, ngram_hashes, set_jaccard, word_hashes)

ASSETS = Path(__file__).parents[1] / "assets" / "curate"
SHARED = Path(__file__).parents[3] / "shared" / "datasets"


def test_ngram_hashes_are_positional_free_and_deterministic():
    g = ngram_hashes(word_hashes("a b c a b c"), 3)
    assert len(g) == 4 and g[0] == g[3] and len(set(g.tolist())) == 3
    assert ngram_hashes(word_hashes("A, b; C!"), 3).tolist() == ngram_hashes(word_hashes("a b c"), 3).tolist()
    # crc32-based: the same in every process and on every run (no Python hash salt)
    assert int(word_hashes("hello")[0]) == 0x3610A686
    assert len(ngram_hashes(word_hashes("a b"), 5)) == 1  # short text: one fingerprint of the whole
    assert len(ngram_hashes(word_hashes("a b"), 5, short=False)) == 0
    assert len(ngram_hashes(word_hashes(""), 5)) == 0


def test_content_hash_ignores_case_and_whitespace():
    assert content_hash("Hello  World\n") == content_hash("hello world")
    assert content_hash("hello world") != content_hash("hello, world")


def test_minhash_estimates_jaccard():
    rng = np.random.default_rng(1)
    base = [f"w{i}" for i in rng.integers(0, 5000, 400)]
    hasher = MinHasher(num_perm=256, ngram=3)
    texts = [" ".join(base)]
    for k in (5, 20, 60, 150):
        w = list(base)
        for p in rng.choice(len(w), k, replace=False):
            w[p] = f"x{p}"
        texts.append(" ".join(w))
    sig = hasher.signatures(texts)
    for i in range(1, len(texts)):
        j = jaccard(texts[0], texts[i], 3)
        est = (sig[0] == sig[i]).mean()
        assert abs(est - j) < 4 * math.sqrt(j * (1 - j) / 256) + 1e-9, (i, j, est)


def test_signatures_batching_and_empty_text():
    hasher = MinHasher(num_perm=64, ngram=2)
    texts = ["one two three four", "", "five six", "one two three four"]
    sig = hasher.signatures(texts)
    assert sig.shape == (4, 64) and sig.dtype == np.uint32
    assert (sig[1] == 0xFFFFFFFF).all() and (sig[0] == sig[3]).all()
    small = hasher.signatures(texts, chunk=8)  # forces one document per group and tiny permutation blocks
    assert (small == sig).all()
    assert (MinHasher(64, 2).signatures(texts) == sig).all()  # same seed, same permutations


def test_union_find_keeps_first_member_as_root():
    uf = UnionFind(5)
    uf.union(3, 4)
    uf.union(4, 1)
    uf.union(2, 2)
    assert uf.roots().tolist() == [0, 1, 2, 1, 1]


def test_lsh_candidates_identical_and_empty():
    sig = MinHasher(32, 2).signatures(["a b c d", "x y z", "a b c d", ""])
    assert lsh_candidates(sig, bands=8).tolist() == [[0, 2]]


def test_set_jaccard_and_shingles():
    hasher = MinHasher(64, 2)
    a, b = hasher.shingles("a b c d e"), hasher.shingles("a b c d x d e")  # {ab bc cd de} vs {ab bc cd dx xd de}
    assert a.dtype == np.uint32 and (np.diff(a.astype(np.int64)) > 0).all()  # sorted, unique
    assert set_jaccard(a, b) == pytest.approx(4 / 6) == pytest.approx(jaccard("a b c d e", "a b c d x d e", 2))
    assert set_jaccard(a[:0], a[:0]) == 1.0


def test_lsh_buckets_give_all_pairs_up_to_a_cap():
    sig = MinHasher(32, 2).signatures(["same words here"] * 5)
    assert len(lsh_candidates(sig, bands=8)) == 10  # all 5*4/2 pairs
    assert lsh_candidates(sig, bands=8, max_bucket=3).tolist() == [[0, 1], [0, 2], [0, 3], [0, 4]]  # a star


def planted_corpus(seed=0):
    """Families: a base text and 1-3 copies with 1-3 substituted words (near-duplicates, J >= ~0.8), plus
    hard negatives with 8-15 substitutions (J ~0.4-0.7), plus unrelated texts."""
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(3000)]

    def mutate(words, k):
        w = list(words)
        for p in rng.choice(len(w), k, replace=False):
            w[p] = vocab[rng.integers(len(vocab))]
        return w

    docs = []
    for f in range(80):
        base = list(rng.choice(vocab, rng.integers(150, 400)))
        docs.append(base)
        if f < 50:
            docs += [mutate(base, rng.integers(1, 4)) for _ in range(rng.integers(1, 4))]
        elif f < 65:
            docs.append(mutate(base, rng.integers(8, 16)))
    return [" ".join(d) for d in docs]


def test_planted_near_duplicates_recall_and_precision():
    texts = planted_corpus()
    n = len(texts)
    hasher = MinHasher(128, 5)
    sets = [hasher.shingles(t) for t in texts]
    exact = {(i, j): set_jaccard(sets[i], sets[j]) for i in range(n) for j in range(i + 1, n)}
    positives = [p for p, j in exact.items() if j >= 0.8]
    assert len(positives) > 150 and sum(0.4 < j < 0.7 for j in exact.values()) >= 10  # the corpus has both kinds
    sig = hasher.sign(sets)

    def measure(similarity):
        roots, pairs, _ = near_duplicate_roots(sig, bands=20, threshold=0.8, similarity=similarity)
        recall = np.mean([roots[i] == roots[j] for i, j in positives])
        merged = [p for p in exact if roots[p[0]] == roots[p[1]]]
        precision = np.mean([exact[p] >= 0.8 for p in merged])  # pairs that ended up in one cluster
        edge_precision = np.mean([exact[tuple(p)] >= 0.8 for p in pairs.tolist()])  # pairs merged on
        assert all(roots[i] <= i for i in range(n))  # each cluster keeps its first document
        assert min(exact[p] for p in merged) >= 0.7  # no hard negative (J < 0.7) ends up in a cluster
        return recall, precision, edge_precision

    # exact verification (what the curate stage does); measured: recall 1.0, precision 0.968, edges 1.0
    recall, precision, edge_precision = measure(lambda p: np.array([set_jaccard(sets[i], sets[j]) for i, j in p]))
    assert recall >= 0.95 and precision >= 0.95 and edge_precision == 1.0
    # signature estimate only; measured: recall 0.989, precision 0.978, edges 0.994
    recall, precision, edge_precision = measure(None)
    assert recall >= 0.95 and precision >= 0.95 and edge_precision >= 0.95


def test_eval_items_formats(tmp_path):
    items = eval_items(ASSETS / "eval_set.jsonl")
    assert len(items) == 3 and "stratosphere" in items[1] and "troposphere" in items[1]
    (tmp_path / "lines.txt").write_text("first line\n\nsecond line\n")
    (tmp_path / "mmlu.csv").write_text("\"What is two plus two?\",three apples,four apples,5,6,B\n")
    assert eval_items(tmp_path / "mmlu.csv") == ["What is two plus two? three apples four apples"]  # no "5", "B"
    assert eval_items(tmp_path / "lines.txt") == ["first line", "second line"]
    assert len(eval_items(tmp_path)) == 3  # a folder: every supported file in it
    (tmp_path / "bad.jsonl").write_text('{"q": "fine"}\n{"q": broken\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2"):
        eval_items(tmp_path / "bad.jsonl")
    with pytest.raises(UserError, match="not found"):
        eval_items(tmp_path / "missing.jsonl")


def test_eval_index_flags_planted_items_only():
    index = EvalIndex([str(ASSETS / "eval_set.jsonl")], ngram=13)
    item = json.loads((ASSETS / "eval_set.jsonl").read_text().splitlines()[0])["question"]
    assert index.match(f"Worksheet 3.\n{item}\nShow your work.") == {"curate/eval_set.jsonl": 18}
    assert index.match("A baker fills jars with jam every Tuesday and eats them all himself.") == {}
    # question and options joined: an n-gram spanning the stem and the choices is found
    assert index.match("of the ozone that absorbs ultraviolet light from the sun: troposphere, stratosphere, mesosphere")
    # n-grams made mostly of numbers are not indexed: counting to 15 is no contamination
    assert index.match(" ".join(str(i) for i in range(1, 20))) == {}


def test_decontamination_with_real_gsm8k_and_arc():
    gsm8k, arc = SHARED / "gsm8k" / "test.jsonl", SHARED / "arc" / "ARC-Challenge-Test.jsonl"
    if not (gsm8k.exists() and arc.exists()):
        pytest.skip("../shared/datasets gsm8k/arc files are absent")
    index = EvalIndex([str(gsm8k), str(arc)], ngram=13)
    g = [json.loads(x) for x in gsm8k.read_text().splitlines()[:50]]
    a = [json.loads(x) for x in arc.read_text().splitlines()[:50]]
    planted = [f"Homework for Monday.\n{r['question']}\nGood luck!" for r in g[::5]]
    planted += [f"Quiz: {r['question']['stem']} " + " ".join(c["text"] for c in r["question"]["choices"])
                for r in a[::5]]
    flagged = [index.match(t) for t in planted]
    arc_long = [len(r["question"]["stem"].split()) + sum(len(c["text"].split()) for c in r["question"]["choices"]) >= 13
                for r in a[::5]]
    assert all(f.get("gsm8k/test.jsonl") for f in flagged[:10])
    assert all(bool(f.get("arc/ARC-Challenge-Test.jsonl")) == long for f, long in zip(flagged[10:], arc_long))
    shakespeare = SHARED / "tinyshakespeare" / "input.txt"
    if shakespeare.exists():  # 200 kB of unrelated text shares no 13-gram with them
        assert index.match(shakespeare.read_text()[:200_000]) == {}
