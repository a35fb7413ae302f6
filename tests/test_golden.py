"""santacpu's NumPy reference against logits and greedy ids that transformers produced.

tests/fixtures/golden.npz comes from tools/make_golden.py (transformers' GPTBigCodeForCausalLM,
eager attention, float32) on tiny random checkpoints; see that script for its contents. Here the
same checkpoints are rebuilt from the saved seed, in both published layouts, without torch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import santacpu
from santacpu.network import reference
from santacpu.loading.checkpoint import read_checkpoint
from santacpu.formats.safetensors_io import SafetensorsFile

GOLDEN = Path(__file__).parent / "fixtures" / "golden.npz"
REGENERATE = "regenerate it with `python tools/make_golden.py` (dev extra: torch, transformers)"
VARIANTS = {"mqa": True, "mha": False}  # name -> multi_query
LAYOUTS = ("gpt_bigcode", "legacy")
PROMPTS = ("header", "snippet", "fim", "single")
REL_TOL = 1e-4  # max abs error <= REL_TOL * max |golden logit|


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(GOLDEN, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def _check_fingerprint(golden, variant: str, folder: Path) -> None:
    """Fail with a clear message if the rebuilt checkpoint is not the one the golden came from."""
    f = SafetensorsFile(folder / "model.safetensors")
    names, index, expected = (golden[f"{variant}.fp_{k}"] for k in ("names", "index", "values"))
    found = np.array([np.asarray(f.array(str(n))).reshape(-1)[i] for n, i in zip(names, index)], dtype=np.float32)
    if not np.array_equal(found, expected):
        pytest.fail(
            f"the tiny '{variant}' checkpoint rebuilt from seed {int(golden['seed'])} is not the one "
            f"{GOLDEN.name} was made from (did tools/random_checkpoint.py change?): weight values "
            f"{found.tolist()} != {expected.tolist()}; {REGENERATE}"
        )


@pytest.fixture(scope="module")
def weights(golden, tiny_checkpoint):
    """weights(variant, layout) -> ModelWeights, read once; the checkpoint's fingerprint checked first."""
    cache = {}

    def get(variant: str, layout: str):
        if (variant, layout) not in cache:
            seed = int(golden["seed"])
            _check_fingerprint(golden, variant, tiny_checkpoint("gpt_bigcode", multi_query=VARIANTS[variant], seed=seed))
            folder = tiny_checkpoint(layout, multi_query=VARIANTS[variant], seed=seed)
            cache[variant, layout] = read_checkpoint(folder)
        return cache[variant, layout]

    return get


@pytest.fixture(scope="module")
def ref_logits(golden, weights):
    """ref_logits(variant, layout, prompt) -> reference.forward logits [T, V] of the saved prompt ids."""
    cache = {}

    def get(variant: str, layout: str, prompt: str) -> np.ndarray:
        key = (variant, layout, prompt)
        if key not in cache:
            cache[key] = reference.forward(weights(variant, layout), golden[f"{variant}.{prompt}.ids"])
        return cache[key]

    return get


def test_golden_file_is_complete(golden):
    assert [str(v) for v in golden["variants"]] == list(VARIANTS)
    assert [str(p) for p in golden["prompts"]] == list(PROMPTS)
    columns, pad, n_new = golden["columns"], int(golden["pad_start"]), int(golden["n_new"])
    assert np.all(np.diff(columns) > 0) and (columns >= pad).any()
    assert str(golden["transformers_version"]) and str(golden["torch_version"])
    for variant in VARIANTS:
        for prompt in PROMPTS:
            key = f"{variant}.{prompt}"
            T = len(golden[key + ".ids"])
            assert golden[key + ".logits"].shape == (T - 1, len(columns))
            assert golden[key + ".last"].dtype == np.float32
            assert golden[key + ".greedy"].shape == (n_new,) and (golden[key + ".greedy"] < pad).all()
    assert len(golden["mqa.single.ids"]) == 1


