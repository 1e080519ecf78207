"""Training-state checkpoints: weights, optimizer, RNG and recipe state, saved atomically; resume is exact.

    <stage>/step_000100/model.safetensors       weights + model config (common/checkpoint.py format)
                        optimizer.safetensors   AdamW moments and step per parameter, "<fqn>/<key>"
                        train_state.json        step, optimizer hyperparameters, recipe state (loader, guard...)
                        rng/rank_00000.json     python, numpy and torch RNG states of each rank
                        dcp/                    instead of the two safetensors when sharded (FSDP2/TP)

No weights are pickled. A DCP checkpoint's index (`dcp/.metadata`) is a pickle, as are its non-tensor
values: on load the index is unpickled first with only DCP's metadata classes allowed, and the values with
torch.load(weights_only=True), so a hostile checkpoint cannot run code. A checkpoint is written into `.step_000100.tmp/` and renamed when complete, so a
folder named step_* is always whole; keep_last prunes the oldest. A DCP checkpoint reshards on load, so a
run saved at world size 2 resumes at world size 1 (and the reverse).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ember.common import artifacts, dist
from ember.common.checkpoint import MODEL_FILE, load_state, save_model, save_state
from ember.common.errors import UserError

STEP_RE = re.compile(r"^step_(\d{6,})$")


def step_dir(stage_dir: str | Path, step: int) -> Path:
    return Path(stage_dir) / f"step_{step:06d}"


def checkpoints(stage_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    folder = Path(stage_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_RE.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest(stage_dir: str | Path, before: int | None = None) -> Path | None:
    """The newest complete checkpoint (with step < before, if given)."""
    found = [p for s, p in checkpoints(stage_dir) if before is None or s < before]
    return found[-1] if found else None


# ---------------------------------------------------------------------------- state pieces

def _state_dicts(model: nn.Module, optimizer, full: bool):
    """Model and optimizer state keyed by parameter name (FQN), whatever the wrapping (DDP, FSDP2, TP).
    full=True gathers sharded tensors into whole ones (a collective: every rank must call it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=full, cpu_offload=full and dist.is_sharded(model))
    return get_state_dict(model, optimizer, options=opts)


def _flatten_optimizer(osd: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tensors = {}
    for fqn, state in osd["state"].items():
        for key, value in state.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{fqn}/{key}"] = t.detach().cpu().contiguous()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in osd["param_groups"]]
    return tensors, groups


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict:
    state: dict[str, dict] = {}
    for name, t in tensors.items():
        fqn, key = name.rsplit("/", 1)
        state.setdefault(fqn, {})[key] = t
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in groups]
    return {"state": state, "param_groups": groups}


