"""`santacpu eval humaneval-infill`: the harness scores right (canonical middles pass, pass@k is the
unbiased estimator), results files resume and refuse other runs, local and Ray runs agree, and bad
input is one error line. The sandbox's own tests are in test_sandbox.py."""

from __future__ import annotations

import json
import re
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from math import comb
from pathlib import Path

import pytest

from quantize.converter import convert
from santacpu.errors import OptionValueError, SantacpuError
from santacpu.harness.problems import BENCHMARKS, load_problems, program
from santacpu.harness.results import ResultsFile
from santacpu.harness.run import evaluate, evaluate_against, reference_path
from santacpu.harness.sandbox import SandboxLimits, run_program
from santacpu.harness.scoring import cut_to_span, exact_match, pass_at_k, span_ended
from santacpu.harness.settings import EvalSettings

from helpers import one_error_line, run_santacpu

TRAINED = Path(__file__).parent / "fixtures" / "trained_tiny"


# --- scoring ----------------------------------------------------------------------------------


def test_pass_at_k_matches_hand_computed_cases():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)  # c / n
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # 1 - C(7,5)/C(10,5)
    assert pass_at_k(200, 13, 100) == pytest.approx(1 - comb(187, 100) / comb(200, 100))
    assert pass_at_k(4, 0, 2) == 0.0 and pass_at_k(4, 4, 1) == 1.0
    assert pass_at_k(3, 1, 3) == 1.0  # fewer failures than k: some draw always holds the pass
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_a_single_line_span_ends_at_its_first_newline():
    assert cut_to_span("x = 1\ny = 2\n", "single-line") == "x = 1\n"
    assert cut_to_span("x = 1", "single-line") == "x = 1"
    assert cut_to_span("x = 1\ny = 2\n", "multi-line") == "x = 1\ny = 2\n"
    assert span_ended("x = 1\n", "single-line") and not span_ended("x = 1", "single-line")
    assert not span_ended("x = 1\n", "random-span")
    assert exact_match("  return x\n", "return x") and not exact_match("return y", "return x")


def test_the_bundled_benchmarks_are_whole():
    sizes = {name: len(load_problems(name)) for name in BENCHMARKS}
    assert sizes == {"single-line": 1033, "multi-line": 5815, "random-span": 1640, "random-span-light": 164}


@pytest.mark.parametrize("benchmark", ["single-line", "random-span-light"])
def test_the_canonical_middles_pass_every_problem(benchmark):
    problems = load_problems(benchmark)
    # With its canonical middle a problem is its HumanEval function again, so the problems cut from
    # one function (single-line: 1,033 cuts, 287 distinct sources) give one program: run each once.
    programs = sorted({program(p, p.middle) for p in problems})
    assert len(programs) >= 164
    limits = SandboxLimits(timeout_s=10.0)  # generous: CI's two cores run these beside other tests
    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(lambda source: run_program(source, limits), programs))
    failed = [o.detail for o in outcomes if not o.passed]
    assert not failed, failed[:5]


def test_an_empty_middle_fails_where_the_middle_matters():
    problems = load_problems("random-span-light")
    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(lambda p: run_program(program(p, ""), SandboxLimits(timeout_s=1.0)), problems))
    # Only a middle that changes no result may be left out: whitespace or comments alone.
    inert = {p.task_id for p in problems if all(not s.strip() or s.strip().startswith("#") for s in p.middle.splitlines())}
    passing = {p.task_id for p, o in zip(problems, outcomes) if o.passed}
    assert passing <= inert, sorted(passing - inert)
    assert len(passing) <= 0.05 * len(problems)


# --- the results file ---------------------------------------------------------------------------


def record(task_id: str, passed: bool = False) -> dict:
    """A problem's record of a one-sample run, as the harness writes it."""
    return {"task_id": task_id, "completions": ["x"], "passed": [passed], "exact": [False],
            "statuses": ["passed" if passed else "failed"]}


