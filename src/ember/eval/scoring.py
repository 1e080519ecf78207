"""Batched log-likelihood scoring and generation against a tiny model interface.

A model is any callable `fn(idx) -> (B, T, V)` scores for int64 token ids idx (B, T): log-probs or raw
logits (both are normalized here with a logsumexp, so either works). Tests use a fixed-logit model whose
log-likelihoods are known by hand; the real path wraps ember's GPT (`load_lm`). `EvalLM` bundles the
callable with a tokenizer and does what every task needs: score (context, continuation) pairs, score a
long text in windows, and generate until a stop string (on the shared engine, so it needs the GPT itself).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ember.common.errors import UserError
from ember.model import engine
from ember.model.engine import SamplingParams

LogProbFn = Callable[[torch.Tensor], torch.Tensor]  # idx (B, T) int64 -> (B, T, V) log-probs or logits


@dataclass
class EvalLM:
    fn: LogProbFn
    tokenizer: Any  # .encode(str) -> list[int], .decode(ids) -> str, .bos_id / .eos_id (int or None)
    max_len: int = 512  # longest token sequence fn accepts (the model's max_seq_len)
    batch_size: int = 16  # rows per forward pass when scoring
    device: str = "cpu"
    add_bos: bool = True  # start every sequence with BOS (gpt_lm: the tokenizer's own rule, as lm-eval's HF backend)
    model: Any = None  # the GPT behind fn, if any: generation needs it (the engine decodes with its KV cache)
    stop_ids: tuple[int, ...] = ()  # token ids that end a generation (EOS, <|end|>)

    @property
    def start(self) -> list[int]:
        """What every scored or prompted sequence starts with: BOS when add_bos (and the vocabulary has one)."""
        bos = getattr(self.tokenizer, "bos_id", None)
        return [bos] if self.add_bos and bos is not None else []

    @property
    def prefix(self) -> list[int]:
        """What an empty context (a continuation or text scored from nothing) is conditioned on: BOS, else EOS,
        whatever add_bos says, as lm-evaluation-harness' prefix_token_id (the first token needs some context)."""
        for name in ("bos_id", "eos_id"):
            tid = getattr(self.tokenizer, name, None)
            if tid is not None:
                return [tid]
        return []

    # ------------------------------------------------------------------------ text -> token requests

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of (context, continuation), split the way lm-evaluation-harness does.

        Trailing whitespace of the context (spaces, newlines, tabs) moves to the continuation, then the
        continuation's ids are those that follow the context's ids in the encoding of the concatenation (BPE
        merges across the boundary)."""
        n_space = len(context) - len(context.rstrip())
        if n_space:
            context, continuation = context[:-n_space], context[-n_space:] + continuation
        whole = self.tokenizer.encode(context + continuation)
        ctx = self.tokenizer.encode(context) if context else []
        if whole[:len(ctx)] != ctx:  # the merge crossed the boundary: fall back to separate encodings
            whole = ctx + self.tokenizer.encode(continuation)
        return (self.start + ctx) if ctx else self.prefix, whole[len(ctx):]

    def loglikelihood_text(self, pairs: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        return loglikelihood(self, [self.encode_pair(c, x) for c, x in pairs])

    def rolling_text(self, text: str, stride: int = 0) -> list[tuple[float, int]]:
        """(sum log p, tokens) per window over the whole text, each token predicted once."""
        return rolling_loglikelihood(self, self.prefix + self.tokenizer.encode(text), stride)


@torch.inference_mode()
def loglikelihood(lm: EvalLM, requests: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): (sum of log p(continuation | context), whether every
    continuation token is the argmax). Context is cut from the left to fit lm.max_len; a continuation longer
    than that is scored in rolling windows (each token once, with as much context as fits).

    Batched longest-first (similar lengths share a batch, so little padding) and returned in input order."""
    rows, owner = [], []  # one row per window; owner = index of the request it belongs to
    for i, (ctx, cont) in enumerate(requests):
        if not cont or not ctx:
            raise UserError(f"loglikelihood request {i} has an empty {'continuation' if not cont else 'context'}; "
                            f"the context needs at least one token (BOS) to predict the first continuation token")
        ids = ctx + cont
        for s, a, b in rolling_windows(len(ids), lm.max_len, first=max(len(ctx), 1)):
            rows.append((b - s, len(rows), ids[s:b], b - a))
            owner.append(i)
    scores = [(0.0, True)] * len(rows)
    order = sorted(rows, key=lambda r: -r[0])
    for b in range(0, len(order), lm.batch_size):
        batch = order[b:b + lm.batch_size]
        T = batch[0][0] - 1  # inputs are seq[:-1]
        idx = torch.zeros(len(batch), T, dtype=torch.long)
        tgt = torch.zeros(len(batch), T, dtype=torch.long)
        for r, (n, _, seq, _) in enumerate(batch):
            idx[r, :n - 1] = torch.tensor(seq[:-1])
            tgt[r, :n - 1] = torch.tensor(seq[1:])
        out = lm.fn(idx.to(lm.device))  # (B, T, V)
        # only the positions whose targets are scored: normalizing all B*T rows would cost ~10% of the forward
        rr = torch.cat([torch.full((n_cont,), r) for r, (_, _, _, n_cont) in enumerate(batch)])
        pp = torch.cat([torch.arange(n - 1 - n_cont, n - 1) for n, _, _, n_cont in batch])
        sel = out[rr.to(out.device), pp.to(out.device)].float()  # (N, V), N = scored tokens in the batch
        t = tgt[rr, pp].to(out.device)
        logp = (sel.gather(-1, t[:, None]).squeeze(-1) - torch.logsumexp(sel, dim=-1)).cpu()  # (N,)
        greedy = (sel.argmax(dim=-1) == t).cpu()  # (N,)
        start = 0
        for _, j, _, n_cont in batch:
            scores[j] = (float(logp[start:start + n_cont].sum()), bool(greedy[start:start + n_cont].all()))
            start += n_cont
    result = [(0.0, True)] * len(requests)
    for (lp, g), i in zip(scores, owner):
        result[i] = (result[i][0] + lp, result[i][1] and g)
    return result


