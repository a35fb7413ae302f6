"""Many sequences at once: the batched forward, the scheduler (join, leave, cancel, queue and memory
bounds), and the API on top (`generate_batch`, `complete_many`). Under greedy decoding, and under
sampling with a seed, every sequence's output must be exactly what it gets alone on a fresh model:
the quantized test model's integer kernels are token-invariant, so its logits are the same bits in
any batch."""

from __future__ import annotations

import numpy as np
import pytest

import santacpu
from helpers import tiny_checkpoint
from santacpu import SantacpuError
from santacpu.backends.cpu import int_dot
from santacpu.generation.batch import QueueFull

pytestmark = [pytest.mark.skipif(int_dot.ISA is None, reason="no integer dot-product kernels on this CPU"),
              pytest.mark.usefixtures("all_cores")]  # exactness on the threaded paths too (conftest)

PLAIN = ["def fibonacci(n):\n", "import os\nimport sys\n\nclass Config:\n    def __init__(self", "x = [", "# sum\nprint(sum("]
FIM = [("def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"), ("for i in range(", "):\n    print(i)\n")]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    from quantize.converter import convert

    out = tmp_path_factory.mktemp("batch") / "tiny-q8_0.safetensors"
    return convert(tiny_checkpoint(), out, qtype="q8_0", upgrade_budget=0).out


@pytest.fixture(scope="module")
def model(quantized):
    loaded = santacpu.load(quantized)
    assert loaded.token_invariant
    return loaded


@pytest.fixture(scope="module")
def prompts(model):
    ids = [model.tokenizer.encode(text) for text in PLAIN]
    ids += [model.prompt_ids(prefix, suffix, santacpu.GenerationOptions(max_new_tokens=12)) for prefix, suffix in FIM]
    return ids


def alone(quantized, ids, **options) -> list[int]:
    """What a fresh model generates for `ids` by itself."""
    return list(santacpu.load(quantized).generate(ids, **options))


def collect(events, n: int) -> list[list[int]]:
    out = [[] for _ in range(n)]
    for index, token in events:
        out[index].append(token)
    return out


def test_batched_forward_equals_each_sequence_alone(model):
    engine = model.engine
    rng = np.random.default_rng(0)
    histories = [list(rng.integers(0, 49152, size=n)) for n in (3, 9, 1, 17)]
    steps = [[7], [8, 9, 10], [11], [12, 13]]  # a token, or a token and a draft
    all_logits = [False, True, True, False]
    caches, solo_caches, expected = [], [], []
    for history, step, every in zip(histories, steps, all_logits):
        cache, solo = engine.new_cache(32), engine.new_cache(32)
        engine.forward(cache, history)
        engine.forward(solo, history)
        caches.append(cache)
        expected.append(engine.forward(solo, step, all_logits=every))
        solo_caches.append(solo)
    got = engine.forward_batch(caches, steps, all_logits)
    for g, e, cache, solo in zip(got, expected, caches, solo_caches):
        assert g.shape == e.shape and np.array_equal(g, e)
        assert cache.ids == solo.ids
        assert np.array_equal(cache.k[:, : cache.length], solo.k[:, : solo.length])
        assert np.array_equal(cache.v[:, : cache.length], solo.v[:, : solo.length])
    with pytest.raises(ValueError, match="distinct cache"):
        engine.forward_batch([caches[0], caches[0]], [[1], [2]], [False, False])


