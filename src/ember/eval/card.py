"""`ember card`: a model card written from the run's lineage — nothing in it is typed by hand.

    ember card --run=runs/quickstart              # <run>/card/MODEL_CARD.md + card.json
    ember card --checkpoint=runs/x/sft/final --eval=runs/x/eval
    ember card --checkpoint=SmolLM2-135M-Instruct.Q4_1.gguf --eval=runs/smol/eval   # any format model.load reads

Sections (Mitchell et al. 2019, "Model Cards for Model Reporting", trimmed to what a run records): model
(architecture and size from the checkpoint), training data (sources and licenses from the curation data
card, knowledge cutoff = latest document date), training stages and compute (wall time from each
meta.json, FLOPs = tokens x the model's flops_per_token unless the stage recorded them), evaluation (every
score with its 95% interval and contamination), known limitations (derived from the above), lineage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ember.common import artifacts
from ember.common.log import human, print0

TRAIN_STAGES = ("pretrain", "sft", "dpo", "ppo", "grpo", "reward")  # stage names (cli.STAGES) that train weights
# A model is aligned when one of these is in its lineage: a preference/RL stage trained it, or it was
# fine-tuned on constitution's self-revised data (sft --data=<run>/constitution/sft.jsonl).
ALIGN_STAGES = ("dpo", "ppo", "grpo", "constitution")


@dataclass
class Config:
    run: str = "runs/default"  # run folder; this stage writes <run>/card/
    checkpoint: str = ""  # model folder; empty = the eval stage's default (<run>/sft/final, else pretrain/final)
    eval: str = ""  # eval stage folder with results.json; empty = <run>/eval (the card says when there is none)
    name: str = ""  # model name in the title; empty = the run folder's name


PRESETS = {"quickstart": lambda: Config(), "smoke": lambda: Config()}


def stage_of(path: Path) -> Path | None:
    """The stage folder holding a checkpoint (final/ or step_N/ sits inside it)."""
    for cand in (path, path.parent):
        if "stage" in (artifacts.read_meta(cand) or {}):
            return cand
    return None


def model_facts(ckpt: Path) -> dict:
    """Architecture and size, read from the checkpoint itself."""
    from dataclasses import asdict

    from ember.model.load import load_model

    try:
        model = load_model(ckpt, "cpu")  # any format: ember, HF folder, GGUF, llama2.c
    except Exception as e:  # a card is still useful without the architecture section
        print0(f"[card] could not read the model at {ckpt} ({e}); the card leaves the architecture out")
        return {}
    cfg = model.config
    return {"config": asdict(cfg), "params": model.num_params(), "params_active": model.num_params(active=True),
            "params_non_embedding": model.num_params(exclude_embedding=True),
            "flops_per_token_fwd_bwd": model.flops_per_token(cfg.max_seq_len)}


def knowledge_cutoff(metas: list[dict]) -> tuple[str | None, str]:
    """(latest document date, where it came from): the data card's value, else the max meta["date"] of the docs."""
    for m in metas:
        card = Path(m["dir"]) / "data_card.json"
        if card.is_file():
            value = json.loads(card.read_text()).get("knowledge_cutoff")
            if value:
                return value, f"{card} (latest document date)"
    latest = None
    for m in metas:
        if m.get("stage") in ("curate", "corpus"):
            from ember.data.documents import read_shards
            try:
                for d in read_shards(m["dir"]):
                    date = (d.get("meta") or {}).get("date")
                    if isinstance(date, str) and (latest is None or date > latest):
                        latest = date
            except Exception:
                continue
            if latest:
                return latest, f"max meta.date of the {m['stage']} documents"
    return None, "unknown: no document carries a date"


def data_sources(metas: list[dict]) -> list[dict]:
    """Per source: documents kept, bytes, licenses (from the curation data card, else counted from the corpus)."""
    for m in metas:
        card = Path(m["dir"]) / "data_card.json"
        if card.is_file():
            return [{"source": s["source"], "docs": s.get("docs_out", 0), "bytes": s.get("bytes_out", 0),
                     "licenses": s.get("licenses", {})} for s in json.loads(card.read_text()).get("sources", [])]
    for m in metas:
        if m.get("stage") == "corpus":
            from ember.data.documents import read_shards
            out: dict[str, dict] = {}
            for d in read_shards(m["dir"]):
                s = out.setdefault(d["source"], {"source": d["source"], "docs": 0, "bytes": 0, "licenses": {}})
                s["docs"] += 1
                s["bytes"] += len(d["text"].encode())
                lic = str((d.get("meta") or {}).get("license") or "unknown")
                s["licenses"][lic] = s["licenses"].get(lic, 0) + 1
            return list(out.values())
    return []


def training_stages(metas: list[dict], facts: dict) -> list[dict]:
    rows = []
    for m in metas:
        met = m.get("metrics", {})
        flops = met.get("flops")
        if flops is None and met.get("tokens") and facts and m.get("stage") in TRAIN_STAGES:
            seq = m.get("config", {}).get("seq_len") or facts["config"]["max_seq_len"]
            per_tok = facts["flops_per_token_fwd_bwd"] if seq == facts["config"]["max_seq_len"] else None
            if per_tok is None:
                from ember.model.gpt import GPT, GPTConfig
                import torch
                with torch.device("meta"):
                    per_tok = GPT(GPTConfig(**facts["config"])).flops_per_token(seq)
            flops = met["tokens"] * per_tok
        keep = {k: v for k, v in met.items() if isinstance(v, (int, float)) and not k.startswith("rating/")}
        rows.append({"stage": m.get("stage"), "dir": m["dir"], "seconds": m.get("seconds"), "flops": flops,
                     "git_sha": m.get("git_sha"), "metrics": dict(list(keep.items())[:8])})
    return rows


