"""Load a model to serve from any format ember reads, with its tokenizer and chat rendering.

    served = load_served("runs/demo/sft/final")          # ember checkpoint + <run>/tokenizer/tokenizer.json
    served = load_served("out/hf")                       # HF folder (export_hf / save_pretrained)
    served = load_served("model.gguf")                   # GGUF (llama arch), tokenizer from its metadata
    served = load_served("stories260K.bin")              # llama2.c, tok512.bin beside it

Chat: ember tokenizers use ember's template (<|user|>...<|end|><|assistant|>); a vocabulary with
<|im_start|> gets ChatML; anything else (a base model such as stories260K) gets the messages' text joined by
blank lines after BOS, which a base model simply continues.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import torch

from ember.common.errors import UserError
from ember.model.gpt import GPT


class HFTextTokenizer:
    """A plain HF `tokenizers` tokenizer (from an HF folder or GGUF metadata without ember's special tokens)."""

    def __init__(self, hf, bos_id: int | None = None, eos_id: int | None = None):
        self.hf, self.vocab_size = hf, hf.get_vocab_size(with_added_tokens=True)
        # "<|im_end|>" typed in a message is text, not the control token (else a user could end their turn and
        # open a system one); the chat renderer inserts control tokens by id. As ember's own Tokenizer.
        hf.encode_special_tokens = True
        self.bos_id, self.eos_id = bos_id, eos_id
        names = ("<|im_end|>", "<|endoftext|>", "<|end|>", "<|eot_id|>", "</s>")
        # in order of preference (eos, then the names'), each once: the first is the end token GGUF export names
        self.stop_ids = tuple(dict.fromkeys(i for i in [eos_id] + [hf.token_to_id(n) for n in names] if i is not None))

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def token_to_id(self, t: str) -> int | None:
        return self.hf.token_to_id(t)


@dataclasses.dataclass
class Served:
    name: str  # the model id in the API
    model: GPT
    tokenizer: object  # encode(text) -> ids, decode(ids) -> text
    stop_ids: tuple[int, ...]  # ids that end an answer (end-of-text, end-of-turn)
    render_chat: Callable[[list[dict]], list[int]]  # messages -> prompt ids ending where the assistant speaks
    path: str

    def encode_prompt(self, text: str) -> list[int]:
        """A completion prompt: BOS (when the tokenizer has one) + the text."""
        bos = getattr(self.tokenizer, "bos_id", None)
        if hasattr(self.tokenizer, "byte_of"):  # llama2.c tokenizer: its encode adds BOS and the dummy prefix
            return self.tokenizer.encode(text, bos=True)
        return ([bos] if bos is not None else []) + self.tokenizer.encode(text)


def chat_renderer(tok) -> Callable[[list[dict]], list[int]]:
    if hasattr(tok, "role_id"):  # ember's tokenizer
        from ember.tokenizer.chat import render_chat

        return lambda messages: render_chat(tok, messages, add_generation_prompt=True, where="request")[0]
    if hasattr(tok, "token_to_id") and tok.token_to_id("<|im_start|>") is not None:
        start, end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")

        def chatml(messages):  # SmolLM2, Qwen: <|im_start|>role\ncontent<|im_end|>\n ... <|im_start|>assistant\n
            ids = []
            for m in messages:
                ids += [start] + tok.encode(f"{m['role']}\n{m['content']}") + [end] + tok.encode("\n")
            return ids + [start] + tok.encode("assistant\n")
        return chatml

    def plain(messages):
        text = "\n\n".join(m["content"] for m in messages)
        if hasattr(tok, "byte_of"):
            return tok.encode(text, bos=True)
        bos = getattr(tok, "bos_id", None)
        return ([bos] if bos is not None else []) + tok.encode(text)
    return plain


def _ember_tokenizer(path: Path):
    from ember.tokenizer.special import Tokenizer

    return Tokenizer.load(path)


def find_tokenizer(ckpt: Path, explicit: str = "", run: str = "") -> Path | None:
    """tokenizer given > beside the checkpoint > <run>/tokenizer of the run the checkpoint sits in > <run>/tokenizer."""
    if explicit:
        return Path(explicit)
    base = ckpt if ckpt.is_dir() else ckpt.parent
    cands = [base / "tokenizer.json", base.parent.parent / "tokenizer" / "tokenizer.json"]
    if run:
        cands.append(Path(run) / "tokenizer" / "tokenizer.json")
    return next((c for c in cands if c.is_file()), None)


def load_served(path: str | Path, tokenizer: str = "", name: str = "", run: str = "",
                device: torch.device | str = "cpu") -> Served:
    """Model + tokenizer from a checkpoint folder, HF folder, .gguf or llama2.c .bin (see the module doc)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"no model at {path}. Train one (`ember pipeline`), or pass --checkpoint=PATH to an ember "
                        f"checkpoint folder, an HF folder, a .gguf file or a llama2.c .bin file.")
    if path.suffix == ".gguf":
        from ember.model.gguf import load_gguf

        model, tok = load_gguf(path, device=device)
        if tokenizer:
            tok = _ember_tokenizer(Path(tokenizer))
    elif path.suffix == ".bin":
        from ember.model.llama2c import Llama2cTokenizer, load_llama2c

        model = load_llama2c(path, device)
        v = model.config.vocab_size
        cands = [Path(tokenizer)] if tokenizer else [path.parent / f"tok{v}.bin", path.parent / "tokenizer.bin"]
        tok_path = next((c for c in cands if c.is_file()), None)
        if tok_path is None:
            raise UserError(f"no llama2.c tokenizer for {path}: looked for {', '.join(map(str, cands))}; pass --tokenizer=")
        tok = Llama2cTokenizer.load(tok_path, v)
    elif path.is_dir() and _is_hf_folder(path):
        from ember.model.hf import import_hf

        model = import_hf(path, device)
        tok_path = find_tokenizer(path, tokenizer, run)
        tok = _load_any_tokenizer(tok_path) if tok_path else None
    else:
        from ember.common.checkpoint import load_model

        model = load_model(path, device=device)
        tok_path = find_tokenizer(path, tokenizer, run)
        tok = _load_any_tokenizer(tok_path) if tok_path else None
    if tok is None:
        raise UserError(f"no tokenizer found for {path}: pass --tokenizer=PATH/tokenizer.json "
                        f"(looked beside the checkpoint and in <run>/tokenizer/)")
    if tok.vocab_size > model.config.vocab_size:
        raise UserError(f"tokenizer has {tok.vocab_size} tokens but the model {path} only {model.config.vocab_size}: "
                        f"they do not belong together; pass the run's own --tokenizer=")
    if hasattr(tok, "role_id"):
        stop_ids = (tok.eos_id, tok.end_id)
    else:
        stop_ids = tuple(getattr(tok, "stop_ids", ()))
    name = name or _default_name(path)
    return Served(name, model.eval(), tok, stop_ids, chat_renderer(tok), str(path))


def _is_hf_folder(path: Path) -> bool:
    try:
        return "model_type" in json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False


def _load_any_tokenizer(path: Path):
    """ember's Tokenizer when the file has ember's special tokens, else a plain HF tokenizer."""
    if path.suffix == ".bin":
        from ember.model.llama2c import Llama2cTokenizer

        return Llama2cTokenizer.load(path)
    try:
        return _ember_tokenizer(path)
    except UserError as e:
        if "lacks the special tokens" not in str(e):
            raise
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(path))
    bos = next((i for i in map(hf.token_to_id, ("<s>", "<|bos|>")) if i is not None), None)  # id 0 is an id
    return HFTextTokenizer(hf, bos, hf.token_to_id("</s>"))


def _default_name(path: Path) -> str:
    """runs/demo/sft/final -> demo-sft; stories260K.bin -> stories260K; out/hf -> hf."""
    parts = path.resolve().parts
    if path.is_dir() and len(parts) >= 3 and (parts[-1] == "final" or parts[-1].startswith("step_")):
        return f"{parts[-3]}-{parts[-2]}" + ("" if parts[-1] == "final" else f"-{parts[-1]}")
    return path.stem if path.is_file() else path.name