def test_full_precision_batched_forward_matches_to_float_rounding():
    model = santacpu.load(tiny_checkpoint(), quant="none")
    engine = model.engine
    caches = [engine.new_cache(16) for _ in range(3)]
    for cache, history in zip(caches, ([1, 2, 3], [4], [5, 6, 7, 8, 9])):
        engine.forward(cache, history)
    got = engine.forward_batch(caches, [[10], [11], [12]], [False] * 3)
    for cache, row in zip(caches, got):
        fresh = engine.new_cache(16)
        want = engine.forward(fresh, cache.ids)[-1:]
        np.testing.assert_allclose(row, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("lookup", [False, True])
def test_greedy_batch_equals_each_prompt_alone(quantized, model, prompts, lookup):
    # 6 prompts of mixed lengths (plain and FIM), 3 at a time: later ones join as earlier ones
    # leave, at other positions than the running ones.
    got = collect(model.generate_batch(prompts, max_new_tokens=12, lookup=lookup, max_batch=3), len(prompts))
    for ids, tokens in zip(prompts, got):
        assert tokens == alone(quantized, ids, max_new_tokens=12, lookup=False)
    if lookup:  # drafts were really verified inside the batch
        scheduler = model.scheduler(max_batch=3)
        sequences = [scheduler.submit(ids, max_new_tokens=12, lookup=True)[0] for ids in prompts]
        for _ in scheduler.run():
            pass
        assert [s.tokens for s in sequences] == got
        assert sum(s.stats.accepted_tokens for s in sequences) > 0


def test_sequences_join_mid_run_leave_early_and_keep_their_own_options(quantized, model, prompts):
    scheduler = model.scheduler(max_batch=4)
    options = [
        dict(max_new_tokens=3),
        dict(max_new_tokens=14, temperature=0.8, top_k=40, seed=5),
        dict(max_new_tokens=9, stop_ids=[prompts[0][0]]),
        dict(max_new_tokens=11, temperature=1.2, top_p=0.9, seed=1),
    ]
    first = [scheduler.submit(prompts[i], **options[i])[0] for i in (0, 1)]
    for _ in range(2):
        scheduler.step()
    later = [scheduler.submit(prompts[i], **options[i])[0] for i in (2, 3)]  # join two steps in
    for _ in scheduler.run():
        pass
    for i, sequence in enumerate(first + later):
        assert sequence.state == "finished"
        assert sequence.tokens == alone(quantized, prompts[i], **options[i]), i
    assert len(first[0].tokens) <= 3  # left early, while the others ran on


def test_n_samples_compute_the_prompt_once_and_sample_k_is_seed_plus_k(quantized, model, prompts):
    scheduler = model.scheduler(max_batch=3)  # 5 samples, 3 slots: two join from the kept prompt later
    samples = scheduler.submit(prompts[1], max_new_tokens=8, temperature=1.0, seed=11, n=5)
    for _ in scheduler.run():
        pass
    assert [s.stats.computed_tokens for s in samples] == [len(prompts[1])] + [0] * 4
    assert [s.stats.reused_tokens for s in samples] == [0] + [len(prompts[1])] * 4
    for k, sample in enumerate(samples):
        assert sample.tokens == alone(quantized, prompts[1], max_new_tokens=8, temperature=1.0, seed=11 + k), k
    assert len({tuple(s.tokens) for s in samples}) > 1


def test_cancel_frees_the_slot_for_a_waiting_sequence(model, prompts):
    scheduler = model.scheduler(max_batch=1)
    running, waiting = (scheduler.submit(ids, max_new_tokens=20)[0] for ids in prompts[:2])
    scheduler.step()
    assert running.state == "running" and waiting.state == "queued"
    produced = len(running.tokens)
    running.cancel()
    events = scheduler.step()
    assert running.state == "cancelled" and len(running.tokens) == produced and running.cache is None
    assert waiting.state == "running" and (running, []) in events
    queued = scheduler.submit(prompts[2], max_new_tokens=5)[0]
    queued.cancel()  # cancelled before it ever ran
    for _ in scheduler.run():
        pass
    assert queued.state == "cancelled" and queued.tokens == [] and waiting.state == "finished"


def test_queue_and_memory_bounds(model, prompts):
    scheduler = model.scheduler(max_batch=4, max_queue=2)
    scheduler.submit(prompts[0], max_new_tokens=2, n=4)  # the batch's free slots: they do not wait
    scheduler.submit(prompts[0], max_new_tokens=2, n=2)
    with pytest.raises(QueueFull, match="the queue is full"):
        scheduler.submit(prompts[1], max_new_tokens=2)
    assert scheduler.queued == 6
    no_queue = model.scheduler(max_batch=2, max_queue=0)  # nothing waits, what fits the batch runs
    no_queue.submit(prompts[0], max_new_tokens=2, n=2)
    with pytest.raises(QueueFull, match="the queue is full"):
        no_queue.submit(prompts[1], max_new_tokens=2)
    per_sequence = scheduler.kv_bytes(len(prompts[0]) + 6)
    bounded = model.scheduler(max_batch=4, max_kv_bytes=2 * per_sequence)
    for _ in range(4):
        bounded.submit(prompts[0], max_new_tokens=6)
    most = 0
    while bounded.pending:
        bounded.step()
        most = max(most, len(bounded.running))
        assert sum(s.cache.k.nbytes + s.cache.v.nbytes for s in bounded.running) <= 2 * per_sequence
    assert most == 2
    with pytest.raises(SantacpuError, match="more than max_kv_bytes"):
        bounded.submit(prompts[0], max_new_tokens=40)


def test_complete_many_equals_complete_and_stops_free_slots(model):
    texts = model.complete_many(PLAIN + FIM, max_new_tokens=10, stop=["\n"], max_batch=2)
    model.clear_prompt_cache()
    want = [model.complete(prompt, max_new_tokens=10, stop=["\n"]) for prompt in PLAIN]
    want += [model.complete(prefix, suffix, max_new_tokens=10, stop=["\n"]) for prefix, suffix in FIM]
    assert texts == [[w] for w in want]
    sampled = model.complete_many(["def f("], n=3, max_new_tokens=6, temperature=1.0, seed=2)
    assert sampled[0][1] == model.complete("def f(", max_new_tokens=6, temperature=1.0, seed=3)


@pytest.mark.parametrize(
    "call, fragment",
    [
        (lambda m, p: list(m.generate_batch([])), "no prompts given"),
        (lambda m, p: m.complete_many([]), "no prompts given"),
        (lambda m, p: m.complete_many(["x"], n=0), "n must be >= 1"),
        (lambda m, p: list(m.generate_batch([p[0], [1] * 64], max_new_tokens=2)), "the prompt is 64 tokens"),
        (lambda m, p: list(m.generate_batch([p[0], []])), "the prompt is empty"),
        (lambda m, p: m.scheduler(max_batch=0), "max_batch must be >= 1"),
        (lambda m, p: m.complete_many("x = "), "prompts must be a list"),
    ],
)
def test_bad_batch_input_is_one_clear_error(model, prompts, call, fragment):
    with pytest.raises(SantacpuError, match=fragment):
        call(model, prompts)


def test_a_prompt_sharing_a_prefix_with_a_finished_sequence_computes_only_the_rest(quantized, model, prompts):
    scheduler = model.scheduler(max_batch=2)
    [first] = scheduler.submit(prompts[1], max_new_tokens=6)
    for _ in scheduler.run():
        pass
    longer = prompts[1] + first.tokens[:3] + prompts[2]  # an editor's next request: the same text, typed on
    [second] = scheduler.submit(longer, max_new_tokens=6)
    [other] = scheduler.submit(prompts[3], max_new_tokens=6)  # nothing in common: computed whole
    for _ in scheduler.run():
        pass
    assert second.stats.reused_tokens == len(prompts[1]) + 3
    assert second.stats.computed_tokens == len(prompts[2])
    assert other.stats.reused_tokens == 0 and other.stats.computed_tokens == len(prompts[3])
    assert second.tokens == alone(quantized, longer, max_new_tokens=6)
    [again] = scheduler.submit(longer, max_new_tokens=6)  # the same prompt again: all but its last token
    for _ in scheduler.run():
        pass
    assert again.stats.computed_tokens == 1 and again.tokens == second.tokens
    assert model.scheduler(keep_caches=0).keep_caches == 0


def test_kept_caches_yield_to_running_sequences_under_the_memory_bound(model, prompts):
    per_sequence = model.scheduler().kv_bytes(len(prompts[0]) + 6)
    scheduler = model.scheduler(max_batch=2, max_kv_bytes=2 * per_sequence, keep_caches=4)
    for ids in prompts[:4]:
        scheduler.submit(ids[: len(prompts[0])] if len(ids) >= len(prompts[0]) else ids, max_new_tokens=6)
    while scheduler.pending:
        scheduler.step()
        held = sum(s.cache.k.nbytes + s.cache.v.nbytes for s in scheduler.running)
        held += sum(c.k.nbytes + c.v.nbytes for c in scheduler._kept)
        assert held <= 2 * per_sequence


def test_a_long_prompt_joins_in_chunks_while_the_running_sequences_step(quantized, model, monkeypatch):
    # A 2,000-token prompt was computed in one piece: every running stream paused for all of it
    # (17 s on 2 cores), and a cancelled one ran to its end. Chunks of 8 here, for the tiny model.
    from santacpu.generation import batch

    monkeypatch.setattr(batch, "PREFILL_CHUNK", 8)
    long_ids = model.tokenizer.encode("import os\nimport sys\n\nclass Config:\n    def __init__(self, a, b, c):\n" * 2)[:40]
    assert len(long_ids) == 40
    scheduler = model.scheduler(max_batch=4, keep_caches=2)
    [short] = scheduler.submit([5, 6, 7], max_new_tokens=30)
    scheduler.step()
    assert short.state == "running"
    [joining] = scheduler.submit(long_ids, max_new_tokens=4)
    emitted_meanwhile = 0
    while joining.state == "queued":
        before = len(short.tokens)
        scheduler.step()
        emitted_meanwhile += len(short.tokens) - before
    assert emitted_meanwhile >= 3  # a token of the running sequence between chunks, each step
    while scheduler.pending:
        scheduler.step()
    assert joining.tokens == alone(quantized, long_ids, max_new_tokens=4)  # the bits of a one-piece prompt
    assert short.tokens == alone(quantized, [5, 6, 7], max_new_tokens=30)
    # Cancelled after two chunks: dropped at the next step, and what it computed serves a prompt
    # that shares it.
    [cancelled] = scheduler.submit(long_ids, max_new_tokens=4)
    scheduler.admit()
    scheduler.admit()
    cancelled.cancel()
    scheduler.step()
    assert cancelled.state == "cancelled" and not scheduler.pending
    [again] = scheduler.submit(long_ids + [11, 12], max_new_tokens=2)
    while scheduler.pending:
        scheduler.step()
    assert again.stats.reused_tokens >= 16 and again.tokens == alone(quantized, long_ids + [11, 12], max_new_tokens=2)


# --- found by a red team of the API ------------------------------------------------------------


def test_a_step_of_more_tokens_than_one_forward_takes_runs_in_parts(quantized, model, prompts):
    # 600 sequences (or wide drafts) in one step: "600 tokens in one batched step; at most 512".
    many = [prompts[i % len(prompts)] for i in range(600)]
    got = collect(model.generate_batch(many, max_new_tokens=2, max_batch=600), len(many))
    want = {i: alone(quantized, prompts[i], max_new_tokens=2) for i in range(len(prompts))}
    assert all(tokens == want[i % len(prompts)] for i, tokens in enumerate(got))


def test_a_step_that_raised_stops_the_scheduler_until_abandoned(quantized, model, prompts, monkeypatch):
    # A Ctrl-C mid-forward left K/V in the caches that their decoders never saw: stepping on gave
    # a raw "20 + 4 tokens do not fit" or wrong tokens.
    scheduler = model.scheduler(max_batch=2)
    first = scheduler.submit(prompts[0], max_new_tokens=6)[0]
    scheduler.step()
    forward = model.engine.forward_batch

    def interrupted(*args, **kwargs):
        forward(*args, **kwargs)  # (the caches are written, then the interrupt lands)
        raise KeyboardInterrupt

    monkeypatch.setattr(model.engine, "forward_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        scheduler.step()
    monkeypatch.undo()
    for call in (scheduler.step, scheduler.admit, lambda: scheduler.submit(prompts[1], max_new_tokens=2)):
        with pytest.raises(SantacpuError, match=r"step was interrupted \(KeyboardInterrupt\).*abandon\(\)"):
            call()
    assert (first, []) in scheduler.abandon() and first.state == "cancelled"
    again = scheduler.submit(prompts[1], max_new_tokens=6)[0]
    for _ in scheduler.run():
        pass
    assert again.tokens == alone(quantized, prompts[1], max_new_tokens=6)


def test_a_run_left_early_loses_no_token(model, prompts):
    scheduler = model.scheduler(max_batch=3)
    sequences = [scheduler.submit(ids, max_new_tokens=5)[0] for ids in prompts[:3]]
    yielded: list[list[int]] = [[] for _ in sequences]
    while scheduler.pending or scheduler._undelivered:
        for sequence, token in scheduler.run():
            yielded[sequence.index].append(token)
            break  # (a consumer that leaves after each token)
    assert yielded == [s.tokens for s in sequences] and all(len(t) == 5 for t in yielded)


def test_waiting_samples_hold_their_options_not_a_decoder_each(model, prompts):
    # n samples each built a decoder (and prompt-lookup index) at submit: 5,000 queued greedy
    # samples held 109 MiB before any ran.
    scheduler = model.scheduler(max_batch=2)
    samples = scheduler.submit(prompts[1], max_new_tokens=2, n=5000)
    assert sum(s._decoder is not None for s in samples) == 1
    scheduler.step()
    assert sum(s._decoder is not None for s in samples) == 2  # (the two that joined)
    scheduler.abandon()


def test_token_level_methods_refuse_text_options_in_an_options_object(model, prompts):
    text_options = santacpu.GenerationOptions(max_new_tokens=2, stop=("x",))
    for call in (lambda: model.generate(prompts[0], text_options),
                 lambda: list(model.generate_batch([prompts[0]], stop=["x"])),
                 lambda: model.generate(prompts[0], santacpu.GenerationOptions(fim_order="spm"))):
        with pytest.raises(SantacpuError, match="yields token ids"):
            call()


def test_a_small_kv_bound_says_its_sizes_in_bytes(model, prompts):
    with pytest.raises(SantacpuError, match=r"needs [\d,]+ bytes of KV cache, more than max_kv_bytes \(1,000 bytes\)"):
        model.scheduler(max_kv_bytes=1000).submit(prompts[0], max_new_tokens=2)


def test_a_sequence_that_joins_and_ends_in_one_step_is_one_event_with_every_token(quantized, model, prompts):
    # It came out twice (its first token from the join, the rest from the forward), and the
    # server, seeing it done at the first, ended its answer there: 24 of 80 concurrent requests
    # lost their text after one token.
    scheduler = model.scheduler()
    sequences = scheduler.submit(prompts[0], santacpu.GenerationOptions(max_new_tokens=2), n=1)
    sequences += scheduler.submit(prompts[1], santacpu.GenerationOptions(max_new_tokens=3), n=1)
    events = scheduler.step()
    assert [sequence.index for sequence, _ in events] == [s.index for s in sequences]  # once each
    first, second = (tokens for _, tokens in events)
    assert sequences[0].done and first == alone(quantized, prompts[0], max_new_tokens=2)
    assert second == alone(quantized, prompts[1], max_new_tokens=3)[:2]


def test_the_server_worker_delivers_every_token_of_a_sequence_that_ends_in_its_first_step(quantized, model, prompts):
    import asyncio

    from santacpu.server.worker import GenerationWorker

    async def served() -> list[int]:
        scheduler = model.scheduler()
        admit, calls = scheduler.admit, []

        def late_admit():  # the request arrives just after the worker's own admit: it joins inside step()
            calls.append(1)
            return [] if len(calls) == 1 else admit()

        scheduler.admit = late_admit
        worker = GenerationWorker(scheduler)
        try:
            [feed] = worker.submit(prompts[0], santacpu.GenerationOptions(max_new_tokens=2), 1)
            got = []
            while (tokens := await feed.next_tokens()) is not None:
                got += tokens
            return got
        finally:
            worker.stop()

    assert asyncio.run(served()) == alone(quantized, prompts[0], max_new_tokens=2)
