"""Text <-> token ids for SantaCoder's byte-level BPE, and streaming decode.

Owns: loading `tokenizer.json` (the bundled SantaCoder one or any file), the special-token ids
(EOS and the four FIM tokens: `eos_id` is where "<|endoftext|>" sits in this vocabulary; the
model's own end token, the one generation stops at, is `Config.eos_token_id`), the one fallback to
the bundled tokenizer (`tokenizer_file_for`), plain-text encoding, exact byte-level decoding, and
`StreamDecoder`, which turns a token stream into text without ever emitting half a UTF-8
character. Encoding is delegated to the `tokenizers` library; decoding is ours (a table of raw
bytes per id), so no "clean up tokenization spaces" or other text rewriting can touch code.

May import: tokenizers, `santacpu.small_files`, `santacpu.errors`.
"""

from __future__ import annotations

import codecs
import functools
import json
import numbers
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import tokenizers

from santacpu.errors import SantacpuError, SantacpuWarning
from santacpu.small_files import TOKENIZER_LIMIT, parse_json, read_small_text

_BUNDLED = Path(__file__).parent / "data" / "tokenizer.json"

# The embedding rows of SantaCoder and its fine-tunes (49152 tokens, 5 specials, padding to a
# multiple of 64 and more): a checkpoint with this many and no tokenizer.json of its own gets the
# bundled tokenizer.
SANTACODER_EMBEDDING_ROWS = 49280


def tokenizer_file_for(folder, vocab_size: int) -> Path:
    """A checkpoint folder's tokenizer.json; for a SantaCoder-sized checkpoint without one (many
    fine-tunes ship weights and config only), the bundled SantaCoder tokenizer, with a warning.
    The one fallback policy: loading, conversion and calibration all ask here."""
    own = Path(folder) / "tokenizer.json"
    if own.exists():  # not only a regular file: reading a FIFO or device there is a clear error
        return own
    if vocab_size == SANTACODER_EMBEDDING_ROWS:
        warnings.warn(f"no tokenizer.json in {folder}; using the bundled SantaCoder tokenizer", SantacpuWarning, stacklevel=2)
        return _BUNDLED
    raise SantacpuError(f"no tokenizer.json in {folder} (and its {vocab_size} embedding rows are not SantaCoder's)")


# `encode_batch` releases the GIL while it works (`encode` holds it), so a server thread tokenizing
# a long prompt does not stall the event loop. One text has nothing to parallelise: without this
# setting tokenizers would start its thread pool, after which every fork of the process warns.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

EOS_TOKEN = "<|endoftext|>"
FIM_PREFIX_TOKEN = "<fim-prefix>"
FIM_MIDDLE_TOKEN = "<fim-middle>"
FIM_SUFFIX_TOKEN = "<fim-suffix>"
FIM_PAD_TOKEN = "<fim-pad>"


