"""First use of a full-precision model: quantize it once into the user's cache, as `santacpu quantize
--type QTYPE` does with its defaults (the 4-bit types calibrated on the standard library), and reuse
that file afterwards (a q8_0 SantaCoder is a quarter of the fp32 download, memory-mapped). `runnable_model`
is the one policy every caller applies (`santacpu.load`, and through it the command line, the
server and the evaluation harness): what to load for a model name and a quantization choice.
`cache_entries` and `clear_cache` are `santacpu cache list` and `santacpu cache clear` (the
calibrations `santacpu quantize` keeps in the same folder, `calibration_cache`, included).

Cache folder: $SANTACPU_CACHE, else $XDG_CACHE_HOME/santacpu, else ~/.cache/santacpu. A cached
file is keyed by the source folder, the size and modification time of its weight files, the
type and the file-format version, so a changed source or a new format is quantized afresh. A
cached file that no longer reads as a whole quantized file (a conversion cut short by a crash,
a file damaged since, a scale or full-precision value turned NaN) is made again, with a warning
that names it. A cache that cannot be written (read-only, full, or a file where the folder should
be) is a one-line error that says what to do.

May import: `santacpu` (loading, formats, foundation modules) and `quantize.pipeline`,
`quantize.calibration` (the file is made as `santacpu quantize` makes it, with its defaults) and
`quantize.calibration_cache`.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from santacpu.atomic_file import (
    check_writable, describe_partial, exclusive, make_folder, partial_target, remove_stale_partials,
)
from santacpu.errors import SantacpuError, SantacpuWarning, WriteError, os_problem
from santacpu.formats.blocks import FORMATS
from santacpu.formats.quantized_file import DEFAULT_QUANT, FORMAT_VERSION, names_quantized_file, read_metadata
from santacpu.loading.checkpoint import open_checkpoint
from santacpu.loading.quantized import nonfinite_tensor, read_quantized
from santacpu.loading.source import looks_like_a_path, hub_revision, resolve
from santacpu.settings import CACHE_ENV, Settings

from . import calibration_cache
from . import DEFAULT_CALIBRATION_TOKENS
from .calibration import calibration_texts
from .pipeline import default_calibration, run_quantize
from santacpu.paths import user_path

QUANT_CHOICES = ("none", *FORMATS)


def runnable_model(model: str, revision: str | None, quant: str | None) -> tuple[str, str | None]:
    """What to load, and with which revision: a quantized file as is; a full-precision model as its
    cached quantization to `quant` (None: DEFAULT_QUANT; "none": the model itself, in full
    precision). A `quant` given for a quantized file is warned about and ignored."""
    qtype = DEFAULT_QUANT if quant is None else quant  # ("" is no quantization: refused below)
    if qtype not in QUANT_CHOICES:
        raise SantacpuError(f"unknown quantization '{qtype}' (choose {', '.join(QUANT_CHOICES)})")
    revision = hub_revision(model, revision)
    if names_quantized_file(model):
        if quant is not None:
            warnings.warn(f"quantization {quant} is ignored: {model} is a quantized file already and runs as it is",
                          SantacpuWarning)
        return str(model), None
    if qtype == "none":
        return str(model), revision
    return str(quantized_for(str(model), revision, qtype)), None


def cache_dir() -> Path:
    return Settings.from_environment().cache_dir


# The names this cache gives its files (`cached_file_for`) and their partial copies while written
# (santacpu.atomic_file): `cache list` and `cache clear` touch nothing else in the folder, which a
# user may have pointed at a folder of their own ($SANTACPU_CACHE=~/models).
_CACHED_NAME = re.compile(r".+-(?:%s)-[0-9a-f]{16}\.safetensors" % "|".join(map(re.escape, FORMATS)))


def _cache_files() -> list[Path]:
    """The files in the cache folder that this cache writes (or partial copies of them)."""
    folder = cache_dir()
    if folder.exists() and not folder.is_dir():
        raise SantacpuError(f"the quantization cache {folder} is not a folder (see {CACHE_ENV})")
    if folder.is_symlink() and not folder.exists():
        raise SantacpuError(f"the quantization cache {folder} is a symbolic link that leads nowhere, or in a loop "
                            f"(see {CACHE_ENV})")
    if not folder.is_dir():
        return []
    return [path for path in folder.iterdir() if (path.is_file() or path.is_symlink()) and any(
        name.fullmatch(partial_target(path.name) or path.name) for name in (_CACHED_NAME, calibration_cache.FILE_NAME))]


def first_use_calibration(qtype: str) -> str:
    """`santacpu quantize`'s default calibration for `qtype`, or "none" where this Python has no
    standard library sources to calibrate on (slim images that ship only compiled modules; judged
    when a file is made, half a second, not for its cache key)."""
    chosen = default_calibration(qtype)
    return "none" if chosen == "stdlib" and not _stdlib_calibrates() else chosen


@functools.lru_cache(maxsize=1)
def _stdlib_calibrates() -> bool:
    """Whether calibration finds text in this Python's standard library (read once a process)."""
    try:
        calibration_texts(None)
    except SantacpuError:
        return False
    return True


