"""Batched generation's two memory and latency figures on a full-size quantized file, each measured
in a child process of its own (peak RSS is per process):

- samples: time to the first sampled tokens of n samples of one long prompt (the prompt computed
  once, the other samples copying its K/V), beside one sample's; and the stats that show the prompt
  was computed once;
- memory: peak RSS of B sequences that each fill a whole context (n samples of a prompt of
  n_positions - 16 tokens, then 16 tokens each), beside file + runtime + B x one sequence's KV
  cache + 100 MB.

    python -m tools.bench_samples MODEL.safetensors [--prompt-tokens 1500] [--n 10] [--memory-batch 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

MARK = "BENCH-SAMPLES "
MEMORY_DECODE_TOKENS = 16


def child_samples(model_path: str, prompt_tokens: int, n: int) -> dict:
    import santacpu
    from santacpu.bench import text_token_stream

    model = santacpu.load(model_path)
    prompt = text_token_stream(model.tokenizer, prompt_tokens, model.config.vocab_size)
    list(model.generate(prompt[:16], max_new_tokens=2))  # warm-up: the kernels, not timed

    def first_tokens(count: int) -> tuple[float, list]:
        scheduler = model.scheduler(max_batch=count)
        sequences = scheduler.submit(prompt, max_new_tokens=4, temperature=0.8, seed=0, n=count)
        start = time.perf_counter()
        scheduler.admit()  # every sample joins: the prompt once, then each sample's first token
        elapsed = time.perf_counter() - start
        assert all(s.tokens for s in sequences)
        return elapsed, [s.stats.computed_tokens for s in sequences]

    one_a, _ = first_tokens(1)
    many, computed = first_tokens(n)
    one_b, _ = first_tokens(1)
    one = (one_a + one_b) / 2
    return {"prompt_tokens": len(prompt), "n": n, "one_sample_s": one, "n_samples_s": many,
            "ratio": many / one, "computed_tokens": computed}


def child_memory(model_path: str, batch: int) -> dict:
    import santacpu
    from santacpu.bench import text_token_stream
    from santacpu.bench.children import runtime_rss_mb
    from santacpu.bench.machine import peak_rss_mb

    model = santacpu.load(model_path)
    n_ctx = model.config.n_positions
    runtime = runtime_rss_mb([model_path], model)  # as santacpu bench's memory part counts it
    if runtime is None:
        raise SystemExit("this system cannot say how much of a mapped file is resident (no /proc)")
    prompt = text_token_stream(model.tokenizer, n_ctx - MEMORY_DECODE_TOKENS, model.config.vocab_size)
    scheduler = model.scheduler(max_batch=batch)
    sequences = scheduler.submit(prompt, max_new_tokens=MEMORY_DECODE_TOKENS, temperature=0.8, seed=0, n=batch)
    for _ in scheduler.run():
        pass
    kv_mb = scheduler.kv_bytes(n_ctx) / 1e6
    return {"batch": batch, "context": n_ctx, "generated": [len(s.tokens) for s in sequences],
            "runtime_mb": runtime, "kv_per_sequence_mb": kv_mb, "peak_rss_mb": peak_rss_mb()}


def run_child(*args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "tools.bench_samples", "--child", *args], capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    if done.returncode or not lines:
        raise SystemExit(f"child {args[0]} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(lines[-1][len(MARK):])


def main(argv: list[str] | None = None) -> None:
    from pathlib import Path

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--prompt-tokens", type=int, default=1500)
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--memory-batch", type=int, default=8)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child == "samples":
        print(MARK + json.dumps(child_samples(args.model, args.prompt_tokens, args.n)), flush=True)
        return
    if args.child == "memory":
        print(MARK + json.dumps(child_memory(args.model, args.memory_batch)), flush=True)
        return
    samples = run_child("samples", args.model, "--prompt-tokens", str(args.prompt_tokens), "--n", str(args.n))
    print(
        f"{samples['n']} samples of one {samples['prompt_tokens']}-token prompt: first tokens after "
        f"{samples['n_samples_s']:.2f} s against {samples['one_sample_s']:.2f} s for one sample "
        f"({100 * (samples['ratio'] - 1):+.1f}%); prompt tokens computed per sample: {samples['computed_tokens']}"
    )
    memory = run_child("memory", args.model, "--memory-batch", str(args.memory_batch))
    file_mb = Path(args.model).stat().st_size / 1e6
    bound = file_mb + memory["runtime_mb"] + memory["batch"] * memory["kv_per_sequence_mb"] + 100
    print(
        f"B = {memory['batch']} sequences filling {memory['context']}-token contexts: peak RSS {memory['peak_rss_mb']:.0f} MB; "
        f"bound {bound:.0f} MB = file {file_mb:.0f} + runtime {memory['runtime_mb']:.0f} + "
        f"{memory['batch']} x {memory['kv_per_sequence_mb']:.1f} MB KV + 100 "
        f"({'within' if memory['peak_rss_mb'] <= bound else 'OVER'})"
    )


if __name__ == "__main__":
    main()
