"""The document format every data stage reads and writes: Parquet shards of (id, text, source, meta).

A document is a plain dict `{"id": str, "text": str, "source": str, "meta": dict}`; in Parquet, `meta`
is stored as a JSON string so shards from different sources share one schema. Shards are named
`docs_00000.parquet, docs_00001.parquet, ...` and each is written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from ember.common import artifacts
from ember.common.errors import UserError

SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("source", pa.string()), ("meta", pa.string())])


def make_doc(id: str, text: str, source: str, **meta) -> dict:
    return {"id": id, "text": text, "source": source, "meta": meta}


def _table(docs: list[dict]) -> pa.Table:
    return pa.table({
        "id": [d["id"] for d in docs],
        "text": [d["text"] for d in docs],
        "source": [d["source"] for d in docs],
        "meta": [json.dumps(d.get("meta") or {}, ensure_ascii=False, sort_keys=True) for d in docs],
    }, schema=SCHEMA)


def write_shard(path: str | Path, docs: list[dict]) -> None:
    with artifacts.atomic_path(path) as tmp:
        pq.write_table(_table(docs), tmp, compression="zstd")


def write_shards(docs: Iterable[dict], folder: str | Path, prefix: str = "docs",
                 max_bytes: int = 64 << 20) -> dict:
    """Write docs into `<folder>/<prefix>_NNNNN.parquet`, starting a new shard every ~max_bytes of text.

    Returns {"shards": n, "documents": n, "bytes": utf-8 bytes of text}.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    buf, size, shards, n_docs, n_bytes = [], 0, 0, 0, 0
    for d in docs:
        b = len(d["text"].encode("utf-8"))
        buf.append(d)
        size += b
        n_docs += 1
        n_bytes += b
        if size >= max_bytes:
            write_shard(folder / f"{prefix}_{shards:05d}.parquet", buf)
            buf, size, shards = [], 0, shards + 1
    if buf or shards == 0:  # always at least one shard, so an empty corpus is visible as such
        write_shard(folder / f"{prefix}_{shards:05d}.parquet", buf)
        shards += 1
    return {"shards": shards, "documents": n_docs, "bytes": n_bytes}


def shard_paths(folder: str | Path, prefix: str = "docs") -> list[Path]:
    folder = Path(folder)
    if folder.is_file():
        return [folder]
    paths = sorted(folder.glob(f"{prefix}_*.parquet"))
    if not paths:
        raise UserError(f"no {prefix}_*.parquet shards in {folder}. Run `ember corpus` (or the stage that "
                        f"writes them) first, or point the config at a folder of document shards.")
    return paths


def read_shard(path: str | Path) -> list[dict]:
    try:
        table = pq.read_table(path, columns=["id", "text", "source", "meta"])
    except (pa.ArrowInvalid, OSError) as e:
        raise UserError(f"{path}: not a readable document shard ({e}). Delete it and rerun the stage "
                        f"that wrote it.") from None
    cols = table.to_pydict()
    return [{"id": i, "text": t, "source": s, "meta": json.loads(m) if m else {}}
            for i, t, s, m in zip(cols["id"], cols["text"], cols["source"], cols["meta"])]


def read_shards(folder: str | Path, prefix: str = "docs") -> Iterator[dict]:
    for p in shard_paths(folder, prefix):
        yield from read_shard(p)
