"""Generation with a KV cache: sampling, stop strings, streaming, and continuous batching over cache slots.

    engine = Engine(model, tokenizer)                       # tokenizer: anything with decode(ids) -> str
    [r.text for r in engine.generate([ids_a, ids_b], SamplingParams(max_tokens=50, temperature=0))]
    for delta in engine.stream(ids, SamplingParams(seed=1)): print(delta, end="")
    engine.start(); req = engine.submit(ids, params, on_event=fn)    # background thread (the server)

The cache is a fixed set of slots, (n_layer, n_slots, n_kv_head, max_len, head_dim), with a length per slot.
Each scheduler step admits waiting requests into free slots (a prefill of the prompt, alone), then runs ONE
batched decode step for every running request, each at its own position with a padding mask over its own
slot. Requests join and leave between steps (continuous batching, as Orca/vLLM, without paging). All rows of
a step are sampled together as tensor ops with per-row settings, and their ids come to the host in one
transfer; each request draws its randomness from its own seeded generator, so its output depends on its seed,
never on its batch mates or the device.

    generate(model, [ids_a, ids_b], SamplingParams(max_tokens=20, seed=0), tokenizer)   # one-shot, offline
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import queue
import random
import threading
import time
from typing import Callable, Iterator

import torch

from ember.common.config import require
from ember.common.errors import UserError
from ember.model.gpt import GPT


@dataclasses.dataclass
class SamplingParams:
    max_tokens: int = 64  # tokens to generate at most (finish_reason "length" when reached)
    temperature: float = 1.0  # logits / temperature before sampling; 0 = greedy argmax
    top_k: int = 0  # sample among the k most likely tokens; 0 = no limit
    top_p: float = 1.0  # nucleus sampling (Holtzman et al. 2019): smallest set with probability mass >= top_p
    min_p: float = 0.0  # drop tokens with p < min_p * p(most likely token) (Nguyen et al. 2024); 0 = off
    repetition_penalty: float = 1.0  # CTRL (Keskar et al. 2019): seen tokens' logits / p if > 0 else * p; 1 = off
    presence_penalty: float = 0.0  # OpenAI: minus this for every token already generated
    frequency_penalty: float = 0.0  # OpenAI: minus this times how often a token was generated
    stop: tuple[str, ...] = ()  # strings that end generation; the text stops before them
    stop_token_ids: tuple[int, ...] = ()  # ids that end generation, besides the engine's end-of-text ids
    ignore_eos: bool = False  # keep going past end-of-text ids (benchmarks: fixed-length outputs)
    seed: int | None = None  # seed of this request's generator; None = a fresh random seed
    timeout_s: float | None = None  # give up after this many seconds in the engine (finish_reason "timeout")

    def __post_init__(self):
        require(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens", self.max_tokens, "an int >= 1")
        require(0 <= self.temperature <= 100, "temperature", self.temperature, "a float in [0, 100]")
        require(self.top_k >= 0, "top_k", self.top_k, "an int >= 0 (0 = off)")
        require(0 < self.top_p <= 1, "top_p", self.top_p, "a float in (0, 1]")
        require(0 <= self.min_p <= 1, "min_p", self.min_p, "a float in [0, 1]")
        require(0 < self.repetition_penalty <= 10, "repetition_penalty", self.repetition_penalty, "a float in (0, 10]")
        for name in ("presence_penalty", "frequency_penalty"):
            require(-2 <= getattr(self, name) <= 2, name, getattr(self, name), "a float in [-2, 2] (OpenAI's range)")
        self.stop = tuple(self.stop)
        require(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop, "non-empty strings")
        self.stop_token_ids = tuple(self.stop_token_ids)
        require(self.timeout_s is None or self.timeout_s > 0, "timeout_s", self.timeout_s, "seconds > 0 or None")


class QueueFull(Exception):
    """More requests in flight than slots + queue allow; the server answers 429."""


@dataclasses.dataclass(eq=False)
class Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    on_event: Callable[["Request", str], None] | None = None  # (request, new text); finish_reason set on the last
    tokens: list[int] = dataclasses.field(default_factory=list)  # generated ids (incl. a final stop id)
    text: str = ""  # generated text so far (final: cut before a stop string)
    finish_reason: str | None = None  # "stop", "length", "timeout", "cancelled", "error"
    error: str | None = None
    seed: int = 0
    slot: int | None = None
    sent: int = 0  # characters of text already given to on_event
    cancelled: bool = False
    created: float = dataclasses.field(default_factory=time.monotonic)
    done: threading.Event = dataclasses.field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stop generating (client went away); the engine frees the slot at its next step."""
        self.cancelled = True


