"""Size targets for the 4-bit types (`santacpu quantize --bits-per-weight`, `--max-size`, and the
same `bits_per_weight=`, `max_size=` of `quantize.pipeline.run_quantize` and
`quantize.converter.convert`): the file reached is at or below the target, and short of it by less
than the next upgrade the order would buy; a target below the smallest file is a usage error that
says the least the model takes; the report's last line says what was reached."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import tiny_checkpoint
from quantize.converter import convert, policy_for, tensor_shapes
from quantize.policy import EMBEDDING_ROW_COUNTS, Policy, SizeTarget, row_upgrade_bytes, stored_bytes, upgrade_order
from santacpu.errors import OptionValueError
from santacpu.formats.quantized_file import read_metadata
from santacpu.loading.checkpoint import open_checkpoint
from test_cli_quantize import one_error_line, run


@pytest.fixture(scope="module")
def shapes():
    return tensor_shapes(open_checkpoint(tiny_checkpoint()))


def matrix_weights(shapes) -> int:
    return sum(int(np.prod(s)) for s in shapes.values() if len(s) == 2)


def matrix_bytes(report) -> int:
    """The matrices' bytes as the report counts them from what was written."""
    return sum(t.nbytes for t in report.tensors if len(t.shape) == 2)


def next_step_by_role(shapes, qtype: str, types: dict[str, str]) -> int:
    """Extra bytes of the first upgrade in the by-role order that the file does not have (what the
    budget would have bought next), read from the file's tensor types."""
    base = {n: Policy(qtype).default_type(n, s) for n, s in shapes.items()}
    for name, upgrade in upgrade_order(shapes, base, qtype):
        if types[name] == upgrade or (upgrade == "q6_0" and types[name] == "q8_0"):
            continue
        return stored_bytes(upgrade, shapes[name]) - stored_bytes(types[name], shapes[name])
    raise AssertionError("every upgrade was bought: the target was not between the smallest and the largest file")


def room(shapes, qtype: str) -> tuple[int, int]:
    """(the matrices' bytes without upgrades, with every by-role upgrade)."""
    target = Policy(qtype, size_target=SizeTarget(bits_per_weight=64.0))
    return target.smallest(shapes), target.counted_bytes(shapes, target.plan(shapes))


@pytest.mark.parametrize("qtype", ["q4_0", "q4_m"])
@pytest.mark.parametrize("fraction", [0.3, 0.7])
def test_bits_per_weight_is_reached_from_below_within_one_step(tmp_path, shapes, qtype, fraction):
    least, most = room(shapes, qtype)
    weights = matrix_weights(shapes)
    bits = 8 * (least + fraction * (most - least)) / weights
    report = convert(tiny_checkpoint(), tmp_path / "t.safetensors", qtype=qtype, bits_per_weight=bits)
    types = {name: entry["type"] for name, entry in read_metadata(report.out)[1]["tensors"].items()}
    reached = matrix_bytes(report)
    assert report.weight_bits_per_weight == pytest.approx(8 * reached / weights)
    assert 8 * reached <= bits * weights  # at or below the target
    assert least < reached  # something was bought
    assert 8 * (reached + next_step_by_role(shapes, qtype, types)) > bits * weights  # the next step would not fit


