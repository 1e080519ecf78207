"""Corpus sources: turn a source spec into a stream of documents {"id", "text", "source", "meta"}.

    iter_documents("stdlib")                          # this interpreter's standard library (.py + pydoc topics)
    iter_documents("notes/")                          # every .txt/.jsonl/.jsonl.gz/.parquet below, sorted
    iter_documents("a.jsonl", text_field="body", on_error="fail")
    iter_documents("hf:roneneldan/TinyStories:validation")   # Hugging Face `datasets.load_dataset`, streamed

Bad records (invalid UTF-8, malformed JSON lines, missing text fields) are skipped and counted in
`stats[reason]`, or raise a UserError naming file:line when on_error="fail". Empty documents are always
skipped (counted as "empty"); a source that yields no document at all is an error.
"""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import json
import os
import platform
import sysconfig
from pathlib import Path
from typing import Iterator

from ember.common.errors import UserError
from ember.common.records import parse_hf_spec  # noqa: F401  (one hf: syntax for every reader; corpus imports it from here)
from ember.common.log import print0
from ember.data.documents import make_doc

FILE_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
# Folders of the stdlib that are not the library itself: test suites (the issue asks to leave them out)
# and third-party packages installed beside it (not PSF-licensed, not stdlib).
STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
META_MAX_CHARS = 256  # scalar fields of a record longer than this are not copied into meta
MAX_ERROR_EXAMPLES = 20  # messages kept in `errors` (counts in `stats` are complete)


def iter_documents(spec: str, *, on_error: str = "skip", stats: dict | None = None, text_field: str = "text",
                   errors: list | None = None) -> Iterator[dict]:
    """Documents of one source spec: "stdlib", a local file or folder, or "hf:NAME[[:CONFIG]:SPLIT]".

    `stats` (if given) is incremented per skipped record reason: invalid_utf8, bad_json, missing_text,
    empty, unreadable_file, unsupported_file. `errors` (if given) collects the first messages (file:line).
    """
    if on_error not in ("skip", "fail"):
        raise UserError(f"on_error={on_error!r} is not allowed: use 'skip' or 'fail'")
    sink = _Sink(on_error, stats if stats is not None else {}, errors if errors is not None else [])
    if spec == "stdlib":
        gen = _stdlib(sink)
    elif spec.startswith("hf:"):
        gen = _hf(spec, sink, text_field)
    else:
        gen = _local(spec, sink, text_field)
    n = 0
    for doc, where in gen:
        if not doc["text"].strip():
            sink.skip("empty", where, "empty document (no text)", fatal=False)
            continue
        n += 1
        yield doc
    if n == 0:
        skipped = {k: v for k, v in sink.local.items() if v}
        raise UserError(f"source '{spec}' gave no documents (skipped: {skipped or 'none'}). Check that it is "
                        f"the right path/name, that records carry a '{text_field}' field, and the messages above.")


class _Sink:
    """Where skipped records go: counted (and a few messages kept and printed), or fatal."""

    def __init__(self, on_error: str, stats: dict, errors: list):
        self.on_error, self.stats, self.errors, self.local = on_error, stats, errors, {}

    def skip(self, reason: str, where: str, msg: str, fatal: bool = True, count: int = 1) -> None:
        if fatal and self.on_error == "fail":
            raise UserError(f"{where}: {msg}. Fix or remove the record, or set on_error=skip to skip bad records.")
        self.stats[reason] = self.stats.get(reason, 0) + count
        self.local[reason] = self.local.get(reason, 0) + count
        if fatal and len(self.errors) < MAX_ERROR_EXAMPLES:
            self.errors.append(f"{where}: {msg}")
            print0(f"[sources] skipped {where}: {msg}")


def _doc(id: str, text: str, source: str, meta: dict) -> dict:
    # meta may hold a record's own "id"/"source"/"text"-like keys, so it is not passed as **kwargs
    return {**make_doc(id, text, source), "meta": meta}


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="seconds")


def _scalar_meta(rec: dict, skip: str) -> dict:
    """A record's own `meta` object (e.g. url, kind) plus its short scalar fields (url, date, license,
    title...) travel along as metadata; scalar fields win on a name clash."""
    own = rec.get("meta") if isinstance(rec.get("meta"), dict) else {}
    return {**own, **{k: v for k, v in rec.items() if k != skip and isinstance(v, (str, int, float, bool))
                      and not (isinstance(v, str) and len(v) > META_MAX_CHARS)}}


