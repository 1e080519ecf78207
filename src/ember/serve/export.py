"""`ember export`: a checkpoint as a Hugging Face folder and/or one GGUF file, each verified by reading it back.

    ember export                                   # <run>/sft/final (else pretrain/final) -> <run>/export/{hf/,model.gguf}
    ember export --checkpoint=runs/a/pretrain/step_000400 --format=gguf --dtype=f16
    transformers.AutoModelForCausalLM.from_pretrained("runs/default/export/hf")      # or llama.cpp on model.gguf

The HF folder comes from model/hf.py's export_hf (config.json, model.safetensors, tokenizer files); the GGUF
from model/gguf.py (llama arch, llama.cpp's q/k layout). After writing, both are read back (import_hf; the
`gguf` package's reader) and every tensor is compared with the checkpoint: the largest difference is a metric
and anything beyond the dtype's rounding fails the stage.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ember.common import artifacts
from ember.common.config import require
from ember.common.errors import UserError
from ember.common.log import print0


@dataclass
class Config:
    run: str = "runs/default"  # run folder; this stage writes <run>/export/
    checkpoint: str = ""  # model to export (any format ember serves); "" = <run>/sft/final, else <run>/pretrain/final
    tokenizer: str = ""  # tokenizer.json; "" = beside the checkpoint, else <run>/tokenizer/tokenizer.json
    format: Literal["hf", "gguf", "both"] = "both"  # which files to write
    dtype: Literal["f32", "f16"] = "f32"  # GGUF matrix precision (f16 halves the file; norms stay f32)
    name: str = "ember"  # general.name in the GGUF metadata

    def __post_init__(self):
        require(bool(self.name), "name", self.name, "a non-empty model name")


PRESETS = {"quickstart": lambda: Config(), "smoke": lambda: Config(format="gguf")}


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if a.keys() != b.keys():
        raise UserError(f"read-back tensors differ in names: {sorted(a.keys() ^ b.keys())[:4]}")
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def main(cfg: Config) -> dict:
    from ember.serve.models import find_tokenizer, load_served
    from ember.serve.server import default_checkpoint

    ckpt = Path(cfg.checkpoint or default_checkpoint(cfg.run))
    if not ckpt.exists():
        raise UserError(f"export: no checkpoint at {ckpt}. Train first (`ember pipeline`) or pass --checkpoint=")
    tok_path = find_tokenizer(ckpt, cfg.tokenizer, cfg.run) if ckpt.is_dir() else (Path(cfg.tokenizer) if cfg.tokenizer else None)
    inputs = {"checkpoint": ckpt, **({"tokenizer": tok_path} if tok_path else {})}
    run = artifacts.begin("export", cfg, inputs=inputs)
    if run.cached:
        return run.metrics
    served = load_served(ckpt, cfg.tokenizer, run=cfg.run)
    model, tok = served.model.float(), served.tokenizer
    reference = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    metrics: dict = {"params": model.num_params()}

    if cfg.format in ("hf", "both"):
        from ember.model.hf import export_hf, import_hf

        from ember.tokenizer.chat import CHAT_TEMPLATE

        ember_tok = hasattr(tok, "role_id")  # only ember's tokenizer.json maps to HF files
        with tempfile.TemporaryDirectory() as tmp:
            hf_tok = getattr(tok, "path", None) if ember_tok else None
            if ember_tok and not (hf_tok and Path(hf_tok).is_file()):  # the one inside a GGUF: write it out
                hf_tok = Path(tmp) / "tokenizer.json"
                hf_tok.write_text(tok.hf.to_str())
            # the chat template always (sft/final has tokenizer.json beside it but no tokenizer_config.json)
            out = export_hf(model, run.dir / "hf", tokenizer_json=hf_tok, chat_template=CHAT_TEMPLATE if ember_tok else None)
        metrics["hf_max_abs_diff"] = max_abs_diff(import_hf(out).state_dict(), reference)
        if metrics["hf_max_abs_diff"] != 0.0:
            raise UserError(f"export: the HF folder reads back different weights (max diff {metrics['hf_max_abs_diff']})")
        print0(f"[export] HF folder {out} (tokenizer: {'yes' if hf_tok else 'no'}), read back identical")

    if cfg.format in ("gguf", "both"):
        from ember.model.gguf import export_gguf, load_gguf, read_gguf, to_gguf_tensors

        path = export_gguf(model, run.dir / "model.gguf", tok, dtype=cfg.dtype, name=cfg.name)
        _, tensors = read_gguf(path)  # raw file contents (q/k still in llama.cpp's layout)
        written = to_gguf_tensors(model)
        raw = max(float(abs(tensors[k] - written[k]).max()) for k in written)
        metrics["gguf_max_abs_diff"] = max(raw, max_abs_diff(load_gguf(path)[0].state_dict(), reference))
        metrics["gguf_bytes"] = path.stat().st_size
        tol = 0.0 if cfg.dtype == "f32" else 1e-2 * max(1.0, max(float(v.abs().max()) for v in reference.values()))
        if metrics["gguf_max_abs_diff"] > tol:
            raise UserError(f"export: the GGUF reads back different weights (max diff {metrics['gguf_max_abs_diff']})")
        print0(f"[export] GGUF {path} ({metrics['gguf_bytes'] / 1e6:.1f} MB, {cfg.dtype}), "
               f"read back max |diff| {metrics['gguf_max_abs_diff']:.2g}")
    return run.finish(metrics)


if __name__ == "__main__":
    from ember.cli import module_main

    module_main(__name__)
