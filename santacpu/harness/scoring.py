"""Scoring HumanEval-infilling completions: where a completion's span ends, exact match, pass@k
(the unbiased estimator of Chen et al., 2021, as the reference harness computes it), and the
comparison of two models on the same problems and seeds.

May import: numpy and the standard library.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

DEFAULT_KS = (1, 10, 100)


def cut_to_span(text: str, benchmark: str) -> str:
    """The completion as scored: a single-line span ends at the first newline (kept: every
    canonical line ends with one); the other benchmarks' spans end where the model ended them
    (end of text or the token limit)."""
    if benchmark == "single-line":
        end = text.find("\n")
        return text if end < 0 else text[: end + 1]
    return text


def span_ended(text: str, benchmark: str) -> bool:
    """Whether generating more cannot change `cut_to_span(text)` (so the sequence may stop)."""
    return benchmark == "single-line" and "\n" in text


def exact_match(completion: str, middle: str) -> bool:
    return completion.strip() == middle.strip()


def pass_at_k(n: int, c: int, k: int) -> float:
    """The probability that at least one of k samples drawn from n (c of them correct) passes."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def summarize(records: Sequence[dict], ks: Sequence[int]) -> dict:
    """Pass@k (the mean over problems), exact match and how the programs ended, over result records
    (each with `passed` and `exact` lists, one entry per sample, and `statuses`)."""
    if not records:
        return {"problems": 0, "samples": 0}
    n = len(records[0]["passed"])
    statuses: dict[str, int] = {}
    for record in records:
        for status in record["statuses"]:
            statuses[status] = statuses.get(status, 0) + 1
    return {
        "problems": len(records),
        "samples": n,
        "pass@k": {k: float(np.mean([pass_at_k(n, sum(r["passed"]), k) for r in records])) for k in ks},
        "exact_match": float(np.mean([e for r in records for e in r["exact"]])),
        "statuses": statuses,
    }


def compare(records: Sequence[dict], reference: Sequence[dict]) -> dict:
    """The model against a reference on the same problems: how often the two completions are the
    same text (sample by sample), and the pass@1 difference (model - reference) with its standard
    error over problems (paired)."""
    by_task = {r["task_id"]: r for r in reference}
    pairs = [(r, by_task[r["task_id"]]) for r in records if r["task_id"] in by_task]
    if not pairs:
        return {"problems": 0}
    same = [a == b for r, ref in pairs for a, b in zip(r["completions"], ref["completions"])]
    differences = np.array([np.mean(r["passed"]) - np.mean(ref["passed"]) for r, ref in pairs])
    # (None for one problem: no spread to measure, and JSON has no NaN)
    error = float(np.std(differences, ddof=1) / math.sqrt(len(pairs))) if len(pairs) > 1 else None
    return {
        "problems": len(pairs),
        "agreement": float(np.mean(same)),
        "pass@1_difference": float(np.mean(differences)),
        "pass@1_difference_se": error,
    }
