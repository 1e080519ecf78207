"""Run folders: atomic writes, content hashes, caching on config/input change, interrupted stages."""

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest

from ember.common import artifacts
from ember.common.errors import UserError


@dataclass
class Cfg:
    run: str = "runs/test"  # run folder
    scale: int = 2  # multiply every number by this


def test_atomic_write_keeps_previous_file_on_crash(tmp_path):
    path = tmp_path / "out.json"
    artifacts.write_json(path, {"v": 1})
    with pytest.raises(RuntimeError):
        with artifacts.atomic_path(path) as tmp:
            tmp.write_text('{"v": 2, "half')  # a partial write ...
            raise RuntimeError("crash")  # ... then the writer dies
    assert json.loads(path.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]  # no temp left behind


def test_atomic_write_survives_sigkill_mid_write(tmp_path):
    """A process killed (os._exit, no cleanup) mid-write leaves the old file intact and readable."""
    path = tmp_path / "data.json"
    artifacts.write_json(path, {"v": "old"})
    code = textwrap.dedent(f"""
        import os
        from ember.common import artifacts
        with artifacts.atomic_path({str(path)!r}) as tmp:
            with open(tmp, "w") as f:
                f.write('{{"v": "new", "unfinished')
                f.flush()
                os._exit(9)
    """)
    rc = subprocess.run([sys.executable, "-c", code]).returncode
    assert rc == 9
    assert json.loads(path.read_text()) == {"v": "old"}


