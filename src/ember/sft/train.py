"""`ember sft`: supervised fine-tuning of a checkpoint on chat data (full, LoRA or QLoRA), loss on replies only.

    ember sft                                     # LoRA on the built-in stdlib instruction set, <run>/pretrain/final
    ember sft --method=qlora --data=../shared/datasets/alpaca/alpaca_5000.json --steps=500
    ember sft --method=full --train_on_all --packing=false

Conversations are rendered with the tokenizer's chat template; targets are -100 except on assistant replies
(and their closing <|end|>). Packed rows hold several conversations, kept apart by `doc_ids` (block-diagonal
attention, positions restarting at 0). Writes `<run>/sft/final/model.safetensors` (a full model; LoRA merged
into it) plus `adapter.safetensors` for LoRA/QLoRA, the data split in `data/`, held-out samples and metrics.
Sections: init, data, model, optimizer, evaluation, loop, save.
"""

from __future__ import annotations

import json
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from ember.common import artifacts
from ember.common.config import require
from ember.common.errors import UserError
from ember.common.log import Metrics, print0, step_line
from ember.common.records import input_identity
from ember.sft import data as D


@dataclass
class Config:
    run: str = "runs/default"  # run folder; this stage writes <run>/sft/
    model: str = ""  # model to fine-tune: ember checkpoint folder, HF folder, .gguf or llama2.c .bin; empty = <run>/pretrain/final
    tokenizer: str = ""  # tokenizer.json (or its folder); empty = the model's own (beside it, in the GGUF, or <run>/tokenizer)
    data: str = ""  # chat .jsonl/.json file or folder (messages, ShareGPT, Alpaca, prompt/response, OASST); empty = stdlib set
    max_examples: int = 4000  # conversations used at most (the stdlib set builds this many)
    max_files: int = 0  # stdlib set only: parse at most this many source files (0 = all, ~700); bounds build time
    val_fraction: float = 0.05  # conversations held out (by content hash) for loss and stop-rate evaluation
    method: Literal["full", "lora", "qlora"] = "lora"  # what trains: all weights, adapters, or adapters on an NF4 base
    lora_targets: list[str] = field(default_factory=lambda: ["attn", "mlp", "lm_head"])  # groups attn/mlp/all or layer names; lm_head lets a base that never saw <|end|> learn to emit it
    lora_r: int = 16  # adapter rank
    lora_alpha: float = 32.0  # adapter scale = alpha / r (alpha = 2r is the common choice)
    lora_dropout: float = 0.0  # dropout on the adapter input (0.05-0.1 for small data sets)
    train_on_all: bool = False  # loss on every token (prompts too), not only assistant replies
    packing: bool = True  # several conversations per row (no cross-attention); false = one per row, padded
    seq_len: int = 0  # row length in tokens (longer conversations are truncated); 0 = the model's max_seq_len
    batch_size: int = 8  # rows per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step (loss is the token mean over all of them)
    steps: int = 0  # optimizer steps; 0 = `epochs` passes over the training rows
    epochs: float = 2.0  # passes over the data when steps = 0
    lr: float = 0.0  # peak learning rate; 0 = by method: 5e-4 full, 2e-3 LoRA/QLoRA (adapters start at zero)
    warmup_steps: int = 10  # linear warmup, then cosine to 10% of the peak
    weight_decay: float = 0.0  # AdamW decay on trained matrices (SFT runs are short; 0 is the usual choice)
    grad_clip: float = 1.0  # clip the global gradient norm; 0 = off
    eval_every: int = 0  # steps between held-out loss evaluations; 0 = before and after training only
    stop_prompts: int = 50  # held-out prompts answered greedily to measure how often the model ends with <|end|>
    log_every: int = 10  # steps between step lines (metrics.jsonl gets every step)
    seed: int = 0  # data order, adapter init, dropout
    device: str = "auto"  # cpu, cuda, mps; auto = the best available
    dtype: Literal["auto", "fp32", "bf16"] = "auto"  # autocast compute dtype; auto = bf16 where native (CUDA, AVX512-BF16/AMX CPUs), else fp32, as pretrain

    def __post_init__(self):
        for name in ("max_examples", "batch_size", "grad_accum", "lora_r", "log_every"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "an int >= 1")
        for name in ("max_files", "seq_len", "steps", "warmup_steps", "eval_every", "stop_prompts"):
            require(getattr(self, name) >= 0, name, getattr(self, name), "an int >= 0")
        require(0 <= self.val_fraction < 1, "val_fraction", self.val_fraction, "a fraction in [0, 1)")
        require(self.steps > 0 or self.epochs > 0, "epochs", self.epochs, "> 0 when steps = 0")
        require(self.lr >= 0 and self.weight_decay >= 0 and self.grad_clip >= 0, "lr/weight_decay/grad_clip",
                (self.lr, self.weight_decay, self.grad_clip), "floats >= 0")
        require(0 <= self.lora_dropout < 1 and self.lora_alpha > 0, "lora_dropout/lora_alpha",
                (self.lora_dropout, self.lora_alpha), "dropout in [0, 1), alpha > 0")
        from ember.model.lora import resolve_targets

        resolve_targets(self.lora_targets)  # fails early on a misspelled target


