"""Tokenizer: known encoding, byte-exact round trips, plain-text specials, streaming decode."""

import json
import re

import numpy as np
import pytest
import tokenizers

from santacpu.errors import SantacpuError
from santacpu.tokenizer import _BUNDLED, StreamDecoder, Tokenizer

HELLO = "def print_hello_world():\n    print('Hello world!')"
HELLO_IDS = [563, 942, 62, 7196, 62, 3881, 1241, 258, 942, 388, 7371, 5297, 9759]

ROUND_TRIP_TEXTS = [
    HELLO,
    "",
    "class Foo:\n    def __init__(self):\n        self.x = {'a': [1, 2.5e-3]}\n",
    "emoji 😀🦀🎉 and CJK 日本語のテキスト, 中文, 한국어; accents café naïve",
    "runs of spaces:          end\n\n\n\n    \n",
    "\tindented\twith\t\ttabs\n\t\t",
    "windows\r\nline\r\nendings\r\n",
    "numbers 1234567890 and 3.14159",
    "weird bytes: \x00\x01\x7f \u200b zero-width, \U0010ffff max code point",
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.santacoder()


@pytest.fixture(scope="module")
def library_tok():
    """The `tokenizers` library's own reading of the same file, as an oracle."""
    return tokenizers.Tokenizer.from_file(str(_BUNDLED))


def test_known_encoding(tok):
    assert tok.encode(HELLO) == HELLO_IDS
    assert tok.decode(HELLO_IDS) == HELLO


def test_special_ids(tok):
    assert tok.vocab_size == 49157
    assert tok.eos_id == 49152
    assert (tok.fim_prefix_id, tok.fim_middle_id, tok.fim_suffix_id, tok.fim_pad_id) == (
        49153, 49154, 49155, 49156)


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_encode_and_decode_match_library(tok, library_tok, text):
    ids = tok.encode(text)
    assert ids == library_tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == library_tok.decode(ids, skip_special_tokens=False)


def test_digits_split_one_per_token(tok):
    ids = tok.encode("1234567890")
    assert len(ids) == 10
    assert [tok.decode([i]) for i in ids] == list("1234567890")


def test_special_strings_in_text_stay_plain(tok):
    text = "a <|endoftext|> b <fim-prefix>x<fim-suffix>y<fim-middle>z<fim-pad>"
    ids = tok.encode(text)
    assert all(i < 49152 for i in ids)
    assert tok.decode(ids) == text
    assert tok.encode("<|endoftext|>") != [tok.eos_id]


def test_decode_special_ids_and_never_cleans_up_spaces(tok):
    ids = [tok.fim_prefix_id, *tok.encode("x = 1 ,y"), tok.eos_id]
    # "clean up tokenization spaces" would turn " ," into ","; code must survive unchanged.
    assert tok.decode(ids) == "<fim-prefix>x = 1 ,y<|endoftext|>"


def test_token_bytes(tok):
    assert tok.token_bytes(tok.eos_id) == b"<|endoftext|>"
    assert tok.token_bytes(tok.fim_middle_id) == b"<fim-middle>"
    # Byte-level vocab: " print" is stored as "Ġprint" and must come back with a real space.
    assert tok.token_bytes(HELLO_IDS[1]) == b" print"
    assert tok.token_bytes(HELLO_IDS[7]) == b"\n   "  # "Ċ" + "ĠĠĠ"
    for bad in (tok.vocab_size, -1):
        with pytest.raises(SantacpuError, match="outside the vocabulary"):
            tok.token_bytes(bad)


@pytest.mark.parametrize("call, fragment", [
    (lambda t: t.encode(None), "encode() takes a str, got NoneType"),
    (lambda t: t.encode(b"x"), "encode() takes a str, got bytes"),
    (lambda t: t.encode("x\ud800"), "lone surrogate"),
    (lambda t: t.decode([-1]), "token id -1 is outside the vocabulary"),
    (lambda t: t.decode(["a"]), "decode() takes token ids (ints), got a str"),
    (lambda t: t.decode([1.7]), "got a float"),  # (had decoded int(1.7), silently)
    (lambda t: t.decode([True]), "got a bool"),
    (lambda t: t.decode("12"), "decode() takes a sequence of token ids, got str"),
    (lambda t: t.decode(None), "got NoneType"),
])
def test_encode_and_decode_refuse_what_is_not_text_or_ids(tok, call, fragment):
    # The API's tokenizer (docs/api.md): raw TypeErrors and ValueErrors from inside, or silent text.
    with pytest.raises(SantacpuError, match=re.escape(fragment)):
        call(tok)
    assert tok.decode(np.array(HELLO_IDS)) == tok.decode(HELLO_IDS)  # NumPy's ints are ids


def test_stream_decoder_never_emits_half_a_character(tok):
    text = "print('😀 日本語 🦀 café')\n"
    ids = tok.encode(text)
    decoder = StreamDecoder(tok)
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # Non-vacuous: some tokens are only the start of a character (lead byte, nothing complete),
    # and push must have held each of them back.
    held_back = [piece for i, piece in zip(ids, pieces)
                 if tok.token_bytes(i)[:1] >= b"\xc0"
                 and tok.token_bytes(i).decode("utf-8", errors="ignore") == ""]
    assert held_back and all(piece == "" for piece in held_back)


def test_stream_decoder_flushes_dangling_partial_char(tok):
    first = tok.encode("😀")[0]
    assert tok.token_bytes(first) == b"\xf0\x9f"  # the emoji's first two bytes only
    decoder = StreamDecoder(tok)
    assert decoder.push(tok.encode("a")[0]) == "a"
    assert decoder.push(first) == ""
    assert decoder.flush() == "\ufffd"


def test_from_file_errors(tmp_path):
    with pytest.raises(SantacpuError):
        Tokenizer.from_file(tmp_path / "missing.json")
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text("{ this is not json")
    with pytest.raises(SantacpuError, match=f"^tokenizer {re.escape(str(corrupt))} is corrupt"):
        Tokenizer.from_file(corrupt)
    not_a_tokenizer = tmp_path / "other.json"
    not_a_tokenizer.write_text(json.dumps({"model": {"type": "nonsense"}}))
    with pytest.raises(SantacpuError, match=f"^tokenizer {re.escape(str(not_a_tokenizer))}: not a usable tokenizer.json"):
        Tokenizer.from_file(not_a_tokenizer)
    # The same bad text from another place: its error names that place (failures are not kept).
    again = tmp_path / "again.json"
    again.write_text(not_a_tokenizer.read_text())
    with pytest.raises(SantacpuError, match=f"^tokenizer {re.escape(str(again))}: not a usable tokenizer.json"):
        Tokenizer.from_file(again)
    top_level_list = tmp_path / "list.json"
    top_level_list.write_text("[]")
    with pytest.raises(SantacpuError, match=f"^tokenizer {re.escape(str(top_level_list))} is not a tokenizer.json"):
        Tokenizer.from_file(top_level_list)


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda spec: spec["added_tokens"][0].update(id=2**32 - 2), "token ids must be integers in 0..1048575"),
        (lambda spec: spec["model"]["vocab"].update(a=3 * 10**9), "token ids must be integers in 0..1048575"),
        (lambda spec: spec["added_tokens"][0].update(id="zero"), "not a usable tokenizer.json"),
        (lambda spec: spec["added_tokens"][0].update(id=1.5), "token ids must be integers"),
        (lambda spec: spec["added_tokens"][0].update(id=True), "token ids must be integers"),
        (lambda spec: spec["model"].update(vocab={}) or spec.update(added_tokens=[]), "not a usable tokenizer.json"),
        # An AttributeError traceback (a Unigram model's vocab is a list of [piece, score]).
        (lambda spec: spec.update(model={"type": "Unigram", "unk_id": 0, "vocab": [["a", -1.0], ["b", -2.0]]}),
         "santacpu reads byte-level BPE tokenizers, and its model is 'Unigram'"),
    ],
    ids=["added id 2**32", "vocab id 3e9", "id a string", "id a float", "id a bool", "empty vocabulary", "unigram"],
)
def test_hostile_token_ids_are_one_error_not_gigabytes(tmp_path, edit, fragment):
    # The id -> bytes table is as long as the largest id: an id of 2**32 asked for 32 GiB.
    spec = json.loads(_BUNDLED.read_text(encoding="utf-8"))
    edit(spec)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(SantacpuError, match=re.escape(fragment)):
        Tokenizer.from_file(path)


def test_the_same_text_gives_one_shared_tokenizer(tmp_path):
    # Every model load asks for a tokenizer, most often the bundled one: parsed once a process.
    copy = tmp_path / "tokenizer.json"
    copy.write_text(_BUNDLED.read_text(encoding="utf-8"), encoding="utf-8")
    assert Tokenizer.from_file(copy) is Tokenizer.santacoder()
    edited = json.loads(copy.read_text(encoding="utf-8"))
    edited["added_tokens"] = [t for t in edited["added_tokens"] if t["content"] == "<|endoftext|>"]
    copy.write_text(json.dumps(edited), encoding="utf-8")
    other = Tokenizer.from_file(copy)
    assert other is not Tokenizer.santacoder() and other.fim_prefix_id is None


def test_tokenizer_without_fim_tokens(tmp_path):
    spec = json.loads(_BUNDLED.read_text(encoding="utf-8"))
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] == "<|endoftext|>"]
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec))
    tok = Tokenizer.from_file(path)
    assert tok.eos_id == 49152 and tok.vocab_size == 49153
    assert tok.fim_prefix_id is None and tok.fim_middle_id is None
    assert tok.fim_suffix_id is None and tok.fim_pad_id is None
