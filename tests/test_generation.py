"""Generation behaviour: sampling, stopping (EOS, stop ids, stop strings, max_new_tokens, context
end), seeds, streaming text, and fill-in-the-middle prompts."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import santacpu
from helpers import tiny_checkpoint
from santacpu import SantacpuError, SantacpuWarning
from santacpu.generation.prompts import build_fim_prompt, fim_budget, trim_to_cursor
from santacpu.generation.sampling import sample_next, top_k_filter, top_p_filter
from santacpu.generation.text_stream import StopStrings
from santacpu.tokenizer import Tokenizer

# Exactness on the threaded paths too: every core, not a worker's one thread (conftest).
pytestmark = pytest.mark.usefixtures("all_cores")

TOK = Tokenizer.santacoder()
N_VALID = TOK.vocab_size  # 49157
V = 49280


@pytest.fixture(scope="module")
def model():
    return santacpu.load(tiny_checkpoint(), quant="none")


# --- sampling -------------------------------------------------------------------------------


def test_padding_rows_are_never_chosen():
    logits = np.zeros(V, np.float32)
    logits[V - 1] = 100.0  # a padding row holds the largest logit
    logits[7] = 1.0
    assert sample_next(logits, N_VALID, 0.0, 0, 1.0, np.random.default_rng(0)) == 7
    rng = np.random.default_rng(0)
    picks = {sample_next(logits, N_VALID, 5.0, 0, 1.0, rng) for _ in range(300)}
    assert max(picks) < N_VALID and len(picks) > 10  # sampled widely, never a padding row


def test_top_k_and_top_p_filters():
    logits = np.array([3.0, 1.0, 2.0, 0.0])
    assert np.isneginf(top_k_filter(logits, 2)).tolist() == [False, True, False, True]
    probs = np.array([0.5, 0.1, 0.3, 0.1])
    kept = top_p_filter(probs, 0.7)  # 0.5 alone < 0.7, so 0.5 and 0.3 are kept
    np.testing.assert_allclose(kept, [0.625, 0.0, 0.375, 0.0])
    np.testing.assert_allclose(top_p_filter(probs, 1.0), probs)


def test_sampling_follows_the_distribution():
    logits = np.full(N_VALID, -np.inf)
    logits[[10, 20]] = np.log([0.75, 0.25])
    rng = np.random.default_rng(42)
    picks = [sample_next(logits, N_VALID, 1.0, 0, 1.0, rng) for _ in range(4000)]
    assert set(picks) == {10, 20}
    assert abs(picks.count(10) / 4000 - 0.75) < 0.03
    top1 = [sample_next(logits, N_VALID, 1.0, 1, 1.0, rng) for _ in range(50)]
    assert set(top1) == {10}


@pytest.mark.parametrize("temperature", [1e-310, 2e-308, 1e-300])
def test_a_tiny_temperature_is_nearly_greedy_not_nan(temperature):
    # logits / 1e-310 overflowed to +-inf, their softmax was NaN, and the last valid id came out
    # every time (an empty completion, warnings in the server's log).
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(V).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        picks = {sample_next(logits, N_VALID, temperature, 0, 1.0, rng) for _ in range(20)}
    assert picks == {int(np.argmax(logits[:N_VALID]))}


@pytest.mark.parametrize("options", [dict(temperature=-1.0), dict(temperature=float("inf")), dict(top_k=-1),
                                     dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_sampling_options_fail_at_call_time(model, options):
    with pytest.raises(SantacpuError):
        model.generate([1, 2, 3], max_new_tokens=3, **options)  # no iteration needed


# --- the generation loop, driven by scripted logits ----------------------------------------


class ScriptedCache:
    def __init__(self, n_ctx):
        self.ids, self.capacity, self.prompt_length = [], n_ctx, 0

    @property
    def length(self):
        return len(self.ids)

    def truncate(self, length):
        del self.ids[length:]


class ScriptedEngine:
    """Stands in for the forward pass: the logits after the prompt favour script[0], after the
    i-th generated token script[i] (the last entry repeats)."""

    def __init__(self, script):
        self.script = script
        self.fed: list[list[int]] = []

    def new_cache(self, n_ctx=None):
        self.fed = []  # a new sequence starts the script again
        return ScriptedCache(n_ctx)

    def forward(self, cache, ids, all_logits=False):
        if cache.length == 0:
            cache.prompt_length = len(ids)
        positions = range(cache.length, cache.length + len(ids))
        logits = np.zeros((len(ids), V), np.float32)
        for row, p in enumerate(positions):  # rows inside the prompt favour script[0] too
            step = min(max(p - cache.prompt_length + 1, 0), len(self.script) - 1)
            logits[row, self.script[step]] = 10.0
        cache.ids.extend(ids)
        self.fed.append(list(ids))
        return logits if all_logits else logits[-1:]


def scripted(model, script):
    """Swap in a scripted engine; each generation gets a fresh cache so the script restarts."""
    engine = ScriptedEngine(script)
    model.engine, saved = engine, model.engine
    model.reuse_prompt = False
    return engine, saved


def test_eos_ends_generation_unyielded(model):
    engine, saved = scripted(model, [5, 6, model.config.eos_token_id, 7])
    try:
        assert list(model.generate([1, 2], max_new_tokens=10)) == [5, 6]
        assert engine.fed == [[1, 2], [5], [6]]  # the prompt once, then one token per step
    finally:
        model.engine, model.reuse_prompt = saved, True


def test_stop_ids_and_max_new_tokens(model):
    _, saved = scripted(model, [5, 6, 9, 7])
    try:
        assert list(model.generate([1], max_new_tokens=10, stop_ids=[9])) == [5, 6]
        assert list(model.generate([1], max_new_tokens=2)) == [5, 6]
        assert list(model.generate([1], max_new_tokens=0)) == []
    finally:
        model.engine, model.reuse_prompt = saved, True


def test_generation_stops_at_the_context_end(model):
    n_ctx = model.config.n_positions  # 64 for the tiny model
    _, saved = scripted(model, [5])
    try:
        out = list(model.generate([1] * (n_ctx - 3), max_new_tokens=100))
        assert len(out) == 3  # prompt + output fill the context exactly
    finally:
        model.engine, model.reuse_prompt = saved, True
    # And for real: the cache holds exactly the context, no overflow.
    real = list(model.generate([1] * (n_ctx - 3), max_new_tokens=100, temperature=1.0, seed=0))
    assert 0 < len(real) <= 3


def test_prompt_that_fills_the_context_is_refused(model):
    n_ctx = model.config.n_positions
    with pytest.raises(SantacpuError, match="context holds"):
        model.generate([1] * n_ctx, max_new_tokens=1)
    with pytest.raises(SantacpuError, match="context holds"):
        model.complete("x = 1\n" * 60, max_new_tokens=1)
    # Text longer than any n_ctx tokens can span is refused before it is encoded (a 60 MiB prompt
    # took 78 s to encode first); one character short of that is still encoded and counted.
    limit = n_ctx * model.tokenizer.max_token_bytes
    with pytest.raises(SantacpuError, match=f"the prompt is {limit:,} characters, more than the context's {n_ctx} tokens can hold"):
        model.complete("a" * limit, max_new_tokens=1)
    with pytest.raises(SantacpuError, match="tokens but the context holds"):
        model.complete("a" * (limit - 1), max_new_tokens=1)


def test_empty_prompts_are_refused(model):
    with pytest.raises(SantacpuError, match="empty"):
        model.generate([], max_new_tokens=1)
    with pytest.raises(SantacpuError, match="empty"):
        model.complete("", max_new_tokens=1)


# --- seeds and streaming text on the real (tiny) model --------------------------------------


def test_same_seed_same_output_and_different_seeds_differ(model):
    options = dict(max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.95)
    a = list(model.generate([563, 942], seed=1, **options))
    assert a == list(model.generate([563, 942], seed=1, **options))
    assert any(list(model.generate([563, 942], seed=s, **options)) != a for s in (2, 3, 4))


def test_complete_is_the_decoded_generation(model):
    ids = TOK.encode("def f(x):")
    tokens = list(model.generate(ids, max_new_tokens=10))
    assert model.complete("def f(x):", max_new_tokens=10) == TOK.decode(tokens)
    pieces = list(model.complete_stream("def f(x):", max_new_tokens=10))
    assert "".join(pieces) == TOK.decode(tokens)


def test_stop_string_cuts_the_completion(model):
    full = model.complete("def f(x):", max_new_tokens=12)
    assert len(full) > 4
    stop = full[3:5]  # text that really occurs, so the cut is observable
    cut = model.complete("def f(x):", max_new_tokens=12, stop=[stop])
    assert cut == full[: full.index(stop)]


def test_a_stop_string_alone_is_one_stop_string(model):
    full = model.complete("def f(x):", max_new_tokens=12)
    # Two characters that first occur together at k, while one of them occurs alone before k:
    # read as its characters, the stop would cut the text earlier.
    k = next(k for k in range(1, len(full) - 1)
             if full.find(full[k : k + 2]) == k and min(full.find(full[k]), full.find(full[k + 1])) < k)
    stop = full[k : k + 2]
    assert model.complete("def f(x):", max_new_tokens=12, stop=stop) == full[:k]
    assert len(model.complete("def f(x):", max_new_tokens=12, stop=list(stop))) < k


# --- stop strings across pieces --------------------------------------------------------------


def test_stop_strings_are_held_back_and_cut():
    s = StopStrings(["\ndef ", "END"])
    assert s.push("x = 1\n") == "x = 1"  # "\n" might start "\ndef "
    assert s.push("de") == ""
    assert s.push("fault") == "\ndefault"  # it did not: released
    assert s.push("E") == ""
    assert s.push("NDING") == ""  # "END" found: everything before it was already emitted
    assert s.stopped and s.push("more") == "" and s.flush() == ""


class HoldEveryPartial(StopStrings):
    """The held-back rule by brute force: every end of the pending text against every start of
    every stop string."""

    def _partial_match_length(self) -> int:
        ends = [n for stop in self.stops for n in range(1, len(stop)) if self.pending.endswith(stop[:n])]
        return max(ends, default=0)


def test_stop_strings_hold_back_what_a_brute_force_search_holds_back():
    import random

    rng = random.Random(7)
    for _ in range(3000):
        stops = ["".join(rng.choice("ab\n") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 4))]
        text = "".join(rng.choice("ab\nc") for _ in range(rng.randint(0, 30)))
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, 5)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        fast, brute = StopStrings(stops), HoldEveryPartial(stops)
        shown = [(fast.push(piece), brute.push(piece)) for piece in pieces]
        assert all(a == b for a, b in shown) and fast.flush() == brute.flush(), (stops, pieces)
        assert (fast.stopped, fast.matched) == (brute.stopped, brute.matched)


def test_stop_strings_earliest_wins_and_flush_releases_partials():
    s = StopStrings(["bb", "a"])
    assert s.push("xxbba") == "xx"
    t = StopStrings(["abc"])
    assert t.push("zab") == "z"
    assert t.flush() == "ab"


# --- fill-in-the-middle prompts --------------------------------------------------------------


def test_fim_prompt_orders_are_built_from_ids():
    pre, suf = "def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"
    p, s = TOK.encode(pre), TOK.encode(suf)
    psm = build_fim_prompt(TOK, pre, suf, 2048, 64)
    assert psm == [TOK.fim_prefix_id, *p, TOK.fim_suffix_id, *s, TOK.fim_middle_id]
    spm = build_fim_prompt(TOK, pre, suf, 2048, 64, order="spm")
    assert spm == [TOK.fim_prefix_id, TOK.fim_suffix_id, *s, TOK.fim_middle_id, *p]
    with pytest.raises(SantacpuError, match="FIM order"):
        build_fim_prompt(TOK, pre, suf, 2048, 64, order="pms")


def test_special_strings_in_user_text_stay_plain_text():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = build_fim_prompt(TOK, "a = '<fim-suffix>'", "<|endoftext|>", 2048, 64)
    specials = [i for i in ids if i >= 49152]
    assert specials == [TOK.fim_prefix_id, TOK.fim_suffix_id, TOK.fim_middle_id]
    assert any("plain text" in str(w.message) for w in caught)


def test_starcoder_markers_get_a_warning(model):
    with pytest.warns(SantacpuWarning, match="hyphens"):
        model.complete("<fim_prefix>def f():", max_new_tokens=1)


def test_fim_trimming_keeps_the_text_nearest_the_cursor():
    prefix_ids, suffix_ids = list(range(100)), list(range(1000, 1050))
    p, s = trim_to_cursor(prefix_ids, suffix_ids, 64)  # cuts in steps of 64 // 16 = 4 tokens
    assert (p, s) == (list(range(68, 100)), list(range(1000, 1032)))  # even split
    p, s = trim_to_cursor(prefix_ids, suffix_ids, 62)  # steps of 3: 30 suffix tokens, the prefix cut at 69
    assert (p, s) == (list(range(69, 100)), list(range(1000, 1030)))
    p, s = trim_to_cursor(prefix_ids, suffix_ids[:10], 60)  # steps of 3: the prefix cut at 51, not 50
    assert (p, s) == (list(range(51, 100)), suffix_ids[:10])  # a short suffix gives its room away
    assert trim_to_cursor([1, 2], [3], 10) == ([1, 2], [3])


def test_trimmed_spm_prompts_of_a_growing_prefix_share_all_but_their_ends():
    """Typing at the cursor of a file longer than the context: the cuts move in steps, so most
    keystrokes only append to an SPM prompt (prompt reuse)."""
    suffix_ids = list(range(5000, 7000))
    room = 1920
    unchanged = 0
    before = None
    for n in range(1500, 1700):  # the prefix grows a token at a time
        p, s = trim_to_cursor(list(range(n)), suffix_ids, room)
        assert len(p) + len(s) <= room and len(p) + len(s) > room - 2 * 64
        assert p[-1] == n - 1 and s[0] == 5000  # the text at the cursor is always kept
        after = s + p  # the SPM order of the two parts
        if before is not None and after[: len(before)] == before:
            unchanged += 1
        before = after
    assert unchanged >= 199 - 200 // 64 - 1  # the prefix's cut moved at most once every 64 tokens


def test_long_fim_prompt_is_trimmed_with_a_warning_and_fits(model):
    n_ctx = model.config.n_positions
    prefix = "".join(f"a{i} = {i}\n" for i in range(40))
    suffix = "".join(f"print(a{i})\n" for i in range(40))
    with pytest.warns(SantacpuWarning, match="kept the last"):
        ids = build_fim_prompt(TOK, prefix, suffix, n_ctx, 16)
    budget = fim_budget(n_ctx, 16)
    assert budget - 2 * max(1, (budget - 3) // 16) < len(ids) <= budget  # cut in whole steps
    # The kept prefix is the end of the prefix, the kept suffix the start of the suffix.
    middle = ids.index(TOK.fim_suffix_id)
    assert TOK.decode(ids[1:middle]) and prefix.endswith(TOK.decode(ids[1:middle]))
    assert suffix.startswith(TOK.decode(ids[middle + 1 : -1]))
    with pytest.warns(SantacpuWarning):
        out = model.complete(prefix, suffix, max_new_tokens=16)
    assert isinstance(out, str)
    # Asked for more than half the context, the warning names the room it left (half), not the ask.
    with pytest.warns(SantacpuWarning, match=f"with room for {n_ctx // 2} new tokens: kept the last"):
        build_fim_prompt(TOK, prefix, suffix, n_ctx, 100)


# --- GenerationOptions: one object for every caller ------------------------------------------


def test_options_object_and_keywords_give_the_same_generation(model):
    options = santacpu.GenerationOptions(max_new_tokens=6, temperature=0.9, top_k=50, seed=3)
    by_object = list(model.generate([5, 6, 7], options))
    by_keywords = list(model.generate([5, 6, 7], max_new_tokens=6, temperature=0.9, top_k=50, seed=3))
    assert by_object == by_keywords and len(by_object) == 6
    # Keywords change the object's fields; the object itself is left as it was.
    assert len(list(model.generate([5, 6, 7], options, max_new_tokens=2))) == 2
    assert options.max_new_tokens == 6
    text = model.complete("def f(x):", None, options, stop="\n")
    assert text == model.complete("def f(x):", max_new_tokens=6, temperature=0.9, top_k=50, seed=3, stop="\n")


@pytest.mark.parametrize(
    "changes, fragment",
    [
        (dict(max_new_tokens=-1), "max_new_tokens must be >= 0"),
        (dict(max_new_tokens="8"), "max_new_tokens must be an integer"),
        (dict(draft_tokens=0), "draft_tokens must be >= 1"),
        (dict(fim_order="pms"), "unknown FIM order 'pms'"),
        (dict(lookup="yes"), "lookup must be True, False or None"),
        (dict(lookup=1), "lookup must be True, False or None"),
        (dict(stop_ids=5), "stop_ids must be a list"),
        (dict(stop=[b"x"]), "each stop string must be a str"),
        (dict(stop=["\ud800"]), r"each stop string is not Unicode text: a lone surrogate \(U\+D800\)"),
        (dict(seed=-1), "seed must be >= 0"),
    ],
)
def test_bad_options_are_named_in_one_line(model, changes, fragment):
    with pytest.raises(SantacpuError, match=fragment):
        santacpu.GenerationOptions.of(**changes)
    with pytest.raises(SantacpuError, match=fragment):
        model.complete("x = ", **changes)


def test_a_prompt_that_is_not_unicode_text_is_a_one_line_error(model):
    with pytest.raises(SantacpuError, match=r"prefix is not Unicode text: a lone surrogate \(U\+D800\) at character 4") as refused:
        model.complete("abc \ud800")
    assert "\n" not in str(refused.value)
    with pytest.raises(SantacpuError, match=r"suffix is not Unicode text"):
        model.complete("def f():", "\udfff")


def test_model_level_checks_stop_ids_text_options_and_reuse_prompt(model):
    # Each was accepted and did nothing: an id past the vocabulary never stops, generate() yields
    # ids and never looked at stop strings, and "no" is a true value.
    for bad in (-1, model.config.vocab_size):
        with pytest.raises(SantacpuError, match=f"stop id {bad} is outside the vocabulary"):
            model.complete("x = ", stop_ids=[bad])
        with pytest.raises(SantacpuError, match=f"stop id {bad} is outside the vocabulary"):
            list(model.generate([1, 2], stop_ids=[bad]))
    for option in (dict(stop="\n"), dict(fim_order="spm")):
        with pytest.raises(SantacpuError, match=f"'{next(iter(option))}' is for complete"):
            model.generate([1, 2], **option)
    with pytest.raises(SantacpuError, match="reuse_prompt must be True or False, got 'no'"):
        model.reuse_prompt = "no"
    assert model.reuse_prompt is True


def test_unknown_option_is_a_type_error_and_options_must_be_options(model):
    with pytest.raises(TypeError, match="unexpected generation option 'max_tokens'"):
        model.generate([1, 2], max_tokens=3)
    with pytest.raises(SantacpuError, match="options must be a GenerationOptions, got dict"):
        model.generate([1, 2], {"max_new_tokens": 3})


class FimTokenFromStep:
    """The engine, but from its `after`-th forward on (single or batched) the model wants `token`
    next, as a model can when it starts another FIM document after the middle."""

    def __init__(self, engine, token: int, after: int):
        self.engine, self.token, self.after, self.calls = engine, token, after, 0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def _forced(self, logits):
        self.calls += 1
        if self.calls >= self.after:
            for rows in logits if isinstance(logits, list) else [logits]:
                rows[..., self.token] = rows.max() + 100.0
        return logits

    def forward(self, *args, **kwargs):
        return self._forced(self.engine.forward(*args, **kwargs))

    def forward_batch(self, *args, **kwargs):
        return self._forced(self.engine.forward_batch(*args, **kwargs))


def test_a_fim_special_token_ends_a_library_fim_completion():
    # As the server's (issue 26, item 12): the CLI's `complete --fim` and the API agree with it.
    loaded = santacpu.load(tiny_checkpoint(), quant="none")
    loaded.reuse_prompt = False
    free = loaded.complete("def f(x):", "    return y\n", max_new_tokens=8)
    for token in (loaded.tokenizer.fim_prefix_id, loaded.tokenizer.fim_pad_id):
        loaded.engine = FimTokenFromStep(santacpu.load(tiny_checkpoint(), quant="none").engine, token, after=3)
        middle = loaded.complete("def f(x):", "    return y\n", max_new_tokens=8)
        assert "<fim" not in middle and loaded.last_stats.generated_tokens < 8, middle
        assert free.startswith(middle)  # the same text up to where the FIM token came
        loaded.engine.calls = 0
        [[batched]] = loaded.complete_many([("def f(x):", "    return y\n")], max_new_tokens=8)
        assert batched == middle
        loaded.engine.calls = 0
        plain = loaded.complete("def f(x):", max_new_tokens=8)  # not FIM: the token does not end it
        assert loaded.last_stats.generated_tokens == 8
        assert "<fim" not in plain  # markup, never text (as the server's answers)


def test_fim_text_is_cut_near_the_cursor_before_tokenizing():
    # A 40 MB prefix file had been tokenized whole (77 s, 2.9 GB) to keep a few tokens of it.
    from santacpu.generation.prompts import TEXT_CUT_STEP, text_limit

    tokenizer = Tokenizer.santacoder()
    seen = []

    class Counting:
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def encode(self, text):
            seen.append(len(text))
            return tokenizer.encode(text)

    prefix, suffix = "x = 1\n" * 200_000, "y = 2\n" * 200_000  # 1.2 MB each
    limit = text_limit(tokenizer, 64)
    with pytest.warns(SantacpuWarning, match=r"kept the last \d+ prefix tokens .* \(of 1,200,000 and 1,200,000 characters\)"):
        ids = build_fim_prompt(Counting(), prefix, suffix, 64, 8)
    assert max(seen) < limit + 2 * TEXT_CUT_STEP  # (the prefix is cut in whole steps)
    # What is kept is the text nearest the cursor: the suffix's first tokens, the prefix's last.
    fim_prefix, fim_suffix, fim_middle = tokenizer.fim_prefix_id, tokenizer.fim_suffix_id, tokenizer.fim_middle_id
    kept_prefix, kept_suffix = ids[1 : ids.index(fim_suffix)], ids[ids.index(fim_suffix) + 1 : -1]
    assert ids[0] == fim_prefix and ids[-1] == fim_middle and len(ids) <= 64 - 8
    assert kept_suffix == tokenizer.encode(suffix[:1000])[: len(kept_suffix)]
    assert kept_prefix == tokenizer.encode(prefix[-1000:])[-len(kept_prefix):]
