"""Embedding safety: one model, or several, used from several Python threads at once gives the
serial results and never crashes the process, whatever Numba's threading layer (its `workqueue`
layer aborts the process on concurrent parallel calls unless santacpu serialises them)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers import tiny_checkpoint

import santacpu
from santacpu.backends.cpu import backend

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["def add(a, b):", "class Stack:", "import os\n", "for i in range(10):", "x = [", "while True:"]
OPTIONS = [{}, {"temperature": 0.9, "seed": 7}, {"lookup": False}]


def jobs(greedy_only=False):
    return [(p, o) for p in PROMPTS for o in OPTIONS if not (greedy_only and o.get("temperature"))]


def complete(model, prompt, options):
    return model.complete(prompt, max_new_tokens=6, **options)


def run_in_threads(models, n_threads=4, rounds=2, greedy_only=False):
    """Every thread runs every job `rounds` times on models[thread % len(models)]; returns
    {(thread, job index): [results]} and the exceptions raised."""
    results, errors = {}, []

    def worker(t):
        try:
            model = models[t % len(models)]
            for _ in range(rounds):
                for j, (prompt, options) in enumerate(jobs(greedy_only)):
                    results.setdefault((t, j), []).append(complete(model, prompt, options))
        except Exception as problem:  # noqa: BLE001 -- any failure in a thread is reported by the test
            errors.append(problem)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, errors


@pytest.fixture()
def parallel_kernels(monkeypatch):
    """Make every Numba kernel take its parallel path even on the tiny model."""
    monkeypatch.setattr(backend, "PARALLEL_MIN_WORK", 0)


@pytest.mark.parametrize("shared", [True, False], ids=["one shared model", "a model per thread"])
def test_threads_get_the_serial_results(parallel_kernels, shared):
    # On a shared model the threads push each other's tokens out of its cache, and a pushed-out
    # generation recomputes its decoded tokens as one batch: the few-token kernel sums in another
    # order than the one-token matvec, so its logits may differ in the last bits. Greedy choices
    # do not move (no near-ties here); a sample drawn right at a boundary could, so sampling
    # jobs are compared on separate models only.
    serial_model = santacpu.load(tiny_checkpoint(), quant="none", reuse_prompt=False)
    want = [complete(serial_model, prompt, options) for prompt, options in jobs(shared)]
    n_threads = 4
    models = [santacpu.load(tiny_checkpoint(), quant="none") for _ in range(1 if shared else n_threads)]
    results, errors = run_in_threads(models, n_threads, greedy_only=shared)
    assert errors == []
    for (t, j), got in results.items():
        assert got == [want[j]] * len(got), (t, jobs(shared)[j])
    assert len(results) == n_threads * len(jobs(shared))


class BlockingEngine:
    """Wraps the real engine; its first forward waits until released."""

    def __init__(self, engine):
        self.engine, self.entered, self.release = engine, threading.Event(), threading.Event()

    def new_cache(self, n_ctx=None):
        return self.engine.new_cache(n_ctx)

    def forward(self, cache, ids, all_logits=False, first_logit=0):
        self.entered.set()
        self.release.wait(10)
        return self.engine.forward(cache, ids, all_logits, first_logit)


def test_one_generator_advanced_from_two_threads_is_refused():
    """Documented behaviour: a generator belongs to one thread at a time; Python itself refuses a
    second concurrent `next` with a clear error instead of corrupting the sequence."""
    model = santacpu.load(tiny_checkpoint(), quant="none")
    model.engine = blocking = BlockingEngine(model.engine)
    tokens = model.generate([1, 2, 3], max_new_tokens=2, lookup=False)
    seen = []
    thread = threading.Thread(target=lambda: seen.append(next(tokens)))
    thread.start()
    assert blocking.entered.wait(10)  # the other thread is inside the generator, in a forward
    with pytest.raises(ValueError, match="generator already executing"):
        next(tokens)
    blocking.release.set()
    thread.join()
    assert len(seen) == 1 and len(list(tokens)) == 1  # the generator itself is unharmed


SCRIPT = """
import sys, threading
sys.path.insert(0, {tests!r})
import numba, santacpu, santacpu.backends.cpu.backend as backend
from helpers import tiny_checkpoint
backend.PARALLEL_MIN_WORK = 0
models = [santacpu.load(tiny_checkpoint(), quant="none") for _ in range(3)]
models[0].complete("x", max_new_tokens=1)
assert numba.threading_layer() == "workqueue", numba.threading_layer()
def work(model):
    for i in range(10):
        model.complete("def f(x):", max_new_tokens=6, lookup=i % 2 == 0)
threads = [threading.Thread(target=work, args=(m,)) for m in models + models[:1]]
[t.start() for t in threads]
[t.join() for t in threads]
print("finished")
"""


def test_the_workqueue_threading_layer_does_not_abort():
    """Run where the process would abort without the kernel lock: Numba's workqueue layer, parallel
    kernels, four threads on three models."""
    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue")
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(tests=str(REPO / "tests"))],
        cwd=REPO,
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("finished")
