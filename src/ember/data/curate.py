"""`ember curate`: clean, filter, scrub PII, deduplicate and decontaminate documents, losing none silently.

    ember curate                                   # <run>/corpus/ -> <run>/curate/docs_*.parquet
    ember curate --preset=quickstart --run=runs/quickstart
    ember curate --docs=data/shards/ --steps=normalize,pii,exact_dedup,near_dedup --jaccard=0.85

Per-document steps (normalize, language, quality, pii, toxicity, blocklist, optout, decontam; see
data/filters.py) run in the configured order on batches of `batch_docs` documents over all cores; then
exact_dedup and near_dedup (data/dedup.py) see all survivors at once. Output: curated shards, and
`rejects/docs_*.parquet` holding every dropped document with meta `reject_step` and `reject_reason`, so
kept + rejects = input. Restartable: finished batches and shards of a crashed run are not redone.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ember.common import artifacts
from ember.common.config import require
from ember.common.errors import UserError
from ember.common.log import print0, progress
from ember.common.paths import shared_dataset
from ember.data import provenance
from ember.data.dedup import MinHasher, content_hash, near_duplicate_roots, set_jaccard
from ember.data.documents import read_shard, shard_paths, write_shard
from ember.data.filters import GLOBAL_STEPS, PER_DOC_STEPS, STOPWORDS, TextSteps
from ember.data.pii import KINDS as PII_KINDS

ALL_STEPS = PER_DOC_STEPS + GLOBAL_STEPS


@dataclass
class Config:
    run: str = "runs/default"  # run folder; this stage writes <run>/curate/
    docs: str = ""  # input: a folder of docs_*.parquet, or a source spec (stdlib, a path, hf:NAME); empty = <run>/corpus/
    steps: list[str] = field(default_factory=lambda: ["normalize", "language", "quality", "pii", "exact_dedup", "near_dedup"])  # in order; per-document steps, then exact_dedup/near_dedup last
    workers: int = 0  # processes for the per-document steps; 0 = every core this process may use
    batch_docs: int = 64  # documents per work unit: the grain of parallelism and of restart after a crash
    # normalize
    unicode_form: Literal["NFC", "NFKC", "none"] = "NFC"  # NFC keeps characters as written; NFKC also folds ligatures, full-width forms
    # language: script of letters, then stop words (prose only; code has no stop words)
    scripts: list[str] = field(default_factory=lambda: ["Latin"])  # allowed writing systems (Unicode script names: Latin, Cyrillic, Han, ...)
    min_script_frac: float = 0.8  # drop if a smaller fraction of the letters is in an allowed script
    languages: list[str] = field(default_factory=lambda: ["en"])  # prose must show stop words of one of these (en de fr es it pt nl)
    min_stopwords: int = 2  # Gopher: at least 2 of the 8 stop words (the, be, to, of, and, that, have, with); 0 = skip
    # quality, prose: Gopher rules (Rae et al. 2021, arXiv:2112.11446, App. A.1.1); values are the paper's
    min_words: int = 50  # Gopher: 50 to 100,000 words
    max_words: int = 100_000  # Gopher
    min_mean_word_len: float = 3.0  # Gopher: mean word length 3 to 10 characters
    max_mean_word_len: float = 10.0  # Gopher
    max_symbol_ratio: float = 0.1  # Gopher: # per word, and ellipses per word, each at most this
    max_bullet_lines: float = 0.9  # Gopher: fraction of lines starting with a bullet
    max_ellipsis_lines: float = 0.3  # Gopher: fraction of lines ending in an ellipsis
    min_alpha_words: float = 0.8  # Gopher: fraction of words with at least one letter
    max_dup_lines: float = 0.3  # Gopher: fraction of lines (and of paragraphs) repeating an earlier one
    max_dup_line_chars: float = 0.2  # Gopher: fraction of characters in repeated lines (and paragraphs)
    max_top_ngram: list[float] = field(default_factory=lambda: [0.20, 0.18, 0.16])  # Gopher: chars in the most frequent 2-, 3-, 4-gram
    max_dup_ngram: list[float] = field(default_factory=lambda: [0.15, 0.14, 0.13, 0.12, 0.11, 0.10])  # Gopher: chars in repeated 5..10-grams
    c4_lines: bool = False  # C4 (Raffel et al. 2020): keep only lines with >= 3 words ending in punctuation, pages with >= 5 sentences; for web pages, not books
    # quality, code (documents whose meta kind/lang or path says code): Codex (Chen et al. 2021, arXiv:2107.03374)
    max_line_len: int = 1000  # Codex: drop files with a line longer than this (characters)
    max_mean_line_len: float = 100.0  # Codex: drop files whose mean line is longer (characters)
    min_alnum_frac: float = 0.25  # StarCoder: drop files with a smaller fraction of alphanumeric characters
    drop_generated: bool = True  # Codex: drop files whose first 5 lines say they were generated (tables, parsers)
    # pii, toxicity, source lists
    pii: list[str] = field(default_factory=lambda: list(PII_KINDS))  # kinds to replace: email phone ip credit_card secret
    toxic_words: str = ""  # word/phrase list, one per line (e.g. LDNOOBW en); needed by the toxicity step
    max_toxic_frac: float = 0.01  # drop if listed terms per word exceed this (0 = any listed term drops, as in C4)
    blocklist: str = ""  # domains / URL prefixes / sources, one per line; documents from them are dropped
    optout: str = ""  # sources whose owners opted out (same matching as blocklist); needed by the optout step
    # dedup
    minhash_ngram: int = 5  # words per shingle for near-dedup
    minhash_perms: int = 128  # MinHash permutations per signature (more: sharper LSH, more time and memory)
    lsh_bands: int = 20  # LSH bands (rows = perms // bands); 20x6 makes 99.8% of pairs at J=0.8 candidates (then verified exactly)
    jaccard: float = 0.8  # near-duplicate threshold on word-shingle Jaccard similarity
    # decontamination
    eval_sets: list[str] = field(default_factory=list)  # evaluation files/folders (.jsonl .json .csv .txt, .gz ok)
    decontam_ngram: int = 13  # words per n-gram shared with an eval set (GPT-3, Brown et al. 2020, App. C)
    decontam_action: Literal["drop", "flag"] = "drop"  # drop contaminated documents, or keep them with meta["contaminated"]

    def __post_init__(self):
        for s in self.steps:
            require(s in ALL_STEPS, "steps", self.steps, f"steps from {', '.join(ALL_STEPS)}")
        require(len(set(self.steps)) == len(self.steps), "steps", self.steps, "each step at most once")
        per_doc = [s for s in self.steps if s in PER_DOC_STEPS]
        require(self.steps[:len(per_doc)] == per_doc, "steps", self.steps,
                "per-document steps first, then exact_dedup / near_dedup (they need every document at once)")
        for step, path, what in (("toxicity", self.toxic_words, "toxic_words"), ("blocklist", self.blocklist, "blocklist"),
                                 ("optout", self.optout, "optout")):
            require(step not in self.steps or bool(path), what, path, f"a file (one entry per line) when steps include '{step}'")
        require("decontam" not in self.steps or bool(self.eval_sets), "eval_sets", self.eval_sets,
                "at least one evaluation file when steps include 'decontam'")
        require(self.workers >= 0, "workers", self.workers, "0 (all cores) or a positive count")
        require(self.batch_docs >= 1, "batch_docs", self.batch_docs, "a positive number of documents")
        require(0 < self.min_script_frac <= 1, "min_script_frac", self.min_script_frac, "a fraction in (0, 1]")
        for lang in self.languages:
            require(lang in STOPWORDS, "languages", self.languages, f"codes from {', '.join(STOPWORDS)}")
        require(0 <= self.min_words <= self.max_words, "min_words", self.min_words, "0 <= min_words <= max_words")
        for kind in self.pii:
            require(kind in PII_KINDS, "pii", self.pii, f"kinds from {', '.join(PII_KINDS)}")
        require(self.max_toxic_frac >= 0, "max_toxic_frac", self.max_toxic_frac, "a fraction >= 0")
        require(self.minhash_ngram >= 1, "minhash_ngram", self.minhash_ngram, "a positive number of words")
        require(1 <= self.lsh_bands <= self.minhash_perms, "lsh_bands", self.lsh_bands, f"1 .. minhash_perms ({self.minhash_perms})")
        require(0 < self.jaccard <= 1, "jaccard", self.jaccard, "a similarity in (0, 1]")
        require(self.decontam_ngram >= 1, "decontam_ngram", self.decontam_ngram, "a positive number of words")


def _code_preset(smoke: bool) -> Config:
    """For the stdlib corpus (Python + pydoc topics): Codex rules on code, Gopher rules on the topics;
    toxicity and decontamination join when the shared word list and benchmarks exist beside the checkout."""
    toxic = shared_dataset("ldnoobw/en")
    evals = [p for p in (shared_dataset("gsm8k/test.jsonl"), shared_dataset("humaneval/HumanEval.jsonl.gz"),
                         shared_dataset("arc/ARC-Challenge-Test.jsonl"), shared_dataset("arc/ARC-Easy-Test.jsonl"))
             if p]
    if not smoke and shared_dataset("mmlu/test"):
        evals.append(shared_dataset("mmlu/test"))
    steps = ["normalize", "language", "quality", "pii"] + (["toxicity"] if toxic else []) \
        + (["decontam"] if evals else []) + ["exact_dedup", "near_dedup"]
    # min_words 20: pydoc topics are short help pages; min_script_frac 0.5: codecs and tests quote other
    # scripts; max_toxic_frac 0.02: LDNOOBW lists "xxx", which code uses as a to-do marker.
    return Config(steps=steps, toxic_words=toxic, eval_sets=evals, min_words=20, min_script_frac=0.5,
                  max_toxic_frac=0.02)


PRESETS: dict[str, Callable[[], Config]] = {
    "quickstart": lambda: _code_preset(smoke=False),
    "smoke": lambda: _code_preset(smoke=True),
}


# ---------------------------------------------------------------------------- inputs

def _input_shards(src: str) -> Iterator[tuple[int, Callable[[], list[dict]]]]:
    """(shard index, loader) per input shard: Parquet shards as they are, any other source spec in groups."""
    p = Path(src)
    if p.is_dir() and list(p.glob("docs_*.parquet")) or (p.is_file() and p.suffix == ".parquet"):
        for i, path in enumerate(shard_paths(p)):
            yield i, (lambda path=path: read_shard(path))
        return
    try:
        from ember.data.sources import iter_documents
    except ImportError:
        shard_paths(p)  # raises the "no shards, run ember corpus" error
        raise
    group, size, i = [], 0, 0
    for d in iter_documents(src):
        group.append(d)
        size += len(d["text"])
        if size >= 64 << 20:  # the same ~64 MB grouping as write_shards
            yield i, (lambda g=group: g)
            group, size, i = [], 0, i + 1
    if group:
        yield i, (lambda g=group: g)


def _file_inputs(cfg: Config, src: str) -> dict[str, str]:
    """Every file the result depends on, so artifacts.begin hashes it (an edited list reruns the stage)."""
    inputs = {"docs": src} if Path(src).exists() else {}
    if "toxicity" in cfg.steps:
        inputs["toxic_words"] = cfg.toxic_words
    if "blocklist" in cfg.steps:
        inputs["blocklist"] = cfg.blocklist
    if "optout" in cfg.steps:
        inputs["optout"] = cfg.optout
    if "decontam" in cfg.steps:
        inputs.update({f"eval_set{i}": p for i, p in enumerate(cfg.eval_sets)})
    return inputs


# ---------------------------------------------------------------------------- per-document steps (workers)

_STATE: dict = {}  # per process: the built steps (word lists, eval index) and the MinHasher


def _init(cfg: Config) -> None:
    """Build the steps (reads word lists and eval sets afresh: they may have changed since the last run)."""
    _STATE.update(cfg=cfg, steps=TextSteps(cfg), hasher=MinHasher(cfg.minhash_perms, cfg.minhash_ngram))


def _work(unit: tuple[int, int, list[dict], str]) -> tuple[int, int]:
    """Run the per-document steps on one batch and write it as a part file (atomic), with its stats."""
    shard, chunk, docs, part = unit
    cfg, steps = _STATE["cfg"], _STATE["steps"]
    stats = provenance.new_stats()
    kept = []
    for d in docs:
        provenance.count_input(stats, d)
        d.setdefault("meta", {}).pop("pii", None)  # counts of an earlier curation (or a record's own field) go
        dropped = steps(d, stats["steps"])
        if dropped:
            d["meta"]["reject_step"], d["meta"]["reject_reason"] = dropped
            provenance.count_reject(stats, d)
        else:
            kept.append(d)
            if "contaminated" in d["meta"]:
                for name in d["meta"]["contaminated"]:
                    stats["flagged"][name] = stats["flagged"].get(name, 0) + 1
    sigs, shingles = {}, {}
    if "near_dedup" in cfg.steps:  # the shingle set is kept too: candidate pairs are verified exactly
        shingles = {id(d): _STATE["hasher"].shingles(d["text"]) for d in kept}
        sigs = dict(zip(shingles, _STATE["hasher"].sign(list(shingles.values()))))
    table = pa.table({
        "id": [d["id"] for d in docs], "text": [d["text"] for d in docs], "source": [d["source"] for d in docs],
        "meta": [json.dumps(d["meta"], ensure_ascii=False, sort_keys=True) for d in docs],
        "dropped": [bool(d["meta"].get("reject_step")) for d in docs],
        "hash": [None if d["meta"].get("reject_step") else content_hash(d["text"]) for d in docs],
        "sig": [sigs[id(d)].tobytes() if id(d) in sigs else None for d in docs],
        "shingles": [shingles[id(d)].tobytes() if id(d) in shingles else None for d in docs],
        "bytes": [len(d["text"].encode("utf-8")) for d in docs],
    }).replace_schema_metadata({"stats": json.dumps(stats)})
    with artifacts.atomic_path(part) as tmp:
        pq.write_table(table, tmp)
    return shard, chunk


def _run_batches(cfg: Config, src: str, work: Path) -> list[int]:
    """Phase 1: per-document steps over all batches; returns the input shard indices. Skips finished work."""
    nproc = cfg.workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    _init(cfg)  # built once here; forked workers inherit it (word lists, eval index) without rebuilding
    pool = None
    if nproc > 1:
        if "fork" in mp.get_all_start_methods():
            pool = mp.get_context("fork").Pool(nproc)
        else:  # spawned workers start empty and build their own
            pool = mp.get_context("spawn").Pool(nproc, initializer=_init, initargs=(cfg,))
    shards = []
    try:
        for i, load in _input_shards(src):
            shards.append(i)
            manifest = work / f"shard_{i:05d}.json"
            if manifest.exists():
                continue  # this shard's batches all finished in an earlier (interrupted) run
            docs = load()
            chunks = [docs[k:k + cfg.batch_docs] for k in range(0, len(docs), cfg.batch_docs)] or [[]]
            todo = [(i, c, chunk, str(work / f"part_{i:05d}_{c:05d}.parquet")) for c, chunk in enumerate(chunks)]
            todo = [u for u in todo if not Path(u[3]).exists()]
            results = pool.imap_unordered(_work, todo) if pool else map(_work, todo)
            for _ in progress(results, total=len(todo), desc=f"[curate] shard {i}", unit="batch"):
                pass
            artifacts.write_json(manifest, {"chunks": len(chunks), "docs": len(docs)})
    except BaseException:
        if pool is not None:
            pool.terminate()  # a failed batch or Ctrl-C: stop the others now; finished parts stay for the rerun
        raise
    if pool is not None:
        pool.close()
        pool.join()
    return shards


def _parts(work: Path, shard: int) -> list[Path]:
    n = artifacts.read_json(work / f"shard_{shard:05d}.json")["chunks"]
    return [work / f"part_{shard:05d}_{c:05d}.parquet" for c in range(n)]


# ---------------------------------------------------------------------------- global steps

def _dedup(cfg: Config, work: Path, shards: list[int], stats: dict) -> tuple[dict, dict]:
    """Phase 2: exact then near dedup over every document the per-document steps kept.

    Survivors are numbered in input order; returns ({survivor number: (step, reason)} to drop,
    {shard: number of its first survivor}). The first document of a duplicate cluster is the one kept.
    """
    ids, hashes, nbytes, sigs, starts = [], [], [], [], {}
    for shard in shards:
        starts[shard] = len(ids)
        for part in _parts(work, shard):
            t = pq.read_table(part, columns=["id", "dropped", "hash", "sig", "bytes"]).to_pydict()
            for i in (i for i, gone in enumerate(t["dropped"]) if not gone):
                ids.append(t["id"][i])
                hashes.append(t["hash"][i])
                nbytes.append(t["bytes"][i])
                sigs.append(t["sig"][i])
    drop: dict[int, tuple[str, str]] = {}
    alive = list(range(len(ids)))
    if "exact_dedup" in cfg.steps:
        first: dict[str, int] = {}
        for k in alive:
            j = first.setdefault(hashes[k], k)
            if j != k:
                drop[k] = ("exact_dedup", f"exact_duplicate: same normalized text as {ids[j]}")
        stats["clusters"]["exact"] = provenance.cluster_stats(alive, [first[hashes[k]] for k in alive], ids)
        stats["steps"]["exact_dedup"] = _step_counts(alive, nbytes, drop)
        alive = [k for k in alive if k not in drop]
    if "near_dedup" in cfg.steps and alive:
        sig = np.frombuffer(b"".join(sigs[k] for k in alive), np.uint32).reshape(len(alive), cfg.minhash_perms)
        roots, pairs, sim = near_duplicate_roots(sig, cfg.lsh_bands, cfg.jaccard,
                                                 similarity=lambda p: _exact_jaccard(work, shards, alive, p))
        sizes = np.bincount(roots, minlength=len(alive))
        root_of = [alive[r] for r in roots.tolist()]
        for k, r, local in zip(alive, root_of, roots.tolist()):
            if r != k:
                drop[k] = ("near_dedup", f"near_duplicate: of {ids[r]} (cluster of {sizes[local]} with "
                                         f"{cfg.minhash_ngram}-gram Jaccard >= {cfg.jaccard})")
        stats["clusters"]["near"] = provenance.cluster_stats(alive, root_of, ids)
        stats["clusters"]["near"]["mean_pair_jaccard"] = round(float(sim.mean()), 4) if len(sim) else None
        stats["steps"]["near_dedup"] = _step_counts(alive, nbytes, drop)
    return drop, starts


def _exact_jaccard(work: Path, shards: list[int], alive: list[int], pairs: np.ndarray) -> np.ndarray:
    """Exact shingle-set Jaccard of candidate pairs (indices into `alive`), reading only the sets they need."""
    need = {alive[k] for k in np.unique(pairs).tolist()}
    sets, k = {}, 0
    for shard in shards:
        for part in _parts(work, shard):
            t = pq.read_table(part, columns=["dropped", "shingles"]).to_pydict()
            for gone, blob in zip(t["dropped"], t["shingles"]):
                if not gone:
                    if k in need:
                        sets[k] = np.frombuffer(blob, np.uint32)
                    k += 1
    return np.array([set_jaccard(sets[alive[i]], sets[alive[j]]) for i, j in pairs.tolist()])


def _step_counts(alive: list[int], nbytes: list[int], drop: dict) -> list[int]:
    kept = [k for k in alive if k not in drop]
    return [len(alive), sum(nbytes[k] for k in alive), len(kept), sum(nbytes[k] for k in kept)]


# ---------------------------------------------------------------------------- outputs

def _write_shard(out: Path, work: Path, shard: int, drop: dict[int, tuple[str, str]], start: int) -> dict:
    """Phase 3: one curated shard and one rejects shard per input shard; returns its output stats."""
    done = work / f"out_{shard:05d}.json"
    if done.exists():
        return artifacts.read_json(done)
    kept, rejects = [], []
    stats = provenance.new_stats()
    k = start  # survivor number of the next document the per-document steps kept
    for part in _parts(work, shard):
        dropped = pq.read_table(part, columns=["dropped"]).column("dropped").to_pylist()
        for d, gone in zip(read_shard(part), dropped):
            if not gone:
                if k in drop:
                    d["meta"]["reject_step"], d["meta"]["reject_reason"] = drop[k]
                    provenance.count_reject(stats, d)
                    gone = True
                k += 1
            (rejects if gone else kept).append(d)
    for d in kept:
        provenance.count_output(stats, d)
    write_shard(out / f"docs_{shard:05d}.parquet", kept)
    write_shard(out / "rejects" / f"docs_{shard:05d}.parquet", rejects)
    artifacts.write_json(done, stats)
    return stats


def main(cfg: Config) -> dict:
    src = cfg.docs or str(Path(cfg.run) / "corpus")
    if not cfg.docs and not Path(src).exists():
        raise UserError(f"curate: no corpus at {src}. Run `ember corpus --run={cfg.run}` (or `ember pipeline`) "
                        f"first, or set --docs to a folder of document shards or a source spec (stdlib, a path).")
    run = artifacts.begin("curate", cfg, inputs=_file_inputs(cfg, src))
    if run.cached:
        return run.metrics
    work = run.dir / ".work"  # hidden: ignored by folder hashing; removed when the stage finishes
    work.mkdir(parents=True, exist_ok=True)
    if run.meta.get("resumed_from"):
        print0(f"[curate] resuming the unfinished run of {run.meta['resumed_from']}: finished batches are kept")

    shards = _run_batches(cfg, src, work)
    stats = provenance.new_stats()
    for shard in shards:
        for part in _parts(work, shard):
            provenance.merge(stats, json.loads(pq.read_schema(part).metadata[b"stats"]))
    drop, starts = _dedup(cfg, work, shards, stats)
    for shard in progress(shards, desc="[curate] writing", unit="shard"):
        provenance.merge(stats, _write_shard(run.dir, work, shard, drop, starts[shard]))

    card = provenance.data_card(cfg, stats)
    provenance.write_card(run.dir, card)
    shutil.rmtree(work)
    totals = card["totals"]
    print0(f"[curate] kept {totals['docs_out']}/{totals['docs_in']} documents "
           f"({totals['bytes_out'] / 1e6:.1f}/{totals['bytes_in'] / 1e6:.1f} MB); rejects in {run.dir / 'rejects'}")
    return run.finish({k: totals[k] for k in ("docs_in", "docs_out", "bytes_in", "bytes_out", "rejected")}
                      | {"knowledge_cutoff": card["knowledge_cutoff"]})


if __name__ == "__main__":
    from ember.cli import module_main

    module_main(__name__)
