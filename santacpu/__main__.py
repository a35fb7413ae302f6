"""The command line's entry: the `santacpu` console script and `python -m santacpu`.

It imports the command line (typer, NumPy: a quarter of a second; the commands import the runtime
themselves) inside `main`, so that a Ctrl-C meanwhile ends as every other interruption does:
"santacpu: interrupted", exit 130, no traceback.

May import: `santacpu.cli`.
"""

import sys


def main() -> None:
    try:
        from .cli import main as run_command_line
    except KeyboardInterrupt:
        print("santacpu: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    run_command_line()


if __name__ == "__main__":
    main()
