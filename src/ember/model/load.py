"""One loader for every model format ember reads: `load(path) -> (model, tokenizer)`.

    model, tok = load("runs/demo/sft/final")                 # ember checkpoint (+ tokenizer beside it or in <run>/tokenizer)
    model, tok = load("out/hf")                              # HF folder: Llama, Mistral, Qwen2/3, SmolLM2, Mixtral, Qwen3-MoE
    model, tok = load("SmolLM2-135M-Instruct.Q4_1.gguf")     # GGUF, quantized tensors dequantized, tokenizer from its metadata
    model, tok = load("stories260K.bin")                     # llama2.c, tok512.bin beside it

Every stage that reads a model (sft, reward, dpo, ppo, grpo, eval, arena, chat, sample, serve, export and
pretrain --init_from) calls this, so a format is added once. The tokenizer is the one the model came with
(its chat template, BOS/EOS and stop tokens); `tokenizer=` overrides it. A vocabulary larger than the
model's embedding table is refused: the pair cannot belong together.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ember.common.errors import UserError

FORMATS = ("ember", "hf", "gguf", "llama2c")


def detect_format(path: str | Path) -> str:
    """"gguf" (.gguf file), "llama2c" (.bin file), "hf" (a folder whose config.json has a model_type) or "ember"
    (a folder with model.safetensors written by save_model, or such a .safetensors file)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"no model at {path}. Pass an ember checkpoint folder (e.g. <run>/sft/final), a Hugging Face "
                        f"folder (config.json + safetensors), a .gguf file or a llama2.c .bin file.")
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf"
        if path.suffix == ".bin":
            return "llama2c"
        if path.suffix == ".safetensors":
            return "ember"
        raise UserError(f"{path}: not a model file ember reads (.gguf, llama2.c .bin, ember .safetensors); for a "
                        f"Hugging Face model pass its folder")
    if _is_hf_folder(path):
        return "hf"
    if (path / "model.safetensors").is_file():
        return "ember"
    raise UserError(f"{path}: neither an ember checkpoint (model.safetensors) nor a Hugging Face folder "
                    f"(config.json with a model_type); pass the folder that holds the model")


def _is_hf_folder(path: Path) -> bool:
    try:
        return "model_type" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def load_model(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
    """The model alone (any format); dtype None keeps the file's (GGUF and llama2.c load in fp32)."""
    return _load(Path(path), detect_format(path), device, dtype)[0]


def load(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
         tokenizer: str | Path = "", run: str | Path = ""):
    """(GPT in eval mode, Tokenizer) of a model in any format. tokenizer: a tokenizer.json / folder / tok*.bin
    that overrides the model's own; run: a run folder whose tokenizer/ serves an ember checkpoint found
    elsewhere."""
    path = Path(path)
    fmt = detect_format(path)
    model, tok = _load(path, fmt, device, dtype)
    if tokenizer:
        tok = load_tokenizer_any(tokenizer)
    elif tok is None:
        found = find_tokenizer(path, run, model.config.vocab_size)
        if found is None:
            raise UserError(f"no tokenizer found for {path}: pass --tokenizer=PATH (a tokenizer.json or the folder "
                            f"holding it); looked beside the model and in <run>/tokenizer/")
        tok = load_tokenizer_any(found, model.config.vocab_size if found.suffix == ".bin" else None)
    if tok.vocab_size > model.config.vocab_size:
        raise UserError(f"the tokenizer {getattr(tok, 'path', None) or ''} has {tok.vocab_size} tokens but the model "
                        f"{path} only {model.config.vocab_size}: they do not belong together; pass the model's own "
                        f"--tokenizer")
    return model.eval(), tok


def load_tokenizer_any(path: str | Path, vocab_size: int | None = None):
    """A tokenizer from any file a model ships it in: tokenizer.json or its folder (ember's, an HF model's),
    llama2.c's tok*.bin, or a .gguf (its metadata only: the tensors are not read)."""
    path = Path(path)
    if path.suffix == ".gguf":
        from ember.model.gguf import read_gguf_tokenizer

        tok = read_gguf_tokenizer(path)
        if tok is None:
            raise UserError(f"{path}: this GGUF holds no tokenizer (no tokenizer.ggml.model); pass the model's "
                            f"tokenizer.json or the folder holding it")
        return tok
    from ember.tokenizer.special import load_tokenizer

    return load_tokenizer(path, vocab_size)


def _load(path: Path, fmt: str, device, dtype):
    """(model, tokenizer or None when the format carries none)."""
    if fmt == "gguf":
        from ember.model.gguf import load_gguf

        model, tok = load_gguf(path, device=device)
    elif fmt == "llama2c":
        from ember.model.llama2c import load_llama2c

        model, tok = load_llama2c(path, device), None
    elif fmt == "hf":
        from ember.model.hf import import_hf

        model, tok = import_hf(path, device, dtype), None
    else:
        from ember.common.checkpoint import load_model as load_ember

        model, tok = load_ember(path, device=device, dtype=dtype), None
    if dtype is not None:
        model.to(dtype)
    return model, tok


def find_tokenizer(path: str | Path, run: str | Path = "", vocab_size: int = 0) -> Path | None:
    """Where a model's tokenizer lies: beside it (tokenizer.json, or the tok.bin that Tokenizer.save writes for
    a SentencePiece vocabulary; llama2.c's tok{V}.bin beside a .bin model), in the run folder the checkpoint
    sits in (<run>/<stage>/final -> <run>/tokenizer), or in `run`'s. None when there is none."""
    path = Path(path)
    if path.suffix == ".gguf":
        return None  # the tokenizer is inside the file
    base = path if path.is_dir() else path.parent
    if path.suffix == ".bin":  # llama2.c: tok512.bin beside stories260K.bin; the vocab size picks the file
        cands = [base / f"tok{vocab_size}.bin", base / "tokenizer.bin"]
    else:
        cands = [base / "tokenizer.json", base / "tok.bin", base.parent.parent / "tokenizer" / "tokenizer.json"]
        if run:
            cands.append(Path(run) / "tokenizer" / "tokenizer.json")
    return next((c for c in cands if c.is_file()), None)


def model_inputs(path: str | Path, tokenizer: str | Path = "", run: str | Path = "") -> dict[str, Path]:
    """The lineage inputs of a stage that reads this model: {"model": path, "tokenizer": the file it will use}
    (no tokenizer entry when the model carries its own, as a GGUF does)."""
    tok = Path(tokenizer) if tokenizer else find_tokenizer(path, run)
    return {"model": Path(path), **({"tokenizer": tok} if tok is not None else {})}
