"""Reference-based generation (BLEU, ROUGE-1/2/L): the model answers a prompt, scored against a reference.

Reads JSONL with `prompt` + `reference`, or AlpacaEval's `instruction` + `output` (the reference answers
of text-davinci-003). Greedy generation stops at a blank line. BLEU is corpus-level (sums of per-item
n-gram statistics, resampled whole by the bootstrap); ROUGE is the mean of per-item F-measures.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ember.common.errors import UserError
from ember.eval.metrics import MAX_ORDER, bleu_stats, corpus_bleu, rouge
from ember.eval.scoring import EvalLM, generate
from ember.eval.tasks.common import Options, Scored, Task, read_rows

STOP = ("\n\n", "<|end|>", "<|eos|>")


def load(path: Path) -> list[dict]:
    items = []
    for i, (where, row) in enumerate(read_rows(path)):
        p, r = row.get("prompt", row.get("instruction")), row.get("reference", row.get("output"))
        if not isinstance(p, str) or not isinstance(r, str):
            raise UserError(f"{where}: expected string fields prompt/reference (or instruction/output)")
        items.append({"id": str(row.get("id", i)), "prompt": p, "reference": r})
    return items


def _stat(cols):
    out = {"bleu": corpus_bleu(cols["bleu_stats"])}
    out.update({k: float(np.mean(cols[k])) for k in ("rouge1", "rouge2", "rougeL")})
    return out


def run(lm: EvalLM, items: list[dict], pool: list[dict], shots: int, opts: Options) -> Scored:
    outs = [generate(lm, f"{it['prompt']}\n\n", opts.max_new_tokens, STOP, seed=opts.seed)[0].strip() for it in items]
    stats = np.stack([bleu_stats(o, it["reference"]) for o, it in zip(outs, items)]) if items \
        else np.zeros((0, 2 + 2 * MAX_ORDER), dtype=np.int64)
    rg = [rouge(o, it["reference"]) for o, it in zip(outs, items)]
    cols = {"bleu_stats": stats, **{k: np.array([r[k] for r in rg]) for k in ("rouge1", "rouge2", "rougeL")}}
    samples = [{"id": it["id"], "prompt": it["prompt"], "output": o} for it, o in list(zip(items, outs))[:3]]
    per_item = [{"id": it["id"], **r} for it, r in zip(items, rg)]
    return Scored(cols, _stat, samples=samples, per_item=per_item)


TASK = Task("alpaca_eval", "ref", "alpaca_eval/alpaca_eval.jsonl", load, run,
            lambda it: it["prompt"] + " " + it["reference"], main_metric="rougeL")
