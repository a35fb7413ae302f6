"""Turning user text into prompt token ids: plain left-to-right prompts and fill-in-the-middle.

FIM prompts are assembled from token ids, never by tokenizing special-token strings that appear in
user text (those stay plain text):
    PSM: <fim-prefix> prefix <fim-suffix> suffix <fim-middle>      (SantaCoder's usual order)
    SPM: <fim-prefix> <fim-suffix> suffix <fim-middle> prefix      (typing at the cursor only appends)
A FIM prompt too long for the context is trimmed at its far ends: the prefix loses its start, the
suffix its end, so the text nearest the cursor is kept.

May import: `santacpu.tokenizer`, `santacpu.errors`.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import TYPE_CHECKING

from ..errors import SantacpuError, SantacpuWarning
from ..tokenizer import Tokenizer

if TYPE_CHECKING:
    from .options import GenerationOptions

STARCODER_MARKERS = ("<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<fim_pad>")
SANTACODER_MARKERS = ("<fim-prefix>", "<fim-suffix>", "<fim-middle>", "<fim-pad>", "<|endoftext|>")
FIM_ORDERS = ("psm", "spm")


def warn_about_markers(*texts: str) -> None:
    joined = "".join(texts)
    if any(m in joined for m in STARCODER_MARKERS):
        warnings.warn(
            "the text contains StarCoder-style FIM markers such as <fim_prefix>: SantaCoder spells them with "
            "hyphens (<fim-prefix>) and santacpu inserts them itself; here they are plain text",
            SantacpuWarning,
            stacklevel=3,
        )
    found = [m for m in SANTACODER_MARKERS if m in joined]
    if found:
        warnings.warn(
            f"the text contains {found[0]}, which is treated as plain text; for fill-in-the-middle pass a "
            "suffix (API) or --fim PREFIX_FILE SUFFIX_FILE (CLI)",
            SantacpuWarning,
            stacklevel=3,
        )


def build_plain_prompt(tokenizer: Tokenizer, text: str, n_ctx: int) -> list[int]:
    if not text:
        raise SantacpuError("the prompt is empty")
    warn_about_markers(text)
    if len(text) >= n_ctx * tokenizer.max_token_bytes:  # at least n_ctx tokens: said before a long encode
        raise SantacpuError(
            f"the prompt is {len(text):,} characters, more than the context's {n_ctx} tokens can hold (a token is at "
            f"most {tokenizer.max_token_bytes} bytes): shorten it, or use fill-in-the-middle, which trims long context itself"
        )
    ids = tokenizer.encode(text)
    if len(ids) >= n_ctx:
        raise SantacpuError(
            f"the prompt is {len(ids)} tokens but the context holds {n_ctx} (prompt and output together): "
            "shorten it, or use fill-in-the-middle, which trims long context itself"
        )
    return ids


def fim_special_ids(tokenizer: Tokenizer) -> frozenset[int]:
    """The ids of the tokenizer's FIM tokens (<fim-prefix>, <fim-suffix>, <fim-middle>, <fim-pad>)."""
    ids = (tokenizer.fim_prefix_id, tokenizer.fim_suffix_id, tokenizer.fim_middle_id, tokenizer.fim_pad_id)
    return frozenset(i for i in ids if i is not None)


def fim_options(options: GenerationOptions, tokenizer: Tokenizer) -> GenerationOptions:
    """`options` for a fill-in-the-middle generation: a FIM special token ends the middle (as
    llama.cpp ends at FIM pad/sep), since after it the model starts another document."""
    return dataclasses.replace(options, stop_ids=options.stop_ids | fim_special_ids(tokenizer))


