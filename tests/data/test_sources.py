"""Corpus sources: the stdlib corpus, local txt/jsonl/parquet files and folders, HF datasets on local files,
and bad input (invalid UTF-8, malformed JSON lines, missing fields, empty files) skipped with counts or fatal."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ember.common.errors import UserError
from ember.data.documents import make_doc, write_shards
from ember.data.sources import iter_documents, parse_hf_spec, stdlib_root


def collect(spec, **kw):
    stats, errors = {}, []
    docs = list(iter_documents(spec, stats=stats, errors=errors, **kw))
    return docs, stats, errors


# ---------------------------------------------------------------------------- stdlib

@pytest.fixture(scope="module")
def stdlib():
    return collect("stdlib")


def test_stdlib_is_the_library_without_tests(stdlib):
    docs, stats, errors = stdlib
    ids = [d["id"] for d in docs]
    assert len(ids) == len(set(ids)) > 500
    assert "stdlib/json/decoder.py" in ids and "stdlib/asyncio/events.py" in ids
    paths = [d["meta"]["path"] for d in docs]
    assert not [p for p in paths if {"test", "tests", "idle_test", "site-packages"} & set(p.split("/")[:-1])]
    assert "pydoc_data/topics.py" not in [d["meta"]["path"] for d in docs if d["meta"]["kind"] == "code"]
    assert errors == []
    decoder = next(d for d in docs if d["id"] == "stdlib/json/decoder.py")
    assert decoder["text"] == (stdlib_root() / "json" / "decoder.py").read_text("utf-8")
    assert decoder["source"] == "stdlib" and decoder["meta"]["license"] == "PSF-2.0"
    assert dt.datetime.fromisoformat(decoder["meta"]["date"]).year >= 1990


def test_stdlib_has_pydoc_topics(stdlib):
    from pydoc_data.topics import topics

    docs = {d["id"]: d for d in stdlib[0]}
    assert docs["stdlib/pydoc_topics/assert"]["text"] == topics["assert"]
    assert docs["stdlib/pydoc_topics/assert"]["meta"]["kind"] == "docs"


def test_stdlib_order_is_stable_and_spread(stdlib):
    first = [d["id"] for d, _ in zip(iter_documents("stdlib"), range(50))]
    assert first == [d["id"] for d in stdlib[0][:50]]
    assert first != sorted(first)  # not alphabetical: a cap samples the whole library


# ---------------------------------------------------------------------------- local files

def test_txt_file_and_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("second", encoding="utf-8")
    (tmp_path / "sub" / "a.txt").write_text("héllo", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored")
    (tmp_path / ".hidden.txt").write_text("hidden")
    docs, stats, _ = collect(str(tmp_path))
    assert [d["text"] for d in docs] == ["second", "héllo"]  # sorted paths: b.txt < sub/a.txt
    assert docs[0]["id"] == str(tmp_path / "b.txt") and docs[0]["source"] == str(tmp_path)
    assert "date" in docs[0]["meta"]
    assert stats == {"unsupported_file": 1}


def test_jsonl_records_with_metadata(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "one", "url": "http://x", "id": 7, "source": "web", "big": "x" * 999}) + "\n\n"
                 + json.dumps({"body": "two", "text": "2"}) + "\n")
    docs, stats, _ = collect(str(f))
    assert [d["text"] for d in docs] == ["one", "2"]
    assert docs[0]["id"] == f"{f}:1" and docs[1]["id"] == f"{f}:3"
    assert docs[0]["meta"]["url"] == "http://x" and docs[0]["meta"]["id"] == 7 and docs[0]["meta"]["source"] == "web"
    assert "big" not in docs[0]["meta"] and docs[0]["meta"]["line"] == 1
    docs, _, _ = collect(str(f), text_field="body")
    assert [d["text"] for d in docs] == ["two"]


def test_jsonl_record_keeps_its_own_nested_meta(tmp_path):
    """A JSONL of documents with a `meta` object (as curation needs: url, kind) keeps it."""
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "x = 1", "meta": {"url": "http://a.example/p", "kind": "code"}, "date": "2024-01-01"}) + "\n")
    docs, _, _ = collect(str(f))
    assert docs[0]["meta"]["url"] == "http://a.example/p" and docs[0]["meta"]["kind"] == "code"
    assert docs[0]["meta"]["date"] == "2024-01-01" and docs[0]["meta"]["line"] == 1


def test_jsonl_gz(tmp_path):
    f = tmp_path / "d.jsonl.gz"
    with gzip.open(f, "wt", encoding="utf-8") as g:
        g.write('{"text": "zipped"}\n')
    assert [d["text"] for d in collect(str(f))[0]] == ["zipped"]


def test_parquet_plain_and_ember_shards(tmp_path):
    pq.write_table(pa.table({"text": ["a", None, "c"], "lang": ["en", "en", "fr"]}), tmp_path / "p.parquet")
    docs, stats, errors = collect(str(tmp_path / "p.parquet"))
    assert [(d["text"], d["meta"]["lang"], d["meta"]["row"]) for d in docs] == [("a", "en", 1), ("c", "fr", 3)]
    assert stats == {"missing_text": 1} and "p.parquet:row 2" in errors[0]
    # a document shard written by ember keeps its ids, sources and metadata
    write_shards([make_doc("x1", "hello", "stdlib", license="PSF-2.0")], tmp_path / "shards")
    docs, _, _ = collect(str(tmp_path / "shards" / "docs_00000.parquet"))
    assert docs == [make_doc("x1", "hello", "stdlib", license="PSF-2.0")]


def test_parquet_without_text_column_counts_every_row(tmp_path):
    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "p.parquet")
    (tmp_path / "ok.txt").write_text("fine")
    docs, stats, errors = collect(str(tmp_path))
    assert [d["text"] for d in docs] == ["fine"] and stats == {"missing_text": 2}
    assert "no 'text' column (columns: body)" in errors[0]


# ---------------------------------------------------------------------------- bad input

@pytest.fixture
def bad_jsonl(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_bytes(b'{"text": "good one"}\n'
                  b'{"text": "broken\n'                       # line 2: malformed JSON
                  b'{"title": "no text"}\n'                   # line 3: missing field
                  b'{"text": 42}\n'                           # line 4: not a string
                  b'["a", "list"]\n'                          # line 5: not an object
                  b'{"text": "caf\xe9"}\n'                    # line 6: latin-1 byte, invalid UTF-8
                  b'{"text": "   "}\n'                        # line 7: empty text
                  b'{"text": "good two"}\n')
    return f


def test_bad_records_are_skipped_and_counted_with_file_line(bad_jsonl):
    docs, stats, errors = collect(str(bad_jsonl))
    assert [d["text"] for d in docs] == ["good one", "good two"]
    assert stats == {"bad_json": 2, "missing_text": 2, "invalid_utf8": 1, "empty": 1}
    where = [e.split(": ", 1)[0] for e in errors]
    assert where == [f"{bad_jsonl}:{n}" for n in (2, 3, 4, 5, 6)]
    assert "malformed JSON" in errors[0] and "no 'text' field (fields: title)" in errors[1]
    assert "is a int, not a string" in errors[2] and "invalid UTF-8 (byte 0xe9" in errors[4]


def test_bad_record_is_fatal_when_asked(bad_jsonl):
    with pytest.raises(UserError, match=rf"{bad_jsonl}:2: malformed JSON.*on_error=skip"):
        list(iter_documents(str(bad_jsonl), on_error="fail"))


def test_invalid_utf8_txt_names_line_and_column(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"fine\nab\xff\xfecd\n")
    (tmp_path / "b.txt").write_text("ok")
    docs, stats, errors = collect(str(tmp_path))
    assert [d["text"] for d in docs] == ["ok"] and stats == {"invalid_utf8": 1}
    assert errors[0].startswith(f"{tmp_path / 'a.txt'}:2:3: invalid UTF-8 (byte 0xff")
    with pytest.raises(UserError, match=r"a.txt:2:3"):
        list(iter_documents(str(tmp_path), on_error="fail"))


def test_empty_files_and_sources(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match=r"gave no documents \(skipped: none\)"):
        list(iter_documents(str(tmp_path / "empty.jsonl")))
    stats = {}
    with pytest.raises(UserError, match=r"gave no documents \(skipped: \{'empty': 1\}\)"):
        list(iter_documents(str(tmp_path / "empty.txt"), stats=stats))
    assert stats == {"empty": 1}
    with pytest.raises(UserError, match="no such file or folder"):
        list(iter_documents(str(tmp_path / "missing")))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(UserError, match="unsupported file type"):
        list(iter_documents(str(tmp_path / "x.csv")))
    with pytest.raises(UserError, match="on_error"):
        list(iter_documents("stdlib", on_error="ignore"))


def test_corrupt_gzip_and_parquet_are_reported(tmp_path):
    (tmp_path / "a.jsonl.gz").write_bytes(b"not gzip at all")
    (tmp_path / "b.parquet").write_bytes(b"PAR1 nope")
    (tmp_path / "c.txt").write_text("ok")
    docs, stats, errors = collect(str(tmp_path))
    assert [d["text"] for d in docs] == ["ok"] and stats == {"unreadable_file": 2}
    with pytest.raises(UserError, match="a.jsonl.gz"):
        list(iter_documents(str(tmp_path), on_error="fail"))


# ---------------------------------------------------------------------------- Hugging Face datasets

def test_parse_hf_spec():
    assert parse_hf_spec("hf:roneneldan/TinyStories") == ("roneneldan/TinyStories", None, "train")
    assert parse_hf_spec("hf:roneneldan/TinyStories:validation") == ("roneneldan/TinyStories", None, "validation")
    assert parse_hf_spec("hf:wikitext:wikitext-2-raw-v1:test") == ("wikitext", "wikitext-2-raw-v1", "test")
    for bad in ("hf:", "hf:a:b:c:d", "hf:a::b", "hf:x:train[:10]"):
        with pytest.raises(UserError):
            parse_hf_spec(bad)


def test_hf_local_jsonl_file_and_folder(tmp_path):
    pytest.importorskip("datasets")
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "alpha", "label": 1}\n{"other": "x"}\n{"text": "beta", "label": 0}\n')
    docs, stats, errors = collect(f"hf:{f}")
    assert [(d["text"], d["meta"]["label"]) for d in docs] == [("alpha", 1), ("beta", 0)]
    assert docs[0]["source"] == f"hf:{f}" and docs[0]["id"] == f"{f}:train:0"
    assert stats == {"missing_text": 1} and errors[0].startswith(f"hf:{f}#1")
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"text": "t1"}\n{"text": "t2"}\n')
    (folder / "test.jsonl").write_text('{"text": "held"}\n')
    assert [d["text"] for d in collect(f"hf:{folder}")[0]] == ["t1", "t2"]
    assert [d["text"] for d in collect(f"hf:{folder}:test")[0]] == ["held"]
    with pytest.raises(UserError, match="load_dataset failed"):
        list(iter_documents(f"hf:{folder}:nosuchsplit"))


def test_hf_without_datasets_installed(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(UserError, match="needs the `datasets` package"):
        list(iter_documents(f"hf:{tmp_path}"))
