"""The results file of `santacpu eval`: JSON lines, a header naming the run, then one record per
problem, appended (and flushed to disk) as each problem finishes, so an interrupted run loses
nothing finished and `--resume` carries on where it stopped.

The header's run identity (benchmark, model fingerprint, samples, generation options, timeout)
must match to resume: results of another model or benchmark are refused, never mixed. A last line
cut short by a crash is dropped on resume (a header cut short leaves nothing to keep: the run
starts the file afresh; text that does not start as a header is no results file, and is never
written over); damage anywhere else, a record of the wrong shape, or a problem recorded twice
with different results (two runs writing one file) is an error naming the line. A new file is
created exclusively, and a run holds a lock (flock) on its file while it writes, so a second run
started on the same --out fails instead of mixing in; a file moved or deleted during the run is
an error at its next record, not a new file without a header.

May import: the standard library, `santacpu.errors`, `santacpu.paths` and `santacpu.atomic_file` (which
paths may be written).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from pathlib import Path

from ..atomic_file import writable_target
from ..errors import SantacpuError, WriteError, os_problem
from ..formats.quantized_file import is_quantized_file, names_quantized_file
from ..formats.safetensors_io import SafetensorsFile
from ..loading.checkpoint import checkpoint_files
from ..paths import user_path

FORMAT = "santacpu-eval/1"
IDENTITY = ("benchmark", "model", "samples", "options", "timeout_s")


def model_fingerprint(model: str, revision: str | None = None) -> dict:
    """What identifies a model in a results file: its name (and hub revision, when one is given),
    and for local files a digest of the names and whole contents of what is read to run it (their
    first MiB alone let weights changed past it pass for the same model; hashing reads ~1.5 GB/s, a
    second for a q8_0 file, once a run): a quantized file; a checkpoint's config, weight files and
    tokenizer (not other files in its folder, such as the results file itself); a weight file with
    the config and tokenizer beside it."""
    path = user_path(model)
    if path.is_dir() or (path.is_file() and not names_quantized_file(path)):
        folder = path if path.is_dir() else path.parent
        files = [p for p in checkpoint_files(folder) if path.is_dir() or p == path or not p.name.endswith(
            (".safetensors", ".bin", ".index.json"))]
        files += [p for p in [folder / "tokenizer.json"] if p.is_file()]
    else:
        files = [path] if path.is_file() else []
    digest = hashlib.sha256()
    for file in sorted(files, key=lambda p: p.name):
        skip = 0
        if is_quantized_file(file):  # its provenance (source folder, date) is not the model
            skip = _quantized_layout(file, digest)
        digest.update(f"{file.name}:{file.stat().st_size - skip}:".encode())
        with open(file, "rb") as f:
            f.seek(skip)
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
    found = {"name": path.name if files else model, "sha256": digest.hexdigest()[:16] if files else None}
    return {**found, "revision": revision} if revision is not None else found


def _quantized_layout(path: Path, digest) -> int:
    """Feed `digest` a quantized file's header less its provenance (so that the same weights made
    again, or from a copy of the checkpoint, are the same model); the header's length in bytes."""
    file = SafetensorsFile(path)
    described = {name: (file.dtype_name(name), file.shape(name)) for name in file.names()}
    kept = {key: value for key, value in file.metadata.items() if key != "provenance"}
    digest.update(json.dumps([kept, described], sort_keys=True).encode())
    return file.data_start