def rolling_windows(n: int, max_len: int, stride: int = 0, first: int = 1) -> list[tuple[int, int, int]]:
    """Windows (s, a, b) over a sequence of n tokens: input ids[s:b-1] predicts ids[a:b], and only those
    b - a tokens are counted. Every token from `first` on is predicted exactly once, with up to max_len
    tokens of context; stride (<= max_len, 0 = max_len) is how many new tokens each window scores."""
    stride = min(stride or max_len, max_len)
    return [(max(0, min(a + stride, n) - 1 - max_len), a, min(a + stride, n)) for a in range(first, n, stride)]


def rolling_loglikelihood(lm: EvalLM, ids: list[int], stride: int = 0) -> list[tuple[float, int]]:
    """(sum log p, tokens) per window of ids; see rolling_windows."""
    wins = rolling_windows(len(ids), lm.max_len, stride)
    scored = loglikelihood(lm, [(ids[s:a], ids[a:b]) for s, a, b in wins])
    return [(lp, b - a) for (lp, _), (_, a, b) in zip(scored, wins)]


def generate(lm: EvalLM, prompt: str, max_new_tokens: int = 128, stop: tuple[str, ...] = (), n: int = 1,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> list[str]:
    """n completions of prompt (greedy when temperature is 0), each cut before the first stop string.

    The n samples decode as one batch on the shared engine (model/engine.py), through lm.model's KV cache;
    sample i's seed is drawn from a generator seeded with `seed`, so the same seed gives the same texts."""
    if lm.model is None:
        raise UserError("generation needs the model behind the EvalLM (lm.model, e.g. from gpt_lm or load_lm): a "
                        "bare scoring function cannot be decoded with a KV cache")
    # a budget over half the context would leave the prompt little room: short-context models generate less
    max_new_tokens = min(max_new_tokens, lm.max_len // 2)
    # BOS only where the model's tokenizer adds it (lm-eval's generate_until encodes the same way)
    ids = (lm.start + lm.tokenizer.encode(prompt) or lm.prefix)[-(lm.max_len - max_new_tokens):]  # keep the end
    gen = torch.Generator().manual_seed(seed)
    seeds = torch.randint(0, 2 ** 62, (n,), generator=gen).tolist()
    params = [SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, stop=tuple(s for s in stop if s),
                             seed=s) for s in seeds]
    # the engine's text excludes a final stop id and is cut before a stop string; cut_at_stop also catches a stop
    # string that a later one in `stop` overlapped
    return [cut_at_stop(r.text, stop) for r in engine.generate(lm.model, [ids] * n, params, lm.tokenizer, lm.stop_ids)]


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    cut = min((text.find(s) for s in stop if s and s in text), default=len(text))
    return text[:cut]


# ---------------------------------------------------------------------------- the real model

def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_lm(checkpoint: str | Path, tokenizer: str | Path = "", device: str = "cpu", batch_size: int = 16,
            max_len: int = 0, add_bos: bool | None = None, dtype: str = "float32", run: str | Path = "") -> EvalLM:
    """An EvalLM over a model in any format `model.load` reads (ember checkpoint, HF folder, GGUF, llama2.c .bin)
    with the model's own tokenizer; `tokenizer` overrides it, `run` is where an ember checkpoint's lies."""
    from ember.model.load import load

    model, tok = load(checkpoint, device, getattr(torch, dtype), tokenizer=tokenizer, run=run)
    return gpt_lm(model, tok, device=device, batch_size=batch_size, max_len=max_len, add_bos=add_bos)


def gpt_lm(model, tok, device: str = "cpu", batch_size: int = 16, max_len: int = 0,
           add_bos: bool | None = None) -> EvalLM:
    """An EvalLM over an in-memory GPT (logits; scoring normalizes them). add_bos None = the tokenizer's own rule
    (tok.add_bos: ember, llama2.c and Llama tokenizers add BOS, SmolLM2's and Qwen's none), which is what
    lm-evaluation-harness' HF backend does by default: scores then agree with it on the same model."""
    if add_bos is None:
        add_bos = bool(getattr(tok, "add_bos", True))
    stop = getattr(tok, "stop_ids", None) or tuple(t for t in (getattr(tok, "eos_id", None), getattr(tok, "end_id", None))
                                                  if t is not None)
    return EvalLM(fn=lambda idx: model(idx), tokenizer=tok, max_len=max_len or model.config.max_seq_len,
                  batch_size=batch_size, device=device, add_bos=add_bos, model=model, stop_ids=stop)
