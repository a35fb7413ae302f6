"""Writing a file so that readers never see part of it: a hidden temporary file in the target's
folder (`.NAME.HOST-PID-XXXXXXXX.partial`: a hash of the host name, the writer's process id, a
random part), renamed over the target only once complete.

Every writer of santacpu's output files (quantized models, `--json` reports) goes through here,
so each gets the same guarantees: on any failure or interruption (an exception, Ctrl-C, or the
CLI's SIGTERM handler) the temporary file is removed; the file gets the usual mode for new
files (0666 less the umask, not mkstemp's 0600); it is on disk (fsync) before it takes the name;
and a failing write (no permission, read-only file system, disk full) is a one-line `WriteError`.
A writer killed outright (SIGKILL, a power cut) cannot remove its file: the next write of the
same target does, with a warning, once no process writes it. The writer holds a lock (flock) on
its file while it writes, which the kernel drops when the process dies: a locked file is a live
writer's, whichever PID namespace (container) it runs in. An unlocked one is judged by the
process named in its name, on this host: gone, or this very process (a container's every run is
process 1), is a dead writer's; alive, a live one's (a writer without a lock: out of descriptors,
a file system without locks); a partial file that cannot be judged (another host's, or one named
before process ids were) is named in a warning and left. A target that exists as anything
but a regular file (a symbolic link, a device, a FIFO, a folder) is refused; one that may not be
replaced (`overwrite=False`: no --force) is published by a hard link, which fails if the name
appeared meanwhile.
Temporary folders (`owned_temp_folder`) are named the same way, and a killed process's are removed
by the next one that makes such a folder. `make_folder` makes an output's folder, with the same
one-line errors.

May import: `santacpu.errors`, `santacpu.small_files` (what a file that is no regular file is),
`santacpu.paths`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import socket
import stat
import tempfile
import time
import warnings
import zlib
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from .errors import SantacpuWarning, WriteError, os_problem
from .small_files import kind_of
from .paths import user_path

_PARTIAL = re.compile(r"(?:(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-)?[a-z0-9_]{8}\.partial")  # after ".NAME."
_PARTIAL_FILE = re.compile(r"\.(?P<target>.+)\." + _PARTIAL.pattern)  # a whole partial file's name
# A partial file this young may be one whose writer has made it and not yet locked it.
_UNLOCKED_GRACE_S = 5.0


def input_at(out: str | os.PathLike, inputs) -> Path | None:
    """Which file a command reads `out` already is, or None: of `inputs` (paths; a folder stands
    for the files directly in it), the first that is the same file. Such a file is never an output,
    even with --force: replacing it would destroy what the command works from."""
    out = Path(out)
    if not out.exists():
        return None
    for given in inputs:
        path = user_path(given)
        for candidate in [path, *(path.iterdir() if path.is_dir() else [])]:
            try:
                if candidate.is_file() and os.path.samefile(candidate, out):
                    return candidate
            except OSError:
                continue
    return None


def check_writable(path: str | os.PathLike, what: str = "", overwrite: bool = True) -> None:
    """Fail now, before any long work, if `path` cannot be written as a new or replaced file (or,
    without `overwrite`, if it exists: "use --force to replace it")."""
    path = Path(path)
    label = f"{what} {path}".strip()
    writable_target(path, label)
    if not overwrite and os.path.lexists(path):
        raise WriteError(f"{label} already exists (use --force to replace it)")
    folder = path.parent
    if not folder.is_dir():
        raise WriteError(f"cannot write {label}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise WriteError(f"cannot write {label}: the folder {folder} is not writable")
    if overwrite and not _may_replace(path):
        raise WriteError(f"cannot replace {label}: it belongs to another user, in a folder where only a file's owner "
                         f"may replace it (sticky, as /tmp)")


def _may_replace(path: Path) -> bool:
    """Whether renaming over `path` is allowed: in a sticky folder (/tmp) only the file's owner,
    the folder's or root may replace a file."""
    try:
        folder, target = os.stat(path.parent), os.lstat(path)
    except OSError:  # nothing there: nothing to replace
        return True
    uid = os.geteuid()
    return not folder.st_mode & stat.S_ISVTX or uid in (0, target.st_uid, folder.st_uid)