@pytest.mark.parametrize("variant", VARIANTS)
def test_checkpoint_matches_fingerprint(golden, tiny_checkpoint, variant):
    _check_fingerprint(golden, variant, tiny_checkpoint("gpt_bigcode", multi_query=VARIANTS[variant], seed=int(golden["seed"])))


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_reference_logits_match_golden(golden, ref_logits, variant, layout, prompt):
    assert_matches_golden(golden, variant, layout, prompt, ref_logits(variant, layout, prompt))


def assert_matches_golden(golden, variant: str, layout: str, prompt: str, logits: np.ndarray) -> None:
    """Saved columns of every position but the last, and the whole last row, within REL_TOL."""
    key = f"{variant}.{prompt}"
    gold_cols, gold_last = golden[key + ".logits"], golden[key + ".last"]
    scale = max(np.abs(gold_cols).max(initial=0.0), np.abs(gold_last).max())
    err_cols = np.abs(logits[:-1, golden["columns"]] - gold_cols).max(initial=0.0)
    err_last = np.abs(logits[-1] - gold_last).max()
    assert max(err_cols, err_last) <= REL_TOL * scale, (
        f"{key} ({layout}): max abs error {err_cols:.3g} (columns), {err_last:.3g} (last row) "
        f"> {REL_TOL} * max|logit| {scale:.3g}"
    )


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_layouts_give_identical_logits(ref_logits, variant, prompt):
    np.testing.assert_array_equal(ref_logits(variant, "legacy", prompt), ref_logits(variant, "gpt_bigcode", prompt))


def _greedy_reference(weights, ids, n_new: int, pad_start: int, first_logits: np.ndarray) -> list[int]:
    """Greedy decoding by full re-forward each step, padding rows suppressed before the argmax."""
    seq, out = list(ids), []
    row = first_logits[-1]
    for step in range(n_new):
        if step:
            row = reference.forward(weights, seq)[-1]
        row = row.copy()
        row[pad_start:] = -np.inf
        out.append(int(np.argmax(row)))
        seq.append(out[-1])
    return out


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_reference_greedy_matches_golden(golden, weights, ref_logits, variant, layout, prompt):
    key = f"{variant}.{prompt}"
    ids = golden[key + ".ids"]
    got = _greedy_reference(weights(variant, layout), ids, int(golden["n_new"]), int(golden["pad_start"]),
                            ref_logits(variant, layout, prompt))
    assert got == golden[key + ".greedy"].tolist(), f"{key} ({layout})"


@pytest.fixture(scope="module")
def fast_model(golden, weights, tiny_checkpoint):
    """fast_model(variant, layout) -> santacpu.Model (the Numba incremental path), loaded once."""
    cache = {}

    def get(variant: str, layout: str):
        if (variant, layout) not in cache:
            weights(variant, layout)  # fingerprint checked first
            cache[variant, layout] = santacpu.load(
                tiny_checkpoint(layout, multi_query=VARIANTS[variant], seed=int(golden["seed"])), quant="none", kv_cache="float32"
            )
        return cache[variant, layout]

    return get


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_fast_logits_match_golden(golden, fast_model, variant, layout, prompt):
    ids = golden[f"{variant}.{prompt}.ids"].tolist()
    assert_matches_golden(golden, variant, layout, prompt, fast_model(variant, layout).logits(ids))


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_fast_greedy_generation_matches_golden(golden, fast_model, variant, layout, prompt):
    key = f"{variant}.{prompt}"
    gold = golden[key + ".greedy"].tolist()
    eos = fast_model(variant, layout).config.eos_token_id
    if eos in gold:  # generate() ends at EOS without yielding it
        gold = gold[: gold.index(eos)]
    got = list(fast_model(variant, layout).generate(golden[key + ".ids"].tolist(), max_new_tokens=int(golden["n_new"])))
    assert got == gold, f"{key} ({layout})"


def test_no_torch_imported():
    assert "torch" not in sys.modules and "transformers" not in sys.modules
