"""The recipe under 2 processes (CPU/gloo): DDP, FSDP2 and TP follow the 1-process run with the same global
batch, and an FSDP2 (DCP) checkpoint written at world size 2 resumes at world size 1."""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from ember.common import dist, train_state
from ember.common.log import read_metrics
from ember.pretrain import train

from .conftest import tiny_config

STEPS = 6


def losses(run) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "pretrain" / "metrics.jsonl") if "loss" in r]


def weights(run) -> dict:
    return load_file(run / "pretrain" / "final" / "model.safetensors")


@pytest.fixture(scope="module")
def single(tmp_path_factory, tokens):
    """One process, 4 rows per step: the reference for 2 processes x 2 rows."""
    run = tmp_path_factory.mktemp("single")
    torch.set_num_threads(1)
    train.main(tiny_config(run, tokens, steps=STEPS, batch_size=4, save_every=3, eval_every=0))
    return run


def main_on_ranks(cfg, crash_after_step=None):
    torch.set_num_threads(1)
    if crash_after_step is not None:  # a job preempted right after writing a checkpoint
        save = train_state.save

        def save_then_crash(*args, **kwargs):
            out = save(*args, **kwargs)
            if args[1] == crash_after_step:
                raise RuntimeError(f"preempted after step {crash_after_step}")
            return out
        train_state.save = save_then_crash
    train.main(cfg)
    return dist.rank()


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(mode, tmp_path, tokens, single):
    cfg = tiny_config(tmp_path, tokens, steps=STEPS, batch_size=2, save_every=3, eval_every=0, data_parallel=mode)
    assert dist.run_distributed(main_on_ranks, 2, cfg) == [0, 1]
    assert losses(tmp_path) == pytest.approx(losses(single), abs=1e-5)
    ref = weights(single)
    for k, v in weights(tmp_path).items():
        torch.testing.assert_close(v, ref[k], atol=1e-5, rtol=0)
    ckpt = tmp_path / "pretrain" / "step_000003"
    assert (ckpt / "dcp").is_dir() if mode == "fsdp" else (ckpt / "optimizer.safetensors").is_file()


def test_tensor_parallel_training_follows_one_process(tmp_path, tokens):
    """tp=2 on 2 processes (one data-parallel group, FSDP2 over it): the same 4 rows per step as the 1-process
    run, gradient clipping across the (dp, tp) and dp meshes, and 4 x 32 tokens counted per step, not 2x."""
    kw = dict(steps=STEPS, batch_size=4, save_every=0, eval_every=0, grad_clip=0.05)  # 0.05: clipping does act
    model = dataclasses.replace(tiny_config(tmp_path, tokens).model, n_head=2, n_kv_head=2)  # heads split 2 ways
    torch.set_num_threads(1)
    train.main(tiny_config(tmp_path / "one", tokens, model=model, **kw))
    cfg = tiny_config(tmp_path / "tp", tokens, model=model, tp=2, **kw)
    assert dist.run_distributed(main_on_ranks, 2, cfg) == [0, 1]
    assert losses(tmp_path / "tp") == pytest.approx(losses(tmp_path / "one"), abs=1e-4)
    rows = [r for r in read_metrics(tmp_path / "tp" / "pretrain" / "metrics.jsonl") if "loss" in r]
    assert rows[-1]["tokens"] == STEPS * 4 * cfg.seq_len and rows[0]["grad_norm"] > 0.05
    ref = weights(tmp_path / "one")
    for k, v in weights(tmp_path / "tp").items():
        torch.testing.assert_close(v, ref[k], atol=1e-4, rtol=0)


def test_fsdp_checkpoint_resumes_on_one_process(tmp_path, tokens, single):
    # 128 tokens per step: 1 micro-batch of 2 rows per process at world size 2, 2 micro-batches at world size 1
    cfg = tiny_config(tmp_path, tokens, steps=STEPS, batch_size=2, batch_tokens=128, save_every=3, eval_every=0,
                      data_parallel="fsdp")
    with pytest.raises(RuntimeError, match="preempted after step 3"):
        dist.run_distributed(main_on_ranks, 2, cfg, 3)
    assert (tmp_path / "pretrain" / "step_000003" / "dcp").is_dir()
    assert not (tmp_path / "pretrain" / "final").exists()
    out = train.main(cfg)  # the same config (so the unfinished folder is kept) on one process
    assert out["steps"] == STEPS and len(losses(tmp_path)) == STEPS  # resumed at 3, not restarted
    assert losses(tmp_path)[3:] == pytest.approx(losses(single)[3:], abs=1e-5)  # steps 4-6, on one process
    ref = weights(single)
    for k, v in weights(tmp_path).items():
        torch.testing.assert_close(v, ref[k], atol=1e-5, rtol=0)
