"""Records of an SFT, preference, RL-task or eval data source, each with the place it came from.

    for place, rec in read_records("chat.jsonl", "--data"): ...      # place "chat.jsonl:12" (file line)
    read_records("pairs.parquet", "--data")                          # "pairs.parquet:row 3" (1-based)
    read_records("hf:Anthropic/hh-rlhf", "--data")                   # "hf:Anthropic/hh-rlhf[train]#12" (0-based row)

A spec is a local .jsonl/.jsonl.gz, .json (a list, or {"data": [...]}), .parquet file, a folder of them, or
hf:NAME[[:CONFIG]:SPLIT] (the corpus stage's syntax, so users learn one), streamed through HF `datasets`.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Iterator

from ember.common.errors import UserError
from ember.common.jsonl import read_jsonl

SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")
HF_SYNTAX = "hf:NAME, hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT"
# a local data file named after hf: is read by the `datasets` builder of its format (as the corpus stage does)
_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
_REVISION = re.compile(r"@([0-9a-f]{40})/")  # the commit in resolved hub data-file URLs: hf://datasets/NAME@SHA/...


def is_hf(spec) -> bool:
    return isinstance(spec, str) and spec.startswith("hf:")


def parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """"hf:NAME" / "hf:NAME:SPLIT" / "hf:NAME:CONFIG:SPLIT" -> (name, config, split); split defaults to train.
    NAME is a hub dataset ("HuggingFaceH4/no_robots"), a local folder, or a local data file."""
    if "[" in spec:
        raise UserError(f"'{spec}': split slicing (train[:N]) is not supported with streaming; use the stage's "
                        f"own count setting to cap the records")
    parts = spec[len("hf:"):].split(":")
    if len(parts) > 3 or not all(parts):
        raise UserError(f"'{spec}': write {HF_SYNTAX} (e.g. hf:openai/gsm8k:main:test)")
    return parts[0], parts[1] if len(parts) == 3 else None, parts[-1] if len(parts) > 1 else "train"


def read_records(spec: str | Path, where_name: str = "--data", fix: str = "") -> Iterator[tuple[str, dict]]:
    """(place, record) for every record of `spec`, each record a dict; `place` names it for error messages.

    `where_name` is the setting that took the spec ("--data", "task gsm8k"), named in errors about the
    spec as a whole; `fix` ends the message for a missing file (e.g. the built-in default to fall back on).
    """
    if is_hf(str(spec)):  # also as a Path: eval's harness wraps the PATH of name:PATH in one
        yield from _hf(str(spec), where_name)
        return
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(SUFFIXES))
        if not files:
            raise UserError(f"{where_name} {spec}: no {'/'.join(SUFFIXES)} files in this folder")
        for f in files:
            yield from _file(f, where_name)
        return
    if not path.is_file():
        raise UserError(f"{where_name} {spec}: no such file. Give a {'/'.join(SUFFIXES)} file or a folder of "
                        f"them, or a dataset as {HF_SYNTAX}" + (f"; {fix}" if fix else ""))
    yield from _file(path, where_name)


def _file(path: Path, where_name: str) -> Iterator[tuple[str, dict]]:
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        for line, rec in read_jsonl(path):  # line numbers, per-line UTF-8 and JSON errors, blank lines skipped
            yield f"{path}:{line}", rec
    elif path.name.endswith(".json"):
        yield from _json(path)
    elif path.name.endswith(".parquet"):
        yield from _parquet(path)
    else:
        raise UserError(f"{where_name} {path}: unsupported file type; give a {'/'.join(SUFFIXES)} file, or "
                        f"hf:{path} to read it with the `datasets` builder of its format")


def _object(rec, place: str) -> dict:
    if not isinstance(rec, dict):
        raise UserError(f"{place}: expected a JSON object (a record with named fields), got {str(rec)[:60]!r}")
    return rec


def _json(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save the file as UTF-8") from None
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):  # JSON Lines named .json (common on the hub)
            for line, rec in read_jsonl(path):
                yield f"{path}:{line}", rec
            return
        raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); fix the file or convert it to JSONL") from None
    records = records.get("data", records) if isinstance(records, dict) else records
    if not isinstance(records, list):
        raise UserError(f"{path}: a .json data file must hold a list of records (or {{\"data\": [...]}})")
    for i, rec in enumerate(records):
        yield f"{path}[{i}]", _object(rec, f"{path}[{i}]")


def _parquet(path: Path) -> Iterator[tuple[str, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise UserError(f"{path}: not a readable Parquet file ({e}); check the file or give a .jsonl one") from None
    row = 0
    for batch in pf.iter_batches(batch_size=1024):  # bounded memory: one row group slice at a time
        for rec in batch.to_pylist():
            row += 1
            yield f"{path}:row {row}", rec


# ---------------------------------------------------------------------------- Hugging Face datasets

_HUB_BUILDERS: dict[str, object] = {}  # spec -> builder of a hub dataset, resolved once per process


def _builder(spec: str, where_name: str):
    """The `datasets` builder of an hf: spec. A hub dataset's is kept for the process: the lineage record
    (input_identity) and each read need it, and every resolution asks the hub for the file list of a revision
    that does not change meanwhile. A local one is built afresh: its files may change, and a builder keeps the
    features it inferred from the first read."""
    if spec in _HUB_BUILDERS:
        return _HUB_BUILDERS[spec]
    name, config, split = parse_hf_spec(spec)
    try:
        import datasets
    except ImportError:
        raise UserError(f"{where_name} {spec} needs the `datasets` package: pip install datasets") from None
    local = Path(name).expanduser()
    if local.is_file() and local.suffix in _BUILDERS:
        args, kwargs = (_BUILDERS[local.suffix],), {"data_files": {split: str(local)}}
    else:
        args, kwargs = (name,) + ((config,) if config else ()), {}
    try:
        builder = datasets.load_dataset_builder(*args, **kwargs)
    except Exception as e:  # datasets raises many types: not found, offline, no such config, unreadable files
        raise _load_error(spec, where_name, e) from None
    if not local.exists():
        _HUB_BUILDERS[spec] = builder
    return builder


def _load_error(spec: str, where_name: str, e: Exception) -> UserError:
    return UserError(f"{where_name} {spec}: the dataset cannot be read ({type(e).__name__}: {str(e)[:300]}). "
                     f"Check the name, config and split ({HF_SYNTAX}); without network, use a dataset already in "
                     f"the HF cache with HF_HUB_OFFLINE=1, or a local folder or file as hf:PATH")


def _hf(spec: str, where_name: str) -> Iterator[tuple[str, dict]]:
    name, config, split = parse_hf_spec(spec)
    builder = _builder(spec, where_name)
    prefix = f"hf:{name}" + (f":{config}" if config else "")
    try:
        # streaming: rows arrive as they are read (bounded memory, nothing copied into the HF cache), and a
        # caller that stops early stops the download
        rows = iter(builder.as_streaming_dataset(split=split))
    except Exception as e:  # a bad split: "Bad split: x. Available splits: [...]"
        raise _load_error(spec, where_name, e) from None
    i = 0
    while True:
        try:
            rec = next(rows)
        except StopIteration:
            return
        except Exception as e:  # a file that fails mid-stream (corrupt shard, dropped connection)
            raise UserError(f"{prefix}[{split}]#{i}: reading failed ({type(e).__name__}: {str(e)[:300]})") from None
        yield f"{prefix}[{split}]#{i}", _object(rec, f"{prefix}[{split}]#{i}")
        i += 1


def input_identity(spec: str | Path, where_name: str = "--data") -> str | dict:
    """What artifacts.begin records (and hashes) for a data input: a local path as itself (its bytes are
    hashed there); an hf: dataset as {"path": spec, "dataset", "config", "split", "revision", "fingerprint",
    "sha256"}, where sha256 covers the local files' bytes (hf:PATH) or the hub commit, so an edited file or a
    new hub revision reruns the stage and the same one is a cache hit."""
    if not is_hf(spec):
        return spec
    from ember.common.artifacts import hash_path  # artifacts imports the config and log modules

    name, _, split = parse_hf_spec(spec)
    builder = _builder(spec, where_name)
    files = [str(f) for fs in (builder.config.data_files or {}).values() for f in fs]
    revision = next((m[1] for f in files if (m := _REVISION.search(f))), None)
    local = Path(name).expanduser()
    ident = {"path": spec, "dataset": name, "config": builder.config.name, "split": split, "revision": revision,
             "fingerprint": getattr(builder, "hash", None)}
    # a local folder/file: its content hash (not the builder's fingerprint, which covers mtimes and so changes
    # on a mere touch); a hub dataset: its commit and fingerprint identify the data
    if local.exists():
        blob = json.dumps({"split": split, "config": ident["config"], "content": hash_path(local)}, sort_keys=True)
    else:
        blob = json.dumps(ident, sort_keys=True)
    return {**ident, "sha256": hashlib.sha256(blob.encode()).hexdigest()}
