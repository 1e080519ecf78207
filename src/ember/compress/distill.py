"""`ember distill`: train a smaller student on a teacher's next-token distributions (knowledge distillation).

    ember distill --teacher=runs/q/pretrain/final --student=from_depth:2 --steps=500    # on <run>/tokenize/tokens
    ember distill --teacher=SmolLM2-135M-Instruct.Q4_1.gguf --student=runs/p/compress/final --data=chat.jsonl
    ember distill ... --cache_topk=64     # the teacher's top-64 logits written once to <run>/teacher_cache/, reused
    ember distill ... --alpha=0           # the baseline: the same student from scratch on the same tokens (CE only)

Loss per trained position (Hinton et al. 2015, arXiv:1503.02531): alpha * T^2 * [KL(p_t || p_s) + reverse_kl *
KL(p_s || p_t)] at temperature T, + (1 - alpha) * cross-entropy on the data's next token, + hidden_mse * MSE of the
final hidden states (the student's through a learned projection when the widths differ; the projection is not
saved). T^2 keeps the gradient scale of the soft targets independent of T. Reverse KL is mode-seeking (MiniLLM,
Gu et al. 2023): a small student covers the teacher's main modes instead of spreading over all of them.

Data: a token folder (train split trains, val split is held out) or SFT conversations `{"messages": [...]}`
(.jsonl/.json/.parquet/hf:, rendered with the teacher's chat template; loss on the assistant replies only; a
seeded val_fraction held out). Student: `from_depth:N` (a fresh GPTConfig.from_depth(N) on the teacher's
vocabulary) or any model path (a pruned copy, `ember compress` output), with the teacher's vocabulary size.
Writes <run>/distill/final/ (model + the teacher's tokenizer), metrics.jsonl, meta.json (last). A killed run
starts over (no mid-run checkpoints: distillation runs are short); its folder never looks finished.
"""

from __future__ import annotations

import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ember.common import artifacts
from ember.common.checkpoint import load_state, save_model, save_state
from ember.common.config import require
from ember.common.errors import UserError
from ember.common.log import Metrics, print0, step_line
from ember.model.load import detect_format, find_tokenizer, load, load_model, load_tokenizer_any

CACHE_FORMAT = 1  # bump when the cache layout changes: an old cache is then rebuilt, not misread
CACHE_SHARD_BATCHES = 64  # batches per cache shard file


