"""The `santacpu` command line: a thin typed layer over the Python API.

Every failure a user can cause ends in one line on stderr (`santacpu: error: ...`) and exit code 1;
`--debug` shows the traceback instead. Warnings are one line each (`santacpu: warning: ...`).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import List, Optional, Tuple

import typer

from .bench import PARTS
from .errors import SantacpuError, SantacpuWarning
from .lookup import DEFAULT_DRAFT_TOKENS
from .model import DEFAULT_MAX_NEW_TOKENS, LOOKUP_BY_DEFAULT
from .source import DEFAULT_MODEL, MODEL_ENV, default_model

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Run the SantaCoder code model on the CPU: code completion, left-to-right and fill-in-the-middle.",
)
_debug = {"on": False}


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    _debug["on"] = debug


def read_text_file(path: Path, what: str) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SantacpuError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise SantacpuError(f"{what} {path} is a folder, not a file") from None
    except OSError as problem:
        raise SantacpuError(f"cannot read {what} {path}: {problem.strerror}") from None
    return decode_text(raw, f"{what} {path}")


def write_text_atomically(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder, renamed into place: never a partial file."""
    import os
    import tempfile

    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent if str(path.parent) else ".")
    except OSError as problem:
        raise SantacpuError(f"cannot write {path}: {problem.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def decode_text(raw: bytes, what: str) -> str:
    if b"\0" in raw:
        raise SantacpuError(f"{what} looks like a binary file (it contains NUL bytes), not source text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as bad:
        raise SantacpuError(
            f"{what} is not UTF-8 text (byte 0x{raw[bad.start]:02x} at offset {bad.start}); convert it to UTF-8 first"
        ) from None


@app.command()
def complete(
    prompt: Optional[str] = typer.Argument(
        None, help="The text to continue. '-' or nothing: read it from standard input.", show_default=False
    ),
    model: str = typer.Option(
        None,
        "--model",
        "-m",
        help=f"Quantized file, checkpoint folder, weight file, or hub id. Default: ${MODEL_ENV} if set, else {DEFAULT_MODEL}.",
        show_default=False,
    ),
    revision: Optional[str] = typer.Option(None, help="Hub revision (branch, tag or commit) for a hub id."),
    quant: str = typer.Option(
        "q8_0",
        help="For a full-precision model: quantize it once to this type into the cache folder "
        "($SANTACPU_CACHE, else ~/.cache/santacpu) and run that; 'none' runs it in full precision.",
    ),
    fim: Optional[Tuple[Path, Path]] = typer.Option(
        None,
        "--fim",
        metavar="PREFIX_FILE SUFFIX_FILE",
        help="Fill in the middle between the text of two files; only the middle is printed.",
    ),
    fim_order: str = typer.Option("psm", help="FIM prompt order: psm (prefix first) or spm (suffix first)."),
    max_new_tokens: int = typer.Option(DEFAULT_MAX_NEW_TOKENS, min=0, help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, min=0.0, help="Sampling temperature; 0 is greedy (deterministic)."),
    top_k: int = typer.Option(0, min=0, help="Sample only among the K most likely tokens; 0 is off."),
    top_p: float = typer.Option(1.0, help="Sample only among the most likely tokens totalling P; 1 is off."),
    seed: Optional[int] = typer.Option(None, help="Random seed: the same seed gives the same output. Default: a fresh random seed."),
    stop: List[str] = typer.Option(
        [], "--stop", help="Stop when this text appears (not printed). Repeatable. Escapes like \\n are understood."
    ),
    device: str = typer.Option("auto", help="auto or cpu."),
    lookup: bool = typer.Option(
        LOOKUP_BY_DEFAULT,
        "--lookup/--no-lookup",
        help="Greedy only: draft tokens from earlier text in the context and verify them in one pass "
        "(prompt-lookup decoding; the output is the same).",
    ),
    draft_tokens: int = typer.Option(DEFAULT_DRAFT_TOKENS, min=1, help="Most tokens drafted per step with --lookup."),
) -> None:
    """Complete code and stream it to standard output."""
    from . import load

    stops = [s.encode("utf-8").decode("unicode_escape") if "\\" in s else s for s in stop]
    if fim is not None:
        if prompt is not None:
            raise SantacpuError("give either a PROMPT or --fim PREFIX_FILE SUFFIX_FILE, not both")
        prefix = read_text_file(fim[0], "prefix file")
        suffix: Optional[str] = read_text_file(fim[1], "suffix file")
    else:
        if prompt is None or prompt == "-":
            if sys.stdin.isatty():
                print("santacpu: reading the prompt from standard input (end it with Ctrl-D)", file=sys.stderr)
            prompt = decode_text(sys.stdin.buffer.read(), "standard input")
        prefix, suffix = prompt, None
        if not prefix:
            raise SantacpuError("the prompt is empty")

    loaded = load(_runnable_model(model or default_model(), revision, quant), revision=revision, device=device)
    pieces = loaded.complete_stream(
        prefix,
        suffix,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        stop=stops,
        fim_order=fim_order,
        lookup=lookup,
        draft_tokens=draft_tokens,
    )
    last = ""
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
        last = piece
    if sys.stdout.isatty() and not last.endswith("\n"):
        sys.stdout.write("\n")


def _runnable_model(model: str, revision: Optional[str], quant: str) -> str:
    """What to load: a quantized file as is; a full-precision model as its cached quantization."""
    from quantize.formats import FORMATS

    from .quantized import names_quantized_file

    if quant != "none" and quant not in FORMATS:
        raise SantacpuError(f"unknown --quant '{quant}' (choose none, {', '.join(FORMATS)})")
    if quant == "none" or names_quantized_file(model):
        return model
    from .quant_cache import quantized_for

    return str(quantized_for(model, revision, quant))


@app.command()
def quantize(
    src: str = typer.Argument(..., help="Full-precision source: checkpoint folder (either layout), weight file, or hub id."),
    out: Path = typer.Argument(..., help="The quantized file to write (.safetensors)."),
    qtype: str = typer.Option("q8_0", "--type", "-t", help="Type of the linear weights: q8_0 (8.5 bits/weight), q4_m (4.5, better) or q4_0 (4.5)."),
    calibration: Optional[str] = typer.Option(
        None,
        help="Importance-weighted rounding, calibrated on the code in this folder; 'stdlib' uses the running "
        "Python's standard library; 'none' turns it off. Default: stdlib for the 4-bit types (it lowers their "
        "KL divergence by 7-18% on a trained model), none for q8_0.",
        show_default=False,
    ),
    calibration_tokens: int = typer.Option(4096, min=64, help="Tokens of calibration text to run through the model."),
    keep: List[str] = typer.Option(
        [], "--keep", help="PATTERN=TYPE: store matching tensors (e.g. wte, h.*.mlp_c_proj_weight) as TYPE (f32, f16, q8_0, q6_0, q4_m, q4_0). Repeatable."
    ),
    upgrade_budget: float = typer.Option(
        5.0, min=0.0, help="4-bit types: percent of extra file size spent keeping the smallest linear weights at q8_0."
    ),
    revision: Optional[str] = typer.Option(None, help="Hub revision for a hub id."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
) -> None:
    """Convert a full-precision checkpoint to one self-contained block-quantized file."""
    from quantize.pipeline import run_quantize

    if calibration is None:
        calibration = "none" if qtype == "q8_0" else "stdlib"
    run_quantize(src, out, qtype=qtype, calibration=calibration, calibration_tokens=calibration_tokens,
                 keep=keep, upgrade_budget=upgrade_budget / 100, revision=revision, force=force)


@app.command()
def info(file: Path = typer.Argument(..., help="A santacpu quantized file.")) -> None:
    """Describe a quantized file: config, tensor types, size, bits per weight, provenance."""
    from .quantized import describe

    print(describe(file))


@app.command()
def perplexity(
    files: List[Path] = typer.Argument(..., help="Source files to score (UTF-8 text)."),
    model: str = typer.Option(None, "--model", "-m", help=f"The model to score. Default: ${MODEL_ENV} if set, else {DEFAULT_MODEL}.", show_default=False),
    reference: Optional[str] = typer.Option(None, help="A reference model (e.g. the full-precision checkpoint): adds delta perplexity, KL divergence and top-1 agreement."),
    ctx: int = typer.Option(256, help="Tokens per chunk; the second half of each chunk is scored (llama.cpp's convention)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results to this JSON file."),
) -> None:
    """Perplexity of a model over source files and, with --reference, what it loses against it."""
    from . import load
    from .evaluate import score

    texts = [read_text_file(path, "file") for path in files]
    name = model or default_model()
    scores = score(load(name), texts, ctx, load(reference) if reference else None)
    print(scores.table(name, reference))
    if json_out is not None:
        write_text_atomically(json_out, scores.to_json() + "\n")


@app.command()
def bench(
    model: str = typer.Argument(..., help="Quantized file, checkpoint folder, weight file, or hub id."),
    revision: Optional[str] = typer.Option(None, help="Hub revision for a hub id."),
    quant: str = typer.Option(
        "q8_0", help="For a full-precision model: bench its cached quantization to this type (made once, as "
        "`complete` does); 'none' benches it in full precision."
    ),
    prompt_tokens: int = typer.Option(512, min=1, help="Prompt length for the prefill speed."),
    decode_tokens: int = typer.Option(128, min=1, help="Tokens decoded (greedy, exactly this many) for the decode speed."),
    fim_tokens: int = typer.Option(1500, min=0, help="Prompt length of the FIM request timed to its first token; 0 skips it."),
    threads: int = typer.Option(0, min=0, help="Threads for Numba and BLAS; 0: all usable cores."),
    repeat: int = typer.Option(3, min=1, help="Runs of prefill, decode and FIM; the median is reported."),
    memory_context: int = typer.Option(0, min=0, help="Context filled by the peak-RSS run; 0: the model's whole context."),
    parts: str = typer.Option(",".join(PARTS), help="What to measure, comma-separated: " + ", ".join(PARTS) + "."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write every figure and the machine's facts to this JSON file."),
) -> None:
    """Measure speed (prefill, decode, FIM time to first token), load and compile times, and peak
    memory of a model; each measurement runs in a child process of its own. Progress on stderr,
    the table on stdout."""
    import json

    from .bench import BenchSettings, format_table, run_bench

    settings = BenchSettings(
        model=_runnable_model(model, revision, quant), prompt_tokens=prompt_tokens, decode_tokens=decode_tokens,
        fim_tokens=fim_tokens, threads=threads, repeat=repeat, memory_context=memory_context,
        parts=tuple(p.strip() for p in parts.split(",") if p.strip()), revision=revision,
    )
    report = run_bench(settings)
    print(format_table(report))
    if json_out is not None:
        write_text_atomically(json_out, json.dumps(report, indent=2) + "\n")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, SantacpuWarning):
        print(f"santacpu: warning: {message}", file=sys.stderr)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


_default_showwarning = warnings.showwarning


def main() -> None:
    warnings.showwarning = _show_warning
    try:
        app(standalone_mode=False)
    except SantacpuError as error:
        if _debug["on"]:
            raise
        print(f"santacpu: error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("santacpu: interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        sys.stderr.close()  # the reader went away (e.g. `| head`): nothing more to say
        sys.exit(1)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except typer.Abort:
        print("santacpu: aborted", file=sys.stderr)
        sys.exit(1)
    except Exception as problem:  # click's usage errors arrive here with standalone_mode=False
        if isinstance(problem, _usage_error_types()) and hasattr(problem, "show"):
            problem.show()
            sys.exit(problem.exit_code)
        raise


def _usage_error_types() -> tuple:
    """Usage-error classes: typer >= 0.2x bundles its own click (`typer._click`, whose errors
    subclass typer.TyperException and not click.ClickException); older typer raises click's own."""
    types: list[type] = [t for t in (getattr(typer, "TyperException", None),) if t is not None]
    try:
        import click  # not a dependency of newer typer: may be absent

        types.append(click.ClickException)
    except ImportError:
        pass
    return tuple(types)
