"""santacpu beside llama.cpp, CTranslate2 and transformers on the same full-size checkpoint, in one
run: every figure as a ratio santacpu / peer measured minutes apart on the same machine.

Each system runs in child processes of its own, one at a time (peak RSS is that child's, read with
wait4). A peer that is not installed is reported as such, not as an error.

| system | how it is measured |
|---|---|
| santacpu | `santacpu.bench.run_bench` (the `santacpu bench` logic): prefill tok/s of a P-token prompt, greedy decode tok/s over N tokens, peak RSS at a whole-context request; prompt-lookup decoding vs plain (q8_0 only) |
| llama.cpp | `llama-bench -m MODEL.gguf -t THREADS -p P -n N -d 0,P -r REPEAT -o json` on GGUF files converted from the same checkpoint (Q8_0, Q4_0, F16): prefill = the P-token prompt test from an empty context, decode = the N-token generation test after P tokens of context (santacpu decodes after its P-token prompt: the same attention work; the generation test from an empty context is kept as `decode_tok_s_depth0`); right before, the GGUF file's read speed (`santacpu/backends/cpu/read_speed.py`) |
| CTranslate2 | int8 (`ct2-transformers-converter --quantization int8`, converted once into a cache folder); one `generate_batch` call with a per-step callback: prefill = the prompt pass up to the first token (a 512-token prompt forwarded at once, plus one greedy step), decode = tokens/s between the first and last step (`min_length` keeps EOS from ending it early) |
| transformers | fp32 `GPTBigCodeForCausalLM`, torch threads = THREADS; prefill = one forward over the prompt (LM head on the last position only), decode = one forward per token with the KV cache |

Rows: santacpu q8_0 vs llama.cpp Q8_0 and vs CTranslate2 int8; the better santacpu 4-bit file
(q4_0 or q4_m) vs llama.cpp Q4_0; santacpu fp32 vs transformers fp32; santacpu fp16 vs llama.cpp
F16; decode's weight bytes/s as a share of its own file's read speed, santacpu vs llama.cpp (the
files' pages can read at very different speeds: 15-38 GB/s on one virtual machine); santacpu peak
RSS at a whole-context request vs the file size (bound: file + 150 MB); prompt-lookup vs plain
decode.

    python -m tools.bench_peers --checkpoint /work/big/bigcode-f32 [--fp16-checkpoint /work/big/bigcode-f16]
        [--santacpu-file q8_0=FILE ...] [--gguf-dir /work/gguf] [--llamacpp-bin DIR] [--convert-gguf]
        [--threads N] [--prompt-tokens 512] [--decode-tokens 128] [--repeat 1]
        [--systems santacpu,llama.cpp,ctranslate2,transformers] [--santacpu-types q8_0,q4_0,q4_m,fp32,fp16]
        [--llama-types Q8_0,Q4_0,F16] [--json OUT.json] [--markdown OUT.md]

Without --santacpu-file, santacpu's files come from its quantization cache (made once from the
checkpoint, as `santacpu complete` does). Missing GGUF files are converted only with --convert-gguf
(../shared/peers/to_gguf.py, then llama-quantize). CTranslate2 is the `dev` extra's business:
`pip install ctranslate2` (never a santacpu dependency).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

NOT_INSTALLED = "not installed"
LLAMA_TYPES = {"Q8_0": "model-Q8_0.gguf", "Q4_0": "model-Q4_0.gguf", "F16": "model-f16.gguf"}
SANTACPU_QUANT_TYPES = ("q8_0", "q4_0", "q4_m")


def log(text: str) -> None:
    print(f"bench_peers: {text}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Children: run a command, collect its output and its own peak RSS.


def run_measured(command: list[str], env: dict | None = None) -> tuple[int, str, str, float]:
    """(exit code, stdout, stderr, peak RSS in MB) of `command`, its RSS from wait4."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, env=env, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return process.returncode, out.read(), err.read(), usage.ru_maxrss * 1024 / 1e6


def thread_env(threads: int) -> dict:
    t = str(threads)
    return dict(os.environ, OMP_NUM_THREADS=t, OPENBLAS_NUM_THREADS=t, MKL_NUM_THREADS=t, NUMBA_NUM_THREADS=t)


