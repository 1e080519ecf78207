"""Distributed training through torch.distributed only: process-group init, rank helpers, `parallelize`.

    python -m ember.pretrain.train ...                                   # one process
    torchrun --nproc_per_node=8 -m ember.pretrain.train --data_parallel=fsdp --tp=2

The model files hold no parallel code; `parallelize(model, mesh, cfg)` applies tensor parallel → activation
checkpointing → torch.compile → FSDP2 (or DDP), in that order (the torchtitan recipe). `run_distributed`
forks N processes over gloo on CPU so tests exercise the same code paths as a GPU cluster.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
import pickle
import socket
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from ember.common.errors import UserError
from ember.common.log import print0  # noqa: F401  (re-exported: `from ember.common.dist import print0`)


# ---------------------------------------------------------------------------- process group

@dataclass
class Env:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device


def pick_device(name: str = "auto") -> torch.device:
    """'auto' = cuda when present (this process's LOCAL_RANK GPU under torchrun), else mps, else cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        name = "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"device '{name}' is not a device: use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    available = {"cpu": 1, "cuda": torch.cuda.device_count() if torch.cuda.is_available() else 0,
                 "mps": int(torch.backends.mps.is_available())}.get(dev.type)
    if available is not None and (dev.index or 0) >= available:
        have = "none" if not available else (f"{available} (cuda:0..cuda:{available - 1})" if dev.type == "cuda" else "1")
        raise UserError(f"device '{name}': this machine has {have} of that kind (torch {torch.__version__}); "
                        f"use --device=auto or cpu")
    return dev


def init(device: str = "auto") -> Env:
    """Join the process group torchrun describes (RANK/WORLD_SIZE/MASTER_ADDR env), if any.

    NCCL on CUDA, gloo otherwise. Without WORLD_SIZE > 1 nothing is initialized: one plain process.
    """
    world = int(os.environ.get("WORLD_SIZE", 1))
    dev = pick_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Env(rank(), int(os.environ.get("LOCAL_RANK", 0)), world_size(), dev)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of x over all ranks (x itself on one process)."""
    if is_distributed():
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= world_size()
    return x


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank src's obj on every rank (any picklable value)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def destroy() -> None:
    if is_distributed():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------- parallelize

def make_mesh(device: torch.device, tp: int = 1):
    """A ("dp",) or ("dp", "tp") DeviceMesh over all ranks; None on one process (nothing to shard)."""
    from torch.distributed.device_mesh import init_device_mesh

    n = world_size()
    if n == 1:
        return None
    assert n % tp == 0, f"world size {n} is not a multiple of tp={tp}"
    if tp == 1:
        return init_device_mesh(device.type, (n,), mesh_dim_names=("dp",))
    return init_device_mesh(device.type, (n // tp, tp), mesh_dim_names=("dp", "tp"))


# Megatron-style TP (Shoeybi et al. 2019): column-split the projections into heads / hidden units, row-split
# the projections back to the residual stream, so each block costs one all-reduce in attention and one in
# the MLP. Matched by name suffix, so MoE experts (experts.N.gate_proj, ...) are split the same way.
_COLWISE = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
_ROWWISE = ("o_proj", "down_proj")


def tp_plan(model: nn.Module) -> dict:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            if name.endswith(_COLWISE):
                plan[name] = ColwiseParallel()
            elif name.endswith(_ROWWISE):
                plan[name] = RowwiseParallel()
    return plan


def apply_tp(model: nn.Module, tp_mesh) -> None:
    from torch.distributed.tensor.parallel import parallelize_module

    tp = tp_mesh.size()
    parallelize_module(model, tp_mesh, tp_plan(model))
    for mod in model.modules():  # attention reshapes with its own head counts: each rank now holds 1/tp of them
        if hasattr(mod, "head_dim") and hasattr(mod, "n_kv_head"):
            assert mod.n_kv_head % tp == 0, f"n_kv_head={mod.n_kv_head} is not divisible by tp={tp}"
            mod.n_head, mod.n_kv_head = mod.n_head // tp, mod.n_kv_head // tp


def _checkpointed(forward: Callable) -> Callable:
    """forward recomputed in backward instead of keeping its activations (Chen et al. 2016)."""
    from torch.utils.checkpoint import checkpoint

    @functools.wraps(forward)
    def wrapped(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return wrapped


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks (model.layers), the unit of checkpointing, compiling and sharding."""
    return list(getattr(model, "layers", []))


