"""What DPO, PPO and GRPO share: prompt/response encoding, per-token log-probs, KV-cache sampling, and the
policy/reference pair (a LoRA policy's reference is the same model with its adapters disabled, so there is
no second copy in memory; a fully fine-tuned policy gets a frozen deep copy).

Sequences are right-padded; a response mask (B, L-1) marks the targets that are response tokens.
Templates: "chat" renders a prompt as user turn(s) of the chat template and ends a response with <|end|>
(SFT models); "raw" is plain text after <|bos|>, ended by <|eos|> (base models).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ember.common.errors import UserError
from ember.common.log import print0

from ember.tokenizer.chat import render_chat

TEMPLATES = ("chat", "raw")


# ---------------------------------------------------------------------------- encoding


def encode_prompt(tok, prompt, template: str, where: str = "") -> list[int]:
    """Prompt ids, ending where the model's reply starts (after <|assistant|> for chat). `where` names the record
    in errors (a chat template that rejects it); by default the prompt's opening words do."""
    if template == "chat":
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        where = where or f"the prompt {str(prompt)[:60]!r}"
        return render_chat(tok, messages, add_generation_prompt=True, where=where)[0]
    text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
    return ([tok.bos_id] if tok.add_bos else []) + tok.encode(text)  # a document starts as the model's did


def stop_id(tok, template: str) -> int:
    """The token that ends a reply: the chat template's end-of-turn (<|end|>, <|im_end|>, <|eot_id|>) closes an
    assistant turn, EOS a raw document."""
    stop = tok.end_id if template == "chat" and tok.end_id is not None else tok.eos_id
    if stop is None:
        raise UserError(f"the tokenizer {tok.path or ''} has no end-of-turn or EOS token to end a reply with; "
                        f"use a model whose tokenizer names its eos_token (tokenizer_config.json)")
    return stop


def stop_ids(tok, template: str) -> tuple[int, ...]:
    """Every id that ends a sampled reply: the template's own stop first, then the tokenizer's other stop ids
    (EOS, generation_config's): a policy that emits any of them has finished, as in chat and serve."""
    return tuple(dict.fromkeys((stop_id(tok, template), *tok.stop_ids)))


def encode_response(tok, text: str, template: str) -> list[int]:
    return tok.encode(text) + [stop_id(tok, template)]


def decode_response(tok, ids: list[int], template: str) -> str:
    """Reply text without its stop token (and anything a sampler wrote after it)."""
    stops = set(stop_ids(tok, template))
    end = next((i for i, t in enumerate(ids) if t in stops), len(ids))
    return tok.decode(ids[:end])


def keep_end(prompt: list[int], n: int) -> list[int]:
    """An over-long prompt's last n tokens (the latest turns matter most), its first (BOS) kept in front: every
    training sequence began with BOS, so a prompt cut without it starts where the model never saw text start."""
    if len(prompt) <= n:
        return prompt
    return prompt[:1] + prompt[len(prompt) - n + 1:] if n > 1 else prompt[-n:]


def truncate(prompt: list[int], response: list[int], max_len: int, max_prompt_len: int):
    """Keep the end of an over-long prompt (keep_end), then cut the response to fit."""
    prompt = keep_end(prompt, max_prompt_len)
    return prompt, response[:max(1, max_len - len(prompt))]


@dataclass
class SeqBatch:
    """Right-padded prompt+response sequences. ids (B, L); mask (B, L-1) = 1 where targets ids[:, 1:] are
    response tokens; prompt_lens (B,) and lens (B,) in tokens."""
    ids: torch.Tensor
    mask: torch.Tensor
    prompt_lens: torch.Tensor
    lens: torch.Tensor

    def to(self, device):
        return SeqBatch(self.ids.to(device), self.mask.to(device), self.prompt_lens.to(device), self.lens.to(device))


def collate(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> SeqBatch:
    L = max(len(p) + len(r) for p, r in zip(prompts, responses))
    B = len(prompts)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.zeros(B, L - 1)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        mask[i, len(p) - 1:len(p) + len(r) - 1] = 1.0  # target at t is token t+1: the response starts at len(p)
    plen = torch.tensor([len(p) for p in prompts])
    return SeqBatch(ids, mask, plen, plen + torch.tensor([len(r) for r in responses]))


def fit_context(model: nn.Module, max_len: int, max_prompt_len: int, stage: str) -> tuple[int, int]:
    """(max_len, max_prompt_len) within the model's context: sequences past max_seq_len would run through RoPE
    positions the model never trained on. Over it, both shrink (the prompt's share kept) and a line says so."""
    limit = model.config.max_seq_len
    if max_len <= limit:
        return max_len, max_prompt_len
    prompt = max(1, min(limit - 1, round(max_prompt_len * limit / max_len)))
    print0(f"[{stage}] max_len {max_len} is over the model's context of {limit} tokens: using max_len {limit}, "
           f"max_prompt_len {prompt}")
    return limit, prompt


def encode_pairs(tok, pairs: list[dict], template: str, max_len: int, max_prompt_len: int):
    """Preference pairs -> [(prompt_ids, chosen_ids, rejected_ids)], each side truncated to max_len."""
    out = []
    for pair in pairs:
        p = encode_prompt(tok, pair["prompt"], template)
        pc, c = truncate(p, encode_response(tok, pair["chosen"], template), max_len, max_prompt_len)
        _, r = truncate(p, encode_response(tok, pair["rejected"], template), max_len, max_prompt_len)
        out.append((pc, c, r))
    return out


def collate_pairs(encoded, pad_id: int) -> SeqBatch:
    """B encoded pairs -> one batch of 2B rows: the B chosen sequences, then the B rejected ones."""
    prompts = [p for p, _, _ in encoded] * 2
    return collate(prompts, [c for _, c, _ in encoded] + [r for _, _, r in encoded], pad_id)


# ---------------------------------------------------------------------------- log-probs


def token_logps(model: nn.Module, batch: SeqBatch, return_entropy: bool = False, temperature: float = 1.0):
    """log pi(token) for every target of the batch (B, L-1), 0 off the response mask; with entropy (B, L-1).
    temperature: that of the sampling, so PPO/GRPO ratios and KL are of the distribution the replies came
    from (as TRL; a top_k filter is not applied here, as in TRL)."""
    from ember.model.loss import token_logprobs

    logits = model(batch.ids[:, :-1])  # (B, L-1, V)
    if temperature != 1.0:
        logits = logits / temperature
    targets = batch.ids[:, 1:].masked_fill(batch.mask == 0, -100)
    logps = token_logprobs(logits, targets) * batch.mask
    if not return_entropy:
        return logps
    from ember.align.losses import entropy_from_logits

    with torch.no_grad():
        ent = entropy_from_logits(logits)
    return logps, ent


# ---------------------------------------------------------------------------- sampling


def prompt_budget(model: nn.Module, max_prompt_len: int, max_new_tokens: int) -> int:
    """How many prompt tokens to keep so prompt + reply fit the model's context (and max_prompt_len)."""
    keep = min(max_prompt_len, model.config.max_seq_len - max_new_tokens)
    if keep < 1:
        raise UserError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in this model's context of "
                        f"{model.config.max_seq_len} tokens: lower max_new_tokens")
    return keep