# ----------------------------------------------------------------------------------------------
# llama.cpp


def parse_llama_bench(text: str, decode_depth: int = 0) -> dict:
    """llama-bench's `-o json` output -> prefill and decode tokens/s (mean over its repetitions),
    model bytes and type. The prompt test has n_prompt > 0 and n_gen == 0 (at depth 0), the
    generation tests the reverse: decode_tok_s is the one at `decode_depth` (tokens already in the
    context, as santacpu decodes after its prompt), decode_tok_s_depth0 the one from an empty
    context where llama-bench ran it (its default)."""
    entries = json.loads(text)
    result: dict = {}
    for entry in entries:
        result.setdefault("model_bytes", entry.get("model_size"))
        result.setdefault("model_type", entry.get("model_type"))
        depth = entry.get("n_depth", 0)
        if entry.get("n_prompt", 0) > 0 and entry.get("n_gen", 0) == 0 and depth == 0:
            result["prefill_tok_s"] = float(entry["avg_ts"])
            result["prefill_tokens"] = entry["n_prompt"]
        elif entry.get("n_gen", 0) > 0 and entry.get("n_prompt", 0) == 0:
            if depth == decode_depth:
                result["decode_tok_s"] = float(entry["avg_ts"])
                result["decode_tokens"] = entry["n_gen"]
                result["decode_depth"] = depth
            if depth == 0:
                result["decode_tok_s_depth0"] = float(entry["avg_ts"])
    if "prefill_tok_s" not in result or "decode_tok_s" not in result:
        raise ValueError(f"llama-bench output lacks a prompt test or a generation test at depth {decode_depth}")
    return result


def gguf_file(args, qtype: str) -> tuple[Path | None, str]:
    """The GGUF file for `qtype`, converted first when missing and --convert-gguf is given;
    (None, why) when there is none."""
    path = args.gguf_dir / LLAMA_TYPES[qtype]
    if path.is_file():
        return path, ""
    if not args.convert_gguf:
        return None, f"no {path} (pass --convert-gguf to make it)"
    f16 = args.gguf_dir / LLAMA_TYPES["F16"]
    args.gguf_dir.mkdir(parents=True, exist_ok=True)  # (the converter does not make it)
    if not f16.is_file():
        source = args.fp16_checkpoint or args.checkpoint
        log(f"converting {source} to {f16} with {args.to_gguf} (llama.cpp sources {args.llamacpp_src})")
        code, out, err, _ = run_measured(
            [sys.executable, str(args.to_gguf), str(args.llamacpp_src), str(source), str(f16) + ".part"]
        )
        if code:
            return None, f"GGUF conversion failed: {(err or out).strip().splitlines()[-1:]}"
        os.replace(str(f16) + ".part", f16)
    if qtype != "F16":
        log(f"llama-quantize {f16} -> {path} ({qtype})")
        code, out, err, _ = run_measured(
            [str(args.llamacpp_bin / "llama-quantize"), str(f16), str(path) + ".part", qtype]
        )
        if code:
            return None, f"llama-quantize failed: {(err or out).strip().splitlines()[-1:]}"
        os.replace(str(path) + ".part", path)
    return path, ""


def llama_tool(args, tool: str, qtype: str) -> tuple[Path, Path] | dict:
    """(the llama.cpp binary `tool`, the GGUF file of `qtype`), or the status entry saying which is missing."""
    binary = args.llamacpp_bin / tool
    if not binary.is_file():
        return {"status": NOT_INSTALLED, "why": f"no {binary}"}
    path, why = gguf_file(args, qtype)
    if path is None:
        return {"status": "missing", "why": why}
    return binary, path


