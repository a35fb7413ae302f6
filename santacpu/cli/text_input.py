"""Text the command line reads: from a file or standard input (a prompt, FIM halves, an API key, a
scored text), bounded and checked to be UTF-8 source text; and the escapes (\\n, \\t, ...) of a
--stop text.

May import: `santacpu.errors`.
"""

from __future__ import annotations

import codecs
import re
from pathlib import Path

from ..errors import OptionValueError, SantacpuError, os_problem, printable

# Far beyond any context's worth (2,048 tokens of at most 128 characters), and a bound on what
# /dev/zero or a runaway pipe can make this process hold.
MAX_TEXT_BYTES = 64 << 20


def read_bounded(stream, what: str) -> bytes:
    raw = stream.read(MAX_TEXT_BYTES + 1)
    if len(raw) > MAX_TEXT_BYTES:
        raise SantacpuError(f"{what} is over {MAX_TEXT_BYTES >> 20} MiB")
    return raw


def read_text_file(path: Path, what: str) -> str:
    try:
        with open(path, "rb") as file:
            raw = read_bounded(file, f"{what} {path}")
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


# Python's string escapes; a backslash that starts none of them (or one cut short) is matched by
# the last branch.
_ESCAPE = re.compile(r"\\(?:x[0-9A-Fa-f]{2}|u[0-9A-Fa-f]{4}|U[0-9A-Fa-f]{8}|N\{[^}]*\}|[0-7]{1,3}|[\\'\"abfnrtv])|\\")
# What an escape cut short needs, by its letter.
_NEEDS = {"x": "two hex digits (\\x41)", "u": "four hex digits (\\u00e9)", "U": "eight hex digits (\\U0001f600)",
          "N": "a known character name in braces (\\N{BULLET})"}


def decode_escapes(text: str, option: str = "--stop") -> str:
    """Python-style escapes (\\n, \\t, \\\\, \\x41, \\u00e9, ...) in `text` decoded; every other
    character, non-ASCII included, kept as it is. A bad escape is a usage error (`OptionValueError`)."""

    def one(match: re.Match) -> str:
        escape = match.group(0)
        try:
            if escape != "\\":
                return codecs.decode(escape, "unicode_escape")
        except (UnicodeDecodeError, UnicodeEncodeError):  # \N{name} with an unknown name, \U past U+10FFFF
            pass
        shown = printable(text)  # one line, as typed
        bad = text[match.start() : match.start() + 2]
        if bad[1:] in _NEEDS:
            problem = f"{bad} at position {match.start()} needs {_NEEDS[bad[1:]]}"
        else:
            problem = (f"{bad} at position {match.start()} is not an escape (known: \\n \\t \\r \\\\ \\' \\\" "
                       "\\xHH \\uHHHH \\UHHHHHHHH \\N{name}, octal)")
        raise OptionValueError(f"{option} '{shown}': {problem}; write a backslash itself as \\\\")

    return _ESCAPE.sub(one, text)
