"""The `santacpu` command line: a thin typed layer over the Python API.

Every failure ends in one line on stderr and an exit code that says what kind it was (docs/cli.md
lists them): 0 done; 1 an error (`santacpu: error: ...`); 2 a usage error,
a command line the parser rejects (an unknown option, a value of the wrong type, outside the
range `--help` shows or not one of its choices, options that exclude each other, a value the model
shows to be wrong: `OptionValueError`; also one `santacpu: error:` line); 130 interrupted (Ctrl-C); 143 terminated
(SIGTERM). An interrupted or terminated command leaves no partial file behind. `--debug` shows an
error's traceback instead. Warnings are one line each (`santacpu: warning: ...`).

May import: anything in `santacpu` and `quantize` (the top layer: nothing imports it but `__main__`).
"""

from __future__ import annotations

import codecs
import errno
import io
import os
import re
import signal
import sys
import warnings
from pathlib import Path
from typing import List, Optional, Tuple

import typer

from . import arguments
from .atomic_file import check_writable, input_at, write_text_atomically
from .bench import PARTS
from .formats.blocks import FORMATS
from .errors import OptionValueError, SantacpuError, SantacpuWarning, os_problem
from .generation.lookup import DEFAULT_DRAFT_TOKENS
from .loading.source import DEFAULT_MODEL, default_model, hub_revision
from .settings import MODEL_ENV, Settings
from .generation.options import DEFAULT_MAX_NEW_TOKENS, GenerationOptions
from .generation.prompts import FIM_ORDERS
from .formats.quantized_file import DEFAULT_QUANT, names_quantized_file
from .model import DEVICES
from .harness.problems import BENCHMARKS
from .harness.settings import DEFAULT_EVAL_MAX_NEW_TOKENS, DEFAULT_TIMEOUT_S, MAX_SAMPLES, EvalSettings
from quantize.calibration import DEFAULT_CALIBRATION_TOKENS

__all__ = ["app", "main"]

# Plain help (rich_markup_mode=None): typer's rich panels print a `<bool>` type beside every flag.
# Path parameters say readable=False: santacpu reports an unreadable file itself, as an error (exit
# 1), where click would call it a usage error.
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Run the SantaCoder code model on the CPU: code completion, left-to-right and fill-in-the-middle.",
)
_debug = {"on": False}

DEFAULT_PERPLEXITY_CTX = 256
# What `quantize --type q4_m`'s default upgrade budget (1.5%) comes to on SantaCoder's shapes
# (docs/quantization.md says how it was counted).
DEFAULT_SANTACODER_BITS = "4.8"

# Exit codes (besides 0 and 1), as shells report signals: 128 + the signal's number.
EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 2, 130, 143


def _show_version(value: bool) -> None:
    if value:
        from . import __version__

        print(f"santacpu {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(
        False, "--version", callback=_show_version, is_eager=True, help="Show santacpu's version and exit."
    ),
) -> None:
    _debug["on"] = debug


# A value the command line can judge by itself (a choice, a list of numbers) is checked by a typer
# callback that raises typer.BadParameter: a usage error, exit 2, like a value of the wrong type.
def _one_of(*choices: str):
    """A typer callback that accepts only `choices` (a usage error otherwise, like a bad type)."""

    def check(value: Optional[str]) -> Optional[str]:
        if value is not None and value not in choices:
            raise typer.BadParameter(f"'{value}' is not one of {', '.join(choices)}")
        return value

    return check


def _each_one_of(*choices: str):
    """`_one_of` for a comma-separated list of choices (at least one)."""

    def check(value: str) -> str:
        items = [item.strip() for item in value.split(",") if item.strip()]
        if not items:
            raise typer.BadParameter(f"'{value}' names none of {', '.join(choices)}")
        for item in items:
            _one_of(*choices)(item)
        return value

    return check


def _counts(text: Optional[str]) -> Tuple[int, ...]:
    """'1,2,4' -> (1, 2, 4); () for None. Checked first by the option's callback, `_check_counts`."""
    return () if text is None else tuple(int(part) for part in text.split(","))


def _check_counts(value: Optional[str]) -> Optional[str]:
    """A typer callback for a comma-separated list of whole numbers >= 1."""
    try:
        valid = min(_counts(value), default=1) >= 1
    except ValueError:
        valid = False
    if not valid:
        raise typer.BadParameter(f"'{value}' is not a comma-separated list of whole numbers >= 1 (e.g. 1,2,4)")
    return value


def _probability(value: float) -> float:
    if not 0.0 < value <= 1.0:
        raise typer.BadParameter(f"{value} is not in the range 0 < P <= 1")
    return value


def _keep_rules(value: List[str]) -> List[str]:
    from quantize.policy import parse_keep

    try:
        parse_keep(list(value))
    except SantacpuError as problem:
        raise typer.BadParameter(str(problem)) from None
    return value


