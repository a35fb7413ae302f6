"""The offline converter: a full-precision checkpoint (anything `santacpu.load` accepts) -> one
self-contained quantized file (format in santacpu/formats/quantized_file.py).

It works tensor by tensor: the source is memory-mapped, one layer's canonical tensors exist at a
time (legacy-layout transposes included), each is quantized and written, then freed. The output
goes to a temporary file in the target folder, renamed into place only when complete, and an
existing file is never replaced without `force`.

May import: `santacpu` (loading, formats, network.weights, foundation modules) and `quantize.policy`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from santacpu.atomic_file import check_writable
from santacpu.errors import SantacpuError
from santacpu.formats.blocks import FORMATS
from santacpu.formats.quantized_file import FORMAT_NAME, FORMAT_VERSION, FULL_PRECISION_TYPES, all_finite, is_quantized_file
from santacpu.formats.safetensors_io import dtype_name_of, write_safetensors
from santacpu.formats.split_rows import split_rows
from santacpu.loading.checkpoint import CheckpointReader, open_checkpoint
from santacpu.loading.quantized import canonical_tensor_names
from santacpu.loading.source import resolve
from santacpu.network.weights import expected_layer_shapes
from santacpu.progress import Progress
from santacpu.small_files import TOKENIZER_LIMIT, read_json_file
from santacpu.tokenizer import tokenizer_file_for
from santacpu.version import __version__

from .policy import DEFAULT_UPGRADE_BUDGET, ROW_UPGRADE_TYPE, Policy


@dataclass
class TensorReport:
    name: str
    qtype: str
    shape: tuple[int, ...]
    nbytes: int
    rel_rmse: float  # ||W - dequantize(quantize(W))|| / ||W||; 0 for full precision


@dataclass
class ConversionReport:
    out: Path
    tensors: list[TensorReport]
    seconds: float  # the conversion alone (`santacpu quantize` reports calibration beside it)
    qtype: str = ""  # the type asked for
    embedding_rows: int = 0  # the most used tokens' embedding rows raised to ROW_UPGRADE_TYPE

    @property
    def file_bytes(self) -> int:
        return self.out.stat().st_size

    @property
    def weight_bits_per_weight(self) -> float:
        """Bits per weight over the matrices (what the block formats act on)."""
        matrices = [t for t in self.tensors if len(t.shape) == 2]
        return 8 * sum(t.nbytes for t in matrices) / sum(int(np.prod(t.shape)) for t in matrices)


def tensor_shapes(reader: CheckpointReader) -> dict[str, tuple[int, ...]]:
    c = reader.config
    shapes = {"wte": (c.vocab_size, c.n_embd), "wpe": (c.n_positions, c.n_embd)}
    for i in range(c.n_layer):
        shapes.update({f"h.{i}.{f}": s for f, s in expected_layer_shapes(c).items()})
    shapes.update({"ln_f_weight": (c.n_embd,), "ln_f_bias": (c.n_embd,)})
    assert list(shapes) == canonical_tensor_names(c)
    return shapes


def canonical_tensors(reader: CheckpointReader) -> Iterator[tuple[str, np.ndarray]]:
    """(canonical name, array) in file order, one layer alive at a time."""
    yield "wte", reader.wte()
    yield "wpe", reader.wpe()
    for i in range(reader.config.n_layer):
        layer = reader.layer(i)
        for field in expected_layer_shapes(reader.config):
            yield f"h.{i}.{field}", getattr(layer, field)
        del layer
    ln_f_weight, ln_f_bias = reader.ln_f()
    yield "ln_f_weight", ln_f_weight
    yield "ln_f_bias", ln_f_bias


def sha256_of_sources(folder: Path) -> dict[str, str]:
    """sha256 of config.json and every weight file, so a quantized file names exactly its source."""
    digests = {}
    for path in sorted(folder.iterdir()):
        is_source = path.name == "config.json" or path.suffix in (".safetensors", ".bin") or path.name.endswith(".index.json")
        if is_source and path.is_file():  # a regular file (a stray FIFO or device would never end)
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    h.update(chunk)
            digests[path.name] = h.hexdigest()
    return digests


def check_output(out: Path, force: bool, qtype: str) -> None:
    """Fail early (before any long work) if `out` cannot or must not be written."""
    if out.is_dir():
        raise SantacpuError(f"{out} is a folder; give a file name such as santacoder-{qtype}.safetensors")
    if out.exists() and not force:
        raise SantacpuError(f"{out} already exists (use --force to replace it)")
    if not out.parent.is_dir():
        raise SantacpuError(f"the folder {out.parent} does not exist")
    check_writable(out)


def check_source(src: str | os.PathLike) -> None:
    """A quantized file is no source to quantize (read as one, it would be a folder without config.json)."""
    if is_quantized_file(src):
        raise SantacpuError(
            f"{src} is already a santacpu quantized file: quantize reads a full-precision checkpoint "
            "(a folder, a weight file inside one, or a hub id)"
        )


def convert(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    qtype: str,
    keep: list[tuple[str, str]] = (),
    importance: dict[str, np.ndarray] | None = None,
    calibration_note: str | None = None,
    revision: str | None = None,
    force: bool = False,
    upgrade_budget: float = DEFAULT_UPGRADE_BUDGET,
    upgrade_gains: dict[str, dict] | None = None,
    most_used_tokens: np.ndarray | None = None,
) -> ConversionReport:
    """Quantize `src` into the file `out`. `importance` maps canonical matrix names to per-input-
    channel weights (see quantize/calibration.py) for importance-weighted rounding;
    `upgrade_gains` (quantize/sensitivity.py) orders the upgrade budget by measured KLD cut;
    `most_used_tokens` (ids, most used first) names the embedding rows a plan may raise."""
    started = time.perf_counter()
    policy = Policy(qtype, list(keep), upgrade_budget)
    out = Path(out)
    check_output(out, force, qtype)
    check_source(src)

    folder = resolve(src, revision)
    reader = open_checkpoint(folder)
    shapes = tensor_shapes(reader)
    plan = policy.plan(shapes, upgrade_gains)
    types = plan.types
    raised_rows = None
    if plan.embedding_rows:
        if most_used_tokens is None or len(most_used_tokens) < plan.embedding_rows:
            raise SantacpuError("the upgrade plan raises embedding rows, but the most used tokens were not given")
        raised_rows = np.sort(np.asarray(most_used_tokens[: plan.embedding_rows], np.int32))
    entries, file_shapes = _file_layout(shapes, types, 0 if raised_rows is None else len(raised_rows))
    provenance = {
        "source": str(src),
        "resolved_path": str(folder),
        "revision": revision,
        "source_sha256": sha256_of_sources(folder),
        "santacpu_version": __version__,
        "calibration": calibration_note,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(reader.config.to_dict()),
        "tokenizer": _minified_tokenizer(folder, reader.config.vocab_size),
        "tensors": json.dumps(entries),
        "quantization": json.dumps({**policy.describe(), "importance_weighted": importance is not None,
                                    "upgrades": "by role" if upgrade_gains is None else "measured",
                                    "embedding_rows_raised": plan.embedding_rows}),
        "provenance": json.dumps(provenance),
    }
    reports: list[TensorReport] = []
    stored = _stored_tensors(reader, types, entries, importance, reports, Progress(len(shapes), "quantizing"), raised_rows)
    write_safetensors(out, stored, metadata, shapes=file_shapes)
    return ConversionReport(out, reports, time.perf_counter() - started, qtype, plan.embedding_rows)


def _stored_tensors(
    reader: CheckpointReader,
    types: dict[str, str],
    entries: dict,
    importance: dict[str, np.ndarray] | None,
    reports: list[TensorReport],
    bar: Progress,
    raised_rows: np.ndarray | None = None,
) -> Iterator[tuple[str, np.ndarray]]:
    """(name in the file, array) for every stored array, one source tensor at a time, in the file's
    order; each tensor's report appended to `reports` as it is done. `raised_rows`: the embedding
    rows stored at ROW_UPGRADE_TYPE (santacpu.formats.split_rows)."""
    for name, array in canonical_tensors(reader):
        if not all_finite(array):  # a file santacpu writes never holds NaN (see `info`)
            raise SantacpuError(f"the source tensor '{name}' holds NaN or infinite values: the checkpoint is damaged")
        qtype_of = types[name]
        if qtype_of in FULL_PRECISION_TYPES:
            stored = np.asarray(array, dtype=FULL_PRECISION_TYPES[qtype_of])
            if not all_finite(stored):
                raise SantacpuError(f"tensor '{name}' overflows {qtype_of}: store it as f32 (--keep '{name}=f32')")
            reports.append(TensorReport(name, qtype_of, array.shape, stored.nbytes, 0.0))
            bar.step(name)  # before yielding: the writer stops pulling after the last tensor
            yield name, stored
        else:
            weight = np.asarray(array, dtype=np.float32)
            imp = None if importance is None else importance.get(name)
            if name == "wte" and raised_rows is not None:
                split = split_rows(weight, raised_rows, ROW_UPGRADE_TYPE, qtype_of, imp)
                values, label = split.dequantize(), f"{qtype_of}+{ROW_UPGRADE_TYPE}"
                pieces = [(f"{name}.{part}", split.rest.parts[part]) for part in entries[name]["parts"]]
                pieces.append((f"{name}.rows", split.upgraded_rows))
                pieces += [(f"{name}.upgraded.{part}", split.upgraded.parts[part])
                           for part in entries[name]["upgraded_rows"]["parts"]]
            else:
                fmt = FORMATS[qtype_of]
                parts = fmt.quantize(weight, imp)
                values, label = fmt.dequantize(parts), qtype_of
                pieces = [(f"{name}.{part}", parts[part]) for part in entries[name]["parts"]]
            error = np.linalg.norm(values - weight) / max(np.linalg.norm(weight), 1e-30)
            reports.append(TensorReport(name, label, array.shape, sum(a.nbytes for _, a in pieces), float(error)))
            del weight, values
            reader.source.release_array(array)  # done with the source pages: keep RSS small
            bar.step(name)
            yield from pieces


def _minified_tokenizer(folder: Path, vocab_size: int) -> str:
    """The model's tokenizer.json, minified: 1.3 MB instead of 2 MB, which matters for small models."""
    tokenizer_path = tokenizer_file_for(folder, vocab_size)
    spec = read_json_file(tokenizer_path, "tokenizer", TOKENIZER_LIMIT)
    return json.dumps(spec, separators=(",", ":"), ensure_ascii=False)


