"""MMLU (Hendrycks et al. 2021): 57 subjects of four-choice questions, classically 5-shot from the dev split.

Reads the released headerless CSVs (`question,A,B,C,D,answer`), either a folder of `<subject>_<split>.csv`
files (e.g. mmlu/test) or one CSV. The prompt is lm-evaluation-harness' default: a subject description,
"{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:", choices " A".." D"; few-shot = the first k dev
questions of the same subject.
"""

from __future__ import annotations

import csv
from functools import partial
from pathlib import Path

from ember.common.errors import UserError
from ember.eval.tasks import multiple_choice
from ember.eval.tasks.common import Task

LETTERS = "ABCD"


def load(path: Path) -> list[dict]:
    path = Path(path)
    files = sorted(path.glob("*.csv")) if path.is_dir() else [path]
    if not files or not files[0].is_file():
        raise UserError(f"no MMLU csv files at {path}; pass mmlu:PATH to a folder of <subject>_test.csv files")
    items = []
    for f in files:
        subject = f.stem.rsplit("_", 1)[0] if f.stem.endswith(("_test", "_dev", "_val")) else f.stem
        desc = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        with open(f, newline="", encoding="utf-8") as fh:
            for i, row in enumerate(csv.reader(fh)):
                if len(row) != 6 or row[5].strip() not in tuple(LETTERS):  # one letter: "" and "BC" are not
                    raise UserError(f"{f}:{i + 1}: expected question,A,B,C,D,answer with answer in A-D, got {row[:1]}..")
                q, opts, ans = row[0].strip(), row[1:5], row[5].strip()
                ctx = q + "".join(f"\n{L}. {o}" for L, o in zip(LETTERS, opts)) + "\nAnswer:"
                items.append({"id": f"{subject}/{i}", "subject": subject, "description": desc, "context": ctx,
                              "choices": list(LETTERS), "gold": LETTERS.index(ans)})
    return items


TASK = Task("mmlu", "mc", "mmlu/test", load, partial(multiple_choice.run, first_n=True), multiple_choice.full_text,
            shots=5, pool_path="mmlu/dev", main_metric="acc")
