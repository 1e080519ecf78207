"""The `ember sft` recipe end to end on a tiny model, and `ember chat` on its output (stdin not a TTY)."""

import io
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ember.cli import main as cli_main
from ember.common.checkpoint import load_model
from ember.common.errors import UserError
from ember.model.lora import load_adapter
from ember.model.quant import quantize_nf4_
from ember.sft import chat, train
from ember.tokenizer.chat import render_chat
from ember.tokenizer.special import load_tokenizer


def config(run, **kw) -> train.Config:
    base = dict(run=str(run), max_examples=240, max_files=60, steps=6, batch_size=4, seq_len=128, stop_prompts=3,
                lora_r=4, lora_alpha=8, log_every=3)
    base.update(kw)
    return train.Config(**base)


def logits(model, idx):
    with torch.no_grad():
        return model.eval()(idx)


@torch.no_grad()
def heldout_loss(model, run, n: int = 16) -> float:
    """Mean cross-entropy (nats/token) on the assistant tokens of a fixed batch: the first n conversations the
    run held out (sft/data/val.jsonl), one per row, right-padded. Computed here, from the weights, not read from
    the recipe's metrics, so the same batch scores the base and the saved model whatever the recipe reports."""
    tok = load_tokenizer(run / "tokenizer" / "tokenizer.json")
    lines = (run / "sft" / "data" / "val.jsonl").read_text().splitlines()[:n]
    limit = model.config.max_seq_len
    rows = []
    for line in lines:
        ids, mask = render_chat(tok, json.loads(line)["messages"])
        ids, mask = ids[:limit + 1], mask[:limit + 1]
        rows.append((ids[:-1], [t if m else -100 for t, m in zip(ids[1:], mask[1:])]))  # next token, replies only
    T = max(len(x) for x, _ in rows)
    inputs = torch.tensor([x + [tok.pad_id] * (T - len(x)) for x, _ in rows])  # (n, T); causal: pads come last
    targets = torch.tensor([y + [-100] * (T - len(y)) for _, y in rows])  # (n, T)
    assert (targets != -100).sum() > 200, "too few held-out reply tokens for a stable loss"
    out = model.eval()(inputs)  # (n, T, vocab)
    return F.cross_entropy(out.flatten(0, 1).float(), targets.flatten(), ignore_index=-100).item()


# Adapter runs long enough to learn, at a LoRA-sized LR: 20 steps at 1e-2 take the tiny random-init model's
# held-out reply loss from ln(512) = 6.24 (uniform) to ~5.3 nats; with the adapters frozen it stays at 6.24.
LEARN = dict(steps=20, lr=1e-2)
MIN_DROP = 0.5  # nats/token the held-out reply loss must fall; measured drop ~0.9 (NF4 rounding alone: ~0)


def assert_learned(m, base, run_folder):
    """The saved model's held-out reply loss is MIN_DROP below the base's on the same batch, and the recipe's
    own before/after metrics agree that training moved it."""
    before = heldout_loss(base, run_folder)
    after = heldout_loss(load_model(run_folder / "sft" / "final", device="cpu"), run_folder)
    assert after < before - MIN_DROP, (before, after)
    assert m["val_loss"] < m["val_loss_before"] - MIN_DROP, m


def test_lora_run_learns_and_writes_adapter_and_merged_model(run_folder, capsys):
    m = train.main(config(run_folder, method="lora", **LEARN))
    out = run_folder / "sft"
    assert m["method"] == "lora" and m["steps"] == 20 and 0 < m["trainable_params"] < 60_000
    assert_learned(m, load_model(run_folder / "pretrain" / "final", device="cpu"), run_folder)
    assert 0 <= m["stop_rate"] <= 1 and 0 < m["fill"] <= 1
    for f in ("final/model.safetensors", "final/adapter.safetensors", "final/tokenizer.json", "data/train.jsonl",
              "data/val.jsonl", "samples.jsonl", "metrics.jsonl", "meta.json"):
        assert (out / f).is_file(), f
    lines = (out / "data" / "train.jsonl").read_text().splitlines()
    assert len(lines) == m["train_conversations"] and "messages" in json.loads(lines[0])
    # the merged model == the pretrained base + the saved adapter
    merged = load_model(out / "final", device="cpu")
    base_plus = load_adapter(out / "final", load_model(run_folder / "pretrain" / "final", device="cpu"))
    idx = torch.randint(0, merged.config.vocab_size, (2, 24))
    # fp32: x (W + BA) and xW + (xA)B round differently, ~1e-5 on these logits once the adapter has learned
    torch.testing.assert_close(logits(merged, idx), logits(base_plus, idx), atol=1e-4, rtol=1e-4)
    assert "step 00020/00020" in capsys.readouterr().out
    assert train.main(config(run_folder, method="lora", **LEARN)) == m  # finished run with same config: cached


def test_qlora_learns_on_the_nf4_base(run_folder, chat_file):
    """Before = the NF4-quantized base (what QLoRA trains on, adapters at B = 0), so quantization error alone
    cannot pass: only what the adapters learned lowers the loss."""
    m = train.main(config(run_folder, data=str(chat_file), method="qlora", **LEARN))
    assert (run_folder / "sft" / "final" / "adapter.safetensors").is_file()
    assert_learned(m, quantize_nf4_(load_model(run_folder / "pretrain" / "final", device="cpu")), run_folder)


