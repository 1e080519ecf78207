"""Verdict forgeries: a completion that returns WRONG answers and tries to be scored as a pass anyway.

Each attack runs through run_function_tests, the path HumanEval scoring uses: the candidate runs in one
sandboxed process and only answers calls with plain data; the tests and the pass/fail decision live in a
second process. Every attack must FAIL, and a correct solution must still pass. Where an attack beat the
old single-process harness (run_code on one file), the test shows that too, so it has teeth.
"""

from __future__ import annotations

import dataclasses
import time

import pytest

from ember.common import sandbox
from ember.common.sandbox import layers, run_code, run_function_tests
from ember.eval.tasks import humaneval

from tests.eval.conftest import datasets_or_skip

TEST = """
def check(candidate):
    assert candidate(2, 3) == 5
    assert candidate(10, -1) == 9
    assert abs(candidate(0.5, 0.25) - 0.75) < 1e-9
"""
CORRECT = "def add(a, b):\n    return a + b\n"
WRONG = "def add(a, b):\n    return 0\n"

ATTACKS = {
    # walk up the stack (and scan the heap) for the harness's secret or the check's locals; print any
    # marker-like string found, then exit 0
    "frame_walk": """
import gc, os, sys
def add(a, b):
    found = []
    f = sys._getframe()
    while f is not None:
        found += [v for v in list(f.f_locals.values()) + list(f.f_globals.values()) if isinstance(v, str)]
        f = f.f_back
    found += [o for o in gc.get_objects() if isinstance(o, str) and ('done' in o or 'ok:' in o)]
    for s in found:
        sys.stdout.write(s)
    for s in found:
        if s.startswith(('\\x00done:', 'ok:')):
            sys.stderr.write(s)
    sys.stderr.flush(); sys.stdout.flush()
    os._exit(0)
""",
    # find the check's frame (or function) and take its expected values / skip its asserts
    "gc_scan": """
import gc, sys
def add(a, b):
    for o in gc.get_objects():
        if callable(o) and getattr(o, '__name__', '') == 'check':
            o.__code__ = (lambda candidate: None).__code__
    f = sys._getframe(1)
    while f is not None:
        if f.f_code.co_name == 'check':
            f.f_locals['candidate'] = lambda *a: 5
        f = f.f_back
    return 0
""",
    # a tracer that jumps over the asserts of any frame named check
    "tracer": """
import sys
def _line(frame, event, arg):
    if event == 'line':
        try:
            frame.f_lineno = frame.f_code.co_firstlineno + 1
        except Exception:
            pass
    return _line
def _trace(frame, event, arg):
    if frame.f_code.co_name == 'check':
        return _line
    return None
sys.settrace(_trace)
sys.setprofile(lambda *a: None)
import threading
threading.settrace(_trace)
def add(a, b):
    return 0
""",
    "always_equal": """
class Eq:
    def __eq__(self, other): return True
    def __ne__(self, other): return False
    def __sub__(self, other): return 0
    def __rsub__(self, other): return 0
    def __abs__(self): return 0
def add(a, b):
    return Eq()
""",
    "always_equal_int_subclass": """
class Eq(int):
    def __eq__(self, other): return True
    def __sub__(self, other): return 0.0
    __hash__ = int.__hash__
def add(a, b):
    return Eq(0)
""",
    "monkeypatch_builtins": """
import builtins, math
builtins.AssertionError = type('AssertionError', (Warning,), {})
builtins.abs = lambda x: 0
builtins.isinstance = lambda *a: True
builtins.len = lambda x: 0
math.fabs = lambda x: 0.0
def add(a, b):
    return 0
""",
    "os_exit_at_import": "import os\nos._exit(0)\ndef add(a, b):\n    return 0\n",
    "sys_exit_at_import": "import sys\nsys.exit(0)\ndef add(a, b):\n    return 0\n",
    "sys_exit_in_call": "import sys\ndef add(a, b):\n    sys.exit(0)\n",
    "print_markers": """
import os, sys
for m in ('ok:', '\\x00done:', 'passed', 'ok'):
    print(m); sys.stderr.write(m + '\\n')
for fd in range(3, 64):
    try:
        os.write(fd, b'ok:0000000000000000\\n["ok", ["i", "0x5"]]\\n')
    except OSError:
        pass
def add(a, b):
    return 0
""",
    "generator": "def add(a, b):\n    yield a + b\n",
    "function": "def add(a, b):\n    return lambda *x: a + b\n",
    "raises": "def add(a, b):\n    raise AssertionError('fine')\n",
    "hang": "import time\ndef add(a, b):\n    time.sleep(60)\n",
}


