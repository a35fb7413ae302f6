"""The results file of `santacpu eval`: JSON lines, a header naming the run, then one record per
problem, appended (and flushed to disk) as each problem finishes, so an interrupted run loses
nothing finished and `--resume` carries on where it stopped.

The header's run identity (benchmark, model fingerprint, samples, generation options, timeout)
must match to resume: results of another model or benchmark are refused, never mixed. A last line
cut short by a crash is dropped on resume; damage anywhere else is an error.

May import: the standard library and `santacpu.errors`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..errors import SantacpuError, WriteError, os_problem

FORMAT = "santacpu-eval/1"
IDENTITY = ("benchmark", "model", "samples", "options", "timeout_s")


def model_fingerprint(model: str) -> dict:
    """What identifies a model in a results file: its name, and for local files their names, sizes
    and a digest of their first MiB (a quantized file's header holds its metadata)."""
    path = Path(model).expanduser()
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}:{file.stat().st_size}:".encode())
        with open(file, "rb") as f:
            digest.update(f.read(1 << 20))
    return {"name": path.name if files else model, "sha256": digest.hexdigest()[:16] if files else None}


class ResultsFile:
    """Open with `open(path, header, resume)`; `records` are those already there (resumed); `append`
    adds one and syncs it to disk."""

    def __init__(self, path: Path, header: dict, records: list[dict] | None):
        self.path, self.header = path, header
        self.records = records or []
        self._written = records is not None  # a resumed file has its header already

    @property
    def finished(self) -> set[str]:
        return {r["task_id"] for r in self.records}

    @classmethod
    def open(cls, path: Path, header: dict, resume: bool) -> ResultsFile:
        """The results file at `path` for a run with `header`: a new one (written at its first record,
        so a run that fails before any leaves nothing), or, with `resume`, the one there, checked."""
        header = {"format": FORMAT, **header}
        try:
            existing = path.exists() and path.stat().st_size > 0
            if existing and not resume:
                raise SantacpuError(f"{path} exists: pass --resume to continue that run, or choose another --out")
            return cls(path, header, _read_for_resume(path, header) if existing else None)
        except OSError as e:
            raise SantacpuError(f"cannot use the results file {path}: {os_problem(e)}") from None

    def append(self, record: dict) -> None:
        lines = [] if self._written else [self.header]
        try:
            with open(self.path, "a" if self._written else "w", encoding="utf-8") as f:
                f.write("".join(json.dumps(line) + "\n" for line in [*lines, record]))
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:  # a full disk names no file: say which, and what is kept
            kept = f"its {len(self.records)} finished problems are kept; --resume carries on" if self._written else \
                "nothing was kept"
            raise WriteError(f"cannot write the results file {self.path}: {os_problem(e)} ({kept})") from None
        self._written = True
        self.records.append(record)


def _read_for_resume(path: Path, header: dict) -> list[dict]:
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    complete, torn = lines[:-1], lines[-1]  # the text after the last newline was cut short
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
    records = []
    for number, line in enumerate(complete[1:], start=2):
        try:
            records.append(json.loads(line))
        except ValueError:
            raise SantacpuError(f"{path} is damaged at line {number}; choose another --out") from None
    if torn:
        with open(path, "r+b") as f:
            f.truncate(len(raw) - len(torn))
    return records
