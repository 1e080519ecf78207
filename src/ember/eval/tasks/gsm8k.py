"""GSM8K (Cobbe et al. 2021): grade-school math word problems, scored by exact match of the final number.

Reads openai/grade-school-math JSONL (`question`, `answer` ending in "#### <number>"). Prompt
"Question: {q}\\nAnswer:", few-shot examples (from train) with their full worked answers. Two extractions with
lm-evaluation-harness' regexes and normalization (commas, "$" and a final "." dropped, then strings compared:
"18.00" is not "18"): `exact_match_strict` reads the number after "####", `exact_match_flex` the last number
of the output. One deviation: generation also stops at a blank line (every few-shot answer ends in one; a
small model would otherwise ramble to max_new_tokens), besides lm-eval's "Question:".
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np

from ember.common.errors import UserError
from ember.eval.scoring import EvalLM, generate
from ember.eval.tasks.common import Options, Scored, Task, draw_fewshot, need, read_rows

STOP = ("Question:", "\n\n", "<|end|>", "<|eos|>")
_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")  # lm-eval gsm8k.yaml: strict-match
_NUMBER = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")  # flexible-extract, its last match


def normalize(num: str | None) -> str | None:
    """lm-eval's exact_match settings (regexes_to_ignore ",", "\\$", "\\.$"): '$1,234.' -> '1234', '3.50' stays."""
    if num is None:
        return None
    return re.sub(r"\.$", "", num.replace(",", "").replace("$", "")).strip()


def extract_strict(text: str) -> str | None:
    m = _STRICT.search(text)
    return normalize(m.group(1)) if m else None


def extract_flex(text: str) -> str | None:
    nums = [a or b for a, b in _NUMBER.findall(text)]
    return normalize(nums[-1]) if nums else None


def load(path: Path) -> list[dict]:
    items = []
    for i, (where, row) in enumerate(read_rows(path)):
        need(row, ("question", "answer"), where)
        target = extract_strict(str(row["answer"]))
        if target is None:  # else every reply without a number would "match" the missing target
            raise UserError(f"{where}: the answer has no final '#### <number>' line (GSM8K's format): "
                            f"{str(row['answer'])[-60:]!r}; end each answer with '#### 42'")
        items.append({"id": str(i), "question": row["question"], "answer": row["answer"], "target": target})
    return items


def prompt(item: dict, shots: list[dict]) -> str:
    demos = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots)
    return demos + f"Question: {item['question']}\nAnswer:"


def run(lm: EvalLM, items: list[dict], pool: list[dict], shots: int, opts: Options) -> Scored:
    rng = random.Random(opts.seed)
    strict, flex, per_item, samples = [], [], [], []
    for it in items:
        p = prompt(it, draw_fewshot(pool, shots, rng, exclude=it["id"] if pool is items else None))  # as multiple_choice
        out = generate(lm, p, opts.max_new_tokens, STOP, temperature=opts.temperature, top_p=opts.top_p,
                       seed=opts.seed)[0]
        strict.append(float(extract_strict(out) == it["target"]))
        flex.append(float(extract_flex(out) == it["target"]))
        per_item.append({"id": it["id"], "exact_match_strict": strict[-1], "exact_match_flex": flex[-1]})
        if len(samples) < 3:
            samples.append({"id": it["id"], "question": it["question"], "output": out, "target": it["target"]})
    return Scored({"exact_match_strict": np.array(strict), "exact_match_flex": np.array(flex)},
                  samples=samples, per_item=per_item)


TASK = Task("gsm8k", "gen", "gsm8k/test.jsonl", load, run, lambda it: it["question"] + " " + it["answer"],
            shots=5, pool_path="gsm8k/train.jsonl", main_metric="exact_match_flex")
