"""One problem's completions cut to their span, executed in the sandbox and scored: the result
record that the results file keeps (the same whether it ran locally or on Ray).

May import: `santacpu.harness.problems`, `santacpu.harness.sandbox`, `santacpu.harness.scoring`.
"""

from __future__ import annotations

from collections.abc import Sequence

from .problems import Problem, program
from .sandbox import SandboxLimits, run_program
from .scoring import cut_to_span, exact_match


def score_problem(problem: Problem, texts: Sequence[str], benchmark: str, timeout_s: float, **facts) -> dict:
    """The record for one problem: its completions (cut to the span), for each whether the program
    passed, its status and detail, whether it equals the canonical middle; plus `facts` (prompt
    sizes) as given."""
    completions = [cut_to_span(text, benchmark) for text in texts]
    limits = SandboxLimits(timeout_s=timeout_s)
    outcomes = [run_program(program(problem, c), limits) for c in completions]
    return {
        "task_id": problem.task_id,
        "completions": completions,
        "passed": [o.passed for o in outcomes],
        "exact": [exact_match(c, problem.middle) for c in completions],
        "statuses": [o.status for o in outcomes],
        "details": [o.detail for o in outcomes],
        **facts,
    }
