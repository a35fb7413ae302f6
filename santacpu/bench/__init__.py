"""`santacpu bench`: how fast a model runs on this machine and how much memory it takes.

Owns the measuring logic (the CLI's `bench` command and tools/bench_peers.py call `run_bench`),
in four modules: `run` (the parent: settings, the children started one at a time, one result
dictionary), `children` (each part's child process), `workload` (what the children feed the
model: real-code token streams, FIM texts, the bytes a decode step reads), `machine` (memory
and machine facts), `report` (the summary and the printed table).
Every measurement runs in a child process of its own (`sys.executable -c ...`), one after the
other, so that its peak RSS and its Numba compile state belong to that measurement only:

| part      | child process | what it reports |
|-----------|---------------|-----------------|
| `speed`   | (first, in a child of its own: the model files' read speed, parallel passes over their mapped pages, `santacpu/backends/cpu/read_speed.py`) load (page cache warm), first one-token forward, then `repeat` times: prefill of a P-token prompt, greedy decode of exactly N tokens driven token by token through the engine (EOS does not stop it), time to first token of a ~F-token FIM request through `Model.complete` | load s, first forward s, prefill tok/s, decode tok/s and the weights' GB/s it reads (against the files' read speed), FIM TTFT s (medians), peak RSS of that child |
| `lookup`  | where `Model.generate` has prompt-lookup drafting (`lookup=`): greedy generation of N tokens with and without it, after a prompt whose continuation echoes it (a code chunk, then its first part again) and after a plain code prompt; decode speed from the first token on, tokens compared | tok/s each way, speed-up, drafted/accepted tokens, identical output |
| `memory`  | one `Model.generate` request filling a C-token context (default: the model's whole context); before it, the resident memory of everything but the weights once Numba's runtime is started | peak RSS, the runtime's share |
| `load`    | the model's files dropped from the page cache first (`posix_fadvise(DONTNEED)`: best-effort, the kernel may keep pages), then load and first one-token forward | cold load s, cold first forward s |
| `compile` | twice with `NUMBA_CACHE_DIR` set to one fresh folder: the first run compiles every kernel the model uses, the second loads them from that on-disk cache; each times import, load and one tiny forward (a 16-token prefill, one decode step) and that forward again | seconds each |

Threads: `NUMBA_NUM_THREADS` and the BLAS thread variables are set in each child's environment
and `numba.set_num_threads` is called in it. Prompts are real code: the running Python's standard
library tokenized with the model's tokenizer and cut to the exact length (each repeat starts at a
different token, so no run can reuse another's KV cache), or deterministic ids if no text is found.

May import: anything in `santacpu` but `santacpu.cli` (never `quantize`).
"""

from .children import child_main
from .machine import current_rss_mb, default_threads, drop_page_cache, machine_facts, mapped_file_rss_mb, peak_rss_mb
from .report import format_table, short_run_warnings, summarize
from .run import PARTS, BenchSettings, describe_model, fit_to_context, measure_read_speed, run_bench
from .workload import decode_weight_bytes, fim_texts, text_token_stream

__all__ = [
    "PARTS",
    "BenchSettings",
    "child_main",
    "current_rss_mb",
    "decode_weight_bytes",
    "default_threads",
    "describe_model",
    "drop_page_cache",
    "fim_texts",
    "fit_to_context",
    "format_table",
    "machine_facts",
    "mapped_file_rss_mb",
    "measure_read_speed",
    "peak_rss_mb",
    "run_bench",
    "short_run_warnings",
    "summarize",
    "text_token_stream",
]