def one_file(solution: str) -> str:
    return f"{solution}\n{TEST}\ncheck(add)\n"


def test_correct_solution_passes():
    r = run_function_tests(CORRECT, "add", TEST, timeout=5)
    assert r.passed, r.stderr
    assert "split-verdict" in r.isolation
    assert not run_function_tests(WRONG, "add", TEST, timeout=5).passed


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_forgery_fails(name):
    t0 = time.monotonic()
    r = run_function_tests(ATTACKS[name], "add", TEST, timeout=4, call_timeout=1.5)
    assert not r.passed, (name, r.status, r.stderr[-500:])
    assert time.monotonic() - t0 < 8
    time.sleep(0.05)
    assert [p for p, u in sandbox._proc_uids().items() if u >= sandbox.UID_BASE] == []


@pytest.mark.parametrize("name", ["frame_walk", "always_equal"])
def test_the_same_forgery_beat_the_single_process_harness(name):
    """Shows each test above has teeth: in one process these attacks were scored as passes."""
    assert run_code(one_file(ATTACKS[name]), timeout=4).passed


def test_values_cross_only_as_plain_data():
    for v in [None, True, False, 0, -7, 3 ** 5000, 1.5, float("inf"), -float("inf"), "a\nb\ud800", b"\x00\xff",
              [1, [2]], (1, (2,)), {1: "a", (1, 2): [3], frozenset({1}): None}, {1, 2}, frozenset({"x"})]:
        back = sandbox.decode(sandbox.encode(v))
        assert back == v and type(back) is type(v)
    nan = sandbox.decode(sandbox.encode(float("nan")))
    assert nan != nan

    class Sub(int):
        pass
    for bad in (Sub(1), object(), (x for x in ()), len, [Sub(1)], {"k": object()}):
        with pytest.raises(TypeError):
            sandbox.encode(bad)


def test_reading_the_answer_key_fails(monkeypatch):
    """The candidate reads HumanEval's canonical solution from the datasets folder and runs it; bubblewrap's mount
    namespace (or, without it, Landlock read rules) keeps the folder out of its reach; without either the same
    program passes."""
    path = datasets_or_skip("humaneval", "HumanEval.jsonl.gz")
    item = humaneval.load(path)[0]
    steal = f"""
import gzip, json
def {item['entry_point']}(*args):
    for line in gzip.open({str(path)!r}, 'rt'):
        row = json.loads(line)
        if row['task_id'] == {item['id']!r}:
            g = {{}}
            exec(row['prompt'] + row['canonical_solution'], g)
            return g[{item['entry_point']!r}](*args)
"""
    r = run_function_tests(steal, item["entry_point"], item["test"], helpers=item["prompt"], timeout=5)
    if "landlock-read" not in r.isolation and "mntns" not in r.isolation:
        pytest.skip("neither bubblewrap nor Landlock on this machine: the datasets folder is readable")
    assert not r.passed and ("PermissionError" in r.stderr or "FileNotFoundError" in r.stderr), r.stderr[-500:]
    monkeypatch.setattr(sandbox, "machine", lambda: dataclasses.replace(layers.machine(), bwrap=None))
    opened = run_function_tests(steal, item["entry_point"], item["test"], helpers=item["prompt"], timeout=5,
                                restrict_reads=False)
    assert opened.passed, opened.stderr[-500:]
