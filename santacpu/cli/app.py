"""The `santacpu` command tree: the Typer apps, the global options (--debug, --version), and every
command registered in the order `santacpu --help` lists them. Each command lives in the module of
its kind of work; this module is their table of contents.

May import: this package's command modules.
"""

from __future__ import annotations

import typer

from .complete import complete
from .measure import bench, eval_humaneval_infill, perplexity
from .model_files import cache_clear, cache_list, info, quantize, random_checkpoint
from .serve import serve

# What the global options set for the whole run (read by `entry` when a command fails).
run_options = {"debug": False}


def _show_version(value: bool) -> None:
    if value:
        from .. import __version__

        print(f"santacpu {__version__}")
        raise typer.Exit()


def _global_options(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(
        False, "--version", callback=_show_version, is_eager=True, help="Show santacpu's version and exit."
    ),
) -> None:
    run_options["debug"] = debug


def _group(help: str) -> typer.Typer:
    # Plain help (rich_markup_mode=None): typer's rich panels print a `<bool>` type beside every flag.
    return typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None, help=help)


# Path parameters say readable=False: santacpu reports an unreadable file itself, as an error (exit
# 1), where click would call it a usage error.
app = _group("Run the SantaCoder code model on the CPU: code completion, left-to-right and fill-in-the-middle.")
app.callback()(_global_options)
app.command()(complete)
app.command()(quantize)
app.command()(info)
app.command()(perplexity)
app.command()(bench)
app.command()(serve)
app.command("random-checkpoint")(random_checkpoint)

eval_app = _group("Task-level evaluation: run a benchmark's programs on the model's completions.")
eval_app.command("humaneval-infill")(eval_humaneval_infill)
app.add_typer(eval_app, name="eval")

cache_app = _group(
    "The quantization cache: the files first use writes (a full-precision model quantized once) and "
    "the calibrations `quantize` keeps for its next runs ($SANTACPU_CACHE, else $XDG_CACHE_HOME/santacpu, else ~/.cache/santacpu)."
)
cache_app.command("list")(cache_list)
cache_app.command("clear")(cache_clear)
app.add_typer(cache_app, name="cache")