# ---------------------------------------------------------------------------- sampling (batched)

# One scheduler step samples every row at once: penalties, temperature, top-k, top-p and min-p are tensor ops
# on the (B, V) logits with per-row settings, and the only device->host transfer is the (B,) sampled ids.
# Reproducibility is per request: each request's own CPU random.Random(seed) draws ONE uniform per token (on
# the host, no sync), and the token is the inverse CDF of that uniform over the filtered probabilities in
# vocabulary order. A row's token thus depends only on its own logits and its own uniform, never on its
# batch mates or the device's RNG (vLLM's exponential race needs a device generator per request instead).

def to_device(data, device, dtype=None) -> torch.Tensor:
    """A host list as a tensor on device without a sync: a plain copy from pageable memory waits for the CUDA
    stream to drain (it would stall the host behind a queued forward); from pinned memory it is queued."""
    t = torch.tensor(data, dtype=dtype)
    device = torch.device(device)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


@dataclasses.dataclass
class BatchParams:
    """Per-row sampling settings as (B,) fp32 tensors on the device, plus host-side flags that let a step
    skip what no row uses (off settings are exact identities, so skipping never changes a row's result)."""
    temperature: torch.Tensor
    top_k: torch.Tensor  # 0 or >= V = off
    top_p: torch.Tensor
    min_p: torch.Tensor
    repetition_penalty: torch.Tensor
    presence_penalty: torch.Tensor
    frequency_penalty: torch.Tensor
    uniform: torch.Tensor  # (B,) each row's draw in [0, 1) for the inverse CDF
    greedy: bool = False  # every row has temperature 0
    penalized: bool = True  # some row has a penalty on
    filtered: tuple[bool, bool, bool] = (True, True, True)  # some row uses top-k / top-p / min-p

    @staticmethod
    def of(params: list[SamplingParams], device, uniform: list[float] | None = None) -> "BatchParams":
        """One host->device copy for all rows' settings and draws."""
        u = uniform if uniform is not None else [0.0] * len(params)
        rows = [[float(getattr(p, f)) for f in _FIELDS] + [x] for p, x in zip(params, u)]
        t = to_device(rows, device, torch.float32).unbind(-1)  # 8 x (B,)
        return BatchParams(*t, greedy=all(p.temperature == 0 for p in params),
                           penalized=any(p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty
                                         for p in params),
                           filtered=(any(p.top_k > 0 for p in params), any(p.top_p < 1 for p in params),
                                     any(p.min_p > 0 for p in params)))


def apply_penalties(logits: torch.Tensor, bp: BatchParams, prompt_seen: torch.Tensor,
                    counts: torch.Tensor) -> torch.Tensor:
    """logits (B, V) fp32; prompt_seen (B, V) bool = ids in each row's prompt; counts (B, V) fp32 = times each
    id was generated. Repetition (CTRL) on prompt and generated ids; presence/frequency (OpenAI) on generated only."""
    rep = bp.repetition_penalty[:, None]  # (B, 1); 1 = off: x / 1 and x * 1 are exact
    pen = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(prompt_seen | (counts > 0), pen, logits)
    return logits - bp.presence_penalty[:, None] * (counts > 0) - bp.frequency_penalty[:, None] * counts


