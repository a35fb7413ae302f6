"""The bench's report: the headline figures, flat (`summarize`: what tools/bench_peers.py
compares), and the readable table `santacpu bench` prints (`format_table`).

May import: nothing of santacpu.
"""

from __future__ import annotations

import math

# The bound of issue 4 item 6: peak RSS at a 2048-token context within file size + 150 MB.
RSS_BOUND_EXTRA_MB = 150
# A timed run shorter than this measures the timer, the caches and Python more than the model.
MEANINGFUL_RUN_S = 1.0
# Prompt lookup's speed-up means something only over this many drafted tokens.
MEANINGFUL_DRAFTS = 20


def short_run_warnings(report: dict) -> list[str]:
    """Why some figures of `report` mean little: runs too short to time (a tiny model), a model
    small enough to read from the CPU's caches, too few drafted tokens. Empty for a full-size run."""
    s, settings, results = report["summary"], report["settings"], report["results"]
    speed, lookup = results.get("speed", {}), results.get("lookup", {})
    notes = []
    short = []
    if s.get("prefill_tok_s"):
        short.append(("prefill", settings["prompt_tokens"] / s["prefill_tok_s"]))
    if s.get("decode_tok_s"):
        short.append(("decode", speed["decode_tokens_done"] / s["decode_tok_s"]))
    for case in ("echo", "plain"):
        if lookup.get(case, {}).get("lookup_tok_s"):
            short.append((f"prompt lookup ({case})", lookup[case]["generated_tokens"] / lookup[case]["lookup_tok_s"]
                          if "generated_tokens" in lookup[case] else 0.0))
    too_short = [f"{what} {seconds * 1e3:.0f} ms" for what, seconds in short if seconds < MEANINGFUL_RUN_S]
    if too_short:
        notes.append(
            f"runs too short to mean anything ({', '.join(too_short)}; under {MEANINGFUL_RUN_S:.0f} s each): their "
            "speeds are mostly timer, cache and Python noise; bench a full-size model (santacpu random-checkpoint "
            "DIR --size full) for figures that compare"
        )
    if s.get("decode_gb_s") and s.get("read_speed_gb_s") and s["decode_gb_s"] > s["read_speed_gb_s"]:
        notes.append(
            f"decode read the weights at {100 * s['decode_gb_s'] / s['read_speed_gb_s']:.0f}% of the file's read "
            f"speed: the weights ({speed['decode_weight_bytes'] / 1e6:.1f} MB) fit in the CPU's caches, so that "
            "share says nothing about memory bandwidth"
        )
    drafts = [lookup[c]["drafted_tokens"] for c in ("echo", "plain") if lookup.get(c, {}).get("drafted_tokens") is not None]
    if drafts and min(drafts) < MEANINGFUL_DRAFTS:
        notes.append(
            f"prompt lookup drafted only {min(drafts)} tokens (under {MEANINGFUL_DRAFTS}): its speed-up and "
            "acceptance are not a measurement"
        )
    return notes


def summarize(results: dict, file_bytes: int) -> dict:
    """The headline figures, flat: what tools/bench_peers.py compares."""
    speed, memory, load, compile_ = (results.get(k, {}) for k in ("speed", "memory", "load", "compile"))
    summary = {
        "load_warm_s": speed.get("load_s"),
        "load_cold_s": load.get("load_s"),
        "first_forward_warm_s": speed.get("first_forward_s"),
        "first_forward_cold_s": load.get("first_forward_s"),
        "prefill_tok_s": speed.get("prefill_tok_s"),
        "decode_tok_s": speed.get("decode_tok_s"),
        "decode_gb_s": (
            speed["decode_tok_s"] * speed["decode_weight_bytes"] / 1e9 if speed.get("decode_weight_bytes") else None
        ),
        "read_speed_gb_s": results.get("read_speed", {}).get("gb_s"),
        "fim_ttft_s": speed.get("fim_ttft_s"),
        "compile_first_run_s": compile_.get("first_run", {}).get("total_s"),
        "compile_cached_run_s": compile_.get("cached_run", {}).get("total_s"),
        "peak_rss_mb": memory.get("peak_rss_mb"),
        "rss_runtime_mb": memory.get("rss_runtime_mb"),
        "peak_rss_speed_run_mb": speed.get("peak_rss_mb"),
        "file_mb": file_bytes / 1e6,
    }
    lookup = results.get("lookup", {})
    for case in ("echo", "plain"):
        if case in lookup:
            summary[f"lookup_{case}_speedup"] = lookup[case]["speedup"]
            summary[f"lookup_{case}_identical"] = lookup[case]["identical_output"]
    if results.get("batch"):
        summary["batch_aggregate_tok_s"] = {b: r["aggregate_tok_s"] for b, r in results["batch"]["sizes"].items()}
    if memory:
        summary["rss_bound_mb"] = file_bytes / 1e6 + RSS_BOUND_EXTRA_MB
    return summary


