"""A whole model stored as pytorch_model.bin: it loads through santacpu.load and computes exactly
what the same weights stored as model.safetensors compute.

The fixture tests/fixtures/torch_micro_model/ (pytorch_model.bin + config.json, no tokenizer.json)
is written by tools/make_torch_fixture.py with torch: the "micro" random model of
tools/random_checkpoint.py, seed 0, legacy bigcode/santacoder layout, float16, lm_head.weight tied
to transformer.wte.weight in one storage, attn.bias / attn.masked_bias buffers included. Here the
same model is rebuilt as safetensors with NumPy; nothing in this file imports torch.
"""

from __future__ import annotations

import json
import mmap
import shutil
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import santacpu
from santacpu.formats.safetensors_io import SafetensorsFile
from santacpu.formats.torch_zip import read_torch_zip
from helpers import mmap_owner
from tools.random_checkpoint import write_checkpoint

BIN_MODEL = Path(__file__).parent / "fixtures" / "torch_micro_model"
BIN_FILE = BIN_MODEL / "pytorch_model.bin"
PROMPTS = [
    "def add(a, b):\n    return",
    "import numpy as np",
    "x",  # one token: the matrix-vector path
    "for i in range(10):\n    print(i)",
]


def load_bin_model(folder: Path) -> santacpu.Model:
    with pytest.warns(santacpu.SantacpuWarning, match="no tokenizer.json"):
        return santacpu.load(folder, quant="none")


@pytest.fixture(scope="module")
def safetensors_folder(tmp_path_factory) -> Path:
    return write_checkpoint(
        tmp_path_factory.mktemp("micro") / "safetensors",
        size="micro",
        layout="legacy",
        dtype="float16",
        seed=0,
        embedding_names=("transformer.wte.weight", "lm_head.weight"),
    )


@pytest.fixture(scope="module")
def bin_model() -> santacpu.Model:
    return load_bin_model(BIN_MODEL)


@pytest.fixture(scope="module")
def safetensors_model(safetensors_folder) -> santacpu.Model:
    return santacpu.load(safetensors_folder, quant="none")


def prompt_ids(model: santacpu.Model) -> list[list[int]]:
    ids = [model.tokenizer.encode(p) for p in PROMPTS]
    assert all(1 <= len(i) < model.config.n_positions for i in ids), [len(i) for i in ids]
    assert any(len(i) == 1 for i in ids) and any(len(i) >= 8 for i in ids)
    return ids


def _mmap_of(array: np.ndarray) -> mmap.mmap:
    owner = mmap_owner(array)
    if owner is None:
        pytest.fail("not memory-mapped: the owner chain ends elsewhere")
    return owner


def _record_starts(path: Path) -> dict[int, str]:
    """File offset of each stored zip member's data -> its name (from the local headers)."""
    raw = path.read_bytes()
    starts = {}
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            sig, n_name, n_extra = struct.unpack_from("<4s22xHH", raw, info.header_offset)
            assert sig == b"PK\x03\x04" and info.compress_type == zipfile.ZIP_STORED
            starts[info.header_offset + 30 + n_name + n_extra] = info.filename
    return starts


def test_fixture_holds_the_random_micro_model(safetensors_folder):
    """The committed .bin is the micro model, value for value, as write_checkpoint stores it."""
    from_bin = read_torch_zip(BIN_FILE)
    st = SafetensorsFile(safetensors_folder / "model.safetensors")
    assert set(from_bin) == set(st.names())
    for name, array in from_bin.items():
        want = st.array(name)
        assert array.dtype == want.dtype and array.shape == want.shape, name
        assert np.array_equal(array, want), name
    # Like the real bigcode/santacoder file: the tied embedding is one storage, the mask buffers are there.
    assert np.shares_memory(from_bin["transformer.wte.weight"], from_bin["lm_head.weight"])
    assert from_bin["transformer.wte.weight"].dtype == np.float16
    assert from_bin["transformer.h.0.attn.bias"].shape == (1, 1, 16, 16)
    assert from_bin["transformer.h.0.attn.masked_bias"].shape == ()
    assert BIN_FILE.stat().st_size < 1_000_000
    assert not (BIN_MODEL / "tokenizer.json").exists()
    with zipfile.ZipFile(BIN_FILE) as zf:  # one storage record per distinct tensor: 20, not 21
        assert sum("/data/" in n for n in zf.namelist()) == len(from_bin) - 1