def generate(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, stop: int | tuple[int, ...],
             temperature: float = 1.0, top_k: int = 0, batch_size: int = 64,
             generator: torch.Generator | None = None) -> list[list[int]]:
    """Sample a reply for each prompt; each ends at its first `stop` token (kept; `stop_ids` gives them all) or
    after max_new_tokens.

    Runs on model/engine.py's Engine: prompts of any lengths decode together in one batch of up to
    batch_size KV-cache slots (per-row positions and padding masks), the same sampler the server uses.
    Each reply gets its own seed drawn from `generator` (a CPU one in the recipes, so a seed gives the same
    replies' seeds on any device), so a run is reproducible and a reply does not depend on its batch mates.
    temperature 0 = greedy. The model's train/eval mode is restored after.
    """
    from ember.model import engine

    limit = model.config.max_seq_len
    if any(len(p) >= limit for p in prompts):
        raise UserError(f"a prompt of {max(len(p) for p in prompts)} tokens does not fit the model's context of "
                        f"{limit}: lower max_prompt_len (prompts keep their last max_prompt_len tokens)")
    n = len(prompts)
    seeds = torch.randint(0, 2 ** 62, (n,), generator=generator, device=generator.device).tolist() \
        if generator is not None else [None] * n
    params = [engine.SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=s) for s in seeds]
    return [list(r.tokens) for r in engine.generate(model, prompts, params, stop_ids=(stop,) if isinstance(stop, int) else stop,
                                                    n_slots=batch_size)]


# ---------------------------------------------------------------------------- stage setup, policy and reference


def begin_stage(stage: str, cfg, **inputs):
    """The opening all alignment recipes share: the model defaults to <run>/sft/final (any format model/load.py
    reads) and its tokenizer to the model's own, artifacts.begin records them (and answers "cached"), then
    seeding. Returns (run, inputs with the defaults filled in)."""
    from ember.common import artifacts
    from ember.model.load import model_inputs

    paths = {**model_inputs(cfg.model or Path(cfg.run) / "sft" / "final", cfg.tokenizer, cfg.run), **inputs}
    run = artifacts.begin(stage, cfg, inputs=paths)
    torch.manual_seed(cfg.seed)
    return run, paths



def load_lm(path: str | Path, device, cfg) -> tuple[nn.Module, object]:
    """(model, tokenizer) of the policy's starting point: any format, its own tokenizer unless cfg.tokenizer."""
    from ember.model.load import load

    return load(path, device, tokenizer=cfg.tokenizer, run=cfg.run)


class PolicyWithReference:
    """The trained policy and its frozen reference. LoRA (lora_r > 0): adapters on `targets`, reference =
    the same module with adapters disabled. Full fine-tuning: reference = a frozen copy (2x weights)."""

    def __init__(self, model: nn.Module, lora_r: int, lora_alpha: float, lora_targets: list[str]):
        self.model, self.lora = model, lora_r > 0
        if self.lora:
            from ember.model import lora

            lora.apply_lora(model, lora_targets, lora_r, lora_alpha, 0.0)  # freezes the base; no dropout: ratios start at 1
            self.reference = None
        else:
            self.reference = copy.deepcopy(model).requires_grad_(False).eval()

    @contextlib.contextmanager
    def as_reference(self):
        """Yields the reference model (the policy with adapters off, for LoRA)."""
        if self.reference is not None:
            yield self.reference
            return
        from ember.model import lora

        was_training = self.model.training
        self.model.eval()
        with lora.lora_disabled(self.model):
            yield self.model
        self.model.train(was_training)

    @torch.no_grad()
    def ref_logps(self, batch: SeqBatch, temperature: float = 1.0) -> torch.Tensor:
        with self.as_reference() as ref:
            return token_logps(ref, batch, temperature=temperature)

    def trainable(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def save(self, folder: Path) -> None:
        """The policy as a plain model (LoRA merged into the weights, so any stage can load it) plus,
        for LoRA, the adapter weights alone in adapter.safetensors."""
        from ember.common.checkpoint import save_model

        model = self.model
        if self.lora:
            from ember.model import lora

            lora.save_adapter(folder, model)
            model = lora.merge_lora(copy.deepcopy(model))
        save_model(folder, model)


