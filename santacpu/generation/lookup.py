"""Prompt-lookup drafting for speculative greedy decoding.

Code completions often repeat text already in the context (names, argument lists, whole lines).
`PromptLookup` guesses the next few tokens by finding the latest earlier occurrence of the
context's last n tokens (n = 3, then 2, then 1) and proposing what followed it. The model then
checks the guess in one batched forward (see `Model.generate`): the output is exactly greedy
decoding's, only faster when the guesses are right. A guess that reaches the end of the context
keeps copying from its own start, so a repeating pattern (a loop, a run of "2222") drafts in full.

Guesses cost a wider forward when they are wrong, so the draft width adapts: it doubles while drafts
are accepted whole, halves when one is rejected outright, and after consecutive outright rejections
drafting pauses for 1, 3, 7, ... (at most `MAX_PAUSE`) steps, so a completion that does not echo
its context pays for a handful of probes, not one wide forward per token.

May import: the standard library only.
"""

from __future__ import annotations

from collections.abc import Sequence

DEFAULT_DRAFT_TOKENS = 6
MAX_NGRAM = 3
FIRST_WIDTH = 2  # first draft width: cheap to be wrong, and doubling reaches the maximum in 2 steps
MAX_PAUSE = 64  # most steps without drafting after repeated outright rejections


class PromptLookup:
    """The context so far (prompt, then every token the model chose) and an index of its n-grams."""

    def __init__(self, context: Sequence[int], max_draft: int = DEFAULT_DRAFT_TOKENS, max_ngram: int = MAX_NGRAM):
        self.max_draft = max_draft
        self.max_ngram = max_ngram
        self.tokens: list[int] = []
        # n-gram (tuple of n ids) -> position of the token that followed its latest occurrence
        self._followed_at: dict[tuple[int, ...], int] = {}
        self.width = min(FIRST_WIDTH, max_draft)
        self._misses = 0  # consecutive drafts rejected outright
        self._pause = 0  # steps left without drafting
        for token in context:
            self.append(token)

    def append(self, token: int) -> None:
        """Add the next context token (index the n-grams that it follows)."""
        tokens, p = self.tokens, len(self.tokens)
        tokens.append(token)
        for n in range(1, min(self.max_ngram, p) + 1):
            self._followed_at[tuple(tokens[p - n : p])] = p

    def draft(self, limit: int) -> list[int]:
        """Up to min(width, limit) guessed next tokens; [] when nothing matches or drafting pauses."""
        if self._pause > 0:
            self._pause -= 1
            return []
        tokens, n_tokens = self.tokens, len(self.tokens)
        for n in range(min(self.max_ngram, n_tokens), 0, -1):  # the longest match is the best guess
            start = self._followed_at.get(tuple(tokens[n_tokens - n :]))
            if start is not None:  # start <= n_tokens - 1: an earlier occurrence, never the tail itself
                return self._copy_from(start, min(self.width, limit))
        return []

    def _copy_from(self, start: int, n: int) -> list[int]:
        """n tokens copied from `start` on; past the context's end the copy continues from its own
        beginning (as LZ77 copies overlap), so a repeating pattern drafts in full."""
        tokens, n_tokens = self.tokens, len(self.tokens)
        draft = tokens[start : start + n]
        while len(draft) < n:
            draft.append(draft[start + len(draft) - n_tokens])
        return draft

    def feedback(self, drafted: int, accepted: int) -> None:
        """Adapt the width to how the last draft of `drafted` tokens fared."""
        if accepted == drafted:
            self.width = min(self.max_draft, 2 * self.width)
        if accepted > 0:
            self._misses = 0
            return
        self.width = max(1, self.width // 2)
        self._misses = min(self._misses + 1, MAX_PAUSE.bit_length())
        self._pause = min(MAX_PAUSE, 2**self._misses - 1)
