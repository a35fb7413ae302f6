"""The sandbox (santacpu/harness/sandbox.py): hostile programs end as not passed within the timeout,
leave no process behind and reach nothing outside; ordinary programs get the right status.

Programs that should leave nothing behind re-exec themselves (or their children) with a unique
marker in their command line, so that survivors can be found in /proc. Every run goes through
`run`, which fails the test instead of hanging if run_program ever failed to return."""

from __future__ import annotations

import ctypes
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from santacpu.harness.sandbox import ExecutionResult, SandboxLimits, isolation, run_program

SHORT = 1.0  # the timeout of programs meant to time out
MARGIN = 2.0  # what a timed-out run may take beyond its timeout (process start, kill, clean-up)


def run(source: str, **limits) -> tuple[ExecutionResult, float]:
    """run_program in a thread that must return within the timeout plus a margin; and its time."""
    limits = SandboxLimits(**{"timeout_s": 10.0, **limits})
    box: list = []
    start = time.monotonic()
    thread = threading.Thread(target=lambda: box.append(run_program(source, limits)), daemon=True)
    thread.start()
    thread.join(limits.timeout_s + MARGIN + 5)
    if not box:
        pytest.fail(f"run_program did not return within {limits.timeout_s + MARGIN + 5} s")
    return box[0], time.monotonic() - start


def marker() -> str:
    return f"santacpu-sandbox-test-{uuid.uuid4().hex}"


