"""Config <-> CLI: overrides, types, suggestions, presets, --dry-run and --config replay."""

import json
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from ember import cli
from ember.common import config as C
from ember.common.errors import UserError


@dataclass
class Model:
    n_layer: int = 2  # transformer blocks
    n_embd: int = 64  # width

    def __post_init__(self):
        C.require(self.n_layer >= 1, "model.n_layer", self.n_layer, "an integer >= 1")


@dataclass
class Cfg:
    lr: float = 3e-4  # peak learning rate
    steps: int = 10  # optimizer steps
    compile: bool = False  # torch.compile the model
    name: str = "demo"  # run name
    dtype: Literal["float32", "bfloat16"] = "float32"  # autocast dtype
    betas: tuple[float, ...] = (0.9, 0.95)  # AdamW betas
    prompts: list[str] = field(default_factory=lambda: ["def", "class"])  # sample prompts
    seed: Optional[int] = None  # None = random
    model: Model = field(default_factory=Model)  # the network

    def __post_init__(self):
        C.require(self.lr > 0, "lr", self.lr, "a float > 0")


PRESETS = {"tiny": lambda: Cfg(steps=3, model=Model(n_layer=1))}


def parse(*argv):
    return C.parse(Cfg, list(argv), PRESETS).cfg


def test_overrides_nested_and_types():
    cfg = parse("--lr=1e-3", "--model.n_layer=4", "--steps", "7", "--name=x=y")
    assert (cfg.lr, cfg.model.n_layer, cfg.steps, cfg.name) == (1e-3, 4, 7, "x=y")
    assert isinstance(cfg.steps, int) and isinstance(cfg.lr, float)
    assert parse("--steps=1e3").steps == 1000  # exact floats are accepted for ints


@pytest.mark.parametrize("text,value", [("true", True), ("False", False), ("1", True), ("no", False)])
def test_bool_parsing(text, value):
    assert parse(f"--compile={text}").compile is value


def test_bare_bool_flag_and_lists_and_optional():
    cfg = parse("--compile", "--betas=0.8,0.99", "--prompts=a,b,c", "--seed=5")
    assert cfg.compile is True and cfg.betas == (0.8, 0.99) and cfg.prompts == ["a", "b", "c"] and cfg.seed == 5
    assert parse("--betas=[0.5, 0.6]").betas == (0.5, 0.6)
    assert parse("--seed=none").seed is None
    assert parse("--prompts=").prompts == []


def test_literal_choices():
    assert parse("--dtype=bfloat16").dtype == "bfloat16"
    with pytest.raises(UserError, match=r"'dtype' = 'fp8'.*one of 'float32', 'bfloat16'"):
        parse("--dtype=fp8")


def test_wrong_type_names_field_value_and_type():
    with pytest.raises(UserError, match=r"'steps' = 'ten' is not a valid int"):
        parse("--steps=ten")
    with pytest.raises(UserError, match=r"'compile' = 'maybe' is not a valid bool"):
        parse("--compile=maybe")
    with pytest.raises(UserError, match=r"'steps' = '1.5'"):
        parse("--steps=1.5")


def test_out_of_range_fails_after_override():
    with pytest.raises(UserError, match=r"'lr' = -1.0 is not allowed: a float > 0"):
        parse("--lr=-1")
    with pytest.raises(UserError, match=r"'model.n_layer' = 0 is not allowed"):
        parse("--model.n_layer=0")


def test_unknown_key_suggests_nearest():
    with pytest.raises(UserError, match=r"unknown config key 'lrr'.*Did you mean 'lr'"):
        parse("--lrr=1")
    with pytest.raises(UserError, match=r"Did you mean 'model.n_layer'"):
        parse("--model.n_layyer=3")
    with pytest.raises(UserError, match=r"Did you mean 'model.n_layer'"):
        parse("--n_layer=3")


def test_presets_and_unknown_preset():
    cfg = parse("--preset=tiny", "--steps=5")
    assert cfg.model.n_layer == 1 and cfg.steps == 5
    with pytest.raises(UserError, match=r"unknown preset 'tinny'.*Did you mean 'tiny'"):
        parse("--preset=tinny")


def test_config_replay_round_trip(tmp_path):
    cfg = parse("--preset=tiny", "--lr=2e-3", "--betas=0.1,0.2", "--seed=3", "--dtype=bfloat16")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(C.to_dict(cfg)))
    assert parse(f"--config={path}") == cfg
    assert parse(f"--config={path}", "--steps=99").steps == 99  # overrides apply on top
    # a stage's meta.json is accepted too (its "config" key)
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"stage": "x", "config": C.to_dict(cfg)}))
    assert parse(f"--config={meta}") == cfg


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"lr": 1e-3, "model": {"n_layr": 2}}))
    with pytest.raises(UserError, match=r"unknown config key 'model.n_layr' in .*bad.json.*'model.n_layer'"):
        parse(f"--config={bad}")
    bad.write_text(json.dumps({"steps": "10"}))
    with pytest.raises(UserError, match=r"'steps' = '10' is not a valid int"):
        parse(f"--config={bad}")
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        parse(f"--config={bad}")
    with pytest.raises(UserError, match="no such file"):
        parse(f"--config={tmp_path / 'missing.json'}")


def test_help_lists_every_field_with_default_and_comment():
    text = C.help_text(Cfg, PRESETS, "ember demo")
    for name in C.flat_names(Cfg):
        assert f"--{name}=" in text
    assert '--lr=0.0003' in text and "peak learning rate" in text
    assert "--model.n_layer=2" in text and "transformer blocks" in text
    assert "presets: tiny" in text


def test_cli_help_dry_run_and_exit_code(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "pipeline" in out and "stages:" in out
    assert cli.main(["pipeline", "--recipe=smoke", "--run=runs/x", "--dry-run"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["recipe"] == "smoke" and printed["run"] == "runs/x"
    assert cli.main(["pipeline", "--recipie=smoke"]) == 2
    assert "Did you mean 'recipe'" in capsys.readouterr().err
    assert cli.main(["pipelin"]) == 2
    assert "Did you mean 'pipeline'" in capsys.readouterr().err


def test_user_error_has_no_stack_trace():
    out = subprocess.run([sys.executable, "-m", "ember", "pipeline", "--run"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "'--run' needs a value" in out.stderr


def test_overrides_are_checked_together_not_one_by_one():
    """seq_len must be <= model.max_seq_len: raising both works in either order (only the result is checked)."""
    from ember.pretrain.train import PRESETS, Config

    for argv in (["--seq_len=128", "--model.max_seq_len=128"], ["--model.max_seq_len=128", "--seq_len=128"]):
        cfg = C.parse(Config, ["--preset=smoke", *argv], PRESETS).cfg
        assert (cfg.seq_len, cfg.model.max_seq_len) == (128, 128)
    with pytest.raises(UserError, match=r"'seq_len' = 128 .* at most model.max_seq_len"):
        C.parse(Config, ["--preset=smoke", "--seq_len=128"], PRESETS)
