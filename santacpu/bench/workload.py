"""What the bench's children feed the model: `n` token ids of real code, FIM texts of a given
prompt length, and the bytes of weights a decode step reads.

May import: `santacpu.sample_code`, `santacpu.generation.prompts` (lazily), numpy.
"""

from __future__ import annotations


def text_token_stream(tokenizer, n: int, vocab_size: int) -> list[int]:
    """`n` token ids of real code: the standard library's sources in a fixed order, tokenized and
    repeated if short; deterministic random ids if no source text can be read."""
    ids: list[int] = []
    try:
        from ..sample_code import stdlib_files

        files = stdlib_files()
    except (ImportError, OSError, KeyError):  # no standard library sources here: fall back below
        files = []
    for path in files:
        try:
            ids += tokenizer.encode(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
        if len(ids) >= n:
            return ids[:n]
    if not ids:
        import numpy as np

        return [int(i) for i in np.random.default_rng(0).integers(0, min(vocab_size, 49152), n)]
    return (ids * (n // len(ids) + 1))[:n]


def fim_texts(tokenizer, ids: list[int], n_prompt: int, n_ctx: int) -> tuple[str, str]:
    """(prefix, suffix) texts whose FIM prompt (3 marker tokens included) is close to `n_prompt`
    tokens and fits the context with room for one new token: three quarters before the cursor."""
    from ..generation.prompts import build_fim_prompt, fim_budget

    room = min(n_prompt, fim_budget(n_ctx, 1))
    body = n_prompt - 3
    while True:
        cut = body * 3 // 4
        prefix, suffix = tokenizer.decode(ids[:cut]), tokenizer.decode(ids[cut:body])
        excess = len(build_fim_prompt(tokenizer, prefix, suffix, n_ctx * 4, 1)) - room
        if excess <= 0 or body <= 2:
            return prefix, suffix
        body -= excess  # decoding and re-encoding may merge or split a token at the cuts


def decode_weight_bytes(weights) -> int:
    """Bytes of weights one decode step reads: every layer's four matrices and the LM head (the
    embedding tables give one row each, the small vectors are left out)."""
    matrices = [weights.wte]
    for layer in weights.layers:
        matrices += [layer.attn_c_attn_weight, layer.attn_c_proj_weight, layer.mlp_c_fc_weight, layer.mlp_c_proj_weight]
    return sum(int(m.nbytes) for m in matrices)