def _output_file(value: Optional[str]) -> Optional[Path]:
    """An output file's path, checked as given: Path() would drop a trailing '/' (a folder's path,
    written as a file) and make '' the current folder."""
    if value is None:
        return None
    if not value.strip():
        raise typer.BadParameter("the file name is empty")
    if value.endswith(("/", os.sep)):
        raise typer.BadParameter(f"'{value}' ends with '/', as a folder's path does: give a file name")
    return Path(value)


def _temperature(value: float) -> float:
    if not 0.0 <= value < float("inf"):  # (typer's min=0 lets inf through)
        raise typer.BadParameter(f"{value} is not a finite number >= 0 (0 is greedy)")
    return value


def _positive(value: Optional[float]) -> Optional[float]:
    if value is not None and not 0.0 < value < float("inf"):
        raise typer.BadParameter(f"{value} is not a positive number")
    return value


# Text read from a file or standard input (a prompt, FIM halves, an API key, a perplexity text):
# far beyond any context's worth (2,048 tokens of at most 128 characters), and a bound on what
# /dev/zero or a runaway pipe can make this process hold.
MAX_TEXT_BYTES = 64 << 20


def _read_bounded(stream, what: str) -> bytes:
    raw = stream.read(MAX_TEXT_BYTES + 1)
    if len(raw) > MAX_TEXT_BYTES:
        raise SantacpuError(f"{what} is over {MAX_TEXT_BYTES >> 20} MiB")
    return raw


def read_text_file(path: Path, what: str) -> str:
    try:
        with open(path, "rb") as file:
            raw = _read_bounded(file, f"{what} {path}")
    except FileNotFoundError:
        raise SantacpuError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise SantacpuError(f"{what} {path} is a folder, not a file") from None
    except OSError as problem:
        raise SantacpuError(f"cannot read {what} {path}: {os_problem(problem)}") from None
    return decode_text(raw, f"{what} {path}")


def decode_text(raw: bytes, what: str) -> str:
    if b"\0" in raw:
        raise SantacpuError(f"{what} looks like a binary file (it contains NUL bytes), not source text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as bad:
        raise SantacpuError(
            f"{what} is not UTF-8 text (byte 0x{raw[bad.start]:02x} at offset {bad.start}); convert it to UTF-8 first"
        ) from None


# Python's string escapes; a backslash that starts none of them is matched by the last branch.
_ESCAPE = re.compile(r"\\(?:x[0-9A-Fa-f]{2}|u[0-9A-Fa-f]{4}|U[0-9A-Fa-f]{8}|N\{[^}]*\}|[0-7]{1,3}|[\\'\"abfnrtv])|\\")


def decode_escapes(text: str, option: str = "--stop") -> str:
    """Python-style escapes (\\n, \\t, \\\\, \\x41, \\u00e9, ...) in `text` decoded; every other
    character, non-ASCII included, kept as it is."""

    def one(match: re.Match) -> str:
        escape = match.group(0)
        try:
            if escape != "\\":
                return codecs.decode(escape, "unicode_escape")
        except (UnicodeDecodeError, UnicodeEncodeError):  # \N{name} with an unknown name, \U past U+10FFFF
            pass
        shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)  # one line, as typed
        bad = text[match.start() : match.start() + 2]
        raise SantacpuError(
            f"{option} '{shown}': {bad} at position {match.start()} is not an escape (known: \\n \\t \\r "
            "\\\\ \\' \\\" \\xHH \\uHHHH \\UHHHHHHHH \\N{name}, octal; write a backslash as \\\\)"
        )

    return _ESCAPE.sub(one, text)


# --model and --revision of the commands that run a model (one OptionInfo serves several commands).
DEVICE_OPTION = typer.Option(
    "auto", callback=_one_of(*DEVICES), help="auto (a CUDA GPU where one is usable, else the CPU), cpu or cuda."
)
QUANT_CHOICES = ("none", *FORMATS)
MODEL_OPTION = typer.Option(
    None,
    "--model",
    "-m",
    help=f"Quantized file, checkpoint folder, weight file, or hub id. Default: ${MODEL_ENV} if set, else {DEFAULT_MODEL}.",
    show_default=False,
)
REVISION_OPTION = typer.Option(None, help="Hub revision (branch, tag or commit) for a hub id.")
QUANT_OPTION = typer.Option(
    None,
    callback=_one_of(*QUANT_CHOICES),
    help=f"For a full-precision model: run its cached quantization to this type (made once, as `complete` "
    f"does); 'none' runs it in full precision. Default: {DEFAULT_QUANT}.",
    show_default=False,
)