@dataclass
class Config:
    run: str = "runs/default"  # run folder; this stage writes <run>/distill/
    teacher: str = ""  # teacher model, any format model/load.py reads; empty = <run>/pretrain/final
    student: str = "from_depth:2"  # from_depth:N (fresh GPT, N layers, 64*N wide, the teacher's vocabulary) or a model path
    tokenizer: str = ""  # the teacher's tokenizer (chat data, saved beside the student); empty = the teacher's own
    data: str = ""  # token folder (train/val splits) or SFT conversations (.jsonl/.json/.parquet/hf:); empty = <run>/tokenize/tokens
    val_fraction: float = 0.05  # SFT data only: conversations held out (seeded) for the held-out loss
    seq_len: int = 256  # tokens per row (<= both models' max_seq_len); longer conversations are truncated
    batch_size: int = 8  # rows per step
    steps: int = 500  # optimizer steps
    lr: float = 3e-3  # peak learning rate (a fresh small student; ~1e-4 for a pretrained or pruned one)
    warmup_steps: int = 20  # linear warmup, then cosine to min_lr_ratio * lr
    min_lr_ratio: float = 0.1  # final LR as a fraction of the peak
    weight_decay: float = 0.1  # AdamW decay on matrices
    grad_clip: float = 1.0  # clip the global gradient norm; 0 = off
    temperature: float = 2.0  # softmax temperature of both models in the KL terms (>1 shows the teacher's ranking of wrong tokens)
    alpha: float = 0.9  # weight of the distillation (KL) loss; 1 - alpha on cross-entropy with the data; 0 = no teacher (baseline)
    reverse_kl: float = 0.0  # weight of reverse KL(student || teacher) added to the forward KL (mode-seeking)
    hidden_mse: float = 0.0  # weight of the MSE between final hidden states (teacher's vs projected student's)
    cache_topk: int = 0  # >0: teacher top-k logits (fp16) + indices (int32) + log-partition cached on disk once, reused
    cache_dir: str = ""  # where the teacher cache lives; empty = <run>/teacher_cache (outside distill/: survives new student configs)
    eval_every: int = 100  # steps between held-out evaluations; 0 = before and after training only
    eval_batches: int = 10  # held-out batches per evaluation
    log_every: int = 10  # steps between step lines (metrics.jsonl gets every step)
    seed: int = 0  # student init, data order
    device: str = "auto"  # cpu, cuda, mps; auto = the best available
    dtype: Literal["auto", "fp32", "bf16"] = "auto"  # autocast compute dtype; auto = bf16 where native, else fp32

    def __post_init__(self):
        for name in ("seq_len", "batch_size", "steps", "eval_batches", "log_every"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "an int >= 1")
        for name in ("warmup_steps", "eval_every", "cache_topk"):
            require(getattr(self, name) >= 0, name, getattr(self, name), "an int >= 0")
        require(0 <= self.alpha <= 1, "alpha", self.alpha, "a weight in [0, 1] (1 = distillation loss only)")
        require(self.temperature > 0, "temperature", self.temperature, "a float > 0 (1 = the models' own softmax)")
        require(self.reverse_kl >= 0 and self.hidden_mse >= 0, "reverse_kl/hidden_mse",
                (self.reverse_kl, self.hidden_mse), "weights >= 0")
        require(self.lr > 0 and 0 <= self.min_lr_ratio <= 1, "lr/min_lr_ratio", (self.lr, self.min_lr_ratio),
                "lr > 0 and min_lr_ratio in [0, 1]")
        require(self.weight_decay >= 0 and self.grad_clip >= 0, "weight_decay/grad_clip",
                (self.weight_decay, self.grad_clip), "floats >= 0")
        require(0 <= self.val_fraction < 1, "val_fraction", self.val_fraction, "a fraction in [0, 1)")
        if self.cache_topk and self.hidden_mse:
            raise UserError("config fields 'cache_topk' and 'hidden_mse' do not go together: the hidden-state loss "
                            "needs the teacher's hidden states, which the logit cache does not hold; set one to 0")
        parse_student(self.student)


PRESETS = {
    # a few CPU minutes after the quickstart pretrain: a 2-layer, 128-wide student of the depth-4 model
    "quickstart": lambda: Config(student="from_depth:2", steps=300, batch_size=8, seq_len=256, eval_every=100),
    # seconds: plumbing only
    "smoke": lambda: Config(student="from_depth:1", steps=10, batch_size=4, seq_len=64, eval_every=5, eval_batches=2,
                            log_every=5),
}


def parse_student(spec: str) -> int | str:
    """"from_depth:N" -> N (int); anything else is a model path (str)."""
    if spec.startswith("from_depth:"):
        n = spec.split(":", 1)[1]
        if not n.isdigit() or int(n) < 1:
            raise UserError(f"config field 'student' = {spec!r}: from_depth takes a layer count >= 1, e.g. from_depth:2")
        return int(n)
    if not spec:
        raise UserError("config field 'student' is empty: give from_depth:N or the path of a model to train")
    return spec


# ---------------------------------------------------------------------------- losses (pure tensor functions)

def kl_full(s_logits: torch.Tensor, t_logits: torch.Tensor, temperature: float, reverse: bool = False) -> torch.Tensor:
    """Per-position KL (N,) in nats between the two softmaxes at `temperature` of (N, V) logits: forward
    KL(p_t || p_s) (mean-seeking), or reverse KL(p_s || p_t)."""
    ls = F.log_softmax(s_logits.float() / temperature, dim=-1)
    lt = F.log_softmax(t_logits.float() / temperature, dim=-1)
    a, b = (ls, lt) if reverse else (lt, ls)
    return (a.exp() * (a - b)).sum(dim=-1)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x <= 0; x is capped at -1e-7 so an empty tail (top-k = the whole vocabulary) stays finite:
    it then weighs ~1e-7, negligible."""
    return torch.log(-torch.expm1(x.clamp(max=-1e-7)))


def topk_buckets(s_logits: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, logz: torch.Tensor,
                 temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher and student log-probs (N, K + 1) over K + 1 outcomes: the teacher's top-k tokens and "any other".

    values (N, K) teacher logits of its top-k tokens `indices` (N, K); logz (N,) = logsumexp of the teacher's full
    logits / T, so the teacher's top-k probabilities at T are exact and its tail mass is 1 - their sum. The
    student's tail is 1 - its mass on the same K tokens (its full softmax is at hand)."""
    lt = values.float() / temperature - logz[:, None]  # (N, K) exact teacher log-probs at T
    ls = F.log_softmax(s_logits.float() / temperature, dim=-1).gather(-1, indices.long())  # (N, K)
    lt = torch.cat([lt, _log1mexp(lt.logsumexp(-1, keepdim=True))], dim=-1)
    ls = torch.cat([ls, _log1mexp(ls.logsumexp(-1, keepdim=True))], dim=-1)
    return lt, ls


