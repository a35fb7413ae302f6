"""Reading a full-precision SantaCoder checkpoint folder into canonical `ModelWeights`.

Owns: finding the weight files in a folder (single or sharded safetensors, single or sharded
`pytorch_model.bin`), telling the two published layouts apart, checking every tensor's shape, and
the one place where a layout is turned into the canonical one (see `santacpu.network.weights`).

Memory: tensors are memory-mapped views of the files. A tensor that must be converted (the legacy
layout's transposes, bf16 widening) is converted on its own and its source pages are then handed
back to the kernel, so the process never holds two copies of the model.

May import: `santacpu.network.weights`, `santacpu.loading.transpose`, `santacpu.formats`, foundation modules.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path, PurePosixPath
from typing import Callable

import numpy as np

from .transpose import transpose_into
from ..config import Config
from ..errors import SantacpuError
from ..formats.quantized_file import is_quantized_file
from ..formats.safetensors_io import SafetensorsFile, bf16_to_f32, release_mapped_pages
from ..network.weights import LayerWeights, ModelWeights, expected_layer_shapes
from ..progress import Progress
from ..small_files import INDEX_LIMIT, read_json_file

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_SINGLE = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"


class TensorSource:
    """All tensors of one checkpoint, across shards: `names()`, `shape(n)`, `array(n)`, `release(n)`."""

    def __init__(self, shards: dict[str, object], describe: str):
        # shards: tensor name -> the SafetensorsFile or dict (torch zip) that holds it
        self._shard_of = shards
        self.describe = describe

    def names(self) -> set[str]:
        return set(self._shard_of)

    def __contains__(self, name: str) -> bool:
        return name in self._shard_of

    def shape(self, name: str) -> tuple[int, ...]:
        shard = self._shard_of[name]
        if isinstance(shard, SafetensorsFile):
            return shard.shape(name)
        return tuple(shard[name].shape)

    def dtype(self, name: str) -> np.dtype:
        """The dtype `array(name)` will have, without reading (or widening) the data."""
        shard = self._shard_of[name]
        if isinstance(shard, SafetensorsFile):
            return np.dtype(np.float32) if shard.dtype_name(name) == "BF16" else shard.array(name).dtype
        return shard[name].dtype

    def array(self, name: str) -> np.ndarray:
        """The tensor as a NumPy array of a real float dtype (bf16 is widened to float32)."""
        shard = self._shard_of[name]
        if isinstance(shard, SafetensorsFile):
            array = shard.array(name)
            return bf16_to_f32(array) if shard.dtype_name(name) == "BF16" else array
        return shard[name]

    def release_array(self, array: np.ndarray) -> None:
        """Drop the mapped pages under `array` from our resident memory, if it is a file view."""
        release_mapped_pages(array)

    def release(self, name: str) -> None:
        """Tell the kernel this tensor's mapped pages are no longer needed (after a converting copy)."""
        shard = self._shard_of[name]
        if isinstance(shard, SafetensorsFile):
            shard.release(name)


def _read_index(index_path: Path) -> dict[str, str]:
    """The index's weight map, {tensor name: shard file name}, every shard named inside the folder
    (a plain relative path without '..': an index cannot send the reader elsewhere)."""
    index = read_json_file(index_path, "shard index", INDEX_LIMIT)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise SantacpuError(f"{index_path} is not a valid shard index (needs a 'weight_map' object)")
    for file_name in weight_map.values():
        if not isinstance(file_name, str):
            raise SantacpuError(f"{index_path} names a shard by {json.dumps(file_name)[:60]}, not by a file name")
        shard = PurePosixPath(file_name)
        if not file_name or shard.is_absolute() or ".." in shard.parts:
            raise SantacpuError(f"{index_path} names the shard '{file_name}', which is not a file inside its folder")
    return weight_map


