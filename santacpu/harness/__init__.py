"""The task-level evaluation harness (`santacpu eval`): HumanEval-infilling problems, the model's
middles generated through the batch scheduler, each program run in a sandbox, scored by pass@k
and exact match, with results kept in a resumable JSONL file; locally or on a Ray cluster.

- `problems`: the four benchmarks (bundled data) and the program each completion makes.
- `scoring`: where a completion's span ends, exact match, pass@k, the comparison with a reference.
- `sandbox`: one program in its own process group, namespaces and resource limits.
- `results`: the JSONL results file (header, one record per problem, resume).
- `generate`: a problem's n middles through the model's batch scheduler.
- `local`, `ray_pipeline`: the run on this machine, or as a Ray Data pipeline.
- `run`: what `santacpu eval` does: settings, the run(s), the summary.

May import: `santacpu.model` and the layers below it; `ray` lazily (the `ray` extra).
"""
