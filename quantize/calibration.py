"""Importance statistics for importance-weighted quantization (the idea behind llama.cpp's
importance matrix and AWQ): run the full-precision model over some code and record, for every
matrix, the mean squared activation of each of its input channels. Rounding error on a channel
that sees large activations costs more, so the block formats weight their error by these values.

The forward runs layer by layer over all calibration sequences (only one layer's weights are
alive at a time, as in the converter), with the plain-NumPy reference pieces. The same text also
says which tokens are used most (`most_used_tokens`): the embedding rows worth raising.

May import: `santacpu` (network.reference, loading, tokenizer, sample_code, progress, errors).
"""

from __future__ import annotations

import codecs
import sys
import sysconfig
from pathlib import Path

import numpy as np

from santacpu.errors import SantacpuError
from santacpu.loading.checkpoint import CheckpointReader
from santacpu.network import reference as ref
from santacpu.progress import Progress
from santacpu.sample_code import stdlib_files
from santacpu.tokenizer import Tokenizer

SEQUENCE_TOKENS = 512


# Calibration reads at most this much of one file, and stops taking files past this much text:
# the most used rows count 2^18 tokens (~1 MB of code), calibration itself fewer. A 50 MB file
# had been read and tokenized whole (7.4 GB of memory for 4,096 tokens' worth).
CALIBRATION_FILE_BYTES = 1 << 20
CALIBRATION_TEXT_BYTES = 16 << 20


def _text_start(path: Path) -> str | None:
    """The first CALIBRATION_FILE_BYTES of the file as UTF-8 text (a character cut at the end is
    left out), or None for a binary or unreadable file."""
    try:
        with open(path, "rb") as file:
            raw = file.read(CALIBRATION_FILE_BYTES)
        return codecs.getincrementaldecoder("utf-8")().decode(raw, final=False)
    except (UnicodeDecodeError, OSError):
        return None  # binary or unreadable files are simply not calibration text


def calibration_texts(folder: str | None, exclude: set[str] = frozenset()) -> tuple[list[str], str]:
    """Source texts from `folder` (every UTF-8 file under it) or, for None, from the standard
    library less the `exclude`d paths (relative to its root: held-out evaluation files); returns
    (texts, a note describing them for the file's provenance)."""
    if folder is None:
        root = Path(sysconfig.get_paths()["stdlib"])
        files = [p for p in stdlib_files() if p.relative_to(root).as_posix() not in exclude]
        # Spread the picks across the library rather than taking one package's files.
        files = files[:: max(1, len(files) // 64)]
        where = f"Python {sys.version.split()[0]} standard library"
    else:
        root = Path(folder)
        if not root.is_dir():
            raise SantacpuError(f"calibration folder {folder} {'is not a folder' if root.exists() else 'does not exist'}")
        files = sorted(p for p in root.rglob("*") if p.is_file())
        where = f"folder {root}"
    texts, total = [], 0
    for path in files:
        if total >= CALIBRATION_TEXT_BYTES:
            break
        text = _text_start(path)
        if text and text.strip():
            texts.append(text)
            total += len(text.encode("utf-8"))
    if not texts:
        raise SantacpuError(f"no UTF-8 text files found for calibration in {where}")
    return texts, f"{where}, {len(texts)} file{'s' * (len(texts) != 1)}"


def token_sequences(texts: list[str], tokenizer: Tokenizer, eos_id: int, max_tokens: int, n_ctx: int) -> list[list[int]]:
    """Up to max_tokens tokens in sequences of at most n_ctx, documents separated by `eos_id` (the
    model's, `Config.eos_token_id`)."""
    stream: list[int] = []
    for text in texts:
        stream += tokenizer.encode(text) + [eos_id]
        if len(stream) >= max_tokens:
            break
    stream = stream[:max_tokens]
    return [stream[i : i + n_ctx] for i in range(0, len(stream), n_ctx) if len(stream[i : i + n_ctx]) > 1]


FREQUENCY_TOKENS = 1 << 18  # tokens counted for the most used embedding rows (tokenizing only)


def most_used_tokens(texts: list[str], tokenizer: Tokenizer, eos_id: int, vocab_size: int) -> np.ndarray:
    """The token ids seen in the first FREQUENCY_TOKENS tokens of `texts`, most frequent first
    (ties: lower id first), int64 [distinct]."""
    stream = [t for s in token_sequences(texts, tokenizer, eos_id, FREQUENCY_TOKENS, FREQUENCY_TOKENS) for t in s]
    counts = np.bincount(np.asarray(stream, np.int64), minlength=vocab_size)[:vocab_size]
    order = np.argsort(-counts, kind="stable")
    return order[counts[order] > 0]


def collect_importance(reader: CheckpointReader, sequences: list[list[int]]) -> dict[str, np.ndarray]:
    """{canonical matrix name: mean squared input activation per input channel [cols]}."""
    c = reader.config
    eps = c.layer_norm_epsilon
    sums: dict[str, np.ndarray] = {}
    count = sum(len(s) for s in sequences)

    def record(name: str, x: np.ndarray) -> None:
        sums[name] = sums.get(name, 0.0) + (x.astype(np.float64) ** 2).sum(axis=0)

    wte, wpe = reader.wte(), reader.wpe()
    states = [ref.dense(wte[np.asarray(s)]) + ref.dense(wpe[: len(s)]) for s in sequences]  # [T, E] each
    progress = Progress(c.n_layer, "calibrating")
    for i in range(c.n_layer):
        layer = reader.layer(i)
        p = f"h.{i}."
        for x in states:
            h = ref.layer_norm(x, layer.ln_1_weight, layer.ln_1_bias, eps)
            record(p + "attn_c_attn_weight", h)
            heads = ref.attention_heads(h, layer, c.n_head, c.n_kv_head)
            record(p + "attn_c_proj_weight", heads)
            x += ref.linear(heads, layer.attn_c_proj_weight, layer.attn_c_proj_bias)
            h = ref.layer_norm(x, layer.ln_2_weight, layer.ln_2_bias, eps)
            record(p + "mlp_c_fc_weight", h)
            f = ref.gelu_tanh(ref.linear(h, layer.mlp_c_fc_weight, layer.mlp_c_fc_bias))
            record(p + "mlp_c_proj_weight", f)
            x += ref.linear(f, layer.mlp_c_proj_weight, layer.mlp_c_proj_bias)
        reader.release(layer)
        del layer
        progress.step(f"layer {i}")
    ln_f_weight, ln_f_bias = reader.ln_f()
    for x in states:
        record("wte", ref.layer_norm(x, ln_f_weight, ln_f_bias, eps))  # the LM head's input
    return {name: (total / count).astype(np.float32) for name, total in sums.items()}
