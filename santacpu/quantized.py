"""santacpu's quantized model file: one self-contained, memory-mapped `.safetensors` file.

Owns the file format (the converter in `quantize/` writes it, this module reads it) and the
`QuantizedWeight` that the runtime computes on without ever materialising a dequantized model.

File layout (format "santacpu-quantized", version 1):
- tensors, by canonical name (`wte`, `wpe`, `ln_f_weight`, `ln_f_bias`, `h.{i}.{LayerWeights field}`):
  a full-precision tensor is stored under its name (F32 or F16); a quantized one as its parts,
  `{name}.{part}` (see quantize/formats.py for each block format's parts);
- `__metadata__` (all values strings, JSON where structured):
  `format`, `format_version`, `config` (Config fields), `tokenizer` (the whole tokenizer.json),
  `tensors` ({name: {"type", "shape", "parts"}}), `quantization` (the policy used) and
  `provenance` (source, revision, sha256 of the source files, santacpu version, calibration).
The loader acts on this metadata only, never on the file name.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import Config
from .errors import SantacpuError
from .safetensors_io import SafetensorsFile
from .weights import LayerWeights, ModelWeights, expected_layer_shapes, layer_field_names

FORMAT_NAME = "santacpu-quantized"
FORMAT_VERSION = 1
REQUIRED_METADATA = ("format", "format_version", "config", "tokenizer", "tensors", "quantization", "provenance")
FULL_PRECISION_TYPES = {"f32": np.float32, "f16": np.float16}


@dataclass
class QuantizedWeight:
    """A [rows, cols] weight stored in a block format: `parts` are memory-mapped component arrays,
    each with `rows` as its first dimension (so row ranges slice cleanly)."""

    qtype: str
    shape: tuple[int, int]
    parts: dict[str, np.ndarray]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts.values())

    def dequantize(self) -> np.ndarray:
        """float32 [rows, cols] through the format's plain-NumPy reference (tests and the oracle)."""
        from quantize.formats import get_format

        return get_format(self.qtype).dequantize(self.parts)

    def take_rows(self, rows: np.ndarray) -> "QuantizedWeight":
        """The given rows (e.g. token ids of an embedding lookup) as a small QuantizedWeight."""
        return QuantizedWeight(self.qtype, (len(rows), self.shape[1]), {k: v[rows] for k, v in self.parts.items()})


def canonical_tensor_names(config: Config) -> list[str]:
    names = ["wte", "wpe"]
    for i in range(config.n_layer):
        names += [f"h.{i}.{field}" for field in layer_field_names()]
    return names + ["ln_f_weight", "ln_f_bias"]


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
    path = Path(model).expanduser()
    return path.is_file() and (is_quantized_file(path) or not (path.parent / "config.json").is_file())


def _json_field(metadata: dict, key: str, path: Path):
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError:
        raise SantacpuError(f"{path}: metadata field '{key}' is corrupt (not JSON)") from None


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
    return None


def _json_kind(value: object) -> str:
    """What a decoded JSON value is, in JSON's words."""
    if isinstance(value, bool):
        return "a boolean"
    kinds = {list: "an array", str: "a string", int: "a number", float: "a number", type(None): "null"}
    return kinds.get(type(value), "an object")


def _tensor(file: SafetensorsFile, name: str, entry: dict, expected_shape: tuple[int, ...], path: Path):
    from quantize.formats import FORMATS

    qtype, shape = entry["type"], tuple(entry["shape"])
    if shape != tuple(expected_shape):
        raise SantacpuError(f"{path}: tensor '{name}' has shape {list(shape)}, the config implies {list(expected_shape)}")
    if qtype in FULL_PRECISION_TYPES:
        if name not in file:
            raise SantacpuError(f"{path} is corrupt: tensor '{name}' is missing")
        array = file.array(name)
        if array.dtype != FULL_PRECISION_TYPES[qtype] or array.shape != shape:
            raise SantacpuError(f"{path} is corrupt: tensor '{name}' is not {qtype} {list(shape)}")
        return array
    if qtype not in FORMATS:
        raise SantacpuError(f"{path}: tensor '{name}' has unknown quantization type '{qtype}' (newer santacpu?)")
    parts = {}
    for part, (part_shape, dtype) in FORMATS[qtype].part_specs(*shape).items():
        key = f"{name}.{part}"
        if key not in file:
            raise SantacpuError(f"{path} is corrupt: part '{key}' is missing")
        array = file.array(key)
        if array.shape != tuple(part_shape) or array.dtype != np.dtype(dtype):
            raise SantacpuError(f"{path} is corrupt: part '{key}' is {array.dtype} {list(array.shape)}")
        parts[part] = array
    return QuantizedWeight(qtype, shape, parts)


