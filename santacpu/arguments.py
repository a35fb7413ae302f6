"""Checking the Python API's arguments: a wrong type or value becomes a `SantacpuError` that names
the argument, instead of a TypeError or ValueError from deep inside NumPy or the tokenizer.

Numbers accept Python's and NumPy's numeric types but never `bool` or text ("0.5" is refused,
not parsed: the API does not guess).

May import: `santacpu.errors`.
"""

from __future__ import annotations

import numbers
import reprlib
from collections.abc import Iterable

from .errors import SantacpuError


def _kind(value: object) -> str:
    return type(value).__name__


def _shown(value: object) -> str:
    """`value` as a message shows it: short, on one line (an array's repr spans lines; a list of
    5,000 ids, 29,000 characters)."""
    return " ".join(reprlib.repr(value).split())


def text(value: object, name: str) -> str:
    """`value` if it is a str of Unicode text; bytes get a hint to decode them first, and a lone
    surrogate (not text: nothing can encode it) is refused where it is, not deep in the tokenizer."""
    if isinstance(value, str):
        check_unicode(value, name)
        return value
    hint = " (decode the bytes first, e.g. .decode('utf-8'))" if isinstance(value, (bytes, bytearray)) else ""
    raise SantacpuError(f"{name} must be a str, got {_kind(value)}{hint}")


def check_unicode(value: str, name: str) -> None:
    """A SantacpuError if `value` holds a lone surrogate (U+D800..U+DFFF), saying where. Python
    carries a byte that is not UTF-8 in a command-line argument as one (U+DC80..U+DCFF:
    surrogateescape), so that case names the byte."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as bad:
        code = ord(value[bad.start])
        if 0xDC80 <= code <= 0xDCFF:
            raise SantacpuError(
                f"{name} is not UTF-8 text (byte 0x{code - 0xDC00:02x} at character {bad.start}); convert it to UTF-8 first"
            ) from None
        raise SantacpuError(
            f"{name} is not Unicode text: a lone surrogate (U+{code:04X}) at character {bad.start}"
        ) from None


def integer(value: object, name: str, minimum: int | None = None) -> int:
    """`value` as an int, at least `minimum` when given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise SantacpuError(f"{name} must be an integer, got {_shown(value)} ({_kind(value)})")
    if minimum is not None and value < minimum:
        raise SantacpuError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def real(value: object, name: str) -> float:
    """`value` as a float (integers too)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SantacpuError(f"{name} must be a number, got {_shown(value)} ({_kind(value)})")
    return float(value)


def seed(value: object) -> int | None:
    """None (a fresh random seed) or an integer >= 0, as NumPy's generators take."""
    return None if value is None else integer(value, "seed", minimum=0)


def iterable(value: object, name: str) -> Iterable:
    """`value` if it is an iterable other than text (a str is not a list of its characters)."""
    if isinstance(value, (str, bytes, bytearray)) or not isinstance(value, Iterable):
        raise SantacpuError(f"{name} must be a list, got {_kind(value)}")
    return value


def stop_strings(value: object) -> list[str]:
    """Stop strings: one str is one stop string (not its characters), else an iterable of str."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (bytes, bytearray)) or not isinstance(value, Iterable):
        raise SantacpuError(f"stop must be a str or a list of str, got {_kind(value)}")
    return [text(item, "each stop string") for item in value]


def token_ids(value: object, vocab_size: int) -> list[int]:
    """A non-empty sequence of token ids inside the vocabulary, as a list of ints."""
    if isinstance(value, (str, bytes, bytearray)):
        raise SantacpuError(
            f"expected token ids (a sequence of ints), got {_kind(value)}: encode text first with "
            "model.tokenizer.encode(...), or use complete() for text"
        )
    if not isinstance(value, Iterable):
        raise SantacpuError(f"expected token ids (a sequence of ints), got {_kind(value)}")
    ids = [integer(i, "each token id") for i in value]
    if not ids:
        raise SantacpuError("the prompt is empty")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise SantacpuError(f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")
    return ids
