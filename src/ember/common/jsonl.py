"""JSON Lines, the format of every record file in ember: read with errors that name the file, the line and the
fix; write atomically."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Iterator

from ember.common.errors import UserError


def read_jsonl(path: str | Path, missing: str = "pass a .jsonl or .jsonl.gz file") -> Iterator[tuple[int, dict]]:
    """(line number, record) for each non-blank line of a .jsonl or .jsonl.gz file, each record a JSON object.
    `missing` finishes the error for an absent file: how to point the caller at its data."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file {path} not found: {missing}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:  # bytes, decoded line by line: a bad byte is reported on its own line
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{i}: not UTF-8 text ({e.reason} at column {e.start + 1}); save the file "
                                f"as UTF-8") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{i}: not valid JSON ({e.msg}); each line must be one JSON object "
                                f"(fix or remove the line)") from None
            if not isinstance(rec, dict):
                raise UserError(f"{path}:{i}: expected a JSON object, got {type(rec).__name__}")
            yield i, rec


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    from ember.common.artifacts import write_text  # artifacts imports the config and log modules

    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
