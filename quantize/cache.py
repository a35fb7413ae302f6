"""First use of a full-precision model: quantize it once into the user's cache and reuse that file
afterwards (a q8_0 SantaCoder is a quarter of the fp32 download, memory-mapped). `runnable_model`
is the policy the command line applies (`complete`, `perplexity`, `bench`): what to load for a
model name and a `--quant` choice.

Cache folder: $SANTACPU_CACHE, else $XDG_CACHE_HOME/santacpu, else ~/.cache/santacpu. A cached
file is keyed by the source folder, the size and modification time of its weight files, the
type and the file-format version, so a changed source or a new format is quantized afresh. A
cached file that no longer reads as a whole quantized file (a conversion cut short by a crash,
a file damaged since) is made again, with a warning. A cache that cannot be written (read-only,
full, or a file where the folder should be) is a one-line error that says what to do.

May import: `santacpu` (loading, formats, foundation modules) and `quantize.converter`.
"""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from pathlib import Path

from santacpu.atomic_file import check_writable
from santacpu.errors import SantacpuError, SantacpuWarning, WriteError, os_problem
from santacpu.formats.blocks import FORMATS
from santacpu.formats.quantized_file import FORMAT_VERSION, names_quantized_file
from santacpu.loading.checkpoint import open_checkpoint
from santacpu.loading.quantized import read_quantized
from santacpu.loading.source import hub_revision, resolve
from santacpu.settings import CACHE_ENV, Settings

from .converter import convert

DEFAULT_QUANT = "q8_0"  # what a full-precision model runs as, unless --quant says otherwise


def runnable_model(model: str, revision: str | None, quant: str | None) -> tuple[str, str | None]:
    """What to load, and with which revision: a quantized file as is; a full-precision model as its
    cached quantization (unless --quant none). Options that cannot apply are warned about once."""
    qtype = quant or DEFAULT_QUANT
    if qtype != "none" and qtype not in FORMATS:
        raise SantacpuError(f"unknown --quant '{qtype}' (choose none, {', '.join(FORMATS)})")
    revision = hub_revision(model, revision)
    if names_quantized_file(model):
        if quant is not None:
            warnings.warn(f"--quant {quant} is ignored: {model} is a quantized file already and runs as it is",
                          SantacpuWarning)
        return model, None
    if qtype == "none":
        return model, revision
    return str(quantized_for(model, revision, qtype)), None


def cache_dir() -> Path:
    return Settings.from_environment().cache_dir


def cached_file_for(folder: Path, qtype: str) -> Path:
    sources = sorted(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.iterdir()
        if p.is_file() and (p.name == "config.json" or p.suffix in (".safetensors", ".bin"))
    )
    key = json.dumps({"folder": str(folder.resolve()), "files": sources, "type": qtype, "format": FORMAT_VERSION})
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / f"{folder.resolve().name}-{qtype}-{digest}.safetensors"


def quantized_for(model: str, revision: str | None, qtype: str) -> Path:
    """The cached quantized file for a full-precision `model`, made now if it is not there yet
    (or no longer reads as a whole quantized file)."""
    folder = resolve(model, revision)
    path = cached_file_for(folder, qtype)
    if path.exists():
        damage = _damage(path)
        if damage is None:
            return path
        warnings.warn(f"the cached quantization {path} is damaged ({damage}); making it again", SantacpuWarning,
                      stacklevel=2)
    open_checkpoint(folder)  # a broken source fails here, before we announce any work
    try:
        _make_folder(path.parent)
        check_writable(path)
        print(f"santacpu: first use of {model}: quantizing it to {qtype} once, into {path}", file=sys.stderr)
        convert(folder, path, qtype=qtype, revision=None, force=True)
    except WriteError as problem:
        raise WriteError(
            f"{problem} (santacpu's quantization cache: free some space there, set {CACHE_ENV} to another "
            "folder, or run the model in full precision with --quant none)"
        ) from None
    return path


def _damage(path: Path) -> str | None:
    """Why the cached file at `path` cannot be used as it is, or None if it reads as a whole."""
    try:
        read_quantized(path)
    except SantacpuError as problem:
        return str(problem)
    return None


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise WriteError(f"cannot use {folder} as a folder: it (or a folder above it) is a file") from None
    except OSError as problem:
        raise WriteError(f"cannot make the folder {folder}: {os_problem(problem)}") from None