def kl_topk(s_logits, values, indices, logz, temperature: float, reverse: bool = False) -> torch.Tensor:
    """Per-position KL (N,) between teacher and student coarse-grained to top-k + tail (topk_buckets).

    The approximation: tokens outside the teacher's top-k are merged into one outcome, so how the student spreads
    its tail mass over them is not seen. By the data-processing inequality this is a lower bound of the full KL,
    exact when the teacher's tail mass is 0 (k = V); with the tail kept as its own bucket (not renormalized away)
    the student is still pushed to put the teacher's tail mass, no more, outside the top-k."""
    lt, ls = topk_buckets(s_logits, values, indices, logz, temperature)
    a, b = (ls, lt) if reverse else (lt, ls)
    return (a.exp() * (a - b)).sum(dim=-1)


# ---------------------------------------------------------------------------- data

class Rows:
    """Fixed (N, T) input / target rows (SFT conversations) served as shuffled batches, epoch after epoch."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int):
        self.x, self.y, self.batch_size, self.rng = x, y, batch_size, random.Random(seed)
        self.order: list[int] = []

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = []
        while len(idx) < self.batch_size:
            if not self.order:
                self.order = list(range(len(self.x)))
                self.rng.shuffle(self.order)
            idx.append(self.order.pop())
        return self.x[idx], self.y[idx]


def chat_rows(spec: str, tok, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SFT conversations -> (x, y) (N, seq_len) int64: x the rendered ids (padded with pad_id), y the next id on
    assistant-reply tokens (the template's mask) and -100 elsewhere. Truncated to seq_len + 1 tokens; a
    conversation with no reply token left is dropped."""
    from ember.common.records import read_records

    xs, ys = [], []
    for place, rec in read_records(spec, "--data"):
        msgs = rec.get("messages")
        if not isinstance(msgs, list):
            raise UserError(f"{place}: no 'messages' list; ember distill reads conversations as "
                            f'{{"messages": [{{"role": ..., "content": ...}}, ...]}} (the SFT data format)')
        ids, mask = tok.render_chat(msgs, where=place)
        ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
        y = [t if m else -100 for t, m in zip(ids[1:], mask[1:])]
        if all(t == -100 for t in y):
            continue
        pad = seq_len - len(y)
        xs.append(ids[:-1] + [tok.pad_id] * pad)
        ys.append(y + [-100] * pad)
    if not xs:
        raise UserError(f"--data={spec}: no conversation with an assistant reply within seq_len + 1 tokens")
    return torch.tensor(xs), torch.tensor(ys)


def is_chat(spec: str) -> bool:
    return spec.startswith("hf:") or spec.endswith((".jsonl", ".jsonl.gz", ".json", ".parquet"))


# ---------------------------------------------------------------------------- teacher cache