def test_same_logits_as_safetensors(bin_model, safetensors_model):
    assert bin_model.config == safetensors_model.config
    for ids in prompt_ids(bin_model):
        got, want = bin_model.logits(ids), safetensors_model.logits(ids)
        assert got.shape == (len(ids), 49280) and np.all(np.isfinite(got))
        assert np.array_equal(got, want), ids
    # Guards against a comparison that cannot fail: different prompts give different logits.
    a, b = (bin_model.logits(i)[-1] for i in prompt_ids(bin_model)[:2])
    assert not np.allclose(a, b)


def test_same_generation_as_safetensors(bin_model, safetensors_model):
    for ids in prompt_ids(bin_model):
        n = bin_model.config.n_positions - len(ids)
        got = list(bin_model.generate(ids, max_new_tokens=n))
        assert got == list(safetensors_model.generate(ids, max_new_tokens=n)), ids
        sampled = dict(max_new_tokens=n, temperature=0.8, top_k=50, seed=3)
        assert list(bin_model.generate(ids, **sampled)) == list(safetensors_model.generate(ids, **sampled))
    assert bin_model.complete(PROMPTS[0]) == safetensors_model.complete(PROMPTS[0])


def test_untransposed_matrices_are_views_of_the_mapped_file(bin_model):
    """wte and wpe need no conversion in the legacy layout: they must stay in the file's pages."""
    starts = _record_starts(BIN_FILE)
    raw = BIN_FILE.read_bytes()
    weights = bin_model.weights
    for label, array in (("wte", weights.wte), ("wpe", weights.wpe)):
        assert array.dtype == np.float16 and array.flags.c_contiguous, label
        assert not array.flags.owndata and not array.flags.writeable, label
        mm = _mmap_of(array)
        assert len(mm) == len(raw)  # a map of the whole .bin file
        offset = array.ctypes.data - np.frombuffer(mm, np.uint8).ctypes.data
        assert offset in starts and "/data/" in starts[offset], label  # a storage record's first byte
        assert raw[offset: offset + array.nbytes] == array.tobytes(), label
    # The transposed layer matrices are converted copies, of the same dtype.
    fc = weights.layers[0].mlp_c_fc_weight
    assert fc.flags.owndata and fc.dtype == np.float16 and fc.shape == (32, 8)


def test_sharded_bin_checkpoint_loads_through_its_index(tmp_path, bin_model):
    """Two shards (copies of the fixture) and a pytorch_model.bin.index.json naming, for each
    tensor, the shard to take it from: only the index decides which file serves which tensor."""
    names = list(read_torch_zip(BIN_FILE))
    shard_files = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    for shard in shard_files:
        shutil.copyfile(BIN_FILE, tmp_path / shard)
    shutil.copyfile(BIN_MODEL / "config.json", tmp_path / "config.json")
    weight_map = {name: shard_files[i % 2] for i, name in enumerate(names)}
    assert weight_map["transformer.wte.weight"] != weight_map["transformer.wpe.weight"]
    (tmp_path / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    sharded = load_bin_model(tmp_path)
    # Each tensor is served from the shard the index names: wte and wpe sit in different maps.
    assert _mmap_of(sharded.weights.wte) is not _mmap_of(sharded.weights.wpe)
    for ids in prompt_ids(sharded):
        assert np.array_equal(sharded.logits(ids), bin_model.logits(ids)), ids
    # A tensor the index leaves out is missing, even though both shard files hold it.
    del weight_map["transformer.h.0.mlp.c_fc.weight"]
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(santacpu.SantacpuError, match="lacks the tensor 'transformer.h.0.mlp.c_fc.weight'"):
        santacpu.load(tmp_path, quant="none")


def test_no_torch_was_imported():
    assert "torch" not in sys.modules and "transformers" not in sys.modules
