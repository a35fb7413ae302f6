"""Full-precision speed and memory: santacpu beside transformers on the same checkpoint, one run.

Each system runs in its own child process (so peak RSS is its own) and reports: load time, prefill
tokens/s over a PROMPT-token prompt, decode tokens/s over NEW greedy tokens after it, and peak RSS.
transformers is the dev extra (torch, transformers) and needs the gpt_bigcode layout.

    python -m tools.bench_fp32 CHECKPOINT_DIR [--prompt-tokens 512] [--new-tokens 32] [--threads 2]
        [--systems santacpu,transformers] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def prompt_ids(n: int) -> list[int]:
    import numpy as np

    return [int(i) for i in np.random.default_rng(0).integers(0, 49152, n)]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_santacpu(checkpoint: str, n_prompt: int, n_new: int) -> dict:
    import numpy as np

    import santacpu

    t0 = time.perf_counter()
    model = santacpu.load(checkpoint)
    load_s = time.perf_counter() - t0
    ids = prompt_ids(n_prompt)
    # Warm both kernel paths (many-token prefill and one-token decode): compiled or loaded from
    # Numba's on-disk cache once per process, which is start-up cost, not per-token speed.
    list(model.generate(ids[:8], max_new_tokens=2))

    engine = model._engine
    cache = engine.new_cache(n_prompt + n_new + 1)
    t0 = time.perf_counter()
    logits = engine.forward(cache, ids)[-1]
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(n_new):
        token = int(np.argmax(logits[: model.n_valid_tokens]))
        logits = engine.forward(cache, [token])[-1]
    decode_s = time.perf_counter() - t0
    return dict(load_s=load_s, prefill_tok_s=n_prompt / prefill_s, decode_tok_s=n_new / decode_s, peak_rss_mb=peak_rss_mb())


def run_transformers(checkpoint: str, n_prompt: int, n_new: int, threads: int) -> dict:
    import torch
    from transformers import GPTBigCodeForCausalLM

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = GPTBigCodeForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    load_s = time.perf_counter() - t0
    ids = torch.tensor([prompt_ids(n_prompt)])
    with torch.inference_mode():
        warm = model(ids[:, :8], use_cache=True)  # warm-up, both prefill and one-token steps
        model(warm.logits[:, -1:].argmax(-1), past_key_values=warm.past_key_values, use_cache=True)
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        prefill_s = time.perf_counter() - t0
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(n_new):
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        decode_s = time.perf_counter() - t0
    return dict(load_s=load_s, prefill_tok_s=n_prompt / prefill_s, decode_tok_s=n_new / decode_s, peak_rss_mb=peak_rss_mb())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--systems", default="santacpu,transformers")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        if args.child == "santacpu":
            result = run_santacpu(args.checkpoint, args.prompt_tokens, args.new_tokens)
        else:
            result = run_transformers(args.checkpoint, args.prompt_tokens, args.new_tokens, args.threads)
        print(json.dumps(result))
        return

    env = dict(os.environ, NUMBA_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    results = {}
    for system in args.systems.split(","):
        child = subprocess.run(
            [sys.executable, "-m", "tools.bench_fp32", args.checkpoint, "--child", system,
             "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
             "--threads", str(args.threads)],
            cwd=REPO, env=env, capture_output=True, text=True,
        )
        if child.returncode:
            sys.exit(f"{system} failed:\n{child.stderr[-2000:]}")
        results[system] = json.loads(child.stdout.strip().splitlines()[-1])

    print(f"checkpoint {args.checkpoint}; prompt {args.prompt_tokens} tokens, {args.new_tokens} new; {args.threads} threads")
    print(f"{'system':<14}{'load s':>9}{'prefill tok/s':>15}{'decode tok/s':>14}{'peak RSS MB':>13}")
    for system, r in results.items():
        print(f"{system:<14}{r['load_s']:>9.2f}{r['prefill_tok_s']:>15.1f}{r['decode_tok_s']:>14.2f}{r['peak_rss_mb']:>13.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
