"""ember: train a language model end to end, from raw text to a served, evaluated model."""

import ctypes
import os
import sys

# Idle intra-op threads sleep instead of spinning (libgomp reads this once, when torch loads). Spinning
# threads steal the cores that other processes need: on a busy 2-core machine a CPU training step of the
# quickstart model took 4-11 s with spinning and 1.4-1.8 s without. OMP_WAIT_POLICY=ACTIVE restores spinning.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _keep_freed_memory() -> bool:
    """Let glibc reuse freed memory for large tensors instead of returning it to the OS (Linux only).

    glibc serves allocations above 32 MiB with a fresh mmap and unmaps them on free, so every training step
    page-faults its logits, log-probs and gradients back in, zero-filled by the kernel: 12% of an fp32 and 25%
    of a bf16 CPU step of the small benchmark model (2048 x 8192 fp32 logits are 64 MiB). Heap allocations up
    to 1 GiB, trimmed only past 2 GiB of free heap, reuse the same pages, as jemalloc/tcmalloc (PyTorch's CPU
    tuning guide) or a GPU caching allocator would; the cost is that the process keeps its peak memory. A user's own
    MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_, or EMBER_MALLOC=default (or 0/off), leaves glibc's defaults.
    """
    if not sys.platform.startswith("linux") or \
            os.environ.get("EMBER_MALLOC", "").lower() in ("default", "0", "off", "false", "no") or \
            any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h; values are C ints (< 2 GiB)
    return bool(mallopt(M_MMAP_THRESHOLD, 2**30) and mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


KEEPS_FREED_MEMORY = _keep_freed_memory()

__version__ = "0.1.0"
