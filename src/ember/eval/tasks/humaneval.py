"""HumanEval (Chen et al. 2021): complete a Python function from its signature and docstring; pass@k.

Reads openai/human-eval JSONL(.gz) (`task_id`, `prompt`, `entry_point`, `canonical_solution`, `test`).
Each problem gets n sampled completions (stopped at the next top-level def/class/if/print/comment, as the
original). The candidate (prompt + completion) runs in one sandboxed process and only answers calls; the
dataset's `check(candidate)` runs in a second one that holds the tests, so the verdict cannot be forged
(sandbox.run_function_tests). pass@k uses the unbiased estimator over the n samples, and a timeout, crash
or non-plain return value counts as a failure.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ember.common.sandbox import SandboxResult, run_function_tests
from ember.eval.scoring import EvalLM, generate
from ember.eval.stats import pass_at_k
from ember.eval.tasks.common import Options, Scored, Task, need, read_rows

STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


def load(path: Path) -> list[dict]:
    items = []
    for i, (where, row) in enumerate(read_rows(path)):
        need(row, ("task_id", "prompt", "entry_point", "test"), where)
        items.append({"id": row["task_id"], **row})
    return items


def program(item: dict, completion: str) -> str:
    """The single-file form (function, tests, call to check), for sandbox.run_code; scoring uses `score`."""
    return f"{item['prompt']}{completion}\n\n{item['test']}\n\ncheck({item['entry_point']})\n"


def score(item: dict, completion: str, timeout: float = 5.0) -> SandboxResult:
    """Run the item's tests against prompt + completion; the prompt also runs beside the tests (trusted helpers
    such as `poly` for HumanEval/32)."""
    return run_function_tests(item["prompt"] + completion, item["entry_point"], item["test"], timeout=timeout,
                              helpers=item["prompt"])


def score_many(pairs: list[tuple[dict, str]], workers: int = 2, timeout: float = 5.0) -> list[SandboxResult]:
    if workers <= 1 or len(pairs) <= 1:
        return [score(it, c, timeout) for it, c in pairs]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda p: score(p[0], p[1], timeout), pairs))


def run(lm: EvalLM, items: list[dict], pool: list[dict], shots: int, opts: Options) -> Scored:
    ks = [k for k in opts.ks if k <= opts.n_samples] or [1]
    temperature = opts.temperature if opts.n_samples == 1 else (opts.temperature or 0.8)  # n greedy copies are one sample
    completions = [generate(lm, it["prompt"], opts.max_new_tokens, STOP, n=opts.n_samples, temperature=temperature,
                            top_p=opts.top_p, seed=opts.seed + i) for i, it in enumerate(items)]
    pairs = [(it, c) for it, cs in zip(items, completions) for c in cs]
    results = score_many(pairs, workers=opts.workers, timeout=opts.timeout)
    cols: dict[str, list[float]] = {f"pass@{k}": [] for k in ks}
    per_item, samples = [], []
    for i, it in enumerate(items):
        res = results[i * opts.n_samples:(i + 1) * opts.n_samples]
        c = sum(r.passed for r in res)
        row = {"id": it["id"]}
        for k in ks:
            cols[f"pass@{k}"].append(pass_at_k(opts.n_samples, c, k))
            row[f"pass@{k}"] = cols[f"pass@{k}"][-1]
        per_item.append(row)
        if len(samples) < 3:
            samples.append({"id": it["id"], "completion": completions[i][0], "status": [r.status for r in res]})
    return Scored({k: np.array(v) for k, v in cols.items()}, samples=samples, per_item=per_item)


TASK = Task("humaneval", "code", "humaneval/HumanEval.jsonl.gz", load, run,
            lambda it: it["prompt"] + it.get("canonical_solution", ""), main_metric="pass@1")