def _unicode_to_byte() -> dict[str, int]:
    """GPT-2's byte<->unicode table, inverted: vocab character -> the byte it stands for.

    Byte-level BPE stores each byte as a printable character: printable Latin-1 bytes map to
    themselves, the other 68 bytes (controls, space, ...) to U+0100 upwards, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    byte_to_char = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in byte_to_char:
            byte_to_char[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in byte_to_char.items()}


MAX_VOCAB = 1 << 20  # token ids a tokenizer.json may use (a million: 20 times SantaCoder's)


class Tokenizer:
    """SantaCoder's tokenizer: `encode` treats all input as plain text, `decode` is byte-exact.
    Never changed once made: loads of the same tokenizer.json text share one instance."""

    def __init__(self, spec: dict):
        try:
            # The added tokens are matched before BPE, so a tokenizer without them can never turn
            # "<|endoftext|>" typed by a user into the EOS id: it gets split like any other text.
            # Specials are placed by callers, by id (see the FIM prompt builders).
            plain = dict(spec, added_tokens=[])
            self._plain = tokenizers.Tokenizer.from_str(json.dumps(plain))
            vocab: dict[str, int] = spec["model"]["vocab"]
            added = {t["content"]: t["id"] for t in spec.get("added_tokens") or []}
        except Exception as e:  # malformed spec; the library's messages can span several lines
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise SantacpuError(f"not a usable tokenizer.json: {first_line}") from None
        kind = spec["model"].get("type", "BPE") if isinstance(spec["model"], dict) else None
        if kind != "BPE" or not isinstance(vocab, dict):  # (a Unigram model's vocab is a list)
            raise SantacpuError(f"not a usable tokenizer.json: santacpu reads byte-level BPE tokenizers, and its "
                                f"model is {kind if isinstance(kind, str) else 'of no known type'!r}")

        ids = [*vocab.values(), *added.values()]
        # The id table below is as long as the largest id: a hostile file's id 2**32 asked for
        # 32 GiB. SantaCoder's vocabulary has 49,152 ids and 128 padding rows.
        if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < MAX_VOCAB for i in ids):
            raise SantacpuError(f"not a usable tokenizer.json: its token ids must be integers in 0..{MAX_VOCAB - 1}")
        if not all(isinstance(content, str) for content in added):
            raise SantacpuError("not a usable tokenizer.json: an added token's content is not a string")
        self.vocab_size: int = max(ids) + 1
        self.eos_id: int | None = added.get(EOS_TOKEN)
        self.fim_prefix_id: int | None = added.get(FIM_PREFIX_TOKEN)
        self.fim_middle_id: int | None = added.get(FIM_MIDDLE_TOKEN)
        self.fim_suffix_id: int | None = added.get(FIM_SUFFIX_TOKEN)
        self.fim_pad_id: int | None = added.get(FIM_PAD_TOKEN)
        self.special_ids: frozenset[int] = frozenset(added.values())  # EOS, FIM tokens: markup, not text

        # id -> raw bytes, built once: decoding is then a join, cheap enough per streamed token.
        char_to_byte = _unicode_to_byte()
        table: list[bytes] = [b""] * self.vocab_size
        for token, i in vocab.items():
            try:
                table[i] = bytes(char_to_byte[c] for c in token)
            except KeyError:
                raise SantacpuError(f"not a byte-level BPE tokenizer: vocab token {token!r} "
                                    "has characters outside the byte alphabet") from None
        for content, i in added.items():
            table[i] = content.encode("utf-8")
        self._bytes = table
        # No token spans more characters than this: text longer than n * this can never be n tokens.
        self.max_token_bytes: int = max(len(b) for b in table)

    @classmethod
    def from_file(cls, path) -> Tokenizer:
        return cls.from_json_text(read_small_text(path, "tokenizer", TOKENIZER_LIMIT), f"tokenizer {path}")

    @classmethod
    def from_json_text(cls, text: str, where: str) -> Tokenizer:
        """From tokenizer.json's text (a file's, or the copy embedded in a quantized file);
        `where` names it in errors."""
        try:
            return _parsed(text)
        except _NotATokenizer as e:
            raise SantacpuError(f"{where}{e}") from None

    @classmethod
    def for_checkpoint(cls, folder, vocab_size: int) -> Tokenizer:
        """The tokenizer of a checkpoint folder whose embedding has `vocab_size` rows (see
        `tokenizer_file_for`)."""
        return cls.from_file(tokenizer_file_for(folder, vocab_size))

    @classmethod
    def santacoder(cls) -> Tokenizer:
        return cls.from_file(_BUNDLED)

    def encode(self, text: str) -> list[int]:
        """Plain text -> ids. Special-token strings in `text` stay text; no BOS/EOS added. Other
        threads run meanwhile (the GIL is released)."""
        if not isinstance(text, str):
            raise SantacpuError(f"encode() takes a str, got {type(text).__name__}")
        try:
            return self._plain.encode_batch([text], add_special_tokens=False)[0].ids
        except TypeError:  # (a lone surrogate: no UTF-8 holds it)
            raise SantacpuError("encode() takes Unicode text: this str holds a lone surrogate") from None

    def token_bytes(self, token_id: int) -> bytes:
        if not 0 <= token_id < self.vocab_size:
            raise SantacpuError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")
        return self._bytes[token_id]

    def decode(self, ids) -> str:
        """Token ids (ints, NumPy's too) -> text; bytes that are not whole UTF-8 become U+FFFD."""
        if isinstance(ids, (str, bytes, bytearray)) or not isinstance(ids, Iterable):
            raise SantacpuError(f"decode() takes a sequence of token ids, got {type(ids).__name__}")
        pieces = []
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, numbers.Integral):
                raise SantacpuError(f"decode() takes token ids (ints), got a {type(i).__name__}")
            pieces.append(self.token_bytes(int(i)))
        # Joined before decoding: a multi-byte character may be split across tokens.
        return b"".join(pieces).decode("utf-8", errors="replace")


class _NotATokenizer(Exception):
    """A tokenizer.json text that cannot be used; the message follows the name of where it came from."""


# Parsing a tokenizer.json (json, the BPE tables, the byte table) takes ~0.3 s; every model load
# asks for one, most often the same bundled text. Tokenizers are never changed once made, so the
# same text gives the same, shared instance. Failures are not cached (lru_cache keeps no exceptions).
@functools.lru_cache(maxsize=4)
def _parsed(text: str) -> Tokenizer:
    try:
        spec = parse_json(text, "")
    except SantacpuError as e:
        raise _NotATokenizer(str(e)) from None
    if not isinstance(spec, dict):
        raise _NotATokenizer(" is not a tokenizer.json (top level is not an object)")
    try:
        return Tokenizer(spec)
    except SantacpuError as e:
        raise _NotATokenizer(f": {e}") from None


class StreamDecoder:
    """Token-by-token decoding that holds back incomplete UTF-8 sequences until they complete."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