@app.command()
def complete(
    prompt: Optional[str] = typer.Argument(
        None, help="The text to continue. '-' or nothing: read it from standard input.", show_default=False
    ),
    model: str = MODEL_OPTION,
    revision: Optional[str] = REVISION_OPTION,
    quant: Optional[str] = typer.Option(
        None,
        callback=_one_of(*QUANT_CHOICES),
        help=f"For a full-precision model: quantize it once to this type into the cache folder "
        f"($SANTACPU_CACHE, else ~/.cache/santacpu) and run that; 'none' runs it in full precision. "
        f"Default: {DEFAULT_QUANT}.",
        show_default=False,
    ),
    fim: Optional[Tuple[Path, Path]] = typer.Option(
        None,
        "--fim",
        metavar="PREFIX_FILE SUFFIX_FILE",
        readable=False,
        help="Fill in the middle between the text of two files; only the middle is printed.",
    ),
    fim_order: str = typer.Option(
        "psm", callback=_one_of(*FIM_ORDERS), help="FIM prompt order: psm (prefix first) or spm (suffix first)."
    ),
    max_new_tokens: int = typer.Option(DEFAULT_MAX_NEW_TOKENS, min=0, help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, callback=_temperature, help="Sampling temperature, a finite number >= 0; 0 is greedy (deterministic)."),
    top_k: int = typer.Option(0, min=0, help="Sample only among the K most likely tokens; 0 is off."),
    top_p: float = typer.Option(
        1.0, callback=_probability, help="Sample only among the most likely tokens totalling P, 0 < P <= 1; 1 is off."
    ),
    seed: Optional[int] = typer.Option(
        None, min=0, help="Random seed: the same seed gives the same output. Default: a fresh random seed."
    ),
    stop: List[str] = typer.Option(
        [], "--stop", metavar="TEXT",
        help="Stop when this text appears (not printed). Repeatable. Escapes like \\n are understood.",
    ),
    device: str = DEVICE_OPTION,
    verbose: bool = typer.Option(
        False, "--verbose", "-v",
        help="Say on standard error where the model runs and on which kernels (e.g. 'cpu: integer kernels for avx2').",
    ),
    lookup: Optional[bool] = typer.Option(
        None,
        "--lookup/--no-lookup",
        help="Greedy only: draft tokens from earlier text in the context and verify them in one pass "
        "(prompt-lookup decoding). Default: on for quantized files on CPUs with integer kernels (x86 AVX2, "
        "ARM64 dotprod), where the output is exactly plain decoding's; off for full-precision weights, where "
        "it can differ in near-ties.",
        show_default=False,
    ),
    draft_tokens: int = typer.Option(DEFAULT_DRAFT_TOKENS, min=1, help="Most tokens drafted per step with --lookup."),
) -> None:
    """Complete code and stream it to standard output, ending with a newline (a --fim middle
    written to a pipe or file is printed exactly, without one)."""
    from . import load

    options = GenerationOptions.of(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        stop=tuple(decode_escapes(s) for s in stop),
        fim_order=fim_order,
        lookup=lookup,
        draft_tokens=draft_tokens,
    )
    prefix, suffix = _prompt_texts(prompt, fim)
    for unused in _unused_options(temperature, top_k, top_p, seed, fim, fim_order, lookup, draft_tokens):
        warnings.warn(unused, SantacpuWarning)
    loaded = load(model or default_model(), revision=revision, quant=quant, device=device)
    if verbose:
        print(f"santacpu: running on {loaded.device}", file=sys.stderr)
    room = loaded.config.n_positions - len(loaded.prompt_ids(prefix, suffix, options))
    if options.max_new_tokens > room:
        warnings.warn(
            f"at most {room} new token{'s' * (room != 1)}, not {options.max_new_tokens}: the model's context holds "
            f"{loaded.config.n_positions} tokens, prompt included", SantacpuWarning,
        )
    last = ""
    for piece in loaded.complete_stream(prefix, suffix, options):
        sys.stdout.write(piece)
        sys.stdout.flush()
        last = piece or last
    # Text ends with a newline; a FIM middle sent to a pipe or file is left exact, to be spliced.
    if not last.endswith("\n") and (fim is None or sys.stdout.isatty()):
        sys.stdout.write("\n")


def _prompt_texts(prompt: Optional[str], fim: Optional[Tuple[Path, Path]]) -> Tuple[str, Optional[str]]:
    """(prefix, suffix or None): the two --fim files, else PROMPT or standard input."""
    if fim is not None:
        if prompt is not None:
            raise OptionValueError("give either a PROMPT or --fim PREFIX_FILE SUFFIX_FILE, not both")
        return read_text_file(fim[0], "prefix file"), read_text_file(fim[1], "suffix file")
    if prompt is None or prompt == "-":
        if sys.stdin.isatty():
            print("santacpu: reading the prompt from standard input (end it with Ctrl-D)", file=sys.stderr)
        prompt = decode_text(_read_bounded(sys.stdin.buffer, "standard input"), "standard input")
    if not prompt:
        raise SantacpuError("the prompt is empty")
    return arguments.text(prompt, "the prompt"), None  # a non-UTF-8 argument is said now, before loading


def _type_help() -> str:
    from .formats.blocks import FORMATS

    types = ", ".join(f"{name} ({fmt.bits_per_weight:g} bits/weight)" for name, fmt in FORMATS.items())
    return f"Type of the linear weights: {types}; q4_m is the better 4-bit type."