def test_atomic_folder_replace(tmp_path):
    target = tmp_path / "ckpt"
    with artifacts.atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "a.txt").write_text("1")
    with artifacts.atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_hash_path_file_and_folder(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.txt").write_text("hello")
    h1 = artifacts.hash_path(tmp_path / "d")
    (tmp_path / "d" / ".x.txt.tmp").write_text("temp files are ignored")
    assert artifacts.hash_path(tmp_path / "d") == h1
    (tmp_path / "d" / "x.txt").write_text("hellO")
    assert artifacts.hash_path(tmp_path / "d") != h1
    import hashlib
    assert artifacts.hash_path(tmp_path / "d" / "x.txt") == hashlib.sha256(b"hellO").hexdigest()


def double(cfg: Cfg, src) -> tuple[artifacts.StageRun, int]:
    """A small stage: multiplies the numbers in a file; returns the run and whether it did work."""
    run = artifacts.begin("double", cfg, inputs={"numbers": src})
    if run.cached:
        return run, 0
    nums = [int(x) * cfg.scale for x in src.read_text().split()]
    artifacts.write_text(run.dir / "out.txt", " ".join(map(str, nums)))
    run.finish({"count": len(nums)})
    return run, 1


def test_cache_hit_and_miss(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("1 2 3")
    cfg = Cfg(run=str(tmp_path / "run"))
    run, worked = double(cfg, src)
    assert worked and (run.dir / "out.txt").read_text() == "2 4 6"
    meta = json.loads((run.dir / "meta.json").read_text())
    assert meta["status"] == "finished" and meta["metrics"] == {"count": 3}
    assert meta["config"] == {"run": cfg.run, "scale": 2}
    assert meta["inputs"]["numbers"]["sha256"] == artifacts.hash_path(src)
    assert meta["ember_version"] and meta["started"] <= meta["ended"]
    assert json.loads((run.dir / "config.json").read_text()) == meta["config"]

    assert double(cfg, src)[1] == 0  # same config, same input: cached
    assert double(Cfg(run=cfg.run, scale=3), src)[1] == 1  # config changed: rerun
    assert (run.dir / "out.txt").read_text() == "3 6 9"
    src.write_text("1 2 3 4")  # input content changed: rerun
    assert double(Cfg(run=cfg.run, scale=3), src)[1] == 1
    assert double(Cfg(run=cfg.run, scale=3), src)[1] == 0
    token = artifacts.FORCE.set(True)  # --force: rerun although cached
    try:
        assert double(Cfg(run=cfg.run, scale=3), src)[1] == 1
    finally:
        artifacts.FORCE.reset(token)


def test_interrupted_stage_is_not_finished(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("5")
    cfg = Cfg(run=str(tmp_path / "run"))
    run = artifacts.begin("double", cfg, inputs={"numbers": src})
    (run.dir / "out.txt").write_text("partial")  # the stage dies here, before finish()
    assert not artifacts.is_finished(run.dir)
    again, worked = double(cfg, src)  # a rerun does the work instead of trusting the folder
    assert worked and (again.dir / "out.txt").read_text() == "10"
    assert artifacts.is_finished(again.dir)


def test_unfinished_folder_with_same_config_is_kept_for_resume(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("5")
    cfg = Cfg(run=str(tmp_path / "run"))
    run = artifacts.begin("double", cfg, inputs={"numbers": src})
    (run.dir / "step_000010").mkdir()  # a checkpoint of an interrupted run
    again = artifacts.begin("double", cfg, inputs={"numbers": src})
    assert (again.dir / "step_000010").is_dir() and again.meta["resumed_from"] == run.meta["started"]
    artifacts.begin("double", Cfg(run=cfg.run, scale=5), inputs={"numbers": src})
    assert not (again.dir / "step_000010").exists()  # another config: the stale folder is cleared


def test_missing_input_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"input 'numbers' not found at .*nope.txt"):
        artifacts.begin("double", Cfg(run=str(tmp_path)), inputs={"numbers": tmp_path / "nope.txt"})


def test_lineage_follows_stage_inputs(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("1")
    first, _ = double(Cfg(run=str(tmp_path / "a")), src)
    second = artifacts.begin("double", Cfg(run=str(tmp_path / "b")), inputs={"prev": first.dir / "out.txt"})
    second.finish({})
    chain = artifacts.lineage(second.dir)
    assert [m["dir"] for m in chain] == [str(first.dir.resolve()), str(second.dir.resolve())]
    assert chain[0]["inputs"]["numbers"]["path"] == str(src)


def test_a_folder_ember_did_not_write_is_not_deleted(tmp_path):
    """<run>/<stage> holding the user's own files (no meta.json of that stage): refused, the files kept."""
    src = tmp_path / "in.txt"
    src.write_text("1")
    notes = tmp_path / "run" / "double" / "notes.txt"
    notes.parent.mkdir(parents=True)
    notes.write_text("mine")
    with pytest.raises(UserError, match=r"is not a run of `ember double`.*choose another --run"):
        double(Cfg(run=str(tmp_path / "run")), src)
    assert notes.read_text() == "mine"
    (tmp_path / "empty" / "double").mkdir(parents=True)  # an empty folder loses nothing: used
    assert double(Cfg(run=str(tmp_path / "empty")), src)[1] == 1


def test_an_input_inside_the_output_folder_is_not_deleted(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("1 2")
    run, _ = double(Cfg(run=str(tmp_path / "run")), src)
    kept = run.dir / "numbers.txt"  # the user points the next run at a file inside the stage's own folder
    kept.write_text("3 4")
    with pytest.raises(UserError, match=r"input 'numbers' .* lies inside this stage's output folder"):
        double(Cfg(run=str(tmp_path / "run"), scale=3), kept)
    assert kept.read_text() == "3 4"


def test_a_stage_that_raises_is_marked_failed(tmp_path, monkeypatch, capsys):
    """Through the CLI: the stage's meta.json ends `failed` with the error, not a stale `running`."""
    from ember import cli

    empty = tmp_path / "docs"
    empty.mkdir()
    (empty / "data.bin").write_bytes(b"\0")  # no supported documents: corpus fails after opening its folder
    rc = cli.main(["corpus", f"--run={tmp_path / 'run'}", f"--sources={empty}"])
    meta = json.loads((tmp_path / "run" / "corpus" / "meta.json").read_text())
    assert rc == 2 and meta["status"] == "failed" and "UserError" in meta["error"] and meta["ended"]
    assert not artifacts._OPEN


def test_config_hash_ignores_how_the_run_is_spelled_and_int_vs_float():
    """runs/a, ./runs/a/ and a copied run folder are the same config; so are lora_alpha 8 and 8.0 (a --config
    replay reads 8.0); any real setting still changes the hash."""
    from ember.sft.train import Config

    h = artifacts.config_hash
    assert h(Config(run="runs/a", lora_alpha=8)) == h(Config(run="./runs/a/", lora_alpha=8.0)) \
        == h(Config(run="/elsewhere/copy", lora_alpha=8))
    assert h(Config(run="runs/a", lora_alpha=8)) != h(Config(run="runs/a", lora_alpha=9))
    assert h(Config(run="runs/a")) != h(Config(run="runs/a", model="other/final"))
    assert h(Cfg(run="x", scale=2)) != h(Cfg(run="x", scale=3))
