"""The readable side of eval results: a markdown table of every score with its 95% interval and contamination."""

from __future__ import annotations

import math


def fmt(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.2f}" if abs(v) >= 10 else f"{v:.4f}"


def scores_table(results: dict) -> list[str]:
    """Markdown rows: task | metric | score | 95% CI | items | shots | contaminated | score on clean items."""
    lines = ["| task | metric | score | 95% CI | items | shots | contaminated | clean-only score |",
             "|---|---|---|---|---|---|---|---|"]
    for task, r in results.items():
        if "skipped" in r:
            lines.append(f"| {task} | – | skipped: {r['skipped']} | | | | | |")
            continue
        c = r.get("contamination") or {}
        dirty = f"{c['dirty']}/{c['items']} ({100 * c['dirty_frac']:.1f}%)" if c else "not checked"
        for m, v in r["metrics"].items():
            lo, hi = r["ci95"].get(m, (None, None))
            clean = (c.get("clean_metrics") or {}).get(m) if c.get("dirty") else None
            lines.append(f"| {task} | {m} | {fmt(v)} | [{fmt(lo)}, {fmt(hi)}] | {r['n']} | {r['shots']} | {dirty} | "
                         f"{fmt(clean) if clean is not None else '–'} |")
    return lines


def render(results: dict, header: dict) -> str:
    lines = [f"# Evaluation of `{header['checkpoint']}`", ""]
    lines += [f"- {k}: {v}" for k, v in header.items() if k != "checkpoint"]
    lines += ["", "## Scores", "", "Intervals: 95% percentile bootstrap over items. Contaminated = items sharing a "
              "word n-gram with the training data of this run's lineage; the last column rescores without them.", ""]
    lines += scores_table(results)
    for task, r in results.items():
        if r.get("samples"):
            lines += ["", f"## {task}: examples", ""]
            for s in r["samples"]:
                body = "\n".join(f"    {k}: {str(v)[:300]!r}" for k, v in s.items())
                lines.append(f"- item\n{body}")
    return "\n".join(lines) + "\n"
