"""`santacpu serve`: the HTTP server's options, its API key, and the model loaded once it listens.

May import: `santacpu.server` (inside the command: the `serve` extra), `santacpu.model` (through the
package's `load`), the foundation layers, and this package's `options` and `text_input`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import OptionValueError, SantacpuError
from ..generation.prompts import FIM_ORDERS
from ..loading.source import check_local, default_model
from ..settings import Settings
from .options import MODEL_OPTION, QUANT_OPTION, REVISION_OPTION, choices, one_of
from .text_input import read_text_file


def serve(
    model: str = MODEL_OPTION,
    revision: Optional[str] = REVISION_OPTION,
    quant: Optional[str] = QUANT_OPTION,
    host: str = typer.Option(
        "127.0.0.1",
        help="Address to listen on (127.0.0.1: this machine only, answering Host names of it and localhost; "
        "0.0.0.0: every address and Host name).",
    ),
    port: int = typer.Option(8012, min=1, max=65535, help="Port to listen on (llama.vim's default: 8012)."),
    api_key: Optional[str] = typer.Option(
        None,
        help="Require 'Authorization: Bearer KEY' on every endpoint but /health (a command line is visible to every "
        "local user: prefer --api-key-file or $SANTACPU_API_KEY). Default: none.",
        show_default=False,
    ),
    api_key_file: Optional[Path] = typer.Option(
        None, readable=False, metavar="FILE", help="Read the API key from this file.", show_default=False
    ),
    max_batch: int = typer.Option(8, min=1, max=256, help="Sequences generated at once; more wait in the queue."),
    max_queue: int = typer.Option(
        64, min=0, help="Sequences that may wait beyond the batch; beyond, requests get 503 with Retry-After "
        "(0: only what the batch has room for runs)."
    ),
    fim_order: str = typer.Option(
        "spm", callback=one_of(*FIM_ORDERS), metavar=choices(*FIM_ORDERS),
        help="FIM prompt order: spm (suffix first: typing at the cursor only appends to the prompt) or psm.",
    ),
    fim_budget: Optional[int] = typer.Option(
        None, min=16, help="Most prompt tokens of a fill-in-the-middle request: a longer prefix loses its start, a "
        "longer suffix its end (a cold request computes at most this many). Default: the model's context.",
        show_default=False,
    ),
) -> None:
    """Serve completions over HTTP: llama.cpp's /infill and /completion, OpenAI's /v1/completions
    (with suffix), Ollama's /api/generate (with suffix), /api/show, /api/tags; /health, /tokenize,
    /detokenize, /props, /v1/models. Needs the 'serve' extra."""
    from .. import load
    from ..server import SERVE_EXTRA_HINT, run_server
    from ..server.app import ServerSettings

    try:
        import uvicorn  # noqa: F401  (checked before a first-use quantization that may take minutes)
    except ImportError:
        raise SantacpuError(SERVE_EXTRA_HINT) from None
    name = model or default_model()
    check_local(name)  # now, not after the server has said it listens
    settings = ServerSettings(
        model_name=name, api_key=api_key_of(api_key, api_key_file), max_batch=max_batch, max_queue=max_queue,
        fim_order=fim_order, fim_budget=fim_budget,
    )

    def load_model():  # after the server listens: a first-use quantization runs while /health says "loading"
        return load(name, revision=revision, quant=quant)

    run_server(settings, load_model, host, port)


def api_key_of(given: Optional[str], key_file: Optional[Path]) -> Optional[str]:
    """The server's key: --api-key, else --api-key-file's text, else $SANTACPU_API_KEY, else none."""
    if given is not None and key_file is not None:
        raise OptionValueError("give --api-key or --api-key-file, not both")
    # An empty key (`--api-key "$KEY"` with KEY unset) served everyone without a word; one with
    # spaces at its ends no client could send (HTTP strips them from the header).
    if given is not None and (not given.strip() or given != given.strip()):
        raise OptionValueError("--api-key is empty or has spaces at its ends: give the key itself, or leave "
                               "the option out to serve without one")
    if key_file is not None:
        given = read_text_file(key_file, "API key file").strip()
        if not given or "\n" in given:
            raise SantacpuError(f"API key file {key_file} must hold the key on one line")
    return given or Settings.from_environment().api_key