def test_full(run_folder, chat_file):
    m = train.main(config(run_folder, data=str(chat_file), method="full", packing=True, steps=4))
    final = run_folder / "sft" / "final"
    assert not (final / "adapter.safetensors").exists()
    model = load_model(final, device="cpu")
    base = load_model(run_folder / "pretrain" / "final", device="cpu")
    idx = torch.randint(0, model.config.vocab_size, (1, 16))
    assert not torch.allclose(logits(model, idx), logits(base, idx))
    assert m["trainable_params"] == base.num_params()


def test_sft_teaches_replies_that_stop(run_folder, chat_file):
    """From a random init (the fixture model), full fine-tuning on the stdlib set: the held-out reply loss
    falls and greedy answers end with <|end|> on >= 90% of held-out prompts (0% before)."""
    m = train.main(config(run_folder, data=str(chat_file), method="full", max_examples=400, steps=120,
                          batch_size=8, lr=3e-3, stop_prompts=10, val_fraction=0.1, log_every=40))
    assert m["stop_rate_before"] == 0.0 and m["stop_rate"] >= 0.9, m
    assert m["val_loss"] < m["val_loss_before"] - 1.5, m


def test_real_multi_turn_data(run_folder):
    oasst = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "oasst" / "oasst_en_100_tree.jsonl"
    if not oasst.is_file():
        pytest.skip(f"{oasst} not present (shared datasets absent)")
    m = train.main(config(run_folder, data=str(oasst), max_examples=60, steps=2, stop_prompts=0))
    assert m["train_conversations"] + m["val_conversations"] == 60 and m["trained_tokens"] > 0


def test_user_errors(run_folder, tmp_path):
    assert cli_main(["sft", "--method=dora", "--dry-run"]) == 2  # printed as one error line
    with pytest.raises(UserError, match="LoRA target"):
        train.Config(lora_targets=["attention"])
    with pytest.raises(UserError, match="input 'model' not found"):
        train.main(config(tmp_path / "empty"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(UserError, match="bad.jsonl:1: conversation has no assistant"):
        train.main(config(run_folder, data=str(bad)))
    with pytest.raises(UserError, match="all .* training conversations were dropped: at seq_len = 4"):
        train.main(config(run_folder, seq_len=4))  # no reply fits: an error, not an endless empty epoch


def test_cli_help_lists_sft_and_chat(capsys):
    assert cli_main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "sft" in text and "chat" in text
    assert cli_main(["sft", "--help"]) == 0
    assert "--method=" in capsys.readouterr().out
    for name in ("quickstart", "smoke"):  # the pipeline runs these after pretrain
        assert cli_main(["sft", f"--preset={name}", "--dry-run"]) == 0
        assert json.loads(capsys.readouterr().out)["method"] == "lora"


def test_chat_reads_stdin(run_folder, chat_file, monkeypatch):
    train.main(config(run_folder, data=str(chat_file), steps=2, stop_prompts=1))
    cfg = chat.Config(run=str(run_folder), temperature=0.0, max_new_tokens=12, system="Be brief.")
    stdin = io.StringIO("What does len do?\n\n/reset\nSuggest a name for a sorting function.\n/quit\nnot read\n")
    stdout = io.StringIO()
    seen, real_reply = [], chat.reply  # what each answer was asked with (the real reply still runs)
    monkeypatch.setattr(chat, "reply", lambda model, tok, messages, *a: (seen.append(list(messages)),
                                                                         real_reply(model, tok, messages, *a))[1])
    assert chat.main(cfg, stdin=stdin, stdout=stdout) == {"turns": 2}
    assert stdout.getvalue().count("\n") >= 2
    assert [m["role"] for m in seen[1]] == ["system", "user"]  # /reset forgot the first exchange, kept the system
    assert seen[1][1]["content"] == "Suggest a name for a sorting function."
    monkeypatch.setattr(chat, "reply", real_reply)
    # through the `ember chat` command, with sys.stdin a pipe (not a TTY); greedy answers repeat exactly
    outs = []
    for _ in range(2):
        monkeypatch.setattr("sys.stdin", io.StringIO("What does len do?\n"))
        monkeypatch.setattr("sys.stdout", buf := io.StringIO())
        assert cli_main(["chat", f"--run={run_folder}", "--temperature=0", "--max_new_tokens=8"]) == 0
        outs.append(buf.getvalue())
    assert outs[0] == outs[1] and outs[0].strip()


def test_fit_history_drops_oldest_turns(tok):
    msgs = [{"role": "system", "content": "s"}]
    for i in range(6):
        msgs += [{"role": "user", "content": f"question {i} " * 5}, {"role": "assistant", "content": f"answer {i} " * 5}]
    msgs.append({"role": "user", "content": "last"})
    full = chat.fit_history(tok, msgs, 10_000)
    short = chat.fit_history(tok, msgs, 60)
    assert len(short) <= 60 < len(full)
    text = tok.decode(short)
    assert text.startswith("<|bos|><|system|>s") and text.endswith("last<|end|><|assistant|>")
    assert "question 0" not in text
    long = chat.fit_history(tok, [{"role": "system", "content": "You are terse."},
                                  {"role": "user", "content": "word " * 200 + "END"}], 64)
    text = tok.decode(long)  # the newest message alone is too long: its start goes, the frame stays
    assert len(long) <= 64 and text.startswith("<|bos|><|system|>You are terse.<|end|><|user|>")
    assert text.endswith("END<|end|><|assistant|>")
