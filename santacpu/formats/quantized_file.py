"""santacpu's quantized model file: one self-contained, memory-mapped `.safetensors` file.

Owns the file format's facts (its name, version and metadata; the converter in `quantize/`
writes it, `santacpu.loading.quantized` reads its tensors into `ModelWeights`): recognising a
quantized file and reading its checked metadata.

File layout (format "santacpu-quantized", version 1; version 2 adds split rows):
- tensors, by canonical name (`wte`, `wpe`, `ln_f_weight`, `ln_f_bias`, `h.{i}.{LayerWeights field}`):
  a full-precision tensor is stored under its name (F32 or F16); a quantized one as its parts,
  `{name}.{part}` (see `santacpu.formats.blocks` for each block format's parts);
- version 2: a matrix whose entry has `upgraded_rows` ({"type", "count": k}) is a
  `SplitRowsWeight` (santacpu.formats.split_rows): `{name}.rows` int32 [k] ascending, those rows
  as `{name}.upgraded.{part}` in that type, the other rows as `{name}.{part}` in the entry's type;
- `__metadata__` (all values strings, JSON where structured):
  `format`, `format_version`, `config` (Config fields), `tokenizer` (the whole tokenizer.json),
  `tensors` ({name: {"type", "shape", "parts"}}), `quantization` (the policy used) and
  `provenance` (source, revision, sha256 of the source files, santacpu version, calibration).
The loader acts on this metadata only, never on the file name.

May import: numpy, `santacpu.formats`, `santacpu.config`, `santacpu.small_files`, `santacpu.paths`, `santacpu.errors`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..config import Config
from ..errors import SantacpuError
from ..small_files import parse_json
from .safetensors_io import SafetensorsFile
from ..paths import user_path

FORMAT_NAME = "santacpu-quantized"
FORMAT_VERSION = 2  # written into every new file; files of versions 1..2 are read
REQUIRED_METADATA = ("format", "format_version", "config", "tokenizer", "tensors", "quantization", "provenance")
FULL_PRECISION_TYPES = {"f32": np.float32, "f16": np.float16}
# What a full-precision model runs as unless told otherwise (`santacpu.load`, every command):
# quantized once into the cache (see `quantize.cache`).
DEFAULT_QUANT = "q8_0"


def is_quantized_file(path: str | os.PathLike) -> bool:
    """True for a file whose safetensors metadata says it is santacpu's format (any version)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        return SafetensorsFile(path).metadata.get("format") == FORMAT_NAME
    except SantacpuError:
        return False


def names_quantized_file(model: str | os.PathLike) -> bool:
    """Whether `model` is to be read as a quantized file: a santacpu quantized file, or any lone
    file without a config.json beside it (read as one so that a damaged file gets a precise error)."""
    path = user_path(model)
    return path.is_file() and (is_quantized_file(path) or not (path.parent / "config.json").is_file())


def _json_field(metadata: dict, key: str, path: Path):
    return parse_json(metadata[key], f"{path}: metadata field '{key}'")


def read_metadata(path: str | os.PathLike) -> tuple[SafetensorsFile, dict]:
    """Open a quantized file and return it with its decoded, checked metadata: `config` a `Config`,
    `tensors`, `quantization` and `provenance` dictionaries, `tokenizer` the tokenizer.json text."""
    path = Path(path)
    file = SafetensorsFile(path)
    meta = file.metadata
    if meta.get("format") != FORMAT_NAME:
        raise SantacpuError(f"{path} is a safetensors file but not a santacpu quantized model (no format '{FORMAT_NAME}')")
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise SantacpuError(f"{path} is corrupt: its metadata lacks '{missing[0]}'")
    try:
        version = int(meta["format_version"])
    except ValueError:
        raise SantacpuError(f"{path}: format_version '{meta['format_version']}' is not a number") from None
    if version > FORMAT_VERSION:
        raise SantacpuError(
            f"{path} uses format version {version}, newer than this santacpu reads ({FORMAT_VERSION}): upgrade santacpu"
        )
    if version < 1:
        raise SantacpuError(f"{path}: unknown format version {version}")
    decoded = {k: _json_field(meta, k, path) for k in ("config", "tensors", "quantization", "provenance")}
    problem = _structure_problem(decoded)
    if problem:
        raise SantacpuError(f"{path} has invalid metadata: {problem}")
    try:
        decoded["config"] = Config.from_metadata(decoded["config"])
    except SantacpuError as bad:
        raise SantacpuError(f"{path} has invalid metadata: {bad}") from None
    decoded["format_version"] = version
    decoded["tokenizer"] = meta["tokenizer"]
    return file, decoded


def _structure_problem(meta: dict) -> str | None:
    """What is wrong with the shape of the decoded metadata (what a hand edit can break), or None.
    The config is checked by `Config.from_metadata`, tensor shapes against it by `read_quantized`."""
    for key in ("config", "tensors", "quantization", "provenance"):
        if not isinstance(meta[key], dict):
            return f"'{key}' is {_json_kind(meta[key])}, not an object"
    for name, entry in meta["tensors"].items():
        if not isinstance(entry, dict):
            return f"the entry of tensor '{name}' is not an object"
        if not isinstance(entry.get("type"), str):
            return f"tensor '{name}' has no 'type'"
        shape, parts = entry.get("shape"), entry.get("parts", [])
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            return f"tensor '{name}' has no valid 'shape' (a list of sizes)"
        if not isinstance(parts, list) or not all(isinstance(part, str) for part in parts):
            return f"tensor '{name}' has no valid 'parts' (a list of names)"
        split = entry.get("upgraded_rows")
        if split is not None and not (isinstance(split, dict) and isinstance(split.get("type"), str)
                                      and isinstance(split.get("count"), int) and not isinstance(split.get("count"), bool)):
            return f"tensor '{name}' has invalid 'upgraded_rows' (an object with 'type' and 'count')"
    return None


def _json_kind(value: object) -> str:
    """What a decoded JSON value is, in JSON's words."""
    if isinstance(value, bool):
        return "a boolean"
    kinds = {list: "an array", str: "a string", int: "a number", float: "a number", type(None): "null"}
    return kinds.get(type(value), "an object")


def all_finite(array: np.ndarray) -> bool:
    """No NaN or infinity in `array` (its min and max: two passes, no array-sized temporary)."""
    return array.size == 0 or bool(np.isfinite(array.min()) and np.isfinite(array.max()))