def bench_llama(args, qtype: str) -> dict:
    found = llama_tool(args, "llama-bench", qtype)
    if isinstance(found, dict):
        return found
    binary, path = found
    log(f"llama.cpp {qtype}: llama-bench on {path}")
    from santacpu import SantacpuError
    from santacpu.bench import measure_read_speed

    try:
        read_speed = measure_read_speed([path], args.threads)  # its pages, as llama-bench will map them
    except SantacpuError as error:
        log(f"llama.cpp {qtype}: no read speed ({error})")
        read_speed = None
    command = [
        str(binary),
        "-m",
        str(path),
        "-t",
        str(args.threads),
        "-p",
        str(args.prompt_tokens),
        "-n",
        str(args.decode_tokens),
        "-d",  # depth 0 for the prompt test; the generation test also after P tokens, as santacpu's
        f"0,{args.prompt_tokens}",
        "-r",
        str(args.repeat),
        "-o",
        "json",
    ]
    code, out, err, rss = run_measured(command, thread_env(args.threads))
    if code:
        return {"status": "failed", "why": err.strip().splitlines()[-1:] or [f"exit code {code}"]}
    result = {
        "status": "ok",
        "file_bytes": path.stat().st_size,
        "peak_rss_mb": rss,
        "read_speed_gb_s": read_speed,
        "command": " ".join(command),
        **parse_llama_bench(out, decode_depth=args.prompt_tokens),
    }
    # A decode step reads (nearly) the whole GGUF file: every tensor but the position table's rows.
    result["decode_gb_s"] = result["decode_tok_s"] * result["file_bytes"] / 1e9 if result.get("decode_tok_s") else None
    return result


def bench_llama_batched(args, qtype: str) -> dict:
    """llama-batched-bench on the same GGUF file: B sequences of BATCH_PROMPT_TOKENS prompt tokens
    each, BATCH_DECODE_TOKENS tokens generated by each, at every batch size of --batch; the
    aggregate decode speed (its S_TG: B x tokens / decode time)."""
    from santacpu.bench.run import BATCH_DECODE_TOKENS, BATCH_PROMPT_TOKENS

    found = llama_tool(args, "llama-batched-bench", qtype)
    if isinstance(found, dict):
        return found
    binary, path = found
    sizes = [int(b) for b in args.batch.split(",")]
    log(f"llama.cpp {qtype}: llama-batched-bench on {path}, batch sizes {args.batch}")
    command = [
        str(binary), "-m", str(path), "-t", str(args.threads), "-tb", str(args.threads),
        "-c", str(max(2048, max(sizes) * (BATCH_PROMPT_TOKENS + BATCH_DECODE_TOKENS))),
        "-npp", str(BATCH_PROMPT_TOKENS), "-ntg", str(BATCH_DECODE_TOKENS), "-npl", args.batch,
        "--output-format", "jsonl",
    ]
    code, out, err, rss = run_measured(command, thread_env(args.threads))
    if code:
        return {"status": "failed", "why": err.strip().splitlines()[-1:] or [f"exit code {code}"]}
    sizes_out = {}
    for line in out.splitlines():
        if line.startswith("{") and '"speed_tg"' in line:
            entry = json.loads(line)
            sizes_out[str(entry["pl"])] = {"aggregate_tok_s": entry["speed_tg"], "prefill_tok_s": entry["speed_pp"]}
    return {"status": "ok", "command": " ".join(command), "peak_rss_mb": rss, "sizes": sizes_out}


# ----------------------------------------------------------------------------------------------
# CTranslate2 and transformers: measured in a child running this script with --child.


def ct2_converter() -> Path | None:
    beside = Path(sys.executable).parent / "ct2-transformers-converter"
    found = beside if beside.is_file() else shutil.which("ct2-transformers-converter")
    return Path(found) if found else None


def ct2_model_dir(checkpoint: Path) -> Path:
    """A cache folder for the int8 conversion, keyed by the checkpoint's files (size, mtime)."""
    from quantize.cache import cache_dir

    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in checkpoint.iterdir() if p.is_file())
    key = hashlib.sha256(json.dumps([str(checkpoint.resolve()), files]).encode()).hexdigest()[:16]
    return cache_dir() / "peers" / f"ct2-int8-{checkpoint.resolve().name}-{key}"