def processes_with(mark: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if mark.encode() in cmdline and int(entry) != os.getpid():
                found.append(int(entry))
    return found


def assert_nothing_left(mark: str) -> None:
    deadline = time.monotonic() + (0.0 if isolation()["pid_namespace"] else 1.0)
    while processes_with(mark) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_with(mark) == [], f"processes of the run survived it: {processes_with(mark)}"


def assert_sandbox_still_works() -> None:
    result, _ = run("print('hello')\n")
    assert result.passed, result


def reexec_marked(code: str, mark: str) -> str:
    """A program that replaces itself by `python -c code mark` (no guard there)."""
    return f"import os, sys\nos.execv(sys.executable, [sys.executable, '-c', {code!r}, {mark!r}])\n"


# ---------------------------------------------------------------------------------------------
# Hostile programs


def test_infinite_loop_times_out():
    result, took = run("while True:\n    pass\n", timeout_s=SHORT)
    assert result.status == "timed out" and not result.passed, result
    assert result.detail == f"timed out after {SHORT:g} s"
    assert SHORT <= took < SHORT + MARGIN
    mark = marker()
    result, took = run(reexec_marked("while True: pass", mark), timeout_s=SHORT)
    assert result.status == "timed out" and took < SHORT + MARGIN, result
    assert_nothing_left(mark)
    assert_sandbox_still_works()


def test_a_program_that_closes_stdout_and_stderr_and_hangs_times_out():
    source = "import os, time\nos.close(1)\nos.close(2)\nwhile True:\n    time.sleep(0.01)\n"
    result, took = run(source, timeout_s=SHORT)
    assert result.status == "timed out" and took < SHORT + MARGIN, result
    assert_sandbox_still_works()


def test_escaping_into_a_new_session_does_not_outlive_the_timeout():
    layers = isolation()
    if not (layers["pid_namespace"] or layers["separate_user"]):
        pytest.skip("neither a PID namespace nor a uid of its own: a process that calls setsid() escapes")
    mark = marker()
    code = "import os, time\nos.setsid()\nwhile True: time.sleep(0.01)\n"
    source = (
        "import importlib, os, sys\n"
        "os = importlib.reload(os)  # undoes the guard's os.fork = None\n"
        f"if os.fork() == 0:\n    os.execv(sys.executable, [sys.executable, '-c', {code!r}, {mark!r}])\n"
        "while True: pass\n"
    )
    result, took = run(source, timeout_s=SHORT)
    assert result.status == "timed out" and took < SHORT + MARGIN, result
    assert_nothing_left(mark)


def test_fork_bomb_is_contained_and_killed():
    # The guarded program brings os.fork back (the guard is no boundary), starts four children that
    # become unguarded, marked interpreters forking without end; RLIMIT_NPROC caps them.
    mark = marker()
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    source = (
        "import importlib, os, sys\n"
        "os = importlib.reload(os)\n"
        "for _ in range(4):\n"
        f"    if os.fork() == 0:\n        os.execv(sys.executable, [sys.executable, '-c', {bomb!r}, {mark!r}])\n"
        f"exec({bomb!r})\n"
    )
    result, took = run(source, timeout_s=SHORT)
    assert result.status == "timed out" and took < SHORT + MARGIN, result
    assert_nothing_left(mark)
    assert_sandbox_still_works()


def test_the_process_limit_holds_through_a_guard_bypass():
    # posix.fork is the guard-free fork; the children become marked sleepers. Without the limit
    # (a root program, which the kernel exempts) all 200 forks succeed and the program passes.
    mark = marker()
    source = (
        "import posix, sys\n"
        "forks = 0\n"
        "for _ in range(200):\n"
        "    try:\n"
        "        pid = posix.fork()\n"
        "    except OSError:\n"
        "        break\n"
        "    if pid == 0:\n"
        f"        posix.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', {mark!r}])\n"
        "    forks += 1\n"
        "assert forks == 200, f'the process limit stopped fork number {forks + 1}'\n"
    )
    result, _ = run(source, max_processes=8)
    assert result.status == "failed" and "the process limit stopped fork number" in result.detail, result
    assert int(result.detail.rsplit(" ", 1)[1]) <= 8
    assert_nothing_left(mark)  # the sleepers end with the program, not after 60 s
    assert_sandbox_still_works()


@pytest.mark.parametrize(
    ("source", "memory_mb"),
    [
        ("data = bytearray(4 << 30)\n", 1024),  # the default limit
        ("chunks = []\nwhile True:\n    chunks.append(bytearray(64 << 20))\n", 512),  # (touching 1 GiB is slow)
    ],
    ids=["4 GiB at once", "growing"],
)
def test_memory_hog_fails_with_memory_error(source, memory_mb):
    result, _ = run(source, memory_mb=memory_mb)
    assert result.status == "failed" and "MemoryError" in result.detail, result
    assert_sandbox_still_works()


def test_cpu_limit_kills_with_a_named_signal():
    result, _ = run("while True:\n    pass\n", cpu_s=1, timeout_s=10.0)  # (one CPU second may take longer)
    assert result.status == "failed" and result.detail == "killed by SIGXCPU (the CPU time limit)", result


def test_writing_outside_its_folder_fails():
    # /etc; and a folder of this process's that others may enter but not write (mode 0755): a
    # program of this uid would write there. It lies in /tmp, which with a mount namespace is the
    # program's own empty tmpfs (FileNotFoundError); else the program's own uid keeps it out. With
    # a mount namespace, /etc is on a read-only mount, whoever the caller.
    outside = Path(tempfile.mkdtemp(prefix="santacpu-sandbox-test-"))
    try:
        outside.chmod(0o755)
        targets = [Path("/etc") / f"{marker()}.txt"]
        if isolation()["separate_user"] or isolation()["mount_namespace"]:
            targets.append(outside / "escaped.txt")
        read_only = isolation()["mount_namespace"]
        for target, error in zip(targets, ("OSError: [Errno 30] Read-only" if read_only else "PermissionError",
                                           "FileNotFoundError" if read_only else "PermissionError")):
            result, _ = run(f"open({str(target)!r}, 'w').write('escaped')\n")
            assert not target.exists(), f"the program wrote {target}"
            assert result.status == "failed", result
            assert result.detail.startswith(error), result
    finally:
        for child in outside.iterdir():
            child.unlink()
        outside.rmdir()
    # The program's own folder is writable (so the failures above are about where, not whether).
    result, _ = run("open('mine.txt', 'w').write('ok')\nassert open('mine.txt').read() == 'ok'\n")
    assert result.passed, result


def test_writes_are_bounded_in_total():
    if not isolation()["mount_namespace"]:
        pytest.skip("no mount namespace on this machine: only each file's size is bounded")
    source = "for n in range(64):\n    open(f'part{n}', 'wb').write(bytes(1 << 20))\n"
    result, _ = run(source, file_size_mb=16)
    assert result.status == "failed" and "No space left on device" in result.detail, result


def test_the_parent_environment_is_not_visible(monkeypatch):
    secret = uuid.uuid4().hex
    monkeypatch.setenv("SANTACPU_SANDBOX_TEST_SECRET", secret)
    layers = isolation()
    # Other processes' environments, through /proc: hidden by a PID namespace (its own /proc) or
    # a uid of its own (no right to read them); a plain non-root run could read this process's.
    paths = [f"/proc/{os.getpid()}/environ", f"/proc/{os.getppid()}/environ", "/proc/1/environ"]
    paths = paths if layers["pid_namespace"] or layers["separate_user"] else []

    def program(environment: str) -> str:
        return (
            "import os\n"
            "assert os.environ['HOME'] == os.getcwd(), os.environ  # the sandbox's own environment\n"
            f"assert {secret!r} not in repr({environment}), 'the secret is in the environment'\n"
            f"for path in {paths!r}:\n"
            "    try:\n"
            "        data = open(path, 'rb').read()\n"
            "    except OSError:\n"
            "        continue\n"
            f"    assert {secret.encode()!r} not in data, 'the secret is in ' + path\n"
        )

    result, _ = run(program("dict(os.environ)"))
    assert result.passed, result
    # The check can fail: the same program, given an environment with the secret in it.
    result, _ = run(program(f"dict(os.environ, SECRET={secret!r})"))
    assert (result.status, result.detail) == ("failed", "AssertionError: the secret is in the environment")


def test_no_network():
    if not isolation()["network_namespace"]:
        pytest.skip("no network namespace on this machine: the sandbox cannot keep programs off the network")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        server.setblocking(False)
        port = server.getsockname()[1]
        source = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'hello')\n"
        result, _ = run(source)
        assert result.status == "failed" and "OSError" in result.detail, result
        with pytest.raises(BlockingIOError):
            server.accept()
        # From this process, the same connection works: the server was listening.
        server.settimeout(10)  # (the handshake may finish after connect returns)
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            server.accept()[0].close()


