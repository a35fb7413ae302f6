"""Memory-mapped reading and streaming writing of `.safetensors` files.

Format: 8-byte little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`, then the
tensor bytes (offsets relative to the end of the header).

Reading maps the file once and hands out zero-copy NumPy views, so opening a 4.5 GB checkpoint
allocates almost nothing and pages come in as tensors are used. Every offset is checked against
the file size, so a truncated download gets a clear error instead of a bus error later.
Writing streams tensor by tensor through `atomic_file.atomic_output` (a temporary file renamed at
the end), so a failure never leaves a partial file under the final name.

May import: numpy, `santacpu.atomic_file`, `santacpu.small_files`, `santacpu.errors`.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ..atomic_file import atomic_output
from ..errors import SantacpuError, os_problem
from ..small_files import check_regular

# safetensors dtype name -> NumPy dtype. BF16 has no NumPy dtype: it is handed out as uint16 bits
# and widened to float32 by the caller (`bf16_to_f32`).
_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "U16": np.uint16,
    "U32": np.uint32,
    "U64": np.uint64,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items() if k not in ("BF16",)}

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's limit


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 stored as uint16 -> float32 (bfloat16 is the top half of a float32)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


class SafetensorsFile:
    """One memory-mapped `.safetensors` file: `names()`, `dtype_name(n)`, `shape(n)`, `array(n)`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.is_dir():
            raise SantacpuError(f"{self.path} is a folder, not a .safetensors file")
        try:
            status = self.path.stat()
            check_regular(status, self.path, "safetensors file")  # a FIFO would hang the open
            size = status.st_size
            with open(self.path, "rb") as f:
                raw_header = _read_header(f, size, self.path)
        except FileNotFoundError:
            raise SantacpuError(f"no such file: {self.path}") from None
        except OSError as problem:
            raise SantacpuError(f"cannot read {self.path}: {os_problem(problem)}") from None
        header_len = len(raw_header)
        try:
            header = json.loads(raw_header.decode("utf-8"))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
        except (UnicodeDecodeError, ValueError, RecursionError) as bad:  # RecursionError: nested too deep
            raise SantacpuError(f"{self.path} has a corrupt safetensors header: {bad}") from None
        metadata = header.pop("__metadata__", None)
        if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
            raise SantacpuError(f"{self.path} has a corrupt safetensors header: __metadata__ is not an object of strings")
        self.metadata: dict[str, str] = metadata or {}
        self._data_start = 8 + header_len
        self._entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        data_size = size - self._data_start
        for name, entry in header.items():
            dtype_name, shape, begin, end = _checked_entry(name, entry, self.path)
            if dtype_name not in _DTYPES:
                raise SantacpuError(f"{self.path}: tensor '{name}' has unsupported dtype {dtype_name}")
            itemsize = np.dtype(_DTYPES[dtype_name]).itemsize
            if end - begin != itemsize * math.prod(shape):  # Python integers: no overflow
                raise SantacpuError(f"{self.path}: tensor '{name}' has offsets that do not match its shape")
            if end > data_size:
                raise SantacpuError(
                    f"{self.path} is truncated: tensor '{name}' needs {self._data_start + end} bytes, "
                    f"the file has {size} (re-download or re-create it)"
                )
            self._entries[name] = (dtype_name, shape, begin, end)
        _check_no_overlap(self._entries, self.path)
        self._map: mmap.mmap | None = None
        if size > self._data_start:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            advise_huge_pages(self._map)
        self._buffer = np.frombuffer(self._map, dtype=np.uint8) if self._map is not None else np.empty(0, np.uint8)

    @property
    def data_start(self) -> int:
        """Where the tensors' bytes begin: after the 8-byte length and the JSON header."""
        return self._data_start

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def dtype_name(self, name: str) -> str:
        return self._entries[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def array(self, name: str) -> np.ndarray:
        """A read-only zero-copy view of the tensor (BF16 comes back as its uint16 bits)."""
        dtype_name, shape, begin, end = self._entries[name]
        start = self._data_start + begin
        raw = self._buffer[start : self._data_start + end]
        return raw.view(_DTYPES[dtype_name]).reshape(shape)

    def release(self, name: str) -> None:
        """Drop this tensor's pages from the process (after it was copied): they stay in the page
        cache but stop counting towards our resident memory."""
        if self._map is not None:
            _, _, begin, end = self._entries[name]
            _drop_pages(self._map, self._data_start + begin, self._data_start + end)


def _read_header(f, size: int, path: Path) -> bytes:
    """The raw JSON header of an open file of `size` bytes, its length checked against the size."""
    if size < 8:
        raise SantacpuError(f"{path} is not a safetensors file (only {size} bytes)")
    (header_len,) = struct.unpack("<Q", f.read(8))
    if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
        raise SantacpuError(
            f"{path} is not a valid safetensors file or is truncated (header claims {header_len} bytes, file has {size})"
        )
    return f.read(header_len)


def _checked_entry(name: str, entry: object, path: Path) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype name, shape, begin, end) of one header entry, each of the JSON kind the format says:
    sizes and offsets whole numbers >= 0 (not floats, not booleans), the data not ending before it begins."""
    fields = (entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")) if isinstance(entry, dict) else ()
    if not (fields and isinstance(fields[0], str) and isinstance(fields[1], list)
            and isinstance(fields[2], list) and len(fields[2]) == 2):
        raise SantacpuError(f"{path} has a corrupt header entry for tensor '{name}'")
    dtype_name, shape, (begin, end) = fields
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in [*shape, begin, end]):
        raise SantacpuError(f"{path} has a corrupt header entry for tensor '{name}': its shape and offsets must be "
                            "whole numbers >= 0")
    if begin > end:
        raise SantacpuError(f"{path} has a corrupt header entry for tensor '{name}': its data ends before it begins")
    return dtype_name, tuple(shape), begin, end


def _check_no_overlap(entries: dict[str, tuple[str, tuple[int, ...], int, int]], path: Path) -> None:
    """Refuse tensors whose bytes overlap (a hand-edited or corrupt header): each byte is one tensor's."""
    spans = sorted((begin, end, name) for name, (_, _, begin, end) in entries.items() if end > begin)
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise SantacpuError(f"{path} is corrupt: the bytes of tensors '{first}' and '{second}' overlap")


