"""Near-dedup throughput and memory on 2 cores: ember's numpy MinHash + LSH vs datasketch's MinHashLSH.

    python benchmarks/bench_dedup.py                      # stdlib + planted near-copies, ~1-2 min on 2 cores
    python benchmarks/bench_dedup.py --copies=0.5 --workers=2

Documents: the stdlib corpus with a mutated copy of a random 30% of them (each copy has a random 0-10% of its
words replaced, so copies span Jaccard ~0.3 to 1). Both methods see the same 5-word shingles (lowercased
`\\w+` words), 128 permutations and threshold 0.8; MinHash signatures are computed by a 2-process pool for
both; ember verifies LSH candidates by exact Jaccard of the shingle sets (as `ember curate` does);
datasketch returns LSH candidates as they are, with its own optimal (bands, rows) for the threshold and
with ember's (20, 6).
Each method runs in a fresh subprocess: memory is its main process's peak RSS above the RSS it had with the
documents loaded, and the peak RSS of its largest worker (forked, so it includes pages shared with the parent). Ground truth: exact Jaccard of every
pair that could reach 0.8 (a size ratio below 0.8 rules a pair out); recall = true pairs (J >= 0.8) put in
one cluster; precision = reported pairs (the edges each method merges on) with exact J >= 0.8.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ember.data.dedup import MinHasher, UnionFind, near_duplicate_roots, ngram_hashes, set_jaccard, word_hashes, words

NUM_PERM, NGRAM, THRESHOLD, BANDS = 128, 5, 0.8, 20


def corpus(copies: float, seed: int = 0) -> list[str]:
    from ember.data.sources import iter_documents

    texts = [d["text"] for d in iter_documents("stdlib")]
    rng = np.random.default_rng(seed)
    vocab = sorted({w for t in texts[:50] for w in t.split()})
    for i in rng.choice(len(texts), int(copies * len(texts)), replace=False):
        toks = texts[i].split(" ")
        for p in rng.choice(len(toks), int(rng.uniform(0, 0.10) * len(toks)), replace=False):
            toks[p] = vocab[rng.integers(len(vocab))]
        texts.append(" ".join(toks))
    return texts


def cpu_seconds() -> float:
    """User + system CPU time of this process and its reaped children (the pool workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def children_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # Linux reports KiB


def status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0), so the peak is the method's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


# ---------------------------------------------------------------------------- the two methods

def _ember_sigs(batch: list[str]) -> tuple[list[np.ndarray], np.ndarray]:
    hasher = MinHasher(NUM_PERM, NGRAM)
    sets = [hasher.shingles(t) for t in batch]
    return sets, hasher.sign(sets)


def run_ember(texts, workers):
    """What `ember curate` does: shingle sets + signatures in workers, LSH, exact Jaccard of candidates."""
    batches = [texts[i:i + 64] for i in range(0, len(texts), 64)]
    with mp.get_context("fork").Pool(workers) as pool:
        results = pool.map(_ember_sigs, batches)
    sets = [s for r in results for s in r[0]]
    sig = np.concatenate([r[1] for r in results])
    exact = lambda pairs: np.array([set_jaccard(sets[i], sets[j]) for i, j in pairs.tolist()])  # noqa: E731
    roots, pairs, _ = near_duplicate_roots(sig, BANDS, THRESHOLD, similarity=exact)
    return roots, pairs


def _shingles(text: str) -> list[bytes]:
    w = words(text)
    return [" ".join(w[i:i + NGRAM]).encode() for i in range(max(1, len(w) - NGRAM + 1))] if w else []


def _datasketch_sigs(batch: list[str]) -> list:
    from datasketch import LeanMinHash, MinHash

    out = []
    for t in batch:
        m = MinHash(num_perm=NUM_PERM)
        m.update_batch(_shingles(t))
        out.append(LeanMinHash(m))  # compact and picklable, as the datasketch docs advise for LSH
    return out


def run_datasketch(texts, workers, params):
    from datasketch import MinHashLSH

    batches = [texts[i:i + 64] for i in range(0, len(texts), 64)]
    with mp.get_context("fork").Pool(workers) as pool:
        mins = [m for b in pool.map(_datasketch_sigs, batches) for m in b]
    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM, params=params)
    for i, m in enumerate(mins):
        lsh.insert(i, m)
    uf, pairs = UnionFind(len(texts)), set()
    for i, m in enumerate(mins):
        for j in lsh.query(m):
            if j != i:
                pairs.add((min(i, j), max(i, j)))
                uf.union(i, j)
    return uf.roots(), np.array(sorted(pairs), dtype=np.int64).reshape(-1, 2)


