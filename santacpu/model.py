"""The Python API: `load()` a checkpoint, then `logits`, `generate`, `complete`, `complete_stream`.

    import santacpu
    model = santacpu.load("bigcode/santacoder")          # or a local folder
    print(model.complete("def fib(n):", max_new_tokens=32))
    print(model.complete("def add(a, b):\\n    return ", "\\n\\nprint(add(1, 2))"))   # fill-in-the-middle

Generation stops at EOS, at a stop id/string, at max_new_tokens, or when prompt + output fill the
context (n_positions tokens in all).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from .backend import CpuBackend
from .checkpoint import read_checkpoint
from .config import Config
from .engine import Engine
from .errors import SantacpuError, SantacpuWarning
from .quantized import names_quantized_file, read_quantized
from .prompts import FIM_ORDERS, build_fim_prompt, build_plain_prompt
from .sampling import check_sampling, sample_next
from .source import resolve
from .text_stream import stream_text
from .tokenizer import Tokenizer
from .weights import ModelWeights

DEFAULT_MAX_NEW_TOKENS = 128


class Model:
    """A loaded model: `config`, `tokenizer`, and the generation methods."""

    def __init__(self, weights: ModelWeights, tokenizer: Tokenizer, backend: CpuBackend | None = None):
        self.config: Config = weights.config
        self.tokenizer = tokenizer
        self.weights = weights
        self._engine = Engine(weights, backend)
        # Never sample the embedding's padding rows (49157..49279 for SantaCoder).
        self.n_valid_tokens = min(tokenizer.vocab_size, self.config.vocab_size)

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """float32 [len(ids), vocab_size]: a fresh full forward over `ids` from position 0."""
        ids = self._check_ids(ids)
        if len(ids) > self.config.n_positions:
            raise SantacpuError(f"{len(ids)} tokens exceed the {self.config.n_positions}-token context")
        cache = self._engine.new_cache(len(ids))
        return self._engine.forward(cache, ids, all_logits=True)

    def generate(
        self,
        ids: Sequence[int],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_ids: Iterable[int] = (),
    ) -> Iterator[int]:
        """Stream new token ids after the prompt `ids`. EOS and stop ids end the stream unyielded."""
        ids = self._check_ids(ids)
        check_sampling(temperature, top_k, top_p)
        if max_new_tokens < 0:
            raise SantacpuError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        n_ctx = self.config.n_positions
        if len(ids) >= n_ctx:
            raise SantacpuError(
                f"the prompt is {len(ids)} tokens but the context holds {n_ctx} (prompt and output together): "
                "shorten the prompt"
            )
        return self._generate(ids, max_new_tokens, temperature, top_k, top_p, seed, frozenset(stop_ids))

    def _generate(self, ids, max_new_tokens, temperature, top_k, top_p, seed, stop_ids) -> Iterator[int]:
        if max_new_tokens == 0:
            return
        rng = np.random.default_rng(seed)
        ends = stop_ids | {self.config.eos_token_id}
        total = min(self.config.n_positions, len(ids) + max_new_tokens)
        cache = self._engine.new_cache(total)
        logits = self._engine.forward(cache, ids)[-1]
        for produced in range(1, total - len(ids) + 1):
            token = sample_next(logits, self.n_valid_tokens, temperature, top_k, top_p, rng)
            if token in ends:
                return
            yield token
            if len(ids) + produced == total:
                return  # max_new_tokens reached, or the context is full
            logits = self._engine.forward(cache, [token])[-1]

    def complete_stream(
        self,
        prefix: str,
        suffix: str | None = None,
        *,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Iterable[str] = (),
        fim_order: str = "psm",
    ) -> Iterator[str]:
        """Stream the completion of `prefix` as text pieces (whole characters only). With `suffix`,
        fill in the middle between them. Stop strings end the text and are not included."""
        if fim_order not in FIM_ORDERS:  # checked even without a suffix: a typo must not pass silently
            raise SantacpuError(f"unknown FIM order '{fim_order}' (choose {' or '.join(FIM_ORDERS)})")
        if suffix is None:
            ids = build_plain_prompt(self.tokenizer, prefix, self.config.n_positions)
        else:
            ids = build_fim_prompt(
                self.tokenizer, prefix, suffix, self.config.n_positions, max_new_tokens, order=fim_order
            )
        tokens = self.generate(
            ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed
        )
        return stream_text(self.tokenizer, tokens, stop)

    def complete(self, prefix: str, suffix: str | None = None, **options) -> str:
        """The whole completion as one string (see `complete_stream` for the options)."""
        return "".join(self.complete_stream(prefix, suffix, **options))

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        ids = [int(i) for i in ids]
        if not ids:
            raise SantacpuError("the prompt is empty")
        bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
        if bad:
            raise SantacpuError(f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        return ids


def _tokenizer_for(folder: os.PathLike, config: Config) -> Tokenizer:
    path = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(path):
        return Tokenizer.from_file(path)
    if config.vocab_size == 49280:
        warnings.warn(
            f"no tokenizer.json in {folder}; using the bundled SantaCoder tokenizer", SantacpuWarning, stacklevel=3
        )
        return Tokenizer.santacoder()
    raise SantacpuError(f"no tokenizer.json in {folder}")


def load(model: str | os.PathLike, *, revision: str | None = None, device: str = "auto") -> Model:
    """Load a SantaCoder model: a santacpu quantized file (memory-mapped), a full-precision
    checkpoint folder (either layout; safetensors or pytorch_model.bin) or a weight file inside
    one, or a hub id such as "bigcode/santacoder" (cached by huggingface_hub)."""
    if device not in ("auto", "cpu"):
        if device == "cuda":
            raise SantacpuError("device 'cuda' is not available yet: santacpu's GPU backend is not built; use 'cpu'")
        raise SantacpuError(f"unknown device '{device}' (choose 'auto' or 'cpu')")
    if names_quantized_file(model):
        path = Path(model).expanduser()
        weights, metadata = read_quantized(path)
        return Model(weights, Tokenizer.from_json_text(metadata["tokenizer"], str(path)), CpuBackend())
    folder = resolve(model, revision)
    weights = read_checkpoint(folder, show_progress=True)
    return Model(weights, _tokenizer_for(folder, weights.config), CpuBackend())