def parallelize(model: nn.Module, mesh, cfg) -> nn.Module:
    """TP → activation checkpointing → compile → FSDP2 / DDP, in that order; returns the model to train.

    cfg needs: tp (int), activation_checkpointing (bool), compile (bool), data_parallel ("ddp" | "fsdp").
    mesh: from make_mesh, or None for one process (then only checkpointing and compile apply). Patching
    forward (not wrapping modules) keeps parameter names unchanged, so checkpoints need no renaming.
    DDP returns a wrapper (unwrap() gives the model back); FSDP2 and TP modify the model in place.
    """
    if mesh is not None and cfg.tp > 1:
        apply_tp(model, mesh["tp"])
    for block in blocks(model):
        if cfg.activation_checkpointing:
            block.forward = _checkpointed(block.forward)
        if cfg.compile:
            block.compile()  # per block: one graph reused n_layer times, and FSDP hooks stay outside it
    if mesh is None:
        return model
    dp_mesh = mesh["dp"] if cfg.tp > 1 else mesh
    if cfg.data_parallel == "fsdp" or cfg.tp > 1:
        from torch.distributed.fsdp import fully_shard

        # ZeRO-3 style (Rajbhandari et al. 2020): each block's parameters, grads and optimizer state live
        # sharded; a block is all-gathered just before its forward/backward and freed after.
        for block in blocks(model):
            fully_shard(block, mesh=dp_mesh)
        fully_shard(model, mesh=dp_mesh)  # the rest: embeddings, final norm, head
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    dev = next(model.parameters()).device
    return DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None, process_group=dp_mesh.get_group())


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2/TP modify in place, so they need no unwrapping)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_sharded(model: nn.Module) -> bool:
    """True when parameters are DTensors (FSDP2 or TP): checkpoints then go through DCP."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """The gradients' global L2 norm; scaled down to max_norm when above it (max_norm <= 0: measured only).

    torch's clip_grad_norm_ stacks per-tensor norms, which fails when gradients live on different device
    meshes, as with TP + FSDP2 (the (dp, tp) mesh for TP layers, the dp mesh for the rest): each mesh's
    norm is taken whole (full_tensor) and the groups are combined here.
    """
    from torch.distributed.tensor import DTensor

    groups: dict = {}
    for p in model.parameters():
        if p.grad is not None:
            groups.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p.grad)
    if not groups:
        return 0.0
    norms = [torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in gs])) for gs in groups.values()]
    total = torch.linalg.vector_norm(torch.stack([n.full_tensor() if isinstance(n, DTensor) else n for n in norms]))
    total = float(total)
    if max_norm > 0 and total > max_norm:  # (a non-finite norm is left to the caller: the step is skipped)
        for gs in groups.values():
            torch._foreach_mul_(gs, max_norm / (total + 1e-6))
    return total


def set_grad_sync(model: nn.Module, on: bool) -> None:
    """Gradient accumulation: skip the gradient all-reduce/reduce-scatter on all but the last micro-step."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model.require_backward_grad_sync = on
    elif hasattr(model, "set_requires_gradient_sync"):  # an FSDP2 module
        model.set_requires_gradient_sync(on)


# ---------------------------------------------------------------------------- hardware: bf16, peak FLOP/s

def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively: CUDA (Ampere+), or a CPU with AVX512-BF16 / AMX (about 1.5x faster
    than fp32 for a small GPT on such a CPU; without them bf16 is emulated and slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private but stable since torch 2.3
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}


def peak_flops(device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s the MFU is measured against: the datasheet dense bf16 peak for known GPUs, else measured.

    Measured = the best of 10 large square matmuls in `dtype` (~0.5 s) with the current thread count: on a CPU
    this is the machine's real BLAS peak, the honest denominator (datasheet CPU peaks assume every vector unit
    busy). On a machine shared with other work it reads low, and MFU reads high.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        for key, flops in _PEAK_BF16.items():
            if key in name:
                return flops
    peak = _measured_peak(str(dev), dtype, torch.get_num_threads())
    if dtype != torch.float32:  # fp16 on most CPUs is emulated (~1 GFLOP/s here) and autocast may not use it:
        peak = max(peak, _measured_peak(str(dev), torch.float32, torch.get_num_threads()))  # never over 100%
    return peak


@functools.lru_cache(maxsize=None)
def _measured_peak(device: str, dtype: torch.dtype, threads: int) -> float:
    dev = torch.device(device)
    n = 1024 if dev.type == "cpu" else 4096
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    best, spent = float("inf"), 0.0
    for _ in range(10):  # the best of 10, or of fewer when one takes long (emulated fp16: ~2 s each)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if dev.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
        spent += time.perf_counter() - t0
        if spent > 1.0:
            break
    return 2 * n ** 3 / best


# ---------------------------------------------------------------------------- tests: N processes on CPU

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank_, world, port, queue, args, kwargs):
    os.environ.update(RANK=str(rank_), LOCAL_RANK=str(rank_), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # one intra-op thread per process: N processes share the cores (and forked OpenMP pools can hang)
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank_, world_size=world)
        # plain pickle bytes: torch's queue pickler would share tensor memory with a process about to exit
        queue.put((rank_, True, pickle.dumps(fn(*args, **kwargs))))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        queue.put((rank_, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int = 2, *args, timeout: float = 300, **kwargs) -> list:
    """Run fn(*args, **kwargs) in `world_size` forked processes joined over gloo; returns their results by rank.

    For tests on CPU: fn sees a normal torchrun-like environment (RANK, WORLD_SIZE, an initialized default
    group). Results must be picklable (tensors too). A failure in any rank raises here with
    that rank's traceback.
    """
    ctx = mp.get_context("fork")  # fork: fn may be a local function of a test module
    queue, port = ctx.SimpleQueue(), _free_port()
    procs = [ctx.Process(target=_child, args=(fn, r, world_size, port, queue, args, kwargs), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    deadline = time.time() + timeout
    while len(results) < world_size and not errors and time.time() < deadline:
        if not queue.empty():
            r, ok, value = queue.get()
            if ok:
                results[r] = pickle.loads(value)
            else:
                errors.append(f"rank {r}:\n{value}")
        elif any(p.exitcode not in (None, 0) for p in procs):
            time.sleep(0.5)  # a crashed child may still be flushing its report
            if queue.empty():
                break
        else:
            time.sleep(0.02)
    for p in procs:  # after an error the other ranks may wait in a collective forever: stop them
        p.join(timeout=10 if not errors else 1)
        if p.is_alive():
            p.kill()
            p.join()
    if errors or len(results) < world_size:
        codes = {r: p.exitcode for r, p in enumerate(procs)}
        raise RuntimeError("run_distributed failed " + (("\n".join(errors)) or f"(exit codes {codes}, timeout {timeout}s)"))
    return [results[r] for r in range(world_size)]
