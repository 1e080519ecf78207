"""`ember sample`: generate text from fixed prompts with a checkpoint, to see what a model has learned.

    ember sample                                           # <run>/pretrain/final with <run>/tokenizer
    ember sample --checkpoint=runs/demo/pretrain/step_000400 --temperature=0.8 --max_new_tokens=200
    ember sample --checkpoint=SmolLM2-135M-Instruct.Q4_1.gguf --prompts='["The capital of France is"]'

Any format model/load.py reads (ember checkpoint, HF folder, GGUF, llama2.c .bin), with the model's own
tokenizer unless --tokenizer overrides it. A prompt starts as the model's documents did: after <|eos|> for
ember's tokenizer (tokenize's separator), after BOS for a model that adds one (`Tokenizer.encode_prompt`).

Writes `<run>/sample/samples.md` (readable) and `samples.jsonl` ({"prompt", "completion"} per line). The
same `sample_prompts` prints samples during pretraining. Decoding runs on the shared engine (model/engine.py):
KV cache, all prompts in one batch.
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
from ember.model import engine
from ember.model.engine import SamplingParams

# Openings of Python code, prose and docs: the default corpus is the standard library. No trailing spaces:
# BPE folds a space into the next word's token, so "def " would leave the model to start a token mid-word.
PROMPTS = ["def", "import os\n", "class Parser:\n", "    for i in range(", '"""Return the', "#"]


@dataclass
class Config:
    run: str = "runs/default"  # run folder; this stage writes <run>/sample/
    checkpoint: str = ""  # any model (ember checkpoint, HF folder, .gguf, llama2.c .bin); empty = <run>/pretrain/final
    tokenizer: str = ""  # tokenizer.json, its folder or a tok*.bin; empty = the model's own (ember: <run>/tokenizer)
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


def _seed(generator: torch.Generator | None) -> int:
    """A request seed from `generator` (None = torch's global RNG, so torch.manual_seed reproduces a run)."""
    return int(torch.randint(0, 2 ** 62, (1,), generator=generator))


def _params(prompt_ids: list[int], limit: int, max_new_tokens: int, temperature: float, top_k: int,
            generator: torch.Generator | None):
    prompt_ids = prompt_ids[-(limit - 1):]  # keep room for at least one new token
    return prompt_ids, SamplingParams(max_tokens=min(max_new_tokens, limit - len(prompt_ids)), temperature=temperature,
                                      top_k=top_k, seed=_seed(generator) if temperature > 0 else 0)  # greedy: no draw


def generate(model, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.8, top_k: int = 50,
             generator: torch.Generator | None = None, stop_id: int | None = None) -> list[int]:
    """Continue one prompt; returns only the new ids (stops early at stop_id, which is not returned).
    Runs on model/engine.py; its seed is drawn from `generator`."""
    ids, params = _params(prompt_ids, model.config.max_seq_len, max_new_tokens, temperature, top_k, generator)
    out = engine.generate(model, [ids], params, stop_ids=() if stop_id is None else (stop_id,))[0].tokens
    return out[:-1] if out and out[-1] == stop_id else out


def prompt_ids(tokenizer, text: str) -> list[int]:
    """A document's opening as the model saw documents in pretraining: ember's data marks a document start with
    the previous one's <|eos|>; another model's with BOS when it adds one (else nothing), as its own
    generate() does."""
    if tokenizer.kind == "ember":
        return [tokenizer.eos_id] + tokenizer.encode(text)
    return tokenizer.encode_prompt(text)


def sample_prompts(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float = 0.8,
                   top_k: int = 50, seed: int = 0) -> list[dict]:
    """[{"prompt", "completion", "tokens"}] for each prompt, all decoded as one batch; deterministic for a seed
    (own generator, global RNG untouched, so sampling inside a training loop does not change the run). A sample
    ends at the end of its document: <|eos|> for ember's tokenizer, any of the model's stop ids otherwise."""
    gen = torch.Generator().manual_seed(seed)
    limit = model.config.max_seq_len
    stops = (tokenizer.eos_id,) if tokenizer.kind == "ember" else tuple(tokenizer.stop_ids)
    jobs = [_params(prompt_ids(tokenizer, p), limit, max_new_tokens, temperature, top_k, gen) for p in prompts]
    out = []
    for p, r in zip(prompts, engine.generate(model, [i for i, _ in jobs], [q for _, q in jobs], stop_ids=stops)):
        new = r.tokens[:-1] if r.tokens and r.tokens[-1] in stops else r.tokens
        out.append({"prompt": p, "completion": tokenizer.decode(new), "tokens": len(new)})
    return out


def main(cfg: Config) -> dict:
    from ember.common.dist import pick_device
    from ember.model.load import detect_format, find_tokenizer, load

    ckpt = Path(cfg.checkpoint or Path(cfg.run) / "pretrain" / "final")
    inputs = {"checkpoint": ckpt}
    # the cache key: an ember checkpoint's tokenizer lies in its run; a GGUF or HF folder holds its own (hashed
    # with the model); llama2.c's tok*.bin beside the .bin is found when loading
    if cfg.tokenizer:
        inputs["tokenizer"] = Path(cfg.tokenizer)
    elif ckpt.exists() and detect_format(ckpt) == "ember":
        inputs["tokenizer"] = find_tokenizer(ckpt, cfg.run) or Path(cfg.run) / "tokenizer" / "tokenizer.json"
    run = artifacts.begin("sample", cfg, inputs=inputs)
    if run.cached:
        return run.metrics
    device = pick_device(cfg.device)
    model, tokenizer = load(ckpt, device=device, tokenizer=cfg.tokenizer, run=cfg.run)
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
