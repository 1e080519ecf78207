"""`ember eval`: run benchmark tasks on a checkpoint; write <run>/eval/results.json and a readable report.md.

    ember eval --run=runs/quickstart --preset=quickstart     # a small subset of every task, ~1 minute
    ember eval --tasks=hellaswag,arc_easy,mmlu --limit=500   # seeded random 500 items per task
    ember eval --tasks=ppl:notes.txt,gsm8k:my_gsm8k.jsonl --checkpoint=runs/x/pretrain/step_000500
    ember eval --checkpoint=SmolLM2-135M-Instruct.Q4_1.gguf --tasks=hellaswag,arc_easy --limit=200   # any format

Checkpoint default: <run>/sft/final if the sft stage finished, else <run>/pretrain/final; any format
`model.load` reads (ember, HF folder, GGUF, llama2.c), scored with the model's own tokenizer. Tasks: ppl
(perplexity, bits/byte), hellaswag, arc_easy, arc_challenge, mmlu (multiple choice by log-likelihood,
raw and length-normalized), gsm8k (exact match), humaneval (pass@k in a sandbox), alpaca_eval (BLEU/ROUGE
against references). Every score has a 95% bootstrap interval; contaminated items (n-gram overlap with
the training data in this run's lineage) are counted and the score is repeated without them.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Literal

import numpy as np

from ember.common import artifacts
from ember.common.config import require
from ember.common.errors import UserError
from ember.common.log import print0
from ember.common.paths import datasets_dir
from ember.common.records import input_identity, is_hf
from ember.eval import contamination, report
from ember.eval.stats import bootstrap
from ember.eval.tasks import Options, get
from ember.eval.tasks.common import subset

ALL_TASKS = ["ppl", "hellaswag", "arc_easy", "arc_challenge", "mmlu", "gsm8k", "humaneval", "alpaca_eval"]
MAX_DIRTY_IDS = 1000  # contaminated item ids written to results.json per task (all are excluded from clean_metrics)


@dataclass
class Config:
    run: str = "runs/default"  # run folder; this stage writes <run>/eval/
    checkpoint: str = ""  # ember/HF folder, .gguf or llama2.c .bin; empty = <run>/sft/final, else <run>/pretrain/final
    tokenizer: str = ""  # tokenizer.json, its folder or tok*.bin; empty = the model's own (beside it, <run>/tokenizer, GGUF)
    tasks: list[str] = field(default_factory=lambda: list(ALL_TASKS))  # names, each optionally name:PATH to its data
    data_dir: str = ""  # benchmark datasets folder; empty = $EMBER_DATASETS, else ../shared/datasets
    limit: int = 0  # items per task, a seeded random subset (0 = all); the quickstart uses a few dozen
    num_fewshot: int = -1  # examples before each question; -1 = each task's default (mmlu 5, gsm8k 5, else 0)
    batch_size: int = 16  # sequences per forward pass when scoring
    max_len: int = 0  # longest scored sequence in tokens; 0 = the model's max_seq_len
    device: str = "auto"  # cpu, cuda, cuda:1 ...; auto = cuda when available
    dtype: str = "float32"  # float32 | bfloat16 | float16 weights for scoring (bf16 halves memory on GPU)
    add_bos: Literal["auto", "true", "false"] = "auto"  # BOS before each sequence; auto = the tokenizer's add_bos, as lm-eval HF
    bootstrap: int = 1000  # resamples for the 95% intervals (0 = no intervals)
    seed: int = 0  # item subsets, few-shot draws, sampling, bootstrap
    max_new_tokens: int = 256  # generation budget (gsm8k, humaneval, alpaca_eval)
    n_samples: int = 1  # completions per humaneval problem; pass@k needs n >= k (the Codex paper used 200)
    pass_k: list[int] = field(default_factory=lambda: [1])  # k values of pass@k
    temperature: float = 0.0  # generation temperature; 0 = greedy (humaneval with n > 1 then uses 0.8)
    top_p: float = 0.95  # nucleus sampling mass when temperature > 0
    sandbox_timeout: float = 5.0  # seconds of wall clock per humaneval program before it counts as failed
    sandbox_workers: int = 2  # humaneval programs run at once
    ppl_stride: int = 0  # new tokens scored per perplexity window (0 = max_len: disjoint windows)
    contamination: bool = True  # count eval items that share word n-grams with this run's training data
    contamination_n: int = 13  # n-gram length in words (GPT-3's choice)
    skip_missing: bool = True  # skip (and record) a task whose data is absent instead of failing the stage
    allow_weak_sandbox: bool = False  # run model-written code (humaneval) even where bubblewrap/seccomp are missing

    def __post_init__(self):
        require(bool(self.tasks), "tasks", self.tasks, f"a non-empty list of {', '.join(ALL_TASKS)}")
        for t in self.tasks:
            get(t.split(":", 1)[0])  # unknown names fail now, with a suggestion
        require(self.limit >= 0, "limit", self.limit, "an int >= 0 (0 = all items)")
        require(self.num_fewshot >= -1, "num_fewshot", self.num_fewshot, "an int >= 0, or -1 for task defaults")
        require(self.batch_size >= 1, "batch_size", self.batch_size, "an int >= 1")
        require(self.dtype in ("float32", "bfloat16", "float16"), "dtype", self.dtype, "float32, bfloat16 or float16")
        require(self.add_bos in ("auto", "true", "false"), "add_bos", self.add_bos,
                "auto (the tokenizer's own rule), true or false")
        require(self.n_samples >= 1, "n_samples", self.n_samples, "an int >= 1")
        require(all(1 <= k <= self.n_samples for k in self.pass_k), "pass_k", self.pass_k,
                f"ints in [1, n_samples = {self.n_samples}]")
        require(self.sandbox_timeout > 0, "sandbox_timeout", self.sandbox_timeout, "seconds > 0")
        require(self.contamination_n >= 1, "contamination_n", self.contamination_n, "an int >= 1")


def quickstart() -> Config:
    return Config(limit=20, max_new_tokens=96, bootstrap=500, tasks=["ppl", "hellaswag", "arc_easy", "arc_challenge",
                                                                     "mmlu", "gsm8k", "humaneval"])


def smoke() -> Config:
    return Config(limit=5, max_new_tokens=24, bootstrap=200, num_fewshot=0,
                  tasks=["ppl", "hellaswag", "arc_easy", "gsm8k", "humaneval"])


def full() -> Config:
    return Config(n_samples=10, pass_k=[1, 5, 10], temperature=0.8)


PRESETS = {"quickstart": quickstart, "smoke": smoke, "full": full}


# ---------------------------------------------------------------------------- inputs

def default_checkpoint(run: str | Path) -> Path:
    sft = Path(run) / "sft"
    return sft / "final" if artifacts.is_finished(sft) and (sft / "final").exists() else Path(run) / "pretrain" / "final"


def task_specs(cfg: Config, data: Path) -> list[tuple[str, Path, Path | None, Callable[[Path], list[dict]]]]:
    """(task name, data path, few-shot pool path or None, loader) for each configured task. ppl without a
    path reads the run's own held-out documents (the tokenize stage's val split) when there are any."""
    from ember.eval.tasks import perplexity

    out = []
    for spec in cfg.tasks:
        name, _, given = spec.partition(":")
        task = get(name)
        path, load = ((given if is_hf(given) else Path(given)) if given else data / task.path), task.load
        if name == "ppl" and not given and (split := perplexity.heldout_split(cfg.run)):
            path, load = split[0], partial(perplexity.load_heldout, val_fraction=split[1])
        pool = data / task.pool_path if task.pool_path and not given else None
        out.append((name, path, pool, load))
    return out


# ---------------------------------------------------------------------------- main

def evaluate_task(lm, name: str, path: Path, pool_path: Path | None, cfg: Config,
                  load: Callable[[Path], list[dict]] | None = None) -> tuple[dict, list[dict], list]:
    """Load, subset, score and bootstrap one task. Returns (result record, per-item rows, the items)."""
    task = get(name)
    items = subset((load or task.load)(path), cfg.limit, cfg.seed)
    shots = task.shots if cfg.num_fewshot < 0 else cfg.num_fewshot
    if task.kind in ("ppl", "code", "ref"):
        shots = 0
    pool = task.load(pool_path) if shots and pool_path is not None and pool_path.exists() else items
    opts = Options(seed=cfg.seed, max_new_tokens=cfg.max_new_tokens, n_samples=cfg.n_samples, ks=tuple(cfg.pass_k),
                   temperature=cfg.temperature, top_p=cfg.top_p, timeout=cfg.sandbox_timeout,
                   workers=cfg.sandbox_workers, stride=cfg.ppl_stride)
    t0 = time.perf_counter()
    scored = task.run(lm, items, pool, shots, opts)
    dt = time.perf_counter() - t0
    point, ci = bootstrap(scored.cols, scored.stat, cfg.bootstrap, cfg.seed)
    rec = {"metrics": point, "ci95": ci, "main_metric": task.main_metric, "n": len(items), "shots": shots,
           "path": str(path), "seconds": round(dt, 3), "items_per_s": round(len(items) / max(dt, 1e-9), 2),
           "samples": scored.samples, "_scored": scored}
    return rec, scored.per_item, items


def add_contamination(results: dict, items_by_task: dict, metas: list[dict], n: int) -> dict:
    """Attach n-gram overlap with the lineage's training data to each task, with the clean-only rescoring."""
    sources = contamination.training_sources(metas)
    if not sources:
        return {"sources": [], "note": "no training documents in this run's lineage"}
    sets = {t: [(it["id"], get(t).text(it)) for it in items] for t, items in items_by_task.items()}
    t0 = time.perf_counter()
    tok_meta = next((m for m in metas if m.get("stage") == "tokenize"), {})
    val = float(tok_meta.get("config", {}).get("val_fraction", 0.0))  # val documents were not trained on
    found = contamination.overlap(sets, contamination.iter_texts(sources, val_fraction=val), n=n)
    for task, c in found.items():
        rec = results[task]
        scored = rec["_scored"]
        dirty = set(c["dirty_ids"])
        if dirty:
            mask = np.array([it["id"] not in dirty for it in items_by_task[task]])
            c["clean_metrics"] = scored.stat({k: v[mask] for k, v in scored.cols.items()}) if mask.any() else {}
        c["dirty_ids"] = c["dirty_ids"][:MAX_DIRTY_IDS]  # results.json lists at most this many; "dirty" counts all
        rec["contamination"] = c
    return {"sources": [str(p) for p in sources], "seconds": round(time.perf_counter() - t0, 3), "n": n}


