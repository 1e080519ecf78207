"""Sandbox containment: every attack is reported as a failure, nothing escapes, real solutions still pass.

These run as root in CI; each attack uses small bounds (1-2 s, a handful of processes) and is checked with
the in-Python guard off, so the OS layers alone must contain it.
"""

from __future__ import annotations

import os
import socket
import time

import pytest

from ember.common import sandbox
from ember.common.sandbox import run_code, run_many
from ember.eval.tasks import humaneval

from tests.eval.conftest import datasets_or_skip


def sandbox_procs() -> list[int]:
    return [p for p, u in sandbox._proc_uids().items() if u >= sandbox.UID_BASE]


def leftovers() -> list[int]:
    """Live processes still running in a sandbox work dir (a host temp dir without bwrap, /work inside it)."""
    out = []
    for pid in sandbox._proc_uids():
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
            if "ember-sandbox-" in cwd or (cwd == "/work" and os.readlink(f"/proc/{pid}/root") != "/"):
                out.append(pid)
        except OSError:
            pass
    return out


def test_passing_and_failing_programs():
    ok = run_code("import math\nprint(math.gcd(12, 18))")
    assert ok.passed and ok.stdout == "6\n" and ok.returncode == 0
    bad = run_code("assert 1 + 1 == 3")
    assert bad.status == "failed" and "AssertionError" in bad.stderr
    syntax = run_code("def f(:\n  pass")
    assert syntax.status == "failed" and "SyntaxError" in syntax.stderr


def test_exit_before_the_end_is_not_a_pass():
    assert run_code("import sys\nsys.exit(0)\nassert False").status == "failed"
    assert run_code("raise SystemExit(0)").status == "failed"


def test_the_end_marker_cannot_be_printed_by_the_program():
    """Printing the harness's end-of-program marker and exiting 0 before the tests must not pass: the nonce is
    neither a global of the bootstrap nor on the command line (/proc/self/cmdline)."""
    from_globals = ("import __main__, sys, os\nsys.stderr.write('\\x00done:%s\\n' % getattr(__main__, 'nonce', ''))\n"
                    "sys.stderr.flush()\nos._exit(0)\nassert False")
    from_cmdline = ("import json, os, sys\nargs = open('/proc/self/cmdline', 'rb').read().split(b'\\0')\n"
                    "nonce = next((json.loads(a).get('nonce', '') for a in args if a.startswith(b'{')), '')\n"
                    "sys.stderr.write('\\x00done:' + nonce + '\\n')\nsys.stderr.flush()\nos._exit(0)\nassert False")
    for code in (from_globals, from_cmdline):
        r = run_code(code)
        assert r.status == "failed" and r.returncode == 0, (r.status, r.stderr)


def test_a_pass_with_more_stderr_than_is_kept():
    r = run_code(f"import sys\nsys.stderr.write('w' * {sandbox.MAX_OUTPUT + 5000})\nassert 1 == 1")
    assert r.passed, (r.status, r.returncode)
    assert set(r.stderr) == {"w"} and len(r.stderr) < sandbox.MAX_OUTPUT  # what is kept is cut, the verdict is not


def test_isolation_layers_present_as_root():
    if os.geteuid() != 0:
        pytest.skip("uid drop and network namespace are root-only layers")
    iso = run_code("pass").isolation
    assert {"uid", "RLIMIT_NPROC", "RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_FSIZE", "guard"} <= set(iso), iso


def test_infinite_loop_times_out_quickly():
    t0 = time.monotonic()
    r = run_code("while True:\n    pass", timeout=1.0)
    assert r.status == "timeout" and not r.passed
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("guard", [False, True])
def test_fork_bomb_is_contained_and_cleaned_up(guard):
    bomb = ("import os\nwhile True:\n    try:\n        if os.fork() == 0:\n            os.setsid()\n"
            "    except OSError:\n        pass\n")
    t0 = time.monotonic()
    r = run_code(bomb, timeout=1.5, max_procs=4, guard=guard)
    assert not r.passed and time.monotonic() - t0 < 10
    time.sleep(0.05)
    assert sandbox_procs() == [] and leftovers() == []