def writable_target(path: str | os.PathLike, label: str = "") -> Path:
    """`path`, checked as a file a write may make or replace: a WriteError where it exists as
    anything but a regular file. Renaming the finished file over a device, a FIFO or a folder would
    replace the node itself (/dev/null for the whole machine, written as root); over a symbolic link,
    the link (/dev/stdout's, as root); and writing through a link would follow one another user
    planted in a shared folder such as /tmp."""
    path = Path(path)
    try:
        status = os.lstat(path)
    except OSError:  # nothing there yet (or nothing readable: writing says why)
        return path
    if stat.S_ISLNK(status.st_mode):
        raise WriteError(f"cannot write {label or path}: it is a symbolic link (give the path of a regular file)")
    if not stat.S_ISREG(status.st_mode):
        raise WriteError(f"cannot write {label or path}: it is {kind_of(status)}, not a regular file")
    return path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = True) -> Iterator[BinaryIO]:
    """`with atomic_output(path) as f: f.write(...)`: `path` appears, complete, when the block
    ends without an error; otherwise nothing is left behind. OSErrors raised inside the block are
    taken as write errors (the block's job is writing). Without `overwrite`, a file that appeared
    at `path` meanwhile is an error ("use --force"), never replaced."""
    path = writable_target(path)
    remove_stale_partials(path)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.{host_tag()}-{os.getpid()}-", suffix=".partial",
                                        dir=path.parent)
    except OSError as problem:
        raise WriteError(f"cannot write {path}: {os_problem(problem)}", problem.errno) from None
    held = _hold_lock(fd)  # (until the file has its name or is gone)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_name, 0o666 & ~_current_umask())
        if overwrite:
            writable_target(path)  # (what may have appeared there while the file was written)
            os.replace(tmp_name, path)
        else:
            _publish_new(tmp_name, path)
        _sync_folder(path.parent)
    except BaseException as problem:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        if isinstance(problem, OSError):
            raise WriteError(f"cannot write {path}: {os_problem(problem)}", problem.errno) from None
        raise
    finally:
        if held is not None:
            os.close(held)


def _hold_lock(fd: int) -> int | None:
    """A second descriptor of the open file `fd` holding an exclusive lock on it (closing the
    first keeps the lock), or None where the file system has no locks."""
    try:
        held = os.dup(fd)
    except OSError:  # (out of descriptors: the file is written unlocked, judged by its name then)
        return None
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(held)
        return None
    return held


def _sync_folder(folder: Path) -> None:
    """The folder's entries on disk (the new name), where the system allows it."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _publish_new(tmp_name: str, path: Path) -> None:
    """Give the finished file `tmp_name` the name `path`, which must still be free."""
    try:
        os.link(tmp_name, path)  # fails where `path` exists, whatever it is
    except FileExistsError:
        raise WriteError(f"{path} already exists (use --force to replace it)") from None
    except OSError:  # a file system without hard links: the name checked, then taken
        if os.path.lexists(path):
            raise WriteError(f"{path} already exists (use --force to replace it)") from None
        os.replace(tmp_name, path)
        return
    os.unlink(tmp_name)


def remove_stale_partials(path: str | os.PathLike) -> list[tuple[Path, int]]:
    """Remove the partial files of `path` whose writer is gone (killed before it could clean up);
    name in a warning those whose writer cannot be judged. Those of live writers stay. The removed
    files, each with its size in bytes."""
    path = Path(path)
    prefix = f".{path.name}."
    removed: list[tuple[Path, int]] = []
    try:
        names = [name for name in os.listdir(path.parent) if name.startswith(prefix)]
    except OSError:  # no folder, or not readable: writing says so
        return removed
    for name in names:
        found = _PARTIAL.fullmatch(name[len(prefix):])
        if found is None:
            continue  # not a partial file of this target (the name only starts like one)
        partial = path.parent / name
        gone = _writer_gone(partial, found["host"], found["pid"])
        if gone is None:
            warnings.warn(f"{partial} looks like a partial file left by an interrupted write of {path.name}; "
                          "delete it if nothing is writing that file now", SantacpuWarning, stacklevel=3)
        elif gone:
            with contextlib.suppress(OSError):  # (gone meanwhile, not ours to remove, a folder of that name)
                size = partial.stat().st_size
                os.unlink(partial)
                removed.append((partial, size))
                warnings.warn(f"removed {partial}, left by an earlier write of {path.name} whose process "
                              f"({found['pid']}) was killed", SantacpuWarning, stacklevel=3)
    return removed


@contextlib.contextmanager
def exclusive(lock_file: str | os.PathLike, on_wait: Callable[[], None]) -> Iterator[None]:
    """Hold an exclusive lock (flock) on `lock_file` while the block runs, then remove it; where
    another process holds it, call `on_wait` once and wait (its process ending frees it too). A
    waiter that gets the lock of a file its holder removed meanwhile takes the lock anew. No lock
    where the file cannot be made or the system has no locks."""
    lock_file = Path(lock_file)
    waited = False
    while True:
        try:
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o666)
        except OSError:
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not waited:
                on_wait()
                waited = True
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # (no locks here)
            os.close(fd)
            yield
            return
        try:
            current = os.stat(lock_file)
            mine = os.fstat(fd)
            if (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
                break
        except OSError:  # (removed by the holder that just let go: take it anew)
            pass
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_file)  # (still held: a waiter finds it gone, and makes its own)
        os.close(fd)


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[None]:
    """An exclusive lock on `folder` itself (flock) while the block runs: for reading, changing and
    writing back a file in it that other processes change too; no lock where the system has none."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def partial_target(name: str) -> str | None:
    """The name of the file that the partial file named `name` is being written as, or None where
    `name` is no partial file's name."""
    found = _PARTIAL_FILE.fullmatch(name)
    return found["target"] if found else None


