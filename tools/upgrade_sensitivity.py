"""How much mean KLD each single upgrade buys, scored whole (issue 14): the exact measurement that
quantize/sensitivity.py estimates cheaply for `santacpu quantize`, to check its choices against.

From a trained checkpoint with every linear weight at the 4-bit type (and the embedding at q6_0,
as santacpu's policy keeps it), each linear weight in turn is raised alone to q6_0 and to q8_0
(NumPy quantize-dequantize, importance-weighted, the fp32 float path); every variant is scored
against full precision on the same text. Prints each upgrade's KLD change and extra bytes, then
the upgrades a greedy choice by KLD cut per byte buys within `--budget` (percent of the tensor
bytes), as `--keep` rules. The text is calibration text (the standard library less the
checkpoint's held-out files), not the held-out text docs/quantization.md's tables are scored on.

Single upgrades are not additive (rounding errors cancel: some raise KLD), so the greedy choice
is an estimate to be scored as a whole (tools/compare_llamacpp.py).

    python -m tools.upgrade_sensitivity tests/fixtures/trained_wide [--chunks 16] [--budget 0.6] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from quantize.policy import UPGRADE_TYPES, greedy_upgrades, stored_bytes  # noqa: E402
from santacpu.evaluate import score_models  # noqa: E402
from tools.format_trial import LINEAR, open_trial, roundtrip  # noqa: E402

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--type", default="q4_m", help="the 4-bit type every linear weight starts at")
    parser.add_argument("--chunks", type=int, default=16, help="256-token chunks of calibration text scored")
    parser.add_argument("--budget", type=float, default=0.6, help="percent of the tensor bytes for the greedy choice")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    trial = open_trial(args.checkpoint, extra_chunks=args.chunks)
    importance, original = trial.importance, trial.original
    scored = [trial.tokenizer.decode(trial.calibration_after)]  # the calibration tokens after the importance's
    embedding = roundtrip("q6_0", np.asarray(original.wte), importance.get("wte"))
    cache: dict[tuple[int, str, str], np.ndarray] = {}

    def weight(i: int, name: str, qtype: str) -> np.ndarray:
        if (i, name, qtype) not in cache:
            cache[i, name, qtype] = roundtrip(qtype, np.asarray(getattr(original.layers[i], name)), importance.get(f"h.{i}.{name}"))
        return cache[i, name, qtype]

    def variant(upgrade: tuple[int, str, str] | None):
        layers = []
        for i, layer in enumerate(original.layers):
            types = {n: upgrade[2] if upgrade and upgrade[:2] == (i, n) else args.type for n in LINEAR}
            layers.append(dataclasses.replace(layer, **{n: weight(i, n, t) for n, t in types.items()}))
        return trial.model(dataclasses.replace(original, wte=embedding, layers=layers))

    models = {"base": variant(None)}
    extra: dict[str, dict[str, int]] = {}
    for i, layer in enumerate(original.layers):
        for n in LINEAR:
            shape = getattr(layer, n).shape
            extra[f"h.{i}.{n}"] = {q: stored_bytes(q, shape) - stored_bytes(args.type, shape) for q in UPGRADE_TYPES}
            for q in UPGRADE_TYPES:
                models[f"h.{i}.{n}={q}"] = variant((i, n, q))
    scores = score_models(models, scored, trial.n_ctx, trial.reference)
    base = scores["base"].mean_kld
    tensor_bytes = stored_bytes("q6_0", original.wte.shape) + sum(
        stored_bytes(args.type, getattr(layer, n).shape) for layer in original.layers for n in LINEAR)
    gains = {t: {q: base - scores[f"{t}={q}"].mean_kld for q in UPGRADE_TYPES} for t in extra}
    print(f"{args.checkpoint.name}: every linear weight {args.type}, embedding q6_0: mean KLD {base:.6f} "
          f"on {scores['base'].chunks} calibration chunks; {tensor_bytes:,} bytes of matrices")
    print(f"{'upgrade':<34}{'extra KB':>9}{'KLD cut':>9}{'cut % per 1% bytes':>20}")
    for t in extra:
        for q in UPGRADE_TYPES:
            per = (gains[t][q] / base) / (extra[t][q] / tensor_bytes)
            print(f"{t + '=' + q:<34}{extra[t][q] / 1e3:>9.1f}{100 * gains[t][q] / base:>8.1f}%{per:>20.1f}")
    chosen = greedy_upgrades(gains, extra, args.budget / 100 * tensor_bytes)
    keep = [f"{t}={q}" for t, q in chosen.items()]
    print(f"greedy within {args.budget}%: " + " ".join(f"--keep {k}" for k in keep))
    if args.json:
        args.json.write_text(json.dumps({"base": base, "gains": gains, "extra": extra, "keep": keep}, indent=1) + "\n")


if __name__ == "__main__":
    main()
