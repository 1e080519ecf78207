"""`ember compress` on a tiny model: every quantization method writes <run>/compress/final/ that load() reads
back as quantized modules and the engine generates from; the report has size and perplexity; calibration
comes from a text file or the run's tokens; bad inputs are one-line UserErrors; a killed run leaves no final/."""

import pytest
import torch

from ember.common import artifacts
from ember.common.checkpoint import save_model
from ember.common.errors import UserError
from ember.compress.compress import Config, main
from ember.model import quant as Q
from ember.model.engine import Engine, SamplingParams
from ember.model.gpt import GPTConfig, build_model
from ember.model.load import load

TEXT = ("the quick brown fox jumps over the lazy dog. " * 3 + "def f(x):\n    return x + 1\n" * 2 +
        "a model of language predicts the next word from the words before it. ") * 40


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder with a tokenizer, a (random) pretrain/final checkpoint and a calibration text file."""
    from ember.tokenizer.train import save, train_tokenizer

    run = tmp_path_factory.mktemp("run")
    tok = train_tokenizer([TEXT], 300, 1)
    save(tok, run / "tokenizer")
    torch.manual_seed(0)
    # n_embd 64, ffn 192: groups 32/64 tile every input width, 128 does not (the bad-input case)
    model = build_model(GPTConfig(vocab_size=320, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, max_seq_len=64,
                                  tie_embeddings=True), "cpu")
    save_model(run / "pretrain" / "final", model)
    (run / "calib.txt").write_text(TEXT)
    return run


def cfg(run, **kw):
    base = dict(run=str(run), calib=str(run / "calib.txt"), calib_windows=8, eval_windows=4, seq_len=32, group_size=32,
                awq_grid=5)
    return Config(**{**base, **kw})


@pytest.mark.parametrize("method", ["int8", "w8a8", "rtn4", "gptq", "awq"])
def test_each_method_writes_a_model_that_loads_quantized(run_dir, method):
    m = main(cfg(run_dir, method=method))
    final = run_dir / "compress" / "final"
    assert artifacts.is_finished(run_dir / "compress") and (final / "model.safetensors").is_file()
    assert (run_dir / "compress" / "report.md").read_text().count("|") > 10
    model, tok = load(final)  # the tokenizer beside it
    kind = {"int8": Q.Int8Linear, "w8a8": Q.W8A8Linear}.get(method, Q.Int4Linear)
    assert type(model.layers[1].mlp.down_proj) is kind and type(model.lm_head) is Q.Int8TiedHead
    assert m["size_vs_bf16"] < (0.6 if method in ("int8", "w8a8") else 0.45)  # tiny: norms and scales weigh more
    # perplexity of a random model is ~vocab size; quantization moves it a little, not to garbage
    assert m["ppl_before"] > 1 and abs(m["ppl_change"]) < (0.02 if method in ("int8", "w8a8") else 0.2)
    out = Engine(model, tok).generate([tok.encode("the quick")], SamplingParams(max_tokens=5, temperature=0))[0]
    assert len(out.tokens) == 5
    lineage = artifacts.read_meta(run_dir / "compress")["inputs"]
    assert {"model", "calib"} <= set(lineage)


def test_calibration_from_the_runs_tokens_or_stdlib(run_dir, tmp_path):
    """--calib empty: the run's own <run>/tokenize/tokens (train split calibrates, val is held out)."""
    import numpy as np

    from ember.compress.calibration import windows
    from ember.tokenizer.special import load_tokenizer

    tok = load_tokenizer(run_dir / "tokenizer")
    run = tmp_path / "r"
    folder = run / "tokenize" / "tokens"
    folder.mkdir(parents=True)
    ids = np.asarray(tok.encode(TEXT), dtype=np.uint16)
    ids[:300].tofile(folder / "val_000.bin")
    ids[300:].tofile(folder / "train_000.bin")
    artifacts.write_json(folder / "meta.json", {"dtype": "uint16", "splits": {
        "train": {"shards": [{"file": "train_000.bin", "tokens": len(ids) - 300}]},
        "val": {"shards": [{"file": "val_000.bin", "tokens": 300}]}}})
    m = main(cfg(run, calib="", method="gptq", model=str(run_dir / "pretrain" / "final")))
    assert m["calib_windows"] == 8 and m["eval_windows"] == 4
    assert artifacts.read_meta(run / "compress")["inputs"]["calib"]["path"] == str(folder)
    calib, held = windows(folder, tok, 8, 4, 32)
    assert torch.equal(held[0], torch.from_numpy(ids[:32].astype(np.int64)))  # from val
    calib, held = windows("stdlib", tok, 4, 2, 32)
    assert calib.shape == (4, 32) and held.shape == (2, 32) and calib.dtype == torch.int64
    assert not any(torch.equal(c, h) for c in calib for h in held)  # held-out windows are not calibration ones


def test_bad_inputs_are_one_line_user_errors(run_dir, tmp_path):
    with pytest.raises(UserError, match="gptqq.*did you mean 'gptq'") as e:
        Config(method="gptqq")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="needs calibration data.*--calib") as e:  # no --calib, no run tokens
        main(cfg(run_dir, method="gptq", calib=""))
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="group_size=128 does not divide the input width 64.*--group_size=64") as e:
        main(cfg(run_dir, method="rtn4", group_size=128))
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="group_size"):
        Config(group_size=48)
    with pytest.raises(UserError, match="no model"):
        main(cfg(tmp_path, method="int8"))


def test_a_killed_run_leaves_no_final(run_dir, monkeypatch):
    import ember.common.checkpoint as ckpt

    real = ckpt.save_model

    def dies(path, model, metadata=None):
        real(path, model, metadata)  # the file is written into the temp folder, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_model", dies)
    out = run_dir / "killed"
    with pytest.raises(KeyboardInterrupt):
        main(cfg(out, method="int8", calib=str(run_dir / "calib.txt"), model=str(run_dir / "pretrain" / "final")))
    assert not (out / "compress" / "final").exists()
    assert not artifacts.is_finished(out / "compress")
    assert not [p for p in (out / "compress").iterdir() if p.name.startswith(".final")]  # temp folder removed


def test_export_writes_a_quantized_checkpoint_dequantized(run_dir, tmp_path):
    """`ember export` of a compressed model: the HF folder holds its de-quantized weights (same logits)."""
    pytest.importorskip("gguf", reason="the gguf package is in the dev extra")
    from ember.model.hf import import_hf
    from ember.serve.export import Config as ExportConfig, main as export

    main(cfg(run_dir, method="rtn4"))
    final = run_dir / "compress" / "final"
    m = export(ExportConfig(run=str(tmp_path), checkpoint=str(final), format="hf"))
    assert m["hf_max_abs_diff"] == 0.0
    q, _ = load(final)
    x = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        assert float((import_hf(tmp_path / "export" / "hf")(x) - q(x)).abs().max()) < 0.05 * float(q(x).abs().max())