PRESETS = {
    # after the quickstart pretrain (depth 4, 256-token rows): < 3 min on 2 shared CPU cores, stops at <|end|> on
    # all 40 held-out prompts (docs/benchmarks.md, Fine-tuning)
    "quickstart": lambda: Config(max_examples=1500, max_files=300, steps=120, batch_size=8, stop_prompts=40),
    # seconds: plumbing only
    "smoke": lambda: Config(max_examples=120, max_files=40, steps=8, batch_size=4, seq_len=64, stop_prompts=4,
                            lora_r=4, lora_alpha=8),
}


# ---------------------------------------------------------------------------- evaluation

@torch.no_grad()
def eval_loss(model, rows, cfg: Config, pad_id: int, seq_len: int, device, autocast) -> float:
    """Mean cross-entropy over every trained (assistant) token of the rows; nan if there are none."""
    model.eval()
    total, count = 0.0, 0
    for b in D.batches(rows, cfg.batch_size, pad_id, cfg.packing, seq_len):
        b = b.to(device)
        with autocast:
            nll = model(b.inputs, b.targets, doc_ids=b.doc_ids, reduction="none")  # (B, T), 0 where ignored
        total += nll.float().sum().item()
        count += int((b.targets != -100).sum())
    model.train()
    return total / count if count else float("nan")


@torch.no_grad()
def stop_eval(model, tok, convs: list[list[dict]], n: int) -> tuple[float, list[dict]]:
    """Share of held-out prompts whose greedy answer ends (the template's end-of-turn token, or EOS) within 2x
    the reference length + 16.

    The prompt is each conversation up to its last assistant reply; that reply is the reference.
    """
    from ember.model.engine import SamplingParams, generate
    from ember.tokenizer.chat import render_chat

    model.eval()
    limit, jobs = model.config.max_seq_len, []
    for conv in convs:
        if len(jobs) == n:
            break
        last = max(i for i, m in enumerate(conv) if m["role"] == "assistant")
        prompt, _ = render_chat(tok, conv[:last], add_generation_prompt=True, where=getattr(conv, "where", "messages"))
        budget = 2 * len(tok.encode(conv[last]["content"])) + 16
        if len(prompt) + budget + 1 > limit:
            continue  # cannot judge within the context window
        jobs.append((conv, last, prompt, budget))
    # all greedy answers decode as one batch; budget + 1 tokens, so one over the budget shows it did not stop
    replies = generate(model, [p for _, _, p, _ in jobs], [SamplingParams(max_tokens=b + 1, temperature=0)
                                                          for _, _, _, b in jobs], stop_ids=tok.stop_ids)
    stopped, samples = 0, []
    for (conv, last, _, budget), r in zip(jobs, replies):
        out = r.tokens[:-1] if r.finish_reason == "stop" else r.tokens  # the stop id is not part of the answer
        ok = len(out) <= budget
        stopped += ok
        samples.append({"prompt": conv[:last], "reference": conv[last]["content"], "answer": tok.decode(out),
                        "stopped": ok})
    model.train()
    return (stopped / len(samples) if samples else float("nan")), samples


def pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.0%}"


def loss_text(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.4f}"


# ---------------------------------------------------------------------------- the recipe

