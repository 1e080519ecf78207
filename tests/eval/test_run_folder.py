"""`ember eval` and `ember card` on a run folder laid out by the real stages' conventions: the default
checkpoint (<run>/pretrain/final, ember safetensors), the run's tokenizer, the tokenize stage's held-out
split for perplexity, and contamination against the curated documents minus that split."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

import pytest
import torch

from ember.common import artifacts
from ember.data.documents import make_doc, write_shards
from ember.eval import card, harness

from .conftest import ASSETS

checkpoint = pytest.importorskip("ember.common.checkpoint")


@dataclass
class TokenizeCfg:
    run: str
    val_fraction: float = 0.3


@dataclass
class PretrainCfg:
    run: str
    seq_len: int = 64


def make_run(root):
    from ember.model.gpt import GPTConfig, build_model
    from ember.tokenizer.train import save, train_tokenizer

    run = str(root)
    words = "the cat dog sat ran on under mat rug tree big small red blue and then a".split()
    docs = [make_doc(f"d{i}", " ".join(random.Random(i).choices(words, k=40)), "toy", license="CC0") for i in range(30)]
    docs.append(make_doc("quiz", "Which part of a plant takes in water from the soil through many small hairs? "
                                 "roots", "quiz", license="CC0"))
    r = artifacts.begin("curate", TokenizeCfg(run))
    write_shards(docs, r.dir)
    r.finish({"documents": len(docs)})
    tok = train_tokenizer([d["text"] for d in docs] + [(ASSETS / "arc_tiny.jsonl").read_text()], 300)
    (root / "tokenizer").mkdir()
    save(tok, root / "tokenizer")
    r = artifacts.begin("tokenize", TokenizeCfg(run), inputs={"docs": root / "curate", "tokenizer": root / "tokenizer"})
    r.finish({})
    r = artifacts.begin("pretrain", PretrainCfg(run), inputs={"tokens": root / "tokenize"})
    torch.manual_seed(0)
    model = build_model(GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=32,
                                  max_seq_len=64))
    checkpoint.save_model(r.dir / "final", model)
    r.finish({"tokens": 5000, "loss": 5.0})
    return docs


def test_eval_and_card_on_a_run_folder(tmp_path):
    from ember.data.tokenize import is_val

    docs = make_run(tmp_path)
    held = [d for d in docs if is_val(d["id"], 0.3)]
    assert 0 < len(held) < len(docs)
    harness.main(harness.Config(run=str(tmp_path), tasks=["ppl", "arc_easy:" + str(ASSETS / "arc_tiny.jsonl")],
                                bootstrap=50, contamination_n=8, batch_size=4))
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert res["checkpoint"] == str(tmp_path / "pretrain" / "final")
    ppl = res["tasks"]["ppl"]
    assert ppl["n"] == len(held) and ppl["path"] == str(tmp_path / "curate")
    assert ppl["metrics"]["perplexity"] > 1 and ppl["contamination"]["dirty"] == 0  # held-out docs are not training
    arc = res["tasks"]["arc_easy"]
    quiz_trained = not is_val("quiz", 0.3)
    assert arc["contamination"]["dirty_ids"] == (["tiny_1"] if quiz_trained else [])
    card.main(card.Config(run=str(tmp_path)))
    md = (tmp_path / "card" / "MODEL_CARD.md").read_text()
    assert "2 layers, width 32" in md and "| ppl | perplexity |" in md
    stages = json.loads((tmp_path / "card" / "card.json").read_text())["stages"]
    assert [s["stage"] for s in stages] == ["curate", "tokenize", "pretrain"] and stages[-1]["flops"] > 0