@app.command()
def quantize(
    src: str = typer.Argument(..., help="Full-precision source: checkpoint folder (either layout), weight file, or hub id."),
    out: str = typer.Argument(..., callback=_output_file, help="The quantized file to write (.safetensors)."),
    qtype: str = typer.Option("q8_0", "--type", "-t", metavar="TYPE", callback=_one_of(*FORMATS), help=_type_help()),
    calibration: Optional[str] = typer.Option(
        None,
        help="Importance-weighted rounding, calibrated on the code in this folder; 'stdlib' uses the running "
        "Python's standard library; 'none' turns it off. Default: stdlib for the 4-bit types (it lowers their "
        "KL divergence by 7-18% on a trained model), none for q8_0 and q6_0.",
        show_default=False,
    ),
    calibration_tokens: int = typer.Option(
        DEFAULT_CALIBRATION_TOKENS, min=64, help="Tokens of calibration text to run through the model."
    ),
    keep: List[str] = typer.Option(
        [], "--keep", metavar="PATTERN=TYPE", callback=_keep_rules,
        help=f"Store matching tensors (e.g. wte, h.*.mlp_c_proj_weight) as TYPE ({', '.join(('f32', 'f16', *FORMATS))}). "
        "Repeatable.",
    ),
    upgrade_budget: Optional[float] = typer.Option(
        None, min=0.0, show_default=False,
        help="4-bit types: percent of extra file size spent raising linear weights to q6_0 or q8_0, and the most "
        "used tokens' embedding rows to q8_0, where calibration measures the most KL divergence cut per byte "
        "(linear weights by role without calibration); 0 keeps every linear weight 4-bit. Default 1.5: about "
        f"{DEFAULT_SANTACODER_BITS} bits per weight on SantaCoder (as --bits-per-weight counts them; 4.74 with no "
        "upgrades), and q4_m "
        "files no larger than llama.cpp's Q4_K_S on the trained fixtures (docs/quantization.md).",
    ),
    bits_per_weight: Optional[float] = typer.Option(
        None, callback=_positive, metavar="BITS",
        help="4-bit types, instead of --upgrade-budget: spend the upgrades up to this many bits per weight over "
        "the model's matrices, as `info` and the report count them (every 2-D tensor's stored bytes, block "
        "scales, the position embedding's float16 and the raised rows' ids included, over its weights; "
        "LayerNorm parameters and biases left out). Below the file without upgrades is an error that says "
        "the least this model takes.",
    ),
    max_size: Optional[float] = typer.Option(
        None, callback=_positive, metavar="MB",
        help="4-bit types, instead of --upgrade-budget: spend the upgrades up to a file of at most this many "
        "MB (10^6 bytes), the whole file (header, tokenizer and metadata included).",
    ),
    revision: Optional[str] = typer.Option(None, help="Hub revision for a hub id."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
) -> None:
    """Convert a full-precision checkpoint to one self-contained block-quantized file."""
    from quantize.pipeline import run_quantize

    run_quantize(src, out, qtype=qtype, calibration=calibration, calibration_tokens=calibration_tokens, keep=keep,
                 upgrade_budget=None if upgrade_budget is None else upgrade_budget / 100,
                 revision=hub_revision(src, revision), force=force, bits_per_weight=bits_per_weight, max_size=max_size)


@app.command()
def info(file: Path = typer.Argument(..., readable=False, help="A santacpu quantized file.")) -> None:
    """Describe a quantized file: config, tensor types, size, bits per weight, provenance."""
    from .loading.quantized import describe

    print(describe(file))


def _unused_options(temperature, top_k, top_p, seed, fim, fim_order, lookup, draft_tokens) -> list[str]:
    """What `complete` was given that cannot change its output, each in words (as an ignored
    --quant or --revision is said)."""
    unused = []
    sampling = [name for name, given in (("--top-k", top_k != 0), ("--top-p", top_p != 1.0), ("--seed", seed is not None))
                if given]
    if temperature == 0 and sampling:
        unused.append(f"{', '.join(sampling)} {'is' if len(sampling) == 1 else 'are'} ignored: decoding is greedy "
                      "(give --temperature above 0 to sample)")
    if lookup and temperature > 0:
        unused.append("--lookup is ignored: prompt lookup drafts only under greedy decoding (--temperature 0)")
    if fim is None and fim_order != "psm":
        unused.append("--fim-order is ignored without --fim")
    if draft_tokens != DEFAULT_DRAFT_TOKENS and (lookup is False or temperature > 0):
        unused.append("--draft-tokens is ignored: no prompt lookup runs (--no-lookup, or sampling)")
    return unused


def _refuse_replacing_inputs(out: Path, option: str, inputs: list) -> None:
    """`out` must not be a file the command reads (a scored text, a model file or one in a model's
    folder): --force would replace it."""
    read = input_at(out, [given for given in inputs if given is not None])
    if read is not None:
        raise OptionValueError(f"{option} {out} is a file this command reads ({read}): write elsewhere")


@app.command()
def perplexity(
    files: List[Path] = typer.Argument(..., readable=False, help="Source files to score (UTF-8 text)."),
    model: str = typer.Option(None, "--model", "-m", help=f"The model to score. Default: ${MODEL_ENV} if set, else {DEFAULT_MODEL}.", show_default=False),
    reference: Optional[str] = typer.Option(None, help="A reference model (e.g. the full-precision checkpoint): adds delta perplexity, KL divergence and top-1 agreement."),
    ctx: Optional[int] = typer.Option(
        None, min=8,
        help=f"Tokens per chunk, at most the model's context; the second half of each chunk is scored (llama.cpp's "
        f"convention). Default: {DEFAULT_PERPLEXITY_CTX}, or the model's context if that is shorter.",
        show_default=False,
    ),
    quant: Optional[str] = typer.Option(
        None, callback=_one_of(*QUANT_CHOICES),
        help="For a full-precision --model: score its cached quantization to this type (made once, as `complete` "
        f"does); 'none' scores it in full precision. Default: {DEFAULT_QUANT}. The reference always runs in full "
        "precision.",
        show_default=False,
    ),
    json_out: Optional[str] = typer.Option(None, "--json", callback=_output_file, help="Also write the results to this JSON file."),
    force: bool = typer.Option(False, "--force", help="Replace the --json file if it exists."),
) -> None:
    """Perplexity of a model over source files and, with --reference, what it loses against it."""
    from . import load
    from .evaluate import score

    name = model or default_model()
    if json_out is not None:
        check_writable(json_out, "--json", overwrite=force)  # now, not after scoring
        _refuse_replacing_inputs(json_out, "--json", [*files, name, reference])
    texts = [read_text_file(path, "file") for path in files]
    loaded = load(name, quant=quant)
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
    print(scores.table(name, reference))
    if json_out is not None:
        write_text_atomically(json_out, scores.to_json() + "\n", overwrite=force)


@app.command()
def bench(
    model: str = typer.Argument(..., help="Quantized file, checkpoint folder, weight file, or hub id."),
    revision: Optional[str] = typer.Option(None, help="Hub revision for a hub id."),
    quant: Optional[str] = typer.Option(
        None, callback=_one_of(*QUANT_CHOICES),
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
        None, min=0, help="Prompt length of the FIM request timed to its first token; 0 skips it. Default: 1500, "
        "less for a model with a short context.",
        show_default=False,
    ),
    threads: int = typer.Option(0, min=0, max=1024, help="Threads for Numba and BLAS; 0: all usable cores."),
    repeat: int = typer.Option(3, min=1, help="Runs of prefill, decode and FIM; the median is reported."),
    memory_context: int = typer.Option(0, min=0, help="Context filled by the peak-RSS run; 0: the model's whole context."),
    parts: str = typer.Option(
        ",".join(PARTS), callback=_each_one_of(*PARTS), help="What to measure, comma-separated: " + ", ".join(PARTS) + "."
    ),
    batch: Optional[str] = typer.Option(
        None, metavar="SIZES", callback=_check_counts, help="Also measure batched decoding at these batch sizes, comma-separated (e.g. 1,2,4,8,16): "
        "aggregate and per-sequence decode tok/s of B greedy sequences, 64-token prompts, 32 tokens each. Default: off.",
        show_default=False,
    ),
    json_out: Optional[str] = typer.Option(
        None, "--json", callback=_output_file, help="Also write every figure and the machine's facts to this JSON file."
    ),
    force: bool = typer.Option(False, "--force", help="Replace the --json file if it exists."),
    device: str = DEVICE_OPTION,
) -> None:
    """Measure speed (prefill, decode, FIM time to first token), load and compile times, and peak
    memory of a model; each measurement runs in a child process of its own. Progress on stderr,
    the table on stdout."""
    import json

    from .bench import BenchSettings, format_table, run_bench

    if json_out is not None:
        check_writable(json_out, "--json", overwrite=force)  # now, not after minutes of measuring
        _refuse_replacing_inputs(json_out, "--json", [model])
    settings = BenchSettings(
        model=model, quant=quant, prompt_tokens=prompt_tokens, decode_tokens=decode_tokens,
        fim_tokens=fim_tokens, threads=threads, repeat=repeat, memory_context=memory_context,
        parts=tuple(p.strip() for p in parts.split(",") if p.strip()), revision=revision,
        batch=_counts(batch), device=device,
    )
    report = run_bench(settings)
    print(format_table(report))
    for note in report["warnings"]:
        warnings.warn(note, SantacpuWarning)
    if json_out is not None:
        write_text_atomically(json_out, json.dumps(report, indent=2) + "\n", overwrite=force)


@app.command()
def serve(
    model: str = MODEL_OPTION,
    revision: Optional[str] = REVISION_OPTION,
    quant: Optional[str] = QUANT_OPTION,
    host: str = typer.Option(
        "127.0.0.1",
        help="Address to listen on (127.0.0.1: this machine only, answering Host names of it and localhost; "
        "0.0.0.0: every address and Host name).",
    ),
    port: int = typer.Option(8012, min=1, max=65535, help="Port to listen on (llama.vim's default: 8012)."),
    api_key: Optional[str] = typer.Option(
        None,
        help="Require 'Authorization: Bearer KEY' on every endpoint but /health (a command line is visible to every "
        "local user: prefer --api-key-file or $SANTACPU_API_KEY). Default: none.",
        show_default=False,
    ),
    api_key_file: Optional[Path] = typer.Option(
        None, readable=False, metavar="FILE", help="Read the API key from this file.", show_default=False
    ),
    max_batch: int = typer.Option(8, min=1, max=256, help="Sequences generated at once; more wait in the queue."),
    max_queue: int = typer.Option(
        64, min=0, help="Sequences that may wait beyond the batch; beyond, requests get 503 with Retry-After "
        "(0: only what the batch has room for runs)."
    ),
    fim_order: str = typer.Option(
        "spm", callback=_one_of(*FIM_ORDERS),
        help="FIM prompt order: spm (suffix first: typing at the cursor only appends to the prompt) or psm.",
    ),
    fim_budget: Optional[int] = typer.Option(
        None, min=16, help="Most prompt tokens of a fill-in-the-middle request: a longer prefix loses its start, a "
        "longer suffix its end (a cold request computes at most this many). Default: the model's context.",
        show_default=False,
    ),
) -> None:
    """Serve completions over HTTP: llama.cpp's /infill and /completion, OpenAI's /v1/completions
    (with suffix), Ollama's /api/generate (with suffix), /api/show, /api/tags; /health, /tokenize,
    /detokenize, /props, /v1/models. Needs the 'serve' extra."""
    from . import load
    from .server import SERVE_EXTRA_HINT, run_server
    from .server.app import ServerSettings

    try:
        import uvicorn  # noqa: F401  (checked before a first-use quantization that may take minutes)
    except ImportError:
        raise SantacpuError(SERVE_EXTRA_HINT) from None
    name = model or default_model()
    settings = ServerSettings(
        model_name=name, api_key=_api_key(api_key, api_key_file), max_batch=max_batch, max_queue=max_queue,
        fim_order=fim_order, fim_budget=fim_budget,
    )

    def load_model():  # after the server listens: a first-use quantization runs while /health says "loading"
        return load(name, revision=revision, quant=quant)

    run_server(settings, load_model, host, port)


def _api_key(given: Optional[str], key_file: Optional[Path]) -> Optional[str]:
    """The server's key: --api-key, else --api-key-file's text, else $SANTACPU_API_KEY, else none."""
    if given is not None and key_file is not None:
        raise OptionValueError("give --api-key or --api-key-file, not both")
    # An empty key (`--api-key "$KEY"` with KEY unset) served everyone without a word; one with
    # spaces at its ends no client could send (HTTP strips them from the header).
    if given is not None and (not given.strip() or given != given.strip()):
        raise OptionValueError("--api-key is empty or has spaces at its ends: give the key itself, or leave "
                               "the option out to serve without one")
    if key_file is not None:
        given = read_text_file(key_file, "API key file").strip()
        if not given or "\n" in given:
            raise SantacpuError(f"API key file {key_file} must hold the key on one line")
    return given or Settings.from_environment().api_key


@app.command("random-checkpoint")
def random_checkpoint(
    out: Path = typer.Argument(
        ..., readable=False, help="The folder to write (made if missing): config.json, model.safetensors, tokenizer.json."
    ),
    size: str = typer.Option(
        "tiny", callback=_one_of("tiny", "micro", "trained", "full"),
        help="tiny (a 64-token context, 2 narrow layers: 13 MB, seconds), micro, trained (the test fixture's "
        "shapes), or full (SantaCoder's own shapes: 1.1 B parameters, 4.5 GB in float32).",
    ),
    layout: str = typer.Option(
        "gpt_bigcode", callback=_one_of("gpt_bigcode", "legacy"),
        help="gpt_bigcode, or legacy (bigcode/santacoder's own layout).",
    ),
    dtype: str = typer.Option("float32", callback=_one_of("float32", "float16"), help="float32 or float16."),
    seed: int = typer.Option(0, min=0, help="The same seed gives the same weights."),
    multi_head: bool = typer.Option(False, "--multi-head", help="One K/V head per query head instead of multi-query."),
    force: bool = typer.Option(
        False, "--force", help="Write into OUT even if it is not empty (its config.json, model.safetensors and "
        "tokenizer.json are replaced)."
    ),
) -> None:
    """Write a SantaCoder-shaped checkpoint with random weights: its text is nonsense, but every
    command runs on it without the real model or a network. OUT must be new or empty (without --force)."""
    from .loading.random_checkpoint import write_checkpoint

    written = write_checkpoint(out, size=size, layout=layout, dtype=dtype, seed=seed, multi_query=not multi_head,
                               force=force)
    print(f"santacpu: wrote {written}; try: santacpu complete \"def f():\" --model {written}", file=sys.stderr)


eval_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Task-level evaluation: run a benchmark's programs on the model's completions.",
)
app.add_typer(eval_app, name="eval")


