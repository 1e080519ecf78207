"""Training-state checkpoints in DCP form (as FSDP2/TP write them), here in one process: a round trip loads
the same weights and optimizer, and a hostile checkpoint index cannot run code."""

import pickle

import pytest
import torch

from ember.common import dist, train_state
from ember.common.errors import UserError
from ember.model.gpt import GPTConfig, build_model
from ember.common.optim import build_adamw

CFG = GPTConfig(vocab_size=64, n_layer=1, n_head=2, n_kv_head=1, n_embd=16, max_seq_len=16)


def model_and_optimizer(seed):
    torch.manual_seed(seed)
    model = build_model(CFG, "cpu")
    opt = build_adamw(model, 1e-2, 0.0, (0.9, 0.95), torch.device("cpu"))
    model(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8))).backward()
    opt.step()
    return model, opt


@pytest.fixture
def dcp_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(dist, "is_sharded", lambda model: True)  # save the way a sharded run does
    model, opt = model_and_optimizer(0)
    folder = train_state.save(tmp_path, 1, model, opt, CFG, state={"note": "x"})
    assert (folder / "dcp" / ".metadata").is_file()
    return folder, model, opt


def test_dcp_round_trip(dcp_checkpoint):
    folder, model, opt = dcp_checkpoint
    other, other_opt = model_and_optimizer(1)
    meta = train_state.load(folder, other, other_opt)
    assert meta["sharded"] and meta["state"] == {"note": "x"}
    for (n, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), n
    saved, loaded = opt.state_dict(), other_opt.state_dict()
    assert loaded["param_groups"] == saved["param_groups"]  # non-tensor values, read with weights_only
    assert saved["state"] and loaded["state"].keys() == saved["state"].keys()
    for i, st in saved["state"].items():  # AdamW's step, exp_avg, exp_avg_sq per parameter
        assert all(torch.equal(st[k], loaded["state"][i][k]) for k in st), i


class Payload:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('ran')",))


def test_a_hostile_dcp_index_is_refused_unrun(dcp_checkpoint, tmp_path, monkeypatch):
    folder, _, _ = dcp_checkpoint
    monkeypatch.chdir(tmp_path)
    (folder / "dcp" / ".metadata").write_bytes(pickle.dumps(Payload()))
    model, opt = model_and_optimizer(1)
    with pytest.raises(UserError, match=r"\.metadata: not a checkpoint index ember can trust .*builtins.exec"):
        train_state.load(folder, model, opt)
    assert not (tmp_path / "PWNED").exists()
