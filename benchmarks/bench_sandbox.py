"""HumanEval through the code sandbox: pass counts and the cost per program, against the harness it replaced.

    python benchmarks/bench_sandbox.py [--workers=2] [--repeat=1]

Same run, same 164 programs, same 2 worker threads:
  * "wave-1 harness": the single-process run_code of commit 37190d8^ (one file: prompt + solution + tests +
    check(entry_point); rlimits, Landlock, netns, fresh uid; a verdict the program could forge), loaded from git;
  * "ember now": run_function_tests under every layer this machine gives (bubblewrap namespaces, seccomp,
    cgroups, a fresh uid per process, Landlock), candidate and check in two sandboxes.
Both score the canonical solutions (all must pass) and a wrong set ("return None", none may pass).
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_name  # noqa: E402

from ember.common import paths, sandbox  # noqa: E402
from ember.eval.tasks import humaneval  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OLD = "37190d8^:src/ember/eval/sandbox.py"


def old_harness():
    """The wave-1 sandbox module, as it was before this issue (read from git, imported from a temp file)."""
    src = subprocess.run(["git", "show", OLD], cwd=REPO, capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_sandbox.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("old_sandbox", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["old_sandbox"] = mod  # dataclasses looks its module up
    spec.loader.exec_module(mod)
    return mod


def timed(fn, repeat: int):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    items = humaneval.load(paths.datasets_dir() / "humaneval" / "HumanEval.jsonl.gz")
    old = old_harness()
    status = sandbox.status()
    print(f"machine: {cpu_name()}; layers now: {','.join(status['layers'])}; missing: {status['missing'] or 'none'}")
    rows = []
    for label, completion in (("canonical", None), ("wrong", "    return None\n")):
        sols = [it["canonical_solution"] if completion is None else completion for it in items]
        t_old, r_old = timed(lambda: old.run_many([humaneval.program(it, s) for it, s in zip(items, sols)],
                                                  workers=args.workers, timeout=10), args.repeat)
        t_new, r_new = timed(lambda: humaneval.score_many(list(zip(items, sols)), workers=args.workers, timeout=10),
                             args.repeat)
        rows.append((label, sum(r.passed for r in r_old), t_old, sum(r.passed for r in r_new), t_new))
    print("| set | wave-1 harness passed | wave-1 ms/program | ember now passed | ember now ms/program | ratio |")
    print("|---|---|---|---|---|---|")
    n = len(items)
    for label, p_old, t_old, p_new, t_new in rows:
        print(f"| {label} | {p_old}/{n} | {1000 * t_old / n:.0f} | {p_new}/{n} | {1000 * t_new / n:.0f} | "
              f"{t_new / t_old:.2f}x |")


if __name__ == "__main__":
    main()
