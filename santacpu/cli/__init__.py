"""The `santacpu` command line: a thin typed layer over the Python API.

Every failure ends in one line on stderr and an exit code that says what kind it was (docs/cli.md
lists them): 0 done; 1 an error (`santacpu: error: ...`); 2 a usage error,
a command line the parser rejects (an unknown option, a value of the wrong type, outside the
range `--help` shows or not one of its choices, options that exclude each other, a value the model
shows to be wrong: `OptionValueError`; also one `santacpu: error:` line); 130 interrupted (Ctrl-C); 143 terminated
(SIGTERM). An interrupted or terminated command leaves no partial file behind. `--debug` shows an
error's traceback instead. Warnings are one line each (`santacpu: warning: ...`).

The modules: `app` (the command tree), `entry` (`main`: outcomes to lines and exit codes), one
module per kind of command (`complete`, `model_files`, `measure`, `serve`), and what they share
(`options`: value checks and common options; `text_input`: bounded text from files and stdin).
Building the command tree loads no Numba and no model (tests/test_cli_failures.py checks it): the
commands import the runtime inside their bodies, so `--help`, `--version` and usage errors answer
in about a third of a second.

May import: anything in `santacpu` and `quantize` (the top layer: nothing imports it but `__main__`).
"""

from .app import app
from .entry import main

__all__ = ["app", "main"]