def test_results_resume_drop_a_torn_last_line_and_refuse_other_runs(tmp_path):
    path = tmp_path / "results.jsonl"
    header = {**EvalSettings().identity(), "model": {"name": "m", "sha256": "1"}}
    results = ResultsFile.open(path, header, resume=False)
    assert not path.exists()  # nothing is written before the first record
    results.append(record("a"))
    results.append(record("b"))
    with open(path, "a") as f:
        f.write('{"task_id": "c", "compl')  # a crash mid-write
    with pytest.raises(SantacpuError, match="another run is writing the results file"):
        ResultsFile.open(path, header, resume=True)  # (while the first run holds it)
    results.close()
    again = ResultsFile.open(path, header, resume=True)
    assert again.finished == {"a", "b"}
    again.append(record("c"))
    assert [json.loads(line).get("task_id") for line in path.read_text().splitlines()] == [None, "a", "b", "c"]
    again.close()

    with pytest.raises(SantacpuError, match="exists: pass --resume"):
        ResultsFile.open(path, header, resume=False)
    other_model = {**header, "model": {"name": "m", "sha256": "2"}}
    with pytest.raises(SantacpuError, match="another run's results \\(model"):
        ResultsFile.open(path, other_model, resume=True)
    other_benchmark = {**header, "benchmark": "multi-line"}
    with pytest.raises(SantacpuError, match="another run's results \\(benchmark"):
        ResultsFile.open(path, other_benchmark, resume=True)
    (tmp_path / "notes.txt").write_text("hello\n")
    with pytest.raises(SantacpuError, match="not a santacpu eval results file"):
        ResultsFile.open(tmp_path / "notes.txt", header, resume=True)
    for device in (Path("/dev/null"), tmp_path):
        with pytest.raises(SantacpuError, match=f"cannot write --out {device}: it is a (device|folder), not a regular file"):
            ResultsFile.open(device, header, resume=False)


@pytest.mark.parametrize(
    "line, fragment",
    [
        ('{"x": 1}', "line 3 (no task_id)"),
        ("[1, 2]", "line 3 (not a JSON object)"),
        ("not json", "line 3 (not a JSON object)"),
        (json.dumps({**record("c"), "passed": [True, True]}), "line 3 ('passed' is not a list of 1)"),
        (json.dumps({**record("c"), "passed": ["yes"]}), "line 3 ('passed' holds something other than true or false)"),
        (json.dumps(record("a", passed=True)), "line 3 (a was recorded before, with other results"),
        (json.dumps({**record("c"), "passed": [True]}), "line 3 ('passed' and 'statuses' disagree)"),
        (json.dumps({**record("c"), "truncated": "false"}), "line 3 ('truncated' is not true or false)"),
    ],
    ids=["no task id", "not an object", "not json", "samples", "not booleans", "a problem twice", "passed vs statuses",
         "truncated"],
)
def test_a_damaged_results_file_is_one_error_naming_the_line(tmp_path, line, fragment):
    # Such records had ended in KeyError/TypeError/ValueError tracebacks, some after the remaining
    # problems had run; two runs on one file had counted 117 problems of 60.
    path = tmp_path / "results.jsonl"
    header = {**EvalSettings().identity(), "model": {"name": "m", "sha256": "1"}}
    ResultsFile.open(path, header, resume=False).append(record("a"))
    with open(path, "a") as f:
        f.write(line + "\n")
    with pytest.raises(SantacpuError, match=re.escape(fragment)):
        ResultsFile.open(path, header, resume=True)


