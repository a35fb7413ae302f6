"""Loading checkpoints through the API: both layouts, zero-copy mapping, embedding names, shards,
bf16, interoperability with the official safetensors package, the hub cache, and every way a
folder or a request can be wrong (each must be one clear SantacpuError).

Checkpoints are the tiny random ones of tools/random_checkpoint.py (real 49280-row vocabulary,
n_positions 64); nothing here imports torch or transformers.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import helpers
import santacpu
from santacpu import SantacpuError
from santacpu.model import quant_as_it_is
from santacpu.loading.checkpoint import read_checkpoint
from santacpu.formats.safetensors_io import SafetensorsFile, bf16_to_f32, write_safetensors
from tools.random_checkpoint import config_json, write_checkpoint

def load_exact(source, **options) -> santacpu.Model:
    """santacpu.load with an fp32 KV cache. These tests compare loading paths to 1e-6 of the
    logits; the default fp16 cache rounds K/V to 11 bits, which turns BLAS's alignment-dependent
    last-bit differences into ~1e-4 ones."""
    return santacpu.load(source, **{"kv_cache": "float32", "quant": quant_as_it_is(source), **options})


PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n"
N_CTX = 64  # the tiny checkpoints' n_positions
_models: dict[tuple, santacpu.Model] = {}


def model_of(layout="gpt_bigcode", dtype="float32", multi_query=True, seed=0) -> santacpu.Model:
    key = (layout, dtype, multi_query, seed)
    if key not in _models:
        _models[key] = load_exact(helpers.tiny_checkpoint(layout, dtype, multi_query, seed))
    return _models[key]


def prompt_ids() -> list[int]:
    return model_of().tokenizer.encode(PROMPT)


def reference_logits(dtype="float32", multi_query=True) -> np.ndarray:
    return model_of("gpt_bigcode", dtype, multi_query).logits(prompt_ids())


def assert_close(found: np.ndarray, expected: np.ndarray, rel: float) -> None:
    assert found.shape == expected.shape
    assert np.all(np.isfinite(found))
    err = float(np.max(np.abs(found - expected)))
    assert err <= rel * float(np.max(np.abs(expected))), f"max abs error {err} vs scale {np.max(np.abs(expected))}"


def all_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file, copied (so the file may be replaced afterwards)."""
    f = SafetensorsFile(path)
    return {name: np.array(f.array(name)) for name in f.names()}


def safetensors_header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return 8 + n, json.loads(f.read(n))


