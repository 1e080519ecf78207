"""ARC (Clark et al. 2018), Easy and Challenge: grade-school science questions with 3-5 answer choices.

Reads AI2's ARC JSONL (`question.stem`, `question.choices[{text,label}]`, `answerKey`; labels are A-E or
1-4). Prompt "Question: {stem}\\nAnswer:" with each choice text as the continuation (lm-evaluation-harness'
arc_easy / arc_challenge). Few-shot examples come from the Train split.
"""

from __future__ import annotations

from pathlib import Path

from ember.common.errors import UserError
from ember.eval.tasks import multiple_choice
from ember.eval.tasks.common import Task, need, read_rows


def load(path: Path) -> list[dict]:
    items = []
    for i, (where, row) in enumerate(read_rows(path)):
        need(row, ("question", "answerKey"), where)
        q = row["question"]
        labels = [c["label"] for c in q["choices"]]
        if row["answerKey"] not in labels:
            raise UserError(f"{where}: answerKey {row['answerKey']!r} is not one of the choice labels {labels}")
        items.append({"id": row.get("id", str(i)), "context": f"Question: {q['stem']}\nAnswer:",
                      "choices": [c["text"] for c in q["choices"]], "gold": labels.index(row["answerKey"])})
    return items


EASY = Task("arc_easy", "mc", "arc/ARC-Easy-Test.jsonl", load, multiple_choice.run, multiple_choice.full_text,
            pool_path="arc/ARC-Easy-Train.jsonl", main_metric="acc_norm")
CHALLENGE = Task("arc_challenge", "mc", "arc/ARC-Challenge-Test.jsonl", load, multiple_choice.run,
                 multiple_choice.full_text, pool_path="arc/ARC-Challenge-Train.jsonl", main_metric="acc_norm")
