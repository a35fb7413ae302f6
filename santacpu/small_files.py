"""Reading a model's small files (config.json, a shard index, tokenizer.json) and parsing JSON, so
that every way they can go wrong is one line (a `SantacpuError`), never a hang or a traceback.

A model folder is input like any other: a "small" file may be a symlink to /dev/zero, a FIFO, or
gigabytes long. `read_small_file` follows symlinks (the hub cache links every file of a snapshot
to its blob store) but reads only a regular file, opened without blocking (so a FIFO cannot hang
the open), and at most the limit given for that kind of file.

May import: `santacpu.errors`.
"""

from __future__ import annotations

import json
import os
import stat

from .errors import SantacpuError, os_problem

# Limits far above what real files need (SantaCoder's config.json is 1 KB, a shard index about
# 100 bytes a tensor, its tokenizer.json 2 MB), far below what would strain memory.
CONFIG_LIMIT = 1 << 20
INDEX_LIMIT = 32 << 20
TOKENIZER_LIMIT = 64 << 20

_KINDS = {stat.S_ISDIR: "a folder", stat.S_ISFIFO: "a FIFO", stat.S_ISCHR: "a device", stat.S_ISBLK: "a device",
          stat.S_ISSOCK: "a socket"}


def read_small_file(path: str | os.PathLike, what: str, limit: int) -> bytes:
    """The bytes of the regular file at `path` (symlinks followed), at most `limit` of them;
    `what` names the file in errors ("config.json")."""
    try:
        check_regular(os.stat(path), path, what, limit)  # before opening: opening a device can act
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SantacpuError(f"no {what} at {path}") from None
    except OSError as problem:
        raise SantacpuError(f"cannot read {what} {path}: {os_problem(problem)}") from None
    try:
        check_regular(os.fstat(fd), path, what, limit)  # what was opened, should the path have changed
        pieces, size = [], 0
        while size <= limit:
            piece = os.read(fd, limit + 1 - size)
            if not piece:
                break
            pieces.append(piece)
            size += len(piece)
    except OSError as problem:
        raise SantacpuError(f"cannot read {what} {path}: {os_problem(problem)}") from None
    finally:
        os.close(fd)
    if size > limit:  # grown since the check
        raise _too_large(path, what, limit)
    return b"".join(pieces)


def kind_of(status: os.stat_result) -> str:
    """What a file that is no regular file is, in words ("a device", "a FIFO", "a folder")."""
    return next((name for test, name in _KINDS.items() if test(status.st_mode)), "not a file")


def check_regular(status: os.stat_result, path, what: str, limit: int | None = None) -> None:
    """Refuse what `status` describes unless it is a regular file (of at most `limit` bytes)."""
    if not stat.S_ISREG(status.st_mode):
        raise SantacpuError(f"{what} {path} is {kind_of(status)}, not a regular file")
    if limit is not None and status.st_size > limit:
        raise _too_large(path, what, limit)


def _too_large(path, what: str, limit: int) -> SantacpuError:
    return SantacpuError(f"{what} {path} is larger than {limit >> 20} MiB, too large to be a {what}")


def read_small_text(path: str | os.PathLike, what: str, limit: int) -> str:
    """`read_small_file` decoded as UTF-8."""
    raw = read_small_file(path, what, limit)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as bad:
        raise SantacpuError(f"{what} {path} is not UTF-8 text (byte 0x{raw[bad.start]:02x} at offset {bad.start})") from None


def parse_json(text: str | bytes, what: str):
    """`text` parsed as JSON; `what` names it in errors ("config.json /path")."""
    try:
        return json.loads(text)
    except RecursionError:
        raise SantacpuError(f"{what} is corrupt (JSON nested deeper than santacpu reads)") from None
    except ValueError as bad:  # JSONDecodeError, and UnicodeDecodeError for bytes
        raise SantacpuError(f"{what} is corrupt (not valid JSON: {bad})") from None


def read_json_file(path: str | os.PathLike, what: str, limit: int):
    """A small JSON file (see `read_small_file`), parsed."""
    return parse_json(read_small_file(path, what, limit), f"{what} {path}")
