"""The commands that measure a model: `santacpu perplexity` (and what a quantization loses against
a reference), `bench` (speed and memory) and `eval humaneval-infill` (pass@k in the sandbox).

May import: `santacpu.evaluate`, `santacpu.bench`, `santacpu.harness`, `santacpu.model` and the
layers below them, and this package's `options` and `text_input`.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import List, Optional

import typer

from ..atomic_file import check_writable, write_text_atomically
from ..bench import PARTS
from ..bench.run import MAX_BATCH_SIZE, MAX_REPEAT, MIN_FIM_TOKENS
from ..errors import OptionValueError, SantacpuWarning
from ..formats.quantized_file import DEFAULT_QUANT, names_quantized_file
from ..generation.prompts import FIM_ORDERS
from ..harness.problems import BENCHMARKS
from ..harness.settings import DEFAULT_EVAL_MAX_NEW_TOKENS, DEFAULT_TIMEOUT_S, MAX_SAMPLES, EvalSettings
from ..loading.source import DEFAULT_MODEL, default_model
from ..settings import MAX_THREADS, MODEL_ENV
from .options import (
    DEVICE_OPTION, MODEL_OPTION, QUANT_CHOICES, QUANT_OPTION, REVISION_OPTION, check_counts, check_probability,
    check_temperature, choices, counts, each_one_of, input_files, model_name, one_of, output_file, refuse_replacing_inputs,
    seconds_between,
)
from .text_input import read_text_file

DEFAULT_PERPLEXITY_CTX = 256


def _model_that_runs(name: str, revision: str | None, quant: str | None, json_out) -> tuple[str, str | None, str]:
    """(what runs `name` under the first-use policy: itself or its cached quantization, made now if
    need be; its revision; the name a report shows). A --json file may not replace the file that runs."""
    from ..model import runnable_model

    runs, revision = runnable_model(name, revision, quant)
    if json_out is not None:
        refuse_replacing_inputs(json_out, "--json", [runs])
    return runs, revision, name if runs == name else f"{name} ({quant or DEFAULT_QUANT})"


def perplexity(
    files: List[str] = typer.Argument(..., callback=input_files, metavar="FILES", help="Source files to score (UTF-8 text)."),
    model: str = typer.Option(None, "--model", "-m", callback=model_name, help=f"The model to score. Default: ${MODEL_ENV} if set, else {DEFAULT_MODEL}.", show_default=False),
    reference: Optional[str] = typer.Option(None, callback=model_name, help="A reference model (e.g. the full-precision checkpoint): adds delta perplexity, KL divergence and top-1 agreement."),
    ctx: Optional[int] = typer.Option(
        None, min=8,
        help=f"Tokens per chunk, at most the model's context; the second half of each chunk is scored (llama.cpp's "
        f"convention). Default: {DEFAULT_PERPLEXITY_CTX}, or the model's context if that is shorter.",
        show_default=False,
    ),
    quant: Optional[str] = typer.Option(
        None, callback=one_of(*QUANT_CHOICES), metavar=choices(*QUANT_CHOICES),
        help="For a full-precision --model: score its cached quantization to this type (made once, as `complete` "
        f"does); 'none' scores it in full precision. Default: {DEFAULT_QUANT}. The reference always runs in full "
        "precision.",
        show_default=False,
    ),
    json_out: Optional[str] = typer.Option(None, "--json", callback=output_file, help="Also write the results to this JSON file."),
    force: bool = typer.Option(False, "--force", help="Replace the --json file if it exists."),
) -> None:
    """Perplexity of a model over source files and, with --reference, what it loses against it."""
    from ..evaluate import score
    from ..model import load, quant_as_it_is

    name = model or default_model()
    if json_out is not None:
        check_writable(json_out, "--json", overwrite=force)  # now, not after scoring
        refuse_replacing_inputs(json_out, "--json", [*files, name, *([reference] if reference else [])])
    texts = [read_text_file(path, "file") for path in files]
    runs, revision, shown = _model_that_runs(name, None, quant, json_out)
    loaded = load(runs, revision=revision, quant=quant_as_it_is(runs))
    # The reference in full precision (a quantized file runs as it is: no quant to ignore).
    against = load(reference, quant=None if names_quantized_file(reference) else "none") if reference else None
    shortest = min([loaded, *([against] if against else [])], key=lambda m: m.config.n_positions)
    which = "the model's" if shortest is loaded else "the reference's"
    if ctx is None:
        ctx = min(DEFAULT_PERPLEXITY_CTX, shortest.config.n_positions)
        if ctx < DEFAULT_PERPLEXITY_CTX:
            print(f"santacpu: chunks of {ctx} tokens, {which} whole context (shorter than the default "
                  f"{DEFAULT_PERPLEXITY_CTX})", file=sys.stderr)
    elif ctx > shortest.config.n_positions:
        raise OptionValueError(f"--ctx {ctx} is past {which} context of {shortest.config.n_positions} tokens: "
                               f"give --ctx {shortest.config.n_positions} or less")
    scores = score(loaded, texts, ctx, against)
    if json_out is not None:  # (first: a stdout that fails loses nothing)
        about = {"model": shown, "model_file": runs, "reference": reference, "files": [str(f) for f in files]}
        write_text_atomically(json_out, scores.to_json(**about) + "\n", overwrite=force)
    print(scores.table(shown, reference))


def bench(
    model: str = typer.Argument(..., metavar="MODEL", callback=model_name, help="Quantized file, checkpoint folder, weight file, or hub id."),
    revision: Optional[str] = typer.Option(None, help="Hub revision for a hub id."),
    quant: Optional[str] = typer.Option(
        None, callback=one_of(*QUANT_CHOICES), metavar=choices(*QUANT_CHOICES),
        help="For a full-precision model: bench its cached quantization to this type (made once, as "
        f"`complete` does); 'none' benches it in full precision. Default: {DEFAULT_QUANT}.",
        show_default=False,
    ),
    prompt_tokens: Optional[int] = typer.Option(
        None, min=1, help="Prompt length for the prefill speed. Default: 512, less for a model with a short context.",
        show_default=False,
    ),
    decode_tokens: Optional[int] = typer.Option(
        None, min=1, help="Tokens decoded (greedy, exactly this many) for the decode speed. Default: 128, less for "
        "a model with a short context.",
        show_default=False,
    ),
    fim_tokens: Optional[int] = typer.Option(
        None, min=0, help=f"Prompt length of the FIM request timed to its first token (at least {MIN_FIM_TOKENS}: "
        "3 marker tokens and text); 0 skips it. Default: 1500, less for a model with a short context.",
        show_default=False,
    ),
    threads: int = typer.Option(0, min=0, max=MAX_THREADS, help="Threads for Numba and BLAS; 0: all usable cores."),
    repeat: int = typer.Option(3, min=1, max=MAX_REPEAT, help="Runs of prefill, decode and FIM; the median is reported."),
    memory_context: int = typer.Option(0, min=0, help="Context filled by the peak-RSS run; 0: the model's whole context."),
    parts: str = typer.Option(
        ",".join(PARTS), callback=each_one_of(*PARTS), metavar=choices(*PARTS, many=True), help="What to measure, comma-separated: " + ", ".join(PARTS) + "."
    ),
    batch: Optional[str] = typer.Option(
        None, metavar="SIZES", callback=check_counts, help=f"Also measure batched decoding at these batch sizes (1 to {MAX_BATCH_SIZE}), comma-separated (e.g. 1,2,4,8,16): "
        "aggregate and per-sequence decode tok/s of B greedy sequences, 64-token prompts (less for a model with a short context), 32 tokens each. Default: off.",
        show_default=False,
    ),
    json_out: Optional[str] = typer.Option(
        None, "--json", callback=output_file, help="Also write every figure and the machine's facts to this JSON file."
    ),
    force: bool = typer.Option(False, "--force", help="Replace the --json file if it exists."),
    device: str = DEVICE_OPTION,
) -> None:
    """Measure speed (prefill, decode, FIM time to first token), load and compile times, and peak
    memory of a model; each measurement runs in a child process of its own. Progress on stderr,
    the table on stdout."""
    import json

    from ..bench import BenchSettings, format_table, run_bench
    from ..bench.report import finite_only
    from ..model import resolve_device

    if json_out is not None:
        check_writable(json_out, "--json", overwrite=force)  # now, not after minutes of measuring
        refuse_replacing_inputs(json_out, "--json", [model])
    settings = BenchSettings(
        model=model, quant=quant, prompt_tokens=prompt_tokens, decode_tokens=decode_tokens,
        fim_tokens=fim_tokens, threads=threads, repeat=repeat, memory_context=memory_context,
        parts=tuple(p.strip() for p in parts.split(",") if p.strip()), revision=revision,
        batch=counts(batch), device=device,
    ).checked()  # (before a first-use quantization, as the GPU below)
    resolve_device(device)
    runs, settings.revision, shown = _model_that_runs(model, revision, quant, json_out)
    if runs != model:  # benched as the file it runs: named as given
        settings.model, settings.name, settings.quant = runs, shown, None
    report = run_bench(settings)
    if json_out is not None:  # (first: a stdout that fails loses nothing)
        write_text_atomically(json_out, json.dumps(finite_only(report), indent=2, allow_nan=False) + "\n", overwrite=force)
    print(format_table(report))
    for note in report["warnings"]:
        warnings.warn(note, SantacpuWarning)


def eval_humaneval_infill(
    benchmark: str = typer.Option(
        "single-line", callback=one_of(*BENCHMARKS), metavar=choices(*BENCHMARKS), help=f"One of {', '.join(BENCHMARKS)} (bundled data)."
    ),
    model: str = MODEL_OPTION,
    revision: Optional[str] = REVISION_OPTION,
    quant: Optional[str] = QUANT_OPTION,
    samples: int = typer.Option(
        1, min=1, max=MAX_SAMPLES,
        help="Completions of each problem (the n of pass@k; the reference harness uses 200 for pass@100).",
    ),
    k: Optional[str] = typer.Option(
        None, callback=check_counts,
        help="The k of pass@k, comma-separated, each at most --samples. Default: those of 1,10,100 that are.",
        show_default=False,
    ),
    temperature: float = typer.Option(0.0, callback=check_temperature, help="Sampling temperature, a finite number >= 0; 0 is greedy (then --samples 1)."),
    top_p: float = typer.Option(1.0, callback=check_probability, help="Nucleus sampling, 0 < P <= 1; 1 is off."),
    seed: int = typer.Option(0, min=0, help="Base seed: a problem's samples are seeded from it and its task id."),
    max_new_tokens: int = typer.Option(DEFAULT_EVAL_MAX_NEW_TOKENS, min=1, help="Most tokens of each completion."),
    fim_order: str = typer.Option("psm", callback=one_of(*FIM_ORDERS), metavar=choices(*FIM_ORDERS), help="FIM prompt order: psm or spm."),
    limit: Optional[int] = typer.Option(None, min=1, help="Only the first N problems. Default: all.", show_default=False),
    timeout: float = typer.Option(DEFAULT_TIMEOUT_S, callback=seconds_between(0.1, 3600),
                                  help="Seconds each program may run (wall clock), 0.1 to 3600."),
    max_batch: int = typer.Option(8, min=1, max=256, help="Sequences generated at once."),
    exec_workers: int = typer.Option(2, min=1, max=64, help="Programs executed at once."),
    out: Optional[Path] = typer.Option(
        None, readable=False, help="Results file, JSON lines, appended as problems finish. Default: "
        "eval-BENCHMARK.jsonl.", show_default=False,
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out, skipping finished problems."),
    reference: Optional[str] = typer.Option(
        None, help="A full-precision model to compare with, on the same problems and seeds (its results go beside "
        "--out, as NAME.reference.jsonl).", show_default=False,
    ),
    ray: bool = typer.Option(False, "--ray", help="Run on a local Ray cluster of the run's own (the 'ray' extra)."),
    ray_address: Optional[str] = typer.Option(
        None, help="Run on the existing Ray cluster at this address: its head node's HOST:PORT, as `ray start "
        "--head` prints it (implies --ray).", show_default=False
    ),
    workers: int = typer.Option(1, min=1, max=256, help="With Ray: model actors (each loads the model once)."),
    threads_per_worker: Optional[int] = typer.Option(
        None, min=1, help="With Ray: threads each actor's kernels use. Default: the cluster's CPUs / --workers.",
        show_default=False,
    ),
    device: str = DEVICE_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON instead of a table."),
) -> None:
    """HumanEval-infilling: pass@k (programs run in a sandbox) and exact match of the model's
    fill-in-the-middle completions; with --reference, how a quantization changes them."""
    import json

    from ..harness.ray_pipeline import RayPlacement, require_ray
    from ..harness.report import report_lines
    from ..harness.run import evaluate, evaluate_against
    from ..model import resolve_device

    settings = EvalSettings(
        benchmark=benchmark, samples=samples, ks=counts(k) or None, temperature=temperature, top_p=top_p, seed=seed,
        max_new_tokens=max_new_tokens, fim_order=fim_order, limit=limit, timeout_s=timeout, max_batch=max_batch,
        exec_workers=exec_workers,
    ).checked()
    placement = RayPlacement(ray_address, workers, threads_per_worker).checked() if ray or ray_address is not None else None
    if placement is None:
        for given, name in ((workers != 1, "--workers"), (threads_per_worker is not None, "--threads-per-worker")):
            if given:
                warnings.warn(f"{name} is ignored without --ray or --ray-address", SantacpuWarning)
    if placement is not None:
        require_ray()
    resolve_device(device)
    out = out or Path(f"eval-{benchmark}.jsonl")
    check_writable(out)
    run = {"device": device, "resume": resume, "ray": placement, "quant": quant}
    if reference is None:
        summary, _ = evaluate(model or default_model(), out, settings, revision=revision, **run)
        result = {"model": summary}
    else:
        result = evaluate_against(model or default_model(), reference, out, settings, revision=revision, **run)
    print(json.dumps(result, indent=1) if as_json else "\n".join(report_lines(result, settings.ks)))