def cached_file_for(folder: Path, qtype: str) -> Path:
    recipe = {"folder": str(folder.resolve()), "files": calibration_cache.source_files(folder), "type": qtype, "format": FORMAT_VERSION}
    if default_calibration(qtype) != "none":  # (files made before first use calibrated are not reused)
        recipe["calibration"] = [default_calibration(qtype), DEFAULT_CALIBRATION_TOKENS]
    key = json.dumps(recipe)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / f"{folder.resolve().name}-{qtype}-{digest}.safetensors"


def quantized_for(model: str, revision: str | None, qtype: str) -> Path:
    """The cached quantized file for a full-precision `model`, made now if it is not there yet
    (or no longer reads as a whole quantized file)."""
    folder = resolve(model, revision).resolve()
    path = cached_file_for(folder, qtype)
    if path.exists() and _damage(path) is None:
        remove_stale_partials(path)  # (a killed duplicate's: the next write would, and there is none)
        return path
    # One first use at a time makes a file (calibration included): the others wait, then use it.
    with contextlib.suppress(WriteError):
        make_folder(path.parent)
    with exclusive(_lock_file(path), lambda: print(
            f"santacpu: another santacpu process is quantizing {model} to {qtype} into the cache: waiting for it",
            file=sys.stderr, flush=True)):
        return _made(model, folder, path, qtype)


def _lock_file(path: Path) -> Path:
    """The lock that one first use of the cached file `path` holds while it makes it."""
    return path.with_name(f".{path.name}.lock")


def _made(model: str, folder: Path, path: Path, qtype: str) -> Path:
    """The cached file at `path`, made now unless it is there (another first use made it) and whole."""
    if path.exists():
        damage = _damage(path)
        if damage is None:
            return path
        warnings.warn(f"the cached quantization {path} of {model} is damaged ({damage}); making it again",
                      SantacpuWarning, stacklevel=3)
    open_checkpoint(folder)  # a broken source fails here, before we announce any work
    try:
        make_folder(path.parent)
        if path.is_symlink():  # (a link under the cache's own name that leads nowhere usable: the cache's to drop)
            path.unlink()
        check_writable(path)
        print(f"santacpu: first use of {model}: quantizing it to {qtype} once, into {path} "
              "(`santacpu cache list` shows the cache)", file=sys.stderr, flush=True)
        calibration = first_use_calibration(qtype)
        if calibration != default_calibration(qtype):
            warnings.warn(f"this Python has no standard library sources to calibrate {qtype} on: quantizing without "
                          "calibration (`santacpu quantize --calibration FOLDER` makes a calibrated file from your code)",
                          SantacpuWarning, stacklevel=2)
        run_quantize(str(folder), path, qtype=qtype, calibration=calibration, calibration_tokens=DEFAULT_CALIBRATION_TOKENS,
                     keep=(), revision=None, force=True, show_report=False)  # as `santacpu quantize --type QTYPE` makes it
    except WriteError as problem:
        full = problem.errno in (errno.ENOSPC, errno.EDQUOT)
        room = "free some space there with `santacpu cache clear`, set " if full else "set "
        raise WriteError(
            f"{problem} (santacpu's quantization cache: {room}{CACHE_ENV} to another folder, or run the model in "
            "full precision with --quant none)", problem.errno
        ) from None
    return path


def _damage(path: Path) -> str | None:
    """Why the cached file at `path` cannot be used as it is, or None if it reads as a whole and
    every float value in it (block scales, full-precision tensors) is finite."""
    try:
        weights, _ = read_quantized(path)
    except SantacpuError as problem:
        return str(problem)
    damaged = nonfinite_tensor(weights)
    return None if damaged is None else f"tensor '{damaged}' holds NaN or infinite values"


@dataclass(frozen=True)
class CacheEntry:
    path: Path
    bytes: int
    qtype: str  # the type asked for, from the file's metadata ("?" where it cannot be read)
    source: str  # the full-precision folder it was made from ("?" where it cannot be read)
    created: str
    problem: str | None = None  # a partial file's state, or why a damaged file's metadata cannot be read


