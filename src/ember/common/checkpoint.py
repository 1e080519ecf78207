"""Model checkpoints as self-describing safetensors files: the weights plus the GPTConfig JSON in the header.

    save_model("runs/demo/pretrain/final", model)     # -> runs/demo/pretrain/final/model.safetensors
    model = load_model("runs/demo/pretrain/final")    # the config comes from the file itself

save_state/load_state are the layer below: any {name: tensor} plus a JSON-able metadata dict, written
atomically; every way a file can be wrong (missing, truncated, garbage, other model) is a UserError
that names the file and the fix. Weights are never pickled.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ember.common import artifacts
from ember.common.config import from_dict
from ember.common.errors import UserError

MODEL_FILE = "model.safetensors"  # the file name inside a checkpoint folder
FORMAT = "ember.gpt"  # metadata["format"] of a model file written by save_model


def model_file(path_or_dir: str | Path) -> Path:
    """A .safetensors path is used as is; anything else is a folder holding model.safetensors."""
    p = Path(path_or_dir)
    return p if p.suffix == ".safetensors" else p / MODEL_FILE


def save_state(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None) -> None:
    """Write tensors and metadata (each value stored as JSON text in the safetensors header), atomically."""
    meta = {str(k): json.dumps(v, default=str) for k, v in (metadata or {}).items()}
    tensors = {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}
    with artifacts.atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_state(path: str | Path, device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, metadata) of a safetensors file; metadata values written by other tools stay strings."""
    path = Path(path)
    if not path.is_file():
        hint = " (a folder: pass the folder that holds model.safetensors, or the file itself)" if path.parent.is_dir() else ""
        raise UserError(f"checkpoint {path} does not exist{hint}. Check the path, e.g. <run>/pretrain/final.")
    try:
        tensors = load_file(str(path), device=str(device))
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"checkpoint {path} is not a readable safetensors file ({e}): it is truncated or corrupt "
                        f"(an interrupted copy or write?). Copy it again or use an earlier checkpoint.") from None
    metadata = {}
    for k, v in raw.items():
        try:
            metadata[k] = json.loads(v)
        except json.JSONDecodeError:
            metadata[k] = v
    return tensors, metadata


# ---------------------------------------------------------------------------- models

def save_model(path_or_dir: str | Path, model, metadata: dict[str, Any] | None = None) -> Path:
    """Save a GPT's weights with its config (a torch.compile wrapper is unwrapped). Returns the file."""
    model = getattr(model, "_orig_mod", model)
    path = model_file(path_or_dir)
    meta = {"format": FORMAT, "config": dataclasses.asdict(model.config), **(metadata or {})}
    if getattr(model, "quant", None):  # a quantized model (model/quant.py): its scheme rebuilds the modules at load
        meta["quant"] = model.quant
    save_state(path, model.state_dict(), meta)
    return path


def load_model(path_or_dir: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
    """Rebuild the GPT a file was saved from (its config read from the file). dtype None keeps the saved one."""
    from ember.model.gpt import GPTConfig, build_model  # the model imports common/, not the other way round

    path = model_file(path_or_dir)
    tensors, meta = load_state(path, device)
    if meta.get("format", FORMAT) != FORMAT:
        raise UserError(f"checkpoint {path} holds a {meta['format']!r} model, not an ember language model "
                        f"({FORMAT!r}); load it with the stage that wrote it (e.g. a reward model: align/reward.py).")
    if not isinstance(meta.get("config"), dict):
        raise UserError(f"checkpoint {path} has no ember model config in its metadata, so it was not written by "
                        f"ember's save_model (a Hugging Face folder? use ember.model.hf.import_hf).")
    config = from_dict(GPTConfig, meta["config"], where=f"the config stored in {path}")
    check_layer_count(config, tensors, path)
    model = build_model(config, "meta", init=False)  # shapes first: a config may claim any size
    if isinstance(meta.get("quant"), dict):  # int8/int4 codes load into quantized modules, never de-quantized here
        from ember.model.quant import quant_skeleton_

        quant_skeleton_(model, meta["quant"])
    check_fit(model, tensors, path)
    model.to_empty(device=device)
    if "tok_emb.weight" in tensors:
        model.to(dtype or tensors["tok_emb.weight"].dtype)
    model.load_state_dict(tensors)
    return model


_LAYER = re.compile(r"(?:^|\.)(?:layers|blk)\.(\d+)\.")


def check_layer_count(config, names, path) -> None:
    """A config's n_layer against the blocks a file's tensor names cover (ember/HF "layers.N.", GGUF "blk.N."),
    before anything is built: a header claiming a million layers would otherwise build a million blocks."""
    ids = {int(m.group(1)) for n in names if (m := _LAYER.search(n))}
    have = max(ids) + 1 if ids else 0
    if have != config.n_layer:
        raise UserError(f"{path}: its config says {config.n_layer} layers but its tensors hold {have}; the file is "
                        f"damaged or not what it claims to be. Re-export it from the model it came from.")


def load_weights(model, path_or_dir: str | Path) -> None:
    """Load a checkpoint into an existing GPT; the file's config must equal the model's."""
    path = model_file(path_or_dir)
    tensors, meta = load_state(path, model.tok_emb.weight.device)
    saved = meta.get("config")
    if isinstance(saved, dict):
        from ember.model.gpt import GPTConfig

        # rebuilt, so a file saved before a field existed compares with that field's default
        saved = dataclasses.asdict(from_dict(GPTConfig, saved, where=f"the config stored in {path}"))
        ours = dataclasses.asdict(model.config)
        diff = {k: (saved.get(k), v) for k, v in ours.items() if saved.get(k) != v}
        if diff:
            shown = ", ".join(f"{k}={a!r} (model has {b!r})" for k, (a, b) in list(diff.items())[:6])
            raise UserError(f"checkpoint {path} was saved from another model config: {shown}. Build the model from "
                            f"the checkpoint (load_model) or set the --model.* settings to match.")
    check_fit(model, tensors, path)
    model.load_state_dict(tensors)


def check_fit(model, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Every name and shape of the model (on any device, meta included) found in the file, and no more."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    shapes = [f"{k} {tuple(tensors[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in tensors and tensors[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = [f"{name} {items[:3]}{' ...' if len(items) > 3 else ''}" for name, items in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape (file vs model)", shapes)) if items]
        raise UserError(f"checkpoint {path} does not fit the model: {'; '.join(parts)}. Load it with the config "
                        f"it was saved with (load_model reads it from the file), or pick the matching checkpoint.")
