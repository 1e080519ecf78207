"""`ember corpus`: collect documents from sources into Parquet shards `<run>/corpus/docs_*.parquet`.

    ember corpus                                          # the stdlib of this Python (~800 docs, ~12 MB)
    ember corpus --sources=stdlib,data/notes,hf:roneneldan/TinyStories:validation --max_docs=50000
    ember corpus --preset=smoke                           # a few hundred stdlib documents, seconds

Source specs are documented in `ember.data.sources` (stdlib | file or folder | hf:NAME[[:CONFIG]:SPLIT]).
Skipped records (invalid UTF-8, malformed JSON, missing text) are counted per reason in meta.json.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

from ember.common import artifacts
from ember.common.config import require
from ember.common.errors import UserError
from ember.common.log import print0
from ember.data.documents import write_shards
from ember.data.sources import MAX_ERROR_EXAMPLES, iter_documents, parse_hf_spec


@dataclass
class Config:
    run: str = "runs/default"  # run folder; this stage writes <run>/corpus/
    sources: list[str] = field(default_factory=lambda: ["stdlib"])  # comma-separated specs: stdlib, a path, hf:NAME[:SPLIT]
    max_docs: int = 0  # stop after this many documents in total (0 = no cap)
    max_bytes: int = 0  # stop once this many UTF-8 bytes of text are collected (0 = no cap)
    text_field: str = "text"  # field/column holding the text in .jsonl/.parquet/HF records
    on_error: Literal["skip", "fail"] = "skip"  # bad record: skip it (counted in meta.json) or stop with file:line
    shard_bytes: int = 64 << 20  # start a new Parquet shard every ~this many bytes of text

    def __post_init__(self):
        require(len(self.sources) > 0, "sources", self.sources, "at least one source spec, e.g. stdlib")
        require(self.max_docs >= 0, "max_docs", self.max_docs, "0 (no cap) or a positive count")
        require(self.max_bytes >= 0, "max_bytes", self.max_bytes, "0 (no cap) or a positive byte count")
        require(bool(self.text_field), "text_field", self.text_field, "a non-empty field name")
        require(self.shard_bytes > 0, "shard_bytes", self.shard_bytes, "a positive byte count")


PRESETS = {
    "quickstart": lambda: Config(),  # the whole stdlib: ~12 MB of Python and its pydoc topics
    "smoke": lambda: Config(max_docs=150),  # ~2 MB: tokenizer + tokenize take a few seconds
}


def local_inputs(sources: list[str]) -> dict[str, str]:
    """Local paths among the sources, hashed by artifacts.begin so an edited file invalidates the cache: plain
    paths, and the NAME of an hf: source when it is a local file or folder (a hub dataset is not hashed)."""
    local = {f"source{i}": s for i, s in enumerate(sources) if s != "stdlib" and not s.startswith("hf:")}
    for i, s in enumerate(sources):
        if s.startswith("hf:") and Path(name := parse_hf_spec(s)[0]).expanduser().exists():
            local[f"source{i}"] = name
    for s in local.values():
        if not Path(s).expanduser().exists():
            raise UserError(f"source '{s}': no such file or folder. A source is 'stdlib', a path to a .txt/.jsonl/"
                            f".jsonl.gz/.parquet file or a folder of them, or hf:NAME[[:CONFIG]:SPLIT].")
    return local


def capped(docs: Iterator[dict], max_docs: int, max_bytes: int) -> Iterator[dict]:
    """Documents until max_docs, or until the total text reaches max_bytes (the document crossing it included).

    The cap is checked before the next document is pulled, so no source reads (or counts) one too many.
    """
    n, total = 0, 0
    while not ((max_docs and n >= max_docs) or (max_bytes and total >= max_bytes)):
        d = next(docs, None)
        if d is None:
            return
        n += 1
        total += len(d["text"].encode("utf-8"))
        yield d


def main(cfg: Config) -> dict:
    run = artifacts.begin("corpus", cfg, inputs=local_inputs(cfg.sources))
    if run.cached:
        return run.metrics
    stats: dict[str, int] = {}
    errors: list[str] = []
    per_source: dict[str, int] = {}
    dates: list[str] = []

    def stream() -> Iterator[dict]:
        for spec in cfg.sources:
            for d in iter_documents(spec, on_error=cfg.on_error, stats=stats, text_field=cfg.text_field, errors=errors):
                per_source[spec] = per_source.get(spec, 0) + 1
                if isinstance(d["meta"].get("date"), str):
                    dates.append(d["meta"]["date"])
                yield d

    # Old shards are removed first: a rerun with fewer documents must not leave stale ones behind.
    for old in Path(run.dir).glob("docs_*.parquet"):
        old.unlink()
    out = write_shards(capped(iter(stream()), cfg.max_docs, cfg.max_bytes), run.dir, max_bytes=cfg.shard_bytes)
    metrics = {
        **out,
        "per_source": per_source,
        "skipped": dict(sorted(stats.items())),
        "skipped_examples": errors[:MAX_ERROR_EXAMPLES],
        "date_min": min(dates) if dates else None,
        "date_max": max(dates) if dates else None,
    }
    skipped = sum(stats.values())
    print0(f"[corpus] {out['documents']} documents, {out['bytes'] / 1e6:.1f} MB in {out['shards']} shard(s) "
           f"-> {run.dir}" + (f" ({skipped} records skipped: {metrics['skipped']})" if skipped else ""))
    return run.finish(metrics)


if __name__ == "__main__":
    from ember.cli import module_main

    module_main(__name__)
