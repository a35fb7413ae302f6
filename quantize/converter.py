"""The offline converter: a full-precision checkpoint (anything `santacpu.load` accepts) -> one
self-contained quantized file (format in santacpu/formats/quantized_file.py).

It works tensor by tensor: the source is memory-mapped, a few canonical tensors exist at a time
(legacy-layout transposes included), each is quantized (on a few threads), written in order and
freed. The output goes to a temporary file in the target folder, renamed into place only when
complete, and an existing file is never replaced without `force`.

May import: `santacpu` (loading, formats, network.weights, foundation modules) and `quantize.policy`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from santacpu.atomic_file import check_writable, input_at
from santacpu.errors import OptionValueError, SantacpuError
from santacpu.formats.blocks import FORMATS
from santacpu.formats.fits import QUANTIZING_THREADS
from santacpu.formats.quantized_file import FORMAT_NAME, FORMAT_VERSION, FULL_PRECISION_TYPES, all_finite, is_quantized_file
from santacpu.formats.safetensors_io import dtype_name_of, safetensors_file_bytes, write_safetensors
from santacpu.formats.split_rows import split_rows
from santacpu.loading.checkpoint import CheckpointReader, checkpoint_files, open_checkpoint
from santacpu.loading.quantized import canonical_tensor_names
from santacpu.loading.source import resolve
from santacpu.network.weights import expected_layer_shapes
from santacpu.progress import Progress
from santacpu.small_files import TOKENIZER_LIMIT, read_json_file
from santacpu.tokenizer import Tokenizer, tokenizer_file_for
from santacpu.version import __version__

from .policy import DEFAULT_UPGRADE_BUDGET, ROW_UPGRADE_TYPE, Plan, Policy, SizeTarget
from santacpu.paths import user_path


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
    size_target: SizeTarget | None = None  # what the upgrades were sized to, if a target was given
    kept: frozenset[str] = frozenset()  # the tensors whose type a --keep rule decided

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
    for path in checkpoint_files(folder):  # regular files (a stray FIFO or device would never end)
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
        digests[path.name] = h.hexdigest()
    return digests


def check_output(out: Path, force: bool, qtype: str) -> None:
    """Fail early (before any long work) if `out` cannot or must not be written (`check_writable`:
    its folder, no link or device, an existing file only with --force)."""
    if out.is_dir():
        raise SantacpuError(f"{out} is a folder; give a file name such as santacoder-{qtype}.safetensors")
    check_writable(out, overwrite=force)


def check_source(src: str | os.PathLike, out: Path | None = None) -> None:
    """A quantized file is no source to quantize (read as one, it would be a folder without
    config.json); and `out` must not be one of the source's own files (--force would replace the
    checkpoint being read)."""
    local = user_path(src)
    if out is not None and local.exists():
        read = input_at(out, [local if local.is_dir() else local.parent])  # a weight file: its checkpoint's files
        if read is not None:
            raise OptionValueError(f"{out} is a file of the checkpoint being quantized ({read}): write elsewhere")
    if is_quantized_file(src):
        raise SantacpuError(
            f"{src} is already a santacpu quantized file: quantize reads a full-precision checkpoint "
            "(a folder, a weight file inside one, or a hub id)"
        )


def policy_for(qtype: str, keep: list[tuple[str, str]] = (), upgrade_budget: float | None = None,
               bits_per_weight: float | None = None, max_size: float | None = None) -> Policy:
    """The policy of `santacpu quantize`'s options: `upgrade_budget` (a fraction; None: the default),
    or a size target, `bits_per_weight` or `max_size` (MB), never two of them."""
    given = [option for option, value in (("--upgrade-budget", upgrade_budget), ("--bits-per-weight", bits_per_weight),
                                          ("--max-size", max_size)) if value is not None]
    if len(given) > 1:
        raise OptionValueError(f"{' and '.join(given)} each set the upgrade budget: give one of them")
    if bits_per_weight is None and max_size is None:
        return Policy(qtype, list(keep), DEFAULT_UPGRADE_BUDGET if upgrade_budget is None else upgrade_budget)
    return Policy(qtype, list(keep), size_target=SizeTarget(bits_per_weight, max_size))


def source_digests(folder: Path, placeholder: bool = False) -> dict[str, str]:
    """sha256_of_sources, or with `placeholder` the same names with a digest of the same length
    (what sizing the file's header needs, without reading the weights)."""
    if not placeholder:
        return sha256_of_sources(folder)
    return {p.name: "0" * 64 for p in checkpoint_files(folder)}


def _metadata(reader: CheckpointReader, folder: Path, policy: Policy, plan: Plan, entries: dict, *, provenance: dict,
              importance_weighted: bool, measured: bool) -> dict[str, str]:
    return {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(reader.config.to_dict()),
        "tokenizer": _minified_tokenizer(folder, reader.config.vocab_size),
        "tensors": json.dumps(entries),
        "quantization": json.dumps({**policy.describe(), "importance_weighted": importance_weighted,
                                    "upgrades": "measured" if measured else "by role",
                                    "embedding_rows_raised": plan.embedding_rows}),
        "provenance": json.dumps(provenance),
    }


def _provenance(src, folder: Path, revision: str | None, calibration_note: str | None, digests: dict) -> dict:
    return {
        "source": str(src),
        "resolved_path": str(Path(folder).resolve()),  # (absolute: `cache clear` matches it from any folder)
        "revision": revision,
        "source_sha256": digests,
        "santacpu_version": __version__,
        "calibration": calibration_note,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def sized_plan(reader: CheckpointReader, folder: Path, policy: Policy, gains: dict[str, dict] | None,
               metadata_of) -> tuple[Plan, dict, dict]:
    """(plan, metadata, file shapes) of the file: with a --max-size target, planned again with the
    header's bytes counted until the whole file fits (upgrades change the header a little);
    `metadata_of(plan, entries)` -> the file's metadata."""
    shapes = tensor_shapes(reader)

    def layout(plan: Plan) -> tuple[dict, dict, int]:
        entries, file_shapes = _file_layout(shapes, plan.types, plan.embedding_rows)
        metadata = metadata_of(plan, entries)
        return metadata, file_shapes, safetensors_file_bytes(metadata, file_shapes)[1]

    target = policy.size_target
    overhead = layout(policy.base_plan(shapes))[2] if target is not None and target.max_size is not None else 0
    if target is not None:
        policy.check_target(shapes, overhead)
    while True:  # each round raises `overhead` (by 8 bytes at least), so it ends
        plan = policy.plan(shapes, gains, overhead)
        metadata, file_shapes, header = layout(plan)
        if header <= overhead or target is None or target.max_size is None:
            return plan, metadata, file_shapes
        overhead = header  # the header grew with the upgrades: plan again with less room


def check_size_target(src: str | os.PathLike, revision: str | None, policy: Policy, *, importance_weighted: bool,
                      measured: bool) -> None:
    """Before calibrating: an OptionValueError if the size target is below the smallest file of
    this model (the conversion checks it again, with the calibration note in the header)."""
    if policy.size_target is None:
        return
    folder = resolve(src, revision)
    reader = open_checkpoint(folder)
    provenance = _provenance(src, folder, revision, None, source_digests(folder, placeholder=True))
    sized_plan(reader, folder, policy, None, lambda plan, entries: _metadata(
        reader, folder, policy, plan, entries, provenance=provenance, importance_weighted=importance_weighted,
        measured=measured))


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
    upgrade_budget: float | None = None,
    upgrade_gains: dict[str, dict] | None = None,
    most_used_tokens: np.ndarray | None = None,
    bits_per_weight: float | None = None,
    max_size: float | None = None,
) -> ConversionReport:
    """Quantize `src` into the file `out`. `importance` maps canonical matrix names to per-input-
    channel weights (see quantize/calibration.py) for importance-weighted rounding;
    `upgrade_gains` (quantize/sensitivity.py) orders the upgrade budget by measured KLD cut;
    `most_used_tokens` (ids, most used first) names the embedding rows a plan may raise. The
    budget: `upgrade_budget` (a fraction of the file; None: DEFAULT_UPGRADE_BUDGET), or what
    reaches a size target, `bits_per_weight` over the matrices or `max_size` MB for the file
    (`santacpu quantize`'s options; see policy.SizeTarget)."""
    started = time.perf_counter()
    policy = policy_for(qtype, keep, upgrade_budget, bits_per_weight, max_size)
    out = Path(out)
    check_output(out, force, qtype)
    check_source(src, out)

    folder = resolve(src, revision)
    reader = open_checkpoint(folder)
    provenance = _provenance(src, folder, revision, calibration_note, sha256_of_sources(folder))
    plan, metadata, file_shapes = sized_plan(reader, folder, policy, upgrade_gains, lambda plan, entries: _metadata(
        reader, folder, policy, plan, entries, provenance=provenance, importance_weighted=importance is not None,
        measured=upgrade_gains is not None))
    types = plan.types
    raised_rows = None
    if plan.embedding_rows:
        if most_used_tokens is None or len(most_used_tokens) < plan.embedding_rows:
            raise SantacpuError("the upgrade plan raises embedding rows, but the most used tokens were not given")
        raised_rows = np.sort(np.asarray(most_used_tokens[: plan.embedding_rows], np.int32))
    entries = json.loads(metadata["tensors"])
    reports: list[TensorReport] = []
    stored = _stored_tensors(reader, types, entries, importance, reports, Progress(len(types), "quantizing"), raised_rows)
    write_safetensors(out, stored, metadata, shapes=file_shapes, overwrite=force)
    return ConversionReport(out, reports, time.perf_counter() - started, qtype, plan.embedding_rows, policy.size_target,
                            frozenset(name for name in types if policy.kept(name)))


def _stored_tensors(
    reader: CheckpointReader,
    types: dict[str, str],
    entries: dict,
    importance: dict[str, np.ndarray] | None,
    reports: list[TensorReport],
    bar: Progress,
    raised_rows: np.ndarray | None = None,
) -> Iterator[tuple[str, np.ndarray]]:
    """(name in the file, array) for every stored array, in the file's order; each tensor's report
    appended to `reports` as it is done. `raised_rows`: the embedding rows stored at
    ROW_UPGRADE_TYPE (santacpu.formats.split_rows). Tensors are quantized on QUANTIZING_THREADS
    threads (the block fits release the GIL), at most one more than the threads in flight, so a
    few layers' tensors exist at a time; the writer takes them in order."""

    def stored(name: str, array: np.ndarray) -> tuple[TensorReport, list[tuple[str, np.ndarray]]]:
        if not all_finite(array):  # a file santacpu writes never holds NaN (see `info`)
            raise SantacpuError(f"the source tensor '{name}' holds NaN or infinite values: the checkpoint is damaged")
        qtype_of = types[name]
        if qtype_of in FULL_PRECISION_TYPES:
            kept = np.asarray(array, dtype=FULL_PRECISION_TYPES[qtype_of])
            if not all_finite(kept):
                raise SantacpuError(f"tensor '{name}' overflows {qtype_of}: store it as f32 (--keep '{name}=f32')")
            return TensorReport(name, qtype_of, array.shape, kept.nbytes, 0.0), [(name, kept)]
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
        del weight, values
        reader.source.release_array(array)  # done with the source pages: keep RSS small
        return TensorReport(name, label, array.shape, sum(a.nbytes for _, a in pieces), float(error)), pieces

    def written(done: Future) -> Iterator[tuple[str, np.ndarray]]:
        report, pieces = done.result()  # (a tensor's error raised here, in the file's order)
        reports.append(report)
        bar.step(report.name)  # before yielding: the writer stops pulling after the last tensor
        yield from pieces

    with ThreadPoolExecutor(QUANTIZING_THREADS, thread_name_prefix="santacpu-quantize") as pool:
        in_flight: deque[Future] = deque()
        try:
            for name, array in canonical_tensors(reader):
                in_flight.append(pool.submit(stored, name, array))
                if len(in_flight) > QUANTIZING_THREADS:
                    yield from written(in_flight.popleft())
            while in_flight:
                yield from written(in_flight.popleft())
        finally:  # an error or an interrupt: what has not started never will
            for future in in_flight:
                future.cancel()


def _minified_tokenizer(folder: Path, vocab_size: int) -> str:
    """The model's tokenizer.json, minified: 1.3 MB instead of 2 MB, which matters for small models.
    Checked as `load` checks the copy it will read: a file that cannot be used is refused here, not
    written into a quantized file that every later load refuses."""
    tokenizer_path = tokenizer_file_for(folder, vocab_size)
    spec = read_json_file(tokenizer_path, "tokenizer", TOKENIZER_LIMIT)
    text = json.dumps(spec, separators=(",", ":"), ensure_ascii=False)
    Tokenizer.from_json_text(text, f"tokenizer {tokenizer_path}")
    return text


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
