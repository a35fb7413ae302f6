"""Scoring a model against a reference (santacpu.evaluate): the compiled per-row distributions and
comparison (santacpu.network.divergence) against their NumPy twin, and the forward that runs the LM
head on the scored positions only."""

from __future__ import annotations

import numpy as np
import pytest

import santacpu
from helpers import tiny_checkpoint
from santacpu.errors import SantacpuError
from santacpu.evaluate import score
from santacpu.network.divergence import NOT_KEPT, against_reference, row_distribution
from santacpu.network.reference import log_softmax


def test_the_compiled_comparison_matches_its_numpy_twin():
    rng = np.random.default_rng(7)
    reference = (rng.standard_normal((9, 1000)) * 4).astype(np.float32)
    logits = reference + (rng.standard_normal(reference.shape) * 0.05).astype(np.float32)
    logits[3, [10, 20]] = logits[3].max() + 1  # a tie: the first index wins, as argmax's
    logits[5] = reference[5]  # a row equal to the reference's: no divergence
    targets = rng.integers(0, 1000, len(logits))
    rows = np.arange(len(logits))
    ref_logp = log_softmax(reference)
    logp = log_softmax(logits)
    nll, kld, top = np.empty(len(rows)), np.empty(len(rows)), np.empty(len(rows), np.int64)
    against_reference(ref_logp, np.exp(ref_logp), logits, targets, nll, kld, top)
    np.testing.assert_allclose(nll, -logp[rows, targets], rtol=1e-12)
    want = (np.exp(ref_logp) * (ref_logp - logp)).sum(axis=-1)
    np.testing.assert_allclose(kld, want, rtol=1e-9, atol=1e-13)
    assert abs(kld[5]) < 1e-13 and kld.min() > -1e-13 and kld.max() > 1e-4
    np.testing.assert_array_equal(top, logp.argmax(axis=-1))
    assert top[3] == 10


def test_the_compiled_distribution_matches_its_numpy_twin():
    rng = np.random.default_rng(8)
    logits = (rng.standard_normal((7, 1000)) * 4).astype(np.float32)
    logits[2, [5, 900]] = logits[2].max() + 1  # a tie: the first index wins, as argmax's
    logits = np.concatenate([logits, np.zeros((7, 24), np.float32)], axis=1)[:, :1000]  # a strided view, as scoring passes
    targets = rng.integers(0, 1000, len(logits))
    rows = np.arange(len(logits))
    want = log_softmax(logits)
    nll, top = np.empty(len(rows)), np.empty(len(rows), np.int64)
    logp, p = np.empty(logits.shape), np.empty(logits.shape)
    row_distribution(logits, targets, nll, top, logp, p)
    np.testing.assert_allclose(logp, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(p, np.exp(want), rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(nll, -want[rows, targets], rtol=1e-12)
    np.testing.assert_array_equal(top, want.argmax(axis=-1))
    assert top[2] == 5
    nll_only, top_only = np.empty(len(rows)), np.empty(len(rows), np.int64)
    row_distribution(logits, targets, nll_only, top_only, NOT_KEPT, NOT_KEPT)
    np.testing.assert_array_equal(nll_only, nll)
    np.testing.assert_array_equal(top_only, top)


@pytest.mark.parametrize("quant", ["q8_0", "none"])
def test_logits_from_a_position_are_the_whole_forwards_rows(quant):
    model = santacpu.load(tiny_checkpoint(), quant=quant)
    ids = list(range(3, 40))
    whole = model.logits(ids)
    for first in (0, 1, 20, len(ids) - 1):
        part = model.logits(ids, first)
        assert part.shape == (len(ids) - first, model.config.vocab_size)
        # Integer kernels give each token the same bits in any batch; BLAS's float products may
        # differ in the last bits with the number of rows.
        np.testing.assert_allclose(part, whole[first:], rtol=0, atol=0 if quant == "q8_0" else 1e-5 * np.abs(whole).max())
    for bad, said in ((-1, "first must be >= 0"), (len(ids), "first must be a position of the 37 tokens"),
                      (2.0, "first must be an integer"), (True, "first must be an integer")):
        with pytest.raises(SantacpuError, match=said):
            model.logits(ids, bad)


def test_a_model_scored_against_itself_diverges_nowhere():
    model = santacpu.load(tiny_checkpoint(), quant="q8_0")
    s = score(model, ["def add(a, b):\n    return a + b\n" * 20], 32, reference=model)
    assert s.chunks >= 3 and s.tokens_scored == s.chunks * 15
    assert abs(s.mean_kld) < 1e-12 and s.top1_agreement == 1.0 and abs(s.delta_perplexity) < 1e-9
