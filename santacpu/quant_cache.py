"""First use of a full-precision model from the CLI: quantize it once into the user's cache and
reuse that file afterwards (a q8_0 SantaCoder is a quarter of the fp32 download, memory-mapped).

Cache folder: $SANTACPU_CACHE, else $XDG_CACHE_HOME/santacpu, else ~/.cache/santacpu. A cached
file is keyed by the source folder, the size and modification time of its weight files, the
type and the file-format version, so a changed source or a new format is quantized afresh.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from .checkpoint import open_checkpoint
from .quantized import FORMAT_VERSION
from .source import resolve

CACHE_ENV = "SANTACPU_CACHE"


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "santacpu"


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
    """The cached quantized file for a full-precision `model`, made now if it is not there yet."""
    from quantize.converter import convert

    folder = resolve(model, revision)
    path = cached_file_for(folder, qtype)
    if path.is_file():
        return path
    open_checkpoint(folder)  # a broken source fails here, before we announce any work
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"santacpu: first use of {model}: quantizing it to {qtype} once, into {path}", file=sys.stderr)
    convert(folder, path, qtype=qtype, revision=None, force=True)
    return path