def release_mapped_pages(array: np.ndarray) -> None:
    """Drop the whole pages of `array` from this process's resident memory when it is a view of a
    read-only file mapping (after its values were copied elsewhere): they stay in the page cache,
    and reading the array again brings them back. Any other array: nothing (dropping the pages of
    ordinary memory would zero them)."""
    mapped, mapping = array, None
    while isinstance(mapped, np.ndarray) and mapping is None:  # down to the array made on the mapping
        base = mapped.base.obj if isinstance(mapped.base, memoryview) else mapped.base
        if isinstance(base, mmap.mmap):
            mapping = base
        else:
            mapped = base
    if mapping is None or mapping.closed or mapped.flags.writeable:
        return
    start = array.__array_interface__["data"][0] - mapped.__array_interface__["data"][0]
    if 0 <= start and start + array.nbytes <= len(mapping):
        _drop_pages(mapping, start, start + array.nbytes)


def _drop_pages(mapping: mmap.mmap, start: int, stop: int) -> None:
    """madvise(DONTNEED) the whole pages inside bytes [start, stop) of a read-only mapping."""
    if not hasattr(mmap, "MADV_DONTNEED"):
        return
    page = mmap.PAGESIZE
    first = -(-start // page) * page  # round inward: never touch a neighbour's partial page
    last = stop // page * page
    if last > first:
        mapping.madvise(mmap.MADV_DONTNEED, first, last - first)


def advise_huge_pages(mapping: mmap.mmap) -> None:
    """Ask Linux to map the file with 2 MiB pages where it can (a no-op elsewhere).

    A decode step reads every weight once, so the speed of reading the mapping bounds the speed
    of decoding, and 2 MiB mappings save a page-table walk per 4 KiB. Measured on the development
    machine, the same cached pages of a 709 MB file read by a 2-thread pass: 33.1 GB/s through
    4 KiB mappings, 37.8 through 2 MiB ones. (Where the pages sit in the virtual machine's memory
    mattered more: another copy of the file read 22.4 and 23.0.) Linux maps a range with a 2 MiB
    page when the page cache holds it as one 2 MiB folio: pages this advice makes it read in, or
    a file written or read in large pieces; other ranges keep 4 KiB mappings, same results.
    """
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None:
        return
    try:
        mapping.madvise(advice)
    except OSError:  # transparent huge pages disabled or unsupported: 4 KiB pages
        pass


def dtype_name_of(array: np.ndarray) -> str:
    try:
        return _NAMES[array.dtype]
    except KeyError:
        raise SantacpuError(f"cannot store dtype {array.dtype} in safetensors") from None


def _raw_header(metadata: dict[str, str] | None, shapes: dict[str, tuple[tuple[int, ...], str]]) -> tuple[bytes, int]:
    """(the header's bytes as written, the tensor data's length) of a file with these tensors."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, (shape, dtype_name) in shapes.items():
        nbytes = np.dtype(_DTYPES[dtype_name]).itemsize * int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": dtype_name, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    # UTF-8 as is (not \uXXXX escapes): an embedded tokenizer.json is 15% smaller that way.
    raw_header = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw_header += b" " * (-len(raw_header) % 8)  # keep the data 8-byte aligned
    return raw_header, offset


def safetensors_file_bytes(metadata: dict[str, str] | None, shapes: dict[str, tuple[tuple[int, ...], str]]) -> tuple[int, int]:
    """(the whole file's size, the part of it that is no tensor data: length word and header) of
    the file `write_safetensors` writes with this metadata and these tensors ({name: (shape,
    dtype_name)})."""
    raw_header, data = _raw_header(metadata, shapes)
    return 8 + len(raw_header) + data, 8 + len(raw_header)


def write_safetensors(
    path: str | os.PathLike,
    tensors: Iterable[tuple[str, np.ndarray]] | dict[str, np.ndarray],
    metadata: dict[str, str] | None = None,
    *,
    shapes: dict[str, tuple[tuple[int, ...], str]] | None = None,
    overwrite: bool = True,
) -> None:
    """Write tensors to `path` atomically (temporary file in the same folder, then rename; without
    `overwrite`, a file there is an error, never replaced).

    `tensors` may be a dict or an iterator of (name, array); with an iterator, pass `shapes`
    ({name: (shape, dtype_name)}, in order) so the header can be written before the data and each
    array can be produced, written and freed one at a time (the whole model is never in memory).
    """
    items: Iterator[tuple[str, np.ndarray]]
    if isinstance(tensors, dict):
        shapes = {name: (tuple(a.shape), dtype_name_of(a)) for name, a in tensors.items()}
        items = iter(tensors.items())
    else:
        if shapes is None:
            raise ValueError("write_safetensors needs `shapes` when tensors is an iterator")
        items = iter(tensors)
    raw_header, _ = _raw_header(metadata, shapes)

    with atomic_output(path, overwrite) as f:
        f.write(struct.pack("<Q", len(raw_header)))
        f.write(raw_header)
        for expected_name, (shape, dtype_name) in shapes.items():
            name, array = next(items)
            if name != expected_name or tuple(array.shape) != tuple(shape):
                raise ValueError(f"tensor {name} {array.shape} does not match the declared {expected_name} {shape}")
            array = np.ascontiguousarray(array, dtype=_DTYPES[dtype_name])
            f.write(memoryview(array.reshape(-1)).cast("B"))