def cache_entries() -> list[CacheEntry]:
    """Every file the quantization cache wrote (first-use quantizations, and leftovers of conversions
    cut short), largest first; other files in its folder are not the cache's and are left out."""
    entries = []
    for path in _cache_files():
        qtype = source = created = "?"
        problem = describe_partial(path)  # (not read: a partial file's header may be whole)
        if problem is None and not path.exists():
            problem = "a symbolic link that leads nowhere"
        if problem is None and calibration_cache.FILE_NAME.fullmatch(path.name):
            found = calibration_cache.about(path)
            qtype, source, created = "calibration", str(found.get("source", "?")), str(found.get("created", "?"))
            problem = None if found else "unreadable"
        elif problem is None:
            try:
                _, meta = read_metadata(path)
                qtype = str(meta["quantization"].get("type"))
                source = str(meta["provenance"].get("resolved_path") or meta["provenance"].get("source"))
                created = str(meta["provenance"].get("created"))
            except SantacpuError as bad:
                problem = str(bad).replace(str(path), "").strip(" :") or "unreadable"
        entries.append(CacheEntry(path, path.stat().st_size if path.exists() else 0, qtype, source, created, problem))
    return sorted(entries, key=lambda e: (-e.bytes, e.path.name))


def clear_cache(model: str | None = None, revision: str | None = None) -> list[CacheEntry]:
    """Remove the cache's files (`model` given: only those made from it, found by the folder it
    resolves to, which is not downloaded for this); the removed entries, killed conversions'
    partial files included."""
    # Finished files only: a `.partial` file may be a conversion still being written. Those whose
    # writer is gone (killed outright) go too when everything is cleared, with a warning each, as
    # the next write of their file would remove them (santacpu.atomic_file).
    if model is not None and not str(model).strip():
        raise SantacpuError("the model to clear is empty (give a folder or hub id, or none to clear everything)")
    stale: list[CacheEntry] = []
    if model is None:  # (by name alone: no file's metadata is read for this)
        for target in {partial_target(path.name) for path in _cache_files()} - {None}:
            stale += [CacheEntry(path, size, "?", "?", "", "a killed conversion's partial file")
                      for path, size in remove_stale_partials(cache_dir() / target)]
    entries = [e for e in cache_entries() if not e.path.name.endswith(".partial")]
    if model is not None:
        # A hub id's files, of every revision, also once its hub cache is gone; a local folder's by
        # the path they name (a folder deleted or moved since too).
        # (huggingface_hub keeps hub id ORG/NAME's revisions in .../models--ORG--NAME/snapshots/REVISION)
        hub_folder = None if user_path(model).exists() or looks_like_a_path(str(model)) else \
            "models--" + str(model).replace("/", "--")
        try:
            folder = _local_folder(model, hub_revision(model, revision))
        except SantacpuError:
            folder = user_path(model).resolve()
            if not any(_made_from(e, folder) or _of_hub_id(e, hub_folder) for e in entries):
                raise
        entries = [e for e in entries if _made_from(e, folder) or (revision is None and _of_hub_id(e, hub_folder))]
    removed = []
    for entry in entries:
        try:
            entry.path.unlink()
        except FileNotFoundError:
            pass
        except PermissionError as problem:  # (another user's, in a shared sticky folder): the others go on
            warnings.warn(f"cannot remove {entry.path}: {os_problem(problem)}", SantacpuWarning, stacklevel=2)
            continue
        except OSError as problem:
            raise WriteError(f"cannot remove {entry.path}: {os_problem(problem)}") from None
        removed.append(entry)
    return stale + removed


def _made_from(entry: CacheEntry, folder: Path) -> bool:
    return entry.source != "?" and Path(entry.source).resolve() == folder


def _of_hub_id(entry: CacheEntry, hub_folder: str | None) -> bool:
    """Whether `entry` was made from a revision of the hub id whose cache folder is `hub_folder`."""
    parts = Path(entry.source).parts
    return hub_folder is not None and hub_folder in parts and parts[parts.index(hub_folder) + 1:][:1] == ("snapshots",)


def _local_folder(model: str, revision: str | None) -> Path:
    """The folder `model` names, never downloading: a local folder or file, else the hub cache's copy."""
    path = user_path(model)
    if path.exists():
        return (path if path.is_dir() else path.parent).resolve()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, revision=revision, local_files_only=True)).resolve()
    except Exception:  # not a hub id, or not in the hub cache: nothing of it can be in our cache
        raise SantacpuError(f"{model} is neither a local folder nor in the hub cache: no cached quantization "
                            "can have been made from it (`santacpu cache list` shows what there is)") from None
