"""What this machine gives the sandbox: the interpreter to expose, bubblewrap, whole-run cgroup limits.

Decided once per harness process and cached. `status()` says which layers are in force and, for each missing
one, why and how to get it; `ember eval` prints it and refuses untrusted code without the strong layers.

Why bubblewrap (Debian `bubblewrap`, the sandbox under Flatpak) rather than nsjail: it is a packaged, maintained,
~3k-line setuid-free tool that does exactly the namespace + bind-mount + seccomp-fd part, while nsjail is not in
Debian stable, must be built, and brings its own config language. Limits it lacks (memory, processes for a
whole run) come from cgroups here; its seccomp filter comes from `seccomp.py`.
"""

from __future__ import annotations

import atexit
import itertools
import json
import secrets
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

UID_BASE = 1_700_000_000  # sandbox uids: far above any real account (uid_t is 32-bit)
PROBE_UID = UID_BASE - 1  # used only to ask "can a stranger read this interpreter?"

# Imported before the uid drop when the interpreter's own stdlib is unreadable to the sandbox uid (no bwrap).
PREIMPORT = ("re math cmath collections itertools functools typing string heapq bisect hashlib random statistics "
             "fractions decimal datetime json copy operator numbers array textwrap unicodedata").split()


@dataclass
class Machine:
    python: str  # the interpreter the sandbox runs
    readable: bool  # a stranger uid can read it and its stdlib (needed to bind it into a bwrap sandbox)
    bwrap: str | None  # bubblewrap's path when it works here (probed), else None
    binds: list[str] = field(default_factory=list)  # read-only paths inside the sandbox: interpreter, stdlib, libs
    cgroup: str = ""  # "v2" | "v1" | "": where whole-run memory and process limits come from
    cgroup_base: dict[str, Path] = field(default_factory=dict)  # controller -> our own cgroup folder
    missing: dict[str, str] = field(default_factory=dict)  # layer -> why it is missing and how to get it


_machine: Machine | None = None


def machine() -> Machine:
    global _machine
    if _machine is None:
        _machine = _probe()
    return _machine


def _probe() -> Machine:
    root = os.geteuid() == 0
    python, readable = _pick_interpreter() if root else (sys.executable, True)
    m = Machine(os.path.realpath(python), readable, None)  # the real file: a symlink's target is what gets bound
    if sys.platform != "linux":
        m.missing["namespaces"] = "the OS sandbox needs Linux"
        return m
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        m.missing["bwrap"] = "bubblewrap is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
    elif not readable:
        m.missing["bwrap"] = (f"no interpreter a sandbox user can read ({sys.executable} lies in a private folder); "
                              f"install the system python3 (apt-get install python3)")
    else:
        m.binds = _interpreter_binds(m.python)
        err = _bwrap_works(bwrap, m.python, m.binds, root)
        if err:
            m.missing["bwrap"] = f"bubblewrap cannot start a sandbox here: {err}"
        else:
            m.bwrap = bwrap
    if root:
        m.cgroup, m.cgroup_base = _cgroups()
        _sweep_stale(m)
    if not m.cgroup:
        m.missing["cgroup"] = ("no writable cgroup memory+pids controllers (needs root and cgroup v2, or v1 "
                               "memory/pids): memory and processes are limited per process (rlimits) instead, so a "
                               "run may use up to max_procs x memory_mb")
    return m


def _pick_interpreter() -> tuple[str, bool]:
    """A python whose stdlib a fresh uid can read (sys.executable may live under a 0700 /root)."""
    for cand in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        if not os.path.exists(cand):
            continue
        try:
            r = subprocess.run([cand, "-I", "-S", "-B", "-c", "import json, re, collections, ctypes"],
                               user=PROBE_UID, group=PROBE_UID, extra_groups=[], cwd="/", capture_output=True,
                               timeout=20)
        except (OSError, subprocess.SubprocessError):
            continue
        if r.returncode == 0:
            return cand, True
    return sys.executable, False