def filter_logits(logits: torch.Tensor, bp: BatchParams) -> torch.Tensor:
    """Temperature, then top-k, top-p, min-p (the order of HF's and vLLM's samplers): removed tokens get -inf.
    logits (B, V) fp32; rows with temperature 0 are divided by 1 here (argmax rows, chosen by the caller)."""
    t = bp.temperature[:, None]
    logits = logits / torch.where(t > 0, t, 1.0)
    use_k, use_p, use_min = bp.filtered
    V = logits.shape[-1]
    if use_k or use_p:
        # one sort serves both: the top-k cut removes a tail of the sorted order, so it stays sorted
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)  # (B, V)
        if use_k:
            k = bp.top_k.long()
            k = torch.where((k > 0) & (k < V), k, V)[:, None]  # (B, 1); off -> the smallest logit: cuts nothing
            kth = sorted_logits.gather(-1, k - 1)  # (B, 1); ties with the k-th are kept, as torch.topk's value cut
            logits = logits.masked_fill(logits < kth, float("-inf"))
            sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
        if use_p:
            probs = sorted_logits.softmax(-1)
            # drop a token when the mass BEFORE it already reaches top_p, so the most likely one always stays;
            # rows at top_p = 1 drop nothing (rounding could push a cumsum over 1.0)
            drop = ((probs.cumsum(-1) - probs) >= bp.top_p[:, None]) & (bp.top_p < 1)[:, None]
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    if use_min:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < bp.min_p[:, None] * probs.amax(-1, keepdim=True), float("-inf"))
    return logits