@pytest.mark.parametrize("qtype", ["q4_0", "q4_m"])
def test_max_size_bounds_the_whole_file_within_one_step(tmp_path, shapes, qtype):
    smallest = convert(tiny_checkpoint(), tmp_path / "base.safetensors", qtype=qtype, upgrade_budget=0).file_bytes
    least, most = room(shapes, qtype)
    limit = smallest + (most - least) // 2
    report = convert(tiny_checkpoint(), tmp_path / "t.safetensors", qtype=qtype, max_size=limit / 1e6)
    types = {name: entry["type"] for name, entry in read_metadata(report.out)[1]["tensors"].items()}
    assert smallest < report.file_bytes <= limit
    assert report.file_bytes + next_step_by_role(shapes, qtype, types) > limit
    # Below the smallest file: the error says the least this model takes (rounded up), and that works.
    with pytest.raises(OptionValueError, match="is below the smallest") as too_small:
        convert(tiny_checkpoint(), tmp_path / "no.safetensors", qtype=qtype, max_size=(smallest - 1000) / 1e6)
    least_mb = float(str(too_small.value).split("give at least ")[1].split()[0])
    assert least_mb == pytest.approx(np.ceil(smallest / 1e4) / 100, abs=0.01)
    assert convert(tiny_checkpoint(), tmp_path / "least.safetensors", qtype=qtype, max_size=least_mb).file_bytes \
        <= least_mb * 1e6


def test_measured_gains_spend_a_target_on_rows_and_weights_within_one_step(tmp_path, shapes):
    """With measured gains (the greedy by cut per byte), embedding rows included: the bytes left
    are fewer than any raise not bought would take."""
    linear = [n for n in shapes if n.startswith("h.") and len(shapes[n]) == 2]
    gains = {n: {"q6_0": 1e-6 * (i + 1), "q8_0": 1.5e-6 * (i + 1)} for i, n in enumerate(linear)}
    gains["wte"] = {k: 1e-3 * (1 + k / 4096) for k in EMBEDDING_ROW_COUNTS}
    weights = matrix_weights(shapes)
    least, _ = room(shapes, "q4_0")
    bits = 8 * (least + row_upgrade_bytes("q6_0", shapes["wte"][1], 300)) / weights
    report = convert(tiny_checkpoint(), tmp_path / "m.safetensors", qtype="q4_0", bits_per_weight=bits,
                     upgrade_gains=gains, most_used_tokens=np.arange(5000))
    meta = read_metadata(report.out)[1]
    types = {name: entry["type"] for name, entry in meta["tensors"].items()}
    rows = meta["quantization"]["embedding_rows_raised"]
    left = bits * weights / 8 - matrix_bytes(report)
    assert rows > 0 and left >= 0
    # Every cut is positive, so every raise not bought is one the greedy would take if it fit.
    steps = [stored_bytes(t, shapes[n]) - stored_bytes(types[n], shapes[n])
             for n in linear for t in ("q6_0", "q8_0")[("q4_0", "q6_0", "q8_0").index(types[n]):]]
    steps += [row_upgrade_bytes("q6_0", shapes["wte"][1], k) - row_upgrade_bytes("q6_0", shapes["wte"][1], rows)
              for k in EMBEDDING_ROW_COUNTS if k > rows]
    assert steps and left < min(steps)
    assert meta["quantization"]["size_target"] == {"bits_per_weight": bits}
    assert meta["quantization"]["upgrade_budget"] is None


def test_a_target_above_every_upgrade_buys_them_all(tmp_path, shapes):
    _, most = room(shapes, "q4_m")
    report = convert(tiny_checkpoint(), tmp_path / "all.safetensors", qtype="q4_m", bits_per_weight=16.0)
    assert matrix_bytes(report) == most and report.weight_bits_per_weight < 16.0


def test_the_options_exclude_each_other_and_the_target_serves_4_bit_types(shapes):
    with pytest.raises(OptionValueError, match="--bits-per-weight and --max-size each set the upgrade budget"):
        policy_for("q4_m", bits_per_weight=5.0, max_size=7.0)
    with pytest.raises(OptionValueError, match="--upgrade-budget and --max-size"):
        policy_for("q4_m", upgrade_budget=0.01, max_size=7.0)
    with pytest.raises(OptionValueError, match="serves the 4-bit types"):
        policy_for("q8_0", bits_per_weight=9.0)
    assert policy_for("q4_m").upgrade_budget == 0.015 and policy_for("q4_m", upgrade_budget=0).upgrade_budget == 0


