"""Prompt-lookup speculative decoding: drafts come from the latest earlier occurrence of the
context's last n-gram, and under greedy decoding the output is exactly plain decoding's, on the
trained fixture (whose greedy output echoes its context), on random models and against a
stand-in model whose greedy choice is a known rule."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_checkpoint

import santacpu
from santacpu import SantacpuError
from santacpu.backends.cpu.backend import CpuBackend
from santacpu.network.kv_cache import KVCache
from santacpu.generation.lookup import MAX_PAUSE, PromptLookup

from quantize.converter import convert

# Exactness on the threaded paths too: every core, not a worker's one thread (conftest).
pytestmark = pytest.mark.usefixtures("all_cores")

REPO = Path(__file__).resolve().parents[1]
TRAINED = REPO / "tests" / "fixtures" / "trained_tiny"
ECHOING = (
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n"
    "    def copy(self):\n        return Point(self.x, self.y)\n\n    def __repr__(self):\n        return"
)


# --- drafting -------------------------------------------------------------------------------


def test_draft_follows_the_latest_occurrence_of_the_longest_ngram():
    lookup = PromptLookup([1, 2, 3, 9, 2, 3, 4, 5, 6, 7, 1, 2, 3], max_draft=8)
    lookup.width = 8
    # "1 2 3" occurred at 0..2, followed by 9; "2 3" last occurred at 4..5, followed by 4: the
    # longest n-gram wins over the more recent shorter one.
    assert lookup.draft(8) == [9, 2, 3, 4, 5, 6, 7, 1]
    assert lookup.draft(2) == [9, 2]  # limited by the caller (room left)
    lookup.append(5)
    # "3 5" unseen; "5" at 7: the copy reaches the end of the context and continues from its own start
    assert lookup.draft(8) == [6, 7, 1, 2, 3, 5, 6, 7]
    lookup.append(8)
    assert lookup.draft(8) == []  # 8 never occurred before


def test_draft_never_proposes_the_context_tail_itself():
    lookup = PromptLookup([4, 5, 6], max_draft=4)
    assert lookup.draft(4) == []
    lookup = PromptLookup([7, 7], max_draft=4)
    lookup.width = 4
    assert lookup.draft(4) == [7, 7, 7, 7]  # "7" followed by 7 at position 1, copied on
    lookup = PromptLookup([5, 6, 7, 5, 6], max_draft=4)
    lookup.width = 4
    assert lookup.draft(4) == [7, 5, 6, 7]  # "5 6" at 0..1: 7 5 6, then the copy repeats itself


def test_draft_width_adapts_and_drafting_pauses_after_rejections():
    lookup = PromptLookup([1, 2] * 10, max_draft=6)
    assert len(lookup.draft(10)) == 2  # starts narrow
    lookup.feedback(2, 2)
    assert len(lookup.draft(10)) == 4
    lookup.feedback(4, 4)
    assert len(lookup.draft(10)) == 6  # capped at max_draft
    lookup.feedback(6, 3)  # partial: width kept, no pause
    assert len(lookup.draft(10)) == 6
    pauses = []
    for _ in range(8):
        lookup.feedback(len(lookup.draft(10)), 0)  # rejected outright
        skipped = 0
        while lookup.draft(10) == []:
            skipped += 1
        pauses.append(skipped)
        assert lookup.width >= 1
    assert pauses == [1, 3, 7, 15, 31, 63, MAX_PAUSE, MAX_PAUSE]
    lookup.feedback(1, 1)  # one success ends the pauses
    lookup.feedback(2, 0)
    assert lookup.draft(10) == [] and lookup.draft(10) != []


# --- exactness on real models ---------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    # Quantized, so that it runs the token-invariant integer kernels: there lookup's output is
    # plain decoding's bit for bit (and lookup is on by default).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fixture has no tokenizer.json: the bundled one is used
        path = convert(TRAINED, tmp_path_factory.mktemp("trained") / "q8_0.safetensors", qtype="q8_0").out
    model = santacpu.load(path, reuse_prompt=False)
    assert model.token_invariant
    return model


def test_lookup_is_on_by_default_only_where_kernels_are_token_invariant(trained):
    ids = trained.tokenizer.encode(ECHOING)
    list(trained.generate(ids, max_new_tokens=20))
    assert trained.last_stats.drafted_tokens > 0
    full_precision = santacpu.load(tiny_checkpoint(), quant="none")
    assert not full_precision.token_invariant
    list(full_precision.generate(ids, max_new_tokens=20))
    assert full_precision.last_stats.drafted_tokens == 0


def heldout_prompts(model, n=3, length=120):
    text = (TRAINED / "heldout.py.txt").read_text()
    ids = model.tokenizer.encode(text[:20000])
    return [ids[i * 1000 : i * 1000 + length] for i in range(n)] + [model.tokenizer.encode(ECHOING)]


def test_greedy_output_is_identical_and_drafts_are_accepted_on_the_trained_model(trained):
    drafted = accepted = 0
    for ids in heldout_prompts(trained):
        plain = list(trained.generate(ids, max_new_tokens=64, lookup=False))
        assert trained.last_stats.drafted_tokens == 0
        fast = list(trained.generate(ids, max_new_tokens=64, lookup=True))
        stats = trained.last_stats
        assert fast == plain
        assert stats.generated_tokens == len(plain)
        drafted += stats.drafted_tokens
        accepted += stats.accepted_tokens
        assert stats.decode_passes < len(plain) - 1 or stats.accepted_tokens == 0
    assert accepted > 0.5 * drafted > 0  # this model echoes: most drafts are right
    assert accepted < drafted  # and some are not, so rejection is exercised too


@pytest.mark.parametrize("draft_tokens", [1, 3, 7])
def test_every_length_and_stop_gives_the_plain_output(trained, draft_tokens):
    ids = trained.tokenizer.encode(ECHOING)
    plain = list(trained.generate(ids, max_new_tokens=40, lookup=False))
    for n in (1, 2, 3, 5, 8, 13, 40):
        assert list(trained.generate(ids, max_new_tokens=n, draft_tokens=draft_tokens)) == plain[:n]
    stop = plain[20]  # a token that occurs: output ends just before its first occurrence
    cut = list(trained.generate(ids, max_new_tokens=40, stop_ids=[stop], draft_tokens=draft_tokens))
    assert cut == plain[: plain.index(stop)]


def test_lookup_up_to_the_context_end(trained):
    n_ctx = trained.config.n_positions
    ids = (trained.tokenizer.encode(ECHOING) * 10)[: n_ctx - 30]
    plain = list(trained.generate(ids, max_new_tokens=100, lookup=False))
    assert list(trained.generate(ids, max_new_tokens=100)) == plain
    assert trained.last_stats.accepted_tokens > 0 and len(plain) <= 30


@pytest.mark.parametrize("seed", [0, 1])
def test_random_models_give_the_plain_output(seed, tmp_path):
    model = santacpu.load(convert(tiny_checkpoint(seed=seed), tmp_path / "q4_0.safetensors", qtype="q4_0").out)
    rng = np.random.default_rng(seed)
    block = [int(i) for i in rng.integers(0, 49152, 8)]
    for ids in (block * 3, [int(i) for i in rng.integers(0, 49152, 20)]):
        plain = list(model.generate(ids, max_new_tokens=30, lookup=False))
        assert list(model.generate(ids, max_new_tokens=30, lookup=True)) == plain


def test_sampling_ignores_lookup(trained):
    ids = trained.tokenizer.encode(ECHOING)
    options = {"max_new_tokens": 20, "temperature": 0.8, "seed": 4}
    sampled = list(trained.generate(ids, lookup=True, **options))
    assert trained.last_stats.drafted_tokens == 0
    assert sampled == list(trained.generate(ids, lookup=False, **options))


def test_bad_draft_tokens_fail_at_call_time(trained):
    with pytest.raises(SantacpuError, match="draft_tokens"):
        trained.generate([1, 2], max_new_tokens=2, draft_tokens=0)


# --- the mechanism, against a stand-in model with a known greedy rule ------------------------


class RuleEngine:
    """A stand-in forward: the greedy next token after a sequence is `rule(sequence)`, read from
    the cache's own ids (so a cache holding stale or wrong tokens gives wrong output)."""

    def __init__(self, rule, vocab_size):
        self.rule, self.vocab_size = rule, vocab_size
        self.passes = self.tokens = 0

    def new_cache(self, n_ctx=None):
        return KVCache(1, n_ctx, 1, 1, np.float16, CpuBackend())

    def forward(self, cache, ids, all_logits=False):
        logits = np.zeros((len(ids), self.vocab_size), np.float32)
        for row, token in enumerate(ids):
            cache.ids.append(int(token))
            logits[row, self.rule(cache.ids)] = 1.0
        self.passes += 1
        self.tokens += len(ids)
        return logits if all_logits else logits[-1:]