def test_results_of_two_runs_at_once_and_of_a_crash_before_the_first_record(tmp_path):
    path = tmp_path / "results.jsonl"
    header = {**EvalSettings().identity(), "model": {"name": "m", "sha256": "1"}}
    first, second = ResultsFile.open(path, header, resume=False), ResultsFile.open(path, header, resume=False)
    first.append(record("a"))
    with pytest.raises(SantacpuError, match="made by another run meanwhile"):
        second.append(record("a"))
    first.close()
    with open(path, "a") as f:
        f.write(json.dumps(record("a")) + "\n\n")  # the same record twice (and a blank line): counted once
    assert [r["task_id"] for r in ResultsFile.open(path, header, resume=True).records] == ["a"]
    path.write_text(json.dumps({"format": "santacpu-eval/1", **header})[:40])  # a crash while the header was written
    fresh = ResultsFile.open(path, header, resume=True)
    assert fresh.records == []
    fresh.append(record("b"))
    assert [json.loads(line).get("task_id") for line in path.read_text().splitlines()] == [None, "b"]
    fresh.close()
    # An empty file made beforehand (mktemp): two runs on it both truncated it and mixed records.
    empty = tmp_path / "made-by-mktemp.jsonl"
    empty.write_bytes(b"")
    first = ResultsFile.open(empty, header, resume=False)
    with pytest.raises(SantacpuError, match="another run is writing the results file"):
        ResultsFile.open(empty, header, resume=False)
    first.append(record("a"))
    first.close()
    # Text that does not start as a header (a note saved without a newline) is never written over.
    for text in ('{"precious": [1, 2, 3]}', "my thesis draft"):
        note = tmp_path / "note.json"
        note.write_text(text)
        with pytest.raises(SantacpuError, match="is not a santacpu eval results file"):
            ResultsFile.open(note, header, resume=True)
        assert note.read_text() == text
    # Nested past the parser's recursion limit: one error, no traceback.
    deep = tmp_path / "deep.jsonl"
    deep.write_text("[" * 200_000 + "\n")
    with pytest.raises(SantacpuError, match="is not a santacpu eval results file"):
        ResultsFile.open(deep, header, resume=True)
    deep.write_text(json.dumps({"format": "santacpu-eval/1", **header}) + "\n" + "[" * 200_000 + "\n")
    with pytest.raises(SantacpuError, match="damaged at line 2"):
        ResultsFile.open(deep, header, resume=True)


def test_a_results_file_moved_during_the_run_is_an_error_not_a_new_file(tmp_path):
    path = tmp_path / "results.jsonl"
    results = ResultsFile.open(path, {**EvalSettings().identity(), "model": {"name": "m", "sha256": "1"}}, resume=False)
    results.append(record("a"))
    path.rename(tmp_path / "moved.jsonl")
    with pytest.raises(SantacpuError, match="was moved or deleted during the run"):
        results.append(record("b"))
    assert not path.exists() and len((tmp_path / "moved.jsonl").read_text().splitlines()) == 2


def test_a_full_disk_names_the_results_file(tmp_path, monkeypatch):
    import errno

    from santacpu.harness import results as results_module

    path = tmp_path / "results.jsonl"
    results = ResultsFile.open(path, {**EvalSettings().identity(), "model": {"name": "m", "sha256": "1"}}, resume=False)
    results.append(record("a"))

    whole = path.read_bytes()
    real_write = os.write

    def part_then_full(fd, data):  # the disk fills in the middle of the record
        if len(data) > 8:
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(results_module.os, "write", part_then_full)
    with pytest.raises(SantacpuError) as error:
        results.append(record("b"))
    assert str(error.value) == (f"cannot write the results file {path}: No space left on device (its 1 finished "
                                "problem is kept; --resume carries on)")
    assert path.read_bytes() == whole  # no torn half record left on disk
    # A first record the disk cannot take leaves no (empty) file; a link is never written through.
    fresh = tmp_path / "fresh.jsonl"
    with pytest.raises(SantacpuError, match="nothing was kept"):
        ResultsFile.open(fresh, {**EvalSettings().identity(), "model": {"name": "m", "sha256": "1"}}, resume=False).append(
            record("a"))
    assert not fresh.exists()
    monkeypatch.undo()
    (tmp_path / "planted.jsonl").symlink_to(tmp_path / "victim")
    with pytest.raises(SantacpuError, match="is a symbolic link"):
        ResultsFile.open(tmp_path / "planted.jsonl", {}, resume=True)
    assert not (tmp_path / "victim").exists()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"benchmark": "two-line"}, "unknown benchmark 'two-line'"),
        ({"samples": 2, "temperature": 0.8, "ks": (1, 5)}, "pass@5 needs"),
        ({"samples": 4}, "greedy decoding"),
        ({"samples": 0}, "samples"),
        ({"timeout_s": 0}, "timeout"),
        ({"limit": 0}, "limit"),
    ],
)
def test_bad_settings_are_one_clear_error(changes, message):
    with pytest.raises(SantacpuError, match=message) as refused:
        EvalSettings(**changes).checked()
    # What the command line's parser cannot judge alone is its exit 2 too (a usage error).
    assert isinstance(refused.value, OptionValueError) == (message in ("pass@5 needs", "greedy decoding", "timeout"))


