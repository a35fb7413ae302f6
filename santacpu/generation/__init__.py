"""Generation: `GenerationOptions` (`options`), one sequence's token-level state machine
(`decoder`: choosing, drafting, verifying, stopping), running it over the model's shared prompt
cache (`runner`), sampling (`sampling`), prompt-lookup drafting (`lookup`), prompts and
fill-in-the-middle (`prompts`), streaming text with stop strings (`text_stream`).

May import: `santacpu.network` (the engine and its KV cache, never a backend), the foundation
modules; independent of `santacpu.loading`.
"""
