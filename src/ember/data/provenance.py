"""The data card of a curation run: what went in, what each step did, what came out (data_card.md + .json).

Stats are plain JSON-able dicts built per batch by the workers and summed with `merge`: per source and
license, per step (documents and bytes in/out), rejects per reason with a few examples, duplicate clusters,
PII replacements by type, contamination, and the latest document date, which later stages take as the
model's knowledge cutoff (documents may carry meta["date"], ISO 8601 strings compare in time order).
"""

from __future__ import annotations

import copy
import datetime as dt
from collections import Counter
from pathlib import Path

from ember.common import artifacts

EXAMPLES_PER_REASON = 3
SNIPPET_CHARS = 160
HIDDEN_TEXT_STEPS = {"toxicity"}  # examples of these show the id and reason only, not the offending text


def new_stats() -> dict:
    return {"sources": {}, "steps": {}, "rejects": {}, "examples": {}, "pii": {}, "flagged": {}, "clusters": {},
            "dates": {}}


def _source(stats: dict, doc: dict) -> dict:
    return stats["sources"].setdefault(doc.get("source") or "(none)", {
        "docs_in": 0, "bytes_in": 0, "docs_out": 0, "bytes_out": 0, "licenses_in": {}, "licenses": {}})


def _license(s: dict, key: str, doc: dict) -> None:
    lic = str((doc.get("meta") or {}).get("license") or "unknown")
    s[key][lic] = s[key].get(lic, 0) + 1


def count_input(stats: dict, doc: dict) -> None:
    s = _source(stats, doc)
    s["docs_in"] += 1
    s["bytes_in"] += len(doc["text"].encode("utf-8"))
    _license(s, "licenses_in", doc)


def count_output(stats: dict, doc: dict) -> None:
    """A kept document: its license counts under "licenses" (what a model trained on the output has seen)."""
    s = _source(stats, doc)
    s["docs_out"] += 1
    s["bytes_out"] += len(doc["text"].encode("utf-8"))
    _license(s, "licenses", doc)
    pii = (doc.get("meta") or {}).get("pii")
    for kind, n in (pii.items() if isinstance(pii, dict) else ()):  # this run's replacements in what is kept
        stats["pii"][kind] = stats["pii"].get(kind, 0) + n
    date = (doc.get("meta") or {}).get("date")
    if date is not None:
        date = str(date)
        d = stats["dates"]
        d["latest"] = max(d.get("latest", date), date)
        d["earliest"] = min(d.get("earliest", date), date)


def reason_key(reason: str) -> str:
    """'too_short: 12 words < 50' -> 'too_short' (reasons are grouped by the part before the colon)."""
    return reason.split(":", 1)[0].strip()


def count_reject(stats: dict, doc: dict) -> None:
    step, reason = doc["meta"]["reject_step"], doc["meta"]["reject_reason"]
    key = reason_key(reason)
    by_step = stats["rejects"].setdefault(step, {})
    by_step[key] = by_step.get(key, 0) + 1
    examples = stats["examples"].setdefault(f"{step}/{key}", [])
    if len(examples) < EXAMPLES_PER_REASON:
        text = "(not shown)" if step in HIDDEN_TEXT_STEPS else " ".join(doc["text"].split())[:SNIPPET_CHARS]
        examples.append({"id": doc["id"], "reason": reason, "text": text})


def merge(into: dict, other: dict) -> dict:
    """Sum other into `into`: numbers add, counter lists add elementwise, example lists concatenate (capped),
    dates keep the extremes."""
    for key, v in other.items():
        if key not in into:
            into[key] = copy.deepcopy(v)
        elif key == "latest":
            into[key] = max(into[key], v)
        elif key == "earliest":
            into[key] = min(into[key], v)
        elif isinstance(v, dict):
            merge(into[key], v)
        elif isinstance(v, list) and (not v or isinstance(v[0], dict)):
            into[key] = (into[key] + v)[:EXAMPLES_PER_REASON]
        elif isinstance(v, list):
            into[key] = [a + b for a, b in zip(into[key], v)]
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            into[key] += v
    return into


def cluster_stats(members: list[int], roots: list[int], ids: list[str], top: int = 5) -> dict:
    """Duplicate clusters from (member, root) pairs: counts, a size histogram and the largest clusters."""
    groups: dict[int, list[int]] = {}
    for m, r in zip(members, roots):
        groups.setdefault(r, []).append(m)
    multi = sorted((g for g in groups.values() if len(g) > 1), key=lambda g: (-len(g), g[0]))
    hist = Counter("2" if len(g) == 2 else "3-5" if len(g) <= 5 else "6-20" if len(g) <= 20 else ">20" for g in multi)
    return {
        "clusters": len(multi),
        "docs_in_clusters": sum(len(g) for g in multi),
        "removed": sum(len(g) - 1 for g in multi),
        "size_histogram": {k: hist[k] for k in ("2", "3-5", "6-20", ">20") if hist[k]},
        "largest": [{"kept": ids[g[0]], "size": len(g), "removed": [ids[m] for m in g[1:6]]} for g in multi[:top]],
    }


