"""Hostile review of the code sandbox (issue 17 follow-up): the holes it found, now closed, and the attacks that
were contained from the start.

Each hole test asserts the SAFE outcome of an attack that once got through: host-disk blocks by fallocate on the
output file, a forged isolation record by pwrite, a harness crash by O_DIRECT on the shared output description
(the outputs are pipes now), a stale cgroup name of a dead harness, run_code reading host files without bwrap,
inotify on the read-only stdlib. The rest pin forgeries through the codec and the pipes, so a fix cannot reopen
them.

Everything is small: a few sandbox runs of a few seconds, allocations of tens of MB.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from ember.common import sandbox
from ember.common.sandbox import run_code, run_function_tests

REPO = Path(__file__).resolve().parents[2]
STRONG = sandbox.status()["strong"]
pytestmark = pytest.mark.skipif(not STRONG, reason="bubblewrap + seccomp are not in force here; sandbox.status()")

# The child's own ctypes handle lives in the child module (`python -c`: sys.modules["__main__"]), so the in-Python
# guard (which only sets sys.modules["ctypes"] = None) does not stop a program from calling any libc function.
FALLOCATE = r'''
import os, sys
libc, ctypes = sys.modules["__main__"].libc, sys.modules["__main__"].ctypes
FALLOC_FL_KEEP_SIZE = 1
r = libc.fallocate(1, FALLOC_FL_KEEP_SIZE, ctypes.c_long(0), ctypes.c_long({size}))
st = os.fstat(1)
print("ALLOC", r, st.st_dev, st.st_size, st.st_blocks * 512, flush=True)
'''


def _host_bytes(stdout: str) -> int:
    """Bytes the program's stdout file holds on the host's temp filesystem (0: not a host-disk file)."""
    lines = [x.split() for x in stdout.splitlines() if x.startswith("ALLOC")]
    if not lines:  # the program could not even try (e.g. fallocate refused and it failed): nothing allocated
        return 0
    _, _, dev, _, blocks = lines[-1]
    return int(blocks) if int(dev) == os.stat(tempfile.gettempdir()).st_dev else 0


def test_a_program_cannot_allocate_host_disk_past_the_file_limit():
    res = run_code(FALLOCATE.format(size=64 << 20), max_file_mb=1, timeout=10)  # guard on: the default
    assert _host_bytes(res.stdout) <= 2 << 20, res.stdout


def test_a_candidate_cannot_allocate_host_disk_past_the_file_limit():
    sol = FALLOCATE.format(size=64 << 20) + "def add(a, b):\n    return a + b\n"
    res = run_function_tests(sol, "add", "def check(f):\n    assert f(1, 2) == 3\n", max_file_mb=1, timeout=10)
    assert _host_bytes(res.stdout) <= 2 << 20, res.stdout


@pytest.mark.parametrize("path", ["run_code", "run_function_tests"])
def test_a_program_cannot_rewrite_its_isolation_record(path):
    forge = "import os\nos.pwrite(2, b'\\x00isolation:FORGED\\n', 0)\n"
    if path == "run_code":
        res = run_code(forge)
    else:
        res = run_function_tests(forge + "def add(a, b):\n    return a + b\n", "add",
                                 "def check(f):\n    assert f(1, 2) == 3\n")
    assert "FORGED" not in res.isolation, res.isolation
    assert "seccomp" in res.isolation, res.isolation  # what the child really reported is kept


# The program's stdout/stderr are the SAME open file description as the harness's TemporaryFile objects, so file
# status flags it sets with fcntl(F_SETFL) are the harness's too: with O_DIRECT, the harness's buffered read of the
# output fails with EINVAL and run_code / run_function_tests RAISE instead of returning a verdict.
O_DIRECT = ("import os, fcntl\n"
            "for fd in (1, 2):\n"
            "    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)\n")


@pytest.mark.parametrize("path", ["run_code", "run_function_tests", "grpo_code_passes"])
def test_a_program_cannot_make_the_harness_raise(path):
    wrong = O_DIRECT + "def add(a, b):\n    return 0\n"
    test = "def check(f):\n    assert f(1, 2) == 3\n"
    if path == "run_code":
        assert not run_code(O_DIRECT + "raise SystemExit(1)\n").passed
    elif path == "run_function_tests":
        assert not run_function_tests(wrong, "add", test).passed
    else:
        from ember.align.data import code_passes
        assert code_passes({"entry_point": "add", "test": test}, "```python\n" + wrong + "```") is False


STALE_CGROUP = """
import os
from ember.common.sandbox import layers, run_code
m = layers.machine()
stale = [b / f"ember-sandbox-{os.getpid()}-0" for b in m.cgroup_base.values()]
for d in stale:
    d.mkdir()   # what a SIGKILLed harness that had this pid left behind (its pool is never removed)
try:
    print(run_code("pass").status)
except BaseException as e:
    print("RAISED", type(e).__name__)
finally:
    for d in stale:
        d.rmdir()
