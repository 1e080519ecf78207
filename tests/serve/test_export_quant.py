"""`ember export --gguf_type=q8_0|q4_0|q4_k|q4_k_m|...`: a quantized GGUF is read back dequantized and checked
tensor by tensor against the checkpoint; a bad type is a one-line error before anything is written; a writer
whose bytes do not read back as the weights fails the stage."""

import pytest
import torch

from ember.common.config import parse
from ember.common.errors import UserError
from ember.model.gpt import GPTConfig, build_model
from ember.serve.export import Config, main

pytest.importorskip("gguf", reason="the gguf package is in the dev extra")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder with a tokenizer and a random pretrain/final checkpoint 256 wide (whole K-quant blocks)."""
    from ember.common.checkpoint import save_model
    from ember.tokenizer.train import save, train_tokenizer

    run = tmp_path_factory.mktemp("run")
    save(train_tokenizer(["hello world, this is ember. " * 5, "def f(x):\n    return x + 1\n" * 3], 290, 1),
         run / "tokenizer")
    torch.manual_seed(0)
    save_model(run / "pretrain" / "final", build_model(GPTConfig(vocab_size=320, n_layer=2, n_head=4, n_kv_head=2,
                                                                 n_embd=256, ffn_hidden=512, max_seq_len=64), "cpu"))
    return run


@pytest.mark.parametrize("kind,types", [("q8_0", {"F32": 5, "Q8_0": 16}),
                                        ("q4_k_m", {"F32": 5, "Q4_K": 13, "Q6_K": 3}),
                                        ("bf16", {"BF16": 16, "F32": 5})])
def test_quantized_export_reads_back_within_its_types_rounding(run_dir, kind, types):
    m = main(Config(run=str(run_dir), format="gguf", gguf_type=kind))
    assert m["gguf_tensor_types"] == types
    assert 0 < m["gguf_max_rel_err"] < {"q8_0": 0.01, "q4_k_m": 0.15, "bf16": 0.005}[kind]
    assert (run_dir / "export" / "model.gguf").is_file()


def test_bad_type_and_the_old_dtype_name():
    with pytest.raises(UserError) as e:
        parse(Config, ["--gguf_type=q3_k"])
    assert "'q3_k'" in str(e.value) and "'q4_k_m'" in str(e.value) and "\n" not in str(e.value)
    assert Config(dtype="f16").gguf_type == "f16"  # configs saved before gguf_type replay
    with pytest.raises(UserError, match="q5"):
        Config(dtype="q5")


def test_a_writer_that_scrambles_blocks_fails_the_stage(run_dir, monkeypatch):
    import numpy as np

    import ember.model.gguf as G

    real = G.quantize
    monkeypatch.setattr(G, "quantize", lambda x, kind: real(np.ascontiguousarray(x[::-1]), kind))  # rows reversed
    with pytest.raises(UserError, match="reads back weights too far from the checkpoint: token_embd.weight"):
        main(Config(run=str(run_dir), format="gguf", gguf_type="q4_0", name="scrambled"))