def test_killing_the_parent_or_the_test_process_fails():
    layers = isolation()
    if not (layers["pid_namespace"] or layers["separate_user"]):
        pytest.skip("neither a PID namespace nor a uid of its own: the program could kill this process")
    source = (
        "import os, posix, signal, time\n"
        "try:\n"
        "    os.kill(os.getppid(), 9)\n"
        "except TypeError:\n"
        "    pass  # the guard's os.kill = None\n"
        f"for pid in (os.getppid(), {os.getpid()}, 1):\n"
        "    try:\n"
        "        posix.kill(pid, signal.SIGKILL)\n"
        "    except OSError:\n"
        "        pass\n"
        "time.sleep(0.2)\n"
        "raise SystemExit('survived')\n"
    )
    result, _ = run(source)
    # The program ran to its end (its supervisor was not killed either), and this test is alive.
    assert result.status == "failed" and result.detail == "survived", result
    assert_sandbox_still_works()


def test_the_program_sees_the_layers_that_isolation_reports():
    layers = isolation()
    checks = ["import os, socket\n"]
    if layers["pid_namespace"]:  # alone with its supervisor, PID 1
        checks.append("assert os.getppid() == 1 and sorted(p for p in os.listdir('/proc') if p.isdigit()) == "
                      "sorted(['1', str(os.getpid())]), os.listdir('/proc')\n")
    if layers["network_namespace"]:
        checks.append("assert [name for _, name in socket.if_nameindex()] == ['lo'], socket.if_nameindex()\n")
    if layers["mount_namespace"]:
        # An empty /tmp, but for the program's folder and this interpreter's (a venv in /tmp is
        # bound back in, so that the program can run; nothing else of the folder around it).
        kept = sorted({
            os.path.realpath(p).split("/")[2]
            for p in (sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix)
            if os.path.realpath(p).startswith("/tmp/")
        })
        checks.append(f"assert set(os.listdir('/tmp')) <= {{os.path.basename(os.getcwd()), *{kept!r}}}, os.listdir('/tmp')\n")
        checks.append("assert os.listdir('/run') == [], os.listdir('/run')  # (the caller's sockets and locks)\n")
        checks.append("assert sorted(os.listdir('/dev')) == ['fd', 'full', 'null', 'random', 'shm', 'stderr', 'stdin', "
                      "'stdout', 'tty', 'urandom', 'zero'], os.listdir('/dev')\n"
                      "assert open('/dev/zero', 'rb').read(4) == bytes(4) and len(open('/dev/urandom', 'rb').read(8)) == 8\n"
                      "open('/dev/null', 'w').write('x')\n")
    if layers["separate_user"]:
        checks.append("assert os.getuid() >= 2**30 and os.getgid() == os.getuid() and os.getgroups() == []\n")
    result, _ = run("".join(checks))
    assert result.passed, result


