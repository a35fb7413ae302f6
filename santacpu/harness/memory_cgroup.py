"""A memory cgroup for each sandbox run, where this process may make one: all of a run's processes
together are held to one limit (v2 `memory.max`, v1 `memory.limit_in_bytes`, swap included where
the kernel accounts it), which per-process address-space limits cannot do.

`parent()` finds, once, the folder under which this process can create cgroups that have the
memory controller (below its own cgroup, v2 preferred, else v1); `create()` makes a run's cgroup
with its limit, the run's first process joins it (`join_file()`), and `remove()` ends whatever is
left in it, says whether the kernel killed anything for memory, and deletes it.

May import: the standard library.
"""

from __future__ import annotations

import functools
import os
import re
import secrets
import signal
import time

_PREFIX = "santacpu-sandbox-"
_NAMED = re.compile(re.escape(_PREFIX) + r"(?P<pid>\d+)-[0-9a-f]{16}")  # (made by process PID)
_REMOVE_TRIES = 200  # x 5 ms: processes killed at the end of a run take a moment to leave


@functools.cache
def parent() -> str | None:
    """The folder in which runs' cgroups are made, or None where none can be (no memory
    controller, or no right to make cgroups: the usual case for callers that are not root)."""
    for folder, version in _own_cgroups():
        if version == 2 and not _v2_memory_below(folder):
            continue
        try:
            trial = create(folder, 64 << 20)
        except OSError:
            continue
        remove(trial)
        return folder
    return None


def create(parent_folder: str, limit_bytes: int) -> str:
    """A new, empty cgroup below `parent_folder` whose processes share `limit_bytes` of memory
    (named with this process's id: the first `create` of a process removes those of processes that
    are gone, killed before they could remove their own, with whatever still runs in them)."""
    _remove_abandoned(parent_folder)
    path = os.path.join(parent_folder, f"{_PREFIX}{os.getpid()}-{secrets.token_hex(8)}")
    os.mkdir(path, 0o755)
    try:
        if os.path.exists(os.path.join(path, "memory.max")):  # v2
            _write(path, "memory.max", limit_bytes)
            _write(path, "memory.swap.max", 0, optional=True)
        else:
            _write(path, "memory.limit_in_bytes", limit_bytes)
            _write(path, "memory.memsw.limit_in_bytes", limit_bytes, optional=True)
    except OSError:
        os.rmdir(path)
        raise
    return path


@functools.cache
def _remove_abandoned(parent_folder: str) -> None:
    """Remove the cgroups below `parent_folder` made by processes that are gone (once a process)."""
    try:
        names = os.listdir(parent_folder)
    except OSError:
        return
    for name in names:
        found = _NAMED.fullmatch(name)
        if found is None or int(found["pid"]) == os.getpid():
            continue
        try:
            os.kill(int(found["pid"]), 0)
        except ProcessLookupError:
            remove(os.path.join(parent_folder, name))
        except (PermissionError, OverflowError):  # (another user's live process; a pid past the range)
            pass


def join_file(path: str) -> str:
    """The file a process writes "0" to in order to join the cgroup (v1 and v2 alike)."""
    return os.path.join(path, "cgroup.procs")


def remove(path: str) -> bool:
    """Kill what is left in the cgroup and delete it; whether the kernel killed a process of it
    for want of memory."""
    out_of_memory = _oom_kills(path) > 0
    for _ in range(_REMOVE_TRIES):
        for pid in _members(path):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            os.rmdir(path)
            return out_of_memory
        except FileNotFoundError:
            return out_of_memory
        except OSError:
            time.sleep(0.005)
    return out_of_memory  # (left behind: empty of processes soon, and small)


def _own_cgroups() -> list[tuple[str, int]]:
    """This process's cgroup folders that may hold a memory controller: (folder, version), v2 first."""
    try:
        with open("/proc/self/cgroup", encoding="utf-8") as file:
            lines = file.read().splitlines()
        with open("/proc/self/mountinfo", encoding="utf-8") as file:
            mounts = [line.split() for line in file]
    except OSError:
        return []
    found = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        version = 2 if controllers == "" else 1
        if version == 1 and "memory" not in controllers.split(","):
            continue
        for fields in mounts:
            tail = fields[fields.index("-") + 1 :]
            kind, options = tail[0], tail[2].split(",") if len(tail) > 2 else []
            if (version == 2 and kind == "cgroup2") or (version == 1 and kind == "cgroup" and "memory" in options):
                root, point = _unescape(fields[3]), _unescape(fields[4])
                relative = os.path.relpath(path, root)
                if not relative.startswith(".."):
                    found.append((os.path.normpath(os.path.join(point, relative)), version))
    return sorted(found, key=lambda entry: -entry[1])


def _v2_memory_below(folder: str) -> bool:
    """Whether cgroups made below `folder` get the memory controller (enabling it where allowed)."""
    try:
        with open(os.path.join(folder, "cgroup.subtree_control"), encoding="utf-8") as file:
            if "memory" in file.read().split():
                return True
        _write(folder, "cgroup.subtree_control", "+memory")
        return True
    except OSError:  # not ours to change, or (EBUSY) the folder holds processes itself
        return False


def _members(path: str) -> list[int]:
    try:
        with open(join_file(path), encoding="utf-8") as file:
            return [int(pid) for pid in file.read().split()]
    except OSError:
        return []


def _oom_kills(path: str) -> int:
    """How many processes of the cgroup the kernel killed for memory (v2 memory.events, v1
    memory.oom_control)."""
    for name in ("memory.events", "memory.oom_control"):
        try:
            with open(os.path.join(path, name), encoding="utf-8") as file:
                for line in file:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            continue
    return 0


def _write(folder: str, name: str, value, optional: bool = False) -> None:
    try:
        with open(os.path.join(folder, name), "w", encoding="utf-8") as file:
            file.write(str(value))
    except OSError:  # (optional: a file this kernel lacks, or swap it does not account)
        if not optional:
            raise


def _unescape(field: str) -> str:
    """A mountinfo path field: a space, tab, newline or backslash is written as an octal escape
    (\\040); every other character, non-ASCII included, as it is."""
    return re.sub(r"\\([0-7]{3})", lambda escape: chr(int(escape[1], 8)), field)
