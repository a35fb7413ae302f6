"""Read PyTorch ``pytorch_model.bin`` checkpoints without torch and without running pickle code.

This module owns the zip checkpoint format that ``torch.save`` has written since torch 1.6: a
ZIP_STORED archive holding ``<prefix>/data.pkl`` (a pickle describing the state dict) and one raw
record ``<prefix>/data/<key>`` per storage. ``read_torch_zip`` returns ``{name: numpy.ndarray}``.

Safety: the pickle is loaded by an unpickler whose ``find_class`` hands out only our own tensor
rebuilders and storage-type markers, so a checkpoint cannot name ``os.system`` or any other callable.
Memory: storages are read-only views into one memory map of the whole file, so loading a 4 GB
checkpoint costs address space, not RAM. bf16 storages are the exception: NumPy has no bf16, so they
are widened to float32 copies. A compressed archive (valid zip, though torch never writes one) is
inflated only as far as each tensor needs, and data.pkl only up to `MAX_PICKLE_BYTES`, so a small
file cannot expand into gigabytes.

May import: numpy, `santacpu.errors`.
"""

from __future__ import annotations

import functools
import mmap
import os
import pickle
import struct
import zipfile
from collections import OrderedDict

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ..errors import SantacpuError

# torch.save still pickles typed storages by their legacy class names (checked with torch 2.13).
# "bf16" is a marker: the raw bits are uint16 and get widened to float32 after mapping.
_STORAGE_DTYPES = {
    "FloatStorage": "f4",
    "HalfStorage": "f2",
    "BFloat16Storage": "bf16",
    "DoubleStorage": "f8",
    "LongStorage": "i8",
    "IntStorage": "i4",
    "ShortStorage": "i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}

# torch's data.pkl holds ~100 bytes per tensor (SantaCoder's: ~40 KB); a larger one is hostile, and
# unpickling can cost tens of times its size in objects.
MAX_PICKLE_BYTES = 8 * 1024 * 1024

_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"  # pre-1.6 torch.save
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, skipped fields, name length, extra length


class _StorageType:
    """Stands in for ``torch.<X>Storage``: the pickle only uses it as a tag in persistent ids."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


class _Tensor:
    """A rebuilt tensor before the final check; keeps arrays apart from other pickled values."""

    def __init__(self, array: np.ndarray):
        self.array = array


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *_):
    return data  # nn.Parameter wraps a tensor; the wrapper means nothing without autograd


def read_torch_zip(path) -> dict[str, np.ndarray]:
    """Load a torch zip checkpoint as ``{state-dict name: array}``; raise SantacpuError on bad input."""
    path = os.fspath(path)
    label = os.path.basename(path)

    def fail(why: str) -> SantacpuError:
        return SantacpuError(f"{label}: {why}")

    mm, size = _map_zip(path, fail)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        # The zip directory lives at the end of the file, so a cut-off download loses it first.
        raise fail("zip archive is truncated or corrupt") from None

    with zf:
        pkl_names = [n for n in zf.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
        if not pkl_names:
            raise fail("no data.pkl in the archive; not a torch.save checkpoint")
        prefix = pkl_names[0][: -len("data.pkl")]
        byteorder = "<"  # records hold raw machine bytes; torch >= 1.12 says which order
        if f"{prefix}byteorder" in zf.namelist() and _read_member(zf, f"{prefix}byteorder", 8, fail) == b"big":
            byteorder = ">"
        storages = _Storages(zf, prefix, byteorder, mm, size, fail)
        obj = _unpickle(zf, pkl_names[0], storages, fail)

    if not isinstance(obj, dict) or not all(
            isinstance(k, str) and isinstance(v, _Tensor) for k, v in obj.items()):
        raise fail(f"top-level object is a {type(obj).__name__}, not a dict of named tensors "
                   "(a plain state_dict)")
    return {k: v.array for k, v in obj.items()}


def _map_zip(path: str, fail) -> tuple[mmap.mmap | None, int]:
    """(a read-only map of the whole file, or None for an empty one; its size), after checking
    that it starts like a zip archive, not like a legacy torch.save file."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(_LEGACY_MAGIC))
            size = os.fstat(f.fileno()).st_size
            # The map holds its own handle, so the file may be closed while the arrays live on.
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
    except OSError as e:
        raise fail(f"cannot read checkpoint: {e.strerror or e}") from None
    if head.startswith(_LEGACY_MAGIC):
        raise fail("legacy (pre-1.6) torch.save format is not supported; re-save it with a current "
                   "torch or convert it to safetensors")
    if not head.startswith(b"PK\x03\x04"):
        raise fail("not a PyTorch zip checkpoint (no zip signature)")
    return mm, size


class _Storages:
    """The archive's storage records as arrays, each mapped once (tied weights share one key)."""

    def __init__(self, zf: zipfile.ZipFile, prefix: str, byteorder: str, mm, size: int, fail):
        self.zf, self.prefix, self.byteorder, self.mm, self.size, self.fail = zf, prefix, byteorder, mm, size, fail
        self.arrays: dict[str, np.ndarray] = {}

    def get(self, stype: _StorageType, key: str, numel: int) -> np.ndarray:
        if key not in self.arrays:
            self.arrays[key] = self._read(stype, key, numel)
        return self.arrays[key]

    def _read(self, stype: _StorageType, key: str, numel: int) -> np.ndarray:
        fail, mm, size, byteorder = self.fail, self.mm, self.size, self.byteorder
        try:
            info = self.zf.getinfo(f"{self.prefix}data/{key}")
        except KeyError:
            raise fail(f"storage record 'data/{key}' is missing") from None
        itemsize = 2 if stype.dtype == "bf16" else np.dtype(stype.dtype).itemsize
        nbytes = int(numel) * itemsize
        if not 0 <= nbytes <= info.file_size:
            raise fail(f"storage record 'data/{key}' holds {info.file_size} bytes, "
                       f"expected {nbytes}")
        if info.compress_type == zipfile.ZIP_STORED:
            # Read the local header itself: its extra field (torch pads it to align data to
            # 64 bytes) may differ from the copy in the central directory.
            sig, n_name, n_extra = b"", 0, 0
            if info.header_offset + _LOCAL_HEADER.size <= size:
                sig, n_name, n_extra = _LOCAL_HEADER.unpack_from(mm, info.header_offset)
            start = info.header_offset + _LOCAL_HEADER.size + n_name + n_extra
            if sig != b"PK\x03\x04" or start + nbytes > size:
                raise fail(f"storage record 'data/{key}' is truncated or corrupt")
            raw = np.frombuffer(mm, np.uint8, nbytes, start)
        else:  # not written by torch, but still a valid zip: inflate what the tensor needs
            data = _read_member(self.zf, info, nbytes, fail)
            if len(data) != nbytes:
                raise fail(f"storage record 'data/{key}' inflates to {len(data)} bytes, expected {nbytes}")
            raw = np.frombuffer(data, np.uint8)
        if stype.dtype == "bf16":  # bf16 is the top half of a float32
            arr = (raw.view(byteorder + "u2").astype(np.uint32) << 16).view(np.float32)
            arr.flags.writeable = False
        else:
            arr = raw.view(np.dtype(stype.dtype).newbyteorder(byteorder))
        return arr


def _read_member(zf: zipfile.ZipFile, member, limit: int, fail) -> bytes:
    """At most `limit` bytes of an archive member, inflated piece by piece (zipfile streams), so a
    member that claims or inflates to more costs no more than `limit` bytes of memory."""
    name = member.filename if isinstance(member, zipfile.ZipInfo) else member
    try:
        with zf.open(member) as stream:
            return stream.read(limit)
    except Exception as e:  # zlib, EOF and header errors all mean a damaged record
        raise fail(f"'{name}' is unreadable: {e}") from None


def _rebuild_tensor(fail, stor, offset, shape, stride, *_):
    """``torch._utils._rebuild_tensor_v2``: a read-only strided view of a storage, bounds checked."""
    if not isinstance(stor, np.ndarray):
        raise fail("tensor does not reference a storage record")
    offset = int(offset)
    shape, stride = tuple(int(s) for s in shape), tuple(int(s) for s in stride)
    if len(shape) != len(stride) or min(shape + stride + (offset,), default=0) < 0:
        raise fail(f"tensor has invalid shape {shape} / stride {stride}")
    # as_strided trusts us blindly; check the furthest element stays inside the storage.
    last = offset + sum((n - 1) * s for n, s in zip(shape, stride))
    if 0 not in shape and last >= stor.size:
        raise fail(f"tensor {shape} at offset {offset} overruns its storage")
    # And that no two elements share a place: with stride 0 (or overlapping strides) a file of a
    # few kilobytes declared a tensor of billions of values, and the work was the declared size's.
    extent = 1
    for s, n in sorted((s, n) for n, s in zip(shape, stride) if n > 1):  # (a dim of 1: any stride)
        if s < extent:
            raise fail(f"tensor {shape} with stride {stride} has elements that overlap in its storage")
        extent = s * n
    base = stor[offset:] if 0 not in shape else stor[:0]
    view = as_strided(base, shape, tuple(s * stor.itemsize for s in stride),
                      writeable=False)
    return _Tensor(view)


def _unpickle(zf: zipfile.ZipFile, pkl_name: str, storages: _Storages, fail):
    """data.pkl loaded by an unpickler that hands out only tensor rebuilders and storage tags."""
    allowed = {
        ("collections", "OrderedDict"): OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): functools.partial(_rebuild_tensor, fail),
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
    }

    class RestrictedUnpickler(pickle.Unpickler):
        def find_class(self, module, name):
            try:
                return allowed[(module, name)]
            except KeyError:
                raise fail(f"refusing to unpickle '{module}.{name}': only tensor data is "
                           "allowed") from None

        def persistent_load(self, pid):
            if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage"
                    or not isinstance(pid[1], _StorageType)):
                raise fail(f"unexpected persistent id {str(pid)[:60]!r} in data.pkl")
            _, stype, key, _location, numel = pid
            return storages.get(stype, str(key), numel)

    size = zf.getinfo(pkl_name).file_size
    if size > MAX_PICKLE_BYTES:
        raise fail(f"data.pkl is {size} bytes, more than a checkpoint's tensor list needs "
                   f"(at most {MAX_PICKLE_BYTES}); refusing to unpickle it")
    try:
        # zipfile stops a member at its declared size, so the stream ends by MAX_PICKLE_BYTES.
        with zf.open(pkl_name) as pf:
            return RestrictedUnpickler(pf).load()
    except SantacpuError:
        raise
    except Exception as e:  # malformed pickle: stay one line, no traceback
        raise fail(f"data.pkl is corrupt: {type(e).__name__}: {e}") from None
