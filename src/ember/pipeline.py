"""Run the stages in order, like `make`: a stage whose finished run matches its config and inputs is skipped.

    ember pipeline                                   # the quickstart recipe on the stdlib corpus
    ember pipeline --preset=smoke                    # the same stages, tiny, for CI (< 2 minutes)
    ember pipeline --from=pretrain --to=sample --force

A recipe is a function `run_folder -> [(stage name, stage main, stage Config), ...]`; each stage's
`main(cfg)` records its own inputs and caching through `common/artifacts.py`. Every stage of one
pipeline writes into the same run folder, so later stages find earlier outputs by convention.
"""

from __future__ import annotations

import importlib
import importlib.util
import time
from dataclasses import dataclass
from typing import Callable, ClassVar

from ember.common.config import require
from ember.common.errors import UserError
from ember.common.log import print0

Step = tuple[str, Callable[[object], dict], object]  # (stage name, its main, its Config instance)


# The quickstart recipe, in order. Each name is a row of cli.STAGES; stages whose module is not in this
# build are left out, so the recipe grows as the stages land. The alignment stages branch off sft/final.
# grpo is not here: its verifiable rewards (arithmetic) are all 0 for a 5M-parameter model of stdlib code,
# so it would run and learn nothing; `ember grpo` and its tests exercise it.
QUICKSTART = ["corpus", "curate", "tokenizer", "tokenize", "pretrain", "sample",
              "sft", "reward", "dpo", "ppo", "constitution", "eval", "card"]


def quickstart(run: str, smoke: bool = False) -> list[Step]:
    """stdlib corpus -> curate -> tokenizer -> tokenize -> pretrain -> sample -> sft -> reward -> dpo ->
    ppo -> constitution -> eval -> card, each stage with its own "quickstart" (or "smoke") preset, all in
    one run folder."""
    from ember.cli import STAGES

    steps: list[Step] = []
    for name in QUICKSTART:
        module_name = STAGES[name][0]
        if importlib.util.find_spec(module_name) is None:
            continue
        module = importlib.import_module(module_name)
        cfg = module.PRESETS["smoke" if smoke else "quickstart"]()
        cfg.run = run
        steps.append((name, module.main, cfg))
    return steps


RECIPES: dict[str, Callable[[str], list[Step]]] = {
    "quickstart": quickstart,
    "smoke": lambda run: quickstart(run, smoke=True),
}


@dataclass
class Config:
    recipe: str = "quickstart"  # which stage list to run: quickstart (≤15 min on 2 CPU cores) or smoke (<2 min)
    run: str = "runs/quickstart"  # run folder; stage s writes <run>/<s>/
    from_stage: str = ""  # first stage to run (--from); empty = the first
    to_stage: str = ""  # last stage to run (--to); empty = the last

    ALIASES: ClassVar[dict] = {"from": "from_stage", "to": "to_stage"}

    def __post_init__(self):
        require(self.recipe in RECIPES, "recipe", self.recipe, f"one of {', '.join(RECIPES)}")


PRESETS = {
    "quickstart": lambda: Config(recipe="quickstart", run="runs/quickstart"),
    "smoke": lambda: Config(recipe="smoke", run="runs/smoke"),
}


def select(steps: list[Step], start: str, stop: str) -> list[Step]:
    """The contiguous range start..stop (inclusive) of the steps, by stage name."""
    names = [n for n, _, _ in steps]
    for flag, value in (("--from", start), ("--to", stop)):
        if value and value not in names:
            raise UserError(f"{flag}={value}: not a stage of this recipe; its stages are {', '.join(names)}")
    i = names.index(start) if start else 0
    j = names.index(stop) if stop else len(names) - 1
    if i > j:
        raise UserError(f"--from={start} comes after --to={stop}; the order is {', '.join(names)}")
    return steps[i:j + 1]


def run_steps(steps: list[Step]) -> dict[str, dict]:
    """Call each stage's main(cfg) in order; returns stage name -> metrics."""
    results = {}
    for name, stage_main, cfg in steps:
        t0 = time.time()
        print0(f"[pipeline] {name} ...")
        results[name] = stage_main(cfg)
        print0(f"[pipeline] {name} done in {time.time() - t0:.1f}s")
    return results


def main(cfg: Config) -> dict:
    steps = RECIPES[cfg.recipe](cfg.run)
    if not steps:
        raise UserError(f"recipe '{cfg.recipe}' has no stages in this build")
    t0 = time.time()
    results = run_steps(select(steps, cfg.from_stage, cfg.to_stage))
    print0(f"[pipeline] {len(results)} stage(s) in {(time.time() - t0) / 60:.1f} min, outputs in {cfg.run}/")
    if "card" in results:
        print0(f"[pipeline] the model card: {cfg.run}/card/MODEL_CARD.md; talk to the model: "
               f"ember chat --run={cfg.run} (terminal) or ember serve --run={cfg.run} (web chat + OpenAI API)")
    return results


if __name__ == "__main__":
    from ember.cli import module_main

    module_main(__name__)
