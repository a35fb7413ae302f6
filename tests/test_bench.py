"""`santacpu bench` end to end on a tiny checkpoint (every part, tiny sizes, a sane JSON), its
prompt builders, its bad-input errors, and tools/bench_peers.py's parsing and ratio table.

Nothing here is timed: the figures are checked for presence, sign and exact counts only.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import helpers
import numpy as np
import pytest

from santacpu import SantacpuError
from santacpu.bench import PARTS, BenchSettings, fim_texts, run_bench, text_token_stream
from santacpu.generation.prompts import build_fim_prompt
from santacpu.tokenizer import Tokenizer

PROMPT, DECODE, FIM, REPEAT = 12, 5, 30, 2


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("SANTACPU_MODEL", None)
    return helpers.settled(subprocess.run(
        [sys.executable, "-m", "santacpu", *args], check=False, capture_output=True, env=env, timeout=timeout
    ))


@pytest.fixture(scope="module")
def bench_report(tmp_path_factory) -> tuple[dict, str]:
    """One `santacpu bench` run of every part on the tiny fp32 checkpoint: (its JSON, its stdout)."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    done = run_cli(
        "bench",
        str(helpers.tiny_checkpoint()),
        "--quant",
        "none",
        "--prompt-tokens",
        str(PROMPT),
        "--decode-tokens",
        str(DECODE),
        "--fim-tokens",
        str(FIM),
        "--repeat",
        str(REPEAT),
        "--threads",
        "1",
        "--batch",
        "1,3",
        "--json",
        str(out),
        timeout=900,  # every part, some compiling in an empty Numba cache, beside the other worker's compiles
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert "Traceback" not in done.stderr.decode(errors="replace")
    return json.loads(out.read_text()), done.stdout.decode()


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_bench_reports_every_part(bench_report):
    report, _ = bench_report
    assert set(report) >= {"santacpu_version", "settings", "machine", "model", "results", "summary"}
    assert set(report["results"]) == {*PARTS, "read_speed", "batch"}  # read_speed: measured with the speed part
    assert report["settings"]["threads"] == 1 and report["settings"]["statistic"] == f"median of {REPEAT}"
    assert report["model"]["weights_type"] == "f32"
    assert report["model"]["file_bytes"] == (helpers.tiny_checkpoint() / "model.safetensors").stat().st_size
    machine = report["machine"]
    assert machine["cpu"] and machine["cores"] >= 1 and machine["numba"]


def test_bench_speed_figures(bench_report):
    speed = bench_report[0]["results"]["speed"]
    assert speed["decode_tokens_done"] == DECODE  # exactly N, EOS or not
    for key in ("load_s", "first_forward_s", "prefill_tok_s", "decode_tok_s", "fim_ttft_s", "peak_rss_mb", "import_s"):
        assert positive(speed[key]), key
    assert len(speed["samples"]["prefill_tok_s"]) == len(speed["samples"]["decode_tok_s"]) == REPEAT
    # The FIM prompt is close to the requested length and fits (re-tokenizing may move a cut by a token or two).
    assert FIM - 4 <= speed["fim_prompt_tokens"] <= FIM