def with_rule(model, rule):
    model.engine = RuleEngine(rule, model.config.vocab_size)
    model.token_invariant = True  # a rule gives the same answer in any call: lookup on by default
    model.clear_prompt_cache()
    return model.engine


@pytest.fixture()
def stand_in():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return santacpu.load(TRAINED, quant="none")  # only its config (256 positions) and tokenizer are used


def test_a_copying_model_decodes_in_a_fraction_of_the_passes(stand_in):
    period = 13
    engine = with_rule(stand_in, lambda seq: seq[max(len(seq) - period, 0)])  # continues a period-13 pattern
    ids = [100 + i for i in range(period)] * 2 + [100, 101]
    plain = list(stand_in.generate(ids, max_new_tokens=120, lookup=False))
    assert plain == [(100 + (len(ids) + i) % period) for i in range(120)]
    engine.passes = 0
    fast = list(stand_in.generate(ids, max_new_tokens=120, draft_tokens=6))
    stats = stand_in.last_stats
    assert fast == plain
    assert stats.accepted_tokens == stats.drafted_tokens  # every guess right
    assert stats.decode_passes <= 120 // 7 + 3  # 7 tokens a pass once the width reaches 6
    assert engine.passes == stats.decode_passes + 1  # + the prompt


def test_a_model_that_never_echoes_costs_few_extra_tokens(stand_in):
    """Drafts exist (the prompt repeats tokens) but the model never follows them: pauses keep the
    extra verified tokens to a handful."""
    engine = with_rule(stand_in, lambda seq: 200 + (seq[-1] * 7 + len(seq)) % 50)
    ids = [int(i) for i in np.random.default_rng(0).integers(200, 250, 100)]
    plain = list(stand_in.generate(ids, max_new_tokens=150, lookup=False))
    engine.tokens = 0
    fast = list(stand_in.generate(ids, max_new_tokens=150))
    stats = stand_in.last_stats
    assert fast == plain
    rejected = stats.drafted_tokens - stats.accepted_tokens
    assert stats.drafted_tokens > 0 and rejected > 0
    # Work after the prompt: every output token but the last once (or the last too, when it was an
    # accepted draft token), plus the rejected draft tokens.
    assert engine.tokens - stats.computed_tokens - (len(plain) - 1) in (rejected, rejected + 1)
    assert rejected <= 15


def test_rejected_draft_tokens_are_dropped_from_the_cache(stand_in):
    """The rule depends on the whole sequence, so a rejected token left in the cache would change
    every later choice."""
    with_rule(stand_in, lambda seq: 300 + sum(seq) % 5)
    ids = [300, 301, 302, 303, 304] * 4
    plain = list(stand_in.generate(ids, max_new_tokens=60, lookup=False))
    assert list(stand_in.generate(ids, max_new_tokens=60)) == plain
    assert 0 < stand_in.last_stats.accepted_tokens < stand_in.last_stats.drafted_tokens


def test_cli_flags(tmp_path):
    ckpt = tiny_checkpoint()
    outputs = []
    for flags in (["--no-lookup"], ["--lookup", "--draft-tokens", "3"]):
        done = subprocess.run(
            [sys.executable, "-m", "santacpu", "complete", "x = 1\nx = 1\nx =", "--model", str(ckpt), "--quant", "none",
             "--max-new-tokens", "12", *flags],
            cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
        )
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout)
    assert outputs[0] == outputs[1] and outputs[0]
    bad = subprocess.run(
        [sys.executable, "-m", "santacpu", "complete", "x", "--model", str(ckpt), "--quant", "none", "--draft-tokens", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
