"""Editor clients' FIM prompt templates, recognised: a prompt some client wrote for another code
model (StarCoder's `<fim_prefix>`, Qwen's and CodeGemma's `<|fim_prefix|>`, DeepSeek's
`<｜fim▁begin｜>`, CodeLlama's `<PRE> ... <SUF> ... <MID>`, Codestral's `[SUFFIX]...[PREFIX]`,
Tabby's `<|FIM|>` split, or SantaCoder's own markers written as text) is split back into its prefix
and suffix, so that the server rebuilds it as SantaCoder's FIM prompt from token ids (in the
server's order). Any other prompt is plain text.

Text before a template's first marker (a client's repository context, e.g. Qwen's `<|repo_name|>`
and `<|file_sep|>` lines) stays at the start of the prefix, as plain text.

May import: nothing of santacpu (pure text).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FimTemplate:
    """`[context] first A middle B last` with A, B the prefix and suffix (`suffix_first`: B is the
    prefix, A the suffix); `pad`: one space the template puts inside each marker's side (CodeLlama's
    `<PRE> {prefix} <SUF>{suffix} <MID>`), dropped when present."""

    name: str
    first: str
    middle: str
    last: str = ""
    suffix_first: bool = False
    pad: str = ""


# Published defaults: Continue's autocomplete templates (starcoder2, codellama, deepseek, qwen,
# codestral), twinny's, Tabby's prompt_template examples and its `<|FIM|>` split, llama.vscode's
# OpenAI mode (Qwen's markers).
TEMPLATES = (
    FimTemplate("santacoder", "<fim-prefix>", "<fim-suffix>", "<fim-middle>"),
    FimTemplate("starcoder", "<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
    FimTemplate("qwen", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
    FimTemplate("deepseek", "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),
    FimTemplate("codellama", "<PRE>", "<SUF>", "<MID>", pad=" "),
    FimTemplate("codestral", "[SUFFIX]", "[PREFIX]", suffix_first=True),
    FimTemplate("tabby", "", "<|FIM|>"),
)


def _unpad(text: str, pad: str, start: bool) -> str:
    if pad and start and text.startswith(pad):
        return text[len(pad) :]
    if pad and not start and text.endswith(pad):
        return text[: -len(pad)]
    return text


def split_fim_template(prompt: str) -> tuple[str, str, str] | None:
    """(prefix, suffix, template name) of a prompt written with a known client's FIM template, else
    None. A template matches when its markers each appear once, in order, the prompt ending with
    its last marker (or, where it has none, with the text after the middle one)."""
    for t in TEMPLATES:
        if t.middle not in prompt or (t.last and not prompt.endswith(t.last)):
            continue
        markers = [m for m in (t.first, t.middle, t.last) if m]
        if any(prompt.count(m) != 1 for m in markers):
            continue
        start = prompt.index(t.first) if t.first else 0
        context, body = prompt[:start], prompt[start + len(t.first) : len(prompt) - len(t.last)]
        if t.middle not in body:
            continue
        a, b = body.split(t.middle)
        a = _unpad(_unpad(a, t.pad, start=True), t.pad, start=False)
        b = _unpad(b, t.pad, start=False)  # CodeLlama: the suffix starts right after <SUF>
        prefix, suffix = (b, a) if t.suffix_first else (a, b)
        return context + prefix, suffix, t.name
    return None
