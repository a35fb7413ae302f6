"""The results file of `santacpu eval`: JSON lines, a header naming the run, then one record per
problem, appended (and flushed to disk) as each problem finishes, so an interrupted run loses
nothing finished and `--resume` carries on where it stopped.

The header's run identity (benchmark, model fingerprint, samples, generation options, timeout)
must match to resume: results of another model or benchmark are refused, never mixed. A last line
cut short by a crash is dropped on resume (a header cut short leaves nothing to keep: the run
starts the file afresh); damage anywhere else, a record of the wrong shape, or a problem recorded
twice with different results (two runs writing one file) is an error naming the line. A new file
is created exclusively, so a second run started on the same --out fails instead of mixing in.

May import: the standard library, `santacpu.errors`, `santacpu.paths` and `santacpu.atomic_file` (which
paths may be written).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from ..atomic_file import writable_target
from ..errors import SantacpuError, WriteError, os_problem
from ..paths import user_path

FORMAT = "santacpu-eval/1"
IDENTITY = ("benchmark", "model", "samples", "options", "timeout_s")


def model_fingerprint(model: str) -> dict:
    """What identifies a model in a results file: its name, and for local files a digest of their
    names and whole contents (their first MiB alone let weights changed past it pass for the same
    model; hashing reads ~1.5 GB/s, a second for a q8_0 file, once a run)."""
    path = user_path(model)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}:{file.stat().st_size}:".encode())
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
    return {"name": path.name if files else model, "sha256": digest.hexdigest()[:16] if files else None}


class ResultsFile:
    """Open with `open(path, header, resume)`; `records` are those already there (resumed); `append`
    adds one and syncs it to disk."""

    def __init__(self, path: Path, header: dict, records: list[dict] | None, replace: bool = False):
        self.path, self.header = path, header
        self.records = records or []
        self._written = records is not None  # a resumed file has its header already
        self._replace = replace  # an empty file, or one whose header was cut short: written over

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
            records = _read_for_resume(path, header) if existing else None
            return cls(path, header, records, replace=path.exists() and records is None)
        except OSError as e:
            raise SantacpuError(f"cannot use the results file {path}: {os_problem(e)}") from None

    def append(self, record: dict) -> None:
        lines = [] if self._written else [self.header]
        data = "".join(json.dumps(line) + "\n" for line in [*lines, record]).encode("utf-8")
        how = os.O_APPEND if self._written else os.O_TRUNC if self._replace else os.O_EXCL
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | how, 0o666)
            try:
                start = os.lseek(fd, 0, os.SEEK_END)
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                    os.fsync(fd)
                except OSError:  # (a full disk): the file back to its last whole record, or gone
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, start)
                        if not self._written and how == os.O_EXCL:
                            os.unlink(self.path)
                    raise
            finally:
                os.close(fd)
        except FileExistsError:
            raise WriteError(f"the results file {self.path} was made by another run meanwhile: choose another --out, "
                             "or --resume once that run has ended") from None
        except OSError as e:  # a full disk names no file: say which, and what is kept
            kept = f"its {len(self.records)} finished problems are kept; --resume carries on" if self._written else \
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
        return None
    try:
        found = json.loads(complete[0]) if complete else None
    except ValueError:
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
        except ValueError:
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
    return None