def load_error(path, **kwargs) -> str:
    with pytest.raises(SantacpuError) as info:
        load_exact(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message, "errors are one line"
    return message


# ---------------------------------------------------------------------------------------------
# Both layouts, both dtypes, multi-query and multi-head


@pytest.mark.parametrize("multi_query", [True, False], ids=["mq", "mh"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_legacy_and_gpt_bigcode_layouts_give_the_same_logits(dtype, multi_query):
    bigcode = model_of("gpt_bigcode", dtype, multi_query)
    legacy = model_of("legacy", dtype, multi_query)
    for m in (bigcode, legacy):
        assert m.config.multi_query is multi_query
        assert m.config.n_kv_head == (1 if multi_query else m.config.n_head)
        assert m.config.n_positions == N_CTX
    assert bigcode.config.model_type == "gpt_bigcode" and legacy.config.model_type == "gpt2"
    ids = prompt_ids()
    expected = bigcode.logits(ids)
    assert expected.shape == (len(ids), 49280) and expected.dtype == np.float32
    assert_close(legacy.logits(ids), expected, 1e-6)
    # A short prompt takes the matrix-vector path rather than BLAS: the layouts agree there too.
    assert_close(legacy.logits(ids[:3]), bigcode.logits(ids[:3]), 1e-6)


def test_different_seeds_are_different_models():
    # Guards the comparisons above against a loader that ignores the weights.
    a, b = reference_logits(), model_of(seed=1).logits(prompt_ids())
    assert np.max(np.abs(a - b)) > 0.1 * np.max(np.abs(a))


@pytest.mark.parametrize("multi_query", [True, False], ids=["mq", "mh"])
def test_fp16_file_matches_fp32_file_to_fp16_precision(multi_query):
    assert_close(reference_logits("float16", multi_query), reference_logits("float32", multi_query), 1e-2)


def _mapped_root(array: np.ndarray) -> np.ndarray:
    """The ndarray at the bottom of `array`'s .base chain; fails unless it sits on an mmap."""
    root = array
    while isinstance(root.base, np.ndarray):
        root = root.base
    owner = root.base
    if isinstance(owner, memoryview):
        owner = owner.obj
    assert isinstance(owner, mmap.mmap), f"not memory-mapped: the base chain ends in {type(owner).__name__}"
    return root


@pytest.mark.parametrize("multi_query", [True, False], ids=["mq", "mh"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_gpt_bigcode_matrices_are_zero_copy_views_of_the_file(dtype, multi_query):
    folder = helpers.tiny_checkpoint("gpt_bigcode", dtype, multi_query)
    weights = read_checkpoint(folder)
    data_start, header = safetensors_header(folder / "model.safetensors")
    matrices = {"transformer.wte.weight": weights.wte, "transformer.wpe.weight": weights.wpe}
    for i, layer in enumerate(weights.layers):
        p = f"transformer.h.{i}."
        matrices[p + "attn.c_proj.weight"] = layer.attn_c_proj_weight
        matrices[p + "mlp.c_fc.weight"] = layer.mlp_c_fc_weight
        matrices[p + "mlp.c_proj.weight"] = layer.mlp_c_proj_weight
        if multi_query:  # multi-head c_attn is regrouped from per-head order: a copy by design
            matrices[p + "attn.c_attn.weight"] = layer.attn_c_attn_weight
    for name, array in matrices.items():
        assert array.dtype == np.dtype(dtype), name
        assert not array.flags.owndata and not array.flags.writeable, name
        root = _mapped_root(array)
        assert np.shares_memory(array, root), name
        # ... and it is exactly this tensor's bytes in the file, not some other mapped copy.
        begin, end = header[name]["data_offsets"]
        assert array.ctypes.data - root.ctypes.data == data_start + begin, name
        assert array.nbytes == end - begin, name
    # Small parameters are float32 whatever the file holds.
    assert weights.layers[0].ln_1_weight.dtype == np.float32
    assert weights.layers[0].mlp_c_fc_bias.dtype == np.float32


def _vm_flags_of_mappings(path: Path) -> list[set[str]]:
    """The VmFlags of each of this process's mappings of `path` (Linux's /proc/self/smaps)."""
    flags, current = [], False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):
                current = len(fields) >= 6 and os.path.realpath(fields[5]) == os.path.realpath(path)
            elif current and fields[0] == "VmFlags:":
                flags.append(set(fields[1:]))
    return flags


@pytest.mark.skipif(
    not (os.path.exists("/proc/self/smaps") and os.path.isdir("/sys/kernel/mm/transparent_hugepage")),
    reason="needs Linux with transparent huge pages",
)
def test_weights_are_mapped_with_huge_page_advice():
    # Decode reads every weight once a token: 2 MiB mappings read faster (safetensors_io docstring).
    path = helpers.tiny_checkpoint("gpt_bigcode", "float32", True) / "model.safetensors"
    opened = SafetensorsFile(path)
    mappings = _vm_flags_of_mappings(path)
    assert mappings and all("hg" in flags for flags in mappings)
    del opened


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_legacy_matrices_are_transposed_copies_of_the_same_dtype(dtype):
    weights = read_checkpoint(helpers.tiny_checkpoint("legacy", dtype))
    fc = weights.layers[0].mlp_c_fc_weight
    assert fc.dtype == np.dtype(dtype) and fc.flags.c_contiguous
    assert fc.shape == (weights.config.n_inner, weights.config.n_embd)


# ---------------------------------------------------------------------------------------------
# Where the tied embedding is stored


@pytest.mark.parametrize(
    "layout, names",
    [
        ("legacy", ("lm_head.weight",)),
        ("legacy", ("transformer.wte.weight", "lm_head.weight")),
        ("gpt_bigcode", ("lm_head.weight",)),
    ],
)
def test_embedding_stored_as_lm_head(tmp_path, layout, names):
    folder = write_checkpoint(tmp_path / "ckpt", layout=layout, embedding_names=names)
    stored = set(SafetensorsFile(folder / "model.safetensors").names())
    assert set(names) <= stored
    if "transformer.wte.weight" not in names:
        assert "transformer.wte.weight" not in stored
    assert_close(load_exact(folder).logits(prompt_ids()), reference_logits(), 1e-6)


def test_no_embedding_at_all(tmp_path):
    folder = helpers.copy_checkpoint(tmp_path / "ckpt")
    tensors = all_tensors(folder / "model.safetensors")
    del tensors["transformer.wte.weight"]
    write_safetensors(folder / "model.safetensors", tensors)
    assert "lm_head.weight" in load_error(folder)


# ---------------------------------------------------------------------------------------------
# Sharded, bf16, and the official safetensors package


def _shard(folder: Path) -> dict[str, str]:
    tensors = all_tensors(folder / "model.safetensors")
    names = list(tensors)
    half = len(names) // 2
    files = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    weight_map = {}
    for file_name, part in files.items():
        write_safetensors(folder / file_name, {n: tensors[n] for n in part}, metadata={"format": "pt"})
        weight_map.update({n: file_name for n in part})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": sum(a.nbytes for a in tensors.values())}, "weight_map": weight_map})
    )
    (folder / "model.safetensors").unlink()
    return weight_map


@pytest.mark.parametrize("layout", ["gpt_bigcode", "legacy"])
def test_sharded_safetensors(tmp_path, layout):
    folder = helpers.copy_checkpoint(tmp_path / "ckpt", layout=layout)
    weight_map = _shard(folder)
    assert len(set(weight_map.values())) == 2
    assert_close(load_exact(folder).logits(prompt_ids()), reference_logits(), 1e-6)


def test_one_shard_under_many_spellings_is_opened_once(tmp_path):
    # Each spelling of a shard's name ("./a", ".//a") had been opened and mapped anew: an index of
    # 25,000 spellings ended in "Too many open files".
    from santacpu.loading.checkpoint import open_tensors

    folder = helpers.copy_checkpoint(tmp_path / "ckpt")
    weight_map = _shard(folder)
    spelled = {name: "./" * (i % 7) + "/" * (i % 3) * bool(i % 7) + file for i, (name, file) in enumerate(weight_map.items())}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": spelled}))
    source = open_tensors(folder)
    assert len(set(spelled.values())) > 2 and len({id(shard) for shard in source._shard_of.values()}) == 2
    assert_close(load_exact(folder).logits(prompt_ids()), reference_logits(), 1e-6)


def test_sharded_safetensors_with_a_missing_shard(tmp_path):
    folder = helpers.copy_checkpoint(tmp_path / "ckpt")
    _shard(folder)
    (folder / "model-00002-of-00002.safetensors").unlink()
    message = load_error(folder)
    assert "model-00002-of-00002.safetensors" in message and "missing" in message


def test_sharded_safetensors_with_a_broken_index(tmp_path):
    folder = helpers.copy_checkpoint(tmp_path / "ckpt")
    _shard(folder)
    (folder / "model.safetensors.index.json").write_text('{"metadata": {}}')
    assert "weight_map" in load_error(folder)


def _bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, rounded to nearest even (as torch does)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def test_bf16_safetensors(tmp_path):
    folder = helpers.copy_checkpoint(tmp_path / "ckpt")
    tensors = all_tensors(folder / "model.safetensors")
    assert all(a.dtype == np.float32 for a in tensors.values())
    bits = {name: _bf16_bits(a) for name, a in tensors.items()}
    write_safetensors(
        folder / "model.safetensors",
        iter(bits.items()),
        metadata={"format": "pt"},
        shapes={name: (a.shape, "BF16") for name, a in bits.items()},
    )
    f = SafetensorsFile(folder / "model.safetensors")
    assert {f.dtype_name(n) for n in f.names()} == {"BF16"}

    model = load_exact(folder)
    # Exactly the bf16 values, widened to float32.
    wte = bf16_to_f32(bits["transformer.wte.weight"])
    assert model.weights.wte.dtype == np.float32
    assert np.array_equal(model.weights.wte, wte)
    assert np.array_equal(model.weights.layers[1].mlp_c_fc_weight, bf16_to_f32(bits["transformer.h.1.mlp.c_fc.weight"]))
    assert np.max(np.abs(wte - tensors["transformer.wte.weight"])) <= 2.0**-8 * np.max(np.abs(wte))
    # bf16 keeps 8 significant bits: logits within a few per mille of the fp32 model, but not equal.
    found, expected = model.logits(prompt_ids()), reference_logits()
    assert_close(found, expected, 2e-2)
    assert not np.array_equal(found, expected)


@pytest.mark.parametrize("kind", [dict(dtype="float32"), dict(dtype="float16"), dict(layout="legacy")])
def test_our_safetensors_files_read_by_the_official_package(kind):
    from safetensors import safe_open
    from safetensors.numpy import load_file

    path = helpers.tiny_checkpoint(**kind) / "model.safetensors"
    ours = all_tensors(path)
    theirs = load_file(str(path))
    assert set(theirs) == set(ours)
    for name, array in ours.items():
        assert theirs[name].dtype == array.dtype and theirs[name].shape == array.shape, name
        assert np.array_equal(theirs[name], array), name
    with safe_open(str(path), framework="np") as f:
        assert f.metadata() == {"format": "pt"}


def test_official_package_files_read_by_ours(tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    tensors = {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "f16": rng.standard_normal((7,)).astype(np.float16),
        "f64": rng.standard_normal((2, 2, 2)),
        "i64": np.arange(6, dtype=np.int64).reshape(2, 3),
        "u8": np.arange(5, dtype=np.uint8),
        "flag": np.array([True, False, True]),
        "scalar": np.array(1.5, dtype=np.float32),
        "empty": np.zeros((0, 4), np.float32),
    }
    path = tmp_path / "official.safetensors"
    save_file(tensors, str(path), metadata={"format": "np", "note": "x"})
    f = SafetensorsFile(path)
    assert f.metadata == {"format": "np", "note": "x"}
    assert set(f.names()) == set(tensors)
    for name, array in tensors.items():
        assert f.dtype_name(name) and f.shape(name) == array.shape, name
        assert f.array(name).dtype == array.dtype and np.array_equal(f.array(name), array), name


def test_checkpoint_written_by_the_official_package_loads(tmp_path):
    from safetensors.numpy import save_file

    folder = helpers.copy_checkpoint(tmp_path / "ckpt", dtype="float16")
    tensors = all_tensors(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    assert_close(load_exact(folder).logits(prompt_ids()), reference_logits("float16"), 1e-6)


def test_writer_leaves_no_partial_file_when_it_fails(tmp_path):
    path = tmp_path / "out.safetensors"

    def tensors():
        yield "a", np.ones(4, np.float32)
        raise RuntimeError("producer failed")

    with pytest.raises(RuntimeError):
        write_safetensors(path, tensors(), shapes={"a": ((4,), "F32"), "b": ((4,), "F32")})
    assert list(tmp_path.iterdir()) == []
    # An existing file is left untouched by a failed rewrite.
    write_safetensors(path, {"a": np.arange(3, dtype=np.float32)})
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        write_safetensors(path, tensors(), shapes={"a": ((4,), "F32"), "b": ((4,), "F32")})
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


# pytorch_model.bin without torch: the zip that torch.save writes, its pickle spelled out opcode by
# opcode (protocol 2, the layout tests/test_torch_zip.py checks against a real torch.save file).

_STORAGES = {np.float32: "FloatStorage", np.float16: "HalfStorage", np.uint8: "ByteStorage", np.int64: "LongStorage"}


def _pickle_str(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw  # BINUNICODE


def _pickle_ints(values) -> bytes:
    return b"(" + b"".join(b"J" + struct.pack("<i", int(v)) for v in values) + b"t"  # MARK BININT... TUPLE


def write_torch_bin(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """A torch.save-style zip of a state dict; the same array object under two names shares one
    storage record, as tied weights do."""
    import zipfile

    keys: dict[int, str] = {}
    records: dict[str, bytes] = {}
    body = b""
    for name, array in tensors.items():
        if id(array) not in keys:
            keys[id(array)] = str(len(keys))
            records[keys[id(array)]] = array.tobytes(order="C")
        stride = [s // array.itemsize for s in np.asarray(array, order="C").strides]  # 0-d stays 0-d
        body += (
            _pickle_str(name)
            + b"ctorch._utils\n_rebuild_tensor_v2\n("
            + b"(" + _pickle_str("storage") + f"ctorch\n{_STORAGES[array.dtype.type]}\n".encode()
            + _pickle_str(keys[id(array)]) + _pickle_str("cpu") + b"J" + struct.pack("<i", array.size) + b"tQ"
            + b"J" + struct.pack("<i", 0) + _pickle_ints(array.shape) + _pickle_ints(stride)
            + b"\x89ccollections\nOrderedDict\n)R"  # requires_grad=False, no backward hooks
            + b"tR"
        )
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02}(" + body + b"u.")
        zf.writestr("archive/version", b"3\n")
        for key, raw in records.items():
            zf.writestr(f"archive/data/{key}", raw)


@pytest.mark.parametrize("kind", [dict(layout="legacy"), dict(layout="legacy", dtype="float16"), dict(layout="gpt_bigcode")])
def test_pytorch_model_bin(tmp_path, kind):
    folder = helpers.copy_checkpoint(tmp_path / "ckpt", **kind)
    tensors = all_tensors(folder / "model.safetensors")
    if kind["layout"] == "legacy":  # the published legacy file ties lm_head to wte in one storage
        tensors["lm_head.weight"] = tensors["transformer.wte.weight"]
    write_torch_bin(folder / "pytorch_model.bin", tensors)
    (folder / "model.safetensors").unlink()
    expected = reference_logits(kind.get("dtype", "float32"))
    assert_close(load_exact(folder).logits(prompt_ids()), expected, 1e-6)
    # The bare weight file names its folder too.
    assert_close(load_exact(folder / "pytorch_model.bin").logits(prompt_ids()), expected, 1e-6)


def test_sharded_pytorch_model_bin(tmp_path):
    folder = helpers.copy_checkpoint(tmp_path / "ckpt", layout="legacy")
    tensors = all_tensors(folder / "model.safetensors")
    names = list(tensors)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        file_name = f"pytorch_model-0000{i + 1}-of-00002.bin"
        write_torch_bin(folder / file_name, {n: tensors[n] for n in part})
        weight_map.update({n: file_name for n in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "model.safetensors").unlink()
    assert_close(load_exact(folder).logits(prompt_ids()), reference_logits(), 1e-6)
    # An index that puts a tensor in a shard that lacks it (a KeyError traceback).
    weight_map[names[0]] = "pytorch_model-00002-of-00002.bin"
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert (f"puts tensor '{names[0]}' in shard pytorch_model-00002-of-00002.bin, which does not hold it"
            in load_error(folder))
    (folder / "pytorch_model-00002-of-00002.bin").unlink()
    assert "pytorch_model-00002-of-00002.bin listed in pytorch_model.bin.index.json is missing" in load_error(folder)


@pytest.mark.parametrize("layout", ["gpt_bigcode", "legacy"])
def test_a_config_of_fewer_layers_than_the_weights_is_refused(tmp_path, layout):
    # A red team's hand edit: n_layer 1 on a 2-layer checkpoint ran its first layer only, with no word.
    folder = helpers.copy_checkpoint(tmp_path / "ckpt", layout=layout)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "n_layer": config["n_layer"] - 1}))
    assert f"config.json says n_layer {config['n_layer'] - 1}, but the weights hold layer {config['n_layer'] - 1}" \
        in load_error(folder)


def test_a_tokenizer_larger_than_the_weights_vocabulary_is_named_when_text_reaches_past_it(tmp_path):
    # A red team's cut-down vocabulary: a FIM prompt said only "token id 49153 is outside the vocabulary".
    from safetensors.numpy import load_file, save_file

    folder = helpers.copy_checkpoint(tmp_path / "ckpt")
    tensors = load_file(folder / "model.safetensors")
    tensors["transformer.wte.weight"] = tensors["transformer.wte.weight"][:1000].copy()
    save_file(tensors, folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 1000}))
    model = santacpu.load(folder, quant="none")
    assert model.complete("a", max_new_tokens=2, temperature=0) is not None  # (text inside the vocabulary runs)
    with pytest.raises(SantacpuError, match=r"^the prompt's token 49153 \('<fim-prefix>'\) is past this model's "
                       r"vocabulary of 1,000 tokens: its tokenizer \(49,157 tokens\) does not fit its weights$"):
        model.complete("a", "b", max_new_tokens=2)


def test_safetensors_preferred_over_pytorch_model_bin(tmp_path):
    folder = helpers.copy_checkpoint(tmp_path / "ckpt")
    (folder / "pytorch_model.bin").write_bytes(b"not a zip")  # never opened
    assert_close(load_exact(folder).logits(prompt_ids()), reference_logits(), 1e-6)
    (folder / "model.safetensors").unlink()
    message = load_error(folder)
    assert "pytorch_model.bin" in message and "not a PyTorch zip checkpoint" in message


# ---------------------------------------------------------------------------------------------
# Broken folders and files


def _write_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del config[key]
    (folder / "config.json").write_text(json.dumps(config))


def test_folder_without_config(tmp_path):
    folder = helpers.copy_checkpoint(tmp_path / "ckpt")
    (folder / "config.json").unlink()
    assert "no config.json" in load_error(folder)


def test_config_not_json(tmp_path):
    folder = helpers.copy_checkpoint(tmp_path / "ckpt")
    (folder / "config.json").write_text("{model_type: gpt_bigcode")
    assert "not valid JSON" in load_error(folder)
    (folder / "config.json").write_text("[1, 2]")
    assert "not a JSON object" in load_error(folder)


@pytest.mark.parametrize(
    "changes, fragment",
    [
        (dict(model_type="llama"), "unsupported model_type 'llama'"),
        (dict(model_type=None), "unsupported model_type"),
        (dict(model_type="gpt2", attention_head_type=None), "plain GPT-2"),
        (dict(model_type="gpt2", attention_head_type="grouped"), "attention_head_type 'grouped'"),
        (dict(activation_function="relu"), "unsupported activation_function 'relu'"),
        (dict(activation_function="gelu"), "tanh GELU"),
        (dict(n_embd=None), "lacks the field 'n_embd'"),
        (dict(n_head="four"), "field 'n_head' is \"four\", not an integer"),
        (dict(n_head="4"), "field 'n_head' is \"4\", not an integer"),
        (dict(n_layer=4.9), "field 'n_layer' is 4.9, not an integer"),
        (dict(n_layer=True), "field 'n_layer' is true, not an integer"),
        (dict(n_head=5), "not a multiple of n_head"),
        (dict(n_layer=0), "non-positive"),
        (dict(n_inner=0), "non-positive size: n_inner 0"),
        (dict(n_layer=10**9), "n_layer 1000000000 is past what santacpu runs (at most 1,024)"),
        (dict(vocab_size=2**40), "vocab_size 1099511627776 is past what santacpu runs"),
        (dict(multi_query="false"), "field 'multi_query' is \"false\", not true or false"),
        (dict(layer_norm_epsilon=-1), "'layer_norm_epsilon' is -1, not a number in (0, 1)"),
        (dict(layer_norm_epsilon="1e-5"), "'layer_norm_epsilon' is \"1e-5\", not a number"),
        (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    ],
)
def test_bad_config(tmp_path, changes, fragment):
    folder = helpers.copy_checkpoint(tmp_path / "ckpt")
    _write_config(folder, **changes)
    assert fragment in load_error(folder)


def test_missing_weights_file(tmp_path):
    folder = helpers.copy_checkpoint(tmp_path / "ckpt")
    (folder / "model.safetensors").unlink()
    message = load_error(folder)
    assert "no weights" in message and "model.safetensors" in message


def test_truncated_safetensors(tmp_path):
    source = helpers.tiny_checkpoint() / "model.safetensors"
    raw = source.read_bytes()
    data_start, _ = safetensors_header(source)
    folder = helpers.copy_checkpoint(tmp_path / "ckpt")
    cuts = {
        0: "not a safetensors file",
        5: "not a safetensors file",  # inside the 8-byte length
        8: "truncated",  # the length but no header
        data_start // 2: "truncated",  # inside the header
        data_start: "truncated",  # header only
        data_start + 1000: "truncated",  # inside the first tensor
        len(raw) // 2: "truncated",
        len(raw) - 1: "truncated",  # one byte short
    }
    for cut, fragment in cuts.items():
        (folder / "model.safetensors").write_bytes(raw[:cut])
        message = load_error(folder)
        assert fragment in message and "model.safetensors" in message, (cut, message)


def _raw_safetensors(header: bytes, data_bytes: int = 64) -> bytes:
    return struct.pack("<Q", len(header)) + header + bytes(data_bytes)


@pytest.mark.parametrize(
    "content, fragment",
    [
        (np.random.default_rng(0).bytes(4096), "not a valid safetensors file"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 4500000000\n", "not a valid safetensors"),
        (_raw_safetensors(b"\xff\xfe not json at all"), "corrupt safetensors header"),
        (_raw_safetensors(b"[1,2,3]"), "corrupt safetensors header"),
        (_raw_safetensors(b'{"a": {"dtype": "F32"}}'), "corrupt header entry for tensor 'a'"),
        (_raw_safetensors(b'{"a": "F32"}'), "corrupt header entry for tensor 'a'"),
        (_raw_safetensors(b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}}'), "offsets that do not match"),
        (_raw_safetensors(b'{"a":{"dtype":"X9","shape":[2],"data_offsets":[0,8]}}'), "unsupported dtype X9"),
        (_raw_safetensors(b'{"a":{"dtype":"F32","shape":[32],"data_offsets":[0,128]}}'), "truncated"),
    ],
    ids=["random", "lfs-pointer", "bad-utf8", "not-object", "entry", "entry-str", "offsets", "dtype", "short"],
)
def test_not_a_safetensors_file(tmp_path, content, fragment):
    folder = helpers.copy_checkpoint(tmp_path / "ckpt")
    (folder / "model.safetensors").write_bytes(content)
    message = load_error(folder)
    assert fragment in message and "model.safetensors" in message, message


_F32 = '"dtype":"F32"'


@pytest.mark.parametrize(
    "header, fragment",
    [
        (b'{"a":{%s,"shape":[-1,-2],"data_offsets":[0,8]}}', "whole numbers >= 0"),
        (b'{"a":{%s,"shape":[2.0],"data_offsets":[0,8]}}', "whole numbers >= 0"),
        (b'{"a":{%s,"shape":[true,2],"data_offsets":[0,8]}}', "whole numbers >= 0"),
        (b'{"a":{%s,"shape":[2],"data_offsets":[0.0,8]}}', "whole numbers >= 0"),
        (b'{"a":{%s,"shape":[-2],"data_offsets":[8,0]}}', "corrupt header entry for tensor 'a'"),
        (b'{"a":{%s,"shape":[0],"data_offsets":[8,0]}}', "its data ends before it begins"),
        (b'{"a":{%s,"shape":[4294967296,4294967296],"data_offsets":[0,0]}}', "offsets that do not match"),
        (b'{"a":{%s,"shape":[1180591620717411303424],"data_offsets":[0,8]}}', "offsets that do not match"),
        (b'{"a":{%s,"shape":"12","data_offsets":[0,8]}}', "corrupt header entry for tensor 'a'"),
        (b'{"a":{"dtype":["F32"],"shape":[2],"data_offsets":[0,8]}}', "corrupt header entry for tensor 'a'"),
        (b'{"a":' + b"[" * 300_000 + b"]" * 300_000 + b"}", "corrupt safetensors header"),
        (b'{"__metadata__":["pt"],"a":{%s,"shape":[2],"data_offsets":[0,8]}}', "__metadata__ is not an object of strings"),
        (b'{"__metadata__":{"format":1},"a":{%s,"shape":[2],"data_offsets":[0,8]}}', "__metadata__ is not an object"),
    ],
    ids=["negative", "float", "bool", "float-offset", "begin-after-end", "begin-after-end-empty", "int64-overflow",
         "2^70", "shape-str", "dtype-list", "nested-300k", "metadata-list", "metadata-number"],
)
def test_safetensors_header_values_of_the_wrong_kind(tmp_path, header, fragment):
    path = tmp_path / "model.safetensors"
    path.write_bytes(_raw_safetensors(header.replace(b"%s", _F32.encode())))
    with pytest.raises(SantacpuError, match=re.escape(fragment)) as error:
        SafetensorsFile(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)


@pytest.mark.parametrize(
    "header, fragment",
    [
        (b'{"a":{"dtype":"F32","shape":[1180591620717411303424],"data_offsets":[0,8]}}', "offsets that do not match"),
        (b"[" * 300_000 + b"]" * 300_000, "corrupt safetensors header"),
        (b'{"__metadata__":["pt"]}', "__metadata__ is not an object of strings"),
    ],
    ids=["2^70", "nested-300k", "metadata-list"],
)
def test_info_on_a_hostile_safetensors_header_is_one_error_line(tmp_path, header, fragment):
    path = tmp_path / "model.safetensors"
    path.write_bytes(_raw_safetensors(header))
    helpers.one_error_line(helpers.run_santacpu("info", path), fragment)


def test_info_on_a_fifo_is_one_error_line_not_a_hang(tmp_path):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    done = helpers.run_santacpu("info", fifo, timeout=60)
    helpers.one_error_line(done, f"safetensors file {fifo} is a FIFO, not a regular file")


# Small files of a model folder: regular files only, bounded, and shards only from inside the folder.

_CAPPED_LOAD = ("import santacpu, santacpu.model", "try:\n    santacpu.load(sys.argv[1], quant='none')\n    print('loaded')\n"
                "except santacpu.SantacpuError as error:\n    print('error', error)")


def test_a_config_json_that_is_dev_zero_or_a_fifo_is_refused_at_once(tmp_path):
    folder = helpers.copy_checkpoint(tmp_path / "ckpt")
    config = folder / "config.json"
    config.unlink()
    config.symlink_to("/dev/zero")
    # A child with 256 MiB to spare and a minute: reading /dev/zero whole fails there, a FIFO hangs.
    assert helpers.run_memory_capped(*_CAPPED_LOAD, str(folder), timeout=60) == (
        f"error config.json {config} is a device, not a regular file")
    config.unlink()
    os.mkfifo(config)
    assert helpers.run_memory_capped(*_CAPPED_LOAD, str(folder), timeout=60) == (
        f"error config.json {config} is a FIFO, not a regular file")


def test_small_files_have_a_size_limit_and_symlinks_to_regular_files_work(tmp_path):
    from santacpu.small_files import CONFIG_LIMIT

    folder = helpers.copy_checkpoint(tmp_path / "ckpt")
    config = folder / "config.json"
    real = tmp_path / "blobs" / "config"  # the hub cache's layout: each file a link to its blob
    real.parent.mkdir()
    config.rename(real)
    config.symlink_to(real)
    assert load_exact(folder).config.n_layer == 2
    real.write_bytes(real.read_bytes() + b" " * CONFIG_LIMIT)
    assert load_error(folder) == f"config.json {config} is larger than 1 MiB, too large to be a config.json"


def test_a_tokenizer_json_that_is_a_fifo_is_refused_not_replaced(tmp_path):
    folder = helpers.copy_checkpoint(tmp_path / "ckpt")
    (folder / "tokenizer.json").unlink()
    os.mkfifo(folder / "tokenizer.json")
    assert load_error(folder) == f"tokenizer {folder / 'tokenizer.json'} is a FIFO, not a regular file"


def _sharded(folder: Path, second_name) -> Path:
    """`folder` with its weights in two safetensors shards and an index naming the second `second_name`."""
    tensors = all_tensors(folder / "model.safetensors")
    names = list(tensors)
    write_safetensors(folder / "one.safetensors", {n: tensors[n] for n in names[:5]})
    write_safetensors(folder / "two.safetensors", {n: tensors[n] for n in names[5:]})
    weight_map = {**{n: "one.safetensors" for n in names[:5]}, **{n: second_name for n in names[5:]}}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "model.safetensors").unlink()
    return folder


def _name_the_second_shard(index: Path, name) -> None:
    weight_map = json.loads(index.read_text())["weight_map"]
    index.write_text(json.dumps({"weight_map": {n: f if f == "one.safetensors" else name for n, f in weight_map.items()}}))


def test_a_shard_index_names_only_files_inside_its_folder(tmp_path):
    folder = _sharded(helpers.copy_checkpoint(tmp_path / "ckpt"), "two.safetensors")
    assert load_exact(folder).config.n_layer == 2
    index = folder / "model.safetensors.index.json"
    (folder / "two.safetensors").rename(tmp_path / "two.safetensors")  # beside the folder, not in it
    for name in [str(tmp_path / "two.safetensors"), "../two.safetensors", "sub/../../two.safetensors", ""]:
        _name_the_second_shard(index, name)
        assert load_error(folder) == f"{index} names the shard '{name}', which is not a file inside its folder"
    _name_the_second_shard(index, 7)
    assert load_error(folder) == f"{index} names a shard by 7, not by a file name"

@pytest.mark.parametrize(
    "name, shape",
    [
        ("transformer.h.1.mlp.c_fc.weight", (256, 63)),
        ("transformer.h.0.attn.c_attn.bias", (95,)),
        ("transformer.wpe.weight", (65, 64)),
        ("transformer.ln_f.weight", (64, 1)),
    ],
)
def test_tensor_with_the_wrong_shape(tmp_path, name, shape):
    folder = helpers.copy_checkpoint(tmp_path / "ckpt")
    tensors = all_tensors(folder / "model.safetensors")
    tensors[name] = np.zeros(shape, np.float32)
    write_safetensors(folder / "model.safetensors", tensors)
    message = load_error(folder)
    assert f"'{name}'" in message and str(list(shape)) in message, message


@pytest.mark.parametrize("name, dtype", [("transformer.h.0.mlp.c_fc.bias", np.int32), ("transformer.wte.weight", np.uint8)])
def test_a_tensor_of_integers_is_refused(tmp_path, name, dtype):
    # An int32 bias of float32's size had loaded as floats of its integer values: nonsense output.
    folder = helpers.copy_checkpoint(tmp_path / "ckpt")
    tensors = all_tensors(folder / "model.safetensors")
    tensors[name] = tensors[name].view(np.int32).astype(dtype)
    write_safetensors(folder / "model.safetensors", tensors)
    assert load_error(folder) == f"tensor '{name}' holds {np.dtype(dtype)} values, not floating-point weights (a damaged or wrong checkpoint)"


@pytest.mark.parametrize("layout, name", [("gpt_bigcode", "transformer.ln_f.bias"), ("legacy", "transformer.h.1.attn.kv_attn.weight")])
def test_missing_tensor(tmp_path, layout, name):
    folder = helpers.copy_checkpoint(tmp_path / "ckpt", layout=layout)
    tensors = all_tensors(folder / "model.safetensors")
    del tensors[name]
    write_safetensors(folder / "model.safetensors", tensors)
    message = load_error(folder)
    assert f"lacks the tensor '{name}'" in message, message


def test_no_santacoder_tensors_at_all(tmp_path):
    folder = helpers.copy_checkpoint(tmp_path / "ckpt")
    write_safetensors(folder / "model.safetensors", {"model.layers.0.weight": np.zeros(4, np.float32)})
    assert "no GPT-2/SantaCoder tensors" in load_error(folder)


@pytest.mark.parametrize(
    "config_layout, weights_layout, fragment",
    [
        ("legacy", "gpt_bigcode", "look like the gpt_bigcode layout"),
        ("gpt_bigcode", "legacy", "look like the legacy bigcode/santacoder layout"),
    ],
)
def test_config_and_weights_of_different_layouts(tmp_path, config_layout, weights_layout, fragment):
    folder = helpers.copy_checkpoint(tmp_path / "ckpt", layout=weights_layout)
    (folder / "config.json").write_text(json.dumps(config_json("tiny", config_layout)))
    assert fragment in load_error(folder)


@pytest.mark.parametrize("config_layout, weights_layout", [("legacy", "gpt_bigcode"), ("gpt_bigcode", "legacy")])
def test_multi_head_config_and_weights_of_different_layouts(tmp_path, config_layout, weights_layout):
    # Multi-head checkpoints of both layouts have a fused c_attn; its orientation gives it away.
    folder = helpers.copy_checkpoint(tmp_path / "ckpt", layout=weights_layout, multi_query=False)
    (folder / "config.json").write_text(json.dumps(config_json("tiny", config_layout, multi_query=False)))
    assert "c_attn.weight' has shape" in load_error(folder)


def test_multi_query_config_with_multi_head_weights(tmp_path):
    folder = helpers.copy_checkpoint(tmp_path / "ckpt", multi_query=False)
    _write_config(folder, multi_query=True)
    assert "c_attn.weight' has shape" in load_error(folder)


def test_path_that_does_not_exist(tmp_path):
    for missing in (tmp_path / "nope", tmp_path / "nope" / "model.safetensors", str(tmp_path / "a" / "b")):
        message = load_error(missing)
        assert "no such file or folder" in message and str(missing) in message, message
    os.mkfifo(tmp_path / "fifo")  # there, but no file: it was called missing
    for odd in (tmp_path / "fifo", "/dev/null"):
        assert load_error(odd) == f"{odd} is neither a file nor a folder (a model is a folder, a weight file or a quantized file)"


def test_weight_file_path_loads_its_folder():
    folder = helpers.tiny_checkpoint()
    assert_close(load_exact(folder / "model.safetensors").logits(prompt_ids()), reference_logits(), 1e-6)


def test_unknown_device():  # device="cuda" without a GPU: tests/test_cuda.py
    assert "unknown device 'tpu' (choose auto, cpu, cuda)" in load_error(helpers.tiny_checkpoint(), device="tpu")


@pytest.mark.parametrize("device", ["auto", "cpu"])
def test_supported_device(device):
    model = load_exact(helpers.tiny_checkpoint(), device=device)
    assert_close(model.logits(prompt_ids()), reference_logits(), 1e-6)


# ---------------------------------------------------------------------------------------------
# Bad requests to a loaded model


def _request_error(call, *args, **kwargs) -> str:
    with pytest.raises(SantacpuError) as info:
        result = call(*args, **kwargs)
        if hasattr(result, "__next__"):
            next(result)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_empty_prompt():
    m = model_of()
    assert "empty" in _request_error(m.logits, [])
    assert "empty" in _request_error(m.generate, [], max_new_tokens=4)
    assert "empty" in _request_error(m.complete, "", max_new_tokens=4)
    assert "empty" in _request_error(m.complete_stream, "", max_new_tokens=4)


@pytest.mark.parametrize("bad", [49280, -1, 10**9])
def test_token_id_out_of_range(bad):
    m = model_of()
    for call in (m.logits, lambda ids: m.generate(ids, max_new_tokens=2)):
        message = _request_error(call, [1, 2, bad])
        assert f"token id {bad}" in message and "49279" in message
    # The padding rows are real embedding rows: they may be read, only never sampled.
    assert m.logits([49279]).shape == (1, 49280)


def test_prompt_longer_than_the_context():
    m = model_of()
    assert m.logits(list(range(N_CTX))).shape == (N_CTX, 49280)
    assert "exceed the 64-token context" in _request_error(m.logits, list(range(N_CTX + 1)))
    # Generation needs room for at least one new token.
    assert "context holds 64" in _request_error(m.generate, list(range(N_CTX)), max_new_tokens=1)
    assert len(list(m.generate(list(range(1, N_CTX)), max_new_tokens=10))) <= 1
    long_text = "x = 1\n" * 40
    assert len(m.tokenizer.encode(long_text)) > N_CTX
    assert "shorten" in _request_error(m.complete, long_text, max_new_tokens=4)
    assert "shorten" in _request_error(m.complete_stream, long_text, max_new_tokens=4)


def test_bad_sampling_options():
    m = model_of()
    assert "top_p" in _request_error(m.complete, "def f():", max_new_tokens=2, top_p=0.0)
    assert "top_p" in _request_error(m.complete, "def f():", max_new_tokens=2, top_p=1.5)
    assert "temperature" in _request_error(m.complete, "def f():", max_new_tokens=2, temperature=-0.5)
    assert "top_k" in _request_error(m.complete, "def f():", max_new_tokens=2, top_k=-1)
    assert "max_new_tokens" in _request_error(m.generate, [1], max_new_tokens=-1)
    for suffix in (None, "\n"):
        assert "unknown FIM order 'xyz'" in _request_error(m.complete, "def f():", suffix, max_new_tokens=2, fim_order="xyz")


def test_wrong_argument_types_are_clear_errors():
    m = model_of()
    assert "temperature must be a number, got '0.5' (str)" in _request_error(
        m.complete, "def f():", max_new_tokens=2, temperature="0.5")
    assert "top_k must be an integer" in _request_error(m.generate, [1, 2], max_new_tokens=2, top_k=1.5)
    assert "max_new_tokens must be an integer" in _request_error(m.complete, "def f():", max_new_tokens="8")
    assert "encode text first" in _request_error(m.logits, "def f")
    assert "encode text first" in _request_error(m.generate, b"def f", max_new_tokens=2)
    assert "token id must be an integer" in _request_error(m.logits, [1, 2.5])
    assert "prefix must be a str, got bytes (decode" in _request_error(m.complete, b"def f():", max_new_tokens=2)
    assert "suffix must be a str, got int" in _request_error(m.complete, "def f():", 3, max_new_tokens=2)
    assert "stop string must be a str" in _request_error(m.complete, "def f():", max_new_tokens=2, stop=[b"x"])
    for call in (m.complete, m.complete_stream):
        assert "seed must be >= 0, got -1" in _request_error(call, "def f():", max_new_tokens=2, seed=-1)
    assert "seed must be an integer" in _request_error(m.generate, [1, 2], max_new_tokens=2, seed="1")
    # NumPy's numbers are numbers.
    assert m.complete("def f():", max_new_tokens=np.int64(2), temperature=np.float32(0.0)) == m.complete(
        "def f():", max_new_tokens=2)


# ---------------------------------------------------------------------------------------------
# The model hub, offline (huggingface_hub reads its settings at import: each case runs in a
# fresh interpreter that sees the patched environment)

_HUB_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import huggingface_hub.constants as c
    import santacpu
    from santacpu.loading.source import resolve

    repo, out, revision, prompt = sys.argv[1], sys.argv[2], sys.argv[3] or None, sys.argv[4]
    report = {"offline": c.HF_HUB_OFFLINE, "cache": c.HF_HUB_CACHE}
    try:
        model = santacpu.load(repo, revision=revision, quant="none", kv_cache="float32")
        report["folder"] = str(resolve(repo, revision))
        ids = model.tokenizer.encode(prompt)
        np.save(out + ".npy", model.logits(ids))
    except santacpu.SantacpuError as error:
        report["error"] = str(error)
    with open(out + ".json", "w") as f:
        json.dump(report, f)
    """
)


def _run_hub(tmp_path: Path, repo: str, revision: str | None = None) -> tuple[dict, np.ndarray | None]:
    out = tmp_path / f"result-{repo.replace('/', '--')}-{revision}"
    args = [sys.executable, "-c", _HUB_SCRIPT, repo, str(out), revision or "", PROMPT]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(Path(f"{out}.json").read_text())
    logits = np.load(f"{out}.npy") if Path(f"{out}.npy").exists() else None
    return report, logits


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "hf-home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    return cache


def test_hub_id_offline_without_cache_says_to_pass_a_folder(tmp_path, offline_hub):
    report, _ = _run_hub(tmp_path, "bigcode/santacoder")
    assert report["offline"] is True and Path(report["cache"]) == offline_hub  # the settings took effect
    message = report["error"]
    assert "'bigcode/santacoder'" in message and "not a local folder" in message
    assert "give that folder in its place" in message and "\n" not in message
    assert list(offline_hub.iterdir()) == []  # nothing was written to the cache


def test_hub_id_offline_from_a_hand_made_cache(tmp_path, offline_hub):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = offline_hub / "models--someorg--tiny"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)  # no newline, as huggingface_hub writes it
    for i, source in enumerate(sorted(helpers.tiny_checkpoint().iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        shutil.copyfile(source, blob)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / source.name)  # the cache's own structure

    expected = reference_logits()
    report, logits = _run_hub(tmp_path, "someorg/tiny")
    assert "error" not in report, report
    assert Path(report["folder"]) == snapshot
    assert_close(logits, expected, 1e-6)
    # A pinned commit resolves to the same snapshot.
    report, logits = _run_hub(tmp_path, "someorg/tiny", commit)
    assert "error" not in report, report
    assert_close(logits, expected, 1e-6)
    # An unknown revision is not in the cache: the offline message again.
    report, _ = _run_hub(tmp_path, "someorg/tiny", "no-such-branch")
    assert "give that folder in its place" in report["error"]


# --- one tokenizer fallback, one place that reads the environment ------------------------------


def test_the_bundled_tokenizer_serves_santacoder_sized_checkpoints_only(tmp_path):
    from santacpu.tokenizer import SANTACODER_EMBEDDING_ROWS, tokenizer_file_for

    with pytest.warns(santacpu.SantacpuWarning, match="using the bundled SantaCoder tokenizer"):
        bundled = tokenizer_file_for(tmp_path, SANTACODER_EMBEDDING_ROWS)
    assert bundled.name == "tokenizer.json" and bundled.parent.name == "data"
    with pytest.raises(SantacpuError, match="no tokenizer.json in .* 1000 embedding rows are not SantaCoder's"):
        tokenizer_file_for(tmp_path, 1000)
    (tmp_path / "tokenizer.json").write_text("{}")
    assert tokenizer_file_for(tmp_path, 1000) == tmp_path / "tokenizer.json"


def test_settings_come_from_the_environment_and_bad_values_are_refused(tmp_path, monkeypatch):
    from santacpu.settings import Settings

    settings = Settings.from_environment({"SANTACPU_CACHE": "~/c", "SANTACPU_MODEL": "m", "SANTACPU_INT_DOT": "0"})
    assert settings.cache_dir == Path("~/c").expanduser() and settings.model == "m" and not settings.integer_kernels
    defaults = Settings.from_environment({"XDG_CACHE_HOME": "/x"})
    assert defaults == Settings(model=None, cache_dir=Path("/x/santacpu"), integer_kernels=True, q8_0_int16=False)
    assert Settings.from_environment({"SANTACPU_Q8_0_X": "int16"}).q8_0_int16
    assert not Settings.from_environment({"SANTACPU_Q8_0_X": "auto"}).q8_0_int16
    monkeypatch.setenv("SANTACPU_INT_DOT", "no")
    with pytest.raises(SantacpuError, match="SANTACPU_INT_DOT='no' is not understood"):
        santacpu.load(helpers.tiny_checkpoint(), quant="none")
    monkeypatch.setenv("SANTACPU_INT_DOT", "1")
    monkeypatch.setenv("SANTACPU_Q8_0_X", "int8")
    with pytest.raises(SantacpuError, match="SANTACPU_Q8_0_X='int8' is not understood .choose auto or int16."):
        santacpu.load(helpers.tiny_checkpoint(), quant="none")


@pytest.mark.parametrize(
    "model, options, fragment",
    [
        (None, {}, "model must be a str, got NoneType"),
        (123, {}, "model must be a str, got int"),
        (b"micro", {}, "model must be a str, got bytes"),
        ("", {}, "model is empty"),
        ("TINY", {"quant": ""}, "unknown quantization ''"),
        ("TINY", {"quant": 5}, "quant must be a str, got int"),
        ("TINY", {"reuse_prompt": "no"}, "reuse_prompt must be True or False, got 'no'"),
    ],
)
def test_load_checks_its_arguments(model, options, fragment):
    # docs/api.md: errors are SantacpuError, wrong argument types included (a TypeError had come out
    # of pathlib; "no" had turned prompt reuse on; quant="" had been the default).
    model = str(helpers.tiny_checkpoint()) if model == "TINY" else model
    with pytest.raises(SantacpuError, match=re.escape(fragment)):
        santacpu.load(model, **options)



@pytest.mark.parametrize("model, fragment", [(None, "model must be a str, got NoneType"), (5, "got int"),
                                             ("", "model is empty"), ("  ", "model is empty")])
def test_runnable_model_checks_its_model_as_load_does(model, fragment):
    # docs/api.md's first-use policy function: a raw TypeError from pathlib, or "no config.json at config.json".
    from santacpu.model import runnable_model

    with pytest.raises(SantacpuError, match=fragment):
        runnable_model(model)
