"""Tests for santacpu.formats.torch_zip: the torch-free, code-free reader of pytorch_model.bin checkpoints.

The fixture comes from tools/make_torch_fixture.py; nothing here imports torch.
"""

from __future__ import annotations

import builtins
import os
import pickle
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from santacpu.errors import SantacpuError
from helpers import mmap_owner, run_memory_capped
from santacpu.formats.torch_zip import read_torch_zip

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "torch_tiny.bin"
EXPECTED = FIXTURES / "torch_tiny_expected.npz"


def _write_zip(path: Path, entries: dict[str, bytes], compression=zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def _str(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b  # BINUNICODE


def _ints(ns) -> bytes:
    return b"(" + b"".join(b"K" + bytes([n]) for n in ns) + b"t"  # MARK BININT1... TUPLE


def _tensor_pickle(key="0", numel=4, offset=0, shape=(4,), stride=(1,)) -> bytes:
    """Protocol-2 opcodes for {'w': FloatStorage tensor}, exactly as torch.save lays them out."""
    return (b"\x80\x02}(" + _str("w") + b"ctorch._utils\n_rebuild_tensor_v2\n("
            + b"(" + _str("storage") + b"ctorch\nFloatStorage\n" + _str(key) + _str("cpu")
            + b"K" + bytes([numel]) + b"tQ"                      # persistent id tuple, BINPERSID
            + b"K" + bytes([offset]) + _ints(shape) + _ints(stride)
            + b"\x89ccollections\nOrderedDict\n)R"              # requires_grad, backward hooks
            + b"tRu.")


def test_fixture_matches_expected_exactly():
    got = read_torch_zip(TINY)
    with np.load(EXPECTED) as expected:
        assert list(got) == expected.files  # same names, same state-dict order
        for name in expected.files:
            want = expected[name]
            assert got[name].dtype == want.dtype, name
            assert got[name].shape == want.shape, name
            assert np.array_equal(got[name], want), name
    assert got["ln.bias"].dtype == np.float16  # fp16 is kept, bf16 widened to float32
    assert got["mlp.bf16"].dtype == np.float32
    assert "torch" not in sys.modules and "transformers" not in sys.modules


def test_arrays_are_read_only_views_of_the_file_map():
    got = read_torch_zip(TINY)
    for name, arr in got.items():
        assert not arr.flags.owndata and not arr.flags.writeable, name
        if name != "mlp.bf16":  # bf16 has to be widened into a fresh float32 buffer
            assert mmap_owner(arr) is not None, name
    # Tied weights share one storage record, hence one mapped buffer.
    assert np.shares_memory(got["wte.weight"], got["lm_head.weight"])
    # The transposed tensor keeps torch's strides instead of being copied.
    t = got["attn.transposed"]
    assert t.strides == (4, 16) and not t.flags.c_contiguous


def test_compressed_entries_fall_back_to_reading(tmp_path):
    with zipfile.ZipFile(TINY) as zf:
        entries = {n: zf.read(n) for n in zf.namelist()}
    path = _write_zip(tmp_path / "deflated.bin", entries, zipfile.ZIP_DEFLATED)
    got = read_torch_zip(path)
    with np.load(EXPECTED) as expected:
        for name in expected.files:
            assert np.array_equal(got[name], expected[name]), name


def test_hand_built_checkpoint_loads(tmp_path):
    data = np.arange(4, dtype="<f4").tobytes()
    path = _write_zip(tmp_path / "ok.bin", {"a/data.pkl": _tensor_pickle(), "a/data/0": data})
    assert read_torch_zip(path)["w"].tolist() == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize("kind", ["system", "eval"])
def test_code_in_pickle_is_refused_and_not_run(tmp_path, kind):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            if kind == "system":
                return os.system, (f"echo pwned > {marker}",)
            return builtins.eval, (f"open({str(marker)!r}, 'w').write('pwned')",)

    path = _write_zip(tmp_path / "pytorch_model.bin",
                      {"archive/data.pkl": pickle.dumps({"w": Evil()}, protocol=2)})
    func = os.system if kind == "system" else builtins.eval
    with pytest.raises(SantacpuError, match="refusing to unpickle") as err:
        read_torch_zip(path)
    msg = str(err.value)
    # Protocol 2 spells builtins as "__builtin__"; the refusal quotes the name the file uses.
    assert f".{func.__name__}'" in msg and msg.startswith("pytorch_model.bin: ")
    if kind == "system":
        assert f"'{os.system.__module__}.system'" in msg
    assert "\n" not in msg
    assert not marker.exists()


def test_tensor_overrunning_its_storage_is_refused(tmp_path):
    data = np.arange(4, dtype="<f4").tobytes()
    path = _write_zip(tmp_path / "big.bin",
                      {"a/data.pkl": _tensor_pickle(shape=(100,)), "a/data/0": data})
    with pytest.raises(SantacpuError, match="overruns its storage"):
        read_torch_zip(path)


@pytest.mark.parametrize(("shape", "stride"), [((200, 200), (0, 0)), ((4, 100), (1, 0)), ((2, 2), (1, 1))],
                         ids=["stride 0", "a broadcast row", "overlapping rows"])
def test_a_tensor_whose_elements_overlap_is_refused(tmp_path, shape, stride):
    # 4 stored values declared as 40,000: the file's size no longer bounds the work.
    data = np.arange(4, dtype="<f4").tobytes()
    path = _write_zip(tmp_path / "bomb.bin", {"a/data.pkl": _tensor_pickle(shape=shape, stride=stride), "a/data/0": data})
    with pytest.raises(SantacpuError, match="has elements that overlap in its storage"):
        read_torch_zip(path)


@pytest.mark.parametrize(("shape", "stride"), [((2, 2), (2, 1)), ((2, 2), (1, 2)), ((1, 4), (0, 1)), ((4, 1), (1, 7))],
                         ids=["rows", "transposed", "a leading dim of 1", "a trailing dim of 1"])
def test_strided_tensors_that_do_not_overlap_load(tmp_path, shape, stride):
    data = np.arange(4, dtype="<f4").tobytes()
    path = _write_zip(tmp_path / "ok.bin", {"a/data.pkl": _tensor_pickle(shape=shape, stride=stride), "a/data/0": data})
    got = np.asarray(read_torch_zip(path)["w"])
    want = np.lib.stride_tricks.as_strided(np.arange(4, dtype="<f4"), shape, tuple(4 * s for s in stride))
    np.testing.assert_array_equal(got, want)


def test_missing_storage_record(tmp_path):
    path = _write_zip(tmp_path / "nostorage.bin", {"a/data.pkl": _tensor_pickle()})
    with pytest.raises(SantacpuError, match="'data/0' is missing"):
        read_torch_zip(path)


def test_short_storage_record(tmp_path):
    path = _write_zip(tmp_path / "short.bin", {"a/data.pkl": _tensor_pickle(), "a/data/0": b"\0" * 8})
    with pytest.raises(SantacpuError, match="holds 8 bytes, expected 16"):
        read_torch_zip(path)


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_truncated_file(tmp_path, keep):
    raw = TINY.read_bytes()
    path = tmp_path / "cut.bin"
    path.write_bytes(raw[: int(len(raw) * keep)])
    with pytest.raises(SantacpuError, match="truncated"):
        read_torch_zip(path)


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.bin"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(SantacpuError, match="not a PyTorch zip checkpoint"):
        read_torch_zip(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.bin"
    path.write_bytes(b"")
    with pytest.raises(SantacpuError, match="not a PyTorch zip checkpoint"):
        read_torch_zip(path)


def test_legacy_format_is_named(tmp_path):
    # The magic number that pre-1.6 torch.save pickles first.
    path = tmp_path / "old.bin"
    path.write_bytes(b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.\x80\x02")
    with pytest.raises(SantacpuError, match="legacy .*safetensors"):
        read_torch_zip(path)


def test_zip_without_data_pkl(tmp_path):
    path = _write_zip(tmp_path / "nopkl.bin", {"a/data/0": b"\0" * 16})
    with pytest.raises(SantacpuError, match="no data.pkl"):
        read_torch_zip(path)


@pytest.mark.parametrize("obj", [[1, 2, 3], {"w": 1.0}, {1: 2}])
def test_top_level_must_be_a_dict_of_tensors(tmp_path, obj):
    path = _write_zip(tmp_path / "odd.bin", {"a/data.pkl": pickle.dumps(obj, protocol=2)})
    with pytest.raises(SantacpuError, match="not a dict of named tensors"):
        read_torch_zip(path)


def test_garbage_pickle(tmp_path):
    path = _write_zip(tmp_path / "junk.bin", {"a/data.pkl": b"\x80\x02}(X"})
    with pytest.raises(SantacpuError, match="data.pkl is corrupt"):
        read_torch_zip(path)


def test_missing_file(tmp_path):
    with pytest.raises(SantacpuError, match="cannot read checkpoint"):
        read_torch_zip(tmp_path / "absent.bin")


# ---------------------------------------------------------------------------------------------
# Zip bombs: deflated members that inflate far beyond what the checkpoint needs. Each is read in a
# child process whose address space is capped a little above what it had after its imports, so a
# reader that inflates a whole member fails there instead of taking the test machine's memory.

BOMB_BYTES = 256 << 20  # what the bomb member inflates to; its file is ~260 KB
HEADROOM_BYTES = 128 << 20  # the child's address space beyond its imports


def _bomb(path: Path, small: dict[str, bytes], big_name: str, big_head: bytes = b"") -> Path:
    """A deflated archive of `small` members and `big_name`: `big_head` then zeros, BOMB_BYTES in
    all, streamed into the archive so that the test never holds it whole."""
    chunk = bytes(1 << 20)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in small.items():
            zf.writestr(name, data)
        with zf.open(big_name, "w", force_zip64=True) as member:
            member.write(big_head)
            left = BOMB_BYTES - len(big_head)
            while left:
                member.write(chunk[: min(left, len(chunk))])
                left -= min(left, len(chunk))
    return path


def _read_bounded(path: Path) -> str:
    """What read_torch_zip makes of `path` in a child with HEADROOM_BYTES of memory to spare."""
    return run_memory_capped(
        "from santacpu.errors import SantacpuError\nfrom santacpu.formats.torch_zip import read_torch_zip",
        "try:\n"
        "    print('loaded', {name: array.tolist() for name, array in read_torch_zip(sys.argv[1]).items()})\n"
        "except SantacpuError as error:\n"
        "    print('error', error)",
        str(path), headroom=HEADROOM_BYTES)


def test_a_storage_record_that_inflates_past_its_tensor_is_read_only_as_far_as_the_tensor(tmp_path):
    path = _bomb(tmp_path / "pytorch_model.bin", {"a/data.pkl": _tensor_pickle(numel=4)}, "a/data/0")
    assert path.stat().st_size < 2 << 20
    assert _read_bounded(path) == "loaded {'w': [0.0, 0.0, 0.0, 0.0]}"


def test_a_huge_data_pkl_is_refused_before_unpickling(tmp_path):
    # A pickle of one BINUNICODE string that fills the member.
    head = b"\x80\x02X" + struct.pack("<I", BOMB_BYTES - 7)
    path = _bomb(tmp_path / "pytorch_model.bin", {}, "a/data.pkl", head)
    assert _read_bounded(path) == (f"error pytorch_model.bin: data.pkl is {BOMB_BYTES} bytes, more than a "
                                   "checkpoint's tensor list needs (at most 8388608); refusing to unpickle it")


def test_a_huge_byteorder_record_is_read_only_as_far_as_its_word(tmp_path):
    data = np.arange(4, dtype="<f4").tobytes()
    path = _bomb(tmp_path / "pytorch_model.bin", {"a/data.pkl": _tensor_pickle(), "a/data/0": data},
                 "a/byteorder", b"little")
    assert _read_bounded(path) == "loaded {'w': [0.0, 1.0, 2.0, 3.0]}"
