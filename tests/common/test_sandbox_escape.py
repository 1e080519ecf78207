"""Red team, escape side: programs written to get out of the sandbox, each contained by the OS layers alone.

Every attack runs with the in-Python guard off (guard=False), so only bubblewrap's namespaces, the seccomp
filter, cgroups, rlimits and Landlock stand in the way. Each test also checks the host side (the listener got
nothing, the file is not there, the process still lives) and, where it matters, a control that the same
operation inside the sandbox works, so a test cannot pass because the sandbox is simply broken. After every test
nothing of a run is left: no process of a sandbox uid, no cgroup, no SysV segment, no file in /tmp or /dev/shm.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ember.common import sandbox
from ember.common.sandbox import layers, run_code, run_function_tests

STRONG = sandbox.status()["strong"]
pytestmark = pytest.mark.skipif(not STRONG, reason="bubblewrap + seccomp are not in force here "
                                "(apt-get install bubblewrap, as root); sandbox.status() says what is missing")
REPO = Path(__file__).resolve().parents[2]
DATASETS = Path(os.environ.get("EMBER_DATASETS", REPO.parent / "shared" / "datasets"))


def sysv_segments() -> set[str]:
    try:
        return {line.split()[1] for line in Path("/proc/sysvipc/shm").read_text().splitlines()[1:] if line.split()}
    except OSError:
        return set()


def test_the_harness_removes_its_cgroups_when_it_exits():
    code = ("import sys\nfrom ember.common.sandbox import layers, run_code\nassert run_code('pass').passed\n"
            "print([str(d) for ds in layers._pool for d in ds])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    made = eval(out.stdout.strip() or "[]")
    assert out.returncode == 0 and (made or not layers.machine().cgroup), out.stderr
    assert not any(os.path.exists(d) for d in made)


def sandbox_cgroups() -> list[Path]:
    m = layers.machine()
    return [d for base in m.cgroup_base.values() if base.is_dir() for d in base.glob("ember-sandbox-*")]


@pytest.fixture(autouse=True)
def nothing_left():
    """Whatever a test's programs did, the machine is as before once the run is over."""
    shm, tmp, devshm = sysv_segments(), set(os.listdir("/tmp")), set(os.listdir("/dev/shm"))
    yield
    time.sleep(0.05)
    assert [p for p, u in sandbox._proc_uids().items() if u >= sandbox.UID_BASE] == []
    assert all(not (d / "cgroup.procs").read_text().split() for d in sandbox_cgroups())  # empty, kept for reuse
    assert sysv_segments() <= shm
    assert {f for f in set(os.listdir("/tmp")) - tmp if f.startswith(("ember-sandbox", "escape"))} == set()
    assert set(os.listdir("/dev/shm")) <= devshm


def attack(code: str, **kw) -> sandbox.SandboxResult:
    """Run `code`, which asserts that its escape worked: a pass means it got out."""
    return run_code(code, guard=False, **kw)


def test_the_strong_layers_are_in_force():
    iso = set(run_code("pass").isolation)
    assert {"bwrap", "mntns", "pidns", "ipcns", "utsns", "netns", "userns", "seccomp", "nonewprivs",
            "tmpfs-disk"} <= iso, iso
    if os.geteuid() == 0:
        assert "uid" in iso and any(x.startswith("cgroup-") for x in iso), iso


# --- files -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", [str(REPO / "src" / "ember" / "__init__.py"), str(DATASETS), "/root", "/home",
                                  "/etc/passwd", "/etc/shadow", sys.executable,
                                  "/sys/fs/cgroup", "/var", "/usr/local", "/usr/share"])
def test_host_files_are_not_visible(path):
    r = attack(f"import os\nassert os.path.exists({path!r}), 'not visible'")
    assert not r.passed and "not visible" in r.stderr, r


def test_only_the_interpreter_and_its_stdlib_are_visible():
    r = run_code("import os, sys, json\nprint(json.dumps(sorted(os.listdir('/')) + sorted(os.listdir('/usr'))))\n"
                 "import collections, re, fractions, heapq")
    assert r.passed, r
    assert set(json.loads(r.stdout)) <= {"bin", "dev", "etc", "lib", "lib64", "proc", "usr", "work", "lib32",
                                         "libx32", "sbin", "local"}, r.stdout


@pytest.mark.parametrize("target", ["/tmp/escape.txt", "/escape.txt", "/usr/escape.txt", "/dev/shm/escape",
                                    "/dev/escape", "/proc/escape", "/etc/escape"])
def test_writes_outside_the_work_dir_fail(target):
    r = attack(f"open({target!r}, 'w').write('x')")
    assert not r.passed and ("Error" in r.stderr), r
    assert not os.path.exists(target)
    assert attack("open('/work/mine.txt', 'w').write('x')\nassert open('mine.txt').read() == 'x'").passed


