"""`santacpu quantize`: calibration (optional), conversion, and the report printed afterwards.

May import: `santacpu` (loading, tokenizer) and the other `quantize` modules.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from santacpu.errors import OptionValueError
from santacpu.loading.checkpoint import open_checkpoint
from santacpu.loading.source import resolve
from santacpu.tokenizer import Tokenizer

from .calibration import SEQUENCE_TOKENS, calibration_texts, collect_importance, most_used_tokens, token_sequences
from .calibration_cache import KeptCalibration
from .converter import ConversionReport, check_output, check_size_target, check_source, convert, policy_for
from .policy import FOUR_BIT_TYPES, ROW_UPGRADE_TYPE, parse_keep
from .sensitivity import measure_upgrade_gains


def calibrate(src: str, revision: str | None, calibration: str, max_tokens: int,
              measure_for: str | None) -> tuple[dict, dict | None, np.ndarray | None, str]:
    """(importance, measured upgrade gains for the 4-bit type `measure_for` or None, the token
    ids the calibration text uses most, most used first, or None when nothing is measured (only
    measured gains can buy embedding rows), a note on the calibration text)."""
    folder = resolve(src, revision)
    reader = open_checkpoint(folder)
    tokenizer = Tokenizer.for_checkpoint(folder, reader.config.vocab_size)
    texts, note = calibration_texts(None if calibration == "stdlib" else calibration)
    n_ctx = min(SEQUENCE_TOKENS, reader.config.n_positions)
    sequences = token_sequences(texts, tokenizer, reader.config.eos_token_id, max_tokens, n_ctx)
    tokens = sum(map(len, sequences))
    kept = KeptCalibration(folder, reader.config, texts, sequences, n_ctx)
    importance = kept.importance()
    if importance is None:
        print(f"santacpu: calibrating on {tokens} tokens from {note}", file=sys.stderr)
        importance = collect_importance(reader, sequences)
        kept.keep(importance)
    measured = kept.measured(measure_for) if measure_for is not None else None
    gains, most_used = measured or (None, None)
    if kept.reused:  # (said before the measurement that may still run)
        print(f"santacpu: {' and '.join(kept.reused)} of an earlier run on {tokens} tokens from {note} "
              f"(kept in {kept.path.parent}: `santacpu cache clear` removes them)", file=sys.stderr)
    if measure_for is not None and measured is None:
        most_used = most_used_tokens(texts, tokenizer, reader.config.eos_token_id, reader.config.vocab_size)
        gains = measure_upgrade_gains(reader, sequences, measure_for, importance, most_used)
        kept.keep(importance, gains, measure_for, most_used)
    return importance, gains, most_used, f"{note}, {tokens} tokens"


def report_lines(report: ConversionReport, seconds: float | None = None, calibration_s: float = 0.0) -> list[str]:
    """What `santacpu quantize` says it did: the file, its size and the whole time (`seconds`,
    calibration included; default the conversion's), then per stored type the tensors written,
    their bytes and a few names, the asked-for type first, and said even where no tensor got it;
    last, under a size target, the bits per weight and size reached against it."""
    seconds = report.seconds if seconds is None else seconds
    timing = f"in {seconds:.1f} s" + (f" (calibration {calibration_s:.1f} s, conversion {report.seconds:.1f} s)"
                                      if calibration_s else "")
    lines = [
        f"wrote {report.out}: {report.file_bytes / 1e6:.1f} MB, "
        f"{report.weight_bits_per_weight:.2f} bits/weight over the matrices, {timing}",
    ]
    by_type: dict[str, list] = {}
    for t in report.tensors:
        by_type.setdefault(t.qtype, []).append(t)
    order = [report.qtype] * bool(report.qtype) + sorted(q for q in by_type if q != report.qtype)
    for qtype in order:
        tensors = by_type.get(qtype, [])
        if not tensors:
            lower = (f"a lower {report.size_target.option}" if report.size_target is not None else
                     "--upgrade-budget 0")
            if report.kept:
                why = "the --keep rules (and any upgrades) chose other types for every matrix"
            elif qtype in FOUR_BIT_TYPES:
                why = ("the upgrade budget raised every linear weight, whose bytes are small beside the embedding's in "
                       f"this model; {lower} keeps them at " + qtype)
            else:
                why = "no matrix of this model is whole blocks of it"
            lines.append(f"{qtype}: no tensor (asked for, but {why})")
            continue
        names = [t.name for t in tensors]
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        note = " (the type asked for)" if qtype == report.qtype else ""
        lines.append(f"{qtype}{note}: {len(tensors)} tensor{'s' * (len(tensors) > 1)}, "
                     f"{sum(t.nbytes for t in tensors) / 1e6:.2f} MB: {shown}")
    if report.embedding_rows:
        lines.append(f"embedding: the {report.embedding_rows} most used tokens' rows at {ROW_UPGRADE_TYPE}, the others "
                     "as listed above")
    worst = sorted((t for t in report.tensors if t.rel_rmse > 0), key=lambda t: -t.rel_rmse)[:3]
    if worst:
        lines.append("largest relative RMS errors: " + ", ".join(f"{t.name} ({t.qtype}) {t.rel_rmse:.4f}" for t in worst))
    if report.size_target is not None:
        lines.append(target_line(report))
    return lines


def target_line(report: ConversionReport) -> str:
    """The report's last line under a size target: what the file reached, measured on it, beside
    what was asked."""
    target, bits, size = report.size_target, report.weight_bits_per_weight, report.file_bytes / 1e6
    if target.bits_per_weight is not None:
        return (f"size target: {bits:.3f} bits/weight reached of --bits-per-weight {target.bits_per_weight:g} "
                f"(file {size:.3f} MB)")
    return f"size target: {size:.3f} MB reached of --max-size {target.max_size:g} ({bits:.3f} bits/weight)"


def default_calibration(qtype: str) -> str:
    """Importance-weighted rounding by default for the 4-bit types only (the 6- and 8-bit types'
    error is already small next to what calibration changes)."""
    return "stdlib" if qtype in FOUR_BIT_TYPES else "none"


def run_quantize(src, out, *, qtype, calibration, calibration_tokens, keep, upgrade_budget=None, revision, force,
                 bits_per_weight=None, max_size=None, show_report=True) -> ConversionReport:
    """`santacpu quantize`: `calibration` None takes `default_calibration(qtype)`; the upgrade
    budget is `upgrade_budget` (a fraction; None: the default) or a size target, `bits_per_weight`
    over the matrices or `max_size` MB for the file (at most one of the three). `show_report`: print
    what was written (first use does not)."""
    started = time.perf_counter()
    if calibration is None:
        calibration = default_calibration(qtype)
    if upgrade_budget and qtype not in FOUR_BIT_TYPES:  # (the other types have nothing to buy: not silently)
        raise OptionValueError(f"--upgrade-budget serves the 4-bit types ({', '.join(FOUR_BIT_TYPES)}): a {qtype} "
                               "file has no upgrades to buy")
    keep_rules = parse_keep(list(keep))
    # A bad type, or a size target this model cannot meet, fails now, not after calibrating.
    policy = policy_for(qtype, keep_rules, upgrade_budget, bits_per_weight, max_size)
    check_output(Path(out), force, qtype)
    check_source(src, Path(out))
    calibrating = calibration not in (None, "none")
    check_size_target(src, revision, policy, importance_weighted=calibrating, measured=calibrating and policy.buys_upgrades)
    importance, gains, most_used, note = None, None, None, None
    if calibrating:
        measure_for = qtype if policy.buys_upgrades else None
        importance, gains, most_used, note = calibrate(src, revision, calibration, calibration_tokens, measure_for)
    calibration_s = time.perf_counter() - started if importance is not None else 0.0
    report = convert(src, Path(out), qtype=qtype, keep=keep_rules, importance=importance, calibration_note=note,
                     revision=revision, force=force, upgrade_budget=upgrade_budget, upgrade_gains=gains,
                     most_used_tokens=most_used, bits_per_weight=bits_per_weight, max_size=max_size)
    if show_report:
        for line in report_lines(report, time.perf_counter() - started, calibration_s):
            print(f"santacpu: {line}", file=sys.stderr)
    return report
