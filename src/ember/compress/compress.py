"""`ember compress`: quantize or prune a model (any format load() reads) into an ember checkpoint that eval,
serve, sample and export read, with a report of size and held-out perplexity before and after.

    ember compress --method=int8                                   # <run>/sft/final (else pretrain/final)
    ember compress --model=SmolLM2-135M-Instruct.Q4_1.gguf --method=gptq --group_size=64 \\
        --calib=../shared/datasets/wikitext2/valid.txt --run=runs/smol
    ember compress --method=awq --calib=stdlib                     # pydoc topics of this Python as calibration
    ember compress --method=wanda --sparsity=0.5 --recover_steps=100

Methods. Quantization: int8 (per-output-channel int8 weights), w8a8 (int8 weights, dynamic per-token int8
activations), rtn4 (4-bit group-wise, round to nearest), gptq, awq (4-bit with calibration data; see
compress/quantize.py). The token embedding and the output head go to per-row int8 unless --embedding=false.
Pruning (compress/prune.py): magnitude, wanda, 2:4, structured; --recover_steps > 0 fine-tunes afterwards
(compress/recover.py). Calibration: --calib = a token folder, a text file or "stdlib"; "" = the run's own
tokens (<run>/tokenize/tokens) when they exist. Writes <run>/compress/final/ (model.safetensors with the
scheme in its metadata, the tokenizer), report.md and meta.json (lineage: the input model's hash).
Sections: init, data, model, compress, evaluate, save.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ember.common import artifacts
from ember.common.config import require
from ember.common.errors import UserError
from ember.common.log import print0

QUANT_METHODS = ("int8", "w8a8", "rtn4", "gptq", "awq")
PRUNE_METHODS = ("magnitude", "wanda", "2:4", "structured")
NEEDS_CALIB = ("gptq", "awq", "wanda", "structured")  # (2:4 too when scored by wanda)


@dataclass
class Config:
    run: str = "runs/default"  # run folder; this stage writes <run>/compress/
    model: str = ""  # model to compress (ember folder, HF folder, .gguf, llama2.c .bin); "" = <run>/sft/final, else pretrain/final
    tokenizer: str = ""  # tokenizer override; "" = the model's own
    method: str = "int8"  # int8 | w8a8 | rtn4 | gptq | awq | magnitude | wanda | 2:4 | structured
    group_size: int = 64  # 4-bit methods: input columns per scale/zero (32, 64, 128; smaller = more accurate, larger file)
    embedding: bool = True  # also store the token embedding and output head in per-row int8 (the largest matrix of small models)
    calib: str = ""  # calibration/held-out text: token folder, text file (.txt/.jsonl), "stdlib"; "" = <run>/tokenize/tokens if present
    calib_windows: int = 64  # calibration windows (GPTQ paper: 128 of 2048 tokens; fewer suffice for small models)
    eval_windows: int = 16  # held-out windows for the before/after perplexity (0 = skip)
    seq_len: int = 256  # tokens per window (at most the model's max_seq_len)
    damp: float = 0.01  # GPTQ: fraction of mean(diag H) added to H's diagonal
    act_order: bool = True  # GPTQ: columns by decreasing Hessian diagonal, static groups (SmolLM2 g64: ppl 33.7 vs 35.6 without)
    awq_grid: int = 20  # AWQ: points of the alpha grid in [0, 1)
    awq_tokens: int = 4096  # AWQ: calibration tokens per scale search (bounds its cost)
    sparsity: float = 0.5  # magnitude/wanda: fraction of each block matrix's weights zeroed
    prune_score: Literal["wanda", "magnitude"] = "wanda"  # 2:4: which score picks the 2 kept weights of 4
    heads: float = 0.0  # structured: fraction of attention heads removed
    ffn: float = 0.0  # structured: fraction of FFN channels removed
    layers: int = 0  # structured: whole blocks removed (the least important by calibration)
    recover_steps: int = 0  # pruning: fine-tune steps after pruning (0 = none)
    recover_lr: float = 1e-4  # pruning: recovery learning rate
    recover_lora: bool = False  # pruning: recover with LoRA adapters (merged back) instead of full fine-tuning
    seed: int = 0  # calibration window sampling

    def __post_init__(self):
        methods = QUANT_METHODS + PRUNE_METHODS
        if self.method not in methods:
            import difflib

            close = difflib.get_close_matches(self.method, methods, n=1)
            raise UserError(f"method = {self.method!r} is not a compression method (config 'method'); use one of "
                            f"{', '.join(methods)}{f' (did you mean {close[0]!r}?)' if close else ''}")
        from ember.model.quant import INT4_GROUPS

        require(self.group_size in INT4_GROUPS, "group_size", self.group_size, f"one of {INT4_GROUPS}")
        for name in ("calib_windows", "seq_len", "awq_grid", "awq_tokens"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "an int >= 1")
        for name in ("eval_windows", "layers", "recover_steps"):
            require(getattr(self, name) >= 0, name, getattr(self, name), "an int >= 0")
        require(0 <= self.damp < 1, "damp", self.damp, "a fraction in [0, 1)")


PRESETS = {"quickstart": lambda: Config(method="int8"), "smoke": lambda: Config(method="rtn4", calib_windows=8,
                                                                               eval_windows=4, seq_len=64)}


def _default_model(run: str) -> Path:
    sft = Path(run) / "sft" / "final"
    return sft if sft.exists() else Path(run) / "pretrain" / "final"


def _calib_source(cfg: Config) -> str:
    if cfg.calib:
        return cfg.calib
    tokens = Path(cfg.run) / "tokenize" / "tokens"
    return str(tokens) if (tokens / "meta.json").is_file() else ""


def check_data(cfg: Config, calib_source: str) -> None:
    """A method that cannot run without calibration data is refused before any work, in one line."""
    needs = cfg.method in NEEDS_CALIB or (cfg.method == "2:4" and cfg.prune_score == "wanda")
    if needs and not calib_source:
        raise UserError(f"--method={cfg.method} needs calibration data and none was found (no --calib, no "
                        f"{Path(cfg.run) / 'tokenize' / 'tokens'}): pass --calib=<token folder | text file | stdlib>")
    if cfg.method in PRUNE_METHODS and cfg.recover_steps and not calib_source:
        raise UserError(f"--recover_steps={cfg.recover_steps} trains on the calibration text and none was found: "
                        f"pass --calib=<token folder | text file | stdlib> or --recover_steps=0")


def check_groups(cfg: Config, model) -> None:
    """4-bit groups must tile every quantized Linear's input width."""
    if cfg.method not in ("rtn4", "gptq", "awq"):
        return
    from ember.model.quant import INT4_GROUPS, _layer_linears

    widths = sorted({lin.in_features for *_, lin in _layer_linears(model)})
    bad = [k for k in widths if k % cfg.group_size]
    if bad:
        ok = [g for g in INT4_GROUPS if all(k % g == 0 for k in widths)]
        fix = f"--group_size={ok[-1]}" if ok else "a method without groups (--method=int8 or w8a8)"
        raise UserError(f"--group_size={cfg.group_size} does not divide the input width {bad[0]} of the model's "
                        f"linear layers (widths {widths}): use {fix}")