@eval_app.command("humaneval-infill")
def eval_humaneval_infill(
    benchmark: str = typer.Option(
        "single-line", callback=_one_of(*BENCHMARKS), help=f"One of {', '.join(BENCHMARKS)} (bundled data)."
    ),
    model: str = MODEL_OPTION,
    revision: Optional[str] = REVISION_OPTION,
    quant: Optional[str] = QUANT_OPTION,
    samples: int = typer.Option(
        1, min=1, max=MAX_SAMPLES,
        help="Completions of each problem (the n of pass@k; the reference harness uses 200 for pass@100).",
    ),
    k: Optional[str] = typer.Option(
        None, callback=_check_counts,
        help="The k of pass@k, comma-separated, each at most --samples. Default: those of 1,10,100 that are.",
        show_default=False,
    ),
    temperature: float = typer.Option(0.0, callback=_temperature, help="Sampling temperature, a finite number >= 0; 0 is greedy (then --samples 1)."),
    top_p: float = typer.Option(1.0, callback=_probability, help="Nucleus sampling, 0 < P <= 1; 1 is off."),
    seed: int = typer.Option(0, min=0, help="Base seed: a problem's samples are seeded from it and its task id."),
    max_new_tokens: int = typer.Option(DEFAULT_EVAL_MAX_NEW_TOKENS, min=1, help="Most tokens of each completion."),
    fim_order: str = typer.Option("psm", callback=_one_of(*FIM_ORDERS), help="FIM prompt order: psm or spm."),
    limit: Optional[int] = typer.Option(None, min=1, help="Only the first N problems. Default: all.", show_default=False),
    timeout: float = typer.Option(DEFAULT_TIMEOUT_S, min=0.1, max=3600, help="Seconds each program may run (wall clock)."),
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
    ray: bool = typer.Option(False, "--ray", help="Run on a Ray cluster started for the run (the 'ray' extra)."),
    ray_address: Optional[str] = typer.Option(
        None, help="Run on the existing Ray cluster at this address (implies --ray).", show_default=False
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

    from .harness.ray_pipeline import RayPlacement, require_ray
    from .harness.report import report_lines
    from .harness.run import evaluate, evaluate_against
    from .model import resolve_device

    settings = EvalSettings(
        benchmark=benchmark, samples=samples, ks=_counts(k) or None, temperature=temperature, top_p=top_p, seed=seed,
        max_new_tokens=max_new_tokens, fim_order=fim_order, limit=limit, timeout_s=timeout, max_batch=max_batch,
        exec_workers=exec_workers,
    ).checked()
    placement = RayPlacement(ray_address, workers, threads_per_worker) if ray or ray_address else None
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


cache_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="The quantization cache: the files first use writes (a full-precision model quantized once) and "
    "the calibrations `quantize` keeps for its next runs ($SANTACPU_CACHE, else ~/.cache/santacpu).",
)
app.add_typer(cache_app, name="cache")


@cache_app.command("list")
def cache_list() -> None:
    """List the cached quantizations, and the calibrations `quantize` kept: size, type, when made, the
    source each was made from."""
    from quantize.cache import cache_dir, cache_entries

    entries = cache_entries()
    folder = cache_dir()
    if not entries:
        print(f"the quantization cache {folder} is empty")
        return
    print(f"{folder}: {len(entries)} file{'s' * (len(entries) > 1)}, {sum(e.bytes for e in entries) / 1e6:,.1f} MB")
    rows = [("MB", "type", "made", "source", "file")] + [
        (f"{e.bytes / 1e6:,.1f}", e.qtype, e.created, e.source + (f" ({e.problem})" if e.problem else ""), e.path.name)
        for e in entries
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join([row[0].rjust(widths[0]), *(cell.ljust(w) for cell, w in zip(row[1:4], widths[1:])), row[4]]))


@cache_app.command("clear")
def cache_clear(
    model: Optional[str] = typer.Argument(
        None, metavar="MODEL", help="Remove only what was made from this model (folder or hub id). Default: "
        "everything.", show_default=False,
    ),
    revision: Optional[str] = REVISION_OPTION,
) -> None:
    """Remove cached quantizations (they are made again at the next first use) and kept calibrations."""
    from quantize.cache import cache_dir, clear_cache

    removed = clear_cache(model, revision)
    what = f" made from {model}" if model else ""
    print(f"removed {len(removed)} file{'s' * (len(removed) != 1)}{what} from {cache_dir()}, "
          f"{sum(e.bytes for e in removed) / 1e6:,.1f} MB")


# ----------------------------------------------------------------------------------------------
# The entry point: every outcome becomes one line on stderr and its exit code.


class Terminated(BaseException):
    """Raised by the SIGTERM handler. A BaseException, like KeyboardInterrupt, so that it unwinds
    through every `finally` and cleanup (a conversion's temporary file is removed)."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, SantacpuWarning):
        print(f"santacpu: warning: {message}", file=sys.stderr)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


_default_showwarning = warnings.showwarning


def main(argv: Optional[List[str]] = None) -> None:
    """Run the command line (`argv`: the arguments after the program name; default sys.argv[1:])."""
    warnings.showwarning = _show_warning
    signal.signal(signal.SIGTERM, _raise_terminated)
    if sys.stderr is None:  # started with standard error closed (`2>&-`): print() would write messages to stdout
        sys.stderr = open(os.devnull, "w", encoding="utf-8")
    if sys.stdout is None:  # started with standard output closed (`>&-`): writing it is the error
        sys.stdout = _ClosedOutput()
    elif sys.stdout is sys.__stdout__ and type(sys.stdout) is io.TextIOWrapper:  # (not a test's capture)
        sys.stdout = _StandardOutput.around(sys.stdout)
    sys.exit(_run(argv))


def _standard_output_error(problem: OSError) -> OSError:
    return OSError(problem.errno, os.strerror(problem.errno) if problem.errno else str(problem), "standard output")


class _ClosedOutput(io.TextIOBase):
    """Standard output when the process was started without one: every write fails, naming it."""

    def write(self, text: str) -> int:
        raise OSError(errno.EBADF, os.strerror(errno.EBADF), "standard output")

    def isatty(self) -> bool:
        return False


class _StandardOutput(io.TextIOWrapper):
    """Standard output whose write errors (a full disk, `> /dev/full`) name it, as file errors name
    their file; a closed pipe stays BrokenPipeError (the reader went away: nothing to say). Text its
    encoding cannot hold (code in a script an ASCII or Latin-1 terminal lacks) is written as
    backslash escapes, not an error after half the completion."""

    @classmethod
    def around(cls, stream: io.TextIOWrapper) -> "_StandardOutput":
        stream.flush()
        errors = "backslashreplace" if stream.errors == "strict" else stream.errors
        return cls(stream.buffer, encoding=stream.encoding, errors=errors,
                   line_buffering=stream.line_buffering, write_through=stream.write_through)

    def write(self, text: str) -> int:
        try:
            return super().write(text)
        except BrokenPipeError:
            raise
        except OSError as problem:
            raise _standard_output_error(problem) from None

    def flush(self) -> None:
        try:
            super().flush()
        except BrokenPipeError:
            raise
        except OSError as problem:
            raise _standard_output_error(problem) from None


def _run(argv: Optional[List[str]]) -> int:
    """The exit code of one command, its failure printed as one line."""
    try:
        # typer turns Ctrl-C into its Exit(130), returned here (standalone_mode=False).
        code = app(args=argv, prog_name="santacpu", standalone_mode=False)
        sys.stdout.flush()  # a full disk's error while the command can still report it
    except SantacpuError as error:
        if _debug["on"]:
            raise
        return _fail(str(error), EXIT_USAGE if isinstance(error, OptionValueError) else 1)
    except KeyboardInterrupt:  # before typer's own handling starts
        code = EXIT_INTERRUPTED
    except Terminated:
        print("santacpu: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except BrokenPipeError:
        sys.stderr.close()  # the reader went away (e.g. `| head`): nothing more to say
        return 1
    except typer.Exit as done:
        code = done.exit_code
    except typer.Abort as abort:  # older typer: Ctrl-C arrives as click's Abort
        if not isinstance(abort.__context__, KeyboardInterrupt):
            return _fail("aborted")
        code = EXIT_INTERRUPTED
    except OSError as problem:  # the environment (permissions, a full disk) where no message was given
        if _debug["on"]:
            raise
        where = f"{problem.filename}: " if problem.filename else ""
        return _fail(f"{where}{os_problem(problem)}")
    except MemoryError:  # sizes in a hostile config.json, a file beyond this machine's memory
        if _debug["on"]:
            raise
        return _fail("out of memory (the model, or a size in its config.json, needs more than this machine has)")
    except Exception as problem:  # click's usage errors arrive here with standalone_mode=False
        if not isinstance(problem, _usage_error_types()):
            raise
        if type(problem).__name__ == "NoArgsIsHelpError":  # bare `santacpu`: the help itself
            problem.show()
            return problem.exit_code
        return _fail(_usage_line(problem), EXIT_USAGE)
    if code == EXIT_INTERRUPTED:
        print("santacpu: interrupted", file=sys.stderr)
    return code if isinstance(code, int) else 0


def _fail(message: str, code: int = 1) -> int:
    print(f"santacpu: error: {message}", file=sys.stderr)
    return code


def _usage_line(problem) -> str:
    """click's usage error as one line, with where to find the command's usage."""
    text = " ".join(problem.format_message().split())
    context = getattr(problem, "ctx", None)
    return text + (f" (see '{context.command_path} --help')" if context is not None else "")


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