def limitations(facts: dict, stages: list[dict], evals: dict | None, sources: list[dict], cutoff) -> list[str]:
    out = []
    n = facts.get("params")
    if n is not None and n < 1e9:
        out.append(f"A small model ({human(n)} parameters): expect factual errors, weak reasoning and repetition.")
    names = {s["stage"] for s in stages}
    if not names & set(ALIGN_STAGES):
        out.append("No preference alignment stage in its lineage: it may follow harmful requests and produce "
                   "toxic or biased text; do not deploy it to users without a guard.")
    if "sft" not in names:
        out.append("A base model (no supervised fine-tuning): it continues text rather than following instructions.")
    out.append(f"Knowledge ends at {cutoff}." if cutoff else "Its knowledge cutoff is unknown (documents carry no dates).")
    if sources:
        out.append("Trained only on: " + ", ".join(s["source"] for s in sources) + "; other domains and languages "
                   "are out of distribution.")
    if evals:
        dirty = [t for t, r in evals.get("tasks", {}).items() if (r.get("contamination") or {}).get("dirty")]
        if dirty:
            out.append(f"Training data overlaps eval items of {', '.join(dirty)}: see the clean-only scores.")
        if evals.get("config", {}).get("limit"):
            out.append(f"Scores come from a random subset of {evals['config']['limit']} items per task (see intervals).")
    else:
        out.append("Not evaluated: run `ember eval` and rebuild the card.")
    return out


def render(card: dict) -> str:
    from ember.eval.report import scores_table

    f = card["model"]
    lines = [f"# Model card: {card['name']}", "", f"Checkpoint `{card['checkpoint']}`, written by `ember card` from "
             f"the run's lineage.", "", "## Model", ""]
    if f:
        c = f["config"]
        arch = "MoE" if c.get("n_expert") else "dense"
        lines += [f"- Llama-style decoder-only transformer ({arch}): {c['n_layer']} layers, width {c['n_embd']}, "
                  f"{c['n_head']} heads ({c['n_kv_head']} KV heads), context {c['max_seq_len']} tokens, "
                  f"vocabulary {c['vocab_size']}",
                  f"- Parameters: {f['params']:,} ({f['params_non_embedding']:,} without the input embedding)"]
    else:
        lines.append("- Architecture: not readable from the checkpoint.")
    lines += ["", "## Training data", "", f"- Knowledge cutoff: {card['knowledge_cutoff'] or 'unknown'} "
              f"({card['knowledge_cutoff_source']})", "", "| source | documents | MB | licenses (documents) |",
              "|---|---|---|---|"]
    for s in card["data_sources"]:
        lic = ", ".join(f"{k} ({v})" for k, v in sorted(s["licenses"].items()))
        lines.append(f"| {s['source']} | {s['docs']:,} | {s['bytes'] / 1e6:.2f} | {lic} |")
    lines += ["", "## Training stages and compute", "", "| stage | wall time (s) | FLOPs | key metrics |", "|---|---|---|---|"]
    for s in card["stages"]:
        met = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in s["metrics"].items())
        lines.append(f"| {s['stage']} | {s['seconds'] if s['seconds'] is not None else '–'} | "
                     f"{human(s['flops']) if s['flops'] else '–'} | {met} |")
    total = sum(s["flops"] or 0 for s in card["stages"])
    if total:
        lines += ["", f"Total training compute: {human(total)} FLOPs (6N + attention per token, as model/gpt.py)."]
    lines += ["", "## Evaluation", ""]
    if card["eval"]:
        lines += scores_table(card["eval"]["tasks"])
    else:
        lines.append("No eval results found.")
    lines += ["", "## Known limitations", ""] + [f"- {x}" for x in card["limitations"]]
    lines += ["", "## Lineage", ""] + [f"- `{s['dir']}` ({s['stage']}, git {(s['git_sha'] or '?')[:10]})"
                                       for s in card["stages"]]
    return "\n".join(lines) + "\n"


def main(cfg: Config) -> dict:
    from ember.eval.harness import default_checkpoint

    ckpt = Path(cfg.checkpoint) if cfg.checkpoint else default_checkpoint(cfg.run)
    eval_dir = Path(cfg.eval) if cfg.eval else Path(cfg.run) / "eval"
    inputs = {"checkpoint": ckpt}
    if (eval_dir / "results.json").is_file():
        inputs["eval"] = eval_dir / "results.json"
    run = artifacts.begin("card", cfg, inputs=inputs)
    if run.cached:
        return run.metrics
    stage = stage_of(ckpt)
    metas = artifacts.lineage(stage) if stage else []
    facts = model_facts(ckpt)
    cutoff, cutoff_src = knowledge_cutoff(metas)
    sources = data_sources(metas)
    stages = training_stages(metas, facts)
    evals = artifacts.read_json(inputs["eval"]) if "eval" in inputs else None
    card = {"name": cfg.name or Path(cfg.run).name, "checkpoint": str(ckpt), "model": facts,
            "knowledge_cutoff": cutoff, "knowledge_cutoff_source": cutoff_src, "data_sources": sources,
            "stages": stages, "eval": evals, "limitations": limitations(facts, stages, evals, sources, cutoff)}
    artifacts.write_json(run.dir / "card.json", card)
    artifacts.write_text(run.dir / "MODEL_CARD.md", render(card))
    print0(f"[card] wrote {run.dir / 'MODEL_CARD.md'}")
    return run.finish({"stages": len(stages), "sources": len(sources), "evaluated": evals is not None,
                       "params": facts.get("params")})


if __name__ == "__main__":
    from ember.cli import module_main

    module_main(__name__)
