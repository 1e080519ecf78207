"""Checkpoints: round trips of weights + config, and a clear UserError for every wrong or broken file."""

import json

import pytest
import torch
from safetensors.torch import save_file

from ember.common.checkpoint import load_model, load_state, load_weights, save_model, save_state
from ember.common.errors import UserError
from ember.model.gpt import GPTConfig, build_model

TINY = dict(vocab_size=96, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, max_seq_len=32)


def tiny(**kw):
    torch.manual_seed(0)
    return build_model(GPTConfig(**{**TINY, **kw})).eval()


@pytest.mark.parametrize("kw", [{}, {"tie_embeddings": True, "n_expert": 2, "n_expert_active": 1, "qk_norm": True}])
def test_model_round_trip_through_folder_and_file(kw, tmp_path):
    model = tiny(**kw)
    idx = torch.randint(0, 96, (2, 10))
    for target in (tmp_path / "final", tmp_path / "x.safetensors"):
        path = save_model(target, model, metadata={"step": 100})
        assert path.name in ("model.safetensors", "x.safetensors") and path.is_file()
        back = load_model(target)
        assert back.config == model.config
        with torch.no_grad():
            assert torch.equal(back(idx), model(idx))
        assert load_state(path)[1]["step"] == 100


def test_dtype_is_kept_or_converted(tmp_path):
    model = tiny().to(torch.bfloat16)
    save_model(tmp_path, model)
    assert load_model(tmp_path).tok_emb.weight.dtype == torch.bfloat16
    assert load_model(tmp_path, dtype=torch.float32).norm.weight.dtype == torch.float32


def test_save_state_metadata_round_trip_and_no_temp_files_left(tmp_path):
    meta = {"config": {"lr": 3e-4, "betas": [0.9, 0.95]}, "step": 7, "note": "hi"}
    save_state(tmp_path / "s.safetensors", {"a": torch.arange(6).view(2, 3)}, meta)
    tensors, back = load_state(tmp_path / "s.safetensors")
    assert back == meta and torch.equal(tensors["a"], torch.arange(6).view(2, 3))
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]


def test_truncated_garbage_empty_and_missing_files_are_user_errors(tmp_path):
    path = save_model(tmp_path / "ok", tiny())
    data = path.read_bytes()
    cases = {"truncated": data[: len(data) // 2], "garbage": b"\x07not a checkpoint" * 50, "empty": b""}
    for name, blob in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(blob)
        with pytest.raises(UserError, match=f"{name}.safetensors is not a readable safetensors file.*truncated or corrupt"):
            load_model(bad)
    with pytest.raises(UserError, match="does not exist"):
        load_model(tmp_path / "nowhere")


def test_mismatched_files_are_user_errors(tmp_path):
    model = tiny()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    config = {"format": json.dumps("ember.gpt"), "config": json.dumps(vars(model.config))}

    missing = {k: v for k, v in state.items() if k != "layers.1.mlp.up_proj.weight"}
    save_file(missing, str(tmp_path / "missing.safetensors"), metadata=config)
    with pytest.raises(UserError, match=r"missing.*layers.1.mlp.up_proj.weight.*config it was saved with"):
        load_model(tmp_path / "missing.safetensors")

    shaped = {**state, "norm.weight": torch.ones(31)}
    save_file(shaped, str(tmp_path / "shape.safetensors"), metadata=config)
    with pytest.raises(UserError, match=r"wrong shape.*norm.weight \(31,\) vs \(32,\)"):
        load_model(tmp_path / "shape.safetensors")

    save_file(state, str(tmp_path / "noconfig.safetensors"))
    with pytest.raises(UserError, match="no ember model config.*import_hf"):
        load_model(tmp_path / "noconfig.safetensors")

    scalar = {**config, "format": json.dumps("ember.scalar")}
    save_file(state, str(tmp_path / "scalar.safetensors"), metadata=scalar)
    with pytest.raises(UserError, match="holds a 'ember.scalar' model, not an ember language model"):
        load_model(tmp_path / "scalar.safetensors")

    # a config claiming a size its tensors do not have is refused before anything is allocated
    for claim, message in (({"vocab_size": 10 ** 11}, r"wrong shape.*tok_emb.weight"),
                           ({"n_layer": 10 ** 6}, "config says 1000000 layers but its tensors hold 2")):
        huge = {**config, "config": json.dumps({**vars(model.config), **claim})}
        save_file(state, str(tmp_path / "huge.safetensors"), metadata=huge)
        with pytest.raises(UserError, match=message):
            load_model(tmp_path / "huge.safetensors")

    newer = {**config, "config": json.dumps({**vars(model.config), "n_layr": 3})}
    save_file(state, str(tmp_path / "newer.safetensors"), metadata=newer)
    with pytest.raises(UserError, match="unknown config key 'n_layr'.*newer.safetensors"):
        load_model(tmp_path / "newer.safetensors")


def test_load_weights_checks_the_config(tmp_path):
    save_model(tmp_path, tiny())
    other = tiny(n_layer=3)
    with pytest.raises(UserError, match=r"another model config: n_layer=2 \(model has 3\).*load_model"):
        load_weights(other, tmp_path)
    same = build_model(GPTConfig(**TINY))  # a different seed's weights, same shape
    load_weights(same, tmp_path)
    assert torch.equal(same.tok_emb.weight, tiny().tok_emb.weight)