def rng_state() -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    out = {"python": [py[0], list(py[1]), py[2]],
           "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
           "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state().tolist()
    return out


def set_rng_state(state: dict) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


# ---------------------------------------------------------------------------- save / load

def save(stage_dir: str | Path, step: int, model: nn.Module, optimizer, model_config, state: dict,
         keep_last: int = 0) -> Path:
    """Write `<stage_dir>/step_{step:06d}/` atomically; every rank calls this (sharded state is collective).

    state: the recipe's own JSON-able state (loader position, spike guard, grad scaler, counters).
    keep_last > 0 then deletes all but the newest keep_last checkpoints.
    """
    final = step_dir(stage_dir, step)
    tmp = final.with_name(f".{final.name}.tmp")
    sharded = dist.is_sharded(model)
    if dist.rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    dist.barrier()
    meta = {"step": step, "world_size": dist.world_size(), "sharded": sharded, "state": state,
            "model_config": dataclasses.asdict(model_config)}
    if sharded:
        import torch.distributed.checkpoint as dcp

        msd, osd = _state_dicts(model, optimizer, full=False)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / "dcp"))
        meta["param_groups"] = _flatten_optimizer({"state": {}, "param_groups": osd["param_groups"]})[1]
    else:
        msd, osd = _state_dicts(model, optimizer, full=True)
        if dist.rank() == 0:
            save_model(tmp, as_model(msd, model_config))
            tensors, meta["param_groups"] = _flatten_optimizer(osd)
            save_state(tmp / "optimizer.safetensors", tensors)
    artifacts.write_json(tmp / "rng" / f"rank_{dist.rank():05d}.json", rng_state())
    dist.barrier()
    if dist.rank() == 0:
        artifacts.write_json(tmp / "train_state.json", meta)
        if final.exists():  # a checkpoint of this step from a run that was rolled back: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep_last > 0:
            for _, old in checkpoints(stage_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's index holds dataclasses of torch.distributed.checkpoint, torch.Size, dtypes and layouts; any other
    global in the pickle (os.system, ...) is refused."""
    ALLOWED = {"torch.distributed.checkpoint.metadata": "classes", "torch.distributed.checkpoint.filesystem":
               {"_StorageInfo"}, "torch.serialization": {"_get_layout"}, "pathlib": {"PosixPath", "PurePosixPath"},
               "pathlib._local": {"PosixPath", "PurePosixPath"}}  # where Python 3.13 pickles them from

    def find_class(self, module, name):
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        allowed = self.ALLOWED.get(module, ())
        if allowed == "classes" or name in allowed:
            obj = super().find_class(module, name)
            if allowed != "classes" or isinstance(obj, type):
                return obj
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a DCP checkpoint index")


def _check_dcp(folder: Path) -> None:
    """Unpickle the index with _MetadataUnpickler before DCP does (with plain pickle)."""
    for index in sorted(folder.glob("*.metadata")) or [folder / ".metadata"]:
        try:
            with open(index, "rb") as f:
                _MetadataUnpickler(f).load()
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as e:
            raise UserError(f"{index}: not a checkpoint index ember can trust ({e}). Delete this checkpoint "
                            f"folder ({folder.parent}) to start over, or resume from another step_*.") from None


def _safe_load_planner():
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class SafeLoadPlanner(DefaultLoadPlanner):
        """Non-tensor values (optimizer hyperparameters) with weights_only=True, not DCP's plain unpickling."""

        def load_bytes(self, read_item, value):
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._traverse import set_element
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafeLoadPlanner()


def load(folder: str | Path, model: nn.Module, optimizer, restore_rng: bool = True) -> dict:
    """Restore model and optimizer (any wrapping, any world size) from a checkpoint; returns its metadata
    ({"step", "world_size", "sharded", "state", ...}). RNG comes back when the world size is unchanged."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    folder = Path(folder)
    meta = json.loads((folder / "train_state.json").read_text())
    if meta["sharded"]:
        import torch.distributed.checkpoint as dcp

        msd, osd = _state_dicts(model, optimizer, full=False)  # templates to load into, laid out like this run
        box = {"model": msd, "optim": osd}
        _check_dcp(folder / "dcp")
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=".*load in a single process")
            dcp.load(box, checkpoint_id=str(folder / "dcp"), planner=_safe_load_planner())
        set_state_dict(model, optimizer, model_state_dict=box["model"], optim_state_dict=box["optim"])
    else:
        msd = load_state(folder / MODEL_FILE)[0]
        osd = _unflatten_optimizer(load_state(folder / "optimizer.safetensors")[0], meta["param_groups"])
        set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd,
                       options=StateDictOptions(full_state_dict=True))
    rng_file = folder / "rng" / f"rank_{dist.rank():05d}.json"
    if restore_rng and meta["world_size"] == dist.world_size() and rng_file.is_file():
        set_rng_state(json.loads(rng_file.read_text()))
    return meta


def save_final(folder: str | Path, model: nn.Module, model_config) -> None:
    """Whole weights (gathered if sharded) + config as safetensors, for the stages that come next."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = StateDictOptions(full_state_dict=True, cpu_offload=dist.is_sharded(model))
    msd = get_model_state_dict(model, options=full)
    if dist.rank() == 0:
        with artifacts.atomic_path(folder) as tmp:
            save_model(tmp, as_model(msd, model_config))
    dist.barrier()


def as_model(state_dict: dict, model_config) -> nn.Module:
    """A plain GPT holding these (full, CPU) tensors without copying them, for save_model."""
    from ember.model.gpt import build_model

    model = build_model(model_config, "meta", init=False)
    model.load_state_dict(state_dict, assign=True)
    return model
