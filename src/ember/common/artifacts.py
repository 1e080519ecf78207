"""Run folders, atomic writes, content hashes and lineage.

Every stage writes `<run>/<stage>/` holding its outputs, `config.json` (replay with --config) and
`meta.json`: resolved config, input artifacts with content hashes, ember version + git sha, start/end
time, metrics and a `status`. Only a meta.json with status "finished" marks finished work, and it is the
last file a stage writes, so a crash at any point leaves a folder that does not look finished.

    run = artifacts.begin("tokenize", cfg, inputs={"docs": docs_dir, "tokenizer": tok_file})
    if run.cached:
        return run.metrics
    ...write files into run.dir...
    return run.finish({"tokens": n})
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
import typing
from pathlib import Path
from typing import Any, Iterator

import ember
from ember.common.errors import UserError
from ember.common.log import print0

# Set by `--force` on the command line: rerun a stage even when a finished run matches.
FORCE: contextvars.ContextVar[bool] = contextvars.ContextVar("ember_force", default=False)


# ---------------------------------------------------------------------------- atomic writes

@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it is renamed over `path` (atomic on POSIX).

    On an exception the temp file is removed and the previous `path`, if any, stays intact.
    Works for files and for folders (a folder target must not exist or is replaced whole).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    tmp.unlink()  # the writer creates it (as a file or a folder)
    try:
        yield tmp
        if tmp.is_dir() and path.is_dir():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


# ---------------------------------------------------------------------------- hashing

def hash_path(path: str | Path) -> str:
    """sha256 of a file's bytes (same as `sha256sum`), or of a folder's (relative path, file hash) pairs.

    Hidden entries (temp files of atomic writes) are ignored, so a folder hashes the same however it was written.
    """
    path = Path(path)
    if path.is_file():
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    if not path.is_dir():
        raise FileNotFoundError(f"cannot hash {path}: no such file or folder")
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        rel = f.relative_to(path)
        if f.is_file() and not any(part.startswith(".") for part in rel.parts):
            h.update(f"{rel.as_posix()}\0{hash_path(f)}\n".encode())
    return h.hexdigest()


def config_hash(cfg) -> str:
    """The hash that decides "same config": of every setting but `run` (where the run lives, however it is
    spelled: runs/a, ./runs/a/, a copy elsewhere), with ints in float fields as floats (8 == 8.0, as a
    --config replay reads them). What a stage reads from the run folder is hashed as its inputs."""
    def normalized(c, top: bool) -> dict:
        hints = typing.get_type_hints(type(c))
        out = {}
        for f in dataclasses.fields(c):
            v = getattr(c, f.name)
            if top and f.name == "run":
                continue
            if dataclasses.is_dataclass(v):
                v = normalized(v, False)
            elif hints.get(f.name) is float and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            out[f.name] = v
        return out

    blob = json.dumps(normalized(cfg, True), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def git_sha() -> str | None:
    """The commit of the ember source tree, when it is a git checkout (None for an installed wheel)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------- stage runs

@dataclasses.dataclass(eq=False)  # compared by identity (the open-runs list)
class StageRun:
    stage: str
    dir: Path
    meta: dict
    cached: bool = False

    @property
    def metrics(self) -> dict:
        return self.meta.get("metrics", {})

    def finish(self, metrics: dict | None = None) -> dict:
        """Mark the stage finished: config.json, then meta.json (status finished) written last."""
        if self in _OPEN:
            _OPEN.remove(self)
        self.meta.update(status="finished", ended=_now(), metrics=metrics or {})
        self.meta["seconds"] = round((dt.datetime.fromisoformat(self.meta["ended"])
                                      - dt.datetime.fromisoformat(self.meta["started"])).total_seconds(), 3)
        write_json(self.dir / "config.json", self.meta["config"])
        write_json(self.dir / "meta.json", self.meta)
        return self.metrics

    def fail(self, error: str) -> None:
        if self in _OPEN:
            _OPEN.remove(self)
        self.meta.update(status="failed", ended=_now(), error=error)
        write_json(self.dir / "meta.json", self.meta)


_OPEN: list[StageRun] = []  # begun and not yet finished, in this process


def fail_open_runs(error: str) -> None:
    """Mark every stage run this process began and did not finish as failed (the CLI calls this when a stage
    raises), so meta.json says `failed` with the error instead of a stale `running`."""
    for run in list(_OPEN):
        run.fail(error)


