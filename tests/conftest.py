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

