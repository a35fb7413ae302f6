"""Prompt reuse across requests: a model keeps its last sequence's KV cache, and the next request
computes only what follows the longest common token prefix, with exactly the output of a fresh
model. Also: SPM prompts make typing at the cursor reuse almost everything, PSM prompts do not."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import tiny_checkpoint

import santacpu
import santacpu.generation.runner as runner_module
from santacpu.generation.prompts import build_fim_prompt
from santacpu.tokenizer import Tokenizer

# Exactness on the threaded paths too: every core, not a worker's one thread (conftest).
pytestmark = pytest.mark.usefixtures("all_cores")

TOK = Tokenizer.santacoder()
PROMPT = [int(i) for i in np.random.default_rng(5).integers(0, 49152, 30)]


class CountingEngine:
    """Wraps the real engine: records how many tokens each forward ran and what it returned."""

    def __init__(self, engine):
        self.engine = engine
        self.calls: list[tuple[int, np.ndarray]] = []

    def new_cache(self, n_ctx=None):
        return self.engine.new_cache(n_ctx)

    def forward(self, cache, ids, all_logits=False, first_logit=0):
        logits = self.engine.forward(cache, ids, all_logits, first_logit)
        self.calls.append((len(ids), logits.copy()))
        return logits

    def tokens_run(self) -> int:
        return sum(n for n, _ in self.calls)


@pytest.fixture()
def model():
    """A model with prompt reuse (the default) whose forwards are counted."""
    m = santacpu.load(tiny_checkpoint(), quant="none")
    m.engine = CountingEngine(m.engine)
    return m


@pytest.fixture(scope="module")
def fresh():
    """Every generation from an empty cache: the reference."""
    return santacpu.load(tiny_checkpoint(), quant="none", reuse_prompt=False)


def run(m, ids, n=8, **options):
    return list(m.generate(ids, max_new_tokens=n, **options))


def first_logits(m, ids) -> np.ndarray:
    """The logits a request's first token is chosen from (the last prompt token's row)."""
    m.engine.calls.clear()
    run(m, ids, n=1)
    return m.engine.calls[-1][1][-1]


def test_a_request_sharing_a_prefix_computes_only_the_new_tokens(model, fresh):
    first = run(model, PROMPT)
    assert model.last_stats.reused_tokens == 0 and model.last_stats.computed_tokens == len(PROMPT)
    # The cache now holds PROMPT and the fed output; the next prompt keeps 3 of those tokens, then differs.
    second = PROMPT + first[:3] + [17, 18]
    model.engine.calls.clear()
    out = run(model, second, lookup=False)
    stats = model.last_stats
    assert (stats.prompt_tokens, stats.reused_tokens, stats.computed_tokens) == (len(second), len(PROMPT) + 3, 2)
    assert model.engine.calls[0][0] == 2  # the prompt forward ran the 2 new tokens only
    assert model.engine.tokens_run() == 2 + len(out) - 1  # then one token per later step
    assert out == run(fresh, second)
    fresh_counter = CountingEngine(fresh.engine)
    fresh.engine = fresh_counter
    try:
        want = first_logits(fresh, second)
    finally:
        fresh.engine = fresh_counter.engine
    got = first_logits(model, second)
    assert model.last_stats.computed_tokens == 1
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_a_warm_up_leaves_the_kept_cache_as_it_was(fresh):
    model = santacpu.load(tiny_checkpoint(), quant="none")
    first = run(model, PROMPT)
    model.warm_up()  # its forwards run on caches of their own
    second = PROMPT + first[:3] + [17, 18]
    assert run(model, second, lookup=False) == run(fresh, second)
    assert model.last_stats.reused_tokens == len(PROMPT) + 3


def test_a_request_that_is_a_strict_prefix_recomputes_its_last_token(model, fresh):
    run(model, PROMPT)
    for cut in (len(PROMPT), 20, 1):  # the same prompt again, a shorter one, a single token
        out = run(model, PROMPT[:cut])
        assert (model.last_stats.reused_tokens, model.last_stats.computed_tokens) == (cut - 1, 1)
        assert out == run(fresh, PROMPT[:cut])


def test_a_request_diverging_at_the_first_token_computes_everything(model, fresh):
    run(model, PROMPT)
    other = [PROMPT[0] + 1] + PROMPT[1:]
    out = run(model, other)
    assert (model.last_stats.reused_tokens, model.last_stats.computed_tokens) == (0, len(other))
    assert out == run(fresh, other)


def test_sampling_does_not_depend_on_what_was_cached(model, fresh):
    options = {"temperature": 1.0, "top_k": 40, "seed": 3}
    run(model, PROMPT[:25], **options)
    out = run(model, PROMPT, **options)
    assert model.last_stats.reused_tokens == 25
    assert out == run(fresh, PROMPT, **options)


def test_interleaved_generations_share_one_cache_correctly(model, fresh):
    """Two generators advanced in turns push each other's tokens out of the shared cache."""
    a_ids, b_ids = PROMPT, PROMPT[:10] + [5, 6, 7, 8]
    want_a, want_b = run(fresh, a_ids, n=12), run(fresh, b_ids, n=12)
    for options in ({"lookup": False}, {"lookup": True}, {"temperature": 0.8, "seed": 1}):
        if "seed" in options:
            want_a, want_b = run(fresh, a_ids, n=12, **options), run(fresh, b_ids, n=12, **options)
        gen_a = model.generate(a_ids, max_new_tokens=12, **options)
        gen_b = model.generate(b_ids, max_new_tokens=12, **options)
        got_a, got_b = [], []
        for x, y in zip(gen_a, gen_b):
            got_a.append(x)
            got_b.append(y)
        got_a += list(gen_a)
        got_b += list(gen_b)
        assert (got_a, got_b) == (want_a, want_b)