def build_cache(folder: Path, identity: dict, teacher, source, n_batches: int, k: int, temperature: float,
                device, autocast) -> None:
    """Write the next n_batches training batches and the teacher's top-k at them to folder, atomically.

    Each shard_NNNNN.safetensors holds, for CACHE_SHARD_BATCHES batches of (B, T): x, y (int32), values (B, T, K)
    fp16 teacher logits, indices (B, T, K) int32, logz (B, T) fp32 (logsumexp of logits / T over the whole
    vocabulary). meta.json (identity + batches) is written last; the folder is renamed into place when whole.
    Size: B * T * (6 K + 12) bytes per batch (k = 64, 8 x 256: 0.8 MB)."""
    with artifacts.atomic_path(folder) as tmp:
        tmp.mkdir()
        shard, part = 0, []
        for b in range(n_batches):
            x, y = source.next_batch()
            with torch.no_grad(), autocast:
                logits = teacher(x.to(device)).float()  # (B, T, V)
            vals, idx = logits.topk(k, dim=-1)
            part.append({"x": x.int(), "y": y.int(), "values": vals.half(), "indices": idx.int(),
                         "logz": (logits / temperature).logsumexp(-1)})
            if len(part) == CACHE_SHARD_BATCHES or b == n_batches - 1:
                save_state(tmp / f"shard_{shard:05d}.safetensors",
                           {name: torch.stack([p[name] for p in part]) for name in part[0]})
                shard, part = shard + 1, []
        artifacts.write_json(tmp / "meta.json", {**identity, "batches": n_batches})
    print0(f"[distill] teacher cache: {n_batches} batches, top-{k}, in {folder}")


def cache_fits(folder: Path, identity: dict, n_batches: int) -> bool:
    meta = artifacts.read_json(folder / "meta.json") if (folder / "meta.json").is_file() else None
    return bool(meta) and {k: meta.get(k) for k in identity} == identity and meta.get("batches", 0) >= n_batches


def read_cache(folder: Path, device):
    """Yield (x, y, values, indices, logz) per batch, in the order written."""
    for path in sorted(folder.glob("shard_*.safetensors")):
        t = load_state(path)[0]
        for i in range(t["x"].size(0)):
            yield (t["x"][i].long().to(device), t["y"][i].long().to(device), t["values"][i].to(device),
                   t["indices"][i].to(device), t["logz"][i].to(device))


# ---------------------------------------------------------------------------- the recipe

