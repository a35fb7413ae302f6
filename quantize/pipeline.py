"""`santacpu quantize`: calibration (optional), conversion, and the report printed afterwards.

May import: `santacpu` (loading, tokenizer) and the other `quantize` modules.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from santacpu.loading.checkpoint import open_checkpoint
from santacpu.loading.source import resolve
from santacpu.tokenizer import Tokenizer

from .calibration import SEQUENCE_TOKENS, calibration_texts, collect_importance, most_used_tokens, token_sequences
from .converter import ConversionReport, check_output, check_source, convert
from .policy import Policy, parse_keep
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
    print(f"santacpu: calibrating on {sum(map(len, sequences))} tokens from {note}", file=sys.stderr)
    importance = collect_importance(reader, sequences)
    gains, most_used = None, None
    if measure_for is not None:
        most_used = most_used_tokens(texts, tokenizer, reader.config.eos_token_id, reader.config.vocab_size)
        gains = measure_upgrade_gains(reader, sequences, measure_for, importance, most_used)
    return importance, gains, most_used, f"{note}, {sum(map(len, sequences))} tokens"


def report_lines(report: ConversionReport) -> list[str]:
    by_type: dict[str, int] = {}
    for t in report.tensors:
        by_type[t.qtype] = by_type.get(t.qtype, 0) + 1
    worst = sorted((t for t in report.tensors if t.rel_rmse > 0), key=lambda t: -t.rel_rmse)[:3]
    lines = [
        f"wrote {report.out}: {report.file_bytes / 1e6:.1f} MB, "
        f"{report.weight_bits_per_weight:.2f} bits/weight over the matrices, {report.seconds:.1f} s",
        "tensors: " + ", ".join(f"{n} {q}" for q, n in sorted(by_type.items())),
    ]
    if worst:
        lines.append("largest relative RMS errors: " + ", ".join(f"{t.name} ({t.qtype}) {t.rel_rmse:.4f}" for t in worst))
    return lines


def default_calibration(qtype: str) -> str:
    """Importance-weighted rounding by default for the 4-bit types only (q8_0's error is already
    small next to what calibration changes)."""
    return "none" if qtype == "q8_0" else "stdlib"


def run_quantize(src, out, *, qtype, calibration, calibration_tokens, keep, upgrade_budget, revision, force) -> ConversionReport:
    """`santacpu quantize`: `calibration` None takes `default_calibration(qtype)`."""
    if calibration is None:
        calibration = default_calibration(qtype)
    keep_rules = parse_keep(list(keep))
    policy = Policy(qtype, keep_rules, upgrade_budget)  # a bad type fails now, not after calibrating
    check_output(Path(out), force, qtype)
    check_source(src)
    importance, gains, most_used, note = None, None, None, None
    if calibration not in (None, "none"):
        measure_for = qtype if policy.buys_upgrades else None
        importance, gains, most_used, note = calibrate(src, revision, calibration, calibration_tokens, measure_for)
    report = convert(src, Path(out), qtype=qtype, keep=keep_rules, importance=importance, calibration_note=note,
                     revision=revision, force=force, upgrade_budget=upgrade_budget, upgrade_gains=gains,
                     most_used_tokens=most_used)
    for line in report_lines(report):
        print(f"santacpu: {line}", file=sys.stderr)
    return report