def read_quantized(path: str | os.PathLike) -> tuple[ModelWeights, dict]:
    """Memory-map a quantized file: canonical ModelWeights (QuantizedWeight where quantized) and metadata."""
    path = Path(path)
    file, meta = read_metadata(path)
    config, entries = meta["config"], meta["tensors"]
    E, V, P = config.n_embd, config.vocab_size, config.n_positions
    layer_shapes = expected_layer_shapes(config)

    def get(name: str, shape: tuple[int, ...]):
        if name not in entries:
            raise SantacpuError(f"{path} is corrupt: tensor '{name}' is not listed in its metadata")
        return _tensor(file, name, entries[name], shape, path)

    layers = [
        LayerWeights(**{field: get(f"h.{i}.{field}", shape) for field, shape in layer_shapes.items()})
        for i in range(config.n_layer)
    ]
    weights = ModelWeights(
        config=config,
        wte=get("wte", (V, E)),
        wpe=get("wpe", (P, E)),
        layers=layers,
        ln_f_weight=get("ln_f_weight", (E,)),
        ln_f_bias=get("ln_f_bias", (E,)),
    )
    return weights, meta


def named_tensors(weights: ModelWeights) -> dict[str, object]:
    """Every tensor of `weights` by its canonical name (see `canonical_tensor_names`)."""
    named = {"wte": weights.wte, "wpe": weights.wpe}
    for i, layer in enumerate(weights.layers):
        named.update({f"h.{i}.{field}": getattr(layer, field) for field in layer_field_names()})
    return {**named, "ln_f_weight": weights.ln_f_weight, "ln_f_bias": weights.ln_f_bias}


def nonfinite_tensor(weights: ModelWeights) -> str | None:
    """The name of the first tensor holding a NaN or an infinity among its float values (a
    quantized tensor's scales), or None. A pass over every float part: for `info`, not for `load`
    (the integer kernels can turn NaN activations into finite garbage, so generation alone may
    not notice)."""
    for name, tensor in named_tensors(weights).items():
        parts = tensor.parts.values() if isinstance(tensor, QuantizedWeight) else [tensor]
        if not all(all_finite(p) for p in parts if p.dtype.kind == "f"):
            return name
    return None


def all_finite(array: np.ndarray) -> bool:
    """No NaN or infinity in `array` (its min and max: two passes, no array-sized temporary)."""
    return array.size == 0 or bool(np.isfinite(array.min()) and np.isfinite(array.max()))


def describe(path: str | os.PathLike) -> str:
    """The text `santacpu info` prints: config, per-type tensor counts, size, bits per weight,
    provenance. The whole file is checked as `load` checks it first, and every float value in
    it (full-precision tensors, block scales) must be finite."""
    path = Path(path)
    weights, meta = read_quantized(path)
    damaged = nonfinite_tensor(weights)
    if damaged:
        raise SantacpuError(f"{path} is damaged: tensor '{damaged}' holds NaN or infinite values")
    config, entries = meta["config"], meta["tensors"]
    counts: dict[str, int] = {}
    for entry in entries.values():
        counts[entry["type"]] = counts.get(entry["type"], 0) + 1
    matrices = [t for t in named_tensors(weights).values() if len(t.shape) == 2]
    weight_count = sum(int(np.prod(t.shape)) for t in matrices)
    stored = sum(t.nbytes for t in matrices)
    size = path.stat().st_size
    provenance, quantization = meta["provenance"], meta["quantization"]
    digests = provenance.get("source_sha256") or {}
    digests = digests if isinstance(digests, dict) else {}
    width = max(map(len, digests), default=0)
    digest_lines = [f"{name:<{width}}  {digest}" for name, digest in digests.items()]
    lines = [
        f"file            {path} ({size / 1e6:.1f} MB, format {FORMAT_NAME} v{meta['format_version']})",
        f"model           {config.model_type}: {config.n_layer} layers, n_embd {config.n_embd}, "
        f"{config.n_head} heads ({config.n_kv_head} K/V), n_inner {config.n_inner}, "
        f"context {config.n_positions}, vocab {config.vocab_size}",
        f"quantization    {quantization.get('type')} (embedding {quantization.get('embedding')}"
        + (f"; keep {', '.join(quantization['keep'])}" if quantization.get("keep") else "")
        + (", importance-weighted" if quantization.get("importance_weighted") else "")
        + ")",
        "tensors         " + ", ".join(f"{n} x {t}" for t, n in sorted(counts.items())),
        f"bits/weight     {8 * stored / max(weight_count, 1):.3f} over the {weight_count:,} matrix weights; "
        f"{8 * size / max(weight_count, 1):.3f} for the whole file",
        f"source          {provenance.get('source')}",
        f"revision        {provenance.get('revision') or '- (none asked for)'}",
        "source sha256   " + ("\n                ".join(digest_lines) or "- (not recorded)"),
        f"calibration     {provenance.get('calibration') or 'none'}",
        f"made by         santacpu {provenance.get('santacpu_version')} on {provenance.get('created')}",
    ]
    return "\n".join(lines)
