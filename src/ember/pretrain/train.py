"""`ember pretrain`: pretraining and mid-training of the GPT on token shards, one recipe top to bottom.

    ember pretrain --preset=tiny                                        # one process: CPU, or one GPU
    ember pretrain --preset=d12 --run=runs/d12 --dry-run > d12.json     # torchrun takes the config as a file
    torchrun --nproc_per_node=8 -m ember.pretrain.train --config=d12.json
    ember pretrain --run=runs/mid --init_from=runs/base/pretrain/final --mix=stdlib:0.7,tinystories:0.3
    ember pretrain --run=runs/smol --init_from=SmolLM2-135M-Instruct.Q4_1.gguf   # after tokenize --tokenizer=(same)

Pretraining reads `<run>/tokenize/tokens/`; mid-training is the same loop started from a checkpoint's
weights (`--init_from`) with a fresh optimizer and schedule, usually on a weighted mixture (`--mix`). A run
killed at any point resumes from its newest `<run>/pretrain/step_N/` when started again with the same
config and inputs, bit-identical to an uninterrupted run. Sections: init, data, model, optimizer, loop
(eval / sample / save inline), final save.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from ember.common import artifacts, dist, train_state
from ember.common.config import require
from ember.common.errors import UserError
from ember.common.log import Metrics, print0, step_line
from ember.data.loader import TokenShards, check_tokenizer, open_loader, tokens_folder, val_batches
from ember.model.gpt import GPTConfig
from ember.common.optim import SpikeGuard, build_adamw, lr_factor
from ember.tokenizer.special import byte_decoder

MAX_ROLLBACKS = 5  # a run that needs more than this many rollbacks is diverging, not hitting bad batches


@dataclass
class Config:
    run: str = "runs/default"  # run folder; this stage writes <run>/pretrain/
    model: GPTConfig = field(default_factory=lambda: GPTConfig(vocab_size=0))  # architecture; vocab_size 0 = the tokens' vocabulary
    data: str = ""  # token folder with meta.json and {train,val}_*.bin; empty = <run>/tokenize/tokens
    mix: str = ""  # mid-training mixture "name:weight,...": name = a token folder, or a run whose tokenize/tokens to use (runs/<name>)
    tokenizer: str = ""  # for samples and bits-per-byte; empty = <run>/tokenizer, else the --init_from model's own (none: skipped)
    init_from: str = ""  # starting weights (and config): ember checkpoint (final/, step_N/), HF folder, .gguf, llama2.c .bin
    seed: int = 1337  # model init and data order
    device: str = "auto"  # cpu, cuda, mps; auto = the best available (cuda:LOCAL_RANK under torchrun)
    threads: int = 0  # CPU intra-op threads per process; 0 = torch's default (one per core). 1 is faster on a busy machine
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # autocast compute dtype (weights stay fp32); auto = bf16 where native (CUDA, AVX512-BF16/AMX CPUs), else fp32
    batch_size: int = 8  # sequences per micro-batch per process
    seq_len: int = 256  # tokens per sequence (<= model.max_seq_len)
    batch_tokens: int = 0  # tokens per optimizer step over all processes (grad accumulation fills it); 0 = one micro-batch each
    steps: int = 1000  # optimizer steps
    lr: float = 3e-3  # peak learning rate (small models tolerate large LRs; ~6e-4 at GPT-2 small scale)
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"  # after warmup: cosine to min_lr, or warmup-stable-decay
    warmup_steps: int = 50  # linear warmup steps
    decay_frac: float = 0.2  # wsd: fraction of the steps spent decaying at the end
    min_lr_ratio: float = 0.1  # final LR as a fraction of the peak
    weight_decay: float = 0.1  # AdamW decoupled decay on matrices (not norms, biases, embeddings)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay (0.95 rather than 0.999: faster reaction to loss spikes)
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 = off
    eval_every: int = 100  # steps between validation passes (loss, bits per byte); 0 = only at the end
    eval_batches: int = 20  # micro-batches per process in one validation pass
    sample_every: int = 0  # steps between printed samples from fixed prompts; 0 = only at the end
    sample_tokens: int = 64  # new tokens per sample
    save_every: int = 100  # steps between checkpoints (resume, rollback); 0 = only the final model
    keep_last: int = 2  # step checkpoints to keep (older ones are deleted); 0 = keep all
    log_every: int = 10  # steps between step lines (the JSONL gets every step)
    spike_z: float = 6.0  # skip a step whose loss is this many std above the recent mean; 0 = only skip non-finite
    spike_window: int = 50  # recent accepted losses the spike statistics use
    spike_rollback: int = 3  # this many consecutive skipped steps roll back to the last checkpoint; 0 = never
    data_parallel: Literal["ddp", "fsdp"] = "ddp"  # with >1 process: replicate (DDP) or shard params/grads/optimizer (FSDP2)
    tp: int = 1  # tensor-parallel degree (divides world size and n_kv_head); >1 implies FSDP2 over the rest
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~30% more compute
    compile: bool = False  # torch.compile each block (worth it on GPU; slow to start on CPU)
    tensorboard: bool = False  # also write TensorBoard events to <run>/pretrain/tb

    def __post_init__(self):
        for name in ("batch_size", "seq_len", "steps", "tp"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "an int >= 1")
        for name in ("threads", "batch_tokens", "warmup_steps", "eval_every", "sample_every", "save_every", "keep_last",
                     "spike_rollback"):
            require(getattr(self, name) >= 0, name, getattr(self, name), "an int >= 0")
        require(self.eval_batches >= 1 and self.log_every >= 1 and self.spike_window >= 2, "eval_batches/log_every/"
                "spike_window", (self.eval_batches, self.log_every, self.spike_window), "ints >= 1 (window >= 2)")
        require(self.lr > 0 and 0 <= self.min_lr_ratio <= 1, "lr/min_lr_ratio", (self.lr, self.min_lr_ratio),
                "lr > 0 and min_lr_ratio in [0, 1]")
        require(0 < self.decay_frac <= 1, "decay_frac", self.decay_frac, "a fraction in (0, 1]")
        require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1/beta2", (self.beta1, self.beta2), "in [0, 1)")
        require(self.grad_clip >= 0 and self.weight_decay >= 0 and self.spike_z >= 0,
                "grad_clip/weight_decay/spike_z", (self.grad_clip, self.weight_decay, self.spike_z), "floats >= 0")
        if not self.init_from:  # (an --init_from model's context and heads are checked when it is loaded)
            require(self.seq_len <= self.model.max_seq_len, "seq_len", self.seq_len,
                    f"at most model.max_seq_len = {self.model.max_seq_len}")
            check_tp(self.tp, self.model)
        parse_mix(self.mix)  # fails early on a malformed mixture


def check_tp(tp: int, model_cfg: GPTConfig) -> None:
    require(model_cfg.n_kv_head % tp == 0 and model_cfg.n_head % tp == 0, "tp", tp,
            f"a divisor of the model's n_kv_head = {model_cfg.n_kv_head} and n_head = {model_cfg.n_head} "
            f"(tensor parallelism splits attention by head)")


def tiny() -> Config:
    """A few-minute CPU run: 4 layers, 256 wide (~3M non-embedding parameters)."""
    return Config(model=GPTConfig.from_depth(4, 0, max_seq_len=256), steps=300, batch_size=8, seq_len=256,
                  lr=3e-3, warmup_steps=30, eval_every=100, save_every=100)


def quickstart() -> Config:
    """The README pipeline: 500 steps x 2048 tokens of the stdlib tokens; 3 minutes on a quiet 2-core CPU with
    native bf16, 11 under heavy load (docs/benchmarks.md). Samples look like Python (docs/stages/pretrain.md)."""
    return Config(model=GPTConfig.from_depth(4, 0, max_seq_len=256), steps=500, batch_size=8, seq_len=256,
                  lr=3e-3, warmup_steps=40, eval_every=250, eval_batches=10, save_every=250, log_every=25)


def smoke() -> Config:
    """The CI pipeline: seconds of a CPU; checks plumbing, not learning."""
    return Config(model=GPTConfig.from_depth(2, 0, n_embd=64, n_head=2, n_kv_head=2, max_seq_len=64),
                  steps=30, batch_size=4, seq_len=64, lr=1e-2, warmup_steps=5, eval_every=15, eval_batches=2,
                  save_every=15, log_every=5, sample_tokens=16)


def d12() -> Config:
    """GPT-2 small scale on GPUs: 768 wide, 12 layers, 0.5M-token batches (GPT-3 paper's 125M row)."""
    return Config(model=GPTConfig.from_depth(12, 0, max_seq_len=2048), batch_size=16, seq_len=2048,
                  batch_tokens=524288, steps=10000, lr=6e-4, warmup_steps=700, eval_every=250, save_every=1000,
                  log_every=10, compile=True, data_parallel="fsdp")


PRESETS = {"tiny": tiny, "quickstart": quickstart, "smoke": smoke, "d12": d12}


# ---------------------------------------------------------------------------- helpers

def parse_mix(mix: str) -> list[tuple[str, float]]:
    """'stdlib:0.7,other:0.3' -> [('stdlib', 0.7), ('other', 0.3)]; weights are relative (normalized later)."""
    out = []
    for part in filter(None, (p.strip() for p in mix.split(","))):
        name, sep, w = part.rpartition(":")
        try:
            weight = float(w)
        except ValueError:
            weight = -1.0
        if not sep or not name or not weight > 0:
            raise UserError(f"config field 'mix' = {mix!r}: entry {part!r} is not NAME:WEIGHT with WEIGHT > 0 "
                            f"(e.g. --mix=stdlib:0.7,runs/other/tokenize/tokens:0.3)")
        out.append((name, weight))
    return out


def resolve_tokens(name: str, run: str) -> Path:
    """A mixture name -> its token folder: a path to a token folder, else the run runs/<name> (sibling of
    this run's folder) and its tokenize/tokens."""
    p = Path(name)
    for cand in (p, p / "tokenize" / "tokens", Path(run).parent / name / "tokenize" / "tokens"):
        if (cand / "meta.json").is_file():
            return cand
    raise UserError(f"mix entry '{name}': no token folder (with meta.json) at {p}, {p}/tokenize/tokens or "
                    f"{Path(run).parent / name}/tokenize/tokens. Run `ember tokenize --run=...` for it first.")


_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def token_bytes(tokenizer, vocab_size: int) -> torch.Tensor:
    """UTF-8 bytes each token id stands for (0 for special tokens and ids past the vocabulary), for bits per
    byte. Not `decode([i])`: a token holding part of a character decodes to U+FFFD (3 bytes). Byte-level BPE
    (ember's, GPT-2/SmolLM/Qwen/Llama-3's) writes each byte as one character of GPT-2's alphabet, so its string
    length is the byte count; SentencePiece-style vocabularies spell bytes "<0x0A>" (1 byte) and the space
    "▁" (1 byte, 3 in UTF-8), other pieces are their own UTF-8 text."""
    special = set(tokenizer.ids.values())
    alphabet = byte_decoder()
    # byte-level = tokens decode through GPT-2's byte alphabet (a vocabulary may lack the bytes UTF-8 never uses)
    decoder = json.loads(tokenizer.hf.to_str()).get("decoder") if tokenizer.hf is not None else None
    byte_level = "ByteLevel" in json.dumps(decoder)

    def n_bytes(s: str) -> int:
        if byte_level and all(c in alphabet for c in s):
            return len(s)
        if _BYTE_TOKEN.fullmatch(s):
            return 1
        return len(s.replace("▁", " ").encode("utf-8"))

    tokens = [None if i in special else tokenizer.id_to_token(i) for i in range(min(vocab_size, tokenizer.vocab_size))]
    out = torch.zeros(vocab_size, dtype=torch.float64)
    out[:len(tokens)] = torch.tensor([0 if t is None else n_bytes(t) for t in tokens], dtype=torch.float64)
    return out


def init_model(path: str, device, dtype=torch.float32):
    """(model in fp32, its own tokenizer or None) from any format. The tokenizer is the GGUF's, or the one found
    beside the model / in its run (model.load.find_tokenizer); an ember checkpoint may have none at hand."""
    from ember.model.load import detect_format, find_tokenizer, load, load_model
    from ember.tokenizer.special import load_tokenizer

    if detect_format(path) == "gguf":  # the tokenizer is in the file's metadata: one read gives both
        return load(path, device, dtype)
    model = load_model(path, device, dtype)  # fp32 master weights: an HF folder may be stored in bf16
    found = find_tokenizer(path, vocab_size=model.config.vocab_size)
    if found is None:
        return model, None
    return model, load_tokenizer(found, model.config.vocab_size if found.suffix == ".bin" else None)


def begin(cfg: Config, inputs: dict):
    """artifacts.begin on rank 0 only (one writer of meta.json); every rank learns whether it is cached."""
    run = artifacts.begin("pretrain", cfg, inputs=inputs) if dist.rank() == 0 else None
    cached = dist.broadcast_object(run.metrics if run is not None and run.cached else None)
    return run, cached


# ---------------------------------------------------------------------------- the recipe

def main(cfg: Config) -> dict:
    # ---- init
    env = dist.init(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = Path(cfg.run)
    sources = ([(resolve_tokens(n, cfg.run), w) for n, w in parse_mix(cfg.mix)] if cfg.mix
               else [(Path(cfg.data or run_dir / "tokenize" / "tokens"), 1.0)])
    tok_path = Path(cfg.tokenizer or run_dir / "tokenizer" / "tokenizer.json")
    inputs = {f"tokens{i or ''}": p for i, (p, _) in enumerate(sources)}
    if cfg.tokenizer or tok_path.is_file():
        inputs["tokenizer"] = tok_path
    if cfg.init_from:
        inputs["init_from"] = Path(cfg.init_from)
    for p, _ in sources:  # evaluation reads the val split, at the latest after the last step: check it now
        if p.exists():  # (a missing folder: artifacts.begin says which stage makes it)
            split = artifacts.read_json(tokens_folder(p) / "meta.json").get("splits", {}).get("val", {})
            if max((s["tokens"] for s in split.get("shards", [])), default=0) < cfg.seq_len + 1:
                raise UserError(f"{p}: the 'val' split has no shard of seq_len + 1 = {cfg.seq_len + 1} tokens. "
                                f"Pretraining evaluates on it (every eval_every steps and after the last), so it "
                                f"checks it before training: tokenize with --val_fraction > 0, or lower seq_len")
            TokenShards(p, "val", cfg.seq_len)  # and its files are whole (their own error says how to fix them)
    run, cached = begin(cfg, inputs)
    if cached is not None:
        return cached
    out_dir = run_dir / "pretrain"
    use_dtype = cfg.dtype if cfg.dtype != "auto" else ("bf16" if dist.native_bf16(env.device) else "fp32")
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[use_dtype]
    autocast = (torch.autocast(env.device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext())
    scaler = torch.amp.GradScaler(env.device.type) if use_dtype == "fp16" else None  # fp16 needs loss scaling
    ckpt = train_state.latest(out_dir)  # artifacts.begin kept this folder (same config and inputs): resume
    metrics = Metrics(out_dir, tensorboard=cfg.tensorboard, resume=ckpt is not None)

    # ---- data
    if env.world_size % cfg.tp:
        raise UserError(f"config field 'tp' = {cfg.tp} does not divide the {env.world_size} processes")
    dp_rank, dp_size = env.rank // cfg.tp, env.world_size // cfg.tp  # TP ranks of one group read the same data
    micro_tokens = cfg.batch_size * cfg.seq_len * dp_size  # distinct tokens of one micro-step, all processes
    batch_tokens = cfg.batch_tokens or micro_tokens
    if batch_tokens % micro_tokens:
        raise UserError(f"config field 'batch_tokens' = {batch_tokens} is not a multiple of batch_size * seq_len * "
                        f"data-parallel groups = {cfg.batch_size} * {cfg.seq_len} * {dp_size} = {micro_tokens}")
    accum = batch_tokens // micro_tokens  # micro-batches per optimizer step on each process
    loader = open_loader([str(p) for p, _ in sources], [w for _, w in sources], cfg.batch_size, cfg.seq_len,
                         seed=cfg.seed, rank=dp_rank, world_size=dp_size)
    vocab = loader.vocab_size

    # ---- model
    own_tok = None  # the --init_from model's own tokenizer
    if cfg.init_from:
        model, own_tok = init_model(cfg.init_from, env.device)
        if own_tok is not None:  # ids from another tokenizer would mean other text to this model
            for p, _ in sources:
                check_tokenizer(p, own_tok, cfg.init_from)
        mcfg = model.config
        check_tp(cfg.tp, mcfg)
        if cfg.seq_len > mcfg.max_seq_len:
            raise UserError(f"config field 'seq_len' = {cfg.seq_len} is longer than the --init_from model's "
                            f"max_seq_len = {mcfg.max_seq_len}; lower seq_len")
        if mcfg.vocab_size < vocab:
            raise UserError(f"--init_from={cfg.init_from}: the model's vocabulary ({mcfg.vocab_size}) is smaller "
                            f"than the token ids in the data ({vocab}); tokenize with the model's tokenizer")
    else:
        from ember.model.gpt import build_model

        if 0 < cfg.model.vocab_size < vocab:
            raise UserError(f"config field 'model.vocab_size' = {cfg.model.vocab_size} is smaller than the vocabulary "
                            f"of the tokens ({vocab}); set it to 0 (= from the tokens) or >= {vocab}")
        mcfg = dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or vocab)
        # the same initial weights on every rank, then sharded or replicated: exact parity with one process. (A
        # model too large for one device would instead be built on "meta", parallelized, then materialized.)
        torch.manual_seed(cfg.seed)
        model = build_model(mcfg, env.device)
    n_params = model.num_params()
    flops_per_token = model.flops_per_token(cfg.seq_len)
    mesh = dist.make_mesh(env.device, cfg.tp)
    model = dist.parallelize(model, mesh, cfg)
    print0(f"[pretrain] {n_params / 1e6:.2f}M params | {env.world_size} process(es) on {env.device} | "
           f"{use_dtype} | batch {batch_tokens} tokens = {accum} x {cfg.batch_size} x {cfg.seq_len} x {env.world_size}")

    # ---- optimizer
    optimizer = build_adamw(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), env.device)
    guard = SpikeGuard(cfg.spike_z, cfg.spike_window, cfg.spike_rollback)
    step, tokens_seen, rollbacks = 0, 0, 0

    def state() -> dict:  # everything besides weights/optimizer that an exact resume needs (JSON)
        return {"loader": loader.state_dict(), "guard": guard.state_dict(), "tokens_seen": tokens_seen,
                "rollbacks": rollbacks, "scaler": scaler.state_dict() if scaler else None}

    def restore(folder: Path, with_loader: bool) -> int:
        nonlocal tokens_seen, rollbacks
        meta = train_state.load(folder, model, optimizer)
        s = meta["state"]
        guard.load_state_dict(s["guard"])
        if with_loader:
            loader.load_state_dict(s["loader"])
            tokens_seen, rollbacks = s["tokens_seen"], s["rollbacks"]
        if scaler is not None and s["scaler"]:
            scaler.load_state_dict(s["scaler"])
        return meta["step"]

    if ckpt is not None:
        step = restore(ckpt, with_loader=True)
        metrics.resume_at(step)  # the steps after the checkpoint run again: their old rows go
        print0(f"[pretrain] resumed from {ckpt} at step {step}")

    # validation and samples
    tokenizer, tbytes = own_tok, None
    if "tokenizer" in inputs:
        from ember.tokenizer.special import load_tokenizer

        tokenizer = load_tokenizer(tok_path)
    if tokenizer is not None:
        tbytes = token_bytes(tokenizer, mcfg.vocab_size).to(env.device)

    @torch.no_grad()
    def evaluate() -> dict:
        model.eval()
        nll_sum = torch.zeros((), dtype=torch.float64, device=env.device)
        n_tok = torch.zeros((), dtype=torch.float64, device=env.device)
        nll_bytes = torch.zeros((), dtype=torch.float64, device=env.device)
        n_bytes = torch.zeros((), dtype=torch.float64, device=env.device)
        for x, y in val_batches([str(p) for p, _ in sources], cfg.batch_size, cfg.seq_len, cfg.eval_batches,
                                rank=dp_rank, world_size=dp_size):
            x, y = x.to(env.device), y.to(env.device)
            with autocast:
                nll = model(x, y, reduction="none").double()  # (B, T) nats
            nll_sum += nll.sum()
            n_tok += y.numel()
            if tbytes is not None:  # bits per byte: tokenizer-independent, so comparable across vocabularies
                b = tbytes[y]
                nll_bytes += (nll * (b > 0)).sum()
                n_bytes += b.sum()
        model.train()
        sums = dist.all_reduce_mean(torch.stack([nll_sum, n_tok, nll_bytes, n_bytes]))
        out = {"val_loss": (sums[0] / sums[1]).item()}
        if tbytes is not None and sums[3] > 0:
            out["val_bpb"] = (sums[2] / math.log(2) / sums[3]).item()
        return out

    def samples() -> None:
        if tokenizer is None or dist.is_sharded(model) or dist.rank() != 0:
            return  # a sharded model would need every rank in each forward; use `ember sample` on final/
        from ember.pretrain.sample import PROMPTS, sample_prompts

        for s in sample_prompts(dist.unwrap(model), tokenizer, PROMPTS[:3], cfg.sample_tokens, seed=cfg.seed):
            print0(f"  sample | {s['prompt'] + s['completion']!r}")

    # ---- loop
    model.train()
    last, t_last, tok_last = {}, time.perf_counter(), tokens_seen
    while step < cfg.steps:
        lr = cfg.lr * lr_factor(step, cfg.steps, cfg.warmup_steps, cfg.schedule, cfg.decay_frac, cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=env.device)
        for micro in range(accum):
            x, y = loader.next_batch()
            x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
            dist.set_grad_sync(model, micro == accum - 1)  # all-reduce/reduce-scatter once per step
            with autocast:
                loss = model(x, y) / accum  # mean over the step's tokens: equal-sized micro-batches
            (scaler.scale(loss) if scaler else loss).backward()
            loss_sum += loss.detach()
        tokens_seen += batch_tokens
        loss_val = dist.all_reduce_mean(loss_sum).item()  # the same number (and verdict) on every rank
        verdict = guard.check(loss_val)
        grad_norm = None
        if verdict == "ok":
            if scaler is not None:
                scaler.unscale_(optimizer)
            grad_norm = dist.clip_grad_norm(model, cfg.grad_clip)  # measured even unclipped: NaN/inf skip the step
            if not math.isfinite(grad_norm) and scaler is None:  # (with fp16 the scaler skips inf steps)
                verdict = "nonfinite_grad"
        if verdict == "ok":
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        roll_back = guard.update(loss_val, verdict)
        step += 1

        now = time.perf_counter()
        if verdict != "ok":  # loss-spike / NaN guard: the step was not applied
            print0(step_line(step, cfg.steps, loss=loss_val, lr=lr, event=f"skipped ({verdict})"))
            metrics.log(step, event="skip", reason=verdict, loss=loss_val if math.isfinite(loss_val) else None)
        if roll_back:
            first_bad = step - guard.bad_streak  # steps first_bad..step-1 (0-based) were skipped
            target = train_state.latest(out_dir, before=first_bad)
            if rollbacks >= MAX_ROLLBACKS:
                raise UserError(f"pretrain diverged: {guard.bad_streak} bad steps in a row after {rollbacks} "
                                f"rollbacks. Lower --lr, lengthen --warmup_steps, or raise --spike_z.")
            if target is None:
                print0(f"[pretrain] step {step}: {guard.bad_streak} bad steps, but no checkpoint before step "
                       f"{first_bad} to roll back to; continuing")
                guard.bad_streak = 0
            else:
                rollbacks += 1
                old = step
                step = restore(target, with_loader=False)  # the loader runs on: the bad batches are skipped
                print0(f"[pretrain] rollback {rollbacks}: step {old} -> {step} ({target.name}); "
                       f"the {old - step} batches since are skipped")
                metrics.log(old, event="rollback", to_step=step, skipped_batches=(old - step) * accum)
            continue
        if verdict == "ok":
            row = {"loss": loss_val, "lr": lr, "grad_norm": grad_norm, "tokens": tokens_seen}
            metrics.log(step, **row)
        if step % cfg.log_every == 0 or step == cfg.steps:
            dt = (now - t_last) / max(1, step % cfg.log_every or cfg.log_every)
            tps = (tokens_seen - tok_last) / max(now - t_last, 1e-9)
            mfu = tps * flops_per_token / (dist.peak_flops(str(env.device), amp_dtype or torch.float32)
                                          * env.world_size)
            print0(step_line(step, cfg.steps, loss=loss_val, lr=lr, dt=dt, **{"tok/s": tps}, mfu=mfu))
            metrics.log(step, tok_per_s=tps, mfu=mfu)
            t_last, tok_last = time.perf_counter(), tokens_seen
        paused = time.perf_counter()  # evaluation, samples and saves: left out of the next tok/s window
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
            last = evaluate()
            print0(step_line(step, cfg.steps, **last))
            metrics.log(step, **last)
        if (cfg.sample_every and step % cfg.sample_every == 0) or step == cfg.steps:
            samples()
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
            train_state.save(out_dir, step, model, optimizer, mcfg, state(), cfg.keep_last)
        t_last += time.perf_counter() - paused

    # ---- final save
    train_state.save_final(out_dir / "final", model, mcfg)
    if own_tok is not None and "tokenizer" not in inputs and dist.rank() == 0:
        # the --init_from model's tokenizer (its BOS rule, chat template) beside the weights, where model.load
        # finds it: this run has no <run>/tokenizer of its own
        own_tok.save(out_dir / "final", model_max_length=mcfg.max_seq_len)
    metrics.close()
    result = {**{k: round(v, 5) for k, v in last.items()}, "steps": step, "tokens": tokens_seen,
              "params": n_params, "rollbacks": rollbacks}
    if run is not None:
        result = run.finish(result)
    dist.barrier()
    return result


if __name__ == "__main__":
    from ember.cli import module_main

    module_main(__name__)