def bench_child_system(args, system: str, prompt_file: Path) -> dict:
    if system == "ctranslate2":
        if importlib.util.find_spec("ctranslate2") is None or ct2_converter() is None:
            return {"status": NOT_INSTALLED}
        model_dir = ct2_model_dir(args.checkpoint)
        if not (model_dir / "model.bin").is_file():
            log(f"CTranslate2: converting {args.checkpoint} to int8 into {model_dir} (once)")
            partial = model_dir.with_name(model_dir.name + ".part")
            shutil.rmtree(partial, ignore_errors=True)
            code, out, err, _ = run_measured(
                [
                    str(ct2_converter()),
                    "--model",
                    str(args.checkpoint),
                    "--quantization",
                    "int8",
                    "--output_dir",
                    str(partial),
                    "--copy_files",
                    "tokenizer.json",
                ]
            )
            if code:
                return {"status": "failed", "why": f"conversion failed: {(err or out).strip().splitlines()[-1:]}"}
            # A checkpoint without tokenizer_config.json leaves the special tokens null, which the
            # Generator refuses to load: SantaCoder's one special text token is <|endoftext|>.
            config_path = partial / "config.json"
            config = json.loads(config_path.read_text())
            for key in ("bos_token", "eos_token", "unk_token"):
                config[key] = config.get(key) or "<|endoftext|>"
            config_path.write_text(json.dumps(config, indent=2))
            os.replace(partial, model_dir)
        target = model_dir
    else:
        if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
            return {"status": NOT_INSTALLED}
        target = args.checkpoint
    log(f"{system}: measuring {target}")
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        system,
        "--child-model",
        str(target),
        "--child-prompt",
        str(prompt_file),
        "--threads",
        str(args.threads),
        "--decode-tokens",
        str(args.decode_tokens),
        "--repeat",
        str(args.repeat),
    ]
    code, out, err, rss = run_measured(command, thread_env(args.threads))
    if code:
        return {"status": "failed", "why": err.strip().splitlines()[-3:]}
    result = json.loads(out.strip().splitlines()[-1])
    return {"status": "ok", "peak_rss_mb": rss, **result}


def child_ctranslate2(model_dir: str, ids: list[int], n_new: int, threads: int, repeat: int) -> dict:
    import ctranslate2
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    tokens = [tokenizer.id_to_token(i) for i in ids]
    start = time.perf_counter()
    generator = ctranslate2.Generator(model_dir, device="cpu", compute_type="int8", intra_threads=threads)
    load_s = time.perf_counter() - start

    def run(prompt: list[str], steps: int) -> list[float]:
        stamps: list[float] = []
        generator.generate_batch(
            [prompt],
            max_length=steps,
            min_length=steps,
            include_prompt_in_result=False,
            sampling_topk=1,
            beam_size=1,
            callback=lambda step: stamps.append(time.perf_counter()),
        )
        return stamps

    run(tokens[:8], 2)  # warm-up
    prefill, decode, steps = [], [], 0
    for _ in range(repeat):
        start = time.perf_counter()
        stamps = run(tokens, n_new + 1)
        steps = len(stamps)
        prefill.append(len(tokens) / (stamps[0] - start))
        decode.append((steps - 1) / (stamps[-1] - stamps[0]))
    return {
        "load_s": load_s,
        "prefill_tok_s": statistics.median(prefill),
        "decode_tok_s": statistics.median(decode),
        "decode_tokens": steps - 1,
        "version": ctranslate2.__version__,
        "weights_type": "int8",
        "file_bytes": (Path(model_dir) / "model.bin").stat().st_size,
    }


