"""parallelize() on CPU/gloo with 2 processes: DDP and FSDP2 train like one process on the same global batch,
TP computes the same forward, and run_distributed reports a failing rank."""

from types import SimpleNamespace

import pytest
import torch

from ember.common import dist
from ember.common.errors import UserError
from ember.model.gpt import GPTConfig, build_model
from ember.common.optim import build_adamw

CFG = GPTConfig(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, max_seq_len=16)
STEPS = 3


def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, CFG.vocab_size, (4, 16), generator=g) for _ in range(STEPS)]


def train(data_parallel: str = "ddp", tp: int = 1, checkpointing: bool = False) -> list[float]:
    """A few AdamW steps on the global batches; each rank takes its rows. Returns the global mean losses."""
    torch.manual_seed(0)
    model = build_model(CFG)
    pcfg = SimpleNamespace(tp=tp, activation_checkpointing=checkpointing, compile=False, data_parallel=data_parallel)
    model = dist.parallelize(model, dist.make_mesh(torch.device("cpu"), tp), pcfg)
    opt = build_adamw(model, 1e-2, 0.1, (0.9, 0.95), torch.device("cpu"))
    r, n = dist.rank() // tp, dist.world_size() // tp
    losses = []
    for x in batches():
        rows = x.chunk(n)[r]
        loss = model(rows, rows)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(dist.all_reduce_mean(loss.detach()).item())
    return losses


@pytest.fixture(scope="module")
def reference():
    return train()


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_data_parallel_matches_one_process(mode, reference):
    per_rank = dist.run_distributed(train, 2, mode, 1, mode == "fsdp")  # FSDP2 also with checkpointing on
    for losses in per_rank:
        assert losses == pytest.approx(reference, abs=1e-5)
    assert reference[-1] < reference[0]  # it trained


def tp_forward():
    torch.manual_seed(0)
    model = build_model(CFG)
    x = batches()[0]
    pcfg = SimpleNamespace(tp=2, activation_checkpointing=False, compile=False, data_parallel="fsdp")
    model = dist.parallelize(model, dist.make_mesh(torch.device("cpu"), tp=2), pcfg)
    assert dist.is_sharded(model)
    with torch.no_grad():
        logits = model(x)
    return logits.full_tensor() if hasattr(logits, "full_tensor") else logits


def test_tensor_parallel_forward_matches():
    torch.manual_seed(0)
    ref = build_model(CFG)
    with torch.no_grad():
        expected = ref(batches()[0])
    for logits in dist.run_distributed(tp_forward, 2):
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def fail_on_rank_1():
    if dist.rank() == 1:
        raise ValueError("boom on rank 1")
    return dist.world_size()


def test_run_distributed_reports_a_failing_rank():
    with pytest.raises(RuntimeError, match="boom on rank 1"):
        dist.run_distributed(fail_on_rank_1, 2)


def test_one_process_helpers():
    assert (dist.rank(), dist.world_size(), dist.is_distributed()) == (0, 1, False)
    x = torch.tensor([1.0, 2.0])
    assert torch.equal(dist.all_reduce_mean(x), x)
    assert dist.broadcast_object({"a": 1}) == {"a": 1}
    assert dist.peak_flops("cpu") > 1e8  # a measured matmul rate; any CPU does > 0.1 GFLOP/s
    # fp16 matmuls are emulated on most CPUs (~1 GFLOP/s): the MFU denominator is at least fp32's peak
    assert dist.peak_flops("cpu", torch.float16) >= dist._measured_peak("cpu", torch.float32, torch.get_num_threads())


def test_a_bad_or_absent_device_is_a_user_error():
    from ember.common.dist import pick_device

    with pytest.raises(UserError, match=r"device 'gpu' is not a device: use auto, cpu, cuda"):
        pick_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match=r"device 'cuda': this machine has none of that kind"):
            pick_device("cuda")
    assert pick_device("cpu") == torch.device("cpu")
