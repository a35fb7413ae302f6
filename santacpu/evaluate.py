"""Accuracy of a model over source files, alone and against a reference: what a quantization costs.

Follows llama.cpp's perplexity tool so the numbers compare: the files' tokens are cut into chunks of
`n_ctx`; each chunk is one fresh forward from position 0, and only its second half is scored
(positions n_ctx/2 .. n_ctx-2, each predicting the next token), so every scored token has at least
n_ctx/2 tokens of context. With a reference model: mean and 99th-percentile KL divergence
KL(reference || model) per scored token, top-1 agreement and the perplexity difference.
Padding rows (ids past the tokenizer's vocabulary) are left out of every distribution.

May import: `santacpu.model` and the layers below it (today `santacpu.errors`, `santacpu.progress` and
`santacpu.network.divergence`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from .errors import SantacpuError
from .network.divergence import NOT_KEPT, against_reference, row_distribution
from .progress import Progress


@dataclass
class Scores:
    tokens_scored: int
    chunks: int
    n_ctx: int
    perplexity: float
    reference_perplexity: float | None = None
    delta_perplexity: float | None = None
    mean_kld: float | None = None
    kld_p99: float | None = None
    top1_agreement: float | None = None

    def to_json(self, **about) -> str:
        """The scores (with `about`: what was scored) as strict JSON: a perplexity too large for a
        float is null (JSON has no Infinity)."""
        figures = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in asdict(self).items()}
        return json.dumps({**about, **figures}, indent=2, allow_nan=False)

    def table(self, name: str, reference: str | None) -> str:
        rows = [("model", name), ("scored tokens", f"{self.tokens_scored} in {self.chunks} chunks of {self.n_ctx}"),
                ("perplexity", f"{self.perplexity:.4f}")]
        if reference is not None:
            rows += [
                ("reference", reference),
                ("reference perplexity", f"{self.reference_perplexity:.4f}"),
                ("delta perplexity", f"{self.delta_perplexity:+.4f}"),
                ("mean KLD", f"{self.mean_kld:.6f}"),
                ("99th pct KLD", f"{self.kld_p99:.6f}"),
                ("top-1 agreement", f"{100 * self.top1_agreement:.2f} %"),
            ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def chunk_tokens(tokens: Sequence[int], n_ctx: int) -> list[list[int]]:
    return [list(tokens[i : i + n_ctx]) for i in range(0, len(tokens) - n_ctx + 1, n_ctx)]


def score(model, texts: Sequence[str], n_ctx: int, reference=None) -> Scores:
    """Perplexity of `model` over `texts` (joined with EOS), and its divergence from `reference`."""
    return score_models({"model": model}, texts, n_ctx, reference)["model"]


def score_models(models: dict, texts: Sequence[str], n_ctx: int, reference=None) -> dict[str, Scores]:
    """`score` for several models over the same chunks, computing the reference only once per chunk."""
    first_model = next(iter(models.values()))
    if n_ctx < 8 or n_ctx > first_model.config.n_positions:
        raise SantacpuError(f"--ctx must be between 8 and the model's context {first_model.config.n_positions}, got {n_ctx}")
    tokens: list[int] = []
    for text in texts:
        tokens += first_model.tokenizer.encode(text) + [first_model.config.eos_token_id]
    chunks = chunk_tokens(tokens, n_ctx)
    if not chunks:
        raise SantacpuError(f"the files hold {len(tokens)} token{'s' * (len(tokens) != 1)}, fewer than one chunk of {n_ctx}")
    n_valid = first_model.n_valid_tokens
    first = n_ctx // 2
    nll = {name: [] for name in models}
    kld = {name: [] for name in models}
    agree = {name: [] for name in models}
    ref_nll = []
    progress = Progress(len(chunks), "scoring chunks" + (" (model and reference)" if reference is not None else ""))
    for chunk in chunks:
        targets = np.asarray(chunk[first + 1 :])  # token j+1 is predicted at position j
        n = len(targets)  # scored positions in this chunk
        if reference is not None:
            ref_logits = reference.logits(chunk, first)[:-1, :n_valid]
            ref_logp, ref_p = np.empty(ref_logits.shape), np.empty(ref_logits.shape)
            row_nll, ref_top = np.empty(n), np.empty(n, np.int64)
            row_distribution(ref_logits, targets, row_nll, ref_top, ref_logp, ref_p)
            ref_nll.append(row_nll)
        for name, model in models.items():
            logits = model.logits(chunk, first)[:-1, :n_valid]
            row_nll, top = np.empty(n), np.empty(n, np.int64)
            if reference is None:
                row_distribution(logits, targets, row_nll, top, NOT_KEPT, NOT_KEPT)
                nll[name].append(row_nll)
                continue
            row_kld = np.empty(n)
            against_reference(ref_logp, ref_p, logits, targets, row_nll, row_kld, top)
            nll[name].append(row_nll)
            kld[name].append(row_kld)
            agree[name].append(ref_top == top)
        progress.step()
    results = {}
    for name in models:
        nll_all = np.concatenate(nll[name])
        result = Scores(len(nll_all), len(chunks), n_ctx, _perplexity(nll_all.mean()))
        if reference is not None:
            kld_all = np.concatenate(kld[name])
            result.reference_perplexity = _perplexity(np.concatenate(ref_nll).mean())
            result.delta_perplexity = result.perplexity - result.reference_perplexity
            result.mean_kld = float(kld_all.mean())
            result.kld_p99 = float(np.percentile(kld_all, 99))
            result.top1_agreement = float(np.concatenate(agree[name]).mean())
        results[name] = result
    return results


def _perplexity(mean_nll: float) -> float:
    """exp(mean NLL), infinite past a float's range (a mean NLL over ~709: a model that is sure of
    the wrong tokens) rather than an OverflowError."""
    return math.exp(mean_nll) if mean_nll < 709.0 else math.inf
