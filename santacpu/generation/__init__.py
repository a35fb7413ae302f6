"""Generation pieces that need no network: sampling (`sampling`), prompt-lookup drafting
(`lookup`), prompts and fill-in-the-middle (`prompts`), streaming text with stop strings
(`text_stream`). The generation loop itself lives in `santacpu.model`.

May import: the foundation modules (errors, arguments, tokenizer); never the network, loading or
backends (independent of `santacpu.loading`).
"""