def test_bench_decode_bytes_against_the_files_read_speed(bench_report):
    from santacpu.bench import decode_weight_bytes
    from santacpu.loading.checkpoint import read_checkpoint

    report = bench_report[0]
    speed, summary = report["results"]["speed"], report["summary"]
    assert speed["decode_weight_bytes"] == decode_weight_bytes(read_checkpoint(helpers.tiny_checkpoint()))
    assert 0 < speed["decode_weight_bytes"] < report["model"]["file_bytes"]
    assert summary["decode_gb_s"] == pytest.approx(summary["decode_tok_s"] * speed["decode_weight_bytes"] / 1e9)
    assert positive(report["results"]["read_speed"]["gb_s"]) and summary["read_speed_gb_s"] > 0
    assert "decode, weights read" in bench_report[1]


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="Linux's VmHWM")
def test_a_childs_peak_rss_is_its_own():
    # The bench's children must not report their parent's peak (ru_maxrss inherits it at exec).
    held = np.ones(400 * 2**20 // 8)  # this process's peak is now over 400 MB
    code = "from santacpu.bench import peak_rss_mb; print(peak_rss_mb())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert float(done.stdout) < 200 and held.sum() > 0


def test_read_speed_sums_every_word(tmp_path):
    from santacpu.backends.cpu.read_speed import _sum_words, read_speed_gb_s

    words = np.random.default_rng(3).integers(-(2**62), 2**62, size=1001, dtype=np.int64)
    for chunks in (1, 7, 16, 2000):  # uneven, and more chunks than words
        assert _sum_words(words, chunks) == words.sum()
    path = tmp_path / "words.bin"
    path.write_bytes(words.tobytes() + b"tail")
    assert positive(read_speed_gb_s([path], threads=1, passes=2))
    (tmp_path / "tiny.bin").write_bytes(b"1234567")
    assert read_speed_gb_s([tmp_path / "tiny.bin"]) is None


def test_bench_memory_load_compile_lookup(bench_report):
    report = bench_report[0]
    results, summary = report["results"], report["summary"]
    n_ctx = report["model"]["config"]["n_positions"]
    memory = results["memory"]
    assert memory["context_tokens"] == n_ctx and memory["prompt_tokens"] + 8 == n_ctx
    assert positive(memory["peak_rss_mb"]) and memory["peak_rss_mb"] >= memory["rss_after_load_mb"]
    assert summary["rss_bound_mb"] == pytest.approx(summary["file_mb"] + 150)
    # The runtime's share excludes the weights' pages: less than the RSS right after loading
    # (which maps them) plus Numba's start, and a real share of it.
    assert 20 < memory["rss_runtime_mb"] < memory["peak_rss_mb"]
    assert summary["rss_runtime_mb"] == memory["rss_runtime_mb"]
    assert positive(results["load"]["load_s"]) and positive(results["load"]["first_forward_s"])
    for run in ("first_run", "cached_run"):
        c = results["compile"][run]
        assert all(positive(c[k]) for k in ("import_s", "load_s", "tiny_forward_s", "total_s"))
    lookup = results["lookup"]
    for case in ("echo", "plain"):
        assert lookup[case]["identical_output"] is True
        assert lookup[case]["generated_tokens"] >= 1


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="Linux's /proc/self/smaps reports mappings")
def test_mapped_file_rss_counts_only_that_file_pages(tmp_path):
    import numpy as np

    from santacpu.bench import mapped_file_rss_mb

    path = tmp_path / "weights.bin"
    path.write_bytes(np.arange(4 * 2**20 // 8, dtype=np.int64).tobytes())  # 4 MiB
    assert mapped_file_rss_mb([str(path)]) == 0  # not mapped yet
    mapped = np.memmap(path, dtype=np.int64, mode="r")
    first_half = int(mapped[: mapped.size // 2].sum())  # touches the first 2 MiB only
    half = mapped_file_rss_mb([str(path)])
    assert first_half > 0 and 2 * 2**20 / 1e6 <= half < 4 * 2**20 / 1e6
    int(mapped.sum())
    assert mapped_file_rss_mb([str(path)]) == pytest.approx(4 * 2**20 / 1e6)
    del mapped


def test_bench_prints_a_table(bench_report):
    _, table = bench_report
    for label in (
        "prefill, 12-token prompt",
        "decode, 5 tokens",
        "FIM time to first token",
        "peak RSS",
        "of which the runtime",
        "Numba, first run",
        "Numba, on-disk cache",
        "cold page cache",
    ):
        assert label in table


def test_bench_rejects_settings_the_context_cannot_hold():
    ckpt = str(helpers.tiny_checkpoint())  # a 64-token context
    done = run_cli("bench", ckpt, "--quant", "none", "--prompt-tokens", "60", "--decode-tokens", "8")
    err = done.stderr.decode()
    # A value only the model can judge is a usage error (exit 2), naming the option given.
    assert done.returncode == 2 and err == ("santacpu: error: a 60-token prompt and 8 decoded tokens (--prompt-tokens "
                                            "and --decode-tokens) exceed the model's 64-token context\n"), err
    with pytest.raises(SantacpuError, match="unknown bench part 'speedy'"):
        run_bench(BenchSettings(model=ckpt, parts=("speedy",)))
    for fim in (64, 1, 3):  # (1 to 3: the markers alone, the prompt's length was nonsense)
        with pytest.raises(SantacpuError, match="--fim-tokens must be 0 .no FIM request. or between 4 and 63"):
            run_bench(BenchSettings(model=ckpt, prompt_tokens=8, decode_tokens=8, fim_tokens=fim))
    with pytest.raises(SantacpuError, match="--memory-context must be 0 .the model's whole context. or between 9"):
        run_bench(BenchSettings(model=ckpt, parts=("memory",), memory_context=5))
    for option, value in (("--repeat", "1001"), ("--batch", "1,257")):
        done = run_cli("bench", ckpt, "--quant", "none", option, value)
        assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, done.stderr  # (a list of a billion tokens)


def test_the_compile_runs_cover_the_many_token_kernels():
    from santacpu.backends.cpu.kernels import BLAS_MIN_TOKENS
    from santacpu.bench.run import TINY_PREFILL_TOKENS

    assert TINY_PREFILL_TOKENS >= BLAS_MIN_TOKENS


def test_prompt_ids_are_real_text_of_the_exact_length():
    tokenizer = Tokenizer.santacoder()
    ids = text_token_stream(tokenizer, 300, 49280)
    assert len(ids) == 300 and ids == text_token_stream(tokenizer, 300, 49280)
    assert len(set(ids)) > 50  # code, not one token repeated
    assert "def " in tokenizer.decode(ids) or "import" in tokenizer.decode(ids)


@pytest.mark.parametrize("n_prompt, n_ctx", [(200, 2048), (60, 64)])
def test_fim_texts_fit_the_requested_length(n_prompt, n_ctx):
    tokenizer = Tokenizer.santacoder()
    prefix, suffix = fim_texts(tokenizer, text_token_stream(tokenizer, 400, 49280), n_prompt, n_ctx)
    assert prefix and suffix
    n = len(build_fim_prompt(tokenizer, prefix, suffix, n_ctx, 1))
    assert n_prompt - 4 <= n <= min(n_prompt, n_ctx - 1)


# ---------------------------------------------------------------------------------------------
# tools/bench_peers.py: parsing and comparing (no peer is run here)

# What `llama-bench -p 16 -n 4 -r 1 -o json` printed on this machine, trimmed to the fields read.
LLAMA_BENCH_JSON = """[
  {"cpu_info": "Intel(R) Xeon(R) Processor", "model_filename": "/work/gguf/model-Q4_0.gguf",
   "model_type": "starcoder 1B Q4_0", "model_size": 675080192, "n_threads": 2, "n_prompt": 16, "n_gen": 0,
   "avg_ns": 138487641, "avg_ts": 115.533775, "samples_ts": [115.534]},
  {"cpu_info": "Intel(R) Xeon(R) Processor", "model_filename": "/work/gguf/model-Q4_0.gguf",
   "model_type": "starcoder 1B Q4_0", "model_size": 675080192, "n_threads": 2, "n_prompt": 0, "n_gen": 4,
   "avg_ns": 176944265, "avg_ts": 22.605988, "samples_ts": [22.606]},
  {"cpu_info": "Intel(R) Xeon(R) Processor", "model_filename": "/work/gguf/model-Q4_0.gguf",
   "model_type": "starcoder 1B Q4_0", "model_size": 675080192, "n_threads": 2, "n_prompt": 16, "n_gen": 0,
   "n_depth": 16, "avg_ns": 148487641, "avg_ts": 107.75, "samples_ts": [107.75]},
  {"cpu_info": "Intel(R) Xeon(R) Processor", "model_filename": "/work/gguf/model-Q4_0.gguf",
   "model_type": "starcoder 1B Q4_0", "model_size": 675080192, "n_threads": 2, "n_prompt": 0, "n_gen": 4,
   "n_depth": 16, "avg_ns": 186944265, "avg_ts": 21.4, "samples_ts": [21.4]}
]"""


def test_llama_bench_json_is_parsed():
    from tools.bench_peers import parse_llama_bench

    parsed = parse_llama_bench(LLAMA_BENCH_JSON)
    assert parsed["prefill_tok_s"] == pytest.approx(115.533775) and parsed["prefill_tokens"] == 16
    assert parsed["decode_tok_s"] == pytest.approx(22.605988) and parsed["decode_tokens"] == 4
    after_prompt = parse_llama_bench(LLAMA_BENCH_JSON, decode_depth=16)  # the prompt test stays the one at depth 0
    assert after_prompt["prefill_tok_s"] == pytest.approx(115.533775)
    assert after_prompt["decode_tok_s"] == pytest.approx(21.4) and after_prompt["decode_depth"] == 16
    assert after_prompt["decode_tok_s_depth0"] == pytest.approx(22.605988)
    with pytest.raises(ValueError, match="generation test at depth 32"):
        parse_llama_bench(LLAMA_BENCH_JSON, decode_depth=32)
    assert parsed["model_bytes"] == 675080192 and parsed["model_type"] == "starcoder 1B Q4_0"
    with pytest.raises(ValueError, match="generation test"):
        parse_llama_bench(json.dumps(json.loads(LLAMA_BENCH_JSON)[:1]))
    assert "torch" not in sys.modules  # the peer tool's parsing side needs no torch


def test_peer_ratios_and_markdown(tmp_path, capsys):
    from tools.bench_peers import NOT_INSTALLED, compare, main, markdown

    def report_of(santacpu: dict, peers: dict) -> dict:
        return (
            {
                "machine": {"cpu": "cpu", "usable_cores": 2, "memory_gib": 24, "date": "today"},
                "settings": {"threads": 2, "prompt_tokens": 512, "decode_tokens": 128, "repeat": 1},
                "santacpu_version": "0",
                "santacpu": santacpu,
                "peers": peers,
                "comparisons": compare(santacpu, peers),
            }
        )

    def render(santacpu: dict, peers: dict) -> str:
        return markdown(report_of(santacpu, peers))

    def ours(prefill, decode, rss, file_mb):
        return {
            "status": "ok",
            "prefill_tok_s": prefill,
            "decode_tok_s": decode,
            "decode_gb_s": decode * file_mb / 1000,
            "read_speed_gb_s": 18.0,
            "peak_rss_mb": rss,
            "peak_rss_full_context_mb": rss + 10,
            "rss_runtime_mb": 70.0,
            "file_bytes": file_mb * 1e6,
            "full_context_tokens": 2048,
            "weights_type": "x",
            "load_s": 0.1,
        }

    santacpu = {
        "q8_0": ours(40.0, 12.0, 1300, 1212),
        "q4_0": ours(50.0, 19.0, 800, 709),
        "q4_m": ours(55.0, 17.0, 800, 712),
    }
    peers = {
        "llama.cpp Q8_0": {
            "status": "ok",
            "prefill_tok_s": 50.0,
            "decode_tok_s": 12.0,
            "peak_rss_mb": 1250,
            "decode_gb_s": 14.4,
            "read_speed_gb_s": 28.8,
        },
        "llama.cpp Q4_0": {"status": "ok", "prefill_tok_s": 55.0, "decode_tok_s": 19.0, "peak_rss_mb": 1280},
        "CTranslate2 int8": {"status": NOT_INSTALLED},
    }
    rows = {(r["figure"], r["santacpu"], r["peer"]): r for r in compare(santacpu, peers)}
    assert rows[("decode (tok/s)", "q8_0", "llama.cpp Q8_0")]["ratio"] == pytest.approx(1.0)
    assert rows[("prefill (tok/s)", "q8_0", "llama.cpp Q8_0")]["ratio"] == pytest.approx(0.8)
    # The better 4-bit file is picked per figure: q4_0 decodes faster, q4_m prefills faster.
    assert rows[("decode, best 4-bit (tok/s)", "q4_0", "llama.cpp Q4_0")]["ratio"] == pytest.approx(1.0)
    assert rows[("prefill, best 4-bit (tok/s)", "q4_m", "llama.cpp Q4_0")]["ratio"] == pytest.approx(1.0)
    # Shares of each file's read speed: 12 x 1.212 GB / 18 GB/s = 80.8% against 14.4 / 28.8 = 50%.
    share = rows[("decode, share of its file's read speed (%)", "q8_0", "llama.cpp Q8_0")]
    assert share["santacpu_value"] == pytest.approx(80.8) and share["ratio"] == pytest.approx(80.8 / 50)
    unmeasured = rows[("decode, share of its file's read speed (%)", "q4_0", "llama.cpp Q4_0")]
    assert unmeasured["peer_value"] is None and unmeasured["ratio"] is None  # that peer has no read speed
    missing = rows[("decode (tok/s)", "q8_0", "CTranslate2 int8")]
    assert missing["ratio"] is None and missing["note"] == NOT_INSTALLED
    bound = rows[("peak RSS at a 2048-token context vs file size (MB)", "q8_0", "file size")]
    assert "+98 MB (runtime 70, model's work +28)" in bound["note"] and "within" in bound["note"]
    text = render(santacpu, peers)
    assert "| decode (tok/s) | q8_0 | 12.0 | llama.cpp Q8_0 | 12.0 | 1.00x |" in text
    assert "| CTranslate2 int8 | not installed |" in text
    santacpu["q8_0"]["batch"] = {"sizes": {"1": {"aggregate_tok_s": 12.0}, "8": {"aggregate_tok_s": 40.0}}}
    peers["llama.cpp Q8_0 batched"] = {"status": "ok", "sizes": {"8": {"aggregate_tok_s": 34.0}}}
    text = render(santacpu, peers)
    assert "| B | santacpu q8_0 | llama.cpp Q8_0 batched |" in text
    assert "| 1 | 12.0 | - |" in text and "| 8 | 40.0 | 34.0 |" in text
    assert "| llama.cpp Q8_0 batched |" not in text.split("Batched decode")[0]  # not a row of the system table
    # A stored --json report renders the same tables (how docs/performance.md's are made).
    stored = tmp_path / "peers.json"
    stored.write_text(json.dumps(report_of(santacpu, peers)))
    capsys.readouterr()
    main(["--render", str(stored)])
    assert capsys.readouterr().out == text + "\n"


def test_bench_batch_part(bench_report):
    report, table = bench_report
    batch = report["results"]["batch"]
    assert batch["prompt_tokens"] == 32 and batch["decode_tokens"] == 32  # fitted to the 64-token context
    assert set(batch["sizes"]) == {"1", "3"}
    for size, figures in batch["sizes"].items():
        assert positive(figures["aggregate_tok_s"]) and len(figures["samples"]) == REPEAT
        assert figures["per_sequence_tok_s"] == pytest.approx(figures["aggregate_tok_s"] / int(size))
    assert set(report["summary"]["batch_aggregate_tok_s"]) == {"1", "3"}
    assert "batched decode, B = 3 (32-token prompts, 32 tokens)" in table


def test_bench_refuses_bad_batch_sizes():
    done = run_cli("bench", str(helpers.tiny_checkpoint()), "--quant", "none", "--batch", "1,0")
    err = done.stderr.decode()
    assert done.returncode == 2 and len(err.splitlines()) == 1, err
    assert "Invalid value for '--batch': '1,0' is not a comma-separated list of whole numbers >= 1" in err, err


def test_a_tiny_models_runs_are_flagged_as_too_short(bench_report):
    report, _ = bench_report
    assert any("runs too short to mean anything" in note and "decode" in note for note in report["warnings"])


def test_full_size_figures_are_not_flagged():
    from santacpu.bench.report import short_run_warnings

    report = {
        "settings": {"prompt_tokens": 512},
        "summary": {"prefill_tok_s": 70.0, "decode_tok_s": 20.0, "decode_gb_s": 14.0, "read_speed_gb_s": 25.0},
        "results": {
            "speed": {"decode_tokens_done": 128, "decode_weight_bytes": 700_000_000},
            "lookup": {c: {"lookup_tok_s": 30.0, "generated_tokens": 128, "drafted_tokens": 100} for c in ("echo", "plain")},
        },
    }
    assert short_run_warnings(report) == []
    report["summary"]["decode_gb_s"] = 72.5  # faster than the file's pages read: the weights sat in cache
    report["results"]["lookup"]["echo"]["drafted_tokens"] = 4
    notes = short_run_warnings(report)
    assert len(notes) == 2 and "290% of the file's read speed" in notes[0] and "drafted only 4 tokens" in notes[1]


def test_a_child_dies_with_the_bench_killed_outright(tmp_path):
    # SIGKILL leaves the bench no time to kill its child: the child had measured on for a minute.
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux's")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    messages = tmp_path / "bench-stderr"  # (said by an assertion that fails)
    with open(messages, "wb") as stderr:
        bench = subprocess.Popen([sys.executable, "-m", "santacpu", "bench", str(helpers.tiny_checkpoint()), "--quant",
                                  "none", "--parts", "speed", "--repeat", "1000", "--threads", "1"], env=env,
                                 stdout=subprocess.DEVNULL, stderr=stderr)
    children = Path(f"/proc/{bench.pid}/task/{bench.pid}/children")

    def speed_child():
        # By its arguments after exec (`python -c CODE speed JOB`): between fork and exec a child
        # still shows the bench's own command line, whose "--parts speed" the file-read-speed child,
        # started first and gone within a second, would match.
        for pid in map(int, children.read_text().split()):
            with contextlib.suppress(OSError):
                args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if args[1:2] == [b"-c"] and args[3:4] == [b"speed"]:
                    return pid
        return None

    deadline = time.monotonic() + 120
    while (child := speed_child()) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert child is not None, messages.read_text(errors="replace")
    time.sleep(1.0)  # well inside the child's thousand runs
    assert Path(f"/proc/{child}").exists(), (bench.poll(), messages.read_text(errors="replace"))
    bench.kill()
    bench.wait()
    deadline = time.monotonic() + 10
    try:
        while Path(f"/proc/{child}").exists() and "Z" not in _state(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not Path(f"/proc/{child}").exists() or "Z" in _state(child), "the child outlived the bench"
    finally:  # never leave it measuring on the suite's cores
        with contextlib.suppress(OSError):
            os.kill(child, 9)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_the_childrens_warnings_are_said_once_as_santacpus_lines(tmp_path):
    # Each child loading a model without tokenizer.json printed Python's raw two-line warning.
    trained = Path(__file__).parent / "fixtures" / "trained_tiny"
    out = tmp_path / "bench.json"
    done = run_cli("bench", str(trained), "--quant", "none", "--parts", "speed,lookup", "--repeat", "1",
                   "--prompt-tokens", "8", "--decode-tokens", "4", "--fim-tokens", "0", "--json", str(out))
    err = done.stderr.decode()
    assert done.returncode == 0, err
    said = [line for line in err.splitlines() if "tokenizer.json" in line]
    assert len(said) == 1 and said[0].startswith("santacpu: warning: no tokenizer.json in"), err
    assert json.loads(out.read_text())["model"]["name"] == str(trained)


def test_the_json_report_holds_no_nan_or_infinity():
    from santacpu.bench.report import finite_only

    report = {"summary": {"decode_gb_s": math.inf, "x": [1.0, math.nan]}, "n": 3, "name": "m"}
    assert json.loads(json.dumps(finite_only(report), allow_nan=False)) == {
        "summary": {"decode_gb_s": None, "x": [1.0, None]}, "n": 3, "name": "m"}
