"""The HumanEval-infilling benchmarks (bundled in `santacpu/data/humaneval_infilling`, MIT, from
openai/human-eval-infilling) and the program a completion makes, as the reference harness runs it.

A problem is a HumanEval function with a span cut out: `prefix` + `middle` + `suffix` is the
canonical solution's source, and `test` defines `check(candidate)`.

May import: the standard library and `santacpu.errors`.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import SantacpuError

DATA = Path(__file__).resolve().parents[1] / "data" / "humaneval_infilling"

BENCHMARKS = {
    "single-line": "HumanEval-SingleLineInfilling.jsonl.gz",
    "multi-line": "HumanEval-MultiLineInfilling.jsonl.gz",
    "random-span": "HumanEval-RandomSpanInfilling.jsonl.gz",
    "random-span-light": "HumanEval-RandomSpanInfillingLight.jsonl.gz",
}


@dataclass(frozen=True)
class Problem:
    task_id: str
    entry_point: str
    prefix: str
    suffix: str
    middle: str  # the canonical solution's span
    test: str


def check_benchmark(name: str) -> str:
    if name not in BENCHMARKS:
        raise SantacpuError(f"unknown benchmark '{name}' (choose {', '.join(BENCHMARKS)})")
    return name


def load_problems(benchmark: str, limit: int | None = None) -> list[Problem]:
    """The benchmark's problems in their published order (the first `limit` of them)."""
    path = DATA / BENCHMARKS[check_benchmark(benchmark)]
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        rows = [json.loads(line) for line in lines if line.strip()]
    problems = [
        Problem(r["task_id"], r["entry_point"], r["prompt"], r["suffix"], r["canonical_solution"], r["test"]) for r in rows
    ]
    return problems if limit is None else problems[:limit]


def program(problem: Problem, completion: str) -> str:
    """The source the reference harness executes for one completion."""
    return f"{problem.prefix}{completion}{problem.suffix}\n{problem.test}\ncheck({problem.entry_point})\n"
