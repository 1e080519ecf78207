"""Multiple choice by log-likelihood: each choice is scored as a continuation of the question.

An item is `{"id", "context", "choices": [str], "gold": int}` (+ optional "description" prefix and
"subject"). `acc` takes the choice with the highest sum of log-probs, `acc_norm` divides that by the
choice's length in characters first (lm-evaluation-harness' acc_norm, so long endings are not penalized for
their length). Few-shot examples are `context + " " + gold choice`, separated by blank lines.
"""

from __future__ import annotations

import random

import numpy as np

from ember.eval.scoring import EvalLM
from ember.eval.tasks.common import Options, Scored, draw_fewshot


def prompt(item: dict, shots: list[dict]) -> str:
    demos = "".join(f"{s['context']} {s['choices'][s['gold']]}\n\n" for s in shots)
    return item.get("description", "") + demos + item["context"]


def full_text(item: dict) -> str:
    return f"{item['context']} {item['choices'][item['gold']]}"


def run(lm: EvalLM, items: list[dict], pool: list[dict], shots: int, opts: Options, first_n: bool = False) -> Scored:
    rng = random.Random(opts.seed)
    pairs, spans = [], []
    own = pool is items  # the pool is the eval set itself: never show an item as its own example. From another
    for it in items:     # file (MMLU dev) an equal id is another question: dropping it made the first 5 items 4-shot.
        demos = draw_fewshot(pool, shots, rng, exclude=it["id"] if own else None,
                             group_key="subject" if "subject" in it else None, group=it.get("subject"), first=first_n)
        ctx = prompt(it, demos)
        spans.append((len(pairs), len(it["choices"])))
        pairs += [(ctx, " " + c) for c in it["choices"]]
    lls = lm.loglikelihood_text(pairs)  # one batched pass over every (item, choice)
    acc, acc_norm, per_item, samples = [], [], [], []
    for it, (start, k) in zip(items, spans):
        ll = np.array([lls[start + j][0] for j in range(k)])
        norm = ll / np.array([max(len(c), 1) for c in it["choices"]])
        pred, pred_n = int(ll.argmax()), int(norm.argmax())
        acc.append(float(pred == it["gold"]))
        acc_norm.append(float(pred_n == it["gold"]))
        per_item.append({"id": it["id"], "acc": acc[-1], "acc_norm": acc_norm[-1]})
        if len(samples) < 3:
            samples.append({"id": it["id"], "prompt": pairs[start][0][-400:], "choices": it["choices"],
                            "gold": it["gold"], "loglik": [round(float(x), 4) for x in ll], "pred": pred})
    return Scored({"acc": np.array(acc), "acc_norm": np.array(acc_norm)}, samples=samples, per_item=per_item)
