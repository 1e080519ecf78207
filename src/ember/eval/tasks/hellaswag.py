"""HellaSwag (Zellers et al. 2019): pick the most plausible ending of an activity description.

Reads the original rowanz JSONL (`ctx_a`, `ctx_b`, `activity_label`, `endings`, `label`) and a variant with
only `ctx` (the datasets folder's copy), plain or .gz. The query is `preprocess(activity_label + ": " + ctx)`
with ctx = ctx_a + " " + ctx_b.capitalize() and each ending is a choice, as lm-evaluation-harness. A ctx-only
file cannot say where ctx_b starts, so its ctx is used as written: the fragment after the last sentence stays
lowercase ("...on a roof. he" where lm-eval has "He"), a small systematic difference from lm-eval's prompt.
"""

from __future__ import annotations

import re
from pathlib import Path

from ember.eval.tasks import multiple_choice
from ember.eval.tasks.common import Task, need, read_rows


def preprocess(text: str) -> str:
    """lm-evaluation-harness' cleanup of WikiHow artifacts: " [title]" -> ". ", other [tags] dropped."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def load(path: Path) -> list[dict]:
    items = []
    for i, (where, row) in enumerate(read_rows(path)):
        need(row, ("activity_label", "endings", "label"), where)
        if "ctx_a" in row and "ctx_b" in row:  # rowanz files carry ctx as well, uncapitalized: not that one
            ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
        else:
            need(row, ("ctx",), where)
            ctx = row["ctx"]
        items.append({"id": str(row.get("ind", i)), "context": preprocess(row["activity_label"] + ": " + ctx),
                      "choices": [preprocess(e) for e in row["endings"]], "gold": int(row["label"])})
    return items


TASK = Task("hellaswag", "mc", "hellaswag/hellaswag_val_lmeval_preprocessed.jsonl.gz", load, multiple_choice.run,
            multiple_choice.full_text, main_metric="acc_norm")