def format_table(report: dict) -> str:
    """The readable table `santacpu bench` prints: a header, then one block of rows a part."""
    s, m, settings, results = report["summary"], report["model"], report["settings"], report["results"]
    machine = report["machine"]
    lines = [
        f"model    {_model_line(m)} ({m['weights_type']}, {m['file_bytes'] / 1e6:.0f} MB)",
        (
            f"machine  {machine['cpu']}, {machine['usable_cores']} cores usable; integer kernels "
            f"{machine.get('integer_kernels') or 'off'}; santacpu {report['santacpu_version']}; "
            f"{settings['threads']} threads; speeds are "
            + ("from one run" if settings["statistic"] == "median of 1" else f"the {settings['statistic']} runs")
        ),
        "",
    ]

    def row(what: str, value: str, note: str = "") -> None:
        lines.append(f"  {what:<52}{value:>14}  {note}".rstrip())

    for part, rows in (
        ("speed", _speed_rows),
        ("lookup", _lookup_rows),
        ("load", _load_rows),
        ("compile", _compile_rows),
        ("memory", _memory_rows),
        ("batch", _batch_rows),
    ):
        if part in results:
            rows(row, s, settings, results[part])
    if "speed" in results:
        row("peak RSS, speed run", f"{s['peak_rss_speed_run_mb']:.0f} MB")
    return "\n".join(lines)


def _batch_rows(row, s: dict, settings: dict, batch: dict) -> None:
    single = batch["sizes"].get("1", {}).get("aggregate_tok_s")
    for size, b in batch["sizes"].items():
        note = f"{b['per_sequence_tok_s']:.2f} tok/s a sequence; peak RSS {b['peak_rss_mb']:.0f} MB"
        if single:
            note += f"; {b['aggregate_tok_s'] / single:.2f}x B = 1"
        row(
            f"batched decode, B = {size} ({batch['prompt_tokens']}-token prompts, {batch['decode_tokens']} tokens)",
            f"{b['aggregate_tok_s']:.1f} tok/s",
            note,
        )


def _speed_rows(row, s: dict, settings: dict, speed: dict) -> None:
    row(f"prefill, {settings['prompt_tokens']}-token prompt", f"{s['prefill_tok_s']:.1f} tok/s")
    row(f"decode, {speed['decode_tokens_done']} tokens (greedy)", f"{s['decode_tok_s']:.2f} tok/s")
    if s.get("decode_gb_s") is not None:
        note = f"{speed['decode_weight_bytes'] / 1e6:.0f} MB of weights a token"
        if s.get("read_speed_gb_s"):
            note += (
                f"; this file's pages read at {s['read_speed_gb_s']:.1f} GB/s "
                f"({100 * s['decode_gb_s'] / s['read_speed_gb_s']:.0f}% of it)"
            )
        row("decode, weights read", f"{s['decode_gb_s']:.1f} GB/s", note)
    if s["fim_ttft_s"] is not None:
        row(f"FIM time to first token, {speed['fim_prompt_tokens']}-token prompt", f"{s['fim_ttft_s']:.3f} s")
    row("load, warm page cache", f"{s['load_warm_s']:.2f} s", f"first forward {s['first_forward_warm_s']:.2f} s")
    row("device", speed.get("device", "cpu"))
    if "cuda" in speed:
        _cuda_rows(row, speed["cuda"], speed["decode_weight_bytes"])


