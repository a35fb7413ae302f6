"""What `santacpu eval humaneval-infill` does: the problems, the results file (resumed or new), the
run (here or on Ray), and the summary; with a reference model, the same again for it and the
comparison of the two. A full-precision model is evaluated as `santacpu.load` runs it: its cached
quantization (`quant`, default q8_0); the reference of a comparison runs in full precision.

May import: `santacpu.model`, `santacpu.progress`, `santacpu.formats` (the default quantization's name) and the harness's modules.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..formats.quantized_file import DEFAULT_QUANT, names_quantized_file, read_metadata
from ..model import load, quant_as_it_is, runnable_model
from ..progress import Progress
from .local import run_local
from .problems import load_problems
from .ray_pipeline import RayPlacement, require_ray, run_on_ray
from .results import ResultsFile, model_fingerprint
from .scoring import compare, summarize
from .settings import EvalSettings


def open_results(model: str, out: Path, settings: EvalSettings, resume: bool, revision: str | None = None) -> ResultsFile:
    """The run's results file, checked (and locked, where it exists) before any long work (see
    `ResultsFile.open`)."""
    return ResultsFile.open(Path(out), {**settings.identity(), "model": model_fingerprint(model, revision)}, resume)


def shown_name(model: str, runnable: str, quant: str | None) -> str:
    """The model as its user named it, with the type of the quantization first use made of it."""
    return str(model) if str(runnable) == str(model) else f"{model} ({quant or DEFAULT_QUANT})"


def evaluate(
    model: str,
    out: Path,
    settings: EvalSettings,
    *,
    revision: str | None = None,
    quant: str | None = None,
    device: str = "auto",
    resume: bool = False,
    ray: RayPlacement | None = None,
    label: str = "eval",
    results: ResultsFile | None = None,
    name: str | None = None,
) -> tuple[dict, list[dict]]:
    """Run (or finish) one model's evaluation into `out`: (its summary, its records in the
    benchmark's order). `ray` None runs here; else on a Ray cluster (see `ray_pipeline`).
    `results`: the file opened already (`open_results`). `quant`: as `santacpu.load`'s. `name`:
    the summary's name for it (default: `shown_name`)."""
    settings = settings.checked()
    problems = load_problems(settings.benchmark, settings.limit)
    if ray is not None:
        ray = ray.checked()  # (before a full-precision model is quantized for it)
        require_ray()
    asked = model
    model, revision = runnable_model(model, revision, quant)
    name = name or shown_name(asked, model, quant)
    results = results or open_results(model, out, settings, resume, revision)
    try:
        todo = [p for p in problems if p.task_id not in results.finished]
        progress = Progress(len(todo), label)

        def on_record(record: dict) -> None:
            results.append(record)
            progress.step(record["task_id"])

        here = load(model, revision=revision, quant=quant_as_it_is(model), device=device) if todo and ray is None else None
        start = time.perf_counter()  # (Ray's runs count their cluster's start and the actors' loads)
        if here is not None:
            run_local(here, todo, settings, on_record)
        elif todo:
            if names_quantized_file(model):
                read_metadata(model)  # a damaged file is one line now, not from an actor once a cluster has started
            run_on_ray(model, revision, device, todo, settings, on_record, ray)
        elapsed = time.perf_counter() - start
    finally:
        results.close()
    where = "here" if ray is None else f"on ray ({ray.address or 'a local cluster'}, {ray.workers} actor{'s' * (ray.workers > 1)})"
    order = {p.task_id: i for i, p in enumerate(problems)}
    records = sorted((r for r in results.records if r["task_id"] in order), key=lambda r: order[r["task_id"]])
    summary = {
        "model": name,
        "benchmark": settings.benchmark,
        **summarize(records, settings.ks),
        "truncated_prompts": sum(bool(r.get("truncated")) for r in records),
        "file": str(out),
        "run": {
            "problems": len(todo),
            "seconds": round(elapsed, 2),
            "problems_per_minute": round(60 * len(todo) / elapsed, 2) if todo and elapsed > 0 else None,
            "where": where,
        },
    }
    return summary, records


def reference_path(out: Path) -> Path:
    """Where a reference model's results go, beside the model's: results.jsonl -> results.reference.jsonl."""
    out = Path(out)
    return out.with_name(f"{out.stem}.reference{out.suffix or '.jsonl'}")


def evaluate_against(
    model: str, reference: str, out: Path, settings: EvalSettings, *, revision: str | None = None,
    quant: str | None = None, reference_revision: str | None = None, **run
) -> dict:
    """Both models on the same problems and seeds (the reference in full precision): each one's
    summary, and the comparison. Both results files are checked before either model runs (a
    first-use quantization of `model` is made first)."""
    settings = settings.checked()
    if run.get("ray") is not None:
        run["ray"] = run["ray"].checked()
    resume = run.get("resume", False)
    names = model, reference
    model, revision = runnable_model(model, revision, quant)
    reference, reference_revision = runnable_model(reference, reference_revision, "none")
    files = (open_results(model, out, settings, resume, revision),
             open_results(reference, reference_path(out), settings, resume, reference_revision))
    mine, records = evaluate(model, out, settings, label="eval model", results=files[0], revision=revision,
                             quant=quant_as_it_is(model), name=shown_name(names[0], model, quant), **run)
    theirs, reference_records = evaluate(
        reference, reference_path(out), settings, label="eval reference", results=files[1],
        revision=reference_revision, quant="none", name=shown_name(names[1], reference, "none"), **run,
    )
    return {"model": mine, "reference": theirs, "comparison": compare(records, reference_records)}
