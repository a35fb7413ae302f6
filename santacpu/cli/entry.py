"""The command line's entry point: one command run, and every outcome made one line on stderr and
its exit code (the package docstring lists them); standard output that names itself in errors.

May import: this package's `app`, `santacpu.errors`.
"""

from __future__ import annotations

import errno
import io
import os
import signal
import sys
import warnings
from typing import List, Optional

import typer

from ..errors import OptionValueError, SantacpuError, os_problem, printable, warning_line
from ..progress import end_open_line
from .app import app, run_options

# Exit codes (besides 0 and 1), as shells report signals: 128 + the signal's number.
EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 2, 130, 143


class Terminated(BaseException):
    """Raised by the SIGTERM handler. A BaseException, like KeyboardInterrupt, so that it unwinds
    through every `finally` and cleanup (a conversion's temporary file is removed)."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Every warning as one line (`errors.warning_line`)."""
    print(warning_line(message, category, filename), file=sys.stderr)


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
        if run_options["debug"]:
            raise
        return _fail(str(error), EXIT_USAGE if isinstance(error, OptionValueError) else 1)
    except KeyboardInterrupt:  # before typer's own handling starts
        code = EXIT_INTERRUPTED
    except Terminated:
        end_open_line()
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
        if run_options["debug"]:
            raise
        where = f"{problem.filename}: " if problem.filename else ""
        return _fail(f"{where}{os_problem(problem)}")
    except MemoryError:  # sizes in a hostile config.json, a file beyond this machine's memory
        if run_options["debug"]:
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
        end_open_line()
        print("santacpu: interrupted", file=sys.stderr)
    return code if isinstance(code, int) else 0


def _fail(message: str, code: int = 1) -> int:
    end_open_line()
    print(f"santacpu: error: {printable(message)}", file=sys.stderr)  # (one line, whatever a file put in it)
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
