"""The pipeline mechanism, with two small stages written for the test: order, caching, --from/--to,
input changes propagating downstream, and an interrupted stage that is redone on the next run."""

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from ember import pipeline
from ember.common import artifacts
from ember.common.errors import UserError

CALLS: list[str] = []


@dataclass
class WriteCfg:
    run: str = ""
    text: str = "a b c"  # what the first stage writes


@dataclass
class CountCfg:
    run: str = ""
    fail: bool = False  # simulate a crash in the middle of the stage


def write_main(cfg: WriteCfg) -> dict:
    run = artifacts.begin("write", cfg)
    if run.cached:
        return run.metrics
    CALLS.append("write")
    artifacts.write_text(run.dir / "words.txt", cfg.text)
    return run.finish({"chars": len(cfg.text)})


def count_main(cfg: CountCfg) -> dict:
    words = Path(cfg.run) / "write" / "words.txt"
    run = artifacts.begin("count", cfg, inputs={"words": words})
    if run.cached:
        return run.metrics
    CALLS.append("count")
    if cfg.fail:
        raise RuntimeError("killed mid-stage")
    return run.finish({"words": len(words.read_text().split())})


def steps(run, text="a b c", fail=False):
    return [("write", write_main, WriteCfg(run, text)), ("count", count_main, CountCfg(run, fail))]


def test_runs_in_order_then_caches(tmp_path):
    CALLS.clear()
    run = str(tmp_path)
    assert pipeline.run_steps(steps(run)) == {"write": {"chars": 5}, "count": {"words": 3}}
    assert CALLS == ["write", "count"]
    pipeline.run_steps(steps(run))
    assert CALLS == ["write", "count"]  # both cached
    pipeline.run_steps(steps(run, text="a b c d"))  # upstream config change: both rerun
    assert CALLS == ["write", "count"] * 2
    assert json.loads((tmp_path / "count" / "meta.json").read_text())["metrics"] == {"words": 4}


def test_from_to_select_a_range(tmp_path):
    s = steps(str(tmp_path))
    assert [n for n, _, _ in pipeline.select(s, "count", "")] == ["count"]
    assert [n for n, _, _ in pipeline.select(s, "", "write")] == ["write"]
    with pytest.raises(UserError, match=r"--from=cont: not a stage.*write, count"):
        pipeline.select(s, "cont", "")
    with pytest.raises(UserError, match="comes after"):
        pipeline.select(s, "count", "write")


def test_interrupted_stage_is_redone(tmp_path):
    CALLS.clear()
    run = str(tmp_path)
    with pytest.raises(RuntimeError):
        pipeline.run_steps(steps(run, fail=True))
    assert artifacts.is_finished(tmp_path / "write") and not artifacts.is_finished(tmp_path / "count")
    pipeline.run_steps(steps(run))
    assert CALLS == ["write", "count", "count"]  # write cached, count redone
    assert artifacts.is_finished(tmp_path / "count")


def test_downstream_reruns_when_upstream_output_changes(tmp_path):
    CALLS.clear()
    run = str(tmp_path)
    pipeline.run_steps(steps(run))
    token = artifacts.FORCE.set(True)
    try:
        pipeline.run_steps(pipeline.select(steps(run, text="x"), "write", "write"))
    finally:
        artifacts.FORCE.reset(token)
    pipeline.run_steps(steps(run, text="x"))  # count's input hash changed: it reruns
    assert CALLS == ["write", "count", "write", "count"]


def test_smoke_pipeline_end_to_end_then_cached(tmp_path):
    """`ember pipeline --preset=smoke` on the stdlib corpus: every stage finishes, with lineage back to the
    corpus; a second run does no work (all cached)."""
    import subprocess
    import sys

    run = tmp_path / "smoke"
    cmd = [sys.executable, "-m", "ember", "pipeline", "--preset=smoke", f"--run={run}"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    names = [n for n, _, _ in pipeline.quickstart(str(run), smoke=True)]
    assert names[:6] == ["corpus", "curate", "tokenizer", "tokenize", "pretrain", "sample"]
    for name in names:
        assert artifacts.is_finished(run / name), name
    assert (run / "pretrain" / "final" / "model.safetensors").is_file()
    chain = [m["stage"] for m in artifacts.lineage(run / "pretrain")]
    assert chain == ["corpus", "curate", "tokenizer", "tokenize", "pretrain"]
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("cached") == len(names)