"""


def test_a_stale_cgroup_of_a_dead_harness_does_not_break_a_new_one():
    if not sandbox.layers.machine().cgroup:
        pytest.skip("no cgroups here")
    out = subprocess.run([sys.executable, "-c", STALE_CGROUP], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "passed", out.stdout + out.stderr[-500:]


def test_without_bwrap_run_code_cannot_read_host_files(monkeypatch):
    from ember.common.sandbox import layers
    if os.geteuid() != 0:
        pytest.skip("the fallback's uid drop needs root")
    key = str(REPO / "pyproject.toml")  # the project (world-readable here, as are the datasets)
    monkeypatch.setattr(layers, "_machine", dataclasses.replace(layers.machine(), bwrap=None))
    res = run_code(f"print(len(open({key!r}).read()))", guard=False)
    assert not res.passed, (res.stdout, res.isolation)


INOTIFY = r'''
import os, select, ctypes, time, struct
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.inotify_init1(0)
wd = libc.inotify_add_watch(fd, b"/usr/lib/python3.11", 0x20) if fd >= 0 else -1   # IN_OPEN
seen, t = 0, time.monotonic()
while wd >= 0 and time.monotonic() - t < 2.0:
    if select.select([fd], [], [], 0.2)[0]:
        seen += os.read(fd, 65536).count(b"this.py")
print("SEEN", seen, flush=True)
'''


def test_a_program_cannot_watch_host_file_activity():
    stop = threading.Event()

    def host():  # a host process (here: the test) reading a stdlib file while the sandbox runs
        while not stop.is_set():
            with open("/usr/lib/python3.11/this.py", "rb") as f:
                f.read(1)
            time.sleep(0.05)

    th = threading.Thread(target=host)
    th.start()
    try:
        res = run_code(INOTIFY, guard=False, timeout=8)
    finally:
        stop.set()
        th.join()
    seen = [int(x.split()[1]) for x in res.stdout.splitlines() if x.startswith("SEEN")]
    assert seen in ([], [0]), res.stdout + res.stderr


# --- contained: forgeries through the codec and the pipes (wrong answers, each must fail) -------------------------

TEST = """
def check(candidate):
    assert abs(candidate(1.33) - 0.33) < 1e-6
    assert abs(candidate(123.456) - 0.456) < 1e-6
    assert candidate(3.5) == 0.5
"""
CORRECT = "def f(x):\n    return x % 1.0\n"
_RESP_FD = ("import os, fcntl\n"
            "def _resp():\n"
            "    for fd in [int(x) for x in os.listdir('/proc/self/fd')]:\n"
            "        try:\n"
            "            if fd > 2 and os.readlink('/proc/self/fd/%d' % fd).startswith('pipe:') and "
            "fcntl.fcntl(fd, fcntl.F_GETFL) & 3 == 1:\n"
            "                return fd\n"
            "        except OSError:\n"
            "            pass\n")
CONTAINED = {
    "nan": "def f(x):\n    return float('nan')\n",
    "inf": "def f(x):\n    return float('-inf')\n",
    "huge_int": "def f(x):\n    return 1 << 100000\n",
    "deep_nesting": "def f(x):\n    v = []\n    for _ in range(5000):\n        v = [v]\n    return v\n",
    "raise_systemexit": "def f(x):\n    raise SystemExit(0)\n",
    "raise_keyboardinterrupt": "def f(x):\n    raise KeyboardInterrupt\n",
    "exit_mid_call": "import os\ndef f(x):\n    os._exit(0)\n",
    "close_the_pipes": "import os\ndef f(x):\n    os.closerange(3, 64)\n    return 0.5\n",
    "answer_late": "import time\ndef f(x):\n    time.sleep(2)\n    return x % 1.0\n",
    # raw lines on the response pipe: JSON the codec never emits (bare NaN, untagged numbers, objects, strings)
    "raw_json_lines": _RESP_FD + "os.write(_resp(), b'NaN\\n[\"ok\", NaN]\\n\"ok\"\\n{\"ok\": 1}\\n[\"ok\", [\"f\"]]\\n')\n"
                      "def f(x):\n    return 0.0\n",
    # a burst of answers up front, so every later call reads a stale one (the candidate cannot know the values)
    "stale_answers": _RESP_FD + "os.write(_resp(), b'[\"ok\", [\"f\", \"0.0\"]]\\n' * 50)\n"
                     "def f(x):\n    return x % 1.0\n",
    "huge_line": _RESP_FD + "def f(x):\n    os.write(_resp(), b'[\"ok\", \"' + b'x' * (8 << 20) + b'\"]\\n')\n"
                  "    return 0.5\n",
}


def test_the_correct_solution_passes():
    assert run_function_tests(CORRECT, "f", TEST, timeout=5).passed


@pytest.mark.parametrize("name", sorted(CONTAINED))
def test_codec_and_pipe_forgeries_fail(name):
    res = run_function_tests(CONTAINED[name], "f", TEST, timeout=5, call_timeout=1)
    assert not res.passed, (name, res.status, res.stderr[-500:])