def fim_budget(n_ctx: int, max_new_tokens: int) -> int:
    """Prompt tokens a FIM request may use: the context minus room for the answer (at most half)."""
    return n_ctx - min(max(max_new_tokens, 1), n_ctx // 2)


# Trimming cuts the prompt's far ends in whole steps of up to this many tokens (1/16 of the room
# for small contexts), so that while the user types (the prefix grows a token at a time) the cuts
# stay put for a step's worth of tokens and consecutive SPM prompts share all but their last tokens
# (prompt reuse). It leaves less than two steps of the room unused.
TRIM_STEP = 64
# Before tokenizing, FIM text is cut to what could reach the context (`text_limit` characters each
# side of the cursor); the prefix's cut moves in whole TEXT_CUT_STEP characters, so it stays put
# while the user types. A 40 MB prefix file had been tokenized whole (77 s, 2.9 GB) for 11 tokens.
TEXT_CUT_STEP = 4096


def text_limit(tokenizer: Tokenizer, n_ctx: int) -> int:
    """The most characters that could be `n_ctx` tokens: more can never fit the context."""
    return n_ctx * tokenizer.max_token_bytes


def text_near_cursor(prefix: str, suffix: str, limit: int) -> tuple[str, str, bool]:
    """The end of `prefix` and the start of `suffix`, each at least `limit` characters where it is
    longer (all that could reach the prompt), and whether anything was cut. The prefix's cut moves
    in whole TEXT_CUT_STEP characters from its start, so it stays put while typing appends."""
    drop = max(0, len(prefix) - limit - TEXT_CUT_STEP)
    drop -= drop % TEXT_CUT_STEP
    return prefix[drop:], suffix[:limit], bool(drop) or len(suffix) > limit


def trim_to_cursor(prefix_ids: list[int], suffix_ids: list[int], room: int) -> tuple[list[int], list[int]]:
    """Keep at most `room` tokens in all: the end of the prefix and the start of the suffix, sharing
    the room evenly unless one side needs less; each side is cut in whole TRIM_STEP steps."""
    P, S = len(prefix_ids), len(suffix_ids)
    if P + S <= room:
        return prefix_ids, suffix_ids
    step = max(1, min(TRIM_STEP, room // 16))
    keep_suffix = min(S, max(room // 2, room - P))
    if keep_suffix < S:
        keep_suffix -= keep_suffix % step  # the suffix's cut moves in whole steps
    drop_prefix = max(0, P - (room - keep_suffix))
    drop_prefix = -(-drop_prefix // step) * step  # rounded up: the prefix's cut moves in whole steps
    return prefix_ids[min(drop_prefix, P) :], suffix_ids[:keep_suffix]


def fim_prompt(
    tokenizer: Tokenizer,
    prefix_ids: list[int],
    suffix_ids: list[int],
    n_ctx: int,
    max_new_tokens: int,
    order: str = "psm",
    max_prompt_tokens: int | None = None,
) -> tuple[list[int], list[int], list[int]]:
    """(the FIM prompt's ids, the kept prefix ids, the kept suffix ids) for tokenized prefix and
    suffix: trimmed at the far ends to leave room for `max_new_tokens` (and to at most
    `max_prompt_tokens` in all, when given), without a word (callers say it their way: a warning,
    or a server's `truncated`)."""
    if order not in FIM_ORDERS:
        raise SantacpuError(f"unknown FIM order '{order}' (choose psm or spm)")
    special = (tokenizer.fim_prefix_id, tokenizer.fim_suffix_id, tokenizer.fim_middle_id)
    if None in special:
        raise SantacpuError("this tokenizer has no <fim-prefix>/<fim-suffix>/<fim-middle> tokens")
    room = fim_budget(n_ctx, max_new_tokens)
    if max_prompt_tokens is not None:
        room = min(room, max_prompt_tokens)
    kept_prefix, kept_suffix = trim_to_cursor(prefix_ids, suffix_ids, room - len(special))
    pre, suf, mid = special
    if order == "psm":
        return [pre, *kept_prefix, suf, *kept_suffix, mid], kept_prefix, kept_suffix
    return [pre, suf, *kept_suffix, mid, *kept_prefix], kept_prefix, kept_suffix


def fim_prompt_of_text(
    tokenizer: Tokenizer,
    prefix: str,
    suffix: str,
    n_ctx: int,
    max_new_tokens: int,
    order: str = "psm",
    max_prompt_tokens: int | None = None,
) -> tuple[list[int], bool]:
    """`fim_prompt` for text (first cut near the cursor, `text_near_cursor`): the prompt's ids, and
    whether anything of the prefix or suffix was left out (for callers that report it themselves:
    a server's `truncated`, an evaluation's count)."""
    prefix, suffix, cut = text_near_cursor(prefix, suffix, text_limit(tokenizer, n_ctx))
    prefix_ids, suffix_ids = tokenizer.encode(prefix), tokenizer.encode(suffix)
    ids, kept_prefix, kept_suffix = fim_prompt(
        tokenizer, prefix_ids, suffix_ids, n_ctx, max_new_tokens, order, max_prompt_tokens
    )
    return ids, cut or (len(kept_prefix), len(kept_suffix)) != (len(prefix_ids), len(suffix_ids))


def build_fim_prompt(
    tokenizer: Tokenizer, prefix: str, suffix: str, n_ctx: int, max_new_tokens: int, order: str = "psm"
) -> list[int]:
    warn_about_markers(prefix, suffix)
    characters = len(prefix), len(suffix)
    prefix, suffix, cut = text_near_cursor(prefix, suffix, text_limit(tokenizer, n_ctx))
    prefix_ids, suffix_ids = tokenizer.encode(prefix), tokenizer.encode(suffix)
    ids, kept_prefix, kept_suffix = fim_prompt(tokenizer, prefix_ids, suffix_ids, n_ctx, max_new_tokens, order)
    if cut or (len(kept_prefix), len(kept_suffix)) != (len(prefix_ids), len(suffix_ids)):
        of = (f"of {characters[0]:,} and {characters[1]:,} characters" if cut
              else f"of {len(prefix_ids)} and {len(suffix_ids)} tokens")
        warnings.warn(
            f"the FIM prompt did not fit the {n_ctx}-token context with room for {n_ctx - fim_budget(n_ctx, max_new_tokens)} "
            "new tokens: "
            f"kept the last {len(kept_prefix)} prefix tokens and the first {len(kept_suffix)} suffix tokens ({of})",
            SantacpuWarning,
            stacklevel=2,
        )
    return ids