def test_escaped_daemon_is_killed():
    daemon = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(60)\n"
    run_code(daemon, timeout=2, guard=False)
    time.sleep(0.05)
    assert sandbox_procs() == [] and leftovers() == []


@pytest.mark.parametrize("guard", [False, True])
def test_memory_hog_fails(guard):
    r = run_code("x = []\nwhile True:\n    x.append(bytearray(50 << 20))", timeout=5, memory_mb=256, guard=guard)
    assert not r.passed and (r.status == "killed" or "MemoryError" in r.stderr)


@pytest.mark.parametrize("guard", [False, True])
def test_writing_outside_the_work_dir_fails(tmp_path, guard):
    os.chmod(tmp_path, 0o777)  # world-writable, so only the sandbox's own layers can stop the write
    if not guard and not any(x.startswith("landlock") for x in run_code("pass").isolation):
        pytest.skip("without Landlock only the Python guard stops writes to world-writable folders (docs/stages/eval.md)")
    for target in (tmp_path / "escape.txt", "../escape.txt", "/tmp/ember_sandbox_escape.txt"):
        r = run_code(f"open({str(target)!r}, 'w').write('x')", guard=guard)
        # refused by Landlock/the guard; inside bubblewrap the host path is not there and / is read-only
        assert r.status == "failed" and any(e in r.stderr for e in ("PermissionError", "FileNotFoundError",
                                                                   "Read-only file system")), (target, r)
    assert not (tmp_path / "escape.txt").exists() and not os.path.exists("/tmp/ember_sandbox_escape.txt")
    assert run_code("open('mine.txt', 'w').write('x')\nassert open('mine.txt').read() == 'x'").passed


def test_big_file_is_cut_by_the_size_limit():
    r = run_code("open('big', 'wb').write(b'0' * (64 << 20))", max_file_mb=1, guard=False)
    assert not r.passed


@pytest.mark.parametrize("guard", [False, True])
def test_socket_to_a_local_listener_fails(guard):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(0.3)
    port = srv.getsockname()[1]
    r = run_code(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\ns.sendall(b'x')",
                 guard=guard)
    with pytest.raises(socket.timeout):
        srv.accept()
    srv.close()
    assert r.status == "failed"


def test_cannot_signal_the_harness():
    r = run_code(f"import os, signal\nos.kill({os.getpid()}, signal.SIGKILL)", guard=False)
    assert r.status == "failed" and "Error" in r.stderr  # and we are still here


def test_humaneval_canonical_solutions_pass():
    """Under the split-verdict harness HumanEval scores with: canonical 164/164, a wrong set (`return None`) 0/164."""
    items = humaneval.load(datasets_or_skip("humaneval", "HumanEval.jsonl.gz"))
    assert len(items) == 164
    res = humaneval.score_many([(it, it["canonical_solution"]) for it in items], workers=2, timeout=10)
    failed = [(it["id"], r.status, r.stderr[-200:]) for it, r in zip(items, res) if not r.passed]
    assert failed == []
    wrong = humaneval.score_many([(it, "    return None\n") for it in items], workers=2, timeout=10)
    assert [it["id"] for it, r in zip(items, wrong) if r.passed] == []
    time.sleep(0.05)
    assert sandbox_procs() == [] and leftovers() == []


def test_single_file_programs_still_run():
    """run_code / run_many stay for other callers (one file, the end-of-program verdict)."""
    items = humaneval.load(datasets_or_skip("humaneval", "HumanEval.jsonl.gz"))[:6]
    assert all(r.passed for r in run_many([humaneval.program(it, it["canonical_solution"]) for it in items]))
    assert not any(r.passed for r in run_many([humaneval.program(it, "    return None\n") for it in items]))


def test_function_tests_clean_up_after_a_hang_and_a_daemon():
    code = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n"
            "def f(x):\n    time.sleep(60)\n")
    r = sandbox.run_function_tests(code, "f", "def check(c):\n    assert c(1) == 1\n", timeout=2, guard=False)
    assert not r.passed
    time.sleep(0.05)
    assert sandbox_procs() == [] and leftovers() == []