def stage_dir(cfg, stage: str) -> Path:
    return Path(cfg.run) / stage


def read_meta(folder: str | Path) -> dict | None:
    p = Path(folder) / "meta.json"
    try:
        return read_json(p)
    except (OSError, json.JSONDecodeError):
        return None


def is_finished(folder: str | Path) -> bool:
    meta = read_meta(folder)
    return bool(meta) and meta.get("status") == "finished"


def begin(stage: str, cfg, inputs: dict[str, str | Path] | None = None, out_dir: str | Path | None = None) -> StageRun:
    """Open `<cfg.run>/<stage>/` for writing, or report it cached.

    Cached = a finished meta.json with the same config hash and the same input content hashes (and no
    --force). An unfinished folder with the same config and inputs is kept, so a stage can resume from its
    own checkpoints; any other existing folder is stale and is cleared.
    """
    folder = Path(out_dir) if out_dir is not None else stage_dir(cfg, stage)
    inputs_meta = {}
    for name, p in (inputs or {}).items():
        if isinstance(p, dict):  # not a file: a dataset's identity with its own sha256 (common/records.input_identity)
            inputs_meta[name] = {**p, "finished_stage": False}
            continue
        p = Path(p)
        if not p.exists():
            raise UserError(f"{stage}: input '{name}' not found at {p}. Run the stage that makes it first "
                            f"(or `ember pipeline`), or point the config at an existing path.")
        inputs_meta[name] = {"path": str(p), "sha256": hash_path(p), "finished_stage": is_finished(p)}
    chash = config_hash(cfg)
    old = read_meta(folder)
    same = bool(old) and old.get("config_hash") == chash and _input_hashes(old) == _input_hashes({"inputs": inputs_meta})
    if same and old.get("status") == "finished" and not FORCE.get():
        print0(f"[{stage}] cached: the finished run in {folder} matches this config and inputs (--force reruns)")
        return StageRun(stage, folder, old, cached=True)
    if folder.exists() and (FORCE.get() or not same):
        _check_clearable(stage, folder, old, inputs_meta)
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {
        "stage": stage,
        "status": "running",
        "config": dataclasses.asdict(cfg),
        "config_hash": chash,
        "inputs": inputs_meta,
        "ember_version": ember.__version__,
        "git_sha": git_sha(),
        "python": platform.python_version(),
        "host": platform.node(),
        "started": _now(),
        "resumed_from": old.get("started") if same and old else None,
    }
    write_json(folder / "meta.json", meta)
    run = StageRun(stage, folder, meta)
    _OPEN.append(run)
    return run


def _check_clearable(stage: str, folder: Path, old: dict | None, inputs_meta: dict) -> None:
    """A stale output folder is deleted whole: refuse when that would delete what ember did not write there
    (a folder without this stage's meta.json) or one of this run's own inputs."""
    if any(folder.iterdir()) and (old or {}).get("stage") != stage:
        raise UserError(f"{stage}: the output folder {folder} exists and is not a run of `ember {stage}` (no meta.json "
                        f"of that stage), so rerunning would delete it. Move it, or choose another --run folder.")
    out = folder.resolve()
    for name, m in inputs_meta.items():
        p = Path(m["path"]).resolve()
        if p == out or out in p.parents:
            raise UserError(f"{stage}: input '{name}' ({m['path']}) lies inside this stage's output folder {folder}, "
                            f"which a rerun clears. Move the input out of {folder} and point the config at it.")


def _input_hashes(meta: dict) -> dict:
    return {k: v["sha256"] for k, v in meta.get("inputs", {}).items()}


def lineage(folder: str | Path) -> list[dict]:
    """Metas of a stage and, recursively, of every stage folder it consumed (inputs first)."""
    seen, out = set(), []

    def visit(f: Path):
        f = f.resolve()
        if f in seen:
            return
        seen.add(f)
        meta = read_meta(f)
        if meta is None or "stage" not in meta:  # not a stage folder (e.g. a token-shard meta.json)
            return
        for inp in meta.get("inputs", {}).values():
            p = Path(inp["path"])
            for cand in (p, p.parent):  # an input may be a stage folder or a file inside one
                if "stage" in (read_meta(cand) or {}):
                    visit(cand)
                    break
        out.append({"dir": str(f), **meta})

    visit(Path(folder))
    return out