def file_mb(path: Path) -> float:
    return path.stat().st_size / 1e6


def main(cfg: Config) -> dict:
    from ember.common.checkpoint import save_model
    from ember.model.load import load, model_inputs
    from ember.model import quant as Q
    from ember.compress import calibration as C

    # ---- init
    src = Path(cfg.model) if cfg.model else _default_model(cfg.run)
    if not src.exists():
        raise UserError(f"compress: no model at {src}. Pass --model=PATH (ember folder, HF folder, .gguf, llama2.c "
                        f".bin) or train first (`ember pipeline`)")
    calib_source = _calib_source(cfg)
    check_data(cfg, calib_source)
    inputs = model_inputs(src, cfg.tokenizer, cfg.run)
    if calib_source and calib_source != "stdlib":
        inputs["calib"] = Path(calib_source)
    run = artifacts.begin("compress", cfg, inputs=inputs)
    if run.cached:
        return run.metrics
    torch.manual_seed(cfg.seed)
    model, tok = load(src, tokenizer=cfg.tokenizer, run=cfg.run)
    model = model.float().eval()  # calibration and the "before" numbers in fp32 (a GGUF is de-quantized to fp32)
    check_groups(cfg, model)
    require(cfg.seq_len <= model.config.max_seq_len, "seq_len", cfg.seq_len,
            f"at most the model's max_seq_len = {model.config.max_seq_len}")
    n_params = sum(p.numel() for p in model.parameters())

    # ---- data
    calib = heldout = torch.zeros(0, cfg.seq_len, dtype=torch.long)
    if calib_source:
        calib, heldout = C.windows(calib_source, tok, cfg.calib_windows, cfg.eval_windows, cfg.seq_len, cfg.seed,
                                   model_name=str(src))
        heldout = heldout[:cfg.eval_windows]
        print0(f"[compress] calibration: {len(calib)} x {cfg.seq_len} tokens from {calib_source}; "
               f"held out: {len(heldout)} windows")
    ppl_before = C.perplexity(model, heldout)

    # ---- compress
    t0 = time.perf_counter()
    info: dict = {}
    if cfg.method in QUANT_METHODS:
        linear = {"int8": "int8", "w8a8": "w8a8"}.get(cfg.method, "int4")
        scheme = Q.quant_scheme(linear, cfg.group_size, cfg.embedding, method=cfg.method)
        with torch.no_grad():
            if cfg.method == "gptq":
                from ember.compress.quantize import gptq_

                gptq_(model, calib, cfg.group_size, cfg.damp, cfg.act_order)
            elif cfg.method == "awq":
                from ember.compress.quantize import awq_

                awq_(model, calib, cfg.group_size, cfg.awq_grid, cfg.awq_tokens)
            Q.quantize_model_(model, scheme)  # the rest: RTN / int8 linears, embedding and head
    else:
        model, info = _prune(cfg, model, calib)
    seconds = time.perf_counter() - t0
    ppl_after = C.perplexity(model, heldout)

    # ---- save: into a temp folder renamed at the end, so a killed run leaves no final/
    final = run.dir / "final"
    with artifacts.atomic_path(final) as tmp:
        tmp.mkdir()
        save_model(tmp, model, {"compress": {"method": cfg.method, "source": str(src)}})
        tok.save(tmp, model_max_length=model.config.max_seq_len)
    size = (final / "model.safetensors").stat().st_size
    bf16 = 2 * n_params  # the reference size: every weight of the original in bf16
    r4 = lambda x: None if x is None or math.isnan(x) else round(x, 4)
    metrics = {
        "method": cfg.method, "group_size": cfg.group_size if cfg.method in ("rtn4", "gptq", "awq") else None,
        "params": n_params, "bytes": size, "bf16_bytes": bf16, "size_vs_bf16": round(size / bf16, 4),
        "bits_per_weight": round(8 * size / n_params, 3),
        "ppl_before": r4(ppl_before), "ppl_after": r4(ppl_after),
        "ppl_change": r4(ppl_after / ppl_before - 1) if ppl_before == ppl_before and ppl_after == ppl_after else None,
        "calib_windows": len(calib), "eval_windows": len(heldout), "seconds": round(seconds, 1), **info,
    }
    report = report_table(metrics)
    artifacts.write_text(run.dir / "report.md", report + "\n")
    print0(report)
    return run.finish(metrics)