def main(cfg: Config) -> dict:
    from ember.common.dist import native_bf16, pick_device
    from ember.common.optim import build_adamw, lr_factor
    from ember.data.loader import TokenLoader, check_tokenizer, tokens_folder, val_batches
    from ember.model.gpt import GPTConfig, build_model

    # ---- init
    run_dir = Path(cfg.run)
    teacher_path = Path(cfg.teacher or run_dir / "pretrain" / "final")
    data = cfg.data or str(run_dir / "tokenize" / "tokens")
    chat = is_chat(data)
    student_spec = parse_student(cfg.student)
    inputs = {"teacher": teacher_path, "data": Path(data)}
    if data.startswith("hf:"):
        from ember.common.records import input_identity

        inputs["data"] = input_identity(data)  # a dataset's name, split, revision and fingerprint
    if isinstance(student_spec, str):
        inputs["student"] = Path(student_spec)
    if cfg.tokenizer:
        inputs["tokenizer"] = Path(cfg.tokenizer)
    run = artifacts.begin("distill", cfg, inputs=inputs)
    if run.cached:
        return run.metrics
    out = run.dir
    device = pick_device(cfg.device)
    use_dtype = cfg.dtype if cfg.dtype != "auto" else ("bf16" if native_bf16(device) else "fp32")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_dtype == "bf16" else nullcontext()
    metrics = Metrics(out)

    # ---- teacher (frozen) and its tokenizer
    if detect_format(teacher_path) == "gguf":  # the tokenizer is inside the file
        teacher, tok = load(teacher_path, device, torch.float32)
    else:
        teacher = load_model(teacher_path, device, torch.float32)
        found = cfg.tokenizer or find_tokenizer(teacher_path, cfg.run, teacher.config.vocab_size)
        tok = load_tokenizer_any(found, teacher.config.vocab_size if Path(found).suffix == ".bin" else None) \
            if found else None
    if cfg.tokenizer and detect_format(teacher_path) == "gguf":
        tok = load_tokenizer_any(cfg.tokenizer)
    teacher.eval().requires_grad_(False)
    V = teacher.config.vocab_size

    # ---- data
    if chat:
        if tok is None:
            raise UserError(f"--data={data} holds conversations, which need the teacher's tokenizer (chat template); "
                            f"none found beside {teacher_path}: pass --tokenizer=PATH")
        x_all, y_all = chat_rows(data, tok, cfg.seq_len)
        perm = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(cfg.seed))
        n_val = max(1, round(cfg.val_fraction * len(perm))) if cfg.val_fraction and len(perm) > 1 else 0
        val_idx, train_idx = perm[:n_val], perm[n_val:]
        source = Rows(x_all[train_idx], y_all[train_idx], cfg.batch_size, cfg.seed)
        val = [(x_all[i], y_all[i]) for i in val_idx.split(cfg.batch_size)][:cfg.eval_batches]
        data_vocab = int(x_all.max()) + 1
    else:
        folder = tokens_folder(data)
        if tok is not None:
            check_tokenizer(folder, tok, str(teacher_path))  # ids of another tokenizer are other text to the teacher
        source = TokenLoader(folder, "train", cfg.batch_size, cfg.seq_len, seed=cfg.seed)
        val = list(val_batches(folder, cfg.batch_size, cfg.seq_len, cfg.eval_batches))
        data_vocab = source.vocab_size
    if data_vocab > V:
        raise UserError(f"--data={data}: token ids up to {data_vocab - 1}, beyond the teacher's vocabulary of {V}; "
                        f"tokenize the data with the teacher's tokenizer")

    # ---- student
    torch.manual_seed(cfg.seed)
    if isinstance(student_spec, int):
        scfg = GPTConfig.from_depth(student_spec, V, max_seq_len=teacher.config.max_seq_len)
        student = build_model(scfg, device)
    else:
        student = load_model(student_spec, device, torch.float32)
        if student.config.vocab_size != V:
            raise UserError(f"--student={student_spec}: its vocabulary ({student.config.vocab_size}) differs from "
                            f"the teacher's ({V}); the KL compares their distributions token by token")
    for name, m in (("teacher", teacher), ("student", student)):
        if cfg.seq_len > m.config.max_seq_len:
            raise UserError(f"config field 'seq_len' = {cfg.seq_len} is longer than the {name}'s max_seq_len = "
                            f"{m.config.max_seq_len}; lower seq_len")
    hidden = {}  # final hidden states (after the last norm) by forward hooks, for the hidden-state loss
    proj: nn.Module = nn.Identity()
    if cfg.hidden_mse:
        for name, m in (("teacher", teacher), ("student", student)):
            m.norm.register_forward_hook(lambda mod, args, o, name=name: hidden.__setitem__(name, o))
        ds, dt = student.config.n_embd, teacher.config.n_embd
        if ds != dt:
            proj = nn.Linear(ds, dt, bias=False, device=device)  # learned with the student, not saved
    student.train()
    print0(f"[distill] teacher {teacher.num_params() / 1e6:.2f}M params -> student {student.num_params() / 1e6:.2f}M "
           f"({cfg.student}) | {'chat' if chat else 'tokens'} {data} | T={cfg.temperature} alpha={cfg.alpha} | "
           f"{use_dtype} on {device}")

    # ---- teacher cache: the training batches and the teacher's top-k at them, computed once
    cache = None
    if cfg.cache_topk and cfg.alpha > 0:
        if cfg.cache_topk > V:
            raise UserError(f"config field 'cache_topk' = {cfg.cache_topk} exceeds the vocabulary ({V})")
        folder = Path(cfg.cache_dir or run_dir / "teacher_cache")
        identity = {"format": CACHE_FORMAT, "teacher": run.meta["inputs"]["teacher"]["sha256"],
                    "data": run.meta["inputs"]["data"].get("sha256"), "seq_len": cfg.seq_len,
                    "batch_size": cfg.batch_size, "seed": cfg.seed, "val_fraction": cfg.val_fraction,
                    "topk": cfg.cache_topk, "temperature": cfg.temperature, "dtype": use_dtype}
        if cache_fits(folder, identity, cfg.steps):
            print0(f"[distill] reusing the teacher cache in {folder}")
        else:
            build_cache(folder, identity, teacher, source, cfg.steps, cfg.cache_topk, cfg.temperature, device, autocast)
        cache = read_cache(folder, device)

    # ---- optimizer (the projection trains with the student)
    optimizer = build_adamw(nn.ModuleDict({"student": student, "proj": proj}), cfg.lr, cfg.weight_decay,
                            (0.9, 0.95), device)
    params = [p for g in optimizer.param_groups for p in g["params"]]

    # ---- evaluation: held-out cross-entropy and forward KL (T = 1) to the teacher
    @torch.no_grad()
    def evaluate(model) -> dict:
        was = model.training
        model.eval()
        ce = kl = n = 0.0
        for x, y in val:
            x, y = x.to(device), y.to(device)
            with autocast:
                s, t = model(x).float(), teacher(x).float()
            keep = y != -100
            ce += F.cross_entropy(s[keep], y[keep], reduction="sum").item()
            kl += kl_full(s[keep], t[keep], 1.0).sum().item()
            n += int(keep.sum())
        model.train(was)
        return {"val_loss": ce / max(n, 1), "val_kl": kl / max(n, 1)}

    teacher_val = evaluate(teacher)["val_loss"]
    first = evaluate(student)
    print0(f"[distill] held-out: teacher loss {teacher_val:.4f} | student loss {first['val_loss']:.4f} "
           f"kl {first['val_kl']:.4f}")
    metrics.log(0, **first)

    # ---- loop
    t_start, last = time.perf_counter(), first
    for step in range(1, cfg.steps + 1):
        t0 = time.perf_counter()
        lr = cfg.lr * lr_factor(step - 1, cfg.steps, cfg.warmup_steps, "cosine", min_ratio=cfg.min_lr_ratio)
        for g in optimizer.param_groups:
            g["lr"] = lr
        if cache is not None:
            x, y, values, indices, logz = next(cache)
        else:
            x, y = source.next_batch()
            x, y = x.to(device), y.to(device)
        keep = y != -100  # (B, T) trained positions
        with autocast:
            s_logits = student(x)  # (B, T, V)
            ce = F.cross_entropy(s_logits[keep].float(), y[keep])
            kd = torch.zeros((), device=device)
            if cfg.alpha > 0:
                T2 = cfg.temperature ** 2
                if cache is not None:
                    args = (s_logits[keep], values[keep], indices[keep], logz[keep], cfg.temperature)
                    kd = T2 * kl_topk(*args).mean()
                    if cfg.reverse_kl:
                        kd = kd + cfg.reverse_kl * T2 * kl_topk(*args, reverse=True).mean()
                else:
                    with torch.no_grad():
                        t_logits = teacher(x)
                    kd = T2 * kl_full(s_logits[keep], t_logits[keep], cfg.temperature).mean()
                    if cfg.reverse_kl:
                        kd = kd + cfg.reverse_kl * T2 * kl_full(s_logits[keep], t_logits[keep], cfg.temperature,
                                                                reverse=True).mean()
            loss = cfg.alpha * kd + (1 - cfg.alpha) * ce
            mse = None
            if cfg.hidden_mse:
                if cfg.alpha == 0:
                    with torch.no_grad():
                        teacher(x)
                mse = F.mse_loss(proj(hidden["student"][keep]).float(), hidden["teacher"][keep].float())
                loss = loss + cfg.hidden_mse * mse
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        row = {"loss": loss.item(), "ce": ce.item(), "kl": kd.item(), "lr": lr}
        if mse is not None:
            row["mse"] = mse.item()
        metrics.log(step, **row, tok_per_s=x.numel() / dt)
        if step % cfg.log_every == 0 or step == cfg.steps:
            print0(step_line(step, cfg.steps, **row, dt=dt, **{"tok/s": x.numel() / dt}))
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
            last = evaluate(student)
            print0(step_line(step, cfg.steps, **last))
            metrics.log(step, **last)
    train_s = time.perf_counter() - t_start
    metrics.close()

    # ---- save: the student and the teacher's tokenizer beside it (what model.load finds)
    with artifacts.atomic_path(out / "final") as tmp:
        tmp.mkdir()
        save_model(tmp, student, {"distilled_from": str(teacher_path)})
        if tok is not None:
            tok.save(tmp, model_max_length=student.config.max_seq_len)
    r5 = lambda v: round(v, 5)  # noqa: E731
    return run.finish({
        "steps": cfg.steps, "tokens": cfg.steps * cfg.batch_size * cfg.seq_len, "student": cfg.student,
        "student_params": student.num_params(), "teacher_params": teacher.num_params(),
        "teacher_val_loss": r5(teacher_val), "val_loss_before": r5(first["val_loss"]),
        "val_loss": r5(last["val_loss"]), "val_kl_before": r5(first["val_kl"]), "val_kl": r5(last["val_kl"]),
        "cached_topk": cfg.cache_topk if cache is not None else 0, "train_seconds": round(train_s, 1),
    })


if __name__ == "__main__":
    from ember.cli import module_main

    module_main(__name__)