def test_without_mount_setattr_every_mount_a_path_reaches_is_read_only(monkeypatch):
    # Kernels before 5.12 have no mount_setattr: the supervisor remounts each mount point instead,
    # passing over those a later mount covers (the host's /proc/sys/fs/binfmt_misc under the new
    # /proc, where a remount by path fails). Here mount_setattr's number is made unknown (ENOSYS).
    if not isolation()["mount_namespace"]:
        pytest.skip("no mount namespace on this machine")
    from santacpu.harness import sandbox

    boot = sandbox._BOOT.replace("SYS_MOUNT_SETATTR, AT_FDCWD, AT_RECURSIVE = 442", "SYS_MOUNT_SETATTR, AT_FDCWD, AT_RECURSIVE = 10442")
    assert boot != sandbox._BOOT
    monkeypatch.setattr(sandbox, "_BOOT", boot)
    monkeypatch.setattr(sandbox, "_MODE", None)
    assert isolation()["mount_namespace"]
    target = Path("/etc") / f"{marker()}.txt"  # (the repository may lie below /tmp, which is covered)
    source = (
        "import ctypes, os\n"
        "assert ctypes.CDLL(None, use_errno=True).umount2(b'/tmp', 2) != 0, 'unmounted /tmp'\n"
        "for path in ('/tmp/x', '/var/tmp/x', '/dev/shm/x', 'mine.txt'):\n"
        "    open(path, 'w').write('mine')\n"
        "st = os.statvfs('/usr/bin')\n"
        "assert st.f_flag & os.ST_RDONLY and st.f_flag & os.ST_NOSUID, st.f_flag\n"
        f"open({str(target)!r}, 'w').write('escaped')\n"
    )
    result, _ = run(source)
    assert not target.exists(), f"the program wrote {target}"
    assert result.status == "failed" and result.detail.startswith("OSError: [Errno 30] Read-only file system"), result