def open_tensors(folder: Path) -> TensorSource:
    """Open the weight files in `folder`, preferring safetensors over pytorch_model.bin."""
    from ..formats.torch_zip import read_torch_zip  # only needed for .bin checkpoints

    openers: list[tuple[str, str, Callable[[Path], object]]] = [
        (SAFETENSORS_INDEX, SAFETENSORS_SINGLE, SafetensorsFile),
        (TORCH_INDEX, TORCH_SINGLE, read_torch_zip),
    ]
    for index_name, single_name, opener in openers:
        if (folder / index_name).is_file():
            weight_map = _read_index(folder / index_name)
            opened: dict[str, tuple[object, set[str]]] = {}  # shard file -> (shard, its tensors' names)
            shards: dict[str, object] = {}
            for tensor_name, file_name in weight_map.items():
                file_name = os.path.normpath(file_name)  # ("./a", ".//a", "a": one shard, opened once)
                if file_name not in opened:
                    if not (folder / file_name).is_file():
                        raise SantacpuError(f"shard {file_name} listed in {index_name} is missing from {folder}")
                    shard = opener(folder / file_name)
                    opened[file_name] = (shard, set(_names(shard)))
                shard, names = opened[file_name]
                if tensor_name not in names:
                    raise SantacpuError(f"{index_name} in {folder} puts tensor '{tensor_name}' in shard {file_name}, "
                                        "which does not hold it")
                shards[tensor_name] = shard
            return TensorSource(shards, f"{folder}/{index_name}")
        if (folder / single_name).is_file():
            shard = opener(folder / single_name)
            return TensorSource({n: shard for n in _names(shard)}, f"{folder}/{single_name}")
    raise SantacpuError(
        f"no weights in {folder}: expected {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, {TORCH_SINGLE} or {TORCH_INDEX}"
    )


def _names(shard) -> list[str]:
    """The names of the tensors a weight file holds (a safetensors file, or a torch zip's dict)."""
    return shard.names() if isinstance(shard, SafetensorsFile) else list(shard)


def _float_matrix(array: np.ndarray, transpose: bool, out: np.ndarray | None = None) -> np.ndarray:
    """Keep float16/float32 as they are (fp16 files stay half the size); anything else becomes
    float32. With `transpose`, the transposed copy goes into `out` (allocated if None)."""
    if array.dtype not in (np.float16, np.float32):
        array = array.astype(np.float32)
    if not transpose:
        return array
    if out is None:
        out = np.empty(array.shape[::-1], array.dtype)
    bits = np.uint16 if array.dtype == np.float16 else np.float32  # Numba has no CPU float16
    transpose_into(np.ascontiguousarray(array).view(bits), out.view(bits))
    return out


def _float_vector(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=np.float32)