def main(cfg: Config) -> dict:
    from ember.common.checkpoint import save_model
    from ember.common.dist import native_bf16, pick_device
    from ember.model.lora import apply_lora, merge_lora, save_adapter
    from ember.model.quant import dequantize_nf4_, frozen_weight_bytes, quantize_nf4_
    from ember.common.optim import build_adamw, lr_factor
    from ember.model.load import load, model_inputs

    # ---- init
    run_dir = Path(cfg.run)
    ckpt = Path(cfg.model or run_dir / "pretrain" / "final")
    inputs = model_inputs(ckpt, cfg.tokenizer, cfg.run)  # any format model/load.py reads, and its own tokenizer
    if cfg.data:
        inputs["data"] = input_identity(cfg.data)  # a file's path (hashed), or an hf: dataset's identity
    run = artifacts.begin("sft", cfg, inputs=inputs)
    if run.cached:
        return run.metrics
    out = run.dir
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    use_dtype = cfg.dtype if cfg.dtype != "auto" else ("bf16" if native_bf16(device) else "fp32")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_dtype == "bf16" else nullcontext()
    model, tok = load(ckpt, device, tokenizer=cfg.tokenizer, run=cfg.run)  # refuses a tokenizer larger than the model
    mcfg = model.config
    seq_len = cfg.seq_len or mcfg.max_seq_len
    require(seq_len <= mcfg.max_seq_len, "seq_len", seq_len, f"at most the model's max_seq_len = {mcfg.max_seq_len}")
    lr = cfg.lr or (5e-4 if cfg.method == "full" else 2e-3)
    metrics = Metrics(out)

    # ---- data
    t0 = time.perf_counter()
    convs = D.load_conversations(cfg.data) if cfg.data else D.stdlib_conversations(cfg.max_examples, cfg.seed, cfg.max_files)
    convs = convs[:cfg.max_examples]
    train_convs, val_convs = D.split(convs, cfg.val_fraction)
    if not train_convs:
        raise UserError(f"no training conversations left from {cfg.data or 'the stdlib set'} "
                        f"(val_fraction = {cfg.val_fraction}); give more data or a smaller val_fraction")

    def examples(cs):
        exs = [D.encode(tok, c, cfg.train_on_all, seq_len) for c in cs]  # a template's rejection names file:line
        return [e for e in exs if e is not None], sum(e is None for e in exs)

    train_ex, dropped = examples(train_convs)
    val_ex, _ = examples(val_convs)
    truncated = sum(e.truncated for e in train_ex) + dropped  # dropped: no reply left once truncated
    for name, cs in (("train", train_convs), ("val", val_convs)):  # after encoding: a rejected file writes nothing
        artifacts.write_text(out / "data" / f"{name}.jsonl", "".join(json.dumps({"messages": c}) + "\n" for c in cs))
    train_rows = D.make_rows(train_ex, seq_len, cfg.packing)
    val_rows = D.make_rows(val_ex, seq_len, cfg.packing)
    if not train_rows:
        raise UserError(f"all {len(train_convs)} training conversations were dropped: at seq_len = {seq_len} no "
                        f"reply is left after truncation; raise --seq_len (the model allows {mcfg.max_seq_len}) "
                        f"or shorten the prompts")
    data_stats = D.stats(train_rows, seq_len, cfg.packing)
    steps_per_epoch = math.ceil(len(train_rows) / (cfg.batch_size * cfg.grad_accum))
    total_steps = cfg.steps or max(1, round(cfg.epochs * steps_per_epoch))
    print0(f"[sft] {len(train_convs)} train / {len(val_convs)} val conversations ({time.perf_counter() - t0:.1f}s), "
           f"{data_stats['rows']} rows of {seq_len}, {data_stats['trained_tokens']} trained tokens, "
           f"{truncated} truncated, {dropped} dropped (no reply left after truncation)")
    if not val_rows:
        print0(f"[sft] no held-out conversation (val_fraction = {cfg.val_fraction} of {len(convs)}): val loss and "
               f"stop rate are not measured; give more data or a larger val_fraction")

    # ---- model
    n_params = model.num_params()
    if cfg.method == "qlora":
        quantize_nf4_(model)
    if cfg.method in ("lora", "qlora"):
        apply_lora(model, cfg.lora_targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print0(f"[sft] {cfg.method}: {trainable / 1e6:.3f}M trainable of {n_params / 1e6:.2f}M "
           f"| frozen weights {frozen_weight_bytes(model) / 2**20:.1f} MiB | {use_dtype} on {device} | lr {lr:g}")

    # ---- optimizer
    optimizer = build_adamw(model, lr, cfg.weight_decay, (0.9, 0.95), device)

    # ---- evaluation before training (the baseline the metrics compare to)
    val_loss0 = eval_loss(model, val_rows, cfg, tok.pad_id, seq_len, device, autocast)
    stop0, _ = stop_eval(model, tok, val_convs, cfg.stop_prompts)
    print0(f"[sft] before: val loss {loss_text(val_loss0)} | stops at end of turn {pct(stop0)}"
           + (" (no held-out prompt fits the context)" if math.isnan(stop0) and cfg.stop_prompts else ""))
    metrics.log(0, val_loss=val_loss0, stop_rate=stop0)

    # ---- loop
    rng = random.Random(cfg.seed)
    epoch_iter, epoch = D.batches(train_rows, cfg.batch_size, tok.pad_id, cfg.packing, seq_len, rng), 0
    model.train()
    t_start, tokens_seen, loss_val = time.perf_counter(), 0, float("nan")
    for step in range(total_steps):
        t0 = time.perf_counter()
        micro = []
        while len(micro) < cfg.grad_accum:
            b = next(epoch_iter, None)
            if b is None:  # epoch done: reshuffle
                epoch += 1
                epoch_iter = D.batches(train_rows, cfg.batch_size, tok.pad_id, cfg.packing, seq_len, rng)
                continue
            micro.append(b)
        n_total = sum(int((b.targets != -100).sum()) for b in micro)
        lr_now = lr * lr_factor(step, total_steps, cfg.warmup_steps, "cosine", min_ratio=0.1)
        for g in optimizer.param_groups:
            g["lr"] = lr_now
        loss_sum = 0.0
        for b in micro:
            b = b.to(device)
            n = int((b.targets != -100).sum())
            with autocast:
                loss = model(b.inputs, b.targets, doc_ids=b.doc_ids)  # mean over this micro-batch's trained tokens
            (loss * (n / max(n_total, 1))).backward()  # token-weighted mean over the whole step
            loss_sum += loss.item() * n
            tokens_seen += b.inputs.numel()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_val = loss_sum / max(n_total, 1)
        dt = time.perf_counter() - t0
        tok_s = sum(b.inputs.numel() for b in micro) / dt
        metrics.log(step + 1, loss=loss_val, lr=lr_now, tok_per_s=tok_s, epoch=epoch)
        if (step + 1) % cfg.log_every == 0 or step == total_steps - 1:
            print0(step_line(step + 1, total_steps, loss=loss_val, lr=lr_now, dt=dt, **{"tok/s": tok_s}))
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < total_steps:
            vl = eval_loss(model, val_rows, cfg, tok.pad_id, seq_len, device, autocast)
            print0(f"[sft] step {step + 1}: val loss {loss_text(vl)}")
            metrics.log(step + 1, val_loss=vl)
    train_s = time.perf_counter() - t_start

    # ---- evaluation after training
    val_loss = eval_loss(model, val_rows, cfg, tok.pad_id, seq_len, device, autocast)
    stop1, samples = stop_eval(model, tok, val_convs, cfg.stop_prompts)
    print0(f"[sft] after: val loss {loss_text(val_loss)} (was {loss_text(val_loss0)}) | stops at end of turn {pct(stop1)} "
           f"(was {pct(stop0)})")
    metrics.log(total_steps, val_loss=val_loss, stop_rate=stop1)
    metrics.close()
    artifacts.write_text(out / "samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))

    # ---- save: adapter (LoRA) and always a full model, so later stages load one format
    final = out / "final"
    with artifacts.atomic_path(final) as tmp:
        tmp.mkdir()
        if cfg.method != "full":
            save_adapter(tmp, model, base=str(ckpt), method=cfg.method)
            merge_lora(model)
            dequantize_nf4_(model)  # QLoRA: the NF4 embedding/head too; a no-op for LoRA
        save_model(tmp, model)
        tok.save(tmp, model_max_length=mcfg.max_seq_len)  # the model's own tokenizer and chat template, beside it
    r4 = lambda x: None if math.isnan(x) else round(x, 4)  # nan (no held-out data) -> null in meta.json
    return run.finish({
        "method": cfg.method, "steps": total_steps, "epochs": round(total_steps / steps_per_epoch, 3),
        "train_conversations": len(train_convs), "val_conversations": len(val_convs), **data_stats,
        "trainable_params": trainable, "train_loss": r4(loss_val),
        "val_loss_before": r4(val_loss0), "val_loss": r4(val_loss),
        "stop_rate_before": r4(stop0), "stop_rate": r4(stop1),
        "tokens_per_s": round(tokens_seen / max(train_s, 1e-9), 1), "train_seconds": round(train_s, 1),
    })


if __name__ == "__main__":
    from ember.cli import module_main

    module_main(__name__)
