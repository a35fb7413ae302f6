"""Measured upgrade gains: how much mean KL divergence (against full precision, on calibration
text) raising each linear weight from the 4-bit type to q6_0 or q8_0 would cut, so that the
upgrade budget buys the most KLD per byte (`policy.Policy.assign` with `gains`).

Estimate, per layer i (the rest of the model in full precision):
- KLD_i: the mean KLD of the model's next-token distributions when layer i's four linear weights
  are at the 4-bit type (one forward from layer i's cached input to the LM head);
- e(w, t): the squared change of layer i's output when only weight w is at type t (one layer
  forward each);
- the cut of upgrading w to t: KLD_i * (e(w, 4-bit) - e(w, t)) / sum over the layer's weights of
  e(w', 4-bit).
So a layer's depth sets how much its errors cost at the output (measured, not assumed), and its
weights share that cost by what each adds to the layer's output. Cost: about L^2/2 + 13 L layer
forwards over `SENSITIVITY_TOKENS` tokens and three roundings of each weight, against L^2 * 4
forwards to the head for each weight's own measurement (tools/upgrade_sensitivity.py does that,
on small models, to check these choices).

The embedding rows of the most used tokens are measured directly: the whole model's KLD with the
embedding at its type, less that with the k most used rows raised, for each k (one forward of
the model per k).

May import: numpy, `santacpu` (network, loading, formats, progress), `quantize.policy`.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from santacpu.formats.blocks import FORMATS
from santacpu.formats.fits import QUANTIZING_THREADS
from santacpu.loading.checkpoint import CheckpointReader
from santacpu.network import reference as ref
from santacpu.network.divergence import against_reference, row_distribution
from santacpu.network.weights import LINEAR_WEIGHTS as LINEAR
from santacpu.progress import Progress

from .policy import EMBEDDING_ROW_COUNTS, EMBEDDING_TYPE, ROW_UPGRADE_TYPE, UPGRADE_TYPES, whole_blocks

SENSITIVITY_TOKENS = 128  # the first calibration tokens, in sequences as calibration cut them


def _roundtrip(qtype: str, weight: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    fmt = FORMATS[qtype]
    return fmt.dequantize(fmt.quantize(weight, importance)).astype(np.float32, copy=False)


def measure_upgrade_gains(reader: CheckpointReader, sequences: list[list[int]], qtype: str,
                          importance: dict[str, np.ndarray] | None = None,
                          most_used: np.ndarray | None = None) -> dict[str, dict]:
    """{canonical name of each linear weight: {upgrade type: estimated mean-KLD cut}}, and with
    `most_used` (token ids, most used first) "wte": {k: mean-KLD cut of raising the embedding rows
    of the k most used tokens to ROW_UPGRADE_TYPE} for k in EMBEDDING_ROW_COUNTS, and for k = the
    vocabulary size, of raising the whole matrix (a cut can be 0, never negative: an upgrade that
    does not help is not bought)."""
    c = reader.config
    eps = c.layer_norm_epsilon
    picked, count = [], 0
    for s in sequences:
        if count >= SENSITIVITY_TOKENS:
            break
        picked.append(s[: SENSITIVITY_TOKENS - count])
        count += len(picked[-1])
    wte, wpe = reader.wte(), reader.wpe()
    ln_f = reader.ln_f()

    def layer_forward(x: np.ndarray, layer) -> np.ndarray:  # x [T, E] -> [T, E]
        x = x + ref.attention(ref.layer_norm(x, layer.ln_1_weight, layer.ln_1_bias, eps), layer, c.n_head, c.n_kv_head)
        return x + ref.mlp(ref.layer_norm(x, layer.ln_2_weight, layer.ln_2_bias, eps), layer)

    def logits(x: np.ndarray, table=wte) -> np.ndarray:  # the tied LM head's [T, V]
        return ref.linear(ref.layer_norm(x, *ln_f, eps), table)

    def through_layers(states: list[np.ndarray], first: int = 0, inputs: list | None = None) -> list[np.ndarray]:
        """states (one [T, E] per sequence) through layers first.., each layer's input appended to
        `inputs` when given; each layer's source pages released after it."""
        for j in range(first, c.n_layer):
            if inputs is not None:
                inputs.append(states)
            layer = reader.layer(j)
            states = [layer_forward(x, layer) for x in states]
            reader.release(layer)
        return states

    inputs: list[list[np.ndarray]] = []  # inputs[i][k]: layer i's input for sequence k
    states = through_layers([ref.dense(wte[np.asarray(s)]) + ref.dense(wpe[: len(s)]) for s in picked], 0, inputs)
    reference = []  # per sequence: the full-precision model's (log-probabilities, probabilities) [T, V]
    for x in states:
        z = logits(x)
        logp, p = np.empty(z.shape), np.empty(z.shape)
        row_distribution(z, np.zeros(len(z), np.int64), np.empty(len(z)), np.empty(len(z), np.int64), logp, p)
        reference.append((logp, p))

    def mean_kld(outputs: list[np.ndarray], table=wte) -> float:
        total = 0.0
        for (ref_logp, ref_p), x in zip(reference, outputs):
            T = len(x)
            kld = np.empty(T)
            against_reference(ref_logp, ref_p, logits(x, table), np.zeros(T, np.int64), np.empty(T), kld, np.empty(T, np.int64))
            total += float(kld.sum())
        return total / count

    def embedding_kld(table: np.ndarray) -> float:  # the whole model with this embedding / LM head
        return mean_kld(through_layers([table[np.asarray(s)] + ref.dense(wpe[: len(s)]) for s in picked]), table)

    gains: dict[str, dict[str, float]] = {}
    progress = Progress(c.n_layer, "measuring upgrades")
    with ThreadPoolExecutor(QUANTIZING_THREADS, thread_name_prefix="santacpu-measure") as pool:
        for i in range(c.n_layer):
            layer = reader.layer(i)
            exact = [layer_forward(x, layer) for x in inputs[i]]
            low = {}
            measured = [name for name in LINEAR if whole_blocks(getattr(layer, name).shape)]  # (others stay float16)
            weights = {name: np.asarray(getattr(layer, name), dtype=np.float32) for name in measured}
            imps = {name: None if importance is None else importance.get(f"h.{i}.{name}") for name in measured}
            errors = {name: {} for name in measured}
            for t in (qtype, *UPGRADE_TYPES):
                # The 4-bit rounding as the file will have it; the upgrades' 4-16x smaller errors
                # without the importance search (10x faster, the same ranking). The layer's weights
                # are rounded together, on threads (the block fits release the GIL).
                imp_of = imps if t == qtype else dict.fromkeys(measured)
                rounded = dict(zip(measured, pool.map(_roundtrip, [t] * len(measured), weights.values(), imp_of.values())))
                for name in measured:
                    changed = dataclasses.replace(layer, **{name: rounded[name]})
                    if t == qtype:
                        low[name] = rounded[name]
                    errors[name][t] = sum(float(((layer_forward(x, changed) - e) ** 2).sum()) for x, e in zip(inputs[i], exact))
                del rounded
            outputs = [layer_forward(x, dataclasses.replace(layer, **low)) for x in inputs[i]]
            reader.release(layer)
            kld = mean_kld(through_layers(outputs, i + 1))
            total = sum(errors[n][qtype] for n in measured) or 1.0
            for name in measured:
                gains[f"h.{i}.{name}"] = {t: max(0.0, kld * (errors[name][qtype] - errors[name][t]) / total) for t in UPGRADE_TYPES}
            progress.step(f"layer {i}")
    counts = [k for k in EMBEDDING_ROW_COUNTS if most_used is not None and k <= len(most_used) and k < c.vocab_size]
    if most_used is not None and whole_blocks(wte.shape):
        imp = None if importance is None else importance.get("wte")
        table = _roundtrip(EMBEDDING_TYPE[qtype], np.asarray(wte, np.float32), imp)
        base = embedding_kld(table)
        gains["wte"] = {}
        if counts:
            top = np.asarray(most_used[: counts[-1]])
            raised = _roundtrip(ROW_UPGRADE_TYPE, np.asarray(wte[top], np.float32), imp)
            for k in counts:  # growing: each step raises the next rows in place
                table[top[:k]] = raised[:k]
                gains["wte"][k] = max(0.0, base - embedding_kld(table))
        # every row: the whole matrix at ROW_UPGRADE_TYPE (policy.embedding_upgrade_bytes)
        gains["wte"][c.vocab_size] = max(0.0, base - embedding_kld(_roundtrip(ROW_UPGRADE_TYPE, np.asarray(wte, np.float32), imp)))
    return gains
