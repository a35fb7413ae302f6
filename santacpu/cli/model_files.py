"""The commands on model files: `santacpu quantize` (a checkpoint to one quantized file), `info`,
`random-checkpoint`, and `cache list` / `cache clear` (what first use and `quantize` keep).

May import: `santacpu.loading`, `santacpu.formats`, `quantize` (its pipeline and cache, inside the
commands), and this package's `options`.
"""

from __future__ import annotations

import sys
from typing import List, Optional

import typer

from ..loading.source import hub_revision
from ..formats.blocks import FORMATS
from .options import (
    REVISION_OPTION, check_keep_rules, check_positive, choices, folder_name, input_files, model_name, one_of, output_file,
)
from quantize import DEFAULT_CALIBRATION_TOKENS

# What `quantize --type q4_m`'s default upgrade budget (1.5%) comes to on SantaCoder's shapes
# (docs/quantization.md says how it was counted).
DEFAULT_SANTACODER_BITS = "4.8"


def _type_help() -> str:
    from ..formats.blocks import FORMATS

    types = ", ".join(f"{name} ({fmt.bits_per_weight:g} bits/weight)" for name, fmt in FORMATS.items())
    return f"Type of the linear weights: {types}; q4_m is the better 4-bit type."


def quantize(
    src: str = typer.Argument(..., metavar="SRC", callback=model_name, help="Full-precision source: checkpoint folder (either layout), weight file, or hub id."),
    out: str = typer.Argument(..., metavar="OUT", callback=output_file, help="The quantized file to write (.safetensors)."),
    qtype: str = typer.Option("q8_0", "--type", "-t", callback=one_of(*FORMATS), metavar=choices(*FORMATS), help=_type_help()),
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
        [], "--keep", metavar="PATTERN=TYPE", callback=check_keep_rules,
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
        None, callback=check_positive, metavar="BITS",
        help="4-bit types, instead of --upgrade-budget: spend the upgrades up to this many bits per weight over "
        "the model's matrices, as `info` and the report count them (every 2-D tensor's stored bytes, block "
        "scales, the position embedding's float16 and the raised rows' ids included, over its weights; "
        "LayerNorm parameters and biases left out). Below the file without upgrades is an error that says "
        "the least this model takes.",
    ),
    max_size: Optional[float] = typer.Option(
        None, callback=check_positive, metavar="MB",
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


def info(file: str = typer.Argument(..., callback=input_files, metavar="FILE", help="A santacpu quantized file.")) -> None:
    """Describe a quantized file: config, tensor types, size, bits per weight, provenance."""
    from ..loading.quantized import describe

    print(describe(file))


def random_checkpoint(
    out: str = typer.Argument(
        ..., metavar="OUT", callback=folder_name, help="The folder to write (made if missing): config.json, model.safetensors, tokenizer.json."
    ),
    size: str = typer.Option(
        "tiny", callback=one_of("tiny", "micro", "trained", "full"), metavar=choices("tiny", "micro", "trained", "full"),
        help="tiny (a 64-token context, 2 narrow layers: 13 MB, seconds), micro, trained (the test fixture's "
        "shapes), or full (SantaCoder's own shapes: 1.1 B parameters, 4.5 GB in float32).",
    ),
    layout: str = typer.Option(
        "gpt_bigcode", callback=one_of("gpt_bigcode", "legacy"), metavar=choices("gpt_bigcode", "legacy"),
        help="gpt_bigcode, or legacy (bigcode/santacoder's own layout).",
    ),
    dtype: str = typer.Option("float32", callback=one_of("float32", "float16"), metavar=choices("float32", "float16"), help="float32 or float16."),
    seed: int = typer.Option(0, min=0, help="The same seed gives the same weights."),
    multi_head: bool = typer.Option(False, "--multi-head", help="One K/V head per query head instead of multi-query."),
    force: bool = typer.Option(
        False, "--force", help="Write into OUT even if it is not empty (its config.json, model.safetensors and "
        "tokenizer.json are replaced)."
    ),
) -> None:
    """Write a SantaCoder-shaped checkpoint with random weights: its text is nonsense, but every
    command runs on it without the real model or a network. OUT must be new or empty (without --force)."""
    from ..loading.random_checkpoint import write_checkpoint

    written = write_checkpoint(out, size=size, layout=layout, dtype=dtype, seed=seed, multi_query=not multi_head,
                               force=force)
    print(f"santacpu: wrote {written}; try: santacpu complete \"def f():\" --model {written}", file=sys.stderr)


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


def cache_clear(
    model: Optional[str] = typer.Argument(
        None, metavar="MODEL", callback=model_name, help="Remove only what was made from this model (folder or hub id). Default: "
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


