"""The sandbox's syscall filter: a classic-BPF seccomp program, built here byte for byte, that bubblewrap loads.

Written out rather than taken from libseccomp because the policy is a short deny list (libseccomp is a C library
a fresh machine may lack; its Python binding is not on PyPI in a maintained form). x86-64 only: any other
architecture (including 32-bit syscalls made from a 64-bit process, and the x32 ABI) is refused.

Denied with EPERM: new namespaces (unshare, setns, clone with CLONE_NEW*), ptrace and cross-process memory
access, every mount call, SysV IPC and POSIX message queues, sockets other than AF_UNIX/AF_INET/AF_INET6 and any
SOCK_RAW/SOCK_PACKET socket, the kernel keyring, bpf, perf, userfaultfd, io_uring, module and kexec calls,
clock/host-name changes, file handles (open_by_handle_at, the classic container escape) and a few relics.
clone3 answers ENOSYS: its flags live in user memory a filter cannot read, and glibc then falls back to clone.
So does every call newer than the list (fail closed: glibc falls back where it uses one). Also denied: inotify
and mincore, side channels onto the host's file activity and page cache.
"""

from __future__ import annotations

import struct

# x86-64 syscall numbers (asm/unistd_64.h)
DENY = {
    "unshare": 272, "setns": 308, "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311,
    "pidfd_getfd": 438, "process_madvise": 440, "kcmp": 312,
    "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "move_mount": 429, "open_tree": 428,
    "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
    "shmget": 29, "shmat": 30, "shmctl": 31, "shmdt": 67, "semget": 64, "semop": 65, "semctl": 66,
    "semtimedop": 220, "msgget": 68, "msgsnd": 69, "msgrcv": 70, "msgctl": 71,
    "mq_open": 240, "mq_unlink": 241, "mq_timedsend": 242, "mq_timedreceive": 243, "mq_notify": 244,
    "mq_getsetattr": 245,
    "keyctl": 250, "add_key": 248, "request_key": 249, "bpf": 321, "perf_event_open": 298, "userfaultfd": 323,
    "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
    "kexec_load": 246, "kexec_file_load": 320, "init_module": 175, "finit_module": 313, "delete_module": 176,
    "acct": 163, "swapon": 167, "swapoff": 168, "reboot": 169, "settimeofday": 164, "clock_settime": 227,
    "clock_adjtime": 305, "adjtimex": 159, "sethostname": 170, "setdomainname": 171,
    "name_to_handle_at": 303, "open_by_handle_at": 304, "iopl": 172, "ioperm": 173, "quotactl": 179,
    "syslog": 103, "vhangup": 153, "lookup_dcookie": 212, "fanotify_init": 300, "fanotify_mark": 301,
    "uselib": 134, "memfd_secret": 447,
    # side channels: inotify events are per inode, so a watch on the read-only stdlib would see host processes and
    # other sandboxes open files; mincore reveals what is in the page cache
    "inotify_init": 253, "inotify_init1": 294, "inotify_add_watch": 254, "mincore": 27,
}
NEWEST_KNOWN = 447  # calls above this (added after the list was written: cachestat, listmount...) answer ENOSYS
SOCKET, SOCKETPAIR, CLONE, CLONE3 = 41, 53, 56, 435
AF_UNIX, AF_INET, AF_INET6 = 1, 2, 10
SOCK_RAW, SOCK_PACKET = 3, 10
CLONE_NEW = 0x7E020000  # NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET

AUDIT_ARCH_X86_64 = 0xC000003E
X32_BIT = 0x40000000
RET_KILL_PROCESS, RET_ALLOW = 0x80000000, 0x7FFF0000
RET_EPERM, RET_ENOSYS = 0x00050000 | 1, 0x00050000 | 38

# struct seccomp_data: nr (u32) at 0, arch (u32) at 4, ip (u64) at 8, args[6] (u64) from 16; low words first
NR, ARCH, ARG0, ARG1 = 0, 4, 16, 24
LD_W_ABS, JEQ_K, JGE_K, JSET_K, RET_K, ALU_AND_K = 0x20, 0x15, 0x35, 0x45, 0x06, 0x54


def _ins(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("<HBBI", code, jt, jf, k)  # struct sock_filter


def build() -> bytes:
    """The filter program, as the bytes `bwrap --seccomp FD` reads (an array of struct sock_filter)."""
    # Layout: arch check, the syscall dispatch, argument checks, then the returns; jumps count instructions forward.
    deny_nrs = sorted(DENY.values())
    dispatch = [(nr, "eperm") for nr in deny_nrs] + [(SOCKET, "socket"), (SOCKETPAIR, "socketpair"),
                                                     (CLONE, "clone"), (CLONE3, "enosys")]
    blocks = {
        # socket(family, type, proto): family in {unix, inet, inet6} and type (low 4 bits) neither raw nor packet
        "socket": [(LD_W_ABS, ARG0), ("jeq", AF_UNIX, "sock_type"), ("jeq", AF_INET, "sock_type"),
                   ("jeq", AF_INET6, "sock_type"), ("goto", "eperm")],
        "sock_type": [(LD_W_ABS, ARG1), (ALU_AND_K, 0xF), ("jeq", SOCK_RAW, "eperm"), ("jeq", SOCK_PACKET, "eperm"),
                      ("goto", "allow")],
        "socketpair": [(LD_W_ABS, ARG0), ("jeq", AF_UNIX, "allow"), ("goto", "eperm")],
        "clone": [(LD_W_ABS, ARG0), ("jset", CLONE_NEW, "eperm"), ("goto", "allow")],
        # the returns come last: BPF jumps only forward
        "allow": [(RET_K, RET_ALLOW)],
        "eperm": [(RET_K, RET_EPERM)],
        "enosys": [(RET_K, RET_ENOSYS)],
        "kill": [(RET_K, RET_KILL_PROCESS)],
    }
    prog: list = [(LD_W_ABS, ARCH), ("jne", AUDIT_ARCH_X86_64, "kill"), (LD_W_ABS, NR), ("jge", X32_BIT, "kill"),
                  ("jge", NEWEST_KNOWN + 1, "enosys")]
    prog += [("jeq", nr, target) for nr, target in dispatch] + [("goto", "allow")]
    starts = {}
    for name, body in blocks.items():
        starts[name] = len(prog)
        prog += body
    out = b""
    for i, ins in enumerate(prog):
        op = ins[0]
        if op == "goto":  # an always-true jump: JEQ A == A is not expressible, so JGE 0 (unsigned) is used
            out += _ins(JGE_K, 0, _offset(i, starts[ins[1]]), 0)
        elif op == "jne":
            out += _ins(JEQ_K, ins[1], 0, _offset(i, starts[ins[2]]))
        elif op in ("jeq", "jge", "jset"):
            out += _ins({"jeq": JEQ_K, "jge": JGE_K, "jset": JSET_K}[op], ins[1], _offset(i, starts[ins[2]]), 0)
        else:
            out += _ins(op, ins[1])
    return out


def _offset(at: int, target: int) -> int:
    off = target - at - 1
    assert 0 <= off < 256, "BPF conditional jumps reach at most 255 instructions ahead"
    return off
