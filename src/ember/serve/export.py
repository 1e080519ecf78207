"""`ember export`: a checkpoint as a Hugging Face folder and/or one GGUF file, each verified by reading it back.

    ember export                                   # <run>/sft/final (else pretrain/final) -> <run>/export/{hf/,model.gguf}
    ember export --checkpoint=runs/a/pretrain/step_000400 --format=gguf --gguf_type=f16
    ember export --format=gguf --gguf_type=q4_k_m        # f32 f16 bf16 q8_0 q6_k q4_0 q4_k q4_k_m, as llama.cpp mixes
    transformers.AutoModelForCausalLM.from_pretrained("runs/default/export/hf")      # or llama.cpp on model.gguf

The HF folder comes from model/hf.py's export_hf (config.json, model.safetensors, tokenizer files); the GGUF
from model/gguf.py (llama arch, llama.cpp's q/k layout). After writing, both are read back (import_hf; the
`gguf` package's reader) and every tensor is compared with the checkpoint: the largest difference is a metric
and anything beyond the dtype's rounding fails the stage. A quantized GGUF is read back dequantized and each
tensor's relative RMS error must stay within its type's bound (REL_ERR): a wrong block layout is off by ~100%.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
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
    gguf_type: Literal["f32", "f16", "bf16", "q8_0", "q6_k", "q4_0", "q4_k", "q4_k_m"] = "f32"  # GGUF matrix type:
    #   f16/bf16 halve the file, q8_0 ~quarters it, q4_* ~1/7 (bits per weight: 8.5, 6.56, 4.5); norms stay f32
    dtype: str = ""  # the old name of gguf_type (f32/f16), still read so saved configs and commands replay
    name: str = "ember"  # general.name in the GGUF metadata

    def __post_init__(self):
        require(bool(self.name), "name", self.name, "a non-empty model name")
        if self.dtype:
            from ember.model.gguf import check_gguf_type

            check_gguf_type(self.dtype)
            require(self.gguf_type in ("f32", self.dtype), "dtype", self.dtype, f"the old name of gguf_type; "
                    f"give only --gguf_type (it is {self.gguf_type!r})")
            self.gguf_type, self.dtype = self.dtype, ""


PRESETS = {"quickstart": lambda: Config(), "smoke": lambda: Config(format="gguf")}


# largest relative RMS error ||read back - weight|| / ||weight|| a tensor of each stored type may have; measured on
# SmolLM2-135M the worst tensors stay under half of these (4-bit ~0.1); a layout or permutation bug gives ~1
REL_ERR = {"F32": 0.0, "F16": 1e-3, "BF16": 8e-3, "Q8_0": 0.02, "Q6_K": 0.06, "Q5_0": 0.12, "Q4_0": 0.25,
           "Q4_K": 0.25}


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if a.keys() != b.keys():
        raise UserError(f"read-back tensors differ in names: {sorted(a.keys() ^ b.keys())[:4]}")
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def main(cfg: Config) -> dict:
    from ember.model.load import find_tokenizer, load
    from ember.serve.server import default_checkpoint

    ckpt = Path(cfg.checkpoint or default_checkpoint(cfg.run))
    if not ckpt.exists():
        raise UserError(f"export: no checkpoint at {ckpt}. Train first (`ember pipeline`) or pass --checkpoint=")
    tok_path = Path(cfg.tokenizer) if cfg.tokenizer else find_tokenizer(ckpt, cfg.run)
    inputs = {"checkpoint": ckpt, **({"tokenizer": tok_path} if tok_path else {})}
    run = artifacts.begin("export", cfg, inputs=inputs)
    if run.cached:
        return run.metrics
    model, tok = load(ckpt, tokenizer=cfg.tokenizer, run=cfg.run)
    from ember.model.quant import dequantize_model_

    model = dequantize_model_(model).float()  # an `ember compress` checkpoint: int8/int4 codes -> plain matrices
    if cfg.format in ("gguf", "both"):
        from ember.model.gguf import check_exportable, check_gguf_type

        check_gguf_type(cfg.gguf_type)  # both before the HF folder is written: nothing half-exported
        check_exportable(model.config)
    reference = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    metrics: dict = {"params": model.num_params()}

    if cfg.format in ("hf", "both"):
        from ember.model.hf import export_hf, import_hf

        # the model's own tokenizer files: same ids, chat template, BOS rule and stop tokens in transformers
        out = export_hf(model, run.dir / "hf", tok)
        metrics["hf_max_abs_diff"] = max_abs_diff(import_hf(out).state_dict(), reference)
        if metrics["hf_max_abs_diff"] != 0.0:
            raise UserError(f"export: the HF folder reads back different weights (max diff {metrics['hf_max_abs_diff']})")
        print0(f"[export] HF folder {out} (tokenizer and chat template included), read back identical")
        adapter = _peft_adapter(ckpt, run.dir, tok)
        if adapter:
            metrics["peft_adapter"] = str(adapter)

    if cfg.format in ("gguf", "both"):
        from ember.model.gguf import export_gguf, load_gguf, read_gguf, read_gguf_types, to_gguf_tensors

        path = export_gguf(model, run.dir / "model.gguf", tok, dtype=cfg.gguf_type, name=cfg.name)
        _, tensors = read_gguf(path)  # raw file contents, dequantized (q/k still in llama.cpp's layout)
        written, kinds = to_gguf_tensors(model), read_gguf_types(path)
        metrics["gguf_bytes"] = path.stat().st_size
        metrics["gguf_tensor_types"] = {t: sum(v == t for v in kinds.values()) for t in sorted(set(kinds.values()))}
        if cfg.gguf_type in ("f32", "f16", "bf16"):
            raw = max(float(abs(tensors[k] - written[k]).max()) for k in written)
            metrics["gguf_max_abs_diff"] = max(raw, max_abs_diff(load_gguf(path)[0].state_dict(), reference))
            tol = 0.0 if cfg.gguf_type == "f32" else \
                1e-2 * max(1.0, max(float(v.abs().max()) for v in reference.values()))
            if metrics["gguf_max_abs_diff"] > tol:
                raise UserError(f"export: the GGUF reads back different weights (max diff "
                                f"{metrics['gguf_max_abs_diff']})")
        # every type: each tensor's relative RMS error against its stored type's bound
        errs = {k: float(np.linalg.norm(tensors[k] - w) / max(float(np.linalg.norm(w)), 1e-30))
                for k, w in written.items()}
        metrics["gguf_max_rel_err"] = max(errs.values())
        bad = [f"{k} ({kinds[k]}: {e:.3g} > {REL_ERR[kinds[k]]})" for k, e in errs.items() if e > REL_ERR[kinds[k]]]
        if bad:
            raise UserError(f"export: the {cfg.gguf_type} GGUF reads back weights too far from the checkpoint: "
                            f"{', '.join(bad[:3])}; this is a bug in ember's GGUF writer, please report it")
        print0(f"[export] GGUF {path} ({metrics['gguf_bytes'] / 1e6:.1f} MB, {cfg.gguf_type}: "
               f"{metrics['gguf_tensor_types']}), read back, max relative error {metrics['gguf_max_rel_err']:.2g}")
    return run.finish(metrics)


def _peft_adapter(ckpt: Path, out: Path, tok) -> Path | None:
    """For a LoRA fine-tune (the checkpoint holds adapter.safetensors), the adapter as peft reads it, next to its
    base model as an HF folder: <out>/adapter/ (adapter_config.json + adapter_model.safetensors) and <out>/base/.
    `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)` is then the fine-tuned model."""
    from ember.model import lora
    from ember.model.hf import export_hf
    from ember.model.load import load_model

    if not (ckpt / lora.ADAPTER_FILE).is_file():
        return None
    _, info = lora.read_adapter(ckpt)
    base_path = info.get("base")
    if info.get("method") != "lora":  # QLoRA trained on the NF4-rounded base: peft on the original is another model
        print0(f"[export] {ckpt} holds a {info.get('method', '?')} adapter, trained on a quantized base: only the "
               f"merged HF folder is written (a peft adapter is exported for --method=lora)")
        return None
    if not base_path or not Path(base_path).exists():
        print0(f"[export] {ckpt} holds a LoRA adapter whose base ({base_path}) is not here: only the merged HF "
               f"folder is written")
        return None
    base = load_model(base_path).float()
    export_hf(base, out / "base", tok)
    lora.load_adapter(ckpt, base)
    path = lora.save_peft_adapter(out / "adapter", base, base_model_name_or_path=str((out / "base").resolve()))
    print0(f"[export] PEFT adapter {path} on the HF base {out / 'base'}")
    return path


if __name__ == "__main__":
    from ember.cli import module_main

    module_main(__name__)