def test_too_small_a_target_says_the_least_and_writes_nothing(tmp_path, shapes):
    least, _ = room(shapes, "q4_m")
    smallest = np.ceil(8 * least / matrix_weights(shapes) * 100) / 100
    out = tmp_path / "x.safetensors"
    with pytest.raises(OptionValueError, match=f"give at least {smallest:.2f} bits/weight"):
        convert(tiny_checkpoint(), out, qtype="q4_m", bits_per_weight=smallest - 0.01)
    assert not out.exists()
    # The value said is one the model takes.
    assert convert(tiny_checkpoint(), out, qtype="q4_m", bits_per_weight=smallest).weight_bits_per_weight <= smallest


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--bits-per-weight", "5", "--max-size", "7"], "--bits-per-weight and --max-size each set the upgrade budget"),
        (["--bits-per-weight", "5", "--upgrade-budget", "1"], "--upgrade-budget and --bits-per-weight each set"),
        (["--max-size", "7", "--upgrade-budget", "1"], "--upgrade-budget and --max-size each set"),
        (["--bits-per-weight", "2"], "--bits-per-weight 2 is below the smallest q4_m file of this model (no upgrades): "
                                     "give at least "),
        (["--max-size", "1"], "--max-size 1 is below the smallest q4_m file of this model (no upgrades): give at least "),
        (["--bits-per-weight", "0"], "Invalid value for '--bits-per-weight': 0.0 is not a positive number"),
        (["--bits-per-weight", "9", "--type", "q8_0"], "--bits-per-weight serves the 4-bit types (q4_0, q4_m)"),
        (["--upgrade-budget", "2", "--type", "q8_0"], "--upgrade-budget serves the 4-bit types (q4_0, q4_m)"),
    ],
)
def test_command_line_errors_are_usage_errors(tmp_path, args, fragment):
    out = tmp_path / "x.safetensors"
    one_error_line(run("quantize", str(tiny_checkpoint()), str(out), "--type", "q4_m", "--calibration", "none", *args,
                       cache=tmp_path), fragment, code=2)
    assert not out.exists()


def test_command_line_target_and_its_report_line(tmp_path):
    out = tmp_path / "t.safetensors"
    done = run("quantize", str(tiny_checkpoint()), str(out), "--type", "q4_m", "--calibration", "none",
               "--max-size", "4.2", cache=tmp_path)
    err = done.stderr.decode()
    assert done.returncode == 0, err
    size = out.stat().st_size
    assert size <= 4_200_000
    from santacpu.loading.quantized import describe

    text = describe(out)
    assert "sized to at most 4.2 MB" in text
    bits = text.split("bits/weight")[1].split()[0]
    last = err.strip().splitlines()[-1]
    assert last == f"santacpu: size target: {size / 1e6:.3f} MB reached of --max-size 4.2 ({float(bits):.3f} bits/weight)"


def test_the_api_takes_what_the_command_line_takes(tmp_path, capsys):
    from quantize.pipeline import run_quantize

    from santacpu.loading.quantized import describe

    report = run_quantize(str(tiny_checkpoint()), tmp_path / "api.safetensors", qtype="q4_0", calibration="none",
                          calibration_tokens=4096, keep=[], revision=None, force=False, bits_per_weight=6.6)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "quantization    q4_0 (embedding q6_0, sized to 6.6 bits/weight)" in describe(report.out)
    assert report.weight_bits_per_weight <= 6.6
    assert last == (f"santacpu: size target: {report.weight_bits_per_weight:.3f} bits/weight reached of "
                    f"--bits-per-weight 6.6 (file {report.file_bytes / 1e6:.3f} MB)")
    with pytest.raises(OptionValueError, match="--upgrade-budget and --bits-per-weight"):
        run_quantize(str(tiny_checkpoint()), tmp_path / "no.safetensors", qtype="q4_0", calibration="none",
                     calibration_tokens=4096, keep=[], upgrade_budget=0.01, revision=None, force=False,
                     bits_per_weight=6.6)