def code_sandbox(cfg: Config, code_tasks: list[str]) -> dict | None:
    """The sandbox's layers when model-written code will run (printed, and recorded in results.json). Without its
    strong layers (bubblewrap namespaces + seccomp) the code tasks are refused -- skipped with the reason, or an
    error when --skip_missing=false -- unless --allow_weak_sandbox=true."""
    if not code_tasks:
        return None
    from ember.common import sandbox

    status = sandbox.status()
    out = {"layers": status["layers"], "missing": status["missing"]}
    print0(f"[eval] code sandbox: {', '.join(status['layers']) or 'none'}"
           + "".join(f"\n[eval]   missing {k}: {v}" for k, v in status["missing"].items()))
    if not status["strong"] and not cfg.allow_weak_sandbox:
        why = "; ".join(f"{k}: {v}" for k, v in status["missing"].items()) or "the sandbox did not start"
        out["refused"] = (f"model-written code is not run without the sandbox's namespaces and syscall filter ({why}); "
                          f"install them or pass --allow_weak_sandbox=true")
        if not cfg.skip_missing:
            raise UserError(f"{', '.join(code_tasks)}: {out['refused']}")
    return out


def main(cfg: Config) -> dict:
    from ember.eval.scoring import default_device, load_lm
    from ember.model.load import find_tokenizer

    ckpt = Path(cfg.checkpoint) if cfg.checkpoint else default_checkpoint(cfg.run)
    # the tokenizer file the loader will read, hashed for lineage; none when the model carries its own (GGUF)
    tok = Path(cfg.tokenizer) if cfg.tokenizer else find_tokenizer(ckpt, cfg.run)
    data = datasets_dir(cfg.data_dir)
    specs = task_specs(cfg, data)
    missing = [(n, p) for n, p, _, _ in specs if not is_hf(p) and not p.exists()]
    if missing and not cfg.skip_missing:
        raise UserError(f"eval data not found: {', '.join(f'{n} at {p}' for n, p in missing)}. Set --data_dir, "
                        f"pass name:PATH, or --skip_missing=true")
    sandbox_status = code_sandbox(cfg, [n for n, p, _, _ in specs if get(n).kind == "code" and (is_hf(p) or p.exists())])
    # data files are inputs too, so a changed benchmark file reruns the stage
    inputs = {"checkpoint": ckpt, **({"tokenizer": tok} if tok else {}),
              **{f"data_{n}": input_identity(p) if is_hf(p) else p for n, p, _, _ in specs if is_hf(p) or p.exists()}}
    run = artifacts.begin("eval", cfg, inputs=inputs)
    if run.cached:
        return run.metrics
    device = default_device() if cfg.device == "auto" else cfg.device
    lm = load_lm(ckpt, cfg.tokenizer, device=device, batch_size=cfg.batch_size, max_len=cfg.max_len,
                 add_bos={"auto": None, "true": True, "false": False}[cfg.add_bos], dtype=cfg.dtype, run=cfg.run)

    results, items_by_task = {}, {}
    for name, path, pool, load in specs:
        if not is_hf(path) and not path.exists():
            results[name] = {"skipped": f"no data at {path}"}
            print0(f"[eval] {name}: skipped (no data at {path})")
            continue
        if get(name).kind == "code" and sandbox_status and sandbox_status.get("refused"):
            results[name] = {"skipped": sandbox_status["refused"]}
            print0(f"[eval] {name}: skipped ({sandbox_status['refused']})")
            continue
        rec, per_item, items = evaluate_task(lm, name, path, pool, cfg, load)
        results[name], items_by_task[name] = rec, items
        artifacts.write_text(run.dir / "items" / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in per_item))
        main_v, (lo, hi) = rec["metrics"][rec["main_metric"]], rec["ci95"][rec["main_metric"]]
        interval = "" if lo != lo else f" [{lo:.4f}, {hi:.4f}]"  # nan: no intervals (--bootstrap=0)
        print0(f"[eval] {name}: {rec['main_metric']} {main_v:.4f}{interval} on {rec['n']} items "
               f"({rec['shots']}-shot, {rec['seconds']:.1f}s)")

    contam = {"note": "disabled (--contamination=false)"}
    if cfg.contamination and items_by_task:
        contam = add_contamination(results, items_by_task, artifacts.lineage(run.dir), cfg.contamination_n)
    for rec in results.values():
        rec.pop("_scored", None)
    header = {"checkpoint": str(ckpt), "tokenizer": str(getattr(lm.tokenizer, "path", None) or "inside the model file"),
              "BOS before each sequence": lm.add_bos, "device": device, "seed": cfg.seed,
              "bootstrap resamples": cfg.bootstrap, "contamination sources": len(contam.get("sources", []))}
    if sandbox_status:
        header["code sandbox"] = ", ".join(sandbox_status["layers"]) or "none"
    artifacts.write_json(run.dir / "results.json", {**header, "sandbox": sandbox_status, "contamination": contam,
                                                    "tasks": results,
                                                    "config": dataclasses.asdict(cfg)})
    artifacts.write_text(run.dir / "report.md", report.render(results, header))
    metrics = {f"{t}/{m}": v for t, r in results.items() if "metrics" in r for m, v in r["metrics"].items()}
    return run.finish(metrics)


if __name__ == "__main__":
    from ember.cli import module_main

    module_main(__name__)
