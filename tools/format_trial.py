"""Which 4-bit format buys the most accuracy per byte (issue 14), measured before any kernel exists.

Each candidate format quantizes and dequantizes a trained checkpoint's linear weights (NumPy only,
importance-weighted where the format takes importance); the tied embedding is q6_0 in every
variant, as santacpu's policy keeps it; each variant is then scored against full precision on the
checkpoint's held-out text (mean KLD, top-1 agreement; the fp32 float path, so only the weights'
rounding counts, not the kernels' rounding of x). Candidates:
- `q4_0`, `q4_m`: santacpu's formats (santacpu.formats.blocks), 4.5 bits a weight;
- `nl4`: a non-linear 16-level codebook (IQ4_NL's levels), one fp16 scale per block of 32,
  4.5 bits a weight: a code is an index into the table, still one lookup (vpshufb) per code;
- `nf4`: the same with levels at the normal distribution's quantiles (QLoRA's NF4);
- `q5` (5-bit symmetric, 5.5 bits) and `q8_0`, for scale.

    python -m tools.format_trial tests/fixtures/trained_wide [--chunks 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from quantize.calibration import calibration_texts, collect_importance, token_sequences  # noqa: E402
from santacpu.backends.cpu.backend import CpuBackend  # noqa: E402
from santacpu.evaluate import score  # noqa: E402
from santacpu.formats.blocks import QK, get_format  # noqa: E402
from santacpu.loading.checkpoint import open_checkpoint, read_checkpoint  # noqa: E402
from santacpu.model import Model  # noqa: E402
from santacpu.network.weights import LINEAR_WEIGHTS as LINEAR  # noqa: E402
from santacpu.tokenizer import Tokenizer  # noqa: E402

IQ4_NL_LEVELS = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32) / 127
# NF4: the 16 levels at quantiles of a standard normal, scaled to [-1, 1] (Dettmers et al., 2023).
NF4_LEVELS = np.array([
    -1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
    0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0,
], np.float32)


def codebook_roundtrip(w: np.ndarray, importance: np.ndarray | None, levels: np.ndarray) -> np.ndarray:
    """w [rows, cols] through a 16-level codebook format: per block of 32, the fp16 scale d that
    minimises the (importance-)weighted error sum w_i (x_i - d L[q_i])^2, searched over 41 starts
    around max|x| / max|L| (either sign) with a least-squares refit; the dequantized values."""
    rows, cols = w.shape
    x = w.astype(np.float32).reshape(-1, QK)  # [blocks, 32]
    weight = np.ones_like(x) if importance is None else np.broadcast_to(importance, (rows, cols)).reshape(-1, QK)
    weight = weight + 1e-12
    midpoints = (levels[1:] + levels[:-1]) / 2
    amax = np.abs(x).max(axis=1)
    big = x[np.arange(len(x)), np.abs(x).argmax(axis=1)]
    best_score = np.full(len(x), -np.inf)
    best_d = np.zeros(len(x), np.float32)

    def consider(d: np.ndarray) -> None:
        safe = np.where(d == 0, 1.0, d)
        q = np.searchsorted(midpoints, x / safe[:, None])
        value = levels[q]
        sxv = (weight * x * value).sum(axis=1)
        svv = (weight * value * value).sum(axis=1)
        fit = np.where(svv > 0, sxv / np.where(svv > 0, svv, 1), 0)
        s = np.where(svv > 0, sxv * sxv / np.where(svv > 0, svv, 1), -np.inf)
        better = (s > best_score) & (d != 0)
        best_score[better] = s[better]
        best_d[better] = fit[better]

    for sign in (1.0, -1.0):  # the largest value on the table's longer side, or its shorter one
        for i in range(-10, 11):
            consider(sign * np.sign(big) * amax * (1 + 0.02 * i))
    for _ in range(2):
        consider(best_d.copy())
    d16 = best_d.astype(np.float16).astype(np.float32)
    safe = np.where(d16 == 0, 1.0, d16)
    q = np.searchsorted(midpoints, x / safe[:, None])
    return (d16[:, None] * levels[q]).reshape(rows, cols)


def symmetric_roundtrip(w: np.ndarray, importance: np.ndarray | None, bits: int) -> np.ndarray:
    """A plain symmetric format of `bits` bits (codes -2^(b-1)..2^(b-1)-1, one fp16 scale per block),
    the scale searched as for the codebooks."""
    levels = np.arange(-(1 << (bits - 1)), 1 << (bits - 1), dtype=np.float32) / (1 << (bits - 1))
    return codebook_roundtrip(w, importance, levels)


def roundtrip(name: str, w: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    if name in ("q4_0", "q4_m", "q8_0", "q6_0"):
        fmt = get_format(name)
        return fmt.dequantize(fmt.quantize(w, importance))
    if name == "nl4":
        return codebook_roundtrip(w, importance, IQ4_NL_LEVELS)
    if name == "nf4":
        return codebook_roundtrip(w, importance, NF4_LEVELS)
    if name == "q5":
        return symmetric_roundtrip(w, importance, 5)
    raise ValueError(name)


BITS = {"q4_0": 4.5, "q4_m": 4.5, "nl4": 4.5, "nf4": 4.5, "q5": 5.5, "q8_0": 8.5}
IMPORTANCE_TOKENS = 4096  # calibration tokens for the importance, as `santacpu quantize` takes by default


@dataclasses.dataclass
class Trial:
    """A trained checkpoint opened for quantize-dequantize trials (here and in
    tools/upgrade_sensitivity.py)."""

    tokenizer: Tokenizer
    n_ctx: int
    importance: dict  # from the first IMPORTANCE_TOKENS calibration tokens
    calibration_after: list[int]  # the calibration tokens after those, for scoring on calibration text
    original: object  # the full-precision ModelWeights
    reference: Model  # the fp32 reference model

    def model(self, weights) -> Model:
        return Model(weights, self.tokenizer, CpuBackend(), kv_cache="float32")


def open_trial(checkpoint: Path, extra_chunks: int = 0) -> Trial:
    """The checkpoint, its calibration text (the standard library less its held-out files), the
    importance and the reference; `extra_chunks` x n_ctx more calibration tokens kept for scoring."""
    warnings.simplefilter("ignore")  # the fixtures have no tokenizer.json: the bundled one serves
    tokenizer = Tokenizer.santacoder()
    reader = open_checkpoint(checkpoint)
    n_ctx, eos = reader.config.n_positions, reader.config.eos_token_id
    exclude = set((checkpoint / "heldout.txt").read_text().split())
    calib, _ = calibration_texts(None, exclude)
    importance = collect_importance(reader, token_sequences(calib, tokenizer, eos, IMPORTANCE_TOKENS, n_ctx))
    stream = [t for s in token_sequences(calib, tokenizer, eos, IMPORTANCE_TOKENS + n_ctx * extra_chunks, n_ctx) for t in s]
    original = read_checkpoint(checkpoint)
    reference = Model(original, tokenizer, CpuBackend(), kv_cache="float32")
    return Trial(tokenizer, n_ctx, importance, stream[IMPORTANCE_TOKENS:], original, reference)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--formats", default="q4_0,q4_m,nl4,nf4,q5,q8_0")
    parser.add_argument("--chunks", type=int, default=16, help="256-token chunks of held-out text scored")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    trial = open_trial(args.checkpoint)
    importance, original = trial.importance, trial.original
    ids = trial.tokenizer.encode((args.checkpoint / "heldout.py.txt").read_text(encoding="utf-8"))[: trial.n_ctx * args.chunks]
    texts = [trial.tokenizer.decode(ids)]
    embedding = roundtrip("q6_0", np.asarray(original.wte), importance.get("wte"))
    linear_values = sum(np.asarray(getattr(layer, n)).size for layer in original.layers for n in LINEAR)
    print(f"{args.checkpoint.name}: linear weights {linear_values:,} of {linear_values + original.wte.size:,} values")
    rows = {}
    for name in args.formats.split(","):
        layers = []
        for i, layer in enumerate(original.layers):
            changes = {n: roundtrip(name, np.asarray(getattr(layer, n)), importance.get(f"h.{i}.{n}")) for n in LINEAR}
            layers.append(dataclasses.replace(layer, **changes))
        weights = dataclasses.replace(original, wte=embedding, layers=layers)
        s = score(trial.model(weights), texts, trial.n_ctx, trial.reference)
        rows[name] = {"bits": BITS[name], "mean_kld": s.mean_kld, "top1": s.top1_agreement}
        print(f"{name:<6} {BITS[name]:>4} bits  mean KLD {s.mean_kld:.6f}  top-1 {100 * s.top1_agreement:.2f}%", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
