"""Logging: rank-0 step lines, a progress bar for long work, metrics to JSONL and TensorBoard.

    step 00100/02000 | loss 3.2100 | lr 1.0e-03 | dt 210ms | tok/s 12.3k | mfu 41.0%
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def print0(*args, **kwargs) -> None:
    """print on rank 0 only (every process of a torchrun job runs the same code)."""
    if rank() == 0:
        print(*args, **kwargs, flush=True)


def human(n: float) -> str:
    """12345 -> '12.3k', 2.5e9 -> '2.50G'."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}" if abs(n) / div < 100 else f"{n / div:.0f}{unit}"
    return f"{n:.3g}" if isinstance(n, float) else str(n)


def step_line(step: int, total: int, **metrics: float) -> str:
    """The fixed-format step line; known keys get their units, others print as `key value`."""
    width = max(5, len(str(total)))
    parts = [f"step {step:0{width}d}/{total:0{width}d}"]
    for key, v in metrics.items():
        if v is None:
            continue
        if key == "lr":
            parts.append(f"lr {v:.1e}")
        elif key == "dt":  # seconds in, milliseconds out
            parts.append(f"dt {v * 1000:.0f}ms")
        elif key in ("tok/s", "tok_per_s"):
            parts.append(f"tok/s {human(v)}")
        elif key == "mfu":  # fraction in, percent out
            parts.append(f"mfu {v * 100:.1f}%")
        elif isinstance(v, float):
            parts.append(f"{key} {v:.4f}" if math.isfinite(v) else f"{key} {v}")
        else:
            parts.append(f"{key} {v}")
    return " | ".join(parts)


class Progress:
    """A progress bar on stderr for long work, drawn only when stderr is a terminal (and on rank 0)."""

    def __init__(self, total: int | None, desc: str = "", unit: str = "it", stream=None):
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream or sys.stderr
        self.enabled = rank() == 0 and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.n, self.t0, self._last = 0, time.perf_counter(), 0.0

    def update(self, k: int = 1) -> None:
        self.n += k
        now = time.perf_counter()
        if self.enabled and (now - self._last > 0.1 or self.n == self.total):
            self._last = now
            rate = self.n / max(now - self.t0, 1e-9)
            if self.total:
                frac = min(self.n / self.total, 1.0)
                bar = "#" * int(frac * 30)
                text = f"\r{self.desc} [{bar:<30}] {self.n}/{self.total} {human(rate)} {self.unit}/s"
            else:
                text = f"\r{self.desc} {self.n} {human(rate)} {self.unit}/s"
            self.stream.write(text)
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def progress(items: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it") -> Iterator[T]:
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(total, desc, unit) as bar:
        for x in items:
            yield x
            bar.update()


class Metrics:
    """Metrics: one JSON line per call in `<dir>/metrics.jsonl`, TensorBoard events if asked.

    Only rank 0 writes. The JSONL is flushed every call, so a killed run keeps every logged step. A run that
    starts over starts the file over; one that resumes from a checkpoint opens it with resume=True and calls
    resume_at(step), so every step appears once.
    """

    def __init__(self, folder: str | Path, tensorboard: bool = False, resume: bool = False):
        self.enabled = rank() == 0
        self.path = Path(folder) / "metrics.jsonl"
        self.tb = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a" if resume else "w", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package

            # purge_step 0 hides a previous attempt's events when starting over
            self.tb = SummaryWriter(log_dir=str(Path(folder) / "tb"), purge_step=None if resume else 0)

    def log(self, step: int, **values: float) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **values}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def resume_at(self, step: int) -> None:
        """Forget the rows logged after `step`: a run resumed from step's checkpoint logs those steps again
        (TensorBoard: purge_step). A torn last line of a killed run goes too. Rewritten atomically."""
        if not self.enabled:
            return
        from ember.common.artifacts import atomic_path  # artifacts imports this module

        self.file.close()
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines(keepends=True):
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(kept), encoding="utf-8")
        self.file = open(self.path, "a", encoding="utf-8")
        if self.tb is not None:
            from torch.utils.tensorboard import SummaryWriter

            log_dir = self.tb.log_dir
            self.tb.close()
            self.tb = SummaryWriter(log_dir=log_dir, purge_step=step + 1)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
