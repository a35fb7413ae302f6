"""Quality per byte, santacpu beside llama.cpp, on the same weights and the same text, in one run.

For a gpt_bigcode-layout checkpoint (e.g. tests/fixtures/trained_tiny) and a text file:
- llama.cpp: convert to an F16 GGUF (../shared/peers/to_gguf.py; the fixture is stored in fp16, so
  F16 is the exact model), quantize to each llama.cpp type, and score each with
  `llama-perplexity --kl-divergence` against the F16 base;
- santacpu: convert to each santacpu file variant and score it with santacpu.evaluate against the
  full-precision model, with the same chunking (n_ctx, second half of each chunk scored).
- the ladder: for each llama.cpp type from Q4_0 to Q6_K, santacpu's q4_m file sized to that type's
  tensor bytes (`--bits-per-weight`), scored the same way.
Prints the table (file bytes, tensor bytes: the vocabulary and metadata left out on both sides, mean KLD,
top-1 agreement, PPL) and the ladder, writes them as JSON, and draws size against KLD as a PNG.

    python -m tools.compare_llamacpp CHECKPOINT_DIR TEXT_FILE --llamacpp /opt/llamacpp/src
        [--ctx 256] [--max-chunks 64] [--work /tmp/compare] [--json results.json] [--chart chart.png]
    python -m tools.compare_llamacpp --results a.json b.json c.json --chart chart.png   # one panel each
Needs: a built llama.cpp (../shared/peers/build_llamacpp.sh) and the dev extra (torch, transformers,
matplotlib).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import santacpu  # noqa: E402
from quantize.calibration import SEQUENCE_TOKENS, calibration_texts, collect_importance, most_used_tokens, token_sequences  # noqa: E402
from quantize.converter import convert, tensor_shapes  # noqa: E402
from quantize.policy import Policy  # noqa: E402
from quantize.sensitivity import measure_upgrade_gains  # noqa: E402
from santacpu.loading.checkpoint import open_checkpoint  # noqa: E402
from santacpu.evaluate import score_models  # noqa: E402
from santacpu.tokenizer import Tokenizer  # noqa: E402

# The ladder: each llama.cpp type from Q4_0 to Q6_K, and santacpu's LADDER_TYPE file sized to its
# tensor bytes (`--bits-per-weight`, see ladder_bits), so the two are compared at equal size.
LADDER = ("Q4_0", "IQ4_NL", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K")
LADDER_TYPE = "q4_m"
LLAMA_TYPES = (*LADDER, "Q8_0")


@dataclass(frozen=True)
class Variant:
    """A santacpu file to make: `santacpu quantize --type qtype` with these options."""

    qtype: str
    importance: bool = True  # importance-weighted rounding (calibration)
    upgrade_budget: float | None = None  # None: the default, unless bits_per_weight is given
    bits_per_weight: float | None = None


# The defaults (`santacpu quantize --type T`), and what calibration and upgrades each buy.
SANTACPU_VARIANTS = {
    "q8_0 (default)": Variant("q8_0", importance=False),
    "q4_m (default)": Variant("q4_m"),
    "q4_0 (default)": Variant("q4_0"),
    "q4_m, no upgrades": Variant("q4_m", upgrade_budget=0.0),
    "q4_m, no upgrades, no imp": Variant("q4_m", importance=False, upgrade_budget=0.0),
    "q4_0, no upgrades, no imp": Variant("q4_0", importance=False, upgrade_budget=0.0),
}


def ladder_name(llama_type: str) -> str:
    return f"{LADDER_TYPE} at {llama_type}'s size"


def ladder_bits(checkpoint: Path, tensor_bytes: int) -> float:
    """The `--bits-per-weight` whose file holds at most `tensor_bytes` bytes of tensors: the size
    target counts the matrices (quantize/policy.SizeTarget); the rest of the tensors, LayerNorm
    parameters and biases, stay float32 whatever the target."""
    shapes = tensor_shapes(open_checkpoint(checkpoint))
    vectors = sum(4 * int(np.prod(s)) for s in shapes.values() if len(s) == 1)
    weights = sum(int(np.prod(s)) for s in shapes.values() if len(s) == 2)
    return math.floor((tensor_bytes - vectors) * 8 / weights * 1e6) / 1e6


def ladder_variants(checkpoint: Path, llama: dict) -> dict[str, Variant]:
    """One LADDER_TYPE file per ladder type llama.cpp made, sized to its tensor bytes."""
    return {ladder_name(t): Variant(LADDER_TYPE, bits_per_weight=ladder_bits(checkpoint, llama[f"llama.cpp {t}"]["tensor_bytes"]))
            for t in LADDER if f"llama.cpp {t}" in llama}


def ladder_table(rows: dict) -> list[dict]:
    """Each ladder point, llama.cpp's file beside santacpu's of its size, and whether santacpu's is
    at or below its size with a lower mean KLD."""
    table = []
    for t in LADDER:
        llama, ours = rows.get(f"llama.cpp {t}"), rows.get(f"santacpu {ladder_name(t)}")
        if llama is None or ours is None:
            continue
        keys = ("tensor_bytes", "mean_kld", "top1_agreement")
        table.append({"llama_type": t, "llama.cpp": {k: llama[k] for k in keys},
                      "santacpu": {k: ours[k] for k in keys} | {"bits_per_weight": ours["bits_per_weight"]},
                      "beats": ours["tensor_bytes"] <= llama["tensor_bytes"] and ours["mean_kld"] < llama["mean_kld"]})
    return table


def parse_llama_perplexity(output: str) -> dict:
    def number(pattern: str) -> float | None:
        match = re.search(pattern, output)
        return float(match.group(1)) if match else None

    return {
        "mean_kld": number(r"Mean\s+KLD:\s+([-\d.e]+)"),
        "kld_p99": number(r"99\.0%\s+KLD:\s+([-\d.e]+)"),
        "top1_agreement": (number(r"Same top p:\s+([-\d.e]+)") or 0.0) / 100,
        "perplexity": number(r"Mean\s+PPL\(Q\)\s*:\s+([-\d.e]+)"),
        "reference_perplexity": number(r"Mean\s+PPL\(base\)\s*:\s+([-\d.e]+)"),
    }


def tensor_bytes(path: Path, llamacpp: Path | None = None) -> int:
    """Bytes of a file's tensors alone (the vocabulary, metadata and alignment left out), as the
    comparison counts size: a GGUF's through llama.cpp's gguf-py reader, a santacpu file's from its
    safetensors header."""
    if path.suffix == ".gguf":
        sys.path.insert(0, str(llamacpp / "gguf-py"))
        from gguf import GGUFReader

        return sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors)
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return sum(end - begin for name, t in header.items() if name != "__metadata__" for begin, end in [t["data_offsets"]])


def run(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"failed: {' '.join(command)}\n{done.stderr[-3000:]}")
    return done.stdout + done.stderr


def llama_rows(checkpoint: Path, text: Path, bin_dir: Path, src: Path, work: Path, ctx: int) -> dict:
    model_dir = work / "hf"
    if not model_dir.exists():
        shutil.copytree(checkpoint, model_dir)
    if not (model_dir / "tokenizer.json").exists():
        shutil.copy(REPO / "santacpu" / "data" / "tokenizer.json", model_dir / "tokenizer.json")
    base = work / "model-F16.gguf"
    if not base.exists():
        run([sys.executable, str(REPO.parent / "shared" / "peers" / "to_gguf.py"), str(src), str(model_dir), str(base)])
    kld_base = work / "kld-base.dat"
    common = ["-f", str(text), "-c", str(ctx), "-t", "2", "-b", str(ctx)]
    run([str(bin_dir / "llama-perplexity"), "-m", str(base), *common, "--kl-divergence-base", str(kld_base)])
    rows = {}
    for qtype in LLAMA_TYPES:
        path = work / f"model-{qtype}.gguf"
        if not path.exists():
            run([str(bin_dir / "llama-quantize"), str(base), str(path), qtype])
        out = run([str(bin_dir / "llama-perplexity"), "-m", str(path), *common,
                   "--kl-divergence-base", str(kld_base), "--kl-divergence"])
        rows[f"llama.cpp {qtype}"] = {"bytes": path.stat().st_size, "tensor_bytes": tensor_bytes(path, src),
                                      **parse_llama_perplexity(out)}
    rows["llama.cpp F16 (base)"] = {"bytes": base.stat().st_size, "tensor_bytes": tensor_bytes(base, src)}
    return rows


def santacpu_rows(checkpoint: Path, text: Path, work: Path, ctx: int, variants: dict[str, Variant]) -> dict:
    reference = santacpu.load(checkpoint, quant="none")
    texts = [text.read_text(encoding="utf-8")]
    reader = open_checkpoint(checkpoint)
    heldout = checkpoint / "heldout.txt"  # never calibrate on the text we evaluate on
    exclude = set(heldout.read_text().split()) if heldout.is_file() else set()
    calib_texts, note = calibration_texts(None, exclude)
    tokenizer, eos = Tokenizer.santacoder(), reader.config.eos_token_id
    # 4096 tokens: `santacpu quantize`'s default --calibration-tokens
    sequences = token_sequences(calib_texts, tokenizer, eos, 4096, min(SEQUENCE_TOKENS, reader.config.n_positions))
    importance = collect_importance(reader, sequences)
    most_used = most_used_tokens(calib_texts, tokenizer, eos, reader.config.vocab_size)
    gains = {}  # measured upgrade gains per 4-bit type, as `santacpu quantize` measures them
    paths, reports = {}, {}
    for name, v in variants.items():
        paths[name] = work / ("santacpu-" + re.sub(r"[^a-z0-9_]+", "-", name.lower()) + ".safetensors")
        budget = v.upgrade_budget if v.upgrade_budget is not None or v.bits_per_weight is not None else 0.015
        sized = v.bits_per_weight is not None
        measured = v.importance and (sized or Policy(v.qtype, upgrade_budget=budget).buys_upgrades)
        if measured and v.qtype not in gains:
            gains[v.qtype] = measure_upgrade_gains(reader, sequences, v.qtype, importance, most_used)
        reports[name] = convert(checkpoint, paths[name], qtype=v.qtype, importance=importance if v.importance else None,
                                calibration_note=note if v.importance else None, force=True,
                                upgrade_budget=None if sized else budget, bits_per_weight=v.bits_per_weight,
                                upgrade_gains=gains[v.qtype] if measured else None, most_used_tokens=most_used)
    scores = score_models({name: santacpu.load(path) for name, path in paths.items()}, texts, ctx, reference)
    rows = {}
    for name, s in scores.items():
        rows[f"santacpu {name}"] = {
            "bytes": paths[name].stat().st_size,
            "tensor_bytes": tensor_bytes(paths[name]),
            "bits_per_weight": reports[name].weight_bits_per_weight,
            "mean_kld": s.mean_kld,
            "kld_p99": s.kld_p99,
            "top1_agreement": s.top1_agreement,
            "perplexity": s.perplexity,
            "reference_perplexity": s.reference_perplexity,
        }
    return rows


def chart(results: list[dict], out: Path) -> None:
    """Size against mean KLD (log scale), one panel per fixture: llama.cpp's types and santacpu's
    ladder and default files. Needs matplotlib (the dev extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("the chart needs matplotlib: pip install -e '.[dev]'")
    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 4.4), squeeze=False)
    for ax, result in zip(axes[0], results):
        rows = result["rows"]
        llama = sorted((r["tensor_bytes"] / 1e6, r["mean_kld"], name.split()[-1]) for name, r in rows.items()
                       if name.startswith("llama.cpp") and r.get("mean_kld"))
        ladder = sorted((p["santacpu"]["tensor_bytes"] / 1e6, p["santacpu"]["mean_kld"]) for p in result["ladder"])
        defaults = [(r["tensor_bytes"] / 1e6, r["mean_kld"], name.split()[1]) for name, r in rows.items()
                    if name.endswith("(default)")]
        ax.plot([x for x, _, _ in llama], [y for _, y, _ in llama], "o-", color="tab:red", label="llama.cpp")
        for x, y, label in llama:
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color="tab:red")
        ax.plot([x for x, _ in ladder], [y for _, y in ladder], "s-", color="tab:blue",
                label=f"santacpu {LADDER_TYPE}, sized to each type")
        ax.plot([x for x, _, _ in defaults], [y for _, y, _ in defaults], "D", color="tab:green", label="santacpu defaults")
        for x, y, label in defaults:
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7, color="tab:green")
        ax.set_yscale("log")
        ax.set_xlabel("tensor MB")
        ax.set_ylabel("mean KL divergence")
        ax.set_title(f"{result['fixture']} ({result['chunks']} x {result['ctx']} tokens)", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def write_ladder_bounds(result: dict, path: Path) -> None:
    """Set the "ladder" of a thresholds file (tests/quant_accuracy_thresholds*.json) from this run:
    llama.cpp's tensor bytes, mean KLD and top-1 at each ladder type, which
    tests/test_quant_accuracy.py holds santacpu's file of that size to, and what santacpu measured."""
    bounds = json.loads(path.read_text()) if path.exists() else {}
    bounds["ladder"] = {
        "about": f"tools/compare_llamacpp.py --max-chunks {result['chunks']} (the test's chunks) on "
                 f"{time.strftime('%Y-%m-%d')}: llama.cpp's file of each type, and santacpu's {LADDER_TYPE} file sized to its "
                 "tensor bytes (measured); the test holds santacpu's to no more bytes and a lower mean KLD",
        "chunks": result["chunks"],
        "points": {p["llama_type"]: {side: {"tensor_bytes": p[side]["tensor_bytes"], "mean_kld": float(f"{p[side]['mean_kld']:.4g}"),
                                            "top1": round(p[side]["top1_agreement"], 4)} for side in ("llama.cpp", "santacpu")}
                   for p in result["ladder"]},
    }
    path.write_text(json.dumps(bounds, indent=1) + "\n")
    print(f"wrote the ladder bounds into {path}")


def print_tables(result: dict) -> None:
    rows = result["rows"]
    print(f"{'file':<34}{'MB':>8}{'tensor MB':>10}{'mean KLD':>11}{'p99 KLD':>10}{'top-1 %':>9}{'PPL':>9}")
    for name, r in sorted(rows.items(), key=lambda kv: kv[1]["tensor_bytes"]):
        def f(key, fmt):
            return format(r[key], fmt) if r.get(key) is not None else format("-", fmt[:-2].replace(".", ""))
        top1 = format(100 * r["top1_agreement"], ".2f") if r.get("top1_agreement") is not None else "-"
        print(f"{name:<34}{r['bytes'] / 1e6:>8.2f}{r['tensor_bytes'] / 1e6:>10.2f}{f('mean_kld', '>11.5f')}{f('kld_p99', '>10.4f')}{top1:>9}{f('perplexity', '>9.3f')}")
    if result["ladder"]:
        print(f"\nladder: llama.cpp's type against santacpu {LADDER_TYPE} at its size")
        print(f"{'type':<8}{'tensor MB':>10}{'KLD':>10}{'top-1 %':>9} | {'tensor MB':>10}{'bits/w':>8}{'KLD':>10}{'top-1 %':>9}  beats")
        for p in result["ladder"]:
            a, b = p["llama.cpp"], p["santacpu"]
            print(f"{p['llama_type']:<8}{a['tensor_bytes'] / 1e6:>10.3f}{a['mean_kld']:>10.6f}{100 * a['top1_agreement']:>9.2f} | "
                  f"{b['tensor_bytes'] / 1e6:>10.3f}{b['bits_per_weight']:>8.3f}{b['mean_kld']:>10.6f}"
                  f"{100 * b['top1_agreement']:>9.2f}  {'yes' if p['beats'] else 'NO'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, nargs="?")
    parser.add_argument("text", type=Path, nargs="?")
    parser.add_argument("--llamacpp", type=Path, help="llama.cpp source folder with build/bin (skip llama.cpp and the "
                        "ladder if absent)")
    parser.add_argument("--build-dir", default="build", help="llama.cpp build folder inside --llamacpp "
                        "(a -DGGML_NATIVE=ON build may use AMX, which this VM's kernel refuses: build with it off)")
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--work", type=Path, help="where the files go (default /tmp/santacpu-compare/FIXTURE)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--max-chunks", type=int, default=64, help="score at most this many chunks of the text (0: all)")
    parser.add_argument("--chart", type=Path, help="also draw size against KLD as this PNG (needs matplotlib)")
    parser.add_argument("--ladder-bounds", type=Path, help="set this thresholds file's \"ladder\" from the run "
                        "(tests/quant_accuracy_thresholds*.json; run with --max-chunks 16, the test's chunks)")
    parser.add_argument("--results", type=Path, nargs="+", help="draw --chart from these --json files (one panel "
                        "each) instead of measuring")
    args = parser.parse_args(argv)
    if args.results:
        if not args.chart:
            parser.error("--results draws a chart: give --chart PNG")
        results = [json.loads(path.read_text()) for path in args.results]
        for result in results:
            print_tables(result)
        chart(results, args.chart)
        return
    if args.checkpoint is None or args.text is None:
        parser.error("give CHECKPOINT_DIR and TEXT_FILE (or --results with --chart)")
    args.work = args.work or Path("/tmp/santacpu-compare") / args.checkpoint.resolve().name
    args.work.mkdir(parents=True, exist_ok=True)
    if args.max_chunks:  # the same prefix of the text for both systems
        tokenizer = Tokenizer.santacoder()
        ids = tokenizer.encode(args.text.read_text(encoding="utf-8"))[: args.max_chunks * args.ctx]
        args.text = args.work / "eval.txt"
        args.text.write_text(tokenizer.decode(ids), encoding="utf-8")

    rows = {}
    if args.llamacpp:  # first: the ladder sizes santacpu's files to llama.cpp's
        rows.update(llama_rows(args.checkpoint, args.text, args.llamacpp / args.build_dir / "bin", args.llamacpp, args.work, args.ctx))
    variants = {**SANTACPU_VARIANTS, **ladder_variants(args.checkpoint, rows)}
    rows.update(santacpu_rows(args.checkpoint, args.text, args.work, args.ctx, variants))
    result = {"fixture": args.checkpoint.resolve().name, "ctx": args.ctx, "chunks": args.max_chunks, "rows": rows,
              "ladder": ladder_table(rows)}
    print_tables(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.ladder_bounds:
        write_ladder_bounds(result, args.ladder_bounds)
    if args.chart:
        chart([result], args.chart)


if __name__ == "__main__":
    main()
