"""Calibration kept between runs of `santacpu quantize`: the importance statistics of a checkpoint
on a calibration text, and each 4-bit type's measured upgrade gains, stored in the quantization
cache folder, so that quantizing the same checkpoint again (another type or size target, or after
a run cut short) skips the minutes they take, as llama.cpp's importance matrix file serves many
`llama-quantize` runs.

Key: the checkpoint's folder with its weight files' names, sizes and modification times (as the
cached quantized files), digests of the calibration text and of its token sequences, the sequence
length, and a digest of the code that computes them (`quantize/`, `santacpu/network/`,
`santacpu/loading/`, with `santacpu/formats/`): any change there computes them again.

File (`calibration-FOLDER-KEY.npz`, NumPy's zip of arrays, read without pickles): "importance/NAME"
float32 [input columns] per matrix, "most_used" int64, "gains/TYPE" and "about" JSON texts. It is
written whole (`atomic_output`) after each stage. One that cannot be read back, is larger than its
checkpoint's statistics can be, or whose values do not fit the checkpoint, is computed again, with
a warning.

May import: numpy, `santacpu` (config, errors, atomic_file, kernel_cache, loading, settings).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np

from santacpu.atomic_file import atomic_output, folder_lock, make_folder
from santacpu.config import Config
from santacpu.errors import SantacpuError, SantacpuWarning
from santacpu.kernel_cache import sources_digest
from santacpu.loading.checkpoint import checkpoint_files
from santacpu.settings import CACHE_ENV, Settings

_PACKAGE = Path(__file__).resolve().parent.parent
# The code whose results are kept: a change in any of these computes them again.
_CODE = ("quantize", "santacpu/network", "santacpu/loading")
FILE_NAME = re.compile(r"calibration-.+-[0-9a-f]{16}\.npz")
_JSON_BYTES = 1 << 20  # "about" and one type's gains: a few kilobytes for SantaCoder


def source_files(folder: Path) -> list[tuple[str, int, int]]:
    """(name, size, modification time in ns) of a checkpoint folder's config.json and weight files,
    sorted: what says the checkpoint changed, in this cache's keys and the cached quantized files'."""
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in checkpoint_files(folder, indexes=False)]


def matrix_columns(config: Config) -> dict[str, int]:
    """The input columns of every matrix calibration measures (`collect_importance`'s names)."""
    columns = {"wte": config.n_embd}
    for i in range(config.n_layer):
        columns.update({f"h.{i}.attn_c_attn_weight": config.n_embd, f"h.{i}.attn_c_proj_weight": config.n_embd,
                        f"h.{i}.mlp_c_fc_weight": config.n_embd, f"h.{i}.mlp_c_proj_weight": config.n_inner})
    return columns


class KeptCalibration:
    """The kept results of one (checkpoint, calibration text) pair: `importance()` and
    `measured(qtype)` give them (None where not kept, or unusable), `keep(...)` stores more."""

    def __init__(self, folder: Path, config: Config, texts: list[str], sequences: list[list[int]], n_ctx: int):
        self.config = config
        self.folder = folder.resolve()
        digest = hashlib.sha256()
        for text in texts:
            digest.update(len(text).to_bytes(8, "little") + text.encode("utf-8", "surrogatepass"))
        recipe = {
            "folder": str(self.folder), "files": source_files(self.folder), "texts": digest.hexdigest(), "n_ctx": n_ctx,
            "sequences": hashlib.sha256(json.dumps(sequences).encode()).hexdigest(),
            "code": [sources_digest(str(_PACKAGE / part)).hex() for part in _CODE],
        }
        key = hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:16]
        self.path = Settings.from_environment().cache_dir / f"calibration-{self.folder.name}-{key}.npz"
        self._arrays: dict[str, np.ndarray] | None = None
        self._unwritable = False
        self.reused: list[str] = []  # what came from the file: "the importance statistics", "the TYPE gains"

    def importance(self) -> dict[str, np.ndarray] | None:
        arrays = self._read()
        columns = matrix_columns(self.config)
        importance = {name[len("importance/"):]: a for name, a in arrays.items() if name.startswith("importance/")}
        if not importance:
            return None
        if importance.keys() != columns.keys() or not all(
            a.dtype == np.float32 and a.shape == (columns[name],) and np.isfinite(a).all() and (a >= 0).all()
            for name, a in importance.items()
        ):
            return self._unusable("its importance statistics do not fit the checkpoint")
        self.reused.append("the importance statistics")
        return importance

    def measured(self, qtype: str) -> tuple[dict[str, dict], np.ndarray] | None:
        """(the upgrade gains measured for the 4-bit type `qtype`, the most used tokens they were
        measured with), or None."""
        arrays = self._read()
        text, most_used = arrays.get(f"gains/{qtype}"), arrays.get("most_used")
        if text is None or most_used is None:
            return None
        if most_used.dtype != np.int64 or most_used.ndim != 1 or len(most_used) > self.config.vocab_size or not (
            (most_used >= 0).all() and (most_used < self.config.vocab_size).all() and len(np.unique(most_used)) == len(most_used)
        ):
            return self._unusable("its most used tokens are not distinct token ids")
        try:
            gains = json.loads(str(text))
            embedding = {int(k): v for k, v in gains.pop("wte", {}).items()}
        except (ValueError, TypeError, AttributeError):
            return self._unusable(f"its {qtype} gains are not readable")
        columns = matrix_columns(self.config)
        values = [v for row in gains.values() if isinstance(row, dict) for v in row.values()] + list(embedding.values())
        if not all(name in columns and isinstance(row, dict) for name, row in gains.items()) or not all(
            isinstance(v, float) and np.isfinite(v) and v >= 0 for v in values
        ) or not all(0 < k <= self.config.vocab_size for k in embedding):
            return self._unusable(f"its {qtype} gains do not fit the checkpoint")
        self.reused.append(f"the {qtype} upgrade gains")
        return {**gains, **({"wte": embedding} if embedding else {})}, most_used

    def keep(self, importance: dict[str, np.ndarray], gains: dict[str, dict] | None = None, qtype: str | None = None,
             most_used: np.ndarray | None = None) -> None:
        """Store `importance`, with the gains measured for `qtype` and the most used tokens when
        given, beside the gains the file holds now for other types where they were measured with
        the same importance and tokens (another run's, kept meanwhile, included); written whole,
        replacing the earlier file. A cache that cannot be written is a warning: the
        quantization itself goes on."""
        if self._unwritable:  # (said once a run)
            return
        arrays = {f"importance/{name}": np.asarray(a, np.float32) for name, a in importance.items()}
        if most_used is not None:
            arrays["most_used"] = np.asarray(most_used, np.int64)
        if gains is not None:
            embedding = {str(k): v for k, v in gains.get("wte", {}).items()}
            arrays[f"gains/{qtype}"] = np.array(json.dumps({**gains, "wte": embedding}))
        # (UTC, as a quantized file's provenance says it: `cache list` shows both)
        about = {"source": str(self.folder), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        arrays["about"] = np.array(json.dumps(about))
        try:
            folder = self.path.parent
            if folder.exists() and not folder.is_dir():
                raise SantacpuError(f"the quantization cache {folder} is not a folder (see {CACHE_ENV})")
            make_folder(folder)
            # Read again under the lock: another run may have kept another type's gains since this
            # one read the file (two quantizations at once each wrote back only their own).
            with folder_lock(folder):
                arrays = {**self._kept_beside(arrays), **arrays}
                with atomic_output(self.path) as f:
                    np.savez(f, **arrays)
        except SantacpuError as problem:
            self._unwritable = True
            warnings.warn(f"the calibration is not kept for later runs: {problem}", SantacpuWarning, stacklevel=2)
            return
        self._arrays = arrays

    def _kept_beside(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The gains (and their most used tokens) in the file now that were measured with the
        importance and most used tokens in `arrays`: those to keep beside them."""
        on_disk = read_kept(self.path, self.config) if self.path.is_file() else None
        if not on_disk:
            return {}
        mine = {name for name in arrays if name.startswith("importance/")}
        if mine != {name for name in on_disk if name.startswith("importance/")} or not all(
            np.array_equal(arrays[name], on_disk[name]) for name in mine
        ):
            return {}
        if "most_used" in arrays and not np.array_equal(arrays["most_used"], on_disk.get("most_used", [])):
            return {}
        return {name: a for name, a in on_disk.items() if name.startswith("gains/") or name == "most_used"}

    def _read(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            self._arrays = read_kept(self.path, self.config) if self.path.is_file() else {}
            if self._arrays is None:
                self._unusable("it is not a readable calibration file")
        return self._arrays

    def _unusable(self, why: str) -> None:
        warnings.warn(f"the kept calibration {self.path} is computed again: {why}", SantacpuWarning, stacklevel=3)
        self._arrays = {}
        return None


def read_kept(path: Path, config: Config | None) -> dict[str, np.ndarray] | None:
    """The arrays of a calibration file, None where it cannot be read or is larger than
    `config`'s statistics can be (no member is inflated past that; no pickles)."""
    columns = sum(matrix_columns(config).values()) if config is not None else 1 << 26
    largest = 4 * columns + 8 * (config.vocab_size if config is not None else 1 << 20) + 8 * _JSON_BYTES
    try:
        if path.stat().st_size > largest:
            return None
        with zipfile.ZipFile(path) as archive:
            if sum(info.file_size for info in archive.infolist()) > largest:
                return None
        with np.load(path, allow_pickle=False) as members:
            return {name: members[name] for name in members.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return None


def about(path: Path) -> dict:
    """A calibration file's "about" (source folder, when made), {} where it cannot be read."""
    arrays = read_kept(path, None)
    try:
        found = json.loads(str(arrays["about"])) if arrays else {}
    except (KeyError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}
