"""Contamination: n-gram overlap between eval items and training text, by hand."""

from __future__ import annotations

from ember.data.documents import make_doc, write_shards
from ember.eval import contamination as C


def test_overlap_finds_items_sharing_an_ngram():
    sets = {"t": [("1", "the quick brown fox jumps over the lazy dog near the river bank today"),
                  ("2", "completely different words that never appear in any training text anywhere at all")]}
    train = ["Once upon a time THE QUICK brown fox, jumps over the lazy dog! near the river bank today. The end."]
    out = C.overlap(sets, train, n=8)["t"]
    assert out["dirty"] == 1 and out["dirty_ids"] == ["1"] and out["dirty_frac"] == 0.5
    assert C.overlap(sets, ["the quick brown fox jumps over"], n=8)["t"]["dirty"] == 0  # only 6 shared words


def test_every_dirty_id_is_returned():
    """The harness drops all of them from the clean-only score (it lists at most MAX_DIRTY_IDS in results.json)."""
    sets = {"t": [(str(i), f"item {i} asks about the value of the variable named x{i} in this program") for i in range(1500)]}
    out = C.overlap(sets, [text for _, text in sets["t"]], n=8)["t"]
    assert out["dirty"] == 1500 and len(out["dirty_ids"]) == 1500


def test_short_items_match_whole_and_tiny_items_are_unchecked():
    sets = {"t": [("a", "one two three four five six seven eight nine"), ("b", "yes or no")]}
    out = C.overlap(sets, ["zero one two three four five six seven eight nine ten", "yes or no"], n=13)["t"]
    assert out["dirty_ids"] == ["a"] and out["unchecked"] == 1


def test_training_sources_from_lineage_and_val_split_excluded(tmp_path):
    docs = [make_doc(f"d{i}", f"document number {i} with some words in it", "src") for i in range(40)]
    write_shards(docs, tmp_path / "curate")
    sft = tmp_path / "sft.jsonl"
    sft.write_text('{"messages": [{"role": "user", "content": "hello there"}]}\n')
    metas = [{"stage": "corpus", "dir": str(tmp_path / "corpus")}, {"stage": "curate", "dir": str(tmp_path / "curate")},
             {"stage": "sft", "dir": str(tmp_path / "sftrun"), "inputs": {"data": {"path": str(sft)}}}]
    src = C.training_sources(metas)
    assert [p.name for p in src] == ["docs_00000.parquet", "sft.jsonl"]  # curate wins over corpus
    texts = list(C.iter_texts(src))
    assert len(texts) == 41 and "hello there" in texts[-1]
    from ember.data.tokenize import is_val
    held = sum(is_val(d["id"], 0.3) for d in docs)
    assert 0 < held < 40 and len(list(C.iter_texts(src, val_fraction=0.3))) == 41 - held