# --- end to end on the trained fixture -----------------------------------------------------------

SMALL = EvalSettings(benchmark="random-span-light", limit=3, max_new_tokens=16, max_batch=4)


def _generated(records: list[dict]) -> list[tuple]:
    return [(r["task_id"], r["completions"], r["passed"], r["exact"]) for r in records]


def test_an_interrupted_run_resumes_without_recomputing_and_ray_agrees(trained_q8, tmp_path, monkeypatch, capsys):
    whole, whole_records = evaluate(str(trained_q8), tmp_path / "whole.jsonl", SMALL)
    assert whole["problems"] == 3 and whole["run"]["problems"] == 3

    out = tmp_path / "interrupted.jsonl"
    from santacpu.harness import run as run_module

    class StopAfterTwo(run_module.Progress):
        def step(self, what: str = "") -> None:
            super().step(what)
            if self.done == 2:
                raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "Progress", StopAfterTwo)
    with pytest.raises(KeyboardInterrupt):
        evaluate(str(trained_q8), out, SMALL)
    monkeypatch.undo()
    kept = [json.loads(line) for line in out.read_text().splitlines()[1:]]
    assert len(kept) == 2
    resumed, records = evaluate(str(trained_q8), out, SMALL, resume=True)
    assert resumed["run"]["problems"] == 1  # only the unfinished one ran
    assert [json.loads(line) for line in out.read_text().splitlines()[1:3]] == kept
    assert _generated(records) == _generated(whole_records)

    from santacpu.harness.ray_pipeline import RayPlacement, require_ray

    starts_ray = not require_ray().is_initialized()
    capsys.readouterr()
    on_ray, ray_records = evaluate(str(trained_q8), tmp_path / "ray.jsonl", SMALL, ray=RayPlacement(workers=1, threads=1))
    assert on_ray["run"]["where"].startswith("on ray")
    assert ("santacpu: starting a local Ray cluster" in capsys.readouterr().err) == starts_ray  # said before the wait
    assert _generated(ray_records) == _generated(whole_records)


def test_n_samples_score_with_pass_at_k_and_a_reference_comparison(trained_q8, tmp_path):
    settings = EvalSettings(benchmark="single-line", limit=3, samples=3, ks=(1, 2), temperature=0.8, seed=5,
                            max_new_tokens=16)
    result = evaluate_against(str(trained_q8), str(TRAINED), tmp_path / "r.jsonl", settings, device="cpu")
    mine, theirs, comparison = result["model"], result["reference"], result["comparison"]
    records = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()[1:]]
    assert [len(r["completions"]) for r in records] == [3, 3, 3]
    assert all(c == cut_to_span(c, "single-line") for r in records for c in r["completions"])
    expected = sum(pass_at_k(3, sum(r["passed"]), 2) for r in records) / 3
    assert mine["pass@k"][2] == pytest.approx(expected)
    assert theirs["problems"] == 3 and reference_path(tmp_path / "r.jsonl").exists()
    assert comparison["problems"] == 3 and 0.0 <= comparison["agreement"] <= 1.0


