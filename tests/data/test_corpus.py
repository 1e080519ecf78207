"""`ember corpus`: shards of the stdlib and local sources, caps, skipped-record counts in meta.json,
caching on config + input content, and the CLI."""

from __future__ import annotations

import json

import pytest

from ember import cli
from ember.common import artifacts
from ember.common.errors import UserError
from ember.data import corpus
from ember.data.documents import read_shards, shard_paths


def test_stdlib_capped_by_docs(tmp_path):
    m = corpus.main(corpus.Config(run=str(tmp_path), max_docs=25))
    docs = list(read_shards(tmp_path / "corpus"))
    assert len(docs) == m["documents"] == 25 and m["per_source"] == {"stdlib": 25}
    assert m["bytes"] == sum(len(d["text"].encode()) for d in docs)
    assert m["date_max"] == max(d["meta"]["date"] for d in docs)
    assert artifacts.is_finished(tmp_path / "corpus")


def test_byte_cap_and_shard_size(tmp_path):
    m = corpus.main(corpus.Config(run=str(tmp_path), max_bytes=300_000, shard_bytes=100_000))
    docs = list(read_shards(tmp_path / "corpus"))
    sizes = [len(d["text"].encode()) for d in docs]
    assert sum(sizes[:-1]) < 300_000 <= sum(sizes)  # stops at the document that crosses the cap
    assert m["shards"] == len(shard_paths(tmp_path / "corpus")) >= 2


def test_local_sources_with_bad_records(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_bytes(b'{"text": "one"}\n{oops\n{"txt": "x"}\n{"text": "tw\xffo"}\n{"text": "two"}\n')
    (data / "b.txt").write_text("three")
    run = tmp_path / "run"
    m = corpus.main(corpus.Config(run=str(run), sources=[str(data), "stdlib"], max_docs=5))
    assert m["per_source"] == {str(data): 3, "stdlib": 2}
    assert m["skipped"] == {"bad_json": 1, "invalid_utf8": 1, "missing_text": 1}
    assert [e.split(": ")[0] for e in m["skipped_examples"]] == [f"{data / 'a.jsonl'}:{n}" for n in (2, 3, 4)]
    meta = json.loads((run / "corpus" / "meta.json").read_text())
    assert meta["metrics"]["skipped"] == m["skipped"]  # the counts land in the stage's meta.json
    assert [d["text"] for d in read_shards(run / "corpus")][:3] == ["one", "two", "three"]


def test_fatal_bad_record_leaves_no_finished_stage(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(UserError, match=rf"{bad}:2: malformed JSON"):
        corpus.main(corpus.Config(run=str(tmp_path / "run"), sources=[str(bad)], on_error="fail"))
    assert not artifacts.is_finished(tmp_path / "run" / "corpus")


def test_cache_follows_source_content(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("first version")
    cfg = corpus.Config(run=str(tmp_path / "run"), sources=[str(src)])
    corpus.main(cfg)
    started = artifacts.read_meta(tmp_path / "run" / "corpus")["started"]
    corpus.main(cfg)  # cached
    assert artifacts.read_meta(tmp_path / "run" / "corpus")["started"] == started
    src.write_text("second version, longer")
    assert corpus.main(cfg)["bytes"] == len("second version, longer")


def test_cache_follows_a_local_file_read_through_hf(tmp_path):
    pytest.importorskip("datasets", reason="hf: sources need the datasets package")
    src = tmp_path / "a.jsonl"
    src.write_text('{"text": "one"}\n')
    cfg = corpus.Config(run=str(tmp_path / "run"), sources=[f"hf:{src}"])
    assert corpus.main(cfg)["documents"] == 1
    src.write_text('{"text": "one"}\n{"text": "two"}\n')  # edited: the cached run no longer matches
    assert corpus.main(cfg)["documents"] == 2


def test_cli(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert cli.main(["corpus", "--preset=smoke", f"--run={run}", "--max_docs=3"]) == 0
    assert artifacts.read_meta(tmp_path / "run" / "corpus")["metrics"]["documents"] == 3
    assert cli.main(["corpus", f"--run={run}", "--max_docs=-1"]) == 2
    assert "max_docs" in capsys.readouterr().err
    assert cli.main(["corpus", f"--run={run}", f"--sources={tmp_path / 'missing'}"]) == 2
    assert "no such file or folder" in capsys.readouterr().err