def _prune(cfg: Config, model, calib):
    """Dispatch to compress/prune.py (and recover.py), imported here so quantization works without them."""
    try:
        from ember.compress import prune as P
    except ImportError as e:
        raise UserError(f"--method={cfg.method}: pruning is not in this build ({e}); use a quantization method "
                        f"({', '.join(QUANT_METHODS)})") from None
    if cfg.method == "magnitude":
        model, info = P.prune_magnitude(model, cfg.sparsity)
    elif cfg.method == "wanda":
        model, info = P.prune_wanda(model, calib, cfg.sparsity)
    elif cfg.method == "2:4":
        model, info = P.prune_2_4(model, calib if cfg.prune_score == "wanda" else None, score=cfg.prune_score)
    else:
        model, info = P.prune_structured(model, calib, heads=cfg.heads, ffn=cfg.ffn, layers=cfg.layers)
    if cfg.recover_steps:
        from ember.compress.recover import recover

        # calib (N, seq_len) as windows of T + 1 tokens: recover shifts them into inputs and targets itself
        model, rec = recover(model, calib, cfg.recover_steps, cfg.recover_lr, cfg.recover_lora)
        info = {**info, **{f"recover_{k}": v for k, v in rec.items()}}
    return model.eval(), {k: v for k, v in info.items() if isinstance(v, (int, float, str, bool, type(None)))}


def report_table(m: dict) -> str:
    """A Markdown table of what the run changed."""
    def ppl(x):
        return "n/a" if x is None else f"{x:.3f}"

    rows = [("method", m["method"] + (f" (group {m['group_size']})" if m.get("group_size") else "")),
            ("size on disk", f"{m['bytes'] / 1e6:.2f} MB ({m['size_vs_bf16']:.3f} x bf16 {m['bf16_bytes'] / 1e6:.1f} MB)"),
            ("bits per weight", f"{m['bits_per_weight']:.2f} (all tensors / all parameters)"),
            ("held-out perplexity", f"{ppl(m['ppl_before'])} -> {ppl(m['ppl_after'])}"
             + (f" ({100 * m['ppl_change']:+.2f}%)" if m.get("ppl_change") is not None else "")),
            ("calibration / held-out windows", f"{m['calib_windows']} / {m['eval_windows']}"),
            ("compress time", f"{m['seconds']} s")]
    return "| | |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)


if __name__ == "__main__":
    from ember.cli import module_main

    module_main(__name__)