class _LayoutReader:
    """Reads tensors by checkpoint name, checking shapes, and releases what it had to copy."""

    def __init__(self, source: TensorSource, prefix: str):
        self.source = source
        self.prefix = prefix

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        full = self.prefix + name
        if full not in self.source:
            raise SantacpuError(f"{self.source.describe} lacks the tensor '{full}' (incomplete or wrong checkpoint)")
        found = self.source.shape(full)
        if tuple(found) != tuple(shape):
            raise SantacpuError(
                f"tensor '{full}' has shape {list(found)} but config.json implies {list(shape)}"
            )
        kind = self.source.dtype(full)
        if kind.kind != "f":  # integers would be read as weights of their own values: nonsense, not an error
            raise SantacpuError(f"tensor '{full}' holds {kind} values, not floating-point weights (a damaged or wrong checkpoint)")
        return self.source.array(full)

    def matrix(
        self, name: str, shape: tuple[int, ...], transpose: bool = False, out: np.ndarray | None = None
    ) -> np.ndarray:
        array = self.get(name, shape)
        result = _float_matrix(array, transpose, out)
        if not np.shares_memory(result, array):
            self.source.release(self.prefix + name)
        return result

    def vector(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        return _float_vector(self.get(name, shape))


def _legacy_layer(r: _LayoutReader, config: Config, i: int) -> LayerWeights:
    # Legacy bigcode/santacoder uses GPT-2 Conv1D layers: weights stored [in, out], so transpose once.
    E, I, KV = config.n_embd, config.n_inner, config.kv_dim
    p = f"h.{i}."
    if config.multi_query:
        q_name = r.prefix + p + "attn.q_attn.weight"
        # (a missing tensor falls through to r.matrix below, which names it in a clear error)
        dtype = np.float16 if q_name in r.source and r.source.dtype(q_name) == np.float16 else np.float32
        attn_weight = np.empty((E + 2 * KV, E), dtype)  # rows Q | K | V, transposed straight in
        r.matrix(p + "attn.q_attn.weight", (E, E), transpose=True, out=attn_weight[:E])
        r.matrix(p + "attn.kv_attn.weight", (E, 2 * KV), transpose=True, out=attn_weight[E:])
        attn_bias = np.concatenate([r.vector(p + "attn.q_attn.bias", (E,)), r.vector(p + "attn.kv_attn.bias", (2 * KV,))])
    else:
        # Multi-head GPT-2: c_attn columns are Q | K | V, already the canonical order once transposed.
        attn_weight = r.matrix(p + "attn.c_attn.weight", (E, 3 * E), transpose=True)
        attn_bias = r.vector(p + "attn.c_attn.bias", (3 * E,))
    return LayerWeights(
        ln_1_weight=r.vector(p + "ln_1.weight", (E,)),
        ln_1_bias=r.vector(p + "ln_1.bias", (E,)),
        attn_c_attn_weight=attn_weight,
        attn_c_attn_bias=attn_bias,
        attn_c_proj_weight=r.matrix(p + "attn.c_proj.weight", (E, E), transpose=True),
        attn_c_proj_bias=r.vector(p + "attn.c_proj.bias", (E,)),
        ln_2_weight=r.vector(p + "ln_2.weight", (E,)),
        ln_2_bias=r.vector(p + "ln_2.bias", (E,)),
        mlp_c_fc_weight=r.matrix(p + "mlp.c_fc.weight", (E, I), transpose=True),
        mlp_c_fc_bias=r.vector(p + "mlp.c_fc.bias", (I,)),
        mlp_c_proj_weight=r.matrix(p + "mlp.c_proj.weight", (I, E), transpose=True),
        mlp_c_proj_bias=r.vector(p + "mlp.c_proj.bias", (E,)),
    )


def _bigcode_layer(r: _LayoutReader, config: Config, i: int) -> LayerWeights:
    E, I, KV = config.n_embd, config.n_inner, config.kv_dim
    D, H = config.head_dim, config.n_head
    p = f"h.{i}."
    QKV = E + 2 * KV
    attn_weight = r.matrix(p + "attn.c_attn.weight", (QKV, E))
    attn_bias = r.vector(p + "attn.c_attn.bias", (QKV,))
    if not config.multi_query:
        # gpt_bigcode multi-head interleaves per head (q_h, k_h, v_h); regroup to Q | K | V.
        order = np.arange(QKV).reshape(H, 3, D).transpose(1, 0, 2).reshape(-1)
        attn_weight = np.ascontiguousarray(attn_weight[order])
        attn_bias = attn_bias[order]
    return LayerWeights(
        ln_1_weight=r.vector(p + "ln_1.weight", (E,)),
        ln_1_bias=r.vector(p + "ln_1.bias", (E,)),
        attn_c_attn_weight=attn_weight,
        attn_c_attn_bias=attn_bias,
        attn_c_proj_weight=r.matrix(p + "attn.c_proj.weight", (E, E)),
        attn_c_proj_bias=r.vector(p + "attn.c_proj.bias", (E,)),
        ln_2_weight=r.vector(p + "ln_2.weight", (E,)),
        ln_2_bias=r.vector(p + "ln_2.bias", (E,)),
        mlp_c_fc_weight=r.matrix(p + "mlp.c_fc.weight", (I, E)),
        mlp_c_fc_bias=r.vector(p + "mlp.c_fc.bias", (I,)),
        mlp_c_proj_weight=r.matrix(p + "mlp.c_proj.weight", (E, I)),
        mlp_c_proj_bias=r.vector(p + "mlp.c_proj.bias", (E,)),
    )


def _detect_prefix(source: TensorSource) -> str:
    """`transformer.` for LM-head checkpoints; bare names for a saved base model."""
    names = source.names()
    for prefix in ("transformer.", ""):
        if any(n.startswith(prefix + "h.0.") for n in names) or prefix + "wpe.weight" in names:
            return prefix
    raise SantacpuError(f"{source.describe} holds no GPT-2/SantaCoder tensors (no 'transformer.h.0.*')")


def _check_layout(source: TensorSource, config: Config, prefix: str) -> None:
    """A clear message when config.json and the tensors disagree about the layout."""
    names = source.names()
    legacy_mq = prefix + "h.0.attn.q_attn.weight" in names
    fused = prefix + "h.0.attn.c_attn.weight" in names
    if config.model_type == "gpt2" and config.multi_query and not legacy_mq:
        hint = " (they look like the gpt_bigcode layout: is config.json from another checkpoint?)" if fused else ""
        raise SantacpuError(f"config.json says the legacy multi-query layout but the weights have no q_attn/kv_attn{hint}")
    if config.model_type == "gpt_bigcode" and not fused:
        hint = " (they look like the legacy bigcode/santacoder layout)" if legacy_mq else ""
        raise SantacpuError(f"config.json says gpt_bigcode but the weights have no fused c_attn{hint}")
    # A config.json of fewer layers than the weights hold (a hand edit, another checkpoint's file)
    # ran the first layers only, with no word.
    layer = re.compile(re.escape(prefix) + r"h\.(\d+)\.")
    held = {int(m.group(1)) for m in map(layer.match, names) if m}
    if held and max(held) >= config.n_layer:
        raise SantacpuError(f"config.json says n_layer {config.n_layer}, but the weights hold layer {max(held)} "
                            f"({max(held) + 1} layers or more): is config.json from another checkpoint?")


class CheckpointReader:
    """Canonical tensors of one checkpoint, produced on demand: a converter can take one layer at a
    time (only that layer's converted copies are alive) while `load_weights` takes them all."""

    def __init__(self, source: TensorSource, config: Config):
        self.config = config
        self.prefix = _detect_prefix(source)
        _check_layout(source, config, self.prefix)
        self.source = source
        self._reader = _LayoutReader(source, self.prefix)
        self._build_layer = _legacy_layer if config.model_type == "gpt2" else _bigcode_layer

    def wte(self) -> np.ndarray:
        """The tied embedding [V, E]. It may be stored as wte, as lm_head only (safetensors
        conversions keep one name of tied tensors), or as both (same data: take wte)."""
        c = self.config
        if self.prefix + "wte.weight" in self.source:
            return self._reader.matrix("wte.weight", (c.vocab_size, c.n_embd))
        if "lm_head.weight" in self.source:
            return _LayoutReader(self.source, "").matrix("lm_head.weight", (c.vocab_size, c.n_embd))
        raise SantacpuError(f"{self.source.describe} has neither '{self.prefix}wte.weight' nor 'lm_head.weight'")

    def wpe(self) -> np.ndarray:
        return self._reader.matrix("wpe.weight", (self.config.n_positions, self.config.n_embd))

    def layer(self, i: int) -> LayerWeights:
        layer = self._build_layer(self._reader, self.config, i)
        for name, shape in expected_layer_shapes(self.config).items():
            assert getattr(layer, name).shape == shape, (name, getattr(layer, name).shape, shape)
        return layer

    def release(self, layer: LayerWeights) -> None:
        """Done with a layer from `layer`: its memory-mapped source pages leave this process's
        resident memory (they stay in the page cache). Calibration reads every layer many times."""
        for field in dataclasses.fields(layer):
            self.source.release_array(getattr(layer, field.name))

    def ln_f(self) -> tuple[np.ndarray, np.ndarray]:
        E = self.config.n_embd
        return self._reader.vector("ln_f.weight", (E,)), self._reader.vector("ln_f.bias", (E,))


def load_weights(reader: CheckpointReader, show_progress: bool = False) -> ModelWeights:
    """All of a checkpoint's canonical weights at once (either layout)."""
    config = reader.config
    bar = Progress(config.n_layer, "loading layers") if show_progress else None
    wte, wpe = reader.wte(), reader.wpe()
    layers = []
    for i in range(config.n_layer):
        layers.append(reader.layer(i))
        if bar:
            bar.step(f"layer {i}")
    ln_f_weight, ln_f_bias = reader.ln_f()
    return ModelWeights(config=config, wte=wte, wpe=wpe, layers=layers, ln_f_weight=ln_f_weight, ln_f_bias=ln_f_bias)


def checkpoint_files(folder: Path, indexes: bool = True) -> list[Path]:
    """config.json and the weight files of the checkpoint in `folder` (its shard indexes too, with
    `indexes`), sorted: what says what it holds. A santacpu quantized file written into the folder
    is none of them (the checkpoint is read without it)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and (
        p.name == "config.json" or (indexes and p.name.endswith(".index.json"))
        or (p.suffix in (".safetensors", ".bin") and not is_quantized_file(p))))


def open_checkpoint(folder: str | os.PathLike) -> CheckpointReader:
    folder = Path(folder)
    config = Config.from_file(folder / "config.json")  # first: a bad config is the clearer message
    return CheckpointReader(open_tensors(folder), config)


def read_checkpoint(folder: str | os.PathLike, show_progress: bool = False) -> ModelWeights:
    """config.json + weights of a full-precision checkpoint folder -> canonical ModelWeights."""
    return load_weights(open_checkpoint(folder), show_progress)
