"""The calibration `santacpu quantize` keeps between runs (quantize/calibration_cache.py): another
quantization of the same checkpoint reuses it and writes the same tensors, a run cut short keeps
what it finished, a damaged file or a changed checkpoint is calibrated again, and `cache list` /
`cache clear` see the files. Each test has a SANTACPU_CACHE of its own."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from helpers import copy_checkpoint, tiny_checkpoint
from safetensors.numpy import load_file

import quantize.pipeline as pipeline
from quantize import calibration_cache
from quantize.cache import cache_entries, clear_cache
from santacpu.errors import SantacpuWarning


@pytest.fixture(autouse=True)
def _an_empty_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SANTACPU_CACHE", str(tmp_path_factory.mktemp("santacpu-cache")))


@pytest.fixture
def calls(monkeypatch):
    """How often calibration's two stages ran; `calls["stop"] = True` interrupts the second."""
    counted = {"importance": 0, "gains": 0, "stop": False}
    collect, measure = pipeline.collect_importance, pipeline.measure_upgrade_gains

    def importance(*args, **kwargs):
        counted["importance"] += 1
        return collect(*args, **kwargs)

    def gains(*args, **kwargs):
        if counted["stop"]:
            raise KeyboardInterrupt
        counted["gains"] += 1
        return measure(*args, **kwargs)

    monkeypatch.setattr(pipeline, "collect_importance", importance)
    monkeypatch.setattr(pipeline, "measure_upgrade_gains", gains)
    return counted


def quantized(src: Path, out: Path, qtype: str = "q4_m", **options) -> dict[str, np.ndarray]:
    pipeline.run_quantize(str(src), out, qtype=qtype, calibration=None, calibration_tokens=512, keep=(), revision=None,
                          force=True, show_report=False, **options)
    return load_file(out)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[name], b[name]) for name in a)


def kept_files() -> list[Path]:
    return sorted(Path(os.environ["SANTACPU_CACHE"]).glob("calibration-*.npz"))


def test_another_quantization_of_the_same_checkpoint_reuses_the_calibration(tmp_path, calls, capsys):
    first = quantized(tiny_checkpoint(), tmp_path / "a.safetensors")
    assert (calls["importance"], calls["gains"]) == (1, 1) and "calibrating on" in capsys.readouterr().err
    again = quantized(tiny_checkpoint(), tmp_path / "b.safetensors")
    err = capsys.readouterr().err
    assert (calls["importance"], calls["gains"]) == (1, 1) and "calibrating on" not in err
    assert "santacpu: the importance statistics and the q4_m upgrade gains of an earlier run on 512 tokens" in err
    assert same(first, again)
    # Another 4-bit type measures its own gains, kept beside q4_m's; another size target reuses both.
    quantized(tiny_checkpoint(), tmp_path / "c.safetensors", "q4_0")
    quantized(tiny_checkpoint(), tmp_path / "d.safetensors", "q4_m", bits_per_weight=7.0)
    quantized(tiny_checkpoint(), tmp_path / "e.safetensors", "q4_0")
    assert (calls["importance"], calls["gains"]) == (1, 2) and len(kept_files()) == 1


def test_two_runs_at_once_keep_both_their_gains(tmp_path, calls, monkeypatch):
    # Each run wrote back the file as it had read it at its start, plus its own results: the last
    # to finish dropped the other's gains, measured again (minutes on SantaCoder) by a later run.
    quantized(tiny_checkpoint(), tmp_path / "a.safetensors", "q4_m")  # the run that finishes first
    [kept] = kept_files()
    finished = kept.read_bytes()
    kept.unlink()  # the second run starts before the first has kept anything
    measure = pipeline.measure_upgrade_gains

    def meanwhile(*args, **kwargs):
        kept.write_bytes(finished)  # the first run keeps its q4_m gains while this one measures
        return measure(*args, **kwargs)

    monkeypatch.setattr(pipeline, "measure_upgrade_gains", meanwhile)
    quantized(tiny_checkpoint(), tmp_path / "b.safetensors", "q4_0")
    assert (calls["importance"], calls["gains"]) == (2, 2)  # (the q4_0 run computed its own importance)
    with np.load(kept) as arrays:
        assert {"gains/q4_m", "gains/q4_0"} <= set(arrays.files)
    quantized(tiny_checkpoint(), tmp_path / "c.safetensors", "q4_m")
    quantized(tiny_checkpoint(), tmp_path / "d.safetensors", "q4_0")
    assert (calls["importance"], calls["gains"]) == (2, 2)  # nothing measured again


