"""common/records.py: one reader for .jsonl/.json/.parquet files, folders and hf: datasets, with each record's
place. hf: runs on local files and folders only (datasets' packaged builders), with the hub switched off."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ember.common.errors import UserError
from ember.common.records import input_identity, parse_hf_spec, read_records

RECS = [{"prompt": "p1", "answer": "1"}, {"prompt": "p2", "answer": "2"}]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test may reach the hub: a hub name must fail at once, not retry DNS for half a minute."""
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def write_parquet(path, recs):
    pq.write_table(pa.Table.from_pylist(recs), path)
    return path


def test_local_jsonl_json_parquet(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps(RECS[0]) + "\n\n" + json.dumps(RECS[1]) + "\n")
    (tmp_path / "a.json").write_text(json.dumps(RECS))
    (tmp_path / "d.json").write_text(json.dumps({"data": RECS}))
    (tmp_path / "l.json").write_text("".join(json.dumps(r) + "\n" for r in RECS))  # JSON Lines named .json
    write_parquet(tmp_path / "a.parquet", RECS)
    a = tmp_path / "a"
    assert list(read_records(f"{a}.jsonl")) == [(f"{a}.jsonl:1", RECS[0]), (f"{a}.jsonl:3", RECS[1])]  # file lines
    assert list(read_records(f"{a}.json")) == [(f"{a}.json[0]", RECS[0]), (f"{a}.json[1]", RECS[1])]
    assert [r for _, r in read_records(tmp_path / "d.json")] == RECS
    assert [p for p, _ in read_records(tmp_path / "l.json")] == [f"{tmp_path}/l.json:1", f"{tmp_path}/l.json:2"]
    assert list(read_records(f"{a}.parquet")) == [(f"{a}.parquet:row 1", RECS[0]), (f"{a}.parquet:row 2", RECS[1])]
    # a folder: every supported file in it, sorted by name
    assert len(list(read_records(tmp_path))) == 10


def test_bad_local_sources_are_user_errors(tmp_path):
    with pytest.raises(UserError, match=r"--data .*nope.jsonl: no such file.*hf:NAME"):
        list(read_records(tmp_path / "nope.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(UserError, match=r"x.csv: unsupported file type"):
        list(read_records(tmp_path / "x.csv"))
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(UserError, match=r"fake.parquet: not a readable Parquet file"):
        list(read_records(tmp_path / "fake.parquet"))
    (tmp_path / "b.jsonl").write_bytes(b'{"a": 1}\n{"a": \xff}\n')
    with pytest.raises(UserError, match=r"b.jsonl:2: not UTF-8"):  # read_jsonl's per-line errors are kept
        list(read_records(tmp_path / "b.jsonl"))
    (tmp_path / "s.json").write_text('[{"a": 1}, "oops"]')
    with pytest.raises(UserError, match=r"s.json\[1\]: expected a JSON object"):
        list(read_records(tmp_path / "s.json"))
    (tmp_path / "o.json").write_text('{"a": 1')
    with pytest.raises(UserError, match=r"o.json:1: invalid JSON"):
        list(read_records(tmp_path / "o.json"))


def test_hf_spec_syntax_is_the_corpus_one():
    assert parse_hf_spec("hf:HuggingFaceH4/no_robots") == ("HuggingFaceH4/no_robots", None, "train")
    assert parse_hf_spec("hf:Anthropic/hh-rlhf:test") == ("Anthropic/hh-rlhf", None, "test")
    assert parse_hf_spec("hf:openai/gsm8k:main:test") == ("openai/gsm8k", "main", "test")
    for bad in ("hf:", "hf:a:b:c:d", "hf:a::b", "hf:x:train[:10]"):
        with pytest.raises(UserError):
            parse_hf_spec(bad)


def test_hf_local_folder_file_and_splits(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    write_parquet(folder / "train.parquet", RECS)
    write_parquet(folder / "test.parquet", [{"prompt": "held", "answer": "3"}])
    assert list(read_records(f"hf:{folder}")) == [(f"hf:{folder}[train]#0", RECS[0]), (f"hf:{folder}[train]#1", RECS[1])]
    assert [r["prompt"] for _, r in read_records(f"hf:{folder}:test")] == ["held"]
    (tmp_path / "one.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECS))
    assert [r for _, r in read_records(f"hf:{tmp_path / 'one.jsonl'}")] == RECS  # a file, by its format's builder
    with pytest.raises(UserError, match=r"hf:.*ds:nosplit: the dataset cannot be read .*Bad split"):
        list(read_records(f"hf:{folder}:nosplit"))


def test_hf_hub_name_offline_is_a_user_error_at_once():
    with pytest.raises(UserError, match=r"task x hf:nosuchuser/nosuchdataset: the dataset cannot be read.*HF_HUB_OFFLINE"):
        list(read_records("hf:nosuchuser/nosuchdataset", "task x"))


def test_identity_of_an_hf_input(tmp_path):
    """A local file is recorded as its path (artifacts hashes its bytes); an hf: dataset by name, config,
    split and a sha256 that follows the data's content, not its mtime."""
    assert input_identity(str(tmp_path / "a.jsonl")) == str(tmp_path / "a.jsonl")
    folder = tmp_path / "ds"
    folder.mkdir()
    write_parquet(folder / "train.parquet", RECS)
    ident = input_identity(f"hf:{folder}")
    assert ident["path"] == f"hf:{folder}" and ident["dataset"] == str(folder) and ident["split"] == "train"
    assert ident["config"] == "default" and len(ident["sha256"]) == 64
    assert input_identity(f"hf:{folder}:test")["sha256"] != ident["sha256"]  # another split, another input
    other = tmp_path / "ds2"
    other.mkdir()
    write_parquet(other / "train.parquet", RECS[:1])
    assert input_identity(f"hf:{other}")["sha256"] != ident["sha256"]  # other content
