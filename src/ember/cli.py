"""The `ember` command: a plain table from subcommand to the stage module whose `main(cfg)` it runs.

    ember --help                      the stages
    ember pretrain --help             every setting with its default and why
    ember pretrain --preset=tiny --lr=3e-4 --dry-run

A stage module has a docstring, a `@dataclass Config`, `main(cfg) -> dict` and optionally `PRESETS`
(name -> function returning a Config). Modules are imported only when their stage runs, so `ember
--help` stays fast and a stage whose optional dependency is missing does not break the others.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import json
import sys
import dataclasses

from ember import __version__
from ember.common import artifacts
from ember.common.config import help_text, parse
from ember.common.errors import UserError

# name -> (module, one line for `ember --help`), in pipeline order.
STAGES: dict[str, tuple[str, str]] = {
    "corpus": ("ember.data.corpus", "collect documents (stdlib, local files, HF datasets) into Parquet shards"),
    "curate": ("ember.data.curate", "clean, filter, scrub PII, deduplicate and decontaminate documents"),
    "tokenizer": ("ember.tokenizer.train", "train a byte-level BPE tokenizer with special tokens"),
    "tokenize": ("ember.data.tokenize", "encode documents into flat token shards (train/val)"),
    "pretrain": ("ember.pretrain.train", "pretrain or mid-train the GPT on token shards"),
    "sample": ("ember.pretrain.sample", "generate text from a checkpoint"),
    "sft": ("ember.sft.train", "supervised fine-tuning on chat data: full, LoRA or QLoRA (NF4)"),
    "chat": ("ember.sft.chat", "talk to a checkpoint in the terminal (reads stdin lines; /quit exits)"),
    "reward": ("ember.align.reward", "train a reward model on preference pairs (held-out pairwise accuracy)"),
    "dpo": ("ember.align.dpo", "direct preference optimization (DPO/IPO) against a frozen reference, full or LoRA"),
    "ppo": ("ember.align.ppo", "RLHF: PPO against the reward model with a value model and adaptive KL control"),
    "grpo": ("ember.align.grpo", "RL with verifiable rewards (GRPO) on arithmetic or GSM8K-style tasks"),
    "constitution": ("ember.align.constitutional", "constitutional AI: self-critique SFT data and AI-labelled preference pairs"),
    "serve": ("ember.serve.server", "OpenAI-compatible HTTP API and chat page for a model (127.0.0.1)"),
    "compress": ("ember.compress.compress", "quantize (int8, w8a8, 4-bit RTN/GPTQ/AWQ) or prune a model, with a size/perplexity report"),
    "export": ("ember.serve.export", "write a checkpoint as an HF folder and/or GGUF, verified by reading back"),
    "eval": ("ember.eval.harness", "benchmarks, perplexity and code pass@k on a checkpoint, with intervals and contamination"),
    "arena": ("ember.eval.arena", "Bradley-Terry / Elo ratings from pairwise votes or an LLM judge"),
    "card": ("ember.eval.card", "write the model card from the run's lineage and eval results"),
    "distill": ("ember.compress.distill", "train a smaller student from a teacher's logits (forward/reverse KL, top-k cache)"),
    "pipeline": ("ember.pipeline", "run the stages in order, skipping finished ones"),
}


def available() -> dict[str, tuple[str, str]]:
    """The stages whose module is present in this build."""
    return {name: v for name, v in STAGES.items() if importlib.util.find_spec(v[0]) is not None}


def usage() -> str:
    stages = available()
    width = max(len(n) for n in stages)
    lines = [f"ember {__version__}: train a language model end to end", "",
             "usage: ember <stage> [--preset=NAME | --config=FILE] [--key=value ...] [--dry-run] [--force]", "",
             "stages:"]
    lines += [f"  {name.ljust(width)}  {desc}" for name, (_, desc) in stages.items()]
    lines += ["", "`ember <stage> --help` lists every setting of a stage with its default."]
    return "\n".join(lines)


def run(module_name: str, argv: list[str], prog: str) -> int:
    """Parse argv against the module's Config and call its main; user errors become exit code 2."""
    module = importlib.import_module(module_name)
    presets = getattr(module, "PRESETS", {})
    parsed = parse(module.Config, argv, presets)
    if parsed.help:
        print(help_text(module.Config, presets, prog, (module.__doc__ or "").strip()))
        return 0
    if parsed.dry_run:
        print(json.dumps(dataclasses.asdict(parsed.cfg), indent=2))
        return 0
    token = artifacts.FORCE.set(parsed.force)
    try:
        module.main(parsed.cfg)
    except BaseException as e:  # the stage's meta.json says failed, and why; the error still reaches the caller
        artifacts.fail_open_runs(f"{type(e).__name__}: {e}")
        raise
    finally:
        artifacts.FORCE.reset(token)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    stages = available()
    if name not in stages:
        close = difflib.get_close_matches(name, list(stages), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        print(f"error: unknown stage '{name}'.{hint} Run `ember --help` for the list.", file=sys.stderr)
        return 2
    return guarded(lambda: run(stages[name][0], rest, f"ember {name}"))


def guarded(fn) -> int:
    """Run fn; a UserError prints one clear line (no stack trace) and exits 2, Ctrl-C exits 130."""
    try:
        return fn()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def module_main(module_name: str) -> None:
    """For `python -m ember.<stage>.<file>` (and torchrun): the same parsing as the `ember` command."""
    raise SystemExit(guarded(lambda: run(module_name, sys.argv[1:], f"python -m {module_name}")))


if __name__ == "__main__":
    raise SystemExit(main())