def child_transformers(checkpoint: str, ids: list[int], n_new: int, threads: int, repeat: int) -> dict:
    import torch
    import transformers
    from transformers import GPTBigCodeForCausalLM

    torch.set_num_threads(threads)
    start = time.perf_counter()
    model = GPTBigCodeForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="eager").eval()
    load_s = time.perf_counter() - start

    def step(tokens, past):
        out = model.transformer(tokens, past_key_values=past, use_cache=True)
        logits = model.lm_head(out.last_hidden_state[:, -1:])  # the LM head on the last position only
        return logits.argmax(-1), out.past_key_values

    prompt = torch.tensor([ids])
    prefill, decode = [], []
    with torch.inference_mode():
        token, past = step(prompt[:, :8], None)  # warm-up: a few tokens, then one step
        step(token, past)
        for _ in range(repeat):
            start = time.perf_counter()
            token, past = step(prompt, None)
            prefill.append(len(ids) / (time.perf_counter() - start))
            start = time.perf_counter()
            for _ in range(n_new):
                token, past = step(token, past)
            decode.append(n_new / (time.perf_counter() - start))
    return {
        "load_s": load_s,
        "prefill_tok_s": statistics.median(prefill),
        "decode_tok_s": statistics.median(decode),
        "decode_tokens": n_new,
        "version": f"transformers {transformers.__version__}, torch {torch.__version__}",
        "weights_type": "fp32",
        "file_bytes": sum(p.stat().st_size for p in Path(checkpoint).glob("*.safetensors")),
    }


# ----------------------------------------------------------------------------------------------
# santacpu


def santacpu_models(args) -> dict[str, str]:
    """{label: what to load}: the quantized files, fp32 and (if given) fp16 checkpoints."""
    from santacpu.bench import describe_model

    models: dict[str, str] = {}
    given = dict(item.split("=", 1) for item in args.santacpu_file)
    wanted = {t.strip() for t in args.santacpu_types.split(",")}
    for qtype in SANTACPU_QUANT_TYPES:
        if qtype not in wanted:
            continue
        if qtype in given:
            models[qtype] = given[qtype]
        else:
            from quantize.cache import quantized_for

            models[qtype] = str(quantized_for(str(args.checkpoint), None, qtype))
    if "fp32" in wanted and describe_model(str(args.checkpoint))[1] == "f32":
        models["fp32"] = str(args.checkpoint)
    if "fp16" in wanted and args.fp16_checkpoint:
        models["fp16"] = str(args.fp16_checkpoint)
    return models


def bench_santacpu(args, label: str, model: str) -> dict:
    from santacpu.bench import BenchSettings, run_bench

    parts = ["speed", "memory"] + (["lookup"] if label == "q8_0" else [])
    settings = BenchSettings(
        model=model,
        prompt_tokens=args.prompt_tokens,
        decode_tokens=args.decode_tokens,
        fim_tokens=args.fim_tokens,
        threads=args.threads,
        repeat=args.repeat,
        parts=tuple(parts),
        batch=tuple(int(b) for b in args.batch.split(",")) if args.batch else (),
    )
    log(f"santacpu {label}: {model}")
    report = run_bench(settings, log=lambda text: log(f"santacpu {label}: {text}"))
    summary = report["summary"]
    return {
        "status": "ok",
        "model": model,
        "weights_type": report["model"]["weights_type"],
        "file_bytes": report["model"]["file_bytes"],
        "load_s": summary["load_warm_s"],
        "prefill_tok_s": summary["prefill_tok_s"],
        "decode_tok_s": summary["decode_tok_s"],
        "peak_rss_mb": summary["peak_rss_speed_run_mb"],
        "peak_rss_full_context_mb": summary["peak_rss_mb"],
        "rss_runtime_mb": summary.get("rss_runtime_mb"),
        "decode_gb_s": summary.get("decode_gb_s"),
        "read_speed_gb_s": summary.get("read_speed_gb_s"),
        "full_context_tokens": report["results"]["memory"]["context_tokens"],
        "batch": report["results"].get("batch"),
        "report": report,
    }


# ----------------------------------------------------------------------------------------------
# Comparisons and output.


