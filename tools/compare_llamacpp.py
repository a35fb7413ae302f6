"""Quality per byte, santacpu beside llama.cpp, on the same weights and the same text, in one run.

For a gpt_bigcode-layout checkpoint (e.g. tests/fixtures/trained_tiny) and a text file:
- llama.cpp: convert to an F16 GGUF (../shared/peers/to_gguf.py; the fixture is stored in fp16, so
  F16 is the exact model), quantize to each llama.cpp type, and score each with
  `llama-perplexity --kl-divergence` against the F16 base;
- santacpu: convert to each santacpu file variant and score it with santacpu.evaluate against the
  full-precision model, with the same chunking (n_ctx, second half of each chunk scored).
Prints one table (file bytes, tensor bytes: the vocabulary and metadata left out on both sides, mean KLD,
top-1 agreement, PPL) and writes it as JSON.

    python -m tools.compare_llamacpp CHECKPOINT_DIR TEXT_FILE --llamacpp /opt/llamacpp/src
        [--ctx 256] [--work /tmp/compare] [--json results.json]
Needs: a built llama.cpp (../shared/peers/build_llamacpp.sh) and the dev extra (torch, transformers).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import santacpu  # noqa: E402
from quantize.calibration import SEQUENCE_TOKENS, calibration_texts, collect_importance, most_used_tokens, token_sequences  # noqa: E402
from quantize.converter import convert  # noqa: E402
from quantize.policy import Policy, parse_keep  # noqa: E402
from quantize.sensitivity import measure_upgrade_gains  # noqa: E402
from santacpu.loading.checkpoint import open_checkpoint  # noqa: E402
from santacpu.evaluate import score_models  # noqa: E402
from santacpu.tokenizer import Tokenizer  # noqa: E402

LLAMA_TYPES = ("Q8_0", "Q6_K", "Q5_K_S", "Q4_K_S", "IQ4_NL", "Q4_0")
# name -> (type, keep rules, importance-weighted?, q8_0 upgrade budget). The first three are
# santacpu's defaults (`santacpu quantize --type T`); the rest show what each choice buys.
SANTACPU_VARIANTS = {
    "q8_0 (default)": ("q8_0", [], False, 0.05),
    "q4_m, budget 5%": ("q4_m", [], True, 0.05),
    "q4_m, budget 2%": ("q4_m", [], True, 0.02),
    "q4_m (default)": ("q4_m", [], True, 0.015),
    "q4_m, budget 1%": ("q4_m", [], True, 0.01),
    "q4_0 (default)": ("q4_0", [], True, 0.015),
    "q4_0, budget 1%": ("q4_0", [], True, 0.01),
    "q4_m, no upgrades": ("q4_m", [], True, 0.0),
    "q4_m, no upgrades, no imp": ("q4_m", [], False, 0.0),
    "q4_0, no upgrades, no imp": ("q4_0", [], False, 0.0),
}


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


def santacpu_rows(checkpoint: Path, text: Path, work: Path, ctx: int) -> dict:
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
    paths = {}
    for name, (qtype, keep, weighted, budget) in SANTACPU_VARIANTS.items():
        paths[name] = work / ("santacpu-" + re.sub(r"[^a-z0-9_]+", "-", name) + ".safetensors")
        measured = weighted and Policy(qtype, upgrade_budget=budget).buys_upgrades
        if measured and qtype not in gains:
            gains[qtype] = measure_upgrade_gains(reader, sequences, qtype, importance, most_used)
        convert(checkpoint, paths[name], qtype=qtype, keep=parse_keep(keep), importance=importance if weighted else None,
                calibration_note=note if weighted else None, force=True, upgrade_budget=budget,
                upgrade_gains=gains[qtype] if measured else None, most_used_tokens=most_used)
    scores = score_models({name: santacpu.load(path) for name, path in paths.items()}, texts, ctx, reference)
    rows = {}
    for name, s in scores.items():
        rows[f"santacpu {name}"] = {
            "bytes": paths[name].stat().st_size,
            "tensor_bytes": tensor_bytes(paths[name]),
            "mean_kld": s.mean_kld,
            "kld_p99": s.kld_p99,
            "top1_agreement": s.top1_agreement,
            "perplexity": s.perplexity,
            "reference_perplexity": s.reference_perplexity,
        }
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("text", type=Path)
    parser.add_argument("--llamacpp", type=Path, help="llama.cpp source folder with build/bin (skip llama.cpp if absent)")
    parser.add_argument("--build-dir", default="build", help="llama.cpp build folder inside --llamacpp "
                        "(a -DGGML_NATIVE=ON build may use AMX, which this VM's kernel refuses: build with it off)")
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--work", type=Path, default=Path("/tmp/santacpu-compare"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--max-chunks", type=int, default=64, help="score at most this many chunks of the text (0: all)")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.max_chunks:  # the same prefix of the text for both systems
        tokenizer = Tokenizer.santacoder()
        ids = tokenizer.encode(args.text.read_text(encoding="utf-8"))[: args.max_chunks * args.ctx]
        args.text = args.work / "eval.txt"
        args.text.write_text(tokenizer.decode(ids), encoding="utf-8")

    rows = santacpu_rows(args.checkpoint, args.text, args.work, args.ctx)
    if args.llamacpp:
        rows.update(llama_rows(args.checkpoint, args.text, args.llamacpp / args.build_dir / "bin", args.llamacpp, args.work, args.ctx))
    print(f"{'file':<34}{'MB':>8}{'tensor MB':>10}{'mean KLD':>11}{'p99 KLD':>10}{'top-1 %':>9}{'PPL':>9}")
    for name, r in sorted(rows.items(), key=lambda kv: kv[1]["tensor_bytes"]):
        def f(key, fmt):
            return format(r[key], fmt) if r.get(key) is not None else format("-", fmt[:-2].replace(".", ""))
        top1 = format(100 * r["top1_agreement"], ".2f") if r.get("top1_agreement") is not None else "-"
        print(f"{name:<34}{r['bytes'] / 1e6:>8.2f}{r['tensor_bytes'] / 1e6:>10.2f}{f('mean_kld', '>11.5f')}{f('kld_p99', '>10.4f')}{top1:>9}{f('perplexity', '>9.3f')}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
