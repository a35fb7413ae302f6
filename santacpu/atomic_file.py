"""Writing a file so that readers never see part of it: a hidden temporary file in the target's
folder (`.NAME.HOST-PID-XXXXXXXX.partial`: a hash of the host name, the writer's process id, a
random part), renamed over the target only once complete.

Every writer of santacpu's output files (quantized models, `--json` reports) goes through here,
so each gets the same guarantees: on any failure or interruption (an exception, Ctrl-C, or the
CLI's SIGTERM handler) the temporary file is removed; the file gets the usual mode for new
files (0666 less the umask, not mkstemp's 0600); and a failing write (no permission, read-only
file system, disk full) is a one-line `WriteError`. A writer killed outright (SIGKILL, a power
cut) cannot remove its file: the next write of the same target does, when the process named in
it is gone from this host, with a warning; a partial file it cannot judge (another host's, or one
named before process ids were) is named in a warning and left. A target that exists as anything
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
import os
import re
import shutil
import socket
import stat
import tempfile
import warnings
import zlib
from pathlib import Path
from typing import BinaryIO, Iterator

from .errors import SantacpuWarning, WriteError, os_problem
from .small_files import kind_of
from .paths import user_path

_PARTIAL = re.compile(r"(?:(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-)?[a-z0-9_]{8}\.partial")  # after ".NAME."
_PARTIAL_FILE = re.compile(r"\.(?P<target>.+)\." + _PARTIAL.pattern)  # a whole partial file's name


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
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.{_host_tag()}-{os.getpid()}-", suffix=".partial",
                                        dir=path.parent)
    except OSError as problem:
        raise WriteError(f"cannot write {path}: {os_problem(problem)}", problem.errno) from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.chmod(tmp_name, 0o666 & ~_current_umask())
        if overwrite:
            writable_target(path)  # (what may have appeared there while the file was written)
            os.replace(tmp_name, path)
        else:
            _publish_new(tmp_name, path)
    except BaseException as problem:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        if isinstance(problem, OSError):
            raise WriteError(f"cannot write {path}: {os_problem(problem)}", problem.errno) from None
        raise


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
        gone = _writer_gone(found["host"], found["pid"])
        if gone is None:
            warnings.warn(f"{partial} looks like a partial file left by an interrupted write of {path.name}; "
                          "delete it if nothing is writing that file now", SantacpuWarning, stacklevel=3)
        elif gone:
            with contextlib.suppress(FileNotFoundError, PermissionError):
                size = partial.stat().st_size
                os.unlink(partial)
                removed.append((partial, size))
                warnings.warn(f"removed {partial}, left by an earlier write of {path.name} whose process "
                              f"({found['pid']}) was killed", SantacpuWarning, stacklevel=3)
    return removed


def partial_target(name: str) -> str | None:
    """The name of the file that the partial file named `name` is being written as, or None where
    `name` is no partial file's name."""
    found = _PARTIAL_FILE.fullmatch(name)
    return found["target"] if found else None


def describe_partial(name: str) -> str | None:
    """What the partial file named `name` is, in words (its writer live, gone, or on another host),
    or None where `name` is no partial file's name."""
    found = _PARTIAL_FILE.fullmatch(name)
    if found is None:
        return None
    gone = _writer_gone(found["host"], found["pid"])
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
        raise WriteError(f"cannot use {folder} as a folder: it (or a folder above it) is a file") from None
    except OSError as problem:
        raise WriteError(f"cannot make the folder {folder}: {os_problem(problem)}", problem.errno) from None


def owned_temp_folder(prefix: str) -> str:
    """A new folder in the temporary directory named with this host and process
    (`PREFIX-HOST-PID-XXXXXXXX`), made after removing this user's folders of the same prefix whose
    process on this host is gone (killed outright before it could remove its own)."""
    base, mine = tempfile.gettempdir(), f"{prefix}-{_host_tag()}-"
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
        if _writer_gone(_host_tag(), pid) and stat.S_ISDIR(status.st_mode) and status.st_uid == os.getuid():
            shutil.rmtree(path, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{mine}{os.getpid()}-")


def _writer_gone(host: str | None, pid: str | None) -> bool | None:
    """Whether the process named in a partial file's or a temporary folder's name is gone: None where
    that cannot be judged (no process id, or another host's)."""
    if host != _host_tag() or pid is None or not pid.isdigit():
        return None
    return not _process_exists(int(pid))


def _host_tag() -> str:
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
