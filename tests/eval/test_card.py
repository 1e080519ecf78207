"""`ember card` on a run whose lineage is built by the real stage machinery (artifacts.begin/finish)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field


from ember.common import artifacts
from ember.data.documents import make_doc, write_shards
from ember.eval import card, harness

from .conftest import ASSETS, datasets_or_skip


@dataclass
class StageCfg:
    run: str
    seq_len: int = 128
    note: list = field(default_factory=list)


def fake_run(root, model_bin):
    """corpus -> curate (data card, one doc that contains an eval item) -> pretrain (final = stories260K)."""
    run = str(root)
    docs = [make_doc("a", "Once upon a time a cat sat on a mat.", "tinystories", license="CDLA-Sharing-1.0",
                     date="2023-05-01"),
            make_doc("b", "def f(x):\n    return x + 1\n", "stdlib", license="PSF-2.0", date="2024-02-10"),
            make_doc("c", "Quiz. Question: What do we call the change of liquid water into water vapor when a puddle "
                          "dries in the sun?\nAnswer: evaporation. Next question.", "quiz", license="CC-BY-4.0")]
    r = artifacts.begin("corpus", StageCfg(run))
    write_shards(docs, r.dir)
    r.finish({"documents": 3})
    r = artifacts.begin("curate", StageCfg(run), inputs={"docs": root / "corpus"})
    write_shards(docs, r.dir)
    sources = [{"source": d["source"], "docs_out": 1, "bytes_out": len(d["text"]), "licenses": {d["meta"]["license"]: 1}}
               for d in docs]
    artifacts.write_json(r.dir / "data_card.json", {"knowledge_cutoff": "2024-02-10", "sources": sources})
    r.finish({"documents": 3})
    r = artifacts.begin("pretrain", StageCfg(run, seq_len=256), inputs={"docs": root / "curate"})
    os.symlink(model_bin, r.dir / "final.bin")
    r.finish({"loss": 1.5, "tokens": 10_000, "steps": 10})
    return r.dir / "final.bin"


def test_card_from_lineage_with_eval_and_contamination(tmp_path):
    model_dir = datasets_or_skip("models", "stories260K")
    ckpt = fake_run(tmp_path, model_dir / "stories260K.bin")
    harness.main(harness.Config(run=str(tmp_path), checkpoint=str(ckpt), tokenizer=str(model_dir / "tok512.bin"),
                                tasks=["arc_easy:" + str(ASSETS / "arc_tiny.jsonl"),
                                       "ppl:" + str(ASSETS / "heldout_stories.jsonl")],
                                bootstrap=50, contamination_n=8))
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    c = res["tasks"]["arc_easy"]["contamination"]
    assert c["dirty"] == 1 and c["dirty_ids"] == ["tiny_2"] and set(c["clean_metrics"]) == {"acc", "acc_norm"}
    assert res["tasks"]["ppl"]["contamination"]["dirty"] == 0

    m = card.main(card.Config(run=str(tmp_path), checkpoint=str(ckpt)))
    assert m["evaluated"] and m["sources"] == 3 and m["params"] > 200_000
    md = (tmp_path / "card" / "MODEL_CARD.md").read_text()
    data = json.loads((tmp_path / "card" / "card.json").read_text())
    assert data["knowledge_cutoff"] == "2024-02-10"
    assert [s["stage"] for s in data["stages"]] == ["corpus", "curate", "pretrain"]
    pre = data["stages"][-1]
    assert pre["flops"] > 0 and pre["seconds"] is not None
    assert "| stdlib | 1 |" in md and "PSF-2.0 (1)" in md and "5 layers" in md
    assert "| arc_easy | acc |" in md and "1/3 (33.3%)" in md
    assert "No preference alignment" in md and "Knowledge ends at 2024-02-10" in md


def test_cutoff_falls_back_to_document_dates(tmp_path):
    docs = [make_doc("a", "x", "s", date="2021-01-01"), make_doc("b", "y", "s", date="2022-06-30"), make_doc("c", "z", "s")]
    write_shards(docs, tmp_path / "corpus")
    cutoff, src = card.knowledge_cutoff([{"stage": "corpus", "dir": str(tmp_path / "corpus")}])
    assert cutoff == "2022-06-30" and "meta.date" in src
    assert card.knowledge_cutoff([])[0] is None


def test_card_without_eval_or_model(tmp_path):
    m = card.main(card.Config(run=str(tmp_path), checkpoint=str(ASSETS)))  # a folder that is no checkpoint
    md = (tmp_path / "card" / "MODEL_CARD.md").read_text()
    assert not m["evaluated"] and "Not evaluated" in md and "not readable" in md


def test_stage_names_are_real_stages():
    from ember.cli import STAGES

    assert set(card.TRAIN_STAGES) <= set(STAGES) and set(card.ALIGN_STAGES) <= set(STAGES)


def test_constitution_data_in_lineage_counts_as_alignment(tmp_path):
    """sft trained on constitution's revised answers: the card finds constitution in the lineage and does not
    warn that the model is unaligned; the sft model it started from still gets the warning."""
    run = str(tmp_path)
    r = artifacts.begin("sft", StageCfg(run))
    (r.dir / "final").mkdir()
    r.finish({"loss": 2.0})
    r = artifacts.begin("constitution", StageCfg(run), inputs={"model": tmp_path / "sft" / "final"})
    (r.dir / "sft.jsonl").write_text('{"messages": []}\n')
    r.finish({"revised": 1})
    r = artifacts.begin("sft", StageCfg(run), inputs={"data": tmp_path / "constitution" / "sft.jsonl"},
                        out_dir=tmp_path / "sft_cai")
    (r.dir / "final").mkdir()
    r.finish({"loss": 1.5})
    for ckpt, warned in ((tmp_path / "sft_cai" / "final", False), (tmp_path / "sft" / "final", True)):
        card.main(card.Config(run=run, checkpoint=str(ckpt)))
        names = [s["stage"] for s in json.loads((tmp_path / "card" / "card.json").read_text())["stages"]]
        md = (tmp_path / "card" / "MODEL_CARD.md").read_text()
        assert ("constitution" in names) is not warned and ("No preference alignment" in md) is warned, names