def compare(santacpu: dict, peers: dict) -> list[dict]:
    """The rows of the ratio table: {figure, santacpu, santacpu_value, peer, peer_value, ratio, note}."""
    rows: list[dict] = []

    def ok(entry: dict | None) -> bool:
        return bool(entry) and entry.get("status") == "ok"

    def with_read_share(entry: dict) -> dict:
        # Decode reads every weight once a token, so its speed follows how fast the file's pages
        # read, and that differs between files (where the page cache put them): its share of it.
        if ok(entry) and entry.get("decode_gb_s") and entry.get("read_speed_gb_s"):
            return {**entry, "decode_read_share_pct": 100 * entry["decode_gb_s"] / entry["read_speed_gb_s"]}
        return entry

    santacpu = {label: with_read_share(entry) for label, entry in santacpu.items()}
    peers = {label: with_read_share(entry) for label, entry in peers.items()}

    def add(figure: str, ours: str, peer: str, key: str, unit: str) -> None:
        mine, theirs = santacpu.get(ours), peers.get(peer)
        if not ok(mine):
            return
        row = {
            "figure": f"{figure} ({unit})",
            "santacpu": ours,
            "santacpu_value": mine.get(key),
            "peer": peer,
            "peer_value": None,
            "ratio": None,
            "note": "",
        }
        if ok(theirs):
            row["peer_value"] = theirs.get(key)
            if row["peer_value"] and row["santacpu_value"] is not None:
                row["ratio"] = row["santacpu_value"] / row["peer_value"]
        else:
            row["note"] = (theirs or {}).get("status", "not run")
            if theirs and theirs.get("why"):
                row["note"] += f": {theirs['why']}"
        rows.append(row)

    four_bit = [q for q in ("q4_0", "q4_m") if ok(santacpu.get(q))]

    def best_four_bit(key: str) -> str:
        return max(four_bit, key=lambda q: santacpu[q][key] or 0)

    for key, figure, unit in (("decode_tok_s", "decode", "tok/s"), ("prefill_tok_s", "prefill", "tok/s")):
        add(figure, "q8_0", "llama.cpp Q8_0", key, unit)
        if four_bit:
            add(f"{figure}, best 4-bit", best_four_bit(key), "llama.cpp Q4_0", key, unit)
        add(figure, "q8_0", "CTranslate2 int8", key, unit)
        add(figure, "fp32", "transformers fp32", key, unit)
        add(figure, "fp16", "llama.cpp F16", key, unit)
    share = "decode, share of its file's read speed"
    add(share, "q8_0", "llama.cpp Q8_0", "decode_read_share_pct", "%")
    if four_bit:
        add(share, best_four_bit("decode_tok_s"), "llama.cpp Q4_0", "decode_read_share_pct", "%")
    add(share, "fp16", "llama.cpp F16", "decode_read_share_pct", "%")
    add("peak RSS, prefill + decode run", "q8_0", "llama.cpp Q8_0", "peak_rss_mb", "MB")
    if four_bit:
        add("peak RSS, prefill + decode run", four_bit[0], "llama.cpp Q4_0", "peak_rss_mb", "MB")
    for label, entry in santacpu.items():
        if ok(entry) and entry.get("peak_rss_full_context_mb"):
            file_mb = entry["file_bytes"] / 1e6
            over = entry["peak_rss_full_context_mb"] - file_mb
            runtime = entry.get("rss_runtime_mb")
            split = f" (runtime {runtime:.0f}, model's work {over - runtime:+.0f})" if runtime is not None else ""
            rows.append(
                {
                    "figure": f"peak RSS at a {entry['full_context_tokens']}-token context vs file size (MB)",
                    "santacpu": label,
                    "santacpu_value": entry["peak_rss_full_context_mb"],
                    "peer": "file size",
                    "peer_value": file_mb,
                    "ratio": entry["peak_rss_full_context_mb"] / file_mb,
                    "note": f"{over:+.0f} MB{split}; bound +150 MB: {'within' if over <= 150 else 'over'}",
                }
            )
    lookup = (santacpu.get("q8_0") or {}).get("report", {}).get("results", {}).get("lookup")
    if lookup:
        for case, label in (("echo", "echoing prompt"), ("plain", "plain code prompt")):
            c = lookup[case]
            rows.append(
                {
                    "figure": f"prompt-lookup decode, {label} (tok/s)",
                    "santacpu": "q8_0 lookup",
                    "santacpu_value": c["lookup_tok_s"],
                    "peer": "q8_0 plain decode",
                    "peer_value": c["plain_tok_s"],
                    "ratio": c["speedup"],
                    "note": f"{c['accepted_tokens']}/{c['drafted_tokens']} drafted tokens accepted; output "
                    + ("identical" if c["identical_output"] else "DIFFERS"),
                }
            )
    elif ok(santacpu.get("q8_0")):
        rows.append(
            {
                "figure": "prompt-lookup decode",
                "santacpu": "q8_0",
                "santacpu_value": None,
                "peer": "plain decode",
                "peer_value": None,
                "ratio": None,
                "note": "santacpu's generate has no lookup option",
            }
        )
    return rows