def data_card(cfg, stats: dict) -> dict:
    sources = [{"source": name, **{k: v for k, v in s.items()}} for name, s in sorted(stats["sources"].items())]
    totals = {k: sum(s[k] for s in sources) for k in ("docs_in", "bytes_in", "docs_out", "bytes_out")}
    totals["rejected"] = totals["docs_in"] - totals["docs_out"]
    n_rejects = sum(sum(r.values()) for r in stats["rejects"].values())
    assert n_rejects == totals["rejected"], (n_rejects, totals)  # kept + rejects = input
    steps = [{"step": s, "docs_in": c[0], "bytes_in": c[1], "docs_out": c[2], "bytes_out": c[3], "dropped": c[0] - c[2]}
             for s in cfg.steps if (c := stats["steps"].get(s))]
    return {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "run": str(Path(cfg.run) / "curate"),
        "input": cfg.docs or str(Path(cfg.run) / "corpus"),
        "knowledge_cutoff": stats["dates"].get("latest"),
        "earliest_date": stats["dates"].get("earliest"),
        "totals": totals,
        "sources": sources,
        "steps": steps,
        "rejects": stats["rejects"],
        "reject_examples": stats["examples"],
        "duplicates": stats["clusters"],
        "pii_replaced": dict(sorted(stats["pii"].items())),
        "contamination": {"eval_sets": list(cfg.eval_sets) if "decontam" in cfg.steps else [],
                          "action": cfg.decontam_action, "ngram": cfg.decontam_ngram,
                          "dropped": stats["rejects"].get("decontam", {}).get("contaminated", 0),
                          "flagged": stats["flagged"]},
    }


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f}"


def render(card: dict) -> str:
    t = card["totals"]
    out = [f"# Data card: `{card['run']}`", "",
           f"Input `{card['input']}`, curated {card['created']}. Kept **{t['docs_out']} of {t['docs_in']}** documents "
           f"({_mb(t['bytes_out'])} of {_mb(t['bytes_in'])} MB); {t['rejected']} rejected, each kept in `rejects/` with "
           f"its step and reason.", "",
           f"**Knowledge cutoff** (latest document date): {card['knowledge_cutoff'] or 'unknown (no meta.date)'}; "
           f"earliest: {card['earliest_date'] or 'unknown'}.", "",
           "## Sources and licenses", "", "| source | licenses of kept docs (docs) | docs in | MB in | docs out | MB out |",
           "|---|---|---:|---:|---:|---:|"]
    for s in card["sources"]:
        lic = ", ".join(f"{k} ({v})" for k, v in sorted(s["licenses"].items()))
        out.append(f"| {s['source']} | {lic} | {s['docs_in']} | {_mb(s['bytes_in'])} | {s['docs_out']} | {_mb(s['bytes_out'])} |")
    out += ["", "## Steps", "", "| step | docs in | docs out | dropped | MB in | MB out |", "|---|---:|---:|---:|---:|---:|"]
    for s in card["steps"]:
        out.append(f"| {s['step']} | {s['docs_in']} | {s['docs_out']} | {s['dropped']} | {_mb(s['bytes_in'])} | {_mb(s['bytes_out'])} |")
    out += ["", "## Rejects by reason", "", "| step | reason | docs | examples |", "|---|---|---:|---|"]
    for step, reasons in card["rejects"].items():
        for key, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
            ex = card["reject_examples"].get(f"{step}/{key}", [])
            shown = "<br>".join(f"`{e['id']}`: {e['reason']} — {_md(e['text'])}" for e in ex)
            out.append(f"| {step} | {key} | {n} | {shown} |")
    out += ["", "## Duplicates", ""]
    for kind, c in card["duplicates"].items():
        out.append(f"- **{kind}**: {c['clusters']} clusters holding {c['docs_in_clusters']} documents, {c['removed']} "
                   f"removed; cluster sizes {c['size_histogram'] or '-'}"
                   + (f"; mean Jaccard estimate of merged pairs {c['mean_pair_jaccard']}" if c.get("mean_pair_jaccard") else ""))
        for g in c["largest"]:
            out.append(f"  - kept `{g['kept']}`, size {g['size']}, e.g. removed {', '.join(f'`{r}`' for r in g['removed'])}")
    pii = card["pii_replaced"]
    out += ["", "## PII replaced (in the kept documents)", "",
            ", ".join(f"{k}: {v}" for k, v in pii.items()) if pii else "none found", ""]
    c = card["contamination"]
    out += ["## Decontamination", ""]
    if c["eval_sets"]:
        out.append(f"{c['ngram']}-gram overlap with {', '.join(f'`{p}`' for p in c['eval_sets'])}: action {c['action']}, "
                   f"{c['dropped']} dropped, flagged {c['flagged'] or 'none'}.")
    else:
        out.append("not run (no evaluation sets given).")
    return "\n".join(out) + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("`", "'").replace("<", "&lt;")


def write_card(folder: str | Path, card: dict) -> None:
    artifacts.write_json(Path(folder) / "data_card.json", card)
    artifacts.write_text(Path(folder) / "data_card.md", render(card))