def describe_partial(path: Path) -> str | None:
    """What the partial file at `path` is, in words (its writer live, gone, or not to be judged),
    or None where `path` is no partial file."""
    found = _PARTIAL_FILE.fullmatch(path.name)
    if found is None:
        return None
    gone = _writer_gone(path, found["host"], found["pid"])
    if gone is None:
        return "a partial file: still being written, or left by an interrupted write"
    if gone:
        return "a partial file left by an interrupted write"
    return f"a partial file, being written by process {found['pid']}"


def make_folder(folder: Path) -> None:
    """`folder` and the folders above it, made where missing; a one-line WriteError where it
    cannot be (a file in the way, no permission)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        if folder.is_symlink() and not folder.exists():
            raise WriteError(f"cannot use {folder} as a folder: it is a symbolic link that leads nowhere (or in a loop)") from None
        raise WriteError(f"cannot use {folder} as a folder: it (or a folder above it) is a file") from None
    except OSError as problem:
        raise WriteError(f"cannot make the folder {folder}: {os_problem(problem)}", problem.errno) from None


def owned_temp_folder(prefix: str, parent: str | os.PathLike | None = None) -> str:
    """A new folder in `parent` (default: the temporary directory) named with this host and process
    (`PREFIX-HOST-PID-XXXXXXXX`), made after `remove_abandoned_folders`."""
    base = os.fspath(parent) if parent is not None else tempfile.gettempdir()
    remove_abandoned_folders(prefix, base)
    return tempfile.mkdtemp(prefix=f"{prefix}-{host_tag()}-{os.getpid()}-", dir=base)


def remove_abandoned_folders(prefix: str, parent: str | os.PathLike | None = None) -> None:
    """Remove this user's `owned_temp_folder`s of `prefix` in `parent` (default: the temporary
    directory) whose process on this host is gone (killed outright before it could remove its own)."""
    base, mine = os.fspath(parent) if parent is not None else tempfile.gettempdir(), f"{prefix}-{host_tag()}-"
    try:
        names = [name for name in os.listdir(base) if name.startswith(mine)]
    except OSError:
        names = []
    for name in names:
        pid, path = name[len(mine):].split("-", 1)[0], os.path.join(base, name)
        try:
            status = os.lstat(path)
        except OSError:
            continue
        if process_gone(host_tag(), pid) and stat.S_ISDIR(status.st_mode) and status.st_uid == os.getuid():
            shutil.rmtree(path, ignore_errors=True)


def _writer_gone(partial: Path, host: str | None, pid: str | None) -> bool | None:
    """Whether the writer of the partial file `partial` (named with `host` and `pid`) is gone: by
    its lock, else by its process; None where neither can judge."""
    if pid is None:  # named before process ids were (and before locks): an older santacpu's
        return None
    locked = _locked(partial)
    if locked:
        return False
    gone = process_gone(host, pid)
    if locked is False and gone is False and int(pid) == os.getpid():
        # Unlocked, and named with this very process, which would hold its lock: a process of an
        # earlier run with the same id (every run is process 1 in a container). The grace: a file
        # this young may not be locked yet.
        with contextlib.suppress(OSError):
            return time.time() - partial.stat().st_mtime > _UNLOCKED_GRACE_S
    return gone  # (a writer alive under that id, unlocked: out of descriptors, or an older santacpu)


def _locked(path: Path) -> bool | None:
    """Whether a process holds a lock on the file at `path`; None where that cannot be found out
    (not readable, a file system without locks)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return None
    finally:
        os.close(fd)  # (and with it a lock it took)
    return False


def process_gone(host: str | None, pid: str | None) -> bool | None:
    """Whether the process named in a partial file's or a temporary folder's name is gone from
    this host: None where that cannot be judged (no process id, or another host's)."""
    if host != host_tag() or pid is None or not pid.isdigit():
        return None
    return not _process_exists(int(pid))


def host_tag() -> str:
    """This host, as 8 hex digits: a process id means something only on the host that ran it."""
    return f"{zlib.crc32(socket.gethostname().encode()):08x}"


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_text_atomically(path: str | os.PathLike, text: str, overwrite: bool = True) -> None:
    """Write `text` (UTF-8) to `path` through `atomic_output`."""
    with atomic_output(path, overwrite) as f:
        f.write(text.encode("utf-8"))


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
