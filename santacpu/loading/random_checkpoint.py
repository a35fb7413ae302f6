"""Deterministic random SantaCoder-architecture checkpoints in both published layouts (NumPy only).

The real weights are out of reach here, so tests and benchmarks run on checkpoints made by this
module: tiny ones for exactness tests (the real 49280-row vocabulary, a few narrow layers) and
full-size ones (SantaCoder's exact shapes, 1.1 B parameters) for speed and memory.

Every tensor is drawn from its own generator seeded by (seed, crc32 of its canonical name), with
`Generator.random(dtype=float32)`, which maps PCG64's raw bits directly (stable across NumPy
versions), so the same seed gives the same weights in either layout, in any order, without torch.
Files are written tensor by tensor: a full-size checkpoint never sits whole in memory.

Part of the package, so that santacpu can be tried without the real weights after a plain install:

    santacpu random-checkpoint OUT_DIR [--size tiny|micro|trained|full] [--layout gpt_bigcode|legacy]
        [--dtype float32|float16] [--seed 0] [--multi-head] [--force]

OUT_DIR must be new or empty (a model folder's own weights, config and tokenizer would be
replaced); `--force` (`force=True`) writes into it anyway.

(`python -m tools.random_checkpoint` in a clone does the same.)

May import: numpy, `santacpu.formats.safetensors_io`, `santacpu.atomic_file`, `santacpu.progress`,
`santacpu.signals`, `santacpu.errors`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np

from ..atomic_file import (
    check_writable, owned_temp_folder, remove_abandoned_folders, remove_stale_partials, writable_target,
    write_text_atomically,
)
from ..errors import SantacpuError, os_problem
from ..formats.safetensors_io import dtype_name_of, write_safetensors
from ..progress import Progress
from ..signals import signals_held

LAYOUTS = ("gpt_bigcode", "legacy")
DTYPES = ("float32", "float16")
TOKENIZER_JSON = Path(__file__).parents[1] / "data" / "tokenizer.json"  # the bundled SantaCoder tokenizer

SIZES = {
    # Tiny: real vocabulary, short context so context-end behaviour is cheap to test.
    "tiny": dict(vocab_size=49280, n_positions=64, n_embd=64, n_layer=2, n_head=4, n_inner=256),
    "full": dict(vocab_size=49280, n_positions=2048, n_embd=2048, n_layer=24, n_head=16, n_inner=8192),
    # The shape of tools/train_tiny.py's trained fixture (tests/fixtures/trained_tiny).
    "trained": dict(vocab_size=49280, n_positions=256, n_embd=128, n_layer=4, n_head=4, n_inner=512),
    # Trained, wide: the second trained fixture's shapes (tests/fixtures/trained_wide): a body ~20%
    # of the weights (trained's is ~10%), so 4-bit choices for the body show in its accuracy.
    "trained_wide": dict(vocab_size=49280, n_positions=256, n_embd=256, n_layer=4, n_head=8, n_inner=1024),
    # Trained, deep: the third trained fixture's shapes (tests/fixtures/trained_deep): 12 layers of
    # the wide one's width, a body ~40% of the weights, so error that builds up through depth shows.
    "trained_deep": dict(vocab_size=49280, n_positions=256, n_embd=256, n_layer=12, n_head=8, n_inner=1024),
    # Micro: the smallest model with the real vocabulary (the tokenizer needs it); small enough
    # (< 1 MB in float16) to commit as the pytorch_model.bin fixture of tools/make_torch_fixture.py.
    "micro": dict(vocab_size=49280, n_positions=16, n_embd=8, n_layer=1, n_head=2, n_inner=32),
    # Sim: a whole model the CUDA simulator (~20 us a multiply-add) runs in a second a token; its
    # small vocabulary is why (the real one's LM head alone would take a minute).
    "sim": dict(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, n_inner=64),
}


def config_json(size: str, layout: str, multi_query: bool = True, dtype: str = "float32") -> dict:
    """config.json as each published checkpoint spells it, with the chosen sizes (and, for the
    legacy layout, which names it, the weights' dtype)."""
    sizes = SIZES[size]
    common = dict(
        sizes,
        bos_token_id=49152,
        eos_token_id=49152,
        layer_norm_epsilon=1e-5,
        initializer_range=0.02,
        scale_attn_weights=True,
        use_cache=True,
        attn_pdrop=0.0,
        embd_pdrop=0.0,
        resid_pdrop=0.0,
    )
    if layout == "legacy":
        return dict(
            common,
            model_type="gpt2",
            architectures=["GPT2LMHeadCustomModel"],
            attention_head_type="multiquery" if multi_query else "multihead",
            activation_function="gelu_fast",
            torch_dtype=dtype,
        )
    return dict(
        common,
        model_type="gpt_bigcode",
        architectures=["GPTBigCodeForCausalLM"],
        multi_query=multi_query,
        activation_function="gelu_pytorch_tanh",
        attention_softmax_in_fp32=True,
        scale_attention_softmax_in_fp32=True,
    )


def _uniform(seed: int, name: str, shape: tuple[int, ...], center: float, std: float) -> np.ndarray:
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    half_width = std * np.sqrt(3.0)  # uniform on [-a, a] has std a/sqrt(3)
    values = rng.random(shape, dtype=np.float32)
    values *= np.float32(2 * half_width)
    values += np.float32(center - half_width)
    return values


def canonical_specs(size: str, multi_query: bool = True) -> Iterator[tuple[str, tuple[int, ...], float, float]]:
    """(gpt_bigcode name, shape, center, std) of every tensor, in file order, gpt_bigcode orientation
    ([out, in]), attention rows in santacpu's canonical Q | K | V order."""
    s = SIZES[size]
    E, I, V, P, L = s["n_embd"], s["n_inner"], s["vocab_size"], s["n_positions"], s["n_layer"]
    KV = E // s["n_head"] if multi_query else E

    def fan(fan_in):
        return 1.0 / np.sqrt(fan_in)  # keeps activations O(1) through the stack

    # Logit spread ~3: peaked enough that greedy picks are not near-ties.
    yield "transformer.wte.weight", (V, E), 0.0, 3.0 / np.sqrt(E)
    yield "transformer.wpe.weight", (P, E), 0.0, 0.5
    for i in range(L):
        p = f"transformer.h.{i}."
        yield p + "ln_1.weight", (E,), 1.0, 0.1
        yield p + "ln_1.bias", (E,), 0.0, 0.05
        yield p + "attn.c_attn.weight", (E + 2 * KV, E), 0.0, fan(E / 2)  # wider Q/K: non-uniform attention
        yield p + "attn.c_attn.bias", (E + 2 * KV,), 0.0, 0.05
        yield p + "attn.c_proj.weight", (E, E), 0.0, fan(E)
        yield p + "attn.c_proj.bias", (E,), 0.0, 0.05
        yield p + "ln_2.weight", (E,), 1.0, 0.1
        yield p + "ln_2.bias", (E,), 0.0, 0.05
        yield p + "mlp.c_fc.weight", (I, E), 0.0, fan(E)
        yield p + "mlp.c_fc.bias", (I,), 0.0, 0.05
        yield p + "mlp.c_proj.weight", (E, I), 0.0, fan(I)
        yield p + "mlp.c_proj.bias", (E,), 0.0, 0.05
    yield "transformer.ln_f.weight", (E,), 1.0, 0.1
    yield "transformer.ln_f.bias", (E,), 0.0, 0.05


def canonical_tensors(size: str, seed: int, multi_query: bool = True) -> Iterator[tuple[str, np.ndarray]]:
    """(name, float32 array) for every canonical tensor, drawn lazily one at a time."""
    for name, shape, center, std in canonical_specs(size, multi_query):
        yield name, _uniform(seed, name, shape, center, std)


def _placeholders(size: str, multi_query: bool) -> Iterator[tuple[str, np.ndarray]]:
    """Zero-memory stand-ins with the canonical shapes, to compute a layout's shapes without data."""
    for name, shape, _, _ in canonical_specs(size, multi_query):
        yield name, np.broadcast_to(np.float32(0), shape)


def _interleave_heads(array: np.ndarray, n_head: int) -> np.ndarray:
    """Canonical Q | K | V rows -> gpt_bigcode multi-head's per-head (q_h, k_h, v_h) rows."""
    qkv = array.reshape(3, n_head, -1, *array.shape[1:])
    return np.ascontiguousarray(np.swapaxes(qkv, 0, 1).reshape(array.shape))


def layout_tensors(
    canonical: Iterator[tuple[str, np.ndarray]],
    size: str,
    layout: str,
    multi_query: bool = True,
    embedding_names: tuple[str, ...] | None = None,
) -> Iterator[tuple[str, np.ndarray]]:
    """The canonical tensors renamed/transposed into a published layout."""
    s = SIZES[size]
    E, H, P = s["n_embd"], s["n_head"], s["n_positions"]
    if embedding_names is None:
        embedding_names = ("transformer.wte.weight",)
    for name, array in canonical:
        if name == "transformer.wte.weight":
            for alias in embedding_names:
                yield alias, array
            continue
        if layout == "gpt_bigcode":
            if not multi_query and ".attn.c_attn." in name:
                array = _interleave_heads(array, H)
            yield name, array
            continue
        # Legacy GPT-2 Conv1D layout: [in, out]; multi-query splits Q from the fused K/V.
        is_matrix = array.ndim == 2 and "wpe" not in name
        if name.endswith("attn.c_attn.weight") or name.endswith("attn.c_attn.bias"):
            kind = name.rsplit(".", 1)[1]
            stem = name[: -len("c_attn." + kind)]
            if multi_query:
                yield stem + "q_attn." + kind, array[:E].T if is_matrix else array[:E]
                yield stem + "kv_attn." + kind, array[E:].T if is_matrix else array[E:]
            else:
                yield name, array.T if is_matrix else array
        else:
            yield name, array.T if is_matrix else array
        if name.endswith("attn.c_proj.bias"):
            # The legacy checkpoint also carries the causal-mask buffers, which loaders must ignore.
            block = name[: -len("attn.c_proj.bias")]
            yield block + "attn.bias", np.broadcast_to(np.uint8(1), (1, 1, P, P))
            yield block + "attn.masked_bias", np.array(-1e4, dtype=np.float32)


def _check_empty(out: Path) -> None:
    """Refuse a folder that holds anything: it may be a real model whose files would be replaced."""
    try:
        held = sorted(entry.name for entry in out.iterdir()) if out.is_dir() else []
    except OSError as problem:
        raise SantacpuError(f"cannot list the folder {out}: {os_problem(problem)}") from None
    if held:
        shown = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
        raise SantacpuError(
            f"{out} is not empty (it holds {shown}): give a new or empty folder, or --force to write "
            "config.json, model.safetensors and tokenizer.json into it anyway, replacing those there"
        )


def write_checkpoint(
    out_dir: str | Path,
    *,
    size: str = "tiny",
    layout: str = "gpt_bigcode",
    dtype: str = "float32",
    seed: int = 0,
    multi_query: bool = True,
    embedding_names: tuple[str, ...] | None = None,
    with_tokenizer: bool = True,
    force: bool = False,
) -> Path:
    """Write config.json, model.safetensors (and tokenizer.json) into out_dir, which must be new
    or empty unless `force`; returns out_dir."""
    out = Path(out_dir)
    if size not in SIZES or layout not in LAYOUTS or dtype not in DTYPES:
        raise SantacpuError(
            f"unknown size, layout or dtype {size!r}, {layout!r}, {dtype!r} (choose from {', '.join(SIZES)}; "
            f"{', '.join(LAYOUTS)}; {', '.join(DTYPES)})"
        )
    if out.is_symlink():  # as for every output file: a link planted in a shared folder could lead anywhere
        raise SantacpuError(f"{out} is a symbolic link: give the folder's own path")
    files = [out / name for name in ("model.safetensors", "config.json", *(["tokenizer.json"] if with_tokenizer else []))]
    for path in files:  # (a killed run's: they would make the folder look used)
        remove_stale_partials(path)
    remove_abandoned_folders(_STAGING, out)  # (a killed run's: it would make the folder look used)
    if not force:
        _check_empty(out)
    # Each file it writes must be writable as a file before the first is written: a folder named
    # config.json (or a link, a FIFO) had left a checkpoint half made.
    for path in files:
        if path.is_dir():
            raise SantacpuError(f"{path} is a folder: the checkpoint's {path.name} cannot be written there")
        writable_target(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as problem:
        raise SantacpuError(f"cannot make the folder {out}: {os_problem(problem)}") from None
    for path in files:  # (another user's file in a sticky folder: refused now, not after the work)
        check_writable(path)
    np_dtype = np.dtype(dtype)

    def stored_dtype(array):
        return np_dtype if array.dtype == np.float32 else array.dtype

    shapes = {
        name: (tuple(array.shape), dtype_name_of(np.zeros(0, stored_dtype(array))))
        for name, array in layout_tensors(_placeholders(size, multi_query), size, layout, multi_query, embedding_names)
    }
    # The full size takes ~20 s: said as it goes (tiny ones, made by the hundred in tests, are silent).
    progress = Progress(len(shapes), f"writing {out / 'model.safetensors'}") if size != "tiny" else None

    def cast(items):
        for name, array in items:
            stored = array.astype(stored_dtype(array))
            if progress is not None:  # (before the yield: the writer takes no item after the last)
                progress.step(name)
            yield name, stored
    texts = {"config.json": json.dumps(config_json(size, layout, multi_query, dtype), indent=2) + "\n"}
    if with_tokenizer:
        texts["tokenizer.json"] = TOKENIZER_JSON.read_text(encoding="utf-8")
    # Every file is written whole in a folder of its own inside OUT, then all three take their
    # names together, Ctrl-C and SIGTERM held for those renames: a run cut short (a full disk,
    # Ctrl-C) leaves an earlier checkpoint as it was, never the weights of one beside the config of
    # another.
    try:
        staging = Path(owned_temp_folder(_STAGING, out))
    except OSError as problem:
        raise SantacpuError(f"cannot write into {out}: {os_problem(problem)}") from None
    try:
        for name, text in texts.items():
            write_text_atomically(staging / name, text)
        write_safetensors(
            staging / "model.safetensors",
            cast(layout_tensors(canonical_tensors(size, seed, multi_query), size, layout, multi_query, embedding_names)),
            metadata={"format": "pt"},
            shapes=shapes,
        )
        with signals_held():
            _publish_together(files, staging)
    except OSError as problem:
        raise SantacpuError(f"cannot finish the checkpoint in {out}: {os_problem(problem)} (the folder is as it "
                            "was)") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _publish_together(files: list[Path], staging: Path) -> None:
    """Rename each staged file over its path in `files`; where one rename fails, those done are put
    back (the earlier files were kept as hard links in `staging` first) and the error raised."""
    earlier = {}
    for path in files:
        if path.exists():
            os.link(path, staging / f"earlier-{path.name}")  # (a file system without links: nothing renamed yet)
            earlier[path] = staging / f"earlier-{path.name}"
    done: list[Path] = []
    try:
        for path in files:
            os.replace(staging / path.name, path)
            done.append(path)
    except OSError:
        for path in done:
            with contextlib.suppress(OSError):
                os.replace(earlier[path], path) if path in earlier else path.unlink()
        raise


_STAGING = ".random-checkpoint"  # OUT/.random-checkpoint-HOST-PID-XXXXXXXX: a run's files before they take their names

