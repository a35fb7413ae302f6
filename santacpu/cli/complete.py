"""`santacpu complete`: a prompt (an argument, standard input, or two --fim files) completed and
streamed to standard output.

May import: `santacpu.model` (through the package's `load`), the foundation layers below it, and
this package's `options` and `text_input`.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import List, Optional, Tuple

import typer

from .. import arguments
from ..errors import OptionValueError, SantacpuError, SantacpuWarning
from ..generation.lookup import DEFAULT_DRAFT_TOKENS
from ..generation.options import DEFAULT_MAX_NEW_TOKENS, GenerationOptions
from ..generation.prompts import FIM_ORDERS
from ..formats.quantized_file import DEFAULT_QUANT
from ..loading.source import default_model
from .options import (
    DEVICE_OPTION, MODEL_OPTION, QUANT_CHOICES, REVISION_OPTION, check_probability, check_temperature, choices, one_of,
)
from .text_input import decode_escapes, decode_text, read_bounded, read_text_file


def complete(
    prompt: Optional[str] = typer.Argument(
        None, metavar="PROMPT", help="The text to continue. '-' or nothing: read it from standard input.", show_default=False
    ),
    model: str = MODEL_OPTION,
    revision: Optional[str] = REVISION_OPTION,
    quant: Optional[str] = typer.Option(
        None,
        callback=one_of(*QUANT_CHOICES), metavar=choices(*QUANT_CHOICES),
        help=f"For a full-precision model: quantize it once to this type into the cache folder "
        f"($SANTACPU_CACHE, else $XDG_CACHE_HOME/santacpu, else ~/.cache/santacpu) and run that; 'none' runs it in full precision. "
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
        "psm", callback=one_of(*FIM_ORDERS), metavar=choices(*FIM_ORDERS), help="FIM prompt order: psm (prefix first) or spm (suffix first)."
    ),
    max_new_tokens: int = typer.Option(DEFAULT_MAX_NEW_TOKENS, min=0, help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, callback=check_temperature, help="Sampling temperature, a finite number >= 0; 0 is greedy (deterministic)."),
    top_k: int = typer.Option(0, min=0, help="Sample only among the K most likely tokens; 0 is off."),
    top_p: float = typer.Option(
        1.0, callback=check_probability, help="Sample only among the most likely tokens totalling P, 0 < P <= 1; 1 is off."
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
    from .. import load

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
    if lookup is None and temperature == 0 and draft_tokens != DEFAULT_DRAFT_TOKENS and not loaded.token_invariant:
        warnings.warn("--draft-tokens is ignored: prompt lookup is off by default for this model (full-precision "
                      "weights, or a CPU without integer kernels); give --lookup to turn it on", SantacpuWarning)
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
        prompt = decode_text(read_bounded(sys.stdin.buffer, "standard input"), "standard input")
    if not prompt:
        raise SantacpuError("the prompt is empty")
    return arguments.text(prompt, "the prompt"), None  # a non-UTF-8 argument is said now, before loading


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


