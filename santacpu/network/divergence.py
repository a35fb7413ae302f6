"""Next-token distributions from logits, row by row, and their KL divergence from a reference's:
the arithmetic of measuring a model against full precision (scoring in `santacpu.evaluate`, the
converter's upgrade measurement in `quantize.sensitivity`). Compiled, in float64 as
`reference.log_softmax` (its NumPy twin in the tests), one pass a row: over a 49,152-token
vocabulary NumPy's array temporaries made these the cost of scoring a small model.

Shapes: T = rows (positions), V = vocabulary.

May import: numpy, numba, `santacpu.kernel_cache`.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from ..kernel_cache import track_kernel_sources

track_kernel_sources()  # before the first cache=True kernel (see santacpu.kernel_cache)

NOT_KEPT = np.empty((0, 0))  # `row_distribution`'s logp and p when only nll and top are wanted


@njit(cache=True)
def _first_argmax_and_log_normaliser(row):
    """row [V] float32 -> (the first index of its maximum, log sum exp(row) in float64)."""
    best = 0
    for i in range(1, row.shape[0]):
        if row[i] > row[best]:
            best = i
    peak = np.float64(row[best])
    total = 0.0
    for i in range(row.shape[0]):
        total += math.exp(np.float64(row[i]) - peak)
    return best, peak + math.log(total)


@njit(cache=True)
def row_distribution(logits, targets, nll, top, logp, p):
    """Per row t of float32 logits [T, V]: nll[t] = -log p(targets[t]), top[t] = the first argmax;
    when logp and p are [T, V] (not [0, 0]), the row's log-probabilities and probabilities too (a
    reference's, kept for `against_reference`)."""
    T, V = logits.shape
    keep = logp.shape[0] == T
    for t in range(T):
        row = logits[t]
        top[t], log_normaliser = _first_argmax_and_log_normaliser(row)
        nll[t] = log_normaliser - np.float64(row[targets[t]])
        if keep:
            for i in range(V):
                logp[t, i] = np.float64(row[i]) - log_normaliser
                p[t, i] = math.exp(logp[t, i])


@njit(cache=True)
def against_reference(ref_logp, ref_p, logits, targets, nll, kld, top):
    """Per row t of a model's float32 logits [T, V]: nll[t] and top[t] as `row_distribution`'s and
    kld[t] = KL(reference || model) from the reference's log-probabilities and probabilities [T, V]."""
    T, V = logits.shape
    for t in range(T):
        row = logits[t]
        top[t], log_normaliser = _first_argmax_and_log_normaliser(row)
        nll[t] = log_normaliser - np.float64(row[targets[t]])
        divergence = 0.0
        for i in range(V):
            divergence += ref_p[t, i] * (ref_logp[t, i] - (np.float64(row[i]) - log_normaliser))
        kld[t] = divergence
