"""The machine line the benchmarks print beside their tables."""

import platform
import subprocess


def cpu_name() -> str:
    """The CPU's model name from `lscpu`, else Python's guess."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"