def child(method: str, copies: float, workers: int, out: str) -> None:
    texts = corpus(copies)
    reset_peak()
    base = status_mb("VmRSS")
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    if method == "ember":
        roots, pairs = run_ember(texts, workers)
    else:
        params = None if method == "datasketch" else (BANDS, NUM_PERM // BANDS)
        roots, pairs = run_datasketch(texts, workers, params)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    Path(out).write_text(json.dumps({
        "seconds": seconds, "cpu": cpu, "docs": len(texts), "rss_main_mb": status_mb("VmHWM") - base,
        "rss_worker_mb": children_peak_mb(), "roots": roots.tolist(), "pairs": pairs.tolist()}))


# ---------------------------------------------------------------------------- ground truth and report

def truth(texts):
    sets = [set(ngram_hashes(word_hashes(t), NGRAM).tolist()) for t in texts]
    sizes = np.array([len(s) for s in sets])
    exact = {}
    for i in range(len(texts)):
        ok = np.flatnonzero((np.minimum(sizes[i], sizes) >= 0.8 * np.maximum(sizes[i], sizes)) & (np.arange(len(texts)) > i))
        for j in ok:
            if sizes[i] and sizes[j]:
                exact[(i, int(j))] = len(sets[i] & sets[j]) / len(sets[i] | sets[j])
    return sets, exact


def jaccard_of(sets, i, j):
    return len(sets[i] & sets[j]) / max(len(sets[i] | sets[j]), 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies", type=float, default=0.3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--child", default="")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.copies, args.workers, args.out)

    texts = corpus(args.copies)
    t0 = time.perf_counter()
    sets, exact = truth(texts)
    positives = [p for p, j in exact.items() if j >= THRESHOLD]
    print(f"{len(texts)} documents ({sum(map(len, texts)) / 1e6:.1f} MB), {len(positives)} pairs with exact "
          f"Jaccard >= {THRESHOLD} (ground truth in {time.perf_counter() - t0:.0f}s)")
    rows = []
    for method in ("ember", "datasketch", "datasketch-20x6"):
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            subprocess.run([sys.executable, __file__, f"--child={method}", f"--out={f.name}",
                            f"--copies={args.copies}", f"--workers={args.workers}"], check=True)
            r = json.loads(Path(f.name).read_text())
        roots = r["roots"]
        recall = np.mean([roots[i] == roots[j] for i, j in positives]) if positives else float("nan")
        rep = [tuple(p) for p in r["pairs"]]
        precision = np.mean([exact.get(p, jaccard_of(sets, *p)) >= THRESHOLD for p in rep]) if rep else float("nan")
        removed = sum(1 for i, root in enumerate(roots) if root != i)
        rows.append((method, r["seconds"], r["docs"] / r["seconds"], r["cpu"], r["rss_main_mb"], r["rss_worker_mb"],
                     recall, precision, len(rep), removed))
    print(f"\n{'method':<17}{'wall s':>7}{'docs/s':>8}{'CPU s':>7}{'main ΔRSS MB':>14}{'worker RSS MB':>15}"
          f"{'recall':>8}{'precision':>10}{'pairs':>7}{'removed':>8}")
    for m, s, dps, cpu, rm, rw, rec, prec, npairs, rem in rows:
        print(f"{m:<17}{s:>7.2f}{dps:>8.0f}{cpu:>7.2f}{rm:>14.0f}{rw:>15.0f}{rec:>8.3f}{prec:>10.3f}{npairs:>7}{rem:>8}")
    print(f"\nthroughput ratio ember / datasketch: {rows[0][2] / rows[1][2]:.1f}x wall, {rows[1][3] / rows[0][3]:.1f}x CPU "
          f"(vs datasketch with ember's 20x6 bands: {rows[0][2] / rows[2][2]:.1f}x wall, {rows[2][3] / rows[0][3]:.1f}x CPU)")


if __name__ == "__main__":
    main()