def _decode(data: bytes, where: str, sink: _Sink, whole_file: bool) -> str | None:
    """UTF-8 text, or None after reporting the first bad byte (as file:line:column for a whole file)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        if whole_file:
            line = data.count(b"\n", 0, e.start) + 1
            where = f"{where}:{line}:{e.start - line_start + 1}"
        sink.skip("invalid_utf8", where, f"invalid UTF-8 (byte 0x{data[e.start]:02x} at byte {e.start - line_start + 1} "
                                         f"of the line); re-encode the file as UTF-8")
        return None


def _read_text(path: Path, sink: _Sink) -> str | None:
    """A whole file as UTF-8 text, or None after reporting why not."""
    try:
        data = path.read_bytes()
    except OSError as e:
        sink.skip("unreadable_file", str(path), f"cannot read ({e.strerror})")
        return None
    return _decode(data, str(path), sink, whole_file=True)


# ---------------------------------------------------------------------------- the standard library

def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib(sink: _Sink) -> Iterator[tuple[dict, str]]:
    """Every .py file of the stdlib (test folders and site-packages excluded) and every pydoc topic.

    Documents come in the order of a hash of their id: a stable order that makes a max_docs cap take a
    spread sample of the library instead of its alphabetically first modules.
    """
    root = stdlib_root()
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_SKIP_DIRS and not d.startswith("."))
        files += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    # pydoc_data/topics.py is one big dict of help texts: its topics become documents of their own.
    files = [f for f in files if f.relative_to(root).as_posix() != "pydoc_data/topics.py"]
    try:
        from pydoc_data import topics as pydoc_topics
        topics, topics_mtime = pydoc_topics.topics, Path(pydoc_topics.__file__).stat().st_mtime
    except ImportError:  # some distributions strip pydoc_data
        topics, topics_mtime = {}, 0.0
    entries = [(f"stdlib/{f.relative_to(root).as_posix()}", f) for f in files]
    entries += [(f"stdlib/pydoc_topics/{name}", name) for name in topics]
    # salted: the train/val split hashes the bare id, and a cap must not select by that same hash
    entries.sort(key=lambda e: hashlib.sha256(b"stdlib-order:" + e[0].encode()).hexdigest())
    base = {"license": "PSF-2.0", "python": platform.python_version()}
    for doc_id, what in entries:
        if isinstance(what, Path):
            text = _read_text(what, sink)
            if text is None:
                continue
            meta = {**base, "kind": "code", "path": doc_id[len("stdlib/"):], "date": _iso(what.stat().st_mtime)}
        else:
            text = topics[what]
            meta = {**base, "kind": "docs", "title": what, "path": "pydoc_data/topics.py", "date": _iso(topics_mtime)}
        yield _doc(doc_id, text, "stdlib", meta), doc_id


# ---------------------------------------------------------------------------- local files and folders

def _local(spec: str, sink: _Sink, text_field: str) -> Iterator[tuple[dict, str]]:
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"source '{spec}': no such file or folder. Give 'stdlib', a path to a "
                        f"{'/'.join(FILE_SUFFIXES)} file or a folder of them, or 'hf:NAME[:SPLIT]'.")
    if path.is_file():
        if not path.name.endswith(FILE_SUFFIXES):
            raise UserError(f"source '{spec}': unsupported file type; supported: {', '.join(FILE_SUFFIXES)}")
        yield from _file(path, spec, sink, text_field)
        return
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        if any(part.startswith(".") for part in f.relative_to(path).parts):
            continue  # hidden files and folders (.git, editor temp files)
        if not f.name.endswith(FILE_SUFFIXES):
            sink.skip("unsupported_file", str(f), f"not one of {', '.join(FILE_SUFFIXES)}; ignored", fatal=False)
            continue
        yield from _file(f, spec, sink, text_field)


def _file(path: Path, source: str, sink: _Sink, text_field: str) -> Iterator[tuple[dict, str]]:
    """Documents of one file, with ids "<file path>" (.txt) or "<file path>:<line or row>"."""
    name = path.name
    if name.endswith(".txt"):
        text = _read_text(path, sink)
        if text is not None:
            yield _doc(str(path), text, source, {"path": str(path), "date": _iso(path.stat().st_mtime)}), str(path)
    elif name.endswith((".jsonl", ".jsonl.gz")):
        yield from _jsonl(path, source, sink, text_field)
    else:
        yield from _parquet(path, source, sink, text_field)


def _jsonl(path: Path, source: str, sink: _Sink, text_field: str) -> Iterator[tuple[dict, str]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                where = f"{path}:{lineno}"
                if not raw.strip():
                    continue  # blank lines are not records
                line = _decode(raw, where, sink, whole_file=False)
                if line is None:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    sink.skip("bad_json", where, f"malformed JSON ({e.msg} at column {e.colno})")
                    continue
                text = _record_text(rec, text_field, where, sink)
                if text is not None:
                    meta = {**_scalar_meta(rec, text_field), "path": str(path), "line": lineno}
                    yield _doc(f"{path}:{lineno}", text, source, meta), where
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        sink.skip("unreadable_file", str(path), f"cannot read ({e})")


def _record_text(rec, text_field: str, where: str, sink: _Sink) -> str | None:
    if not isinstance(rec, dict):
        sink.skip("bad_json", where, f"a JSON {type(rec).__name__}, not an object with a '{text_field}' field")
        return None
    text = rec.get(text_field)
    if text is None:
        fields = ", ".join(list(rec)[:8]) or "none"
        sink.skip("missing_text", where, f"no '{text_field}' field (fields: {fields}); set text_field to the right one")
        return None
    if not isinstance(text, str):
        sink.skip("missing_text", where, f"field '{text_field}' is a {type(text).__name__}, not a string")
        return None
    return text


def _parquet(path: Path, source: str, sink: _Sink, text_field: str) -> Iterator[tuple[dict, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        sink.skip("unreadable_file", str(path), f"not a readable Parquet file ({e})")
        return
    names = set(pf.schema_arrow.names)
    if text_field not in names:  # every row lacks the text: one message, all rows counted
        sink.skip("missing_text", str(path), f"no '{text_field}' column (columns: {', '.join(sorted(names))}); "
                  f"set text_field to the right one", count=pf.metadata.num_rows)
        return
    ours = {"id", "source", "meta"} <= names  # a document shard written by ember: keep its ids and metadata
    row = 0
    for batch in pf.iter_batches(batch_size=1024):
        for rec in batch.to_pylist():
            row += 1
            where = f"{path}:row {row}"
            text = _record_text(rec, text_field, where, sink)
            if text is None:
                continue
            if ours:
                meta = json.loads(rec["meta"]) if rec["meta"] else {}
                yield _doc(rec["id"], text, rec["source"], meta), where
            else:
                meta = {**_scalar_meta(rec, text_field), "path": str(path), "row": row}
                yield _doc(f"{path}:{row}", text, source, meta), where


# ---------------------------------------------------------------------------- Hugging Face datasets

_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def _hf(spec: str, sink: _Sink, text_field: str) -> Iterator[tuple[dict, str]]:
    name, config, split = parse_hf_spec(spec)
    try:
        import datasets
    except ImportError:
        raise UserError(f"source '{spec}' needs the `datasets` package: pip install 'ember[dev]' "
                        f"(or pip install datasets)") from None
    suffix = "".join(Path(name).suffixes[-1:])
    if Path(name).is_file() and suffix in _BUILDERS:
        args, kwargs = (_BUILDERS[suffix],), {"data_files": {split: name}}
    else:
        args, kwargs = (name,) + ((config,) if config else ()), {}
    try:
        # streaming: rows arrive as they are read, nothing is copied into the HF cache, and a max_docs
        # cap stops the download early.
        ds = datasets.load_dataset(*args, split=split, streaming=True, **kwargs)
        rows = iter(ds)
        i = 0
        while True:
            try:
                rec = next(rows)
            except StopIteration:
                break
            where = f"{spec}#{i}"
            text = _record_text(rec, text_field, where, sink)
            if text is not None:
                meta = {**_scalar_meta(rec, text_field), "dataset": name, "split": split, "row": i}
                yield _doc(f"{name}:{split}:{i}", text, spec, meta), where
            i += 1
    except UserError:
        raise
    except Exception as e:  # datasets raises many types (not found, no network, bad split, bad file)
        raise UserError(f"source '{spec}': datasets.load_dataset failed: {type(e).__name__}: {e}") from None