def test_the_syscall_filter_refuses_what_it_names():
    if not isolation()["syscall_filter"]:
        pytest.skip("no syscall filter for this machine's syscall numbers")
    held_path = os.path.realpath(sys.executable)  # (a file every program can read)
    source = (
        "import ctypes, os, socket, threading\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "def refused(number, *arguments):\n"
        "    assert libc.syscall(number, *arguments) == -1, number\n"
        "    return ctypes.get_errno()\n"
        "machine = os.uname().machine\n"
        "io_uring_setup, getpid = 425, {'x86_64': 39, 'aarch64': 172}[machine]\n"
        "assert refused(io_uring_setup, 1, ctypes.create_string_buffer(120)) == 1  # EPERM\n"
        "if machine == 'x86_64':\n"
        "    assert refused(0x40000000 | getpid) == 1  # the x32 ABI\n"
        "assert refused(435, None, 0) == 38  # clone3: ENOSYS, so that the C library falls back to clone\n"
        "add_key, request_key, keyctl, memfd_create = {'x86_64': (248, 249, 250, 319), 'aarch64': (217, 218, 219, 279)}[machine]\n"
        "assert refused(keyctl, 0, -3, 0) == 1  # KEYCTL_GET_KEYRING_ID of the session keyring\n"
        "assert refused(add_key, b'user', b'x', b'secret', 6, -3) == 1\n"
        "assert refused(request_key, b'user', b'x', None, 0) == 1\n"
        "assert refused(memfd_create, b'x', 0) == 1 and refused(447, 0) == 1  # memfd_secret\n"
        "shmget, msgget, semget = {'x86_64': (29, 68, 64), 'aarch64': (194, 186, 190)}[machine]\n"
        "assert refused(shmget, 0, 1 << 20, 0o1000 | 0o600) == refused(msgget, 0, 0o1000 | 0o600) == 1\n"
        "assert refused(semget, 0, 1, 0o1000 | 0o600) == 1\n"
        "for family in (socket.AF_UNIX, 38, 40, 17):  # Unix, kernel crypto (AF_ALG), vsock, AF_PACKET\n"
        "    try:\n"
        "        socket.socket(family, socket.SOCK_STREAM if family != 17 else socket.SOCK_RAW).close()\n"
        "        raise AssertionError(f'a socket of family {family}')\n"
        "    except PermissionError:\n"
        "        pass\n"
        "socket.socketpair()[0].close()  # a pair of its own (AF_UNIX) is allowed; socket(AF_UNIX) is not\n"
        "socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)[0].close()\n"
        "for kind in (socket.SOCK_DGRAM, socket.SOCK_RAW, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK):\n"
        "    try:  # (a datagram pair sends to any datagram socket path it reaches)\n"
        "        socket.socketpair(socket.AF_UNIX, kind)\n"
        "        raise AssertionError(f'a socket pair of type {kind}')\n"
        "    except PermissionError:\n"
        "        pass\n"
        "import multiprocessing.connection\n"
        "left, right = multiprocessing.connection.Pipe()  # (a stream pair)\n"
        "left.send('x')\n"
        "assert right.recv() == 'x'\n"
        "socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).close()\n"
        "socket.socket(socket.AF_NETLINK, socket.SOCK_RAW).close()  # NETLINK_ROUTE: the C library's interface listing\n"
        "assert [name for _, name in socket.if_nameindex()][:1] == ['lo']\n"
        "for protocol in (15, 4, 16):  # the host's device events (KOBJECT_UEVENT), SOCK_DIAG, GENERIC\n"
        "    try:\n"
        "        socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol)\n"
        "        raise AssertionError(f'a netlink socket of protocol {protocol}')\n"
        "    except PermissionError:\n"
        "        pass\n"
        "thread = threading.Thread(target=print)\n"
        "thread.start()\n"
        "thread.join()\n"
        # Locks succeed without effect (the test holds this file's lock meanwhile); pipe pages
        # (counted against the caller's uid) and leases are refused; queued signals are bounded.
        "import fcntl, resource\n"
        f"fcntl.flock(open({held_path!r}, 'rb'), fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
        "fcntl.lockf(open('/tmp/x', 'w'), fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
        "r, w = os.pipe()\n"
        "for command in (1031, 1024):  # F_SETPIPE_SZ, F_SETLEASE\n"
        "    try:\n"
        f"        fcntl.fcntl(w if command == 1031 else open({held_path!r}), command, 1 << 20 if command == 1031 else 0)\n"
        "        raise AssertionError(f'fcntl command {command}')\n"
        "    except PermissionError:\n"
        "        pass\n"
        "assert fcntl.fcntl(w, fcntl.F_GETFL) >= 0\n"
        "assert resource.getrlimit(resource.RLIMIT_SIGPENDING) == (64, 64)\n"
    )
    import fcntl

    with open(held_path, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        result, _ = run(source)
    assert result.passed, result


def test_the_caller_s_system_v_memory_is_out_of_reach():
    # System V shared memory lives in the IPC namespace: a program sharing the caller's could read
    # and write a non-root caller's segments, and leave its own behind, outside every limit.
    if not isolation()["mount_namespace"]:
        pytest.skip("no namespaces on this machine")
    libc = ctypes.CDLL(None, use_errno=True)
    key = 0x5A17C000 + os.getpid() % 4096
    segment = libc.shmget(key, 4096, 0o1000 | 0o666)  # IPC_CREAT
    assert segment >= 0, os.strerror(ctypes.get_errno())
    try:
        assert str(key) in Path("/proc/sysvipc/shm").read_text().split()
        source = (  # (the syscall filter, where there is one, refuses shmget itself)
            f"keys = [line.split()[0] for line in open('/proc/sysvipc/shm').read().splitlines()[1:]]\n"
            f"assert {str(key)!r} not in keys, 'the caller\\'s segment'\n"
        )
        result, _ = run(source)
        assert result.passed, result
    finally:
        libc.shmctl(segment, 0, None)  # IPC_RMID


def test_the_caller_s_session_keyring_is_out_of_reach():
    # A process possesses its session keyring's keys whatever its uid: the program gets a fresh
    # one, the filter refuses the keyring calls, and /proc/keys (which lists the keys of the
    # program's uid: the caller's, for a caller that is not root) is empty.
    if not isolation()["syscall_filter"]:
        pytest.skip("no syscall filter for this machine's syscall numbers")
    keyctl, add_key = {"x86_64": (250, 248), "aarch64": (219, 217)}[os.uname().machine]
    name = marker()
    program = f"assert {name!r} not in open('/proc/keys').read(), 'the caller key'\nassert open('/proc/keys').read() == ''\n"
    child = (
        "import ctypes, sys\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        f"if libc.syscall({keyctl}, 1, None) < 0:  # join a session keyring of this child's own\n"
        "    print('no keyrings'); sys.exit(0)\n"
        f"assert libc.syscall({add_key}, b'user', {name!r}.encode(), b'secret', 6, -3) >= 0\n"
        f"assert {name!r} in open('/proc/keys').read()\n"
        "from santacpu.harness.sandbox import run_program\n"
        f"print(run_program({program!r}))\n"
    )
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    if done.stdout.strip() == "no keyrings":
        pytest.skip("this machine refuses kernel keyrings")
    assert done.stdout.strip() == "ExecutionResult(status='passed', detail='')", done.stdout


def test_stderr_cannot_take_the_caller_s_disk():
    # fallocate with FALLOC_FL_KEEP_SIZE passes RLIMIT_FSIZE by on ext4: stderr lies on a small tmpfs.
    if not isolation()["mount_namespace"]:
        pytest.skip("no namespaces on this machine")
    source = (
        "import ctypes\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "assert libc.fallocate(2, 1, ctypes.c_long(0), ctypes.c_long(1 << 30)) == -1, 'took 1 GiB'\n"
        "assert ctypes.get_errno() in (27, 28), ctypes.get_errno()  # EFBIG or ENOSPC\n"
    )
    result, _ = run(source)
    assert result.passed, result


@pytest.mark.parametrize(
    "source",
    [
        "import os\nos._exit(0)\nassert False\n",
        "(_ for _ in ()).throw(SystemExit)\nassert False\n",
        "import sys\nsys.exit(256)\n",  # (a status of 0 modulo 256)
        "import atexit, os\natexit.register(os._exit, 0)\nassert False\n",
        "import os, sys\nsys.excepthook = lambda *_: os._exit(0)\nassert False\n",
        "import os, threading, time\nthreading.Thread(target=lambda: (time.sleep(0.1), os._exit(0))).start()\n"
        "time.sleep(5)\n",
    ],
    ids=["os._exit(0)", "SystemExit thrown", "exit(256)", "exit handler", "excepthook", "a thread's os._exit"],
)
def test_an_exit_on_the_way_is_not_a_pass(source):
    # As in the reference harness, only a program that runs to its end passes: wrong completions
    # must not pass by ending the process with status 0 before (or after) their tests fail.
    result, _ = run(source)
    assert result.status == "failed", result
    assert result.detail.startswith(("exit", "AssertionError")), result


def test_a_program_that_closes_descriptors_it_did_not_open():
    # Closing every descriptor up to the limit (as daemon-style code does) leaves the harness's pipe
    # alone; closing each one there is fails the run, and says why.
    result, _ = run("import os, resource\nos.closerange(3, resource.getrlimit(resource.RLIMIT_NOFILE)[1])\n"
                    "assert sum(range(4)) == 6\n")
    assert result.passed, result
    # Also where the caller's soft limit is low (`ulimit -S -n 256`); and the pipe is no program's
    # to hand on (close-on-exec).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, soft), hard))
    try:
        result, _ = run("import os\nos.closerange(3, os.sysconf('SC_OPEN_MAX'))\n")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert result.passed, result
    # A hard limit below 1024 (`ulimit -n 256`): the pipe as high as it allows, still out of reach.
    script = ("import resource, sys\nresource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))\n"
              "from santacpu.harness.sandbox import run_program\n"
              "print(run_program(\"import os\\nos.closerange(3, os.sysconf('SC_OPEN_MAX'))\\n\").status)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "passed", done.stdout + done.stderr
    result, _ = run("import os\nassert not [f for f in range(3, 1024) if os.path.exists(f'/proc/self/fd/{f}') "
                    "and os.get_inheritable(f)]\n")
    assert result.passed, result
    result, _ = run("import os\nfor fd in os.listdir('/proc/self/fd')[3:]:\n    try: os.close(int(fd))\n"
                    "    except OSError: pass\n")
    assert result.status == "failed" and "closed the harness's descriptor" in result.detail, result


# ---------------------------------------------------------------------------------------------
# Ordinary programs

HUMANEVAL_STYLE = '''from typing import List


def has_close_elements(numbers: List[float], threshold: float) -> bool:
    """ Check if in given list of numbers, are any two numbers closer to each other than
    given threshold.
    """
    for idx, elem in enumerate(numbers):
        for idx2, elem2 in enumerate(numbers):
            if idx != idx2:
                distance = abs(elem - elem2)
                if distance < threshold:
                    return True

    return False



METADATA = {"author": "jt", "dataset": "test"}


def check(candidate):
    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True
    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.05) == False
    assert candidate([1.0, 2.0, 5.9, 4.0, 5.0], 0.95) == True
    assert candidate([1.1, 2.2, 3.1, 4.1, 5.1], 1.0) == True

check(has_close_elements)
'''


@pytest.mark.parametrize(
    ("source", "status", "detail"),
    [
        (HUMANEVAL_STYLE, "passed", ""),
        (HUMANEVAL_STYLE.replace("distance < threshold", "distance > threshold"), "failed", "AssertionError"),
        ("def f(:\n    pass\n", "failed", "SyntaxError: invalid syntax"),
        ("print(undefined_name)\n", "failed", "NameError: name 'undefined_name' is not defined"),
        ("import sys\nsys.exit(3)\n", "failed", "exit 3"),
        ("import sys\nsys.exit(0)\n", "failed", "exit 0 before the program's end"),
        ("for i in range(300_000):\n    print(i, 'x' * 50)\n", "passed", ""),
        ("import sys\nsys.stderr.write('noise\\n' * 200_000)\nraise ValueError('the last line')\n",
         "failed", "ValueError: the last line"),
        ("raise RuntimeError('x' * 1000)\n", "failed", "RuntimeError: " + "x" * 183 + "..."),
        ("import math, re, json, collections, itertools, functools, heapq\nassert math.gcd(12, 18) == 6\n",
         "passed", ""),
        ("import sys\nsys.setrecursionlimit(5000)\n"
         "def depth(n):\n    return 0 if n == 0 else 1 + depth(n - 1)\nassert depth(3000) == 3000\n", "passed", ""),
        ("import threading\nt = threading.Thread(target=lambda: None)\nt.start()\nt.join()\n", "passed", ""),
        ("import numpy as np\nimport os\nos.environ['X'] = '1'\nassert int(np.arange(10).sum()) == 45\n", "passed", ""),
        ("import os\nos.remove('program.py')\n", "failed", "TypeError: 'NoneType' object is not callable"),
        ("for place in ('/dev/stderr', '/dev/null', '/tmp/x', '/var/tmp/x', '/dev/shm/x', 'mine.txt'):\n"
         "    with open(place, 'a') as file:\n        file.write('written\\n')\n"
         "raise ValueError(open('/tmp/x').read().strip())\n", "failed", "ValueError: written"),
    ],
    ids=["humaneval passes", "assertion", "syntax error", "name error", "exit 3", "exit 0", "lots of output",
         "lots of stderr", "long line trimmed", "stdlib imports", "recursion", "a thread", "numpy", "the guard",
         "its own places written"],
)
def test_ordinary_programs(source, status, detail):
    result, _ = run(source)
    assert (result.status, result.detail) == (status, detail)
    assert result.passed == (status == "passed")


def test_a_sandbox_that_cannot_start_the_program_says_so():
    # With RLIMIT_NOFILE at 3 (stdin, stdout, stderr), the sandbox cannot open the program's file.
    result, _ = run("pass\n", open_files=3)
    assert result.status == "failed", result
    assert result.detail.startswith("sandbox: could not start the program:") and "Too many open files" in result.detail


def test_the_program_runs_as_a_script_with_true_line_numbers():
    source = (
        "from __future__ import annotations\n"
        "import sys, traceback\n"
        "from dataclasses import dataclass\n"
        "assert __name__ == '__main__' and sys.modules['__main__'].__dict__ is globals()\n"
        "@dataclass\n"
        "class Point:\n"
        "    x: int\n"
        "assert Point(1) == Point(1)\n"
        "try:\n"
        "    1 / 0\n"
        "except ZeroDivisionError as error:\n"
        "    frame = traceback.extract_tb(error.__traceback__)[-1]\n"
        "    assert (frame.lineno, frame.line) == (10, '1 / 0'), frame\n"
    )
    result, _ = run(source)
    assert result.passed, result


def test_eight_programs_at_once():
    cases = [
        ("pass\n", "passed"),
        (HUMANEVAL_STYLE, "passed"),
        ("assert False\n", "failed"),
        ("import time\ntime.sleep(0.3)\n", "passed"),
        ("while True:\n    pass\n", "timed out"),
        ("import sys\nsys.exit(1)\n", "failed"),
        ("import time\ntime.sleep(30)\n", "timed out"),
        ("print(sum(range(10**6)))\n", "passed"),
    ]
    limits = SandboxLimits(timeout_s=2.5)  # two cores start eight interpreters at once
    start = time.monotonic()
    with ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(lambda case: run_program(case[0], limits), cases))
    assert [r.status for r in results] == [status for _, status in cases], results
    assert time.monotonic() - start < limits.timeout_s + MARGIN + 2


# ---------------------------------------------------------------------------------------------
# What the mount namespace covers


def test_the_home_folders_hidden_are_the_caller_s_wherever_they_lie(monkeypatch):
    from santacpu.harness import sandbox

    def homes(home: str) -> list[str]:
        monkeypatch.setenv("HOME", home)
        monkeypatch.setattr(sandbox.pwd, "getpwuid", lambda uid: (_ for _ in ()).throw(KeyError(uid)))
        return sandbox._homes()

    assert homes("/var/lib/jenkins") == ["/var/lib/jenkins"]  # a service account's
    assert homes("/opt/builder") == ["/opt/builder"]
    for system in ("/", "/usr", "/var", "/usr/lib", "/usr/lib/python3", "/etc/skel"):
        assert homes(system) == [], system


def test_the_interpreter_is_brought_back_where_sys_path_names_it(monkeypatch, tmp_path):
    # A home that is a link (/home/u -> /srv/u) with the Python in it: hiding /home hid the path
    # that sys.path uses, and every namespace mode's trial run failed (the sandbox fell back to none).
    from santacpu.harness import sandbox

    real_home, links = tmp_path / "srv" / "u", tmp_path / "home"
    (real_home / "venv").mkdir(parents=True)
    links.mkdir()
    (links / "u").symlink_to(real_home)
    prefix = str(links / "u" / "venv")
    monkeypatch.setattr(sandbox, "_SHARED_TEMP", ())  # (tmp_path lies below /tmp, else covered whole)
    monkeypatch.setattr(sandbox, "_HIDDEN", (str(links),))
    monkeypatch.setenv("HOME", str(links / "u"))
    for name in ("prefix", "exec_prefix", "base_prefix", "base_exec_prefix"):
        monkeypatch.setattr(sys, name, prefix)
    sandbox._covers.cache_clear()
    try:
        hide, keep = sandbox._covers(sandbox._Mode(True, True, False, True, None))
    finally:
        sandbox._covers.cache_clear()
    assert {path for path, _, _ in hide} >= {str(links), str(real_home)}
    assert keep == sorted([prefix, str(real_home / "venv")])


def test_a_killed_runs_memory_cgroups_are_removed_by_the_next_process():
    # A run killed (or interrupted past its cleanup) left its cgroups for good: 9 from one session.
    import os

    from santacpu.harness import memory_cgroup

    parent = memory_cgroup.parent()
    if parent is None:
        pytest.skip("this machine lets this process make no memory cgroup")
    dead = next(pid for pid in range(4_000_000, 4_100_000) if not os.path.exists(f"/proc/{pid}"))
    abandoned = os.path.join(parent, f"santacpu-sandbox-{dead}-0123456789abcdef")
    live = os.path.join(parent, f"santacpu-sandbox-{os.getppid()}-0123456789abcdef")  # (a live process's: kept)
    for path in (abandoned, live):
        os.mkdir(path)
    try:
        memory_cgroup._remove_abandoned.cache_clear()
        made = memory_cgroup.create(parent, 64 << 20)
        memory_cgroup.remove(made)
        assert not os.path.exists(abandoned) and os.path.exists(live)
    finally:
        for path in (abandoned, live):
            if os.path.exists(path):
                os.rmdir(path)
