"""What the commands' options share: the checks typer runs on a value before a command starts, and
the options several commands take (--model, --revision, --quant, --device).

A value the command line can judge by itself (a choice, a list of numbers, a range) is checked by a
typer callback that raises `typer.BadParameter`: a usage error, exit 2, like a value of the wrong
type. A value only the model can judge raises `OptionValueError` in the command (also exit 2).

May import: the foundation layers below the command line (`santacpu.formats`, `santacpu.loading`,
`santacpu.generation`, `santacpu.backends` (its DEVICES), `santacpu.settings`, `santacpu.atomic_file`,
`santacpu.errors`), `quantize.policy`. At import, nothing that loads Numba or the model: `--help`,
`--version` and usage errors answer without the runtime (`santacpu.model`, the kernels), which
each command imports inside its body.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Tuple

import typer

from ..atomic_file import input_at
from ..backends import DEVICES
from ..errors import OptionValueError, SantacpuError
from ..formats.blocks import FORMATS
from ..formats.quantized_file import DEFAULT_QUANT
from ..loading.source import DEFAULT_MODEL
from ..settings import MODEL_ENV


def one_of(*choices: str):
    """A typer callback that accepts only `choices` (a usage error otherwise, like a bad type)."""

    def check(value: Optional[str]) -> Optional[str]:
        if value is not None and value not in choices:
            raise typer.BadParameter(f"'{value}' is not one of {', '.join(choices)}")
        return value

    return check


def choices(*names: str, many: bool = False) -> str:
    """The placeholder --help shows for an option of these choices: [a|b|c] (with `many`, a
    comma-separated list of them)."""
    shown = "[" + "|".join(names) + "]"
    return f"{shown},..." if many else shown


def each_one_of(*choices: str):
    """`one_of` for a comma-separated list of choices (at least one)."""

    def check(value: str) -> str:
        items = [item.strip() for item in value.split(",") if item.strip()]
        if not items:
            raise typer.BadParameter(f"'{value}' names none of {', '.join(choices)}")
        for item in items:
            one_of(*choices)(item)
        return value

    return check


def counts(text: Optional[str]) -> Tuple[int, ...]:
    """'1,2,4' -> (1, 2, 4); () for None. Checked first by the option's callback, `check_counts`."""
    if text is None:
        return ()
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isascii() and part.isdigit() for part in parts):  # (int() takes "１" and "1_0")
        raise ValueError(text)
    return tuple(int(part) for part in parts)


def check_counts(value: Optional[str]) -> Optional[str]:
    """A typer callback for a comma-separated list of whole numbers >= 1."""
    try:
        valid = min(counts(value), default=1) >= 1
    except ValueError:
        valid = False
    if not valid:
        raise typer.BadParameter(f"'{value}' is not a comma-separated list of whole numbers >= 1 (e.g. 1,2,4)")
    return value


def check_probability(value: float) -> float:
    if not 0.0 < value <= 1.0:
        raise typer.BadParameter(f"{value} is not in the range 0 < P <= 1")
    return value


def check_temperature(value: float) -> float:
    if not 0.0 <= value < float("inf"):  # (typer's min=0 lets inf through)
        raise typer.BadParameter(f"{value} is not a finite number >= 0 (0 is greedy)")
    return value


def seconds_between(low: float, high: float):
    """A typer callback for a number of seconds from `low` to `high` (typer's min/max call NaN
    "more than" the maximum)."""

    def check(value: float) -> float:
        if not low <= value <= high:
            raise typer.BadParameter(f"{value} is not a number of seconds from {low:g} to {high:g}")
        return value

    return check


def check_positive(value: Optional[float]) -> Optional[float]:
    if value is not None and not 0.0 < value < float("inf"):
        raise typer.BadParameter(f"{value} is not a positive number")
    return value


def check_keep_rules(value: List[str]) -> List[str]:
    """A typer callback for quantize's --keep PATTERN=TYPE rules."""
    from quantize.policy import parse_keep

    try:
        parse_keep(list(value))
    except SantacpuError as problem:
        raise typer.BadParameter(str(problem)) from None
    return value


def output_file(value: Optional[str]) -> Optional[Path]:
    """An output file's path, checked as given: Path() would drop a trailing '/' (a folder's path,
    written as a file) and make '' the current folder."""
    if value is None:
        return None
    if not value.strip():
        raise typer.BadParameter("the file name is empty")
    if value.endswith(("/", os.sep)):
        raise typer.BadParameter(f"'{value}' ends with '/', as a folder's path does: give a file name")
    return Path(value)


def model_name(value: Optional[str]) -> Optional[str]:
    """A typer callback for a model option or argument: an empty one (`--model "$M"` with M unset)
    had run the default model."""
    if value is not None and not value.strip():
        raise typer.BadParameter("the model name is empty")
    return value


def input_files(value):
    """A typer callback for input file paths (one, or a list), checked as given: Path('') is the
    current folder ("file . is a folder")."""
    if value is None:
        return None
    values = [value] if isinstance(value, str) else list(value)
    if any(not item.strip() for item in values):
        raise typer.BadParameter("the file name is empty")
    paths = [Path(item) for item in values]
    return paths[0] if isinstance(value, str) else paths


def folder_name(value: Optional[str]) -> Optional[Path]:
    """An output folder's path, checked as given: Path('') is the current folder."""
    if value is not None and not value.strip():
        raise typer.BadParameter("the folder name is empty")
    return None if value is None else Path(value)


def refuse_replacing_inputs(out: Path, option: str, inputs: list) -> None:
    """`out` must not be a file the command reads (a scored text, a model file or one in a model's
    folder): --force would replace it."""
    read = input_at(out, [given for given in inputs if given is not None])
    if read is not None:
        raise OptionValueError(f"{option} {out} is a file this command reads ({read}): write elsewhere")


# The options of the commands that run a model (one OptionInfo serves several commands).
QUANT_CHOICES = ("none", *FORMATS)
DEVICE_OPTION = typer.Option(
    "auto", callback=one_of(*DEVICES), metavar=choices(*DEVICES), help="auto (a CUDA GPU where one is usable, else the CPU), cpu or cuda."
)
MODEL_OPTION = typer.Option(
    None,
    "--model",
    "-m",
    callback=model_name,
    help=f"Quantized file, checkpoint folder, weight file, or hub id. Default: ${MODEL_ENV} if set, else {DEFAULT_MODEL}.",
    show_default=False,
)
REVISION_OPTION = typer.Option(None, help="Hub revision (branch, tag or commit) for a hub id.")
QUANT_OPTION = typer.Option(
    None,
    callback=one_of(*QUANT_CHOICES), metavar=choices(*QUANT_CHOICES),
    help=f"For a full-precision model: run its cached quantization to this type (made once, as `complete` "
    f"does); 'none' runs it in full precision. Default: {DEFAULT_QUANT}.",
    show_default=False,
)
