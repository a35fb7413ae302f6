"""Reads santacpu's quantized files (the format: `santacpu.formats.quantized_file`) into
canonical `ModelWeights`, a `QuantizedWeight` where a tensor is quantized, memory-mapped and never
dequantized; the tokenizer it embeds; the canonical tensor names; what `santacpu info` prints.

May import: `santacpu.network.weights`, `santacpu.formats`, `santacpu.config`, `santacpu.tokenizer`,
`santacpu.errors`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from ..config import Config
from ..errors import SantacpuError, printable
from ..formats.blocks import FORMATS, QuantizedWeight
from ..formats.split_rows import SplitRowsWeight
from ..formats.quantized_file import FORMAT_NAME, FULL_PRECISION_TYPES, all_finite, read_metadata
from ..formats.safetensors_io import SafetensorsFile
from ..network.weights import LayerWeights, ModelWeights, expected_layer_shapes, layer_field_names
from ..tokenizer import Tokenizer


def canonical_tensor_names(config: Config) -> list[str]:
    names = ["wte", "wpe"]
    for i in range(config.n_layer):
        names += [f"h.{i}.{field}" for field in layer_field_names()]
    return names + ["ln_f_weight", "ln_f_bias"]


def _tensor(file: SafetensorsFile, name: str, entry: dict, expected_shape: tuple[int, ...], path: Path):
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
    if len(shape) != 2:  # (the config may give a vector's shape to a tensor the metadata says is blocks)
        raise SantacpuError(f"{path} is corrupt: tensor '{name}' of type {qtype} is not a matrix ({list(shape)})")
    split = entry.get("upgraded_rows")
    if split is None:
        return _blocks(file, name, qtype, shape, path)
    k = split["count"]
    if split["type"] not in FORMATS or len(shape) != 2 or not 0 <= k <= shape[0]:
        raise SantacpuError(f"{path} is corrupt: tensor '{name}' has invalid upgraded rows {split}")
    rows = file.array(f"{name}.rows") if f"{name}.rows" in file else None
    if rows is None or rows.shape != (k,) or rows.dtype != np.int32:
        raise SantacpuError(f"{path} is corrupt: part '{name}.rows' is missing or not int32 [{k}]")
    upgraded = _blocks(file, f"{name}.upgraded", split["type"], (k, shape[1]), path)
    rest = _blocks(file, name, qtype, (shape[0] - k, shape[1]), path)
    try:
        return SplitRowsWeight(shape, rows, upgraded, rest)
    except SantacpuError as bad:
        raise SantacpuError(f"{path} is corrupt: tensor '{name}': {bad}") from None


def _blocks(file: SafetensorsFile, name: str, qtype: str, shape: tuple[int, int], path: Path) -> QuantizedWeight:
    """The parts `{name}.{part}` of a block-quantized [rows, cols] matrix, checked."""
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
    (there, a NaN that reaches the hidden state ends generation with `engine.check_finite`'s
    error)."""
    for name, tensor in named_tensors(weights).items():
        if isinstance(tensor, SplitRowsWeight):
            parts = [*tensor.upgraded.parts.values(), *tensor.rest.parts.values()]
        else:
            parts = tensor.parts.values() if isinstance(tensor, QuantizedWeight) else [tensor]
        if not all(all_finite(p) for p in parts if p.dtype.kind == "f"):
            return name
    return None


def _size_target_note(target: object) -> str:
    """How `info` says the size target a file's upgrades were sized to (`quantize --bits-per-weight`,
    `--max-size`), or "" for none."""
    if not isinstance(target, dict):
        return ""

    def number(value) -> float | None:  # (a hostile file's 10**400 or NaN is no size)
        try:
            return float(value) if isinstance(value, (int, float)) and math.isfinite(float(value)) else None
        except OverflowError:
            return None

    if number(target.get("bits_per_weight")) is not None:
        return f", sized to {number(target['bits_per_weight']):g} bits/weight"
    if number(target.get("max_size_mb")) is not None:
        return f", sized to at most {number(target['max_size_mb']):g} MB"
    return ""


def embedded_tokenizer(path: str | os.PathLike, meta: dict) -> Tokenizer:
    """The tokenizer a quantized file carries (`meta` from read_quantized), named in its errors."""
    return Tokenizer.from_json_text(meta["tokenizer"], f"the tokenizer in {path}")


def describe(path: str | os.PathLike) -> str:
    """The text `santacpu info` prints: config, per-type tensor counts, size, bits per weight,
    provenance. The whole file is checked as `load` checks it first (its tokenizer included), and
    every float value in it (full-precision tensors, block scales) must be finite."""
    path = Path(path)
    weights, meta = read_quantized(path)
    embedded_tokenizer(path, meta)
    damaged = nonfinite_tensor(weights)
    if damaged:
        raise SantacpuError(f"{path} is damaged: tensor '{damaged}' holds NaN or infinite values")
    config, entries = meta["config"], meta["tensors"]
    split = entries["wte"].get("upgraded_rows")
    split_note = f", its {split['count']} most used rows {split['type']}" if split else ""
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
        f"quantization    {quantization.get('type')} (embedding {quantization.get('embedding')}{split_note}"
        + (f"; keep {', '.join(map(str, quantization['keep']))}" if isinstance(quantization.get("keep"), list)
           and quantization["keep"] else "")
        + (", importance-weighted" if quantization.get("importance_weighted") else "")
        + _size_target_note(quantization.get("size_target"))
        + ")"
        + ("" if quantization.get("type") in counts else
           f"; no tensor is stored as {quantization.get('type')} (see the tensors below; `quantize "
           "--upgrade-budget 0` keeps every linear weight at the type asked for)"),
        "tensors         " + ", ".join(f"{n} x {t}" for t, n in sorted(counts.items())),
        f"bits/weight     {8 * stored / max(weight_count, 1):.3f} over the {weight_count:,} matrix weights; "
        f"{8 * size / max(weight_count, 1):.3f} for the whole file",
        f"source          {provenance.get('source')}",
        f"revision        {provenance.get('revision') or '- (none asked for)'}",
        "source sha256   " + (digest_lines[0] if digest_lines else "- (not recorded)"),
        *("                " + line for line in digest_lines[1:]),
        f"calibration     {provenance.get('calibration') or 'none'}",
        f"made by         santacpu {provenance.get('santacpu_version')} on {provenance.get('created')}",
    ]
    return "\n".join(map(printable, lines))  # (a value from the file cannot forge a line or drive a terminal)
