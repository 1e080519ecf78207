"""`ember grpo`: RL with exact-answer rewards raises held-out accuracy of a tiny arithmetic model."""

import pytest

from ember.align import grpo
from ember.common.errors import UserError


def test_grpo_raises_heldout_arithmetic_accuracy(run_dir, arith):
    m = grpo.main(grpo.Config(run=str(run_dir), steps=60, lr=3e-4, prompts_per_step=8, group_size=8, n_val=100,
                              n_tasks=2000, max_new_tokens=6, eval_every=0, device="cpu", **arith))
    assert 0.05 < m["val_accuracy_before"] < 0.9, m  # room to improve, and some right answers to reinforce
    assert m["val_accuracy"] > m["val_accuracy_before"] + 0.04, m
    assert m["train_reward_last"] > m["train_reward_first"], m


def test_heldout_tasks_are_never_trained_on(arith):
    cfg = grpo.Config(n_val=50, n_tasks=3000, **arith)
    train, val = grpo.split_tasks(cfg)
    assert len(val) == 50 and len({t["prompt"] for t in val}) == 50
    assert not {t["prompt"] for t in train} & {t["prompt"] for t in val}


def test_grpo_lora_smoke(run_dir, arith):
    m = grpo.main(grpo.Config(run=str(run_dir), steps=2, prompts_per_step=2, group_size=4, n_val=8, lora_r=4,
                              max_new_tokens=4, device="cpu", **arith))
    assert 0.0 <= m["val_accuracy"] <= 1.0 and m["lora_r"] == 4
    assert (run_dir / "grpo" / "final" / "adapter.safetensors").is_file()


def test_config_validation():
    with pytest.raises(UserError, match="group_size"):
        grpo.Config(group_size=1)
    with pytest.raises(UserError, match="advantage"):
        grpo.Config(advantage="ppo")


# --- code tasks: rewards run in the sandbox ---------------------------------------------------------------

ADD3 = {"prompt": "Write add3(x) returning x + 3.", "entry_point": "add3", "prefix": "",
        "test": "def check(candidate):\n    assert candidate(2) == 5\n    assert candidate(-1) == 2\n"}


def test_code_rewards_pass_right_code_and_nothing_else():
    from ember.align.data import task_rewards

    replies = [
        "Here it is:\n```python\ndef add3(x):\n    return x + 3\n```",  # right, fenced
        "def add3(x):\n    return x + 3\n",  # right, bare
        "def add3(x):\n    return x\n",  # wrong
        "class A:\n    def __eq__(self, o):\n        return True\ndef add3(x):\n    return A()\n",  # always-equal
        "import os\nos._exit(0)\ndef add3(x):\n    return 0\n",  # exits before the tests
        "def add3(x):\n    import sys\n    f = sys._getframe()\n    while f.f_back: f = f.f_back\n"
        "    f.f_globals['__builtins__'].AssertionError = StopIteration\n    return 0\n",  # patches builtins
        "def add3(x):\n    return open('/etc/passwd').read()\n",  # reads the host
    ]
    assert task_rewards([ADD3] * len(replies), replies, timeout=5) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    mixed = task_rewards([{"prompt": "2+2?", "answer": "4"}, ADD3], ["4", "def add3(x): return x + 3"])
    assert mixed == [1.0, 1.0]


def test_grpo_runs_code_tasks_through_the_sandbox(run_dir, tmp_path, monkeypatch):
    import json

    from ember.common import sandbox

    tasks = [{**ADD3, "prompt": f"Task {i}: write add3(x) returning x + 3."} for i in range(12)]
    data = tmp_path / "code.jsonl"
    data.write_text("".join(json.dumps(t) + "\n" for t in tasks))
    calls = []
    real = sandbox.run_function_tests
    monkeypatch.setattr(sandbox, "run_function_tests", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    m = grpo.main(grpo.Config(run=str(run_dir), data=str(data), steps=2, prompts_per_step=2, group_size=2, n_val=4,
                              max_new_tokens=8, eval_every=0, device="cpu"))
    assert len(calls) == 2 * 2 * 2 + 2 * 4 and set(calls) == {"add3"}  # every rollout and held-out reply
    assert 0.0 <= m["val_accuracy"] <= 1.0
    meta = json.loads((run_dir / "grpo" / "meta.json").read_text())
    assert "seccomp" in meta["sandbox"]["layers"] or meta["sandbox"]["missing"]


def test_grpo_refuses_code_tasks_in_a_weak_sandbox(tmp_path, monkeypatch):
    from ember.common import sandbox

    monkeypatch.setattr(sandbox, "status", lambda: {"layers": ["guard"], "missing": {"bwrap": "not installed"},
                                                    "strong": False})
    cfg = grpo.Config(data="unused")
    with pytest.raises(UserError, match="allow_weak_sandbox"):
        grpo.check_sandbox([ADD3], cfg)
    cfg.allow_weak_sandbox = True
    assert grpo.check_sandbox([ADD3], cfg)["missing"] == {"bwrap": "not installed"}
    assert grpo.check_sandbox([{"prompt": "1+1", "answer": "2"}], grpo.Config()) is None