def _value(value) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"


def markdown(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    lines = [
        (
            f"Machine: {m['cpu']}, {m['usable_cores']} cores, {m['memory_gib']} GiB ({m['date']}); "
            f"integer kernels: {m.get('integer_kernels') or 'off'}; santacpu "
            f"{report['santacpu_version']}; {s['threads']} threads; {s['prompt_tokens']}-token prompt, "
            f"{s['decode_tokens']} decoded tokens after the prompt (llama.cpp: `-d {s['prompt_tokens']}`); "
            f"median of {s['repeat']} (llama.cpp: mean of {s['repeat']})."
        ),
        "",
        "| figure | santacpu | value | peer | value | santacpu / peer | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["comparisons"]:
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-"
        lines.append(
            f"| {r['figure']} | {r['santacpu']} | {_value(r['santacpu_value'])} | {r['peer']} | "
            f"{_value(r['peer_value'])} | {ratio} | {r['note']} |"
        )
    lines += [
        "",
        "| system | weights | file MB | load s | prefill tok/s | decode tok/s | decode GB/s | file read GB/s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in list(report["santacpu"].items()) + list(report["peers"].items()):
        system = name if name in report["peers"] else f"santacpu {name}"
        if name.endswith(" batched"):
            continue  # in the batched table below
        if entry.get("status") != "ok":
            lines.append(f"| {system} | {entry.get('status')} | | | | | | | |")
            continue
        size = entry.get("file_bytes") or entry.get("model_bytes")
        lines.append(
            f"| {system} | {entry.get('weights_type') or entry.get('model_type') or ''} | "
            f"{_value(size / 1e6 if size else None)} | {_value(entry.get('load_s'))} | "
            f"{_value(entry.get('prefill_tok_s'))} | {_value(entry.get('decode_tok_s'))} | "
            f"{_value(entry.get('decode_gb_s'))} | {_value(entry.get('read_speed_gb_s'))} | "
            f"{_value(entry.get('peak_rss_mb'))} |"
        )
    empty_context = [f"{name} {entry['decode_tok_s_depth0']:.1f}" for name, entry in report["peers"].items() if entry.get("decode_tok_s_depth0")]
    if empty_context:
        lines += ["", f"llama.cpp decode from an empty context (llama-bench's default), tok/s: {', '.join(empty_context)}."]
    return "\n".join(lines + batched_table(report)) + "\n"


def batched_table(report: dict) -> list[str]:
    """Aggregate decode tok/s at each batch size, santacpu's rows beside llama-batched-bench's."""
    columns = {f"santacpu {name}": e["batch"]["sizes"] for name, e in report["santacpu"].items() if e.get("batch")}
    columns.update({name: e["sizes"] for name, e in report["peers"].items() if e.get("status") == "ok" and "sizes" in e})
    if not columns:
        return []
    sizes = sorted({int(b) for c in columns.values() for b in c})
    lines = [
        "",
        "Batched decode, aggregate tok/s (B sequences, 64-token prompts, 32 tokens each; llama.cpp: llama-batched-bench S_TG):",
        "",
        "| B | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for b in sizes:
        cells = [_value(c.get(str(b), {}).get("aggregate_tok_s")) for c in columns.values()]
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> None:
    from santacpu.bench import default_threads

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint", type=Path, help="full-precision gpt_bigcode-layout folder (fp32 for transformers)"
    )
    parser.add_argument("--fp16-checkpoint", type=Path, help="the same model stored in fp16 (santacpu fp16 row)")
    parser.add_argument(
        "--santacpu-file",
        action="append",
        default=[],
        metavar="TYPE=FILE",
        help="santacpu quantized file per type (q8_0, q4_0, q4_m); default: the quantization cache",
    )
    parser.add_argument("--gguf-dir", type=Path, default=Path("/work/gguf"))
    parser.add_argument("--llamacpp-bin", type=Path, default=Path("/opt/llamacpp/src/build-noamx/bin"))
    parser.add_argument("--llamacpp-src", type=Path, default=Path("/opt/llamacpp/src"))
    parser.add_argument("--to-gguf", type=Path, default=REPO.parent / "shared" / "peers" / "to_gguf.py")
    parser.add_argument(
        "--convert-gguf", action="store_true", help="convert missing GGUF files (F16, then llama-quantize)"
    )
    parser.add_argument("--systems", default="santacpu,llama.cpp,ctranslate2,transformers")
    parser.add_argument("--santacpu-types", default="q8_0,q4_0,q4_m,fp32,fp16", help="santacpu rows to run")
    parser.add_argument("--llama-types", default=",".join(LLAMA_TYPES), help="llama.cpp files to run")
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument(
        "--fim-tokens", type=int, default=0, help="santacpu's FIM time to first token (no peer has it); 0 skips"
    )
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument(
        "--batch", help="batch sizes, e.g. 1,2,4,8,16: santacpu's batched decode and llama-batched-bench's (default: off)"
    )
    parser.add_argument("--json", type=Path, help="write everything here")
    parser.add_argument("--markdown", type=Path, help="write the tables here, ready for docs/performance.md")
    parser.add_argument(
        "--render", type=Path, metavar="REPORT.json",
        help="print the tables of a stored --json report (docs/bench/*.json) and exit: docs/performance.md's tables "
        "are made this way",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-model", help=argparse.SUPPRESS)
    parser.add_argument("--child-prompt", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        ids = json.loads(args.child_prompt.read_text())
        run = child_ctranslate2 if args.child == "ctranslate2" else child_transformers
        print(json.dumps(run(args.child_model, ids, args.decode_tokens, args.threads, args.repeat)))
        return
    if args.render:
        print(markdown(json.loads(args.render.read_text(encoding="utf-8"))))
        return
    if args.checkpoint is None:
        parser.error("--checkpoint is required")
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(systems) - {"santacpu", "llama.cpp", "ctranslate2", "transformers"}
    if unknown:
        parser.error(f"unknown system(s): {', '.join(sorted(unknown))}")

    from santacpu import __version__
    from santacpu.bench import machine_facts, text_token_stream
    from santacpu.atomic_file import write_text_atomically
    from santacpu.tokenizer import Tokenizer

    santacpu: dict = {}
    peers: dict = {}
    if "santacpu" in systems:
        for label, model in santacpu_models(args).items():
            santacpu[label] = bench_santacpu(args, label, model)
    if "llama.cpp" in systems:
        for qtype in LLAMA_TYPES:
            if qtype in args.llama_types.split(","):
                peers[f"llama.cpp {qtype}"] = bench_llama(args, qtype)
                if args.batch:
                    peers[f"llama.cpp {qtype} batched"] = bench_llama_batched(args, qtype)
    with tempfile.TemporaryDirectory() as work:
        prompt_file = Path(work) / "prompt.json"
        tokenizer = Tokenizer.from_file(args.checkpoint / "tokenizer.json")
        prompt_file.write_text(json.dumps(text_token_stream(tokenizer, args.prompt_tokens, 49152)))
        if "ctranslate2" in systems:
            peers["CTranslate2 int8"] = bench_child_system(args, "ctranslate2", prompt_file)
        if "transformers" in systems:
            peers["transformers fp32"] = bench_child_system(args, "transformers", prompt_file)

    report = {
        "santacpu_version": __version__,
        "machine": machine_facts(),
        "settings": {
            k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if not k.startswith("child")
        },
        "santacpu": santacpu,
        "peers": peers,
    }
    report["comparisons"] = compare(santacpu, peers)
    table = markdown(report)
    print(table)
    if args.json:
        write_text_atomically(args.json, json.dumps(report, indent=2) + "\n")
    if args.markdown:
        write_text_atomically(args.markdown, table)


if __name__ == "__main__":
    main()