def test_a_full_precision_model_runs_as_load_runs_it(tmp_path, monkeypatch):
    """The harness applies load's first-use policy: a full-precision model is evaluated as its
    cached q8_0 file unless quant="none" (then beside its reference, both in full precision)."""
    monkeypatch.setenv("SANTACPU_CACHE", str(tmp_path / "cache"))
    settings = EvalSettings(benchmark="random-span-light", limit=1, max_new_tokens=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fixture has no tokenizer.json
        default, _ = evaluate(str(TRAINED), tmp_path / "q8.jsonl", settings)
        assert default["model"] == f"{TRAINED} (q8_0)"  # run as its cached q8_0 file
        assert len(list((tmp_path / "cache").iterdir())) == 1
        both = evaluate_against(str(TRAINED), str(TRAINED), tmp_path / "fp.jsonl", settings, quant="none")
    assert both["model"]["model"] == both["reference"]["model"] == str(TRAINED)
    assert both["comparison"]["agreement"] == 1.0  # the same weights, greedy: the same completions


def test_the_command_line_runs_and_refuses_bad_input(trained_q8, tmp_path):
    out = tmp_path / "cli.jsonl"
    done = run_santacpu("eval", "humaneval-infill", "--model", trained_q8, "--benchmark", "random-span-light",
                        "--limit", "2", "--max-new-tokens", "8", "--out", out, "--json")
    assert done.returncode == 0, done.stderr.decode()
    summary = json.loads(done.stdout)["model"]
    assert summary["problems"] == 2 and summary["benchmark"] == "random-span-light"

    again = run_santacpu("eval", "humaneval-infill", "--model", trained_q8, "--benchmark", "single-line",
                         "--limit", "2", "--out", out, "--resume")
    one_error_line(again, "another run's results (benchmark")
    one_error_line(run_santacpu("eval", "humaneval-infill", "--model", tmp_path / "missing.safetensors",
                                "--out", tmp_path / "x.jsonl"), "missing.safetensors")
    one_error_line(run_santacpu("eval", "humaneval-infill", "--model", trained_q8, "--samples", "2",
                                "--temperature", "0.5", "--k", "1,10", "--out", tmp_path / "y.jsonl"),
                   "pass@10 needs at least 10 samples", code=2)
    one_error_line(run_santacpu("eval", "humaneval-infill", "--model", trained_q8, "--samples", "2",
                                "--out", tmp_path / "y.jsonl"), "greedy decoding", code=2)
    usage = run_santacpu("eval", "humaneval-infill", "--benchmark", "two-line")
    assert usage.returncode == 2 and "two-line" in usage.stderr.decode()
    for option, value, fragment in (("--k", "\uff11", "is not a comma-separated list"),  # a full-width 1
                                    ("--timeout", "nan", "nan is not a number of seconds from 0.1 to 3600"),
                                    ("--ray-address", "", "--ray-address is empty"),
                                    ("--ray-address", "ray://head:10001", "is a Ray Client address: santacpu joins"),
                                    ("--ray-address", "http://head:8265", "is a URL: santacpu joins a cluster as a"),
                                    ("--ray-address", "head", "head is not HOST:PORT: give its head node's HOST:PORT"),
                                    ("--ray-address", "head:65536", "head:65536 is not HOST:PORT"),
                                    ("--ray-address", "head:\u00b2", "is not HOST:PORT")):  # (a digit to str.isdigit)
        one_error_line(run_santacpu("eval", "humaneval-infill", "--model", trained_q8, option, value,
                                    "--out", tmp_path / "x.jsonl"), fragment, code=2)
    assert not (tmp_path / "x.jsonl").exists() and not (tmp_path / "y.jsonl").exists()
    ignored = run_santacpu("eval", "humaneval-infill", "--model", trained_q8, "--benchmark", "random-span-light",
                           "--limit", "1", "--max-new-tokens", "4", "--workers", "2", "--out", tmp_path / "w.jsonl")
    assert ignored.returncode == 0, ignored.stderr.decode()
    assert "santacpu: warning: --workers is ignored without --ray or --ray-address" in ignored.stderr.decode()


def test_ray_without_its_extra_is_one_line_naming_the_extra(trained_q8, tmp_path):
    import subprocess
    import sys

    from helpers import santacpu_env

    hide_ray = "import sys; sys.modules['ray'] = None; from santacpu.cli import main; main()"
    done = subprocess.run([sys.executable, "-c", hide_ray, "eval", "humaneval-infill", "--model", str(trained_q8),
                           "--ray", "--out", str(tmp_path / "r.jsonl")], capture_output=True, env=santacpu_env())
    one_error_line(done, 'pip install "santacpu[ray]"')


# --- the local run: records as problems finish, samples in parallel, Ctrl-C -----------------------


def _middles(problem, texts):
    from santacpu.harness.generate import Middles

    return Middles(problem=problem, texts=texts, prompt_tokens=1, computed_tokens=1, truncated=False)


def test_a_finished_problem_is_kept_while_the_next_one_is_generated(monkeypatch):
    # A record waited for the next problem's generation: Ctrl-C or a kill then lost finished work.
    import threading

    from santacpu.harness import local

    first, second = load_problems("single-line", 2)
    recorded, release = [], threading.Event()

    def generated(model, problems, settings):
        yield _middles(first, [first.middle])
        assert release.wait(30)
        yield _middles(second, [second.middle])

    monkeypatch.setattr(local, "generate_middles", generated)

    def on_record(record):
        recorded.append(record["task_id"])
        if record["task_id"] == first.task_id:
            release.set()  # (the generation of the second waits for the first's record)

    local.run_local(None, [first, second], EvalSettings(benchmark="single-line"), on_record)
    assert recorded == [first.task_id, second.task_id]


def test_samples_run_in_parallel_and_ctrl_c_stops_running_programs_at_once(monkeypatch):
    import time

    from santacpu.harness import local

    problem, finished = load_problems("single-line", 2)
    programs = {"sleep": "import time\ntime.sleep(1.0)\n", "forever": "while True:\n    pass\n", "pass": "pass\n"}
    monkeypatch.setattr(local, "programs_of", lambda problem, texts, benchmark: (texts, [programs[t] for t in texts]))
    texts = ["sleep"] * 4
    monkeypatch.setattr(local, "generate_middles", lambda model, problems, settings: iter([_middles(problem, texts)]))
    settings = EvalSettings(benchmark="single-line", samples=4, temperature=1.0, ks=(1,), exec_workers=4)
    started, records = time.monotonic(), []
    local.run_local(None, [problem], settings, records.append)
    assert time.monotonic() - started < 3.5  # four 1 s programs at once (one after another: over 4 s)
    assert len(records) == 1 and records[0]["statuses"] == ["passed"] * 4

    def interrupted(model, problems, settings):
        yield _middles(finished, ["pass"])
        yield _middles(problem, ["forever"])
        time.sleep(1.0)
        raise KeyboardInterrupt

    monkeypatch.setattr(local, "generate_middles", interrupted)
    records.clear()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        local.run_local(None, [finished, problem], EvalSettings(benchmark="single-line", timeout_s=60), records.append)
    assert time.monotonic() - started < 4  # not the running program's 60 s
    assert [r["task_id"] for r in records] == [finished.task_id]  # the stopped problem: done again on --resume

    # Ctrl-C after the last problem's generation, while its programs run: they are stopped too
    # (the run had exited at once and left them running, orphaned, to their timeout).
    import signal
    import threading

    monkeypatch.setattr(local, "generate_middles", lambda model, problems, settings: iter([_middles(problem, ["forever"])]))
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()  # (a real signal: it wakes a join)
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        local.run_local(None, [problem], EvalSettings(benchmark="single-line", timeout_s=60), records.append)
    assert time.monotonic() - started < 4
    assert _children() == []  # its programs ended (and were reaped) before it left


def _children() -> list[int]:
    """This process's child processes."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if stat.read_text().rsplit(")", 1)[-1].split()[1] == str(os.getpid()):
                found.append(int(stat.parent.name))
        except (OSError, IndexError):  # (gone meanwhile)
            continue
    return found


def test_a_sandbox_that_cannot_start_is_an_error_not_a_failed_program(monkeypatch):
    # It had been recorded as the model's failure, counted in pass@k and never run again on --resume.
    from santacpu.harness import sandbox

    def no_process(*args, **kwargs):
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(sandbox.subprocess, "Popen", no_process)
    with pytest.raises(SantacpuError, match="the sandbox could not start a program: Resource temporarily unavailable"):
        run_program("pass\n", SandboxLimits())


def test_the_fingerprint_covers_what_runs_the_model_and_nothing_else(tmp_path):
    import shutil

    from santacpu.harness.results import model_fingerprint

    folder = tmp_path / "model"
    shutil.copytree(TRAINED, folder)
    (folder / "tokenizer.json").write_text("{}")  # (read with the weights: part of the model)
    whole = model_fingerprint(str(folder))
    (folder / "README.md").write_text("notes\n")
    (folder / "results.jsonl").write_text("{}\n")  # --out inside the model's folder
    assert model_fingerprint(str(folder)) == whole
    weights = str(folder / "model.safetensors")
    alone = model_fingerprint(weights)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "layer_norm_epsilon": 0.5}))
    assert model_fingerprint(weights) != alone and model_fingerprint(str(folder)) != whole
    assert model_fingerprint("bigcode/santacoder", "main")["revision"] == "main"
    # A quantized file made again (after `cache clear`, or from a copy of the checkpoint) is the
    # same model: its provenance (source folder, date) is left out; its weights are not.
    from helpers import rewrite_safetensors

    for name in "abc":
        (tmp_path / name).mkdir()
    copied = shutil.copytree(TRAINED, tmp_path / "copied")
    first = convert(TRAINED, tmp_path / "a" / "q.safetensors", qtype="q8_0").out
    again = convert(copied, tmp_path / "b" / "q.safetensors", qtype="q8_0").out  # (another source folder)
    assert first.read_bytes() != again.read_bytes() and model_fingerprint(str(first)) == model_fingerprint(str(again))

    def nudge(tensors):
        name = next(n for n in tensors if n.endswith(".d"))
        tensors[name] = tensors[name].copy()
        tensors[name].view("uint16")[0, 0] ^= 1

    other = rewrite_safetensors(again, tmp_path / "c" / "q.safetensors", tensors=nudge)
    assert model_fingerprint(str(other)) != model_fingerprint(str(again))
    assert "revision" not in model_fingerprint("bigcode/santacoder")  # (files made before revisions were named)


def test_a_comparison_over_one_problem_has_no_standard_error_and_its_json_is_strict():
    from santacpu.harness.report import report_lines
    from santacpu.harness.scoring import compare

    comparison = compare([record("a", passed=True)], [record("a")])
    assert comparison["pass@1_difference_se"] is None
    json.dumps(comparison, allow_nan=False)
    summary = {"model": "m", "benchmark": "single-line", "problems": 1, "samples": 1, "pass@k": {1: 1.0},
               "exact_match": 0.0, "statuses": {"passed": 1}, "file": "x.jsonl",
               "run": {"problems": 1, "seconds": 1.0, "problems_per_minute": 60.0, "where": "here"}}
    lines = report_lines({"model": summary, "reference": {**summary, "model": "r"}, "comparison": comparison}, (1,))
    assert any("no standard error from one problem, 1 problem)" in line for line in lines), lines