def sample(logits: torch.Tensor, bp: BatchParams, prompt_seen: torch.Tensor | None = None,
           counts: torch.Tensor | None = None) -> torch.Tensor:
    """Next token ids (B,) on the device from logits (B, V): argmax where temperature is 0, else the inverse
    CDF of bp.uniform over the filtered probabilities. No host sync: the caller reads all ids at once."""
    logits = logits.float()
    if bp.penalized:
        logits = apply_penalties(logits, bp, prompt_seen, counts)
    greedy = logits.argmax(-1)  # (B,)
    if bp.greedy:
        return greedy
    # extreme but legal settings (temperature 1e-30, repetition_penalty 1e-300) overflow fp32: cap +inf at the
    # largest float (it then simply wins) and treat NaN as impossible, rather than sample from NaN
    big = torch.finfo(torch.float32).max
    filtered = filter_logits(logits, bp).nan_to_num(nan=float("-inf"), posinf=big, neginf=float("-inf"))
    probs = filtered.softmax(-1)  # (B, V)
    cdf = probs.cumsum(-1)  # (B, V), in vocabulary order
    total = cdf[:, -1:]  # (B, 1): ~1, exactly what the cdf reaches
    # u * total < total strictly (an fp32 u may round up to 1.0), so the search ends at a token with p > 0
    target = torch.minimum(bp.uniform[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    drawn = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)
    bad = ~torch.isfinite(probs).all(-1) | (total[:, 0] <= 0)  # every token removed or overflowed: argmax
    return torch.where(bp.temperature == 0, greedy, torch.where(bad, filtered.argmax(-1), drawn))


def holdback(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of `text` may not be streamed yet: an incomplete UTF-8 character
    (decoded as U+FFFD) or the start of a stop string (e.g. "\\nUs" when stop = "\\nUser:")."""
    n = len(text)
    while n > 0 and len(text) - n < 3 and text[n - 1] == "\ufffd":
        n -= 1
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, n), hold, -1):
            if text.endswith(s[:k], 0, n):
                hold = k
                break
    return len(text) - n + hold


# ---------------------------------------------------------------------------- the cache

def _free_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on device (Linux MemAvailable for the CPU), or None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


class SlotCache:
    """Preallocated keys/values for n_slots sequences; GPT's Attention calls update() once per layer.

    set_rows(slots, starts, T) chooses which slots the next forward writes (row b of the batch -> slots[b]
    at positions starts[b]..starts[b]+T-1); update() then writes and returns each row's keys/values up to
    the longest row; shorter rows are masked by the caller.
    """

    def __init__(self, model: GPT, n_slots: int, max_len: int):
        c, w = model.config, model.tok_emb.weight
        shape = (c.n_layer, n_slots, c.n_kv_head, max_len, c.head_dim)
        need, free = 2 * math.prod(shape) * w.element_size(), _free_bytes(w.device)
        if free is not None and need > free // 2:  # the model's config decides max_len: it may claim any size
            raise UserError(f"the KV cache for {n_slots} slots x {max_len} positions needs {need / 2**30:.1f} GiB, over "
                            f"half of the {free / 2**30:.1f} GiB free on {w.device}: serve with a smaller --context (the "
                            f"model allows {c.max_seq_len}) or fewer --n_slots; in ppo/grpo/constitution, lower "
                            f"max_new_tokens, max_prompt_len or the rollout batch")
        self.k = torch.zeros(shape, device=w.device, dtype=w.dtype)
        self.v = torch.zeros(shape, device=w.device, dtype=w.dtype)
        self.lengths = [0] * n_slots  # positions filled in each slot
        self.max_len = max_len

    def set_rows(self, slots: list[int], T: int) -> None:
        self.rows, self.T = slots, T
        starts = [self.lengths[s] for s in slots]
        self.end = max(starts) + T
        lo = slots[0]
        self.contiguous = slots == list(range(lo, lo + len(slots)))  # then a view, not a gather, reads the cache
        dev = self.k.device
        self.slot_t = to_device(slots, dev)
        self.start_t = to_device(starts, dev)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """k, v (B, n_kv_head, T, head_dim) -> all keys/values of those rows (B, n_kv_head, end, head_dim)."""
        if self.T == 1:  # decode: one new position per row, each at its own place
            self.k[layer, self.slot_t, :, self.start_t] = k[:, :, 0]
            self.v[layer, self.slot_t, :, self.start_t] = v[:, :, 0]
        else:  # prefill: one row
            (s,), start = self.rows, self.lengths[self.rows[0]]
            self.k[layer, s, :, start:start + self.T] = k[0]
            self.v[layer, s, :, start:start + self.T] = v[0]
        if self.contiguous:
            lo = self.rows[0]
            sl = slice(lo, lo + len(self.rows))
            return self.k[layer, sl, :, :self.end], self.v[layer, sl, :, :self.end]
        return self.k[layer, self.slot_t, :, :self.end], self.v[layer, self.slot_t, :, :self.end]

    def advance(self) -> None:
        for s in self.rows:
            self.lengths[s] += self.T


# ---------------------------------------------------------------------------- the engine

_ids = itertools.count()


class Engine:
    def __init__(self, model: GPT, tokenizer=None, *, n_slots: int = 8, max_len: int | None = None,
                 max_queue: int = 64, stop_ids: tuple[int, ...] | list[int] = ()):
        """tokenizer: needs decode(ids) -> str (text and stop strings; None = ids only). stop_ids: the ids
        that end a generation (end-of-text, end-of-turn). max_queue: requests waiting for a slot, at most."""
        require(n_slots >= 1, "n_slots", n_slots, "an int >= 1")
        require(max_queue >= 0, "max_queue", max_queue, "an int >= 0")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.n_slots, self.max_queue = n_slots, max_queue
        self.max_len = min(max_len or model.config.max_seq_len, model.config.max_seq_len)
        self.stop_ids = frozenset(int(i) for i in stop_ids)
        self.vocab_size = model.config.vocab_size
        self.cache = SlotCache(model, n_slots, self.max_len)
        self.slots: list[Request | None] = [None] * n_slots
        self.waiting: collections.deque[Request] = collections.deque()
        self.cond = threading.Condition()  # guards `waiting` and the number in flight; wakes the loop
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.steps = 0  # scheduler steps run (tests check that requests joined mid-flight)
        self._rng: dict[int, random.Random] = {}  # id(request) -> its generator: one uniform per sampled token
        dev = self.cache.k.device
        # per-slot penalty state, on the device so a step's penalties are tensor ops over the batch
        self.prompt_seen = torch.zeros(n_slots, self.vocab_size, dtype=torch.bool, device=dev)  # (S, V) ids in the prompt
        self.counts = torch.zeros(n_slots, self.vocab_size, device=dev)  # (S, V) fp32 times each id was generated

    # ------------------------------------------------------------------ requests in and out

    def in_flight(self) -> int:
        return len(self.waiting) + sum(r is not None for r in self.slots)

    def submit(self, prompt: list[int], params: SamplingParams | None = None,
               on_event: Callable[[Request, str], None] | None = None, request_id: str | None = None) -> Request:
        """Queue a request (thread-safe). Raises UserError for a bad prompt, QueueFull when slots + queue are full."""
        params = params or SamplingParams()
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise UserError("the prompt is empty: give at least one token")
        if any(not 0 <= t < self.vocab_size for t in prompt):
            raise UserError(f"prompt token ids must be in [0, {self.vocab_size})")
        if len(prompt) >= self.max_len:
            raise UserError(f"the prompt has {len(prompt)} tokens; this model's context holds {self.max_len}, "
                            f"so a prompt must be shorter than that to leave room for an answer")
        if params.stop and self.tokenizer is None:
            raise UserError("stop strings need an engine with a tokenizer (stop_token_ids work without one)")
        seed = params.seed if params.seed is not None else random.SystemRandom().getrandbits(62)
        req = Request(request_id or f"req-{next(_ids)}", prompt, params, on_event, seed=seed)
        with self.cond:
            if self.stopping:
                raise QueueFull("the engine is shutting down")
            if self.in_flight() >= self.n_slots + self.max_queue:
                raise QueueFull(f"{self.in_flight()} requests in flight (slots {self.n_slots} + queue {self.max_queue})")
            self.waiting.append(req)
            self.cond.notify_all()
        return req

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None) -> list[Request]:
        """Generate for many prompts at once (as many in the batch as there are slots); blocks until all finish."""
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        reqs, todo = [], list(zip(prompts, plist))
        while todo or any(not r.done.is_set() for r in reqs):
            while todo and self.in_flight() < self.n_slots + self.max_queue:
                reqs.append(self.submit(*todo.pop(0)))
            self._drive(lambda: all(r.done.is_set() for r in reqs) or (todo and self.in_flight() < self.n_slots + self.max_queue))
        return reqs

    def stream(self, prompt: list[int], params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the text of one request as it is generated; the Request's finish_reason is set after the last."""
        q: queue.SimpleQueue = queue.SimpleQueue()
        req = self.submit(prompt, params, on_event=lambda r, delta: q.put(delta))
        try:
            while True:
                self._drive(lambda: not q.empty() or req.done.is_set())
                while not q.empty():
                    delta = q.get()
                    if delta:
                        yield delta
                if req.done.is_set() and q.empty():
                    return
        finally:
            req.cancel()

    def _drive(self, until: Callable[[], bool]) -> None:
        """Make progress until `until()`: step in this thread, or wait for the background thread."""
        while not until():
            if self.thread is not None:
                time.sleep(0.001)
            elif not self.step():
                return

    # ------------------------------------------------------------------ the background loop (server)

    def start(self) -> "Engine":
        if self.thread is None:
            self.stopping = False
            self.thread = threading.Thread(target=self._loop, name="ember-engine", daemon=True)
            self.thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Refuse new requests, let running ones finish (up to `timeout` s), then cancel what is left."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        deadline = time.monotonic() + timeout
        while self.thread is not None and self.in_flight() and time.monotonic() < deadline:
            time.sleep(0.01)
        for r in list(self.waiting) + [r for r in self.slots if r is not None]:
            r.cancel()
        if self.thread is not None:
            with self.cond:
                self.cond.notify_all()
            self.thread.join(timeout=5)
            self.thread = None

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.in_flight() and not self.stopping:
                    self.cond.wait()
                if self.stopping and not self.in_flight():
                    return
            try:
                self.step()
            except Exception as e:  # a bug or out-of-memory: fail the requests in flight, keep serving
                with self.cond:
                    failed = list(self.waiting) + [r for r in self.slots if r is not None]
                for r in failed:
                    r.error = f"{type(e).__name__}: {e}"
                    self._finish(r, "error")

    # ------------------------------------------------------------------ one scheduler step

    @torch.inference_mode()
    def step(self) -> bool:
        """Admit waiting requests into free slots (prefill each), then one decode step for all running.
        Returns False when there was nothing to do."""
        now = time.monotonic()
        with self.cond:
            everyone = [r for r in self.slots if r is not None] + list(self.waiting)
        for r in everyone:
            if r.cancelled:
                self._finish(r, "cancelled")
            elif r.params.timeout_s is not None and now - r.created > r.params.timeout_s:
                self._finish(r, "timeout")
        admitted = []
        with self.cond:
            for s in range(self.n_slots):
                if self.slots[s] is None and self.waiting:
                    r = self.waiting.popleft()
                    r.slot, self.slots[s] = s, r
                    self.cache.lengths[s] = 0
                    admitted.append(r)
        running = [r for r in self.slots if r is not None and r not in admitted]
        if not admitted and not running:
            return False
        self.steps += 1
        rows, dev = running + admitted, self.cache.k.device
        for r in admitted:
            self._rng[id(r)] = random.Random(r.seed)
        # one uniform per sampling row from its own generator (greedy rows draw none: their stream is untouched)
        bp = BatchParams.of([r.params for r in rows], dev,
                            [self._rng[id(r)].random() if r.params.temperature > 0 else 0.0 for r in rows])
        logits = []  # (B_i, V) pieces in the order of rows
        if running:  # decode first so the newly admitted (which have no token to feed yet) do not wait
            idx = to_device([[r.tokens[-1]] for r in running], dev)
            logits.append(self._forward(idx, [r.slot for r in running]))
        for r in admitted:  # a prefill each, alone (its own causal pass over the prompt)
            prompt = to_device(r.prompt, dev)
            self.prompt_seen[r.slot] = False
            self.prompt_seen[r.slot, prompt] = True
            self.counts[r.slot] = 0
            logits.append(self._forward(prompt[None], [r.slot]))
        slots = to_device([r.slot for r in rows], dev)
        ids = sample(torch.cat(logits), bp, self.prompt_seen[slots] if bp.penalized else None,
                     self.counts[slots] if bp.penalized else None)  # (B,) on the device
        self.counts[slots, ids] += 1  # slots are distinct: no two rows write the same cell
        for r, tok in zip(rows, ids.tolist()):  # the step's one device->host transfer
            self._accept(r, tok)
        return True

    def _forward(self, idx: torch.Tensor, slots: list[int]) -> torch.Tensor:
        """GPT's forward with per-row positions and masks: idx (B, T) -> last-position logits (B, V).

        Runs the model's own blocks (Attention writes through SlotCache.update); only the per-row RoPE
        positions and padding mask are ours, since GPT.forward's cache has a single length for all rows.
        """
        m, c = self.model, self.model.config
        B, T = idx.shape
        self.cache.set_rows(slots, T)
        starts = self.cache.start_t
        positions = starts[:, None] + torch.arange(T, device=idx.device)  # (B, T)
        cos, sin = c.rope(positions)  # the model's own RoPE (scaled for long-context models), per-row positions
        if T > 1:  # prefill of one fresh slot: keys are exactly the T queries, plain causal
            assert B == 1 and self.cache.lengths[slots[0]] == 0
            mask, is_causal = None, True
        else:  # decode: row b sees its own positions 0..starts[b]
            mask = (torch.arange(self.cache.end, device=idx.device)[None, :] <= starts[:, None])[:, None, None, :]
            is_causal = False  # mask (B, 1, 1, end)
        x = m.tok_emb(idx)  # (B, T, n_embd)
        for block in m.layers:
            x, _ = block(x, cos, sin, mask, is_causal, self.cache)
        self.cache.advance()
        x = m.norm(x[:, -1])  # (B, n_embd): only the last position predicts the next token
        return m.head(x)

    def _accept(self, r: Request, tok: int) -> None:
        """Append r's next token, update its text, stream, and finish it if done."""
        r.tokens.append(tok)
        p = r.params
        if (tok in self.stop_ids and not p.ignore_eos) or tok in p.stop_token_ids:
            return self._finish(r, "stop", text_ids=r.tokens[:-1])
        if self.tokenizer is not None:
            r.text = self._decode(r, r.tokens)
            for s in p.stop:
                # a stop string can only be new in the tail that this token could have touched
                i = r.text.find(s, max(0, r.sent - len(s)))
                if i >= 0:
                    r.text = r.text[:i]
                    return self._finish(r, "stop")
        if len(r.tokens) >= p.max_tokens or self.cache.lengths[r.slot] >= self.max_len:
            return self._finish(r, "length")
        end = len(r.text) - holdback(r.text, p.stop)
        if end > r.sent:
            delta, r.sent = r.text[r.sent:end], end
            self._notify(r, delta)

    def _notify(self, r: Request, delta: str) -> None:
        """Call the request's callback; one that raises (its client's event loop is gone) cancels only it."""
        if r.on_event is not None:
            try:
                r.on_event(r, delta)
            except Exception:
                r.cancel()

    def _decode(self, r: Request, ids: list[int]) -> str:
        """Text of the generated ids as a continuation of the prompt: decoded after the prompt's last tokens,
        minus their text (as vLLM's detokenizer), so a SentencePiece word-start space after a prompt word
        stays, while it is dropped after a bare BOS, as decoding the whole sequence would."""
        ctx = r.prompt[-4:]
        prefix, full = self.tokenizer.decode(ctx), self.tokenizer.decode(ctx + ids)
        return full[len(prefix):] if full.startswith(prefix) else self.tokenizer.decode(ids)

    def _finish(self, r: Request, reason: str, text_ids: list[int] | None = None) -> None:
        if r.done.is_set():
            return
        if text_ids is not None and self.tokenizer is not None:
            r.text = self._decode(r, text_ids)
        r.finish_reason = reason
        with self.cond:
            if r.slot is not None and self.slots[r.slot] is r:
                self.slots[r.slot] = None
            if r in self.waiting:
                self.waiting.remove(r)
        self._rng.pop(id(r), None)
        delta = r.text[r.sent:] if reason in ("stop", "length") else ""
        r.sent = len(r.text)
        r.done.set()
        self._notify(r, delta)


# ---------------------------------------------------------------------------- one-shot, for offline callers

def generate(model: GPT, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None,
             tokenizer=None, stop_ids: tuple[int, ...] | list[int] = (), n_slots: int = 64) -> list[Request]:
    """Generate for every prompt (token ids) with an engine sized to them, in input order; blocks until done.

    The cache holds the longest prompt + the largest max_tokens (capped at the model's context), in up to
    n_slots rows at once; the rest wait for a free slot. The model's train/eval mode is restored after.
    tokenizer (decode(ids) -> str) is needed for Request.text and stop strings only."""
    plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
    if len(plist) != len(prompts):
        raise UserError(f"generate got {len(plist)} SamplingParams for {len(prompts)} prompts: give one for all, "
                        f"or one per prompt")
    if not prompts:
        return []
    need = max(len(p) for p in prompts) + max(q.max_tokens for q in plist)
    was_training = model.training
    try:
        engine = Engine(model, tokenizer, n_slots=max(1, min(n_slots, len(prompts))), max_len=need,
                        max_queue=len(prompts), stop_ids=stop_ids)
        return engine.generate(prompts, plist)
    finally:
        model.train(was_training)
