"""The task registry: name -> Task (data format loader, prompt and scoring). One file per format.

`ember eval --tasks=hellaswag,arc_easy,mmlu:path/to/csvs` — a task runs on its default file under the
datasets folder, or on the file given after a colon (any file in the same format).
"""

from __future__ import annotations

from ember.common.errors import UserError
from ember.eval.tasks.common import Options, Scored, Task  # noqa: F401  (re-exported)


def registry() -> dict[str, Task]:
    from ember.eval.tasks import arc, gsm8k, hellaswag, humaneval, mmlu, perplexity, reference

    tasks = [perplexity.TASK, hellaswag.TASK, arc.EASY, arc.CHALLENGE, mmlu.TASK, gsm8k.TASK, humaneval.TASK,
             reference.TASK]
    return {t.name: t for t in tasks}


def get(name: str) -> Task:
    tasks = registry()
    if name not in tasks:
        import difflib
        close = difflib.get_close_matches(name, list(tasks), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UserError(f"unknown eval task '{name}'.{hint} Known tasks: {', '.join(tasks)}")
    return tasks[name]