class ResultsFile:
    """Open with `open(path, header, resume)`; `records` are those already there (resumed); `append`
    adds one and syncs it to disk."""

    def __init__(self, path: Path, header: dict, records: list[dict] | None, replace: bool = False):
        self.path, self.header = path, header
        self.records = records or []
        self._written = records is not None  # a resumed file has its header already
        self._replace = replace  # an empty file, or one whose header was cut short: written over
        self._fd: int | None = None  # open, and locked, from the first record on
        self._node: tuple[int, int] | None = None  # (device, inode) of the file the run writes
        self._new = False  # no file was there when the run began

    def close(self) -> None:
        """Let go of the file (and its lock)."""
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    __del__ = close

    @property
    def finished(self) -> set[str]:
        return {r["task_id"] for r in self.records}

    @classmethod
    def open(cls, path: Path, header: dict, resume: bool) -> ResultsFile:
        """The results file at `path` for a run with `header`: a new one (written at its first record,
        so a run that fails before any leaves nothing), or, with `resume`, the one there, checked."""
        header = {"format": FORMAT, **header}
        try:
            writable_target(path, f"--out {path}")  # no link written through, no /dev/null taken as new
            existing = path.exists() and path.stat().st_size > 0
            if existing and not resume:
                raise SantacpuError(f"{path} exists: pass --resume to continue that run, or choose another --out")
            results = cls(path, header, None)
            results._new = not path.exists()  # (made exclusively at the first record)
            if not results._new:  # locked now: another run writing it is found before any work
                results._open()
            try:
                records = _read_for_resume(path, header) if existing else None
            except BaseException:
                results.close()
                raise
            results.records, results._written = records or [], records is not None
            results._replace = path.exists() and records is None
            return results
        except OSError as e:
            raise SantacpuError(f"cannot use the results file {path}: {os_problem(e)}") from None

    def _open(self) -> None:
        """Open the file for appending (made now, exclusively, if it is new) and lock it."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
                         | (os.O_EXCL if self._new else 0), 0o666)
        except FileExistsError:
            raise WriteError(f"the results file {self.path} was made by another run meanwhile: choose another --out, "
                             "or --resume once that run has ended") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise WriteError(f"another run is writing the results file {self.path}: choose another --out, or "
                             "--resume once that run has ended") from None
        except OSError:  # (a file system without locks)
            pass
        status = os.fstat(fd)
        self._fd, self._node = fd, (status.st_dev, status.st_ino)

    def _still_there(self) -> None:
        """Fail where the file the run writes is no longer at its path (moved or deleted)."""
        try:
            status = os.stat(self.path)
            there = (status.st_dev, status.st_ino) == self._node
        except OSError:
            there = False
        if not there:
            raise WriteError(f"the results file {self.path} was moved or deleted during the run (its "
                             f"{_problems(len(self.records))} went with it)")

    def append(self, record: dict) -> None:
        lines = [] if self._written else [self.header]
        data = "".join(json.dumps(line) + "\n" for line in [*lines, record]).encode("utf-8")
        made = self._fd is None and self._new
        try:
            if self._fd is None:
                self._open()
            else:
                self._still_there()
            fd = self._fd
            if not self._written and self._replace:
                os.ftruncate(fd, 0)  # (an empty file, or a header cut short)
            start = os.lseek(fd, 0, os.SEEK_END)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except OSError:  # (a full disk): the file back to its last whole record, or gone
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)
                    if made:
                        os.unlink(self.path)
                        self.close()
                raise
        except OSError as e:  # a full disk names no file: say which, and what is kept
            count = len(self.records)
            kept = f"its {_problems(count)} {'is' if count == 1 else 'are'} kept; --resume carries on" if self._written else \
                "nothing was kept"
            raise WriteError(f"cannot write the results file {self.path}: {os_problem(e)} ({kept})") from None
        self._written = True
        self.records.append(record)


def _read_for_resume(path: Path, header: dict) -> list[dict] | None:
    """The records of the results file at `path`, checked against this run's `header`; None where
    its header itself was cut short (nothing finished is in it)."""
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    complete, torn = lines[:-1], lines[-1]  # the text after the last newline was cut short
    if not complete:
        # A header cut short starts as every header does; anything else is someone's file.
        start = json.dumps({"format": FORMAT}).encode()[:-1]
        if not raw.startswith(start[: len(raw)]):
            raise SantacpuError(f"{path} is not a santacpu eval results file; choose another --out")
        return None
    try:
        found = json.loads(complete[0]) if complete else None
    except (ValueError, RecursionError):
        found = None
    if not isinstance(found, dict) or found.get("format") != FORMAT:
        raise SantacpuError(f"{path} is not a santacpu eval results file; choose another --out")
    for key in IDENTITY:
        if found.get(key) != header.get(key):
            raise SantacpuError(
                f"{path} holds another run's results ({key}: {json.dumps(found.get(key))}, this run: "
                f"{json.dumps(header.get(key))}); choose another --out"
            )
    records, seen = [], {}
    for number, line in enumerate(complete[1:], start=2):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            record = None
        problem = _record_problem(record, header["samples"])
        if problem is None and record["task_id"] in seen and seen[record["task_id"]] != record:
            problem = f"{record['task_id']} was recorded before, with other results (two runs writing this file?)"
        if problem:
            raise SantacpuError(f"{path} is damaged at line {number} ({problem}): remove that line, or choose "
                                "another --out")
        if record["task_id"] not in seen:  # (the same record twice: kept once)
            seen[record["task_id"]] = record
            records.append(record)
    if torn:
        with open(path, "r+b") as f:
            f.truncate(len(raw) - len(torn))
    return records


# A record's per-sample fields (see santacpu.harness.scoring): lists of one entry a sample, each
# entry of this type.
_SAMPLE_FIELDS = {"completions": str, "passed": bool, "exact": bool, "statuses": str}


def _record_problem(record, samples: int) -> str | None:
    """What makes `record` no problem's record of a run of `samples` samples, or None."""
    if not isinstance(record, dict):
        return "not a JSON object"
    if not isinstance(record.get("task_id"), str):
        return "no task_id"
    for name in _SAMPLE_FIELDS:
        if not (isinstance(record.get(name), list) and len(record[name]) == samples):
            return f"'{name}' is not a list of {samples}"
    for name, kind in _SAMPLE_FIELDS.items():
        if not all(isinstance(value, kind) for value in record[name]):
            return f"'{name}' holds something other than {'text' if kind is str else 'true or false'}"
    if any(passed != (status == "passed") for passed, status in zip(record["passed"], record["statuses"])):
        return "'passed' and 'statuses' disagree"
    if not isinstance(record.get("truncated", False), bool):
        return "'truncated' is not true or false"
    return None


def _problems(n: int) -> str:
    return f"{n} finished problem{'s' * (n != 1)}"
