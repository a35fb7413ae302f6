"""Checks that a token's logits and K/V do not depend on which other tokens share its forward
call, and that greedy output with prompt lookup equals plain greedy output after any earlier
requests. Imported by tests/test_token_invariance.py, and run as a script in a child process with
narrower CPU features (`python tests/token_invariance.py QTYPE...`) to cover each instruction-set
path of the integer kernels on one machine.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TRAINED = REPO / "tests" / "fixtures" / "trained_tiny"
# Calls of 1 token (decode), a few (verification: 2..31) and many (a prompt: 32 and more).
SPLITS = (1, 3, 40, 2, 1, 7)


def quantized_trained_model(qtype: str, folder: Path) -> Path:
    """The trained fixture converted to `qtype` (default policy, no calibration) in `folder`."""
    from quantize.converter import convert

    return convert(TRAINED, folder / f"trained-{qtype}.safetensors", qtype=qtype).out


def heldout_ids(tokenizer, n: int) -> list[int]:
    ids = tokenizer.encode((TRAINED / "heldout.py.txt").read_text(encoding="utf-8"))
    assert len(ids) >= n, len(ids)
    return ids[:n]


def check_calls_do_not_matter(model) -> None:
    """One forward over all tokens, the same tokens in calls of SPLITS' sizes, and one at a time:
    every row of logits and every K/V row equal bit for bit."""
    engine = model.engine
    ids = heldout_ids(model.tokenizer, sum(SPLITS))
    whole_cache = engine.new_cache(len(ids))
    whole = engine.forward(whole_cache, ids, all_logits=True)
    split_cache = engine.new_cache(len(ids))
    pieces, at = [], 0
    for size in SPLITS:
        pieces.append(engine.forward(split_cache, ids[at : at + size], all_logits=True))
        at += size
    split = np.concatenate(pieces)
    single_cache = engine.new_cache(len(ids))
    single = np.concatenate([engine.forward(single_cache, [token]) for token in ids])
    for name, other, cache in (("split", split, split_cache), ("one by one", single, single_cache)):
        differing = [t for t in range(len(ids)) if not np.array_equal(whole[t], other[t])]
        assert not differing, f"{name}: logits differ at positions {differing[:10]}"
        assert np.array_equal(whole_cache.k, cache.k) and np.array_equal(whole_cache.v, cache.v), name


def check_lookup_after_other_requests(model, fresh) -> None:
    """The request sequence of `santacpu bench`'s lookup part, which once diverged on AVX2: a
    prompt whose continuation echoes it, then a plain prompt sharing its first part, each plain
    and then with lookup on one model (its cache reused across requests); every output equals a
    fresh model's plain greedy output."""
    stream = heldout_ids(model.tokenizer, 120)
    chunk = stream[:80]
    list(model.generate(stream[:16], max_new_tokens=4))
    for ids in ((chunk + chunk)[:120], stream):
        want = list(fresh.generate(ids, max_new_tokens=40, lookup=False))
        fresh.clear_prompt_cache()
        for lookup in (False, True):
            got = list(model.generate(ids, max_new_tokens=40, lookup=lookup))
            assert got == want, (lookup, got, want)
        if ids is not stream:
            assert model.last_stats.accepted_tokens > 0  # lookup's verification really ran


def main(qtypes: list[str]) -> None:
    import santacpu
    from santacpu.backends.cpu import int_dot

    devices = set()
    with tempfile.TemporaryDirectory() as folder:
        for qtype in qtypes:
            path = quantized_trained_model(qtype, Path(folder))
            model = santacpu.load(path)
            devices.add(model.device)
            check_calls_do_not_matter(model)
            check_lookup_after_other_requests(santacpu.load(path), santacpu.load(path))
    print("ok", int_dot.ISA or "float", *sorted(devices), sep="\n")


if __name__ == "__main__":
    main(sys.argv[1:])
