"""A model as the server sees it: the loaded model, its tokenizer, and the name the API calls it by.

    served = load_served("runs/demo/sft/final")          # any format model/load.py reads
    served = load_served("SmolLM2-135M-Instruct.Q4_1.gguf", name="smollm2")

Chat requests are rendered with the model's own chat template (tokenizer.render_chat: the string
transformers' apply_chat_template gives, message contents encoded as text so they cannot inject control
tokens); a raw /v1/completions prompt is BOS (when the tokenizer adds one) + the text with special-token
strings parsed as special tokens, as vLLM and llama.cpp do.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch


@dataclasses.dataclass
class Served:
    name: str  # the model id in the API
    model: object  # a GPT
    tokenizer: object  # ember.tokenizer Tokenizer
    path: str

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end an answer: end-of-text and the template's end-of-turn (and generation_config's)."""
        return tuple(self.tokenizer.stop_ids)

    def render_chat(self, messages: list[dict]) -> list[int]:
        """Prompt ids of a conversation, ending where the assistant speaks."""
        return self.tokenizer.render_chat(messages, add_generation_prompt=True, where="request")[0]

    def encode_prompt(self, text: str) -> list[int]:
        """A raw completion prompt: BOS (when the tokenizer adds one) + the text, special-token strings parsed."""
        return self.tokenizer.encode_prompt(text)


def load_served(path: str | Path, tokenizer: str = "", name: str = "", run: str = "",
                device: torch.device | str = "cpu") -> Served:
    """Model + tokenizer from any format (see model/load.py)."""
    from ember.model.load import load

    model, tok = load(path, device=device, tokenizer=tokenizer, run=run)
    return Served(name or default_name(Path(path)), model, tok, str(path))


def default_name(path: Path) -> str:
    """runs/demo/sft/final -> demo-sft; stories260K.bin -> stories260K; out/hf -> hf."""
    parts = path.resolve().parts
    if path.is_dir() and len(parts) >= 3 and (parts[-1] == "final" or parts[-1].startswith("step_")):
        return f"{parts[-3]}-{parts[-2]}" + ("" if parts[-1] == "final" else f"-{parts[-1]}")
    return path.stem if path.is_file() else path.name
