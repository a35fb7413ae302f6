"""Prompt reuse while typing: what one more character at the cursor costs, SPM beside PSM.

    python -m tools.bench_typing MODEL [--source FILE] [--typed "    x"] [--fit-only]

For a source file cut mid-way (the cursor), runs a fresh FIM request, then the same request with
`--typed` appended to the prefix, and prints for each FIM order: prompt tokens, time to first token
of the fresh request and of the keystroke, and how many prompt tokens the keystroke reused and
computed (`Model.last_stats`). Two files: one that fits the context, and (unless --fit-only) one
longer than it, which `build_fim_prompt` trims at its far ends.
(`santacpu bench` measures prompt-lookup decoding and the fresh FIM time to first token.)
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import santacpu
from santacpu.generation.prompts import build_fim_prompt

NEW_TOKENS = 4


def keystroke(model, prefix: str, suffix: str, order: str, typed: str) -> str:
    n_ctx = model.config.n_positions
    model.clear_prompt_cache()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the long file's trimming warning
        before = build_fim_prompt(model.tokenizer, prefix, suffix, n_ctx, NEW_TOKENS, order=order)
        after = build_fim_prompt(model.tokenizer, prefix + typed, suffix, n_ctx, NEW_TOKENS, order=order)
    list(model.generate(before, max_new_tokens=NEW_TOKENS))
    fresh = model.last_stats.time_to_first_token
    list(model.generate(after, max_new_tokens=NEW_TOKENS))
    s = model.last_stats
    return (f"{order}: prompt {len(after)} tokens, fresh TTFT {fresh:.2f} s; keystroke: {s.computed_tokens} "
            f"computed, {s.reused_tokens} reused, TTFT {s.time_to_first_token:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--source", default=str(Path(argparse.__file__)), help="A long source file (UTF-8).")
    parser.add_argument("--typed", default="    x", help="Text typed at the cursor.")
    parser.add_argument("--fit-only", action="store_true", help="Skip the file longer than the context.")
    args = parser.parse_args()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = santacpu.load(args.model)
    tok, n_ctx = model.tokenizer, model.config.n_positions
    ids = tok.encode(Path(args.source).read_text(encoding="utf-8"))
    list(model.generate(ids[:16], max_new_tokens=4))  # kernels compiled or loaded: not timed below
    files = {"fits the context": tok.decode(ids[: (n_ctx - 16) * 3 // 4])}
    if not args.fit_only:
        files["longer than the context"] = tok.decode(ids[: 2 * n_ctx])
    for name, text in files.items():
        cut = text.index("\n", len(text) // 2) + 1
        print(f"{len(tok.encode(text))}-token file ({name}), {args.typed!r} typed at the cursor:")
        for order in ("spm", "psm"):
            print("  " + keystroke(model, text[:cut], text[cut:], order, args.typed))


if __name__ == "__main__":
    main()