def _file_layout(shapes: dict[str, tuple[int, ...]], types: dict[str, str], raised_rows: int = 0) -> tuple[dict, dict]:
    """(the metadata's `tensors` entries, each stored array's (shape, safetensors dtype) by its
    name in the file) for tensors of these shapes stored as these types, `raised_rows` rows of
    the embedding at ROW_UPGRADE_TYPE."""
    entries, file_shapes = {}, {}

    def blocks(name: str, qtype_of: str, shape: tuple[int, int]) -> list[str]:
        specs = FORMATS[qtype_of].part_specs(*shape)
        for part, (part_shape, dtype) in specs.items():
            file_shapes[f"{name}.{part}"] = (tuple(part_shape), dtype_name_of(np.zeros(0, dtype)))
        return list(specs)

    for name, shape in shapes.items():
        qtype_of = types[name]
        if qtype_of in FULL_PRECISION_TYPES:
            entries[name] = {"type": qtype_of, "shape": list(shape), "parts": []}
            file_shapes[name] = (shape, dtype_name_of(np.zeros(0, FULL_PRECISION_TYPES[qtype_of])))
        elif name == "wte" and raised_rows:
            rest = blocks(name, qtype_of, (shape[0] - raised_rows, shape[1]))
            file_shapes[f"{name}.rows"] = ((raised_rows,), dtype_name_of(np.zeros(0, np.int32)))
            upgraded = blocks(f"{name}.upgraded", ROW_UPGRADE_TYPE, (raised_rows, shape[1]))
            entries[name] = {"type": qtype_of, "shape": list(shape), "parts": rest,
                             "upgraded_rows": {"type": ROW_UPGRADE_TYPE, "count": raised_rows, "parts": upgraded}}
        else:
            entries[name] = {"type": qtype_of, "shape": list(shape), "parts": blocks(name, qtype_of, shape)}
    return entries, file_shapes