def test_the_work_dir_is_private_to_the_run():
    run_code("open('secret.txt', 'w').write('from the first run')")
    r = attack("import os\nassert os.listdir('.') != ['program.py'], os.listdir('.')")
    assert not r.passed


# --- sockets of every family -------------------------------------------------------------------------------

def _listener(family, kind, address):
    s = socket.socket(family, kind)
    s.bind(address)
    if kind == socket.SOCK_STREAM:
        s.listen(1)
    s.settimeout(0.3)
    return s


@pytest.mark.parametrize("family,host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_tcp_and_udp_to_the_host_fail(family, host):
    try:
        tcp, udp = _listener(family, socket.SOCK_STREAM, (host, 0)), _listener(family, socket.SOCK_DGRAM, (host, 0))
    except OSError:
        pytest.skip(f"no {host} on this machine")
    tport, uport = tcp.getsockname()[1], udp.getsockname()[1]
    r = attack(f"import socket\ns = socket.socket({int(family)}, socket.SOCK_STREAM)\ns.settimeout(1)\n"
               f"s.connect(({host!r}, {tport}))\ns.sendall(b'x')")
    assert not r.passed
    attack(f"import socket\nu = socket.socket({int(family)}, socket.SOCK_DGRAM)\n"
           f"for _ in range(5): u.sendto(b'leak', ({host!r}, {uport}))")
    with pytest.raises(socket.timeout):
        tcp.accept()
    with pytest.raises(socket.timeout):
        udp.recvfrom(16)
    tcp.close()
    udp.close()
    # control: the sandbox's own loopback works (UDP: Landlock refuses every TCP bind/connect besides)
    assert attack("import socket\nu = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\nu.bind(('127.0.0.1', 0))\n"
                  "u.sendto(b'x', u.getsockname())\nassert u.recv(4) == b'x'").passed


def test_unix_socket_at_a_host_path_is_unreachable(tmp_path):
    os.chmod(tmp_path, 0o777)
    path = str(tmp_path / "host.sock")
    srv = _listener(socket.AF_UNIX, socket.SOCK_STREAM, path)
    os.chmod(path, 0o777)
    try:
        r = attack(f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({path!r})\ns.sendall(b'x')")
        assert not r.passed
        with pytest.raises(socket.timeout):
            srv.accept()
    finally:
        srv.close()
    # control: a Unix socket inside the work dir works
    assert attack("import socket\ns = socket.socket(socket.AF_UNIX)\ns.bind('/work/s')\ns.listen(1)\n"
                  "c = socket.socket(socket.AF_UNIX)\nc.connect('/work/s')").passed


def test_abstract_unix_socket_on_the_host_is_unreachable():
    name = f"\0ember-redteam-{os.getpid()}"
    srv = _listener(socket.AF_UNIX, socket.SOCK_STREAM, name)
    try:
        r = attack(f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({name!r})\ns.sendall(b'x')")
        assert not r.passed and ("ConnectionRefused" in r.stderr or "No such file" in r.stderr), r
        with pytest.raises(socket.timeout):
            srv.accept()
    finally:
        srv.close()


@pytest.mark.parametrize("family,kind,proto", [
    (socket.AF_INET, socket.SOCK_RAW, 1), (socket.AF_INET6, socket.SOCK_RAW, 58), (17, socket.SOCK_RAW, 0),  # packet
    (16, socket.SOCK_RAW, 0), (16, socket.SOCK_DGRAM, 0),  # netlink
    (socket.AF_INET, 10, 0),  # SOCK_PACKET
    (38, socket.SOCK_SEQPACKET, 0), (40, socket.SOCK_STREAM, 0), (31, socket.SOCK_RAW, 0), (4, 2, 0)])  # alg, vsock, bluetooth, ipx
def test_other_socket_families_are_refused(family, kind, proto):
    r = attack(f"import socket\nsocket.socket({family}, {kind}, {proto})")
    assert not r.passed and "Operation not permitted" in r.stderr, r


# --- signals and other processes ---------------------------------------------------------------------------

def test_signals_reach_no_host_process():
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        for target in (os.getpid(), victim.pid):
            r = attack(f"import os\nos.kill({target}, 9)")
            assert not r.passed and "ProcessLookupError" in r.stderr, r
        attack("import os\nos.kill(-1, 9)")  # everything it can see: only its own namespace
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


def test_proc_shows_only_the_sandbox():
    r = run_code("import os\nprint(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))")
    assert r.passed and max(json.loads(r.stdout)) < 10, r.stdout  # bwrap's init, the program: a handful of pids
    r = attack(f"print(open('/proc/{os.getpid()}/cmdline').read())")
    assert not r.passed


def test_ptrace_and_cross_process_memory_are_refused():
    code = ("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "assert libc.ptrace(0, 0, 0, 0) == 0, ('traceme', ctypes.get_errno())\n")
    r = attack(code)
    assert not r.passed and "traceme" in r.stderr and ", 1)" in r.stderr, r
    r = attack("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
               "assert libc.process_vm_readv(1, 0, 0, 0, 0, 0) >= 0, ctypes.get_errno()")
    assert not r.passed and "AssertionError: 1" in r.stderr, r


def test_the_check_process_is_out_of_the_candidates_reach():
    """The candidate cannot see the check's process (another sandbox, another PID namespace) to read its memory."""
    code = ("import os\ndef f(x):\n    mine = [p for p in os.listdir('/proc') if p.isdigit()]\n"
            "    found = [p for p in mine if b'\"mode\": \"check\"' in open('/proc/%s/cmdline' % p, 'rb').read()]\n"
            "    return len(found)\n")
    r = run_function_tests(code, "f", "def check(c):\n    assert c(0) == 1\n", guard=False)
    assert not r.passed


# --- shared memory, namespaces, mounts, kernel interfaces --------------------------------------------------

def test_sysv_shared_memory_is_refused_and_nothing_outlives_the_run():
    before = sysv_segments()
    r = attack("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
               "assert libc.shmget(0, 256 << 20, 0o1666) >= 0, ctypes.get_errno()")
    assert not r.passed and "AssertionError: 1" in r.stderr, r
    assert sysv_segments() <= before


def test_posix_shared_memory_is_refused():
    r = attack("import os\nfd = os.open('/dev/shm/ember-escape', os.O_CREAT | os.O_RDWR)\nos.write(fd, b'x' * 4096)")
    assert not r.passed and not os.path.exists("/dev/shm/ember-escape")


@pytest.mark.parametrize("flag", [0x10000000, 0x20000, 0x40000000, 0x20000000, 0x08000000, 0x04000000])
def test_new_namespaces_are_refused(flag):
    r = attack(f"import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
               f"assert libc.unshare({flag}) == 0, ctypes.get_errno()")
    assert not r.passed and "AssertionError: 1" in r.stderr, r
    clone = (f"import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
             f"pid = libc.syscall(56, {flag} | 17, 0, 0, 0, 0)\n"  # raw clone(CLONE_NEW* | SIGCHLD)
             "if pid == 0:\n    import os; os._exit(0)\nassert pid > 0, ctypes.get_errno()")
    r = attack(clone)
    assert not r.passed and "AssertionError: 1" in r.stderr, r


@pytest.mark.parametrize("call", ["libc.mount(b'none', b'/work', b'tmpfs', 0, None)", "libc.syscall(250, 0, 0, 0, 0)",
                                  "libc.syscall(321, 0, 0, 0)", "libc.syscall(425, 8, 0)",
                                  "libc.syscall(298, 0, 0, -1, -1, 0)", "libc.syscall(304, 0, 0, 0)",
                                  "libc.syscall(323, 0)", "libc.sethostname(b'pwned', 5)"])
def test_kernel_interfaces_are_refused(call):  # mount, keyctl, bpf, io_uring, perf, open_by_handle, userfaultfd
    r = attack(f"import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nassert {call} >= 0, ctypes.get_errno()")
    assert not r.passed and "AssertionError: 1" in r.stderr, r
    assert socket.gethostname() != "pwned"


def test_32_bit_syscalls_kill_the_process():
    """int 0x80 from a 64-bit process reaches the i386 table, which the filter does not know: the arch check
    kills the process instead of letting unfiltered numbers through."""
    code = ("import ctypes, mmap\n"
            "buf = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
            "buf.write(bytes([0xb8, 0x14, 0, 0, 0, 0xcd, 0x80, 0xc3]))\n"  # mov eax, 20 (getpid); int 0x80; ret
            "addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))\n"
            "ctypes.CFUNCTYPE(ctypes.c_int)(addr)()\n")
    r = attack(code)
    assert r.status == "killed", r


# --- resource exhaustion -----------------------------------------------------------------------------------

def test_fork_bomb_is_bounded_for_the_whole_run():
    bomb = ("import os, time\nn = 0\nwhile n < 200:\n    try:\n        if os.fork() == 0:\n            time.sleep(30)\n"
            "        n += 1\n    except OSError:\n        break\nassert n > 50, n")
    r = attack(bomb, timeout=3, max_procs=8)
    assert not r.passed and "AssertionError" in r.stderr, r


def test_memory_of_the_whole_run_is_bounded():
    """Four processes each under the per-process limit, together over the run's: the cgroup stops them."""
    if not any(x.startswith("cgroup-") for x in run_code("pass").isolation):
        pytest.skip("no cgroup here: memory is bounded per process only (sandbox.status() states it)")
    hog = ("import os, time\nkids = []\nfor _ in range(4):\n    pid = os.fork()\n    if pid == 0:\n"
           "        b = bytearray(120 << 20)\n        b[::4096] = b'x' * len(b[::4096])\n        time.sleep(2)\n"
           "        os._exit(0)\n    kids.append(pid)\n"
           "codes = [os.waitpid(p, 0)[1] for p in kids]\nassert all(c == 0 for c in codes), codes")
    r = attack(hog, timeout=8, memory_mb=256)
    assert not r.passed and "AssertionError" in r.stderr, r
    assert attack(hog.replace("range(4)", "range(1)"), timeout=8, memory_mb=256).passed  # control: one fits


def test_disk_of_the_whole_run_is_bounded():
    fill = ("import os\nn = 0\ntry:\n    while n < 100:\n        open('f%d' % n, 'wb').write(b'0' * (1 << 20))\n"
            "        n += 1\nexcept OSError as e:\n    print('stopped', n, e)\nassert n == 100, n")
    r = attack(fill, disk_mb=8, max_file_mb=4, timeout=10)
    assert not r.passed and "No space left" in r.stdout, r


def test_output_flood_is_bounded():
    r = attack("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", max_file_mb=2, timeout=10)
    assert not r.passed and len(r.stdout) <= sandbox.MAX_OUTPUT


@pytest.mark.parametrize("code", [
    "import threading, time\nts = [threading.Thread(target=time.sleep, args=(5,)) for _ in range(500)]\n"
    "[t.start() for t in ts]",
    "fs = [open('/dev/null') for _ in range(10000)]",
    "x = bytearray(4 << 30)",
    "while True:\n    pass",
])
def test_other_exhaustion_is_contained(code):  # threads, file descriptors, one big allocation, CPU
    t0 = time.monotonic()
    r = attack(code, timeout=2, memory_mb=256, max_procs=16)
    assert not r.passed and time.monotonic() - t0 < 15, r


def test_a_detached_daemon_dies_with_the_run():
    daemon = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(60)\n"
              "    os._exit(0)\ntime.sleep(0.2)")
    assert attack(daemon, timeout=3).passed  # the program itself ends fine; its daemon must not outlive it


def test_runs_do_not_see_each_other():
    """Two runs at once: the second cannot find or signal the first (own PID namespace, own uid)."""
    slow = subprocess.Popen([sys.executable, "-c", "from ember.common.sandbox import run_code\n"
                             "r = run_code('import time\\ntime.sleep(3)', timeout=5)\nprint(r.status)"],
                            stdout=subprocess.PIPE, text=True)
    time.sleep(1.0)
    r = attack("import os\nps = [p for p in os.listdir('/proc') if p.isdigit() and p not in ('1', str(os.getpid()))]\n"
               "assert ps, 'alone'")
    assert not r.passed and "alone" in r.stderr, r
    assert slow.communicate(timeout=20)[0].strip() == "passed"


# --- without root ------------------------------------------------------------------------------------------

def test_the_sandbox_holds_when_the_harness_is_not_root(tmp_path):
    """The same harness run by an unprivileged user: bwrap makes an unprivileged user namespace; no fresh uids
    or cgroups, so the run is bounded by rlimits; attacks still fail and a correct program passes."""
    if os.geteuid() != 0:
        pytest.skip("switching to an unprivileged user needs root")
    attacks = {"read": f"open({str(REPO / 'pyproject.toml')!r}).read()",
               "net": "import socket\nsocket.socket(socket.AF_PACKET, socket.SOCK_RAW)",
               "shm": "import ctypes\nassert ctypes.CDLL(None).shmget(0, 4096, 0o1600) >= 0"}
    script = (f"import json, sys\nsys.path.insert(0, {str(REPO / 'src')!r})\n"
              "from ember.common.sandbox import run_code, status\n"
              "s = status()\nout = {'strong': s['strong'], 'layers': s['layers']}\n"
              "out['ok'] = run_code('assert sum(range(10)) == 45').passed\n"
              f"for name, code in {attacks!r}.items():\n"
              "    out[name] = run_code(code, guard=False).passed\n"
              "print(json.dumps(out))\n")
    r = subprocess.run(["/usr/bin/python3", "-I", "-c", script], user=65534, group=65534, extra_groups=[],
                       cwd="/", capture_output=True, text=True, timeout=120)
    if r.returncode != 0 and "Permission denied" in r.stderr:
        pytest.skip(f"the repository is not readable by an unprivileged user: {r.stderr[-200:]}")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["ok"] and not out["read"] and not out["net"] and not out["shm"], out
    assert out["strong"] and "uid" not in out["layers"], out
