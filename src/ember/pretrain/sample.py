"""`ember sample`: generate text from fixed prompts with a checkpoint, to see what a model has learned.

    ember sample                                           # <run>/pretrain/final with <run>/tokenizer
    ember sample --checkpoint=runs/demo/pretrain/step_000400 --temperature=0.8 --max_new_tokens=200

Writes `<run>/sample/samples.md` (readable) and `samples.jsonl` ({"prompt", "completion"} per line). The
same `generate` prints samples during pretraining. Decoding uses the model's KV cache: one forward over the
prompt, then one token at a time.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ember.common import artifacts
from ember.common.config import require
from ember.common.log import print0

# Openings of Python code, prose and docs: the default corpus is the standard library. No trailing spaces:
# BPE folds a space into the next word's token, so "def " would leave the model to start a token mid-word.
PROMPTS = ["def", "import os\n", "class Parser:\n", "    for i in range(", '"""Return the', "#"]


@dataclass
class Config:
    run: str = "runs/default"  # run folder; this stage writes <run>/sample/
    checkpoint: str = ""  # a checkpoint folder with model.safetensors; empty = <run>/pretrain/final
    tokenizer: str = ""  # tokenizer.json (or its folder); empty = <run>/tokenizer/tokenizer.json
    prompts: list[str] = field(default_factory=lambda: list(PROMPTS))  # one sample per prompt
    max_new_tokens: int = 128  # tokens generated per prompt
    temperature: float = 0.8  # softmax temperature; 0 = greedy (argmax)
    top_k: int = 50  # sample among the k most likely tokens; 0 = the whole vocabulary
    seed: int = 0  # sampling seed: the same seed, checkpoint and prompts give the same text
    device: str = "auto"  # cpu, cuda, mps; auto = the best available

    def __post_init__(self):
        require(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "an int >= 1")
        require(self.temperature >= 0, "temperature", self.temperature, "a float >= 0 (0 = greedy)")
        require(self.top_k >= 0, "top_k", self.top_k, "an int >= 0 (0 = no top-k cut)")
        require(len(self.prompts) >= 1, "prompts", self.prompts, "at least one prompt")


PRESETS = {
    "quickstart": lambda: Config(max_new_tokens=160),
    "smoke": lambda: Config(max_new_tokens=24, prompts=["def", "import"]),
}


@torch.no_grad()
def generate(model, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.8, top_k: int = 50,
             generator: torch.Generator | None = None, stop_id: int | None = None) -> list[int]:
    """Continue one prompt; returns only the new ids (stops early at stop_id, which is not returned)."""
    device = next(model.parameters()).device
    limit = model.config.max_seq_len
    prompt_ids = prompt_ids[-(limit - 1):]  # keep room for at least one new token
    max_new_tokens = min(max_new_tokens, limit - len(prompt_ids))
    cache = model.new_cache(1, len(prompt_ids) + max_new_tokens)
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, T) prompt, then (1, 1) per step
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(idx, cache=cache)[:, -1, :].float()  # (1, V) at the last position
        if temperature == 0:
            nxt = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(device)  # (1, 1)
        token = int(nxt)
        if token == stop_id:
            break
        out.append(token)
        idx = nxt
    return out


def sample_prompts(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float = 0.8,
                   top_k: int = 50, seed: int = 0) -> list[dict]:
    """[{"prompt", "completion", "tokens"}] for each prompt; deterministic for a seed (own generator, global RNG
    untouched, so sampling inside a training loop does not change the run)."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    out = []
    for p in prompts:
        ids = [tokenizer.eos_id] + tokenizer.encode(p)  # pretraining data marks a document start with <|eos|>
        new = generate(model, ids, max_new_tokens, temperature, top_k, gen, stop_id=tokenizer.eos_id)
        out.append({"prompt": p, "completion": tokenizer.decode(new), "tokens": len(new)})
    model.train(was_training)
    return out


def main(cfg: Config) -> dict:
    from ember.common.checkpoint import load_model
    from ember.common.dist import pick_device
    from ember.tokenizer.special import load_tokenizer

    ckpt = Path(cfg.checkpoint or Path(cfg.run) / "pretrain" / "final")
    tok_path = Path(cfg.tokenizer or Path(cfg.run) / "tokenizer" / "tokenizer.json")
    run = artifacts.begin("sample", cfg, inputs={"checkpoint": ckpt, "tokenizer": tok_path})
    if run.cached:
        return run.metrics
    device = pick_device(cfg.device)
    model = load_model(ckpt, device=device)
    tokenizer = load_tokenizer(tok_path)
    t0 = time.perf_counter()
    samples = sample_prompts(model, tokenizer, cfg.prompts, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.seed)
    dt = time.perf_counter() - t0
    n_tokens = sum(s["tokens"] for s in samples)
    md = [f"# Samples from {ckpt}", "",
          f"temperature {cfg.temperature}, top_k {cfg.top_k}, seed {cfg.seed}, {cfg.max_new_tokens} new tokens", ""]
    for s in samples:
        md += [f"## prompt: {s['prompt']!r}", "", "```", s["prompt"] + s["completion"], "```", ""]
        print0(f"--- {s['prompt']!r}\n{s['prompt'] + s['completion']}")
    artifacts.write_text(run.dir / "samples.md", "\n".join(md))
    artifacts.write_text(run.dir / "samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
    return run.finish({"samples": len(samples), "tokens": n_tokens, "tok_per_s": round(n_tokens / max(dt, 1e-9), 1)})


if __name__ == "__main__":
    from ember.cli import module_main

    module_main(__name__)
