"""One problem's completions cut to their span, executed in the sandbox and scored: the result
record that the results file keeps (the same whether it ran locally or on Ray).

May import: `santacpu.harness.problems`, `santacpu.harness.sandbox`, `santacpu.harness.scoring`.
"""

from __future__ import annotations

from collections.abc import Sequence

from .problems import Problem, program
from .sandbox import ExecutionResult, SandboxLimits, run_program
from .scoring import cut_to_span, exact_match


def programs_of(problem: Problem, texts: Sequence[str], benchmark: str) -> tuple[list[str], list[str]]:
    """(the completions cut to the problem's span, the program each makes)."""
    completions = [cut_to_span(text, benchmark) for text in texts]
    return completions, [program(problem, c) for c in completions]


def record_of(problem: Problem, completions: Sequence[str], outcomes: Sequence[ExecutionResult], **facts) -> dict:
    """The record for one problem: its completions (cut to the span), for each whether the program
    passed, its status and detail, whether it equals the canonical middle; plus `facts` (prompt
    sizes) as given."""
    return {
        "task_id": problem.task_id,
        "completions": list(completions),
        "passed": [o.passed for o in outcomes],
        "exact": [exact_match(c, problem.middle) for c in completions],
        "statuses": [o.status for o in outcomes],
        "details": [o.detail for o in outcomes],
        **facts,
    }


def score_problem(problem: Problem, texts: Sequence[str], benchmark: str, timeout_s: float, **facts) -> dict:
    """The record for one problem, its programs run one after another (a Ray task's)."""
    completions, programs = programs_of(problem, texts, benchmark)
    limits = SandboxLimits(timeout_s=timeout_s)
    return record_of(problem, completions, [run_program(p, limits) for p in programs], **facts)