def _cuda_rows(row, c: dict, weight_bytes: int) -> None:
    if "error" in c:
        row("GPU decode step taken apart", "failed", c["error"])
        return
    overhead = c["decode_step_ms"] - c["kernel_ms"]
    row(
        f"GPU decode step at the prompt's end ({c['launches']} launches, {c['prepared_launches']} prepared)",
        f"{c['decode_step_ms']:.2f} ms",
        f"kernels {c['kernel_ms']:.2f} ms; launch overhead {overhead:.2f} ms ({1e3 * overhead / c['launches']:.1f} us a launch)",
    )
    if c["copy_gb_s"]:
        bound_ms = 1e3 * weight_bytes / (c["copy_gb_s"] / 2 * 1e9)
        note = f"reading the weights once at half of it: {bound_ms:.3f} ms a token"
        row("GPU copy bandwidth (read + write)", f"{c['copy_gb_s']:.0f} GB/s", note)
    for label, k in sorted(c["kernels"].items(), key=lambda item: -item[1]["ms"])[:12]:
        rate = f"; {k['gb_s']:.0f} GB/s" if k["gb_s"] else ""
        row(f"  kernel {label}", f"{k['ms']:.3f} ms", f"{k['launches']} launches{rate}")
    row("GPU prefill of the prompt, kernels only", f"{c['prefill_kernel_ms']:.2f} ms")
    for label, k in sorted(c["prefill_kernels"].items(), key=lambda item: -item[1]["ms"])[:6]:
        row(f"  kernel {label}", f"{k['ms']:.3f} ms", f"{k['launches']} launches")
    row(
        "GPU memory: weights + KV cache (full context)",
        f"{(c['weight_bytes'] + c['kv_bytes_full_context']) / 1e6:.0f} MB",
        f"weights {c['weight_bytes'] / 1e6:.0f} MB; driver reports {_number(c['device_memory_used_bytes'] and c['device_memory_used_bytes'] / 1e6)} MB in use",
    )


def _lookup_rows(row, s: dict, settings: dict, lookup: dict) -> None:
    for case, label in (("echo", "echoing prompt"), ("plain", "plain code prompt")):
        if case in lookup:
            c = lookup[case]
            accepted = f"{c['accepted_tokens']}/{c['drafted_tokens']} drafted tokens accepted"
            same = "identical output" if c["identical_output"] else "OUTPUT DIFFERS"
            speedup = f"{c['speedup']:.2f}x" if c["speedup"] else "n/a"
            row(
                f"prompt lookup vs plain decode, {label}",
                speedup,
                f"{_number(c['lookup_tok_s'])} vs {_number(c['plain_tok_s'])} tok/s; {accepted}; {same}",
            )


def _load_rows(row, s: dict, settings: dict, load: dict) -> None:
    row(
        "load, cold page cache (best-effort drop)",
        f"{s['load_cold_s']:.2f} s",
        f"first forward {s['first_forward_cold_s']:.2f} s (reads the weights from disk)",
    )


def _compile_rows(row, s: dict, settings: dict, compile_: dict) -> None:
    for key, label in (("first_run", "Numba, first run (compiles)"), ("cached_run", "Numba, on-disk cache")):
        c = compile_[key]
        row(
            label,
            f"{c['total_s']:.2f} s",
            f"import {c['import_s']:.2f} + load {c['load_s']:.2f} + tiny forward "
            f"{c['tiny_forward_s']:.2f} (again: {c['tiny_forward_again_s']:.3f})",
        )


def _memory_rows(row, s: dict, settings: dict, mem: dict) -> None:
    over = s["peak_rss_mb"] - s["file_mb"]
    row(
        f"peak RSS, {mem['context_tokens']}-token context",
        f"{s['peak_rss_mb']:.0f} MB",
        f"file {s['file_mb']:.0f} MB {over:+.0f} (bound +{RSS_BOUND_EXTRA_MB}: "
        f"{'within' if over <= RSS_BOUND_EXTRA_MB else 'over'})",
    )
    if s.get("rss_runtime_mb") is not None:
        runtime = s["rss_runtime_mb"]
        row("  of which the runtime, before the model runs", f"{runtime:.0f} MB",
            "all but the weights (mapped, or copied into row groups at load): Python, NumPy, Numba "
            "with LLVM's code, the tokenizer, tensors converted at load")
        work = over - runtime  # a model much smaller than the runtime's noise can come out negative
        row("  of which the model's work above the file", f"{work:+.0f} MB" if work >= 1 else "under 1 MB",
            "KV cache, activations, kernel buffers")


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _model_line(model: dict) -> str:
    """The model as given, and the file that ran where that differs (a cached quantization)."""
    name, path = model.get("name"), model["path"]
    return path if name in (None, path) else f"{name}: {path}"


def finite_only(value):
    """`value` (the report's nested dicts and lists) with every non-finite float as None: strict
    JSON has no NaN or Infinity, and a figure a tiny run cannot measure may be one."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_only(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_only(item) for item in value]
    return value