def _interpreter_binds(python: str) -> list[str]:
    """The interpreter, its standard library and the folders of the shared libraries they load -- nothing else
    of the host (no project, datasets, home, /etc)."""
    info = json.loads(subprocess.run(
        [python, "-I", "-S", "-c", "import json, os, sys, sysconfig\n"
         "print(json.dumps([os.path.realpath(sys.executable), sysconfig.get_path('stdlib'),"
         " sysconfig.get_path('platstdlib'), sysconfig.get_config_var('DESTSHARED') or '']))"],
        capture_output=True, text=True, timeout=20, check=True).stdout)
    exe, stdlib, platstdlib, dynload = info
    binds = {exe, stdlib, platstdlib} | ({dynload} if dynload and os.path.isdir(dynload) else set())
    objects = [exe] + ([str(p) for p in Path(dynload).glob("*.so")] if dynload and os.path.isdir(dynload) else [])
    try:
        out = subprocess.run(["ldd", *objects], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    for line in out.splitlines():
        if line.rstrip().endswith(":"):  # ldd's "file:" header when given several files
            continue
        parts = line.split("=>")[-1].split()
        lib = parts[0] if parts else ""
        if lib.startswith("/"):
            binds |= {os.path.dirname(lib), os.path.dirname(os.path.realpath(lib))}
    if os.path.exists("/etc/ld.so.cache"):
        binds.add("/etc/ld.so.cache")
    # a folder inside another bound folder is covered by it
    ordered = sorted(b for b in binds if b and os.path.exists(b))
    return [b for b in ordered if not any(b != a and b.startswith(a.rstrip("/") + "/") for a in ordered)]


def bwrap_args(m: Machine, disk_mb: int, files: dict[str, int], seccomp_fd: int) -> list[str]:
    """The bubblewrap command line: every namespace, the binds read-only, a size-limited tmpfs as the only
    writable place (/work, the cwd, holding `files`: name -> fd to copy from), a fresh /proc and /dev."""
    # --as-pid-1: the program is the namespace's init, so no bwrap reaper is orphaned (and left as a zombie for the
    # host's init to collect) when the outer bwrap exits on its exit status
    args = [m.bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
            "--as-pid-1",
            "--hostname", "sandbox", "--cap-drop", "ALL", "--clearenv"]
    for b in m.binds:
        args += ["--ro-bind", b, b]
    for link, target in (("/lib", "usr/lib"), ("/lib64", "usr/lib64"), ("/bin", "usr/bin")):
        if os.path.islink(link) and not any(b == link or b.startswith(link + "/") for b in m.binds):
            args += ["--symlink", target, link]  # merged-/usr hosts: the loader's path /lib64/ld-linux... resolves
    args += ["--proc", "/proc", "--dev", "/dev", "--size", str(disk_mb << 20), "--tmpfs", "/work"]
    for name, fd in files.items():
        args += ["--file", str(fd), f"/work/{name}"]
    args += ["--remount-ro", "/dev", "--remount-ro", "/", "--chdir", "/work", "--seccomp", str(seccomp_fd)]
    return args


def _bwrap_works(bwrap: str, python: str, binds: list[str], root: bool) -> str:
    """'' when a sandbox starts and runs the interpreter, else bwrap's complaint."""
    m = Machine(python, True, bwrap, binds)
    from ember.common.sandbox.seccomp import build

    fd = os.memfd_create("seccomp")
    os.write(fd, build())
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        kw = dict(user=PROBE_UID, group=PROBE_UID, extra_groups=[]) if root else {}
        r = subprocess.run(bwrap_args(m, 1, {}, fd) + [python, "-I", "-S", "-c", "print('ok')"], capture_output=True,
                           text=True, timeout=30, pass_fds=(fd,), **kw)
    except (OSError, subprocess.SubprocessError) as e:
        return str(e)
    finally:
        os.close(fd)
    return "" if r.stdout.strip() == "ok" else (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]


def _cgroups() -> tuple[str, dict[str, Path]]:
    """('v2', {'unified': our folder}) when cgroup v2 has memory and pids for us to delegate, ('v1', {'memory':
    ..., 'pids': ...}) when the v1 controllers are mounted and writable, else ('', {}). The sandbox's cgroups
    are made beneath our own, so they stay inside any limit we run under."""
    own = {}
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, ctrls, path = line.split(":", 2)
            for c in ctrls.split(",") if ctrls else [""]:
                own[c] = path
    except OSError:
        return "", {}
    v2 = Path("/sys/fs/cgroup")
    if "" in own and (v2 / "cgroup.controllers").is_file():  # pure v2: our cgroup must delegate memory and pids
        base = v2 / own[""].lstrip("/")
        try:
            if {"memory", "pids"} <= set((base / "cgroup.subtree_control").read_text().split()) and os.access(base, os.W_OK):
                return "v2", {"unified": base}
        except OSError:
            pass
    bases = {c: Path("/sys/fs/cgroup") / c / own[c].lstrip("/") for c in ("memory", "pids") if c in own}
    if len(bases) == 2 and all((b / "cgroup.procs").is_file() and os.access(b, os.W_OK) for b in bases.values()):
        return "v1", bases
    return "", {}


def _sweep_stale(m: Machine) -> None:
    """Remove the empty cgroups a harness killed before its exit handler left (named after its pid, now dead)."""
    for base in m.cgroup_base.values():
        for d in base.glob("ember-sandbox-*"):
            try:
                pid = int(d.name.split("-")[2])
            except (IndexError, ValueError):
                continue
            if pid != os.getpid() and not os.path.exists(f"/proc/{pid}"):
                try:
                    d.rmdir()  # fails, harmlessly, if anything still runs in it
                except OSError:
                    pass


# Empty cgroups kept for the next run (creating one costs ~5 ms): each is taken by one run at a time and removed
# when the harness exits. A run's limits are written afresh when it takes one.
_pool: list[list[Path]] = []
_pool_lock = threading.Lock()
_pool_ids = itertools.count()


def take_cgroups(m: Machine, uid: int | None, memory_mb: int, max_procs: int) -> list[Path]:
    """The run's cgroups (memory and process count for everything in the run), with these limits; their
    cgroup.procs files, owned by root, are what the launcher writes its own pid into before dropping to uid."""
    with _pool_lock:
        dirs = _pool.pop() if _pool else None
    if dirs is None:  # a random part too: a SIGKILLed harness with our pid may have left its cgroups behind
        dirs = _make_cgroups(m, f"ember-sandbox-{os.getpid()}-{next(_pool_ids)}-{secrets.token_hex(3)}")
    try:
        for d in dirs:
            if (d / "memory.max").exists():  # v2
                (d / "memory.max").write_text(str(memory_mb << 20))
                if (d / "memory.swap.max").exists():
                    (d / "memory.swap.max").write_text("0")
            if (d / "memory.limit_in_bytes").exists():  # v1; swap counts too where it is accounted
                if (d / "memory.memsw.limit_in_bytes").exists():  # memsw >= limit always: raise it first
                    (d / "memory.memsw.limit_in_bytes").write_text("-1")
                (d / "memory.limit_in_bytes").write_text(str(memory_mb << 20))
                if (d / "memory.memsw.limit_in_bytes").exists():
                    (d / "memory.memsw.limit_in_bytes").write_text(str(memory_mb << 20))
            if (d / "pids.max").exists():
                (d / "pids.max").write_text(str(max_procs))
    except OSError:
        remove_cgroups(dirs)
        raise
    return dirs


def _make_cgroups(m: Machine, name: str) -> list[Path]:
    made: list[Path] = []
    try:
        for base in ([m.cgroup_base["unified"]] if m.cgroup == "v2" else [m.cgroup_base["memory"], m.cgroup_base["pids"]]):
            (base / name).mkdir()
            made.append(base / name)
    except OSError:
        remove_cgroups(made)
        raise
    return made


@atexit.register
def _remove_pool() -> None:
    while _pool:
        remove_cgroups(_pool.pop())


def _empty(d: Path) -> bool:
    """No process in the cgroup, and none still counted (an exiting task is uncharged only once reaped)."""
    if (d / "cgroup.procs").read_text().split():
        return False
    return not (d / "pids.current").exists() or (d / "pids.current").read_text().strip() == "0"


def release_cgroups(dirs: list[Path]) -> bool:
    """Give a run's cgroups back once everything in them is dead. True when they emptied (then they go back to the
    pool); False when something would not die (then they are removed if possible and never reused)."""
    if not dirs:
        return True
    for _ in range(400):  # killed processes take a moment to leave (up to ~2 s)
        kill_cgroups(dirs)
        if all(_empty(d) for d in dirs if d.exists()):
            if all(d.exists() for d in dirs):
                with _pool_lock:
                    _pool.append(dirs)
            return True
        time.sleep(0.005)
    remove_cgroups(dirs)
    return False


def kill_cgroups(dirs: list[Path], spare: int | None = None) -> None:
    """SIGKILL everything in the run's cgroups but `spare` (v2's cgroup.kill where nothing is spared)."""
    for d in dirs:
        if spare is None and (d / "cgroup.kill").exists():
            try:
                (d / "cgroup.kill").write_text("1")
                continue
            except OSError:
                pass
        try:
            for pid in (d / "cgroup.procs").read_text().split():
                if int(pid) != spare:
                    try:
                        os.kill(int(pid), 9)
                    except (ProcessLookupError, PermissionError):
                        pass
        except OSError:
            pass


def remove_cgroups(dirs: list[Path]) -> bool:
    """rmdir cgroups once they are empty (killed processes take a moment to leave). True when gone."""
    gone = True
    for d in dirs:
        for _ in range(200):
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                kill_cgroups([d])
                time.sleep(0.005)
        else:
            gone = False
    return gone