def test_a_run_cut_short_keeps_the_calibration_it_finished(tmp_path, calls, monkeypatch):
    calls["stop"] = True  # Ctrl-C while the upgrades are measured
    with pytest.raises(KeyboardInterrupt):
        quantized(tiny_checkpoint(), tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists() and len(kept_files()) == 1
    calls["stop"] = False
    resumed = quantized(tiny_checkpoint(), tmp_path / "a.safetensors")
    assert (calls["importance"], calls["gains"]) == (1, 1)
    monkeypatch.setenv("SANTACPU_CACHE", str(tmp_path / "empty"))  # the same quantization from nothing
    assert same(resumed, quantized(tiny_checkpoint(), tmp_path / "fresh.safetensors"))
    assert (calls["importance"], calls["gains"]) == (2, 2)


@pytest.mark.parametrize("damage, why", [
    pytest.param(lambda path: path.write_bytes(path.read_bytes()[:300]), "it is not a readable calibration file",
                 id="cut-short"),
    pytest.param(lambda path: np.savez(path, **{"importance/wte": np.ones(3, np.float32)}),
                 "its importance statistics do not fit", id="another-model"),
    # a member that would inflate to 64 MB (more than any statistics of this model): not read
    pytest.param(lambda path: np.savez_compressed(path, **{"importance/wte": np.zeros(1 << 24, np.float32)}),
                 "it is not a readable calibration file", id="inflating"),
])
def test_a_damaged_kept_calibration_is_computed_again(tmp_path, calls, damage, why):
    first = quantized(tiny_checkpoint(), tmp_path / "a.safetensors")
    [kept] = kept_files()
    damage(kept)
    with pytest.warns(SantacpuWarning, match=re.escape(f"the kept calibration {kept} is computed again: {why}")):
        again = quantized(tiny_checkpoint(), tmp_path / "b.safetensors")
    assert (calls["importance"], calls["gains"]) == (2, 2) and same(first, again)
    with warnings.catch_warnings():  # written whole again: the next run reuses it
        warnings.simplefilter("error")
        quantized(tiny_checkpoint(), tmp_path / "c.safetensors")
    assert (calls["importance"], calls["gains"]) == (2, 2)


def test_damaged_gains_are_measured_again_with_the_importance_kept(tmp_path, calls):
    first = quantized(tiny_checkpoint(), tmp_path / "a.safetensors")
    [kept] = kept_files()
    with np.load(kept) as members:
        arrays = {name: members[name] for name in members.files}
    np.savez(kept, **{**arrays, "gains/q4_m": np.array('{"h.0.mlp_c_fc_weight": {"q8_0": -1.0}}')})
    with pytest.warns(SantacpuWarning, match="its q4_m gains do not fit the checkpoint"):
        again = quantized(tiny_checkpoint(), tmp_path / "b.safetensors")
    assert (calls["importance"], calls["gains"]) == (1, 2) and same(first, again)


def test_a_changed_checkpoint_is_calibrated_again(tmp_path, calls):
    folder = copy_checkpoint(tmp_path / "ckpt")
    quantized(folder, tmp_path / "a.safetensors")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # (the same bytes, written anew: its time changed)
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    quantized(folder, tmp_path / "b.safetensors")
    assert (calls["importance"], calls["gains"]) == (2, 2) and len(kept_files()) == 2


def test_a_change_in_the_code_that_calibrates_is_calibrated_again(tmp_path, calls, monkeypatch):
    quantized(tiny_checkpoint(), tmp_path / "a.safetensors")
    monkeypatch.setattr(calibration_cache, "sources_digest", lambda folder: b"after a git pull")
    quantized(tiny_checkpoint(), tmp_path / "b.safetensors")
    assert (calls["importance"], calls["gains"]) == (2, 2) and len(kept_files()) == 2


def test_a_cache_that_cannot_be_written_is_a_warning_and_the_file_is_made(tmp_path, calls, monkeypatch):
    (tmp_path / "a-file").write_text("mine\n")
    monkeypatch.setenv("SANTACPU_CACHE", str(tmp_path / "a-file"))
    message = f"the calibration is not kept for later runs: the quantization cache {tmp_path / 'a-file'} is not a folder"
    with pytest.warns(SantacpuWarning, match=re.escape(message)) as said:
        quantized(tiny_checkpoint(), tmp_path / "a.safetensors")
    assert sum(message in str(w.message) for w in said) == 1  # said once, not at each stage
    assert (tmp_path / "a.safetensors").is_file()
    assert (tmp_path / "a-file").read_text() == "mine\n"


def test_the_cache_commands_list_and_clear_kept_calibrations(tmp_path, calls):
    folder = copy_checkpoint(tmp_path / "ckpt")
    quantized(folder, tmp_path / "a.safetensors")
    [entry] = cache_entries()
    assert (entry.qtype, entry.source, entry.problem) == ("calibration", str(folder.resolve()), None)
    assert clear_cache(str(tiny_checkpoint())) == []  # made from another folder: kept
    assert [e.path for e in clear_cache(str(folder))] == [entry.path] and kept_files() == []