def test_the_shared_cache_grows_and_keeps_what_it_holds(model, fresh, monkeypatch):
    monkeypatch.setattr(runner_module, "CACHE_GROWTH", 8)
    short = run(model, PROMPT[:12], n=4)  # needs 16 positions
    assert model._shared.cache.capacity == 16
    longer = PROMPT[:12] + short[:3] + PROMPT[:20]
    out = run(model, longer, n=10)  # needs 45: reallocated to 48, the 15 cached tokens copied
    assert model._shared.cache.capacity == 48
    assert model.last_stats.reused_tokens == 15
    assert out == run(fresh, longer, n=10)


def test_reuse_can_be_turned_off(fresh):
    run(fresh, PROMPT)
    run(fresh, PROMPT)
    assert fresh.last_stats.reused_tokens == 0 and fresh.last_stats.computed_tokens == len(PROMPT)
    assert fresh._shared.cache is None  # nothing kept between requests


def test_clear_prompt_cache_forgets_the_sequence(model):
    run(model, PROMPT)
    model.clear_prompt_cache()
    run(model, PROMPT)
    assert model.last_stats.reused_tokens == 0


def test_logits_stay_a_fresh_full_forward(model, fresh):
    run(model, PROMPT)
    np.testing.assert_array_equal(model.logits(PROMPT[:10]), fresh.logits(PROMPT[:10]))


def test_stats_report_time_to_first_token_and_output(model):
    out = run(model, PROMPT, n=5, lookup=False)
    stats = model.last_stats
    assert stats.time_to_first_token is not None and stats.time_to_first_token > 0
    assert stats.generated_tokens == len(out) and stats.decode_passes == len(out) - 1


# --- typing at the cursor: SPM appends, PSM does not ------------------------------------------


def shared_prefix(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@pytest.mark.parametrize("typed", ["r", "e", "(", " ", "\n"])
def test_spm_prompts_of_consecutive_keystrokes_share_all_but_the_last_tokens(typed):
    prefix = "import os\n\n\ndef walk(top):\n    for name in os.listdir(top):\n        path = os.path.join(top, name)\n        "
    suffix = "\n\n\nif __name__ == '__main__':\n    walk('.')\n"
    before = build_fim_prompt(TOK, prefix, suffix, 2048, 64, order="spm")
    after = build_fim_prompt(TOK, prefix + typed, suffix, 2048, 64, order="spm")
    assert shared_prefix(before, after) >= len(before) - 2  # at most the last two tokens re-merge
    psm_before = build_fim_prompt(TOK, prefix, suffix, 2048, 64, order="psm")
    psm_after = build_fim_prompt(TOK, prefix + typed, suffix, 2048, 64, order="psm")
    suffix_part = len(TOK.encode(suffix)) + 2  # <fim-suffix> suffix <fim-middle> is recomputed
    assert shared_prefix(psm_before, psm_after) <= len(psm_before) - suffix_part
