"""The command line where things go wrong, and its front door, through the `santacpu` entry point in
a subprocess: signals, file systems that refuse to be written (read-only, full, no permission),
the first-use cache, unreadable and hand-edited model files, ignored options, `--help`, and a
random checkpoint that works with every command's defaults. Each failure must end with its exit
code (1 error, 2 usage, 130 interrupted, 143 terminated), one line on stderr, no traceback and no
file left behind.

Runs as root drop the capabilities that bypass file permissions (`helpers.unprivileged`); full and
read-only file systems are small tmpfs mounts in private namespaces (`helpers.on_tmpfs`). Tests
that need either are skipped where the machine allows neither.
"""

from __future__ import annotations

import filecmp
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import helpers
import santacpu
from helpers import one_error_line, overlapping_copy, rewrite_safetensors, run_santacpu
from santacpu.formats.blocks import FORMATS
from santacpu.cli.text_input import decode_escapes

PROMPT = "def f():"
TEXT = "import os\n\ndef main():\n    for name in os.listdir('.'):\n        print(name)\n" * 6


@pytest.fixture(scope="module")
def tiny() -> Path:
    return helpers.tiny_checkpoint()


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, tiny) -> Path:
    """The tiny checkpoint as a q8_0 file."""
    from quantize.converter import convert

    return convert(tiny, tmp_path_factory.mktemp("quantized") / "tiny-q8_0.safetensors", qtype="q8_0").out


@pytest.fixture
def cache(tmp_path) -> dict:
    """A private, empty first-use quantization cache for the test's runs."""
    return {"SANTACPU_CACHE": str(tmp_path / "cache")}


@pytest.fixture(scope="module")
def code_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "code.py"
    path.write_text(TEXT)
    return path


def stderr_lines(done: subprocess.CompletedProcess) -> list[str]:
    """stderr's lines, less the notice of a first compile (a child may compile what no earlier
    test in its worker did: worker threads still running after a signal call kernels too)."""
    return helpers.without_compile_notice(done.stderr.decode(errors="replace")).splitlines()


# ---------------------------------------------------------------------------------------------
# Signals: the entry point `santacpu.cli.main`, with the conversion and the generation slowed
# down so that the signal arrives while the work runs.

_SLOWED_MAIN = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path

    import santacpu.cli, santacpu.generation.runner
    from santacpu.formats.blocks import FORMATS

    started = Path(sys.argv[1])

    def slowed(work):
        def slow(*args, **kwargs):
            started.touch()  # the work is under way: the test may send its signal
            time.sleep(0.5)
            return work(*args, **kwargs)
        return slow

    for block_format in FORMATS.values():
        block_format.quantize = slowed(block_format.quantize)
    runner = santacpu.generation.runner.CachedSequence
    runner.run = slowed(runner.run)
    santacpu.cli.main(sys.argv[2:])
    """
)


def signalled(tmp_path: Path, signum: int, *args: str) -> subprocess.CompletedProcess:
    """Run `santacpu ARGS` slowed down and send `signum` once its work has started."""
    started = tmp_path / "started"

    process = subprocess.Popen([sys.executable, "-c", _SLOWED_MAIN, str(started), *map(str, args)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=helpers.santacpu_env(),
                               preexec_fn=helpers.default_sigint)
    deadline = time.monotonic() + 120
    while not started.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            out, err = process.communicate()
            pytest.fail(f"the slowed-down run ended or hung before its work started: {err.decode(errors='replace')}")
        time.sleep(0.05)
    process.send_signal(signum)
    out, err = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


@pytest.mark.parametrize("signum, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_a_signal_during_quantize_exits_with_its_code_and_leaves_nothing(tmp_path, tiny, signum, code, word):
    out = tmp_path / "out"
    out.mkdir()
    done = signalled(tmp_path, signum, "quantize", tiny, out / "tiny.safetensors")
    assert (done.returncode, stderr_lines(done)) == (code, [f"santacpu: {word}"])
    assert list(out.iterdir()) == []  # no hidden .partial file either


def test_the_partial_file_of_a_killed_quantize_is_removed_by_the_next_run(tmp_path, tiny):
    out = tmp_path / "out"
    out.mkdir()
    assert signalled(tmp_path, signal.SIGKILL, "quantize", tiny, out / "tiny.safetensors").returncode == -signal.SIGKILL
    [partial] = out.iterdir()  # SIGKILL leaves no chance to clean up
    assert partial.name.startswith(".tiny.safetensors.") and partial.name.endswith(".partial")
    done = run_santacpu("quantize", tiny, out / "tiny.safetensors")
    assert done.returncode == 0, done.stderr.decode()
    assert f"santacpu: warning: removed {partial}, left by an earlier write of tiny.safetensors" in done.stderr.decode()
    assert [path.name for path in out.iterdir()] == ["tiny.safetensors"]


def test_partial_files_of_live_writers_stay_and_those_it_cannot_judge_are_named(tmp_path):
    from santacpu.atomic_file import atomic_output, write_text_atomically

    target = tmp_path / "report.json"
    unjudged = tmp_path / ".report.json.abcd1234.partial"  # named as before process ids were
    unjudged.write_text("?")
    (tmp_path / ".report.json.old.partial").write_text("not named like a partial file: not ours")
    with pytest.warns(santacpu.SantacpuWarning, match="abcd1234"), atomic_output(target) as live:
        live.write(b"{}")
        with pytest.warns(santacpu.SantacpuWarning) as warned:
            write_text_atomically(target, "[]")
        assert [str(w.message) for w in warned] == [
            f"{unjudged} looks like a partial file left by an interrupted write of report.json; delete it if "
            "nothing is writing that file now"]
        assert len(list(tmp_path.glob(".report.json.*.partial"))) == 3  # the live writer's is still there
    assert target.read_text() == "{}" and len(list(tmp_path.glob(".report.json.*.partial"))) == 2


def test_a_partial_file_is_judged_by_its_writers_lock_not_the_process_id_in_its_name(tmp_path):
    # In a container every run is process 1, and another PID namespace sees other process ids:
    # a killed run's partial file looked live for ever, and a live writer's looked dead.
    from santacpu.atomic_file import host_tag, describe_partial, remove_stale_partials

    target = tmp_path / "model.safetensors"
    dead = next(pid for pid in range(4_000_000, 4_100_000) if not Path(f"/proc/{pid}").exists())
    killed = tmp_path / f".model.safetensors.{host_tag()}-{os.getpid()}-abcd1234.partial"  # a live pid, no lock
    killed.write_bytes(b"half")
    os.utime(killed, (time.time() - 60, time.time() - 60))
    writing = tmp_path / f".model.safetensors.{host_tag()}-{dead}-efgh5678.partial"  # a dead pid, locked
    writing.write_bytes(b"half")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(float(sys.argv[2]))",
         str(writing), "1.5"], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"held\n"
        assert describe_partial(writing) == f"a partial file, being written by process {dead}"
        assert describe_partial(killed) == "a partial file left by an interrupted write"
        # Unlocked but named with another live process: a writer without a lock (out of
        # descriptors, or an older santacpu) is left alone.
        unlocked_live = tmp_path / f".model.safetensors.{host_tag()}-{os.getppid()}-ijkl9012.partial"
        unlocked_live.write_bytes(b"half")
        os.utime(unlocked_live, (time.time() - 60, time.time() - 60))
        with pytest.warns(santacpu.SantacpuWarning, match="removed .*abcd1234.partial"):
            assert [path for path, _ in remove_stale_partials(target)] == [killed]
        assert writing.exists() and unlocked_live.exists()
    finally:
        holder.kill()
        holder.wait()


def test_exclusive_waits_for_the_process_holding_the_lock(tmp_path):
    from santacpu.atomic_file import exclusive

    lock = tmp_path / ".x.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(1.0)", str(lock)],
        stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"held\n"
        said, started = [], time.monotonic()
        with exclusive(lock, lambda: said.append("waiting")):
            assert said == ["waiting"] and time.monotonic() - started > 0.5  # until the holder let go
        with exclusive(lock, lambda: said.append("again")):
            assert said == ["waiting"]
    finally:
        holder.kill()
        holder.wait()


def test_a_live_writers_file_holds_its_lock_until_it_has_its_name(tmp_path):
    from santacpu.atomic_file import _locked, atomic_output

    target = tmp_path / "report.json"
    with atomic_output(target) as f:
        f.write(b"{}")
        [partial] = tmp_path.glob(".report.json.*.partial")
        assert _locked(partial) is True
    assert target.read_bytes() == b"{}" and _locked(target) is False


def test_replacing_another_users_file_in_a_sticky_folder_is_refused_before_any_work(tmp_path, monkeypatch):
    # The rename at the end would fail with EPERM after all the work (minutes for a model).
    from santacpu.atomic_file import check_writable
    from santacpu.errors import WriteError

    sticky = tmp_path / "shared"
    sticky.mkdir()
    sticky.chmod(0o1777)
    theirs = sticky / "out.safetensors"
    theirs.write_bytes(b"theirs")
    monkeypatch.setattr(os, "geteuid", lambda: 4321)  # (this user owns neither the file nor the folder)
    with pytest.raises(WriteError, match="cannot replace .*out.safetensors: it belongs to another user"):
        check_writable(theirs, overwrite=True)
    check_writable(sticky / "new.safetensors", overwrite=True)  # a new name is fine
    sticky.chmod(0o777)
    check_writable(theirs, overwrite=True)  # not sticky: the folder's write permission decides


def test_a_killed_processs_temporary_folder_is_removed_by_the_next(tmp_path, monkeypatch):
    import tempfile

    from santacpu.atomic_file import host_tag, owned_temp_folder

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = next(pid for pid in range(4_000_000, 4_100_000) if not Path(f"/proc/{pid}").exists())
    gone, live = tmp_path / f"santacpu-x-{host_tag()}-{dead}-abcd", tmp_path / f"santacpu-x-{host_tag()}-{os.getppid()}-abcd"
    other_host = tmp_path / f"santacpu-x-00000000-{dead}-abcd"
    for folder in (gone, live, other_host):
        (folder / "sub").mkdir(parents=True)
        (folder / "sub" / "program.py").write_text("x = 1\n")
    made = Path(owned_temp_folder("santacpu-x"))
    assert made.is_dir() and made.name.startswith(f"santacpu-x-{host_tag()}-{os.getpid()}-")
    assert not gone.exists() and live.exists() and other_host.exists()


def test_ctrl_c_during_complete_exits_130(tmp_path, tiny):
    done = signalled(tmp_path, signal.SIGINT, "complete", PROMPT, "--model", tiny, "--quant", "none",
                     "--max-new-tokens", "60")  # what the 64-token context holds
    assert (done.returncode, stderr_lines(done)) == (130, ["santacpu: interrupted"])


@pytest.mark.parametrize("delay", [0.0, 0.2], ids=["child starting", "child importing"])
def test_ctrl_c_to_the_process_group_during_bench_is_one_line(quantized, delay):
    # The terminal's Ctrl-C reaches bench's measuring child too, mid-import or mid-run: the child
    # stays quiet and the parent, stopping it, says "interrupted" once.
    process = subprocess.Popen([sys.executable, "-m", "santacpu", "bench", quantized, "--parts", "speed"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=helpers.santacpu_env(),
                               start_new_session=True, preexec_fn=helpers.default_sigint)
    deadline = time.monotonic() + 120
    while not any(b"child_main" in _read(path) for path in Path("/proc").glob("[0-9]*/cmdline")
                  if _parent_of(path.parent) == process.pid):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1].decode()
        time.sleep(0.02)
    time.sleep(delay)  # 0.2: past the interpreter's start, inside the child's imports (half a second)
    os.killpg(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert (process.returncode, err.decode().splitlines()[-1:]) == (130, ["santacpu: interrupted"])
    assert "Traceback" not in err.decode()


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:  # (gone meanwhile)
        return b""


def _parent_of(proc: Path) -> int | None:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def test_a_closed_standard_output_is_one_error_line_where_output_is_written(quantized, tiny, tmp_path):
    def run_closed(*args):
        return subprocess.run([sys.executable, "-m", "santacpu", *map(str, args)], capture_output=False,
                              stderr=subprocess.PIPE, env=helpers.santacpu_env(), timeout=300,
                              preexec_fn=lambda: os.close(1))

    for args in (("complete", PROMPT, "--model", quantized, "--max-new-tokens", "2"), ("info", quantized)):
        done = run_closed(*args)
        assert (done.returncode, helpers.without_compile_notice(done.stderr.decode())) == (
            1, "santacpu: error: standard output: Bad file descriptor\n")
    assert run_closed("quantize", tiny, tmp_path / "x.safetensors").returncode == 0  # (its report is on stderr)


def test_a_full_standard_output_is_one_error_line_naming_it(quantized):
    # /dev/full: every write fails with ENOSPC, as a redirect onto a full disk does.
    for args in (("info", quantized), ("complete", PROMPT, "--model", quantized, "--max-new-tokens", "2"),
                 ("--help",)):
        with open("/dev/full", "w") as full:
            done = subprocess.run([sys.executable, "-m", "santacpu", *map(str, args)], stdout=full,
                                  stderr=subprocess.PIPE, env=helpers.santacpu_env(), timeout=300)
        assert (done.returncode, helpers.without_compile_notice(done.stderr.decode())) == (
            1, "santacpu: error: standard output: No space left on device\n")


def test_text_standard_output_cannot_encode_is_escaped_not_a_traceback(quantized):
    # An ASCII or Latin-1 terminal: a completion with a character it lacks ended in a traceback.
    from santacpu.cli.entry import _StandardOutput

    for encoding, want in (("ascii", b"x = '\\ud0dc\\xe9'\n"), ("latin-1", b"x = '\\ud0dc\xe9'\n"), ("utf-8", "x = '\ud0dc\xe9'\n".encode())):
        raw = io.BytesIO()
        stream = io.TextIOWrapper(raw, encoding=encoding)  # kept: collecting it would close raw
        out = _StandardOutput.around(stream)
        out.write("x = '\ud0dc\xe9'\n")
        out.flush()
        assert raw.getvalue() == want, encoding
    done = run_santacpu("complete", "s = '\u00e9", "--model", quantized, "--max-new-tokens", "3", env={"PYTHONIOENCODING": "ascii"})
    assert done.returncode == 0 and done.stderr == b"", done.stderr


def test_ctrl_c_while_the_command_line_loads_exits_130_without_a_traceback():
    # The package itself loads without NumPy or Numba, so the console script's own import is short;
    # the Ctrl-C lands while `santacpu.cli` (and Numba behind it) loads, as a finder stands in for it.
    script = textwrap.dedent("""
        import sys
        import santacpu.__main__
        assert not {"numpy", "numba", "santacpu.cli"} & set(sys.modules), sorted(sys.modules)
        class Interrupted:
            def find_spec(self, name, path=None, target=None):
                if name == "santacpu.cli":
                    raise KeyboardInterrupt
        sys.meta_path.insert(0, Interrupted())
        santacpu.__main__.main()
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env=helpers.santacpu_env({}))
    assert (done.returncode, done.stderr) == (130, "santacpu: interrupted\n")


def test_the_api_names_load_on_first_use():
    script = "import sys, santacpu; assert 'numba' not in sys.modules; print(santacpu.load.__module__, " \
             "santacpu.Model.__name__, santacpu.GenerationOptions.__name__, 'load' in dir(santacpu), " \
             "santacpu.model.runnable_model.__name__, santacpu.tokenizer.__name__)"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env=helpers.santacpu_env({}))
    assert done.stdout.split() == ["santacpu.model", "Model", "GenerationOptions", "True", "runnable_model",
                                   "santacpu.tokenizer"], done.stderr
    with pytest.raises(AttributeError, match="no attribute 'lod'"):
        santacpu.lod  # noqa: B018
    assert not hasattr(santacpu, "x.y") and getattr(santacpu, "harness.sandbox_boot", None) is None
    assert "__file__" in dir(santacpu) and "_importlib" not in dir(santacpu)


# ---------------------------------------------------------------------------------------------
# Writing where the file system refuses


@pytest.mark.parametrize("read_only, fragment", [(True, "is not writable"), (False, "No space left on device")])
def test_quantize_onto_a_read_only_or_full_file_system(tmp_path, tiny, read_only, fragment):
    folder, listing = tmp_path / "fs", tmp_path / "listing"
    folder.mkdir()
    prefix = helpers.on_tmpfs(folder, 1024, listing, read_only)  # the tiny q8_0 file needs 5 MB
    line = one_error_line(run_santacpu("quantize", tiny, folder / "out.safetensors", prefix=prefix), fragment)
    assert f"cannot write {folder / 'out.safetensors'}" in line
    assert listing.read_text() == ""


def test_quantize_into_a_folder_without_write_permission(tmp_path, tiny):
    folder = tmp_path / "locked"
    folder.mkdir(mode=0o555)
    done = run_santacpu("quantize", tiny, folder / "out.safetensors", prefix=helpers.unprivileged())
    one_error_line(done, f"the folder {folder} is not writable")
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("read_only, fragment", [(True, "is not writable"), (False, "No space left on device")])
def test_first_use_cache_on_a_read_only_or_full_file_system(tmp_path, tiny, read_only, fragment):
    folder, listing = tmp_path / "cache", tmp_path / "listing"
    folder.mkdir()
    done = run_santacpu("complete", PROMPT, "--model", tiny, env={"SANTACPU_CACHE": str(folder)},
                        prefix=helpers.on_tmpfs(folder, 1024, listing, read_only))
    assert done.returncode == 1 and done.stdout == b"" and "Traceback" not in done.stderr.decode()
    *before, last = stderr_lines(done)
    assert all(line.startswith("santacpu: first use of") for line in before)  # the announcement, if made
    assert last.startswith("santacpu: error: ") and fragment in last
    assert "quantization cache" in last and "SANTACPU_CACHE" in last and "--quant none" in last
    assert ("free some space there" in last) == (not read_only)  # (advice that can help, only)
    assert listing.read_text() == ""


def test_first_use_cache_that_is_a_file_or_not_writable(tmp_path, tiny):
    a_file = tmp_path / "cache-file"
    a_file.write_text("not a folder")
    done = run_santacpu("complete", PROMPT, "--model", tiny, env={"SANTACPU_CACHE": str(a_file)})
    line = one_error_line(done, f"cannot use {a_file} as a folder")
    assert "set SANTACPU_CACHE to another folder" in line and "free some space" not in line
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    done = run_santacpu("complete", PROMPT, "--model", tiny, env={"SANTACPU_CACHE": str(locked)},
                        prefix=helpers.unprivileged())
    assert "SANTACPU_CACHE" in one_error_line(done, f"the folder {locked} is not writable")
    assert list(locked.iterdir()) == []


def test_a_damaged_cache_file_is_made_again(tiny, cache):
    args = ("complete", PROMPT, "--model", tiny, "--max-new-tokens", "6")
    first = run_santacpu(*args, env=cache)
    assert first.returncode == 0, first.stderr.decode()
    [cached] = Path(cache["SANTACPU_CACHE"]).iterdir()
    whole = cached.stat().st_size
    cached.write_bytes(cached.read_bytes()[: whole // 2])  # a conversion cut short, a damaged disk
    again = run_santacpu(*args, env=cache)
    assert again.returncode == 0 and again.stdout == first.stdout
    warning, *rest = stderr_lines(again)
    assert warning.startswith(f"santacpu: warning: the cached quantization {cached} of {tiny} is damaged")
    assert "truncated" in warning
    assert len(rest) == 1 and rest[0].startswith("santacpu: first use of")
    assert cached.stat().st_size == whole
    third = run_santacpu(*args, env=cache)
    assert third.returncode == 0 and third.stderr == b"" and third.stdout == first.stdout


# ---------------------------------------------------------------------------------------------
# Model files that cannot be read or were edited by hand


def test_model_files_that_cannot_be_read(tmp_path, quantized, cache):
    folder = helpers.copy_checkpoint(tmp_path / "ckpt")
    (folder / "model.safetensors").chmod(0)
    locked = tmp_path / "locked.safetensors"
    locked.write_bytes(quantized.read_bytes())
    locked.chmod(0)
    prefix = helpers.unprivileged()
    for quant in ("none", "q8_0"):  # loaded as it is, or quantized on first use
        done = run_santacpu("complete", PROMPT, "--model", folder, "--quant", quant, env=cache, prefix=prefix)
        one_error_line(done, f"cannot read {folder / 'model.safetensors'}: Permission denied")
    for args in (("info", locked), ("complete", PROMPT, "--model", locked)):
        one_error_line(run_santacpu(*args, prefix=prefix), f"cannot read {locked}: Permission denied")
    one_error_line(run_santacpu("info", folder), f"{folder} is a folder, not a .safetensors file")


@pytest.mark.parametrize("edit, fragment", helpers.HAND_EDITS)
def test_hand_edited_metadata(tmp_path, quantized, edit, fragment):
    bad = rewrite_safetensors(quantized, tmp_path / "bad.safetensors", metadata=edit)
    for args in (("info", bad), ("complete", PROMPT, "--model", bad)):
        assert str(bad) in one_error_line(run_santacpu(*args), fragment)


def test_info_shows_odd_but_harmless_metadata(tmp_path, quantized):
    # `keep` holding numbers (a hand edit) made `info` end in a TypeError traceback; a size target
    # of 10**400 in an OverflowError; a source with a newline and a terminal escape forged a line.
    def odd_values(m):
        helpers.edit_json(m, "quantization", lambda q: {**q, "keep": [1, 2], "size_target": {"bits_per_weight": 10**400}})
        helpers.edit_json(m, "provenance", lambda p: {**p, "source": "/x\nsantacpu: error: forged\x1b[2J"})

    odd = rewrite_safetensors(quantized, tmp_path / "odd.safetensors", metadata=odd_values)
    done = run_santacpu("info", odd)
    text = done.stdout.decode()
    assert done.returncode == 0 and "keep 1, 2" in text and "sized to" not in text, done.stderr.decode()
    assert "source          /x\\nsantacpu: error: forged\\x1b[2J" in text.splitlines()
    assert not any(line.startswith("santacpu: error") for line in text.splitlines()) and "\x1b" not in text


def test_overlapping_tensors_and_nan_weights(tmp_path, quantized, code_file):
    overlapping = overlapping_copy(quantized, tmp_path / "overlap.safetensors")
    for args in (("info", overlapping), ("complete", PROMPT, "--model", overlapping)):
        one_error_line(run_santacpu(*args), "overlap")

    def poison(tensors):
        tensors["wte.d"][7, 1] = np.nan  # an LM head row's scale

    nan = rewrite_safetensors(quantized, tmp_path / "nan.safetensors", tensors=poison)
    for args in (("complete", PROMPT, "--model", nan, "--max-new-tokens", "8"), ("perplexity", code_file, "--model", nan, "--ctx", "32")):
        one_error_line(run_santacpu(*args), "not finite")
    one_error_line(run_santacpu("info", nan), "tensor 'wte' holds NaN or infinite values")

    def poison_inside(tensors):
        tensors["h.0.ln_2_bias"][5] = np.nan  # one channel of the first MLP's input: the integer
        # kernels' rounding of x had turned it into a finite value, and the output into nonsense

    inside = rewrite_safetensors(quantized, tmp_path / "nan-inside.safetensors", tensors=poison_inside)
    one_error_line(run_santacpu("complete", PROMPT, "--model", inside, "--max-new-tokens", "8"), "not finite")


def test_quantizing_a_quantized_file(tmp_path, quantized):
    out = tmp_path / "again.safetensors"
    one_error_line(run_santacpu("quantize", quantized, out), "is already a santacpu quantized file")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Reports, and options that would be ignored


def test_json_reports_get_the_usual_mode_and_their_destination_is_checked_first(tmp_path, quantized, code_file):
    report = tmp_path / "scores.json"
    done = run_santacpu("perplexity", code_file, "--model", quantized, "--ctx", "32", "--json", report, umask=0o027)
    assert done.returncode == 0, done.stderr.decode()
    assert report.stat().st_mode & 0o777 == 0o640  # 0666 less the umask, not mkstemp's 0600
    # The destination is checked before the model is even loaded (here it does not exist).
    missing_model = tmp_path / "no-such-model"
    done = run_santacpu("perplexity", code_file, "--model", missing_model, "--json", tmp_path / "nowhere" / "s.json")
    one_error_line(done, "cannot write --json")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    done = run_santacpu("perplexity", code_file, "--model", missing_model, "--json", locked / "s.json",
                        prefix=helpers.unprivileged())
    one_error_line(done, f"the folder {locked} is not writable")


def test_a_report_or_model_file_is_replaced_only_when_asked_and_never_a_device_or_fifo(tmp_path, quantized, tiny,
                                                                                       code_file):
    kept = tmp_path / "kept.json"
    kept.write_text("mine\n")
    args = ("perplexity", code_file, "--model", quantized, "--ctx", "32", "--json")
    one_error_line(run_santacpu(*args, kept), f"--json {kept} already exists (use --force to replace it)")
    assert kept.read_text() == "mine\n"
    assert run_santacpu(*args, kept, "--force").returncode == 0 and json.loads(kept.read_text())
    # Not even with --force a file the command reads: the scored text, the model (or a file in its folder).
    text = tmp_path / "text.py"
    shutil.copy(code_file, text)
    for report, command in ((text, ("perplexity", text, "--model", quantized, "--ctx", "32")),
                            (tiny / "config.json", ("perplexity", code_file, "--model", tiny, "--ctx", "32")),
                            (quantized, ("bench", quantized, "--parts", "load"))):
        before = report.read_bytes()
        done = run_santacpu(*command, "--json", report, "--force")
        assert "is a file this command reads" in one_error_line(done, "write elsewhere", code=2)
        assert report.read_bytes() == before
    # A link is neither written through (one planted in /tmp could lead anywhere) nor renamed over
    # (/dev/stdout is one); a FIFO (as a device) is refused, never renamed over.
    target, link = tmp_path / "target.json", tmp_path / "link.json"
    target.write_text("theirs\n")
    link.symlink_to(target)
    one_error_line(run_santacpu(*args, link, "--force"), "it is a symbolic link (give the path of a regular file)")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder-link").symlink_to(tmp_path / "folder")
    one_error_line(run_santacpu(*args, tmp_path / "folder-link", "--force"), "it is a symbolic link")
    # A folder's path (a trailing '/'), or nothing, is no file name (Path() would drop the slash):
    one_error_line(run_santacpu(*args, f"{tmp_path / 'folder-link'}/", "--force"), "ends with '/', as a folder's path does", code=2)
    one_error_line(run_santacpu("quantize", tiny, f"{tmp_path / 'new.safetensors'}/"), "ends with '/'", code=2)
    one_error_line(run_santacpu("quantize", tiny, ""), "Invalid value for 'OUT': the file name is empty", code=2)
    assert not (tmp_path / "new.safetensors").exists()
    assert link.is_symlink() and target.read_text() == "theirs\n" and (tmp_path / "folder-link").is_symlink()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    one_error_line(run_santacpu(*args, fifo, "--force"), f"cannot write --json {fifo}: it is a FIFO, not a regular file")
    one_error_line(run_santacpu("quantize", tiny, fifo, "--force"), "it is a FIFO, not a regular file")
    one_error_line(run_santacpu("bench", quantized, "--parts", "load", "--json", fifo, "--force"), "it is a FIFO")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_a_file_that_appears_while_a_report_is_made_is_not_replaced_without_force(tmp_path):
    from santacpu.atomic_file import atomic_output
    from santacpu.errors import WriteError

    out = tmp_path / "report.json"
    with pytest.raises(WriteError, match="already exists .use --force to replace it."):
        with atomic_output(out, overwrite=False) as f:
            f.write(b"new\n")
            out.write_text("theirs\n")  # another program's, made while this one was writing
    assert out.read_text() == "theirs\n" and list(tmp_path.iterdir()) == [out]  # no partial file left
    with atomic_output(out, overwrite=True) as f:
        f.write(b"new\n")
    assert out.read_text() == "new\n"


def test_options_that_would_be_ignored_are_warned_about(tmp_path, tiny, quantized):
    done = run_santacpu("quantize", tiny, tmp_path / "out.safetensors", "--keep", "h.9.*=f16", "--revision", "v2")
    assert done.returncode == 0, done.stderr.decode()
    warnings = [line for line in stderr_lines(done) if line.startswith("santacpu: warning: ")]
    assert any("--keep pattern 'h.9.*' matches no tensor" in w for w in warnings)
    assert any(f"revision 'v2' is ignored: {tiny} is a local file or folder" in w for w in warnings)
    assert "revision        - (none asked for)" in run_santacpu("info", tmp_path / "out.safetensors").stdout.decode()

    done = run_santacpu("complete", PROMPT, "--model", quantized, "--quant", "q4_0", "--max-new-tokens", "4")
    assert done.returncode == 0
    assert stderr_lines(done) == [f"santacpu: warning: quantization q4_0 is ignored: {quantized} is a quantized file "
                                  "already and runs as it is"]
    assert done.stdout.decode() == helpers.line(santacpu.load(quantized).complete(PROMPT, max_new_tokens=4))

    # Sampling options under greedy decoding, lookup under sampling, --fim-order without --fim:
    # each said, and the output is what it would be without them.
    done = run_santacpu("complete", PROMPT, "--model", quantized, "--max-new-tokens", "4", "--top-k", "5", "--seed", "3",
                        "--fim-order", "spm", "--no-lookup", "--draft-tokens", "3")
    assert done.returncode == 0 and stderr_lines(done) == [
        "santacpu: warning: --top-k, --seed are ignored: decoding is greedy (give --temperature above 0 to sample)",
        "santacpu: warning: --fim-order is ignored without --fim",
        "santacpu: warning: --draft-tokens is ignored: no prompt lookup runs (--no-lookup, or sampling)",
    ]
    assert done.stdout.decode() == helpers.line(santacpu.load(quantized).complete(PROMPT, max_new_tokens=4))
    done = run_santacpu("complete", PROMPT, "--model", quantized, "--max-new-tokens", "4", "--temperature", "0.5", "--lookup")
    assert done.returncode == 0 and stderr_lines(done) == [
        "santacpu: warning: --lookup is ignored: prompt lookup drafts only under greedy decoding (--temperature 0)"]
    assert run_santacpu("complete", PROMPT, "--model", quantized, "--max-new-tokens", "4", "--temperature", "0.5",
                        "--top-p", "0.9", "--seed", "1").stderr == b""
    # Lookup off by default (full-precision weights): --draft-tokens alone changes nothing either.
    done = run_santacpu("complete", PROMPT, "--model", tiny, "--quant", "none", "--max-new-tokens", "4",
                        "--draft-tokens", "3")
    assert done.returncode == 0 and stderr_lines(done) == [
        "santacpu: warning: --draft-tokens is ignored: prompt lookup is off by default for this model (full-precision "
        "weights, or a CPU without integer kernels); give --lookup to turn it on"]
    assert run_santacpu("complete", PROMPT, "--model", tiny, "--quant", "none", "--max-new-tokens", "4",
                        "--draft-tokens", "3", "--lookup").stderr == b""


def test_a_library_s_warning_is_one_line_too(capsys):
    # Ray Data's warnings span several lines of prose, then the source line that warned.
    import os

    from santacpu.cli.entry import _show_warning

    where = os.path.join("/venv", "lib", "python3.11", "site-packages", "ray", "data", "operator.py")
    _show_warning(UserWarning("The minimum number of actors\nis 2."), UserWarning, where, 553)
    _show_warning("a module's own", DeprecationWarning, "/somewhere/helper.py", 1)
    assert capsys.readouterr().err.splitlines() == [
        "santacpu: warning: (ray, UserWarning) The minimum number of actors is 2.",
        "santacpu: warning: (helper, DeprecationWarning) a module's own"]


def test_messages_never_reach_standard_output_when_standard_error_is_closed(quantized):
    # Python starts with sys.stderr = None when fd 2 is closed (`2>&-`), and print(file=None)
    # writes to stdout: the warning (and a first run's compile notice) had led the completion.
    args = ("complete", PROMPT, "--model", quantized, "--max-new-tokens", "4", "--temperature", "0.5", "--seed", "2", "--lookup")
    want = run_santacpu(*args)
    assert want.returncode == 0 and want.stderr.startswith(b"santacpu: warning: --lookup is ignored")
    done = subprocess.run([sys.executable, "-m", "santacpu", *map(str, args)], stdout=subprocess.PIPE,
                          env=helpers.santacpu_env(None), timeout=120, preexec_fn=lambda: os.close(2))
    assert done.returncode == 0 and done.stdout == want.stdout


def test_text_from_a_file_or_standard_input_is_bounded(tmp_path, quantized):
    # /dev/zero (or a runaway pipe) as the prompt grew until memory ran out, with a traceback.
    (tmp_path / "suffix.py").write_text("x = 1\n")
    for args in (["--fim", "/dev/zero", str(tmp_path / "suffix.py")], ["-"]):
        prefix = ["sh", "-c", 'exec "$0" "$@" < /dev/zero'] if args == ["-"] else []
        done = run_santacpu("complete", *args, "--model", quantized, prefix=prefix)
        one_error_line(done, "is over 64 MiB")


def test_a_cache_that_is_a_file_is_named_by_cache_list_and_clear(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    for command in ("list", "clear"):
        done = run_santacpu("cache", command, env={"SANTACPU_CACHE": str(tmp_path / "file")})
        one_error_line(done, f"the quantization cache {tmp_path / 'file'} is not a folder")


@pytest.mark.parametrize("variable, value", [("NUMBA_NUM_THREADS", "0"), ("NUMBA_NUM_THREADS", "-1"),
                                             ("NUMBA_NUM_THREADS", "abc"), ("NUMBA_THREADING_LAYER", "bogus"),
                                             # a ValueError traceback ('²'.isdigit()); a crash (no word, exit 139)
                                             ("NUMBA_NUM_THREADS", "²"), ("NUMBA_NUM_THREADS", "100000")])
def test_a_bad_numba_variable_is_one_error_line_even_for_version(variable, value):
    # Numba reads them when imported: a traceback from inside Numba before santacpu could say a word.
    one_error_line(run_santacpu("--version", env={variable: value}), f"{variable}={value!r}")
    api = subprocess.run([sys.executable, "-c", "import santacpu"], capture_output=True, text=True,
                         env=helpers.santacpu_env({variable: value}))
    assert api.returncode == 1 and f"SantacpuError: {variable}={value!r}" in api.stderr


@pytest.mark.parametrize("args", [("complete", PROMPT, "--model", ""), ("quantize", "", "out.safetensors"),
                                  ("bench", ""), ("cache", "clear", ""), ("random-checkpoint", "")],
                         ids=["complete", "quantize", "bench", "cache clear", "random-checkpoint"])
def test_an_empty_model_or_folder_name_is_a_usage_error(tmp_path, args):
    # `--model "$M"` with M unset ran the default model; `cache clear ""` cleared every model's files.
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "kept.safetensors").write_bytes(b"x")
    one_error_line(run_santacpu(*args, env={"SANTACPU_CACHE": str(cache)}), "name is empty", code=2)
    assert [p.name for p in cache.iterdir()] == ["kept.safetensors"]


def test_a_home_folder_of_no_user_is_one_error_line(quantized):
    # Path.expanduser raised a RuntimeError for ~nouser.
    done = run_santacpu("cache", "list", env={"SANTACPU_CACHE": "~no-such-user-here/cache"})
    one_error_line(done, "SANTACPU_CACHE: cannot expand '~no-such-user-here/cache': no user 'no-such-user-here'")
    one_error_line(run_santacpu("complete", PROMPT, "--model", "~no-such-user-here/model"), "cannot expand")


def test_windows_is_one_error_line_naming_wsl(tmp_path):
    # santacpu opens, maps and replaces its files the POSIX way: on Windows the first model file
    # read failed with a traceback (os.O_NONBLOCK). Here sys.platform says "win32" from the start.
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.platform = 'win32'\n")
    path = {"PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    done = run_santacpu("complete", PROMPT, env=path)
    one_error_line(done, "santacpu runs on Linux and macOS, not on Windows: run it in WSL")
    api = subprocess.run([sys.executable, "-c", "import santacpu"], capture_output=True, text=True,
                         env=helpers.santacpu_env(path))
    assert api.returncode == 1 and "SantacpuError: santacpu runs on Linux and macOS" in api.stderr, api.stderr
    from santacpu.settings import platform_problem

    assert platform_problem("linux") is None and platform_problem("darwin") is None


def test_a_threading_layer_numba_cannot_load_is_one_error_line(quantized, monkeypatch):
    # A valid name whose library is missing (tbb without TBB) failed inside the first parallel
    # kernel, as a page of Numba's traceback. On this machine as it is:
    done = run_santacpu("complete", PROMPT, "--model", quantized, "--max-new-tokens", "1", env={"NUMBA_THREADING_LAYER": "tbb"})
    if importlib.util.find_spec("tbb") is None:
        one_error_line(done, "NUMBA_THREADING_LAYER='tbb' cannot be loaded here (Intel TBB is required")
    else:
        assert done.returncode == 0, done.stderr
    # And as Numba fails wherever a layer's library is missing:
    from numba.np.ufunc import parallel

    def missing(*args):
        raise ValueError("No threading layer could be loaded.\nHINT:\nIntel TBB is required, try:\n$ conda/pip install tbb")

    monkeypatch.setattr(parallel, "_launch_threads", missing)
    with pytest.raises(santacpu.SantacpuError, match=r"cannot be loaded here \(Intel TBB is required, try: \$ conda/pip install tbb\); unset it"):
        santacpu.load(quantized)


def test_stop_escapes():
    assert decode_escapes("태\\n") == "태\n"  # text kept, escape decoded (not garbled through Latin-1)
    assert decode_escapes("\\t\\\\x\\x41\\u00e9\\N{BULLET}é") == "\t\\xAé\u2022é"
    assert decode_escapes("no escapes: 태") == "no escapes: 태"


@pytest.mark.parametrize("stop, fragment", [("\\x", "\\x at position 0 needs two hex digits"),
                                            ("\\x4", "\\x at position 0 needs two hex digits"),
                                            ("a\\", "\\ at position 1 is not an escape"),
                                            ("\\N{NO SUCH NAME}", "\\N at position 0 needs a known character name"),
                                            ("\\q", "\\q at position 0 is not an escape")])
def test_bad_stop_escapes(quantized, stop, fragment):
    # A usage error (exit 2), as every other bad option value is.
    line = one_error_line(run_santacpu("complete", PROMPT, "--model", quantized, "--stop", stop), fragment, code=2)
    assert f"--stop '{stop}'" in line


def test_non_ascii_stop_strings(quantized):
    done = run_santacpu("complete", PROMPT, "--model", quantized, "--max-new-tokens", "6", "--stop", "태\\n")
    assert done.returncode == 0 and done.stderr == b""
    assert done.stdout.decode() == helpers.line(santacpu.load(quantized).complete(PROMPT, max_new_tokens=6, stop="태\n"))


# ---------------------------------------------------------------------------------------------
# bench on a tiny model


def test_bench_checks_only_what_its_parts_use(tmp_path, quantized):
    report = tmp_path / "bench.json"
    # The speed part's lengths are out of a 64-token context, but only the memory part runs.
    done = run_santacpu("bench", quantized, "--parts", "memory", "--prompt-tokens", "600", "--fim-tokens", "999",
                        "--threads", "1", "--json", report, umask=0o027)
    assert done.returncode == 0, done.stderr.decode()
    assert re.search(r"of which the model's work above the file +(under 1 MB|\+\d+ MB) ", done.stdout.decode())
    assert report.stat().st_mode & 0o777 == 0o640
    one_error_line(run_santacpu("bench", quantized, "--parts", "memory", "--memory-context", "100"),
                   "--memory-context must be 0 (the model's whole context) or between 9 and 64 tokens", code=2)


# ---------------------------------------------------------------------------------------------
# The front door


def test_help_and_version():
    texts = {name: run_santacpu(*name.split(), "--help") for name in
             ("", "complete", "quantize", "info", "perplexity", "bench", "random-checkpoint")}
    for name, done in texts.items():
        assert done.returncode == 0 and "<bool>" not in done.stdout.decode(), name
    flat = {name: " ".join(done.stdout.decode().split()) for name, done in texts.items()}
    assert "0 < P <= 1" in flat["complete"] and "--seed <int range>" in flat["complete"]
    assert "x>=8" in flat["perplexity"] and "at most the model's context" in flat["perplexity"]
    assert all(f"{name} (" in flat["quantize"] for name in FORMATS)  # q6_0 included
    # Choices shown where they are asked for, not only in the error for a wrong one; arguments by name.
    assert f"--quant [none|{'|'.join(FORMATS)}]" in flat["complete"] and "--fim-order [psm|spm]" in flat["complete"]
    assert f"--type [{'|'.join(FORMATS)}]" in flat["quantize"] and "[speed|lookup|memory|load|compile],..." in flat["bench"]
    assert "santacpu quantize [OPTIONS] {SRC} {OUT}" in flat["quantize"] and "[OPTIONS] [PROMPT]" in flat["complete"]
    assert "--version" in flat[""] and "random-checkpoint" in flat[""]
    version = run_santacpu("--version")
    assert (version.returncode, version.stdout.decode()) == (0, f"santacpu {santacpu.__version__}\n")


def test_help_version_and_usage_errors_load_neither_numba_nor_the_model(tiny):
    # The command tree imports only what its options state (choices, defaults): --help answered in
    # a third of a second, where importing the runtime (Numba, LLVM, the kernels) took 0.5 s more.
    code = ("import sys\nfrom santacpu.__main__ import main\n"
            "try:\n    main()\nexcept SystemExit as end:\n    code = end.code\n"
            "heavy = [m for m in ('numba', 'llvmlite', 'santacpu.model', 'santacpu.network.engine', 'quantize.calibration') if m in sys.modules]\n"
            "print('loaded:', ','.join(heavy), file=sys.stderr)\n")
    for args in (["--help"], ["--version"], ["complete", "--help"], ["quantize", "--help"], ["serve", "--help"],
                 ["complete", "x", "--temperature", "-1"], ["bench", "m", "--parts", "sped"]):
        done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, timeout=120, env=helpers.santacpu_env())
        assert done.stderr.decode().splitlines()[-1] == "loaded: ", (args, done.stderr.decode()[-2000:])
    # A command that runs the model loads them, inside the command (the check above can fail).
    done = subprocess.run([sys.executable, "-c", code, "complete", "x", "--model", str(tiny), "--quant", "none", "--max-new-tokens", "1"],
                          capture_output=True, timeout=300, env=helpers.santacpu_env())
    assert done.stderr.decode().splitlines()[-1].startswith("loaded: numba,llvmlite,santacpu.model,"), done.stderr.decode()[-2000:]


_BAD_CHOICES = [
    (("complete", PROMPT, "--device", "gpu"), "--device"),
    (("complete", PROMPT, "--fim-order", "pms"), "--fim-order"),
    (("complete", PROMPT, "--quant", "q3_k"), "--quant"),
    (("quantize", "src", "out.safetensors", "--type", "q4"), "--type"),
    (("bench", "model", "--parts", "sped"), "--parts"),
    (("bench", "model", "--batch", "1,x"), "--batch"),
    (("eval", "humaneval-infill", "--k", "abc"), "--k"),
    (("eval", "humaneval-infill", "--quant", "q3_k"), "--quant"),
    (("serve", "--fim-order", "pms"), "--fim-order"),
]


@pytest.mark.parametrize("args, option", _BAD_CHOICES, ids=[" ".join(args[:1] + args[-2:]) for args, _ in _BAD_CHOICES])
def test_a_value_outside_an_options_choices_is_a_usage_error(args, option):
    line = one_error_line(run_santacpu(*args), f"Invalid value for '{option}'", code=2)
    assert f"'{args[-1]}' is not " in line and "--help'" in line


def test_a_random_checkpoint_runs_every_command_with_its_defaults(tmp_path, tiny, cache, code_file):
    folder = tmp_path / "tiny"
    done = run_santacpu("random-checkpoint", folder)
    assert done.returncode == 0 and f"--model {folder}" in done.stderr.decode()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):  # the tests' own checkpoint
        assert filecmp.cmp(folder / name, tiny / name, shallow=False), name
    # The tools module some scripts use is the same generator.
    done = subprocess.run([sys.executable, "-m", "tools.random_checkpoint", tmp_path / "micro", "--size", "micro"],
                          cwd=helpers.REPO, capture_output=True, timeout=300)
    assert done.returncode == 0 and santacpu.load(tmp_path / "micro", quant="none").config.n_positions == 16

    done = run_santacpu("complete", PROMPT, "--model", folder, env=cache)
    assert done.returncode == 0 and done.stdout
    done = run_santacpu("perplexity", code_file, "--model", folder)
    assert done.returncode == 0, done.stderr.decode()
    assert "chunks of 64" in done.stdout.decode() and "the model's whole context" in done.stderr.decode()
    done = run_santacpu("bench", folder, "--parts", "speed,lookup", "--repeat", "1", "--threads", "1", env=cache)
    assert done.returncode == 0, done.stderr.decode()
    assert "prefill, 32-token prompt" in done.stdout.decode() and "decode, 16 tokens" in done.stdout.decode()
    assert "measuring a 32-token prompt, 16 decoded tokens, a 48-token FIM prompt" in done.stderr.decode()
    # micro's 8-wide rows are no whole blocks: every type keeps them in float16, and its 16-token
    # context is too short for the bench's warm-up prompt.
    micro = tmp_path / "micro"
    for qtype in ("q4_0", "q4_m"):
        done = run_santacpu("quantize", micro, tmp_path / f"micro-{qtype}.safetensors", "--type", qtype)
        assert done.returncode == 0, done.stderr.decode()
    done = run_santacpu("bench", tmp_path / "micro-q4_m.safetensors", "--parts", "speed", "--repeat", "1", env=cache)
    assert done.returncode == 0, done.stderr.decode()
    one_error_line(run_santacpu("random-checkpoint", folder / "config.json" / "x"), "cannot make the folder")
    one_error_line(run_santacpu("random-checkpoint", tmp_path / "x", "--size", "huge"), "--size", code=2)
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "empty")  # as a link planted in /tmp would be: not followed
    one_error_line(run_santacpu("random-checkpoint", tmp_path / "link"), f"{tmp_path / 'link'} is a symbolic link")
    assert list((tmp_path / "empty").iterdir()) == []


def test_random_checkpoint_cut_short_over_a_checkpoint_leaves_it_as_it_was(tmp_path, monkeypatch):
    # With --force it had replaced the weights, then failed (or was interrupted) before the
    # config: micro weights beside a tiny config.json, which then did not load.
    from santacpu.loading import random_checkpoint as maker

    folder = maker.write_checkpoint(tmp_path / "model")
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    made = maker.canonical_tensors

    def cut_short(*args, **kwargs):
        for i, item in enumerate(made(*args, **kwargs)):
            if i == 5:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(maker, "canonical_tensors", cut_short)
    with pytest.raises(KeyboardInterrupt):
        maker.write_checkpoint(folder, size="micro", force=True)
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before  # no partial file either
    # The config's rename failing after the weights took their name: the earlier weights are put back.
    import errno

    monkeypatch.setattr(maker, "canonical_tensors", made)
    renamed = os.replace

    def refused_at_the_config(source, target):
        if Path(target) == folder / "config.json":
            raise OSError(errno.EPERM, "Operation not permitted")
        renamed(source, target)

    monkeypatch.setattr(maker.os, "replace", refused_at_the_config)
    with pytest.raises(santacpu.SantacpuError, match="cannot finish the checkpoint in .*Operation not permitted .the folder is as it was"):
        maker.write_checkpoint(folder, size="micro", force=True)
    monkeypatch.setattr(maker.os, "replace", renamed)
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before
    # Ctrl-C (SIGINT) while the files take their names is held until all three have them (in a
    # process of its own: signals are held on a main thread, which a test worker's may not be).
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from santacpu.loading import random_checkpoint as maker
        renamed = os.replace
        def interrupted_between(source, target):
            renamed(source, target)
            if Path(target) == Path({str(folder)!r}) / "model.safetensors":  # (published, not staged)
                os.kill(os.getpid(), signal.SIGINT)
        maker.os.replace = interrupted_between
        try:
            maker.write_checkpoint({str(folder)!r}, size="micro", force=True)
        except KeyboardInterrupt:
            print("interrupted")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120, env=helpers.santacpu_env())
    assert done.stdout == b"interrupted\n", done.stderr.decode()
    assert json.loads((folder / "config.json").read_text())["n_embd"] != json.loads(before["config.json"])["n_embd"]
    santacpu.load(folder, quant="none")  # the new checkpoint, whole (weights and config of one run)
    # A killed run's partial file does not make a folder look used: the next run removes it.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    dead = next(pid for pid in range(4_000_000, 4_100_000) if not Path(f"/proc/{pid}").exists())
    from santacpu.atomic_file import host_tag

    (fresh / f".model.safetensors.{host_tag()}-{dead}-abcd1234.partial").write_bytes(b"half")
    (fresh / f".random-checkpoint-{host_tag()}-{dead}-abcd1234").mkdir()  # (a killed run's staging folder)
    with pytest.warns(santacpu.SantacpuWarning, match="removed .*abcd1234.partial"):
        maker.write_checkpoint(fresh)
    assert sorted(p.name for p in fresh.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]


def test_random_checkpoint_refuses_a_folder_that_is_not_empty_without_force(tmp_path, tiny):
    folder = tmp_path / "model"
    shutil.copytree(tiny, folder)  # a model folder of someone's
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    line = one_error_line(run_santacpu("random-checkpoint", folder, "--size", "micro"), "is not empty")
    assert "config.json, model.safetensors, tokenizer.json" in line and "--force" in line
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    one_error_line(run_santacpu("random-checkpoint", tmp_path / "notes", "--size", "micro"), "(it holds todo.txt)")

    (tmp_path / "empty").mkdir()
    assert run_santacpu("random-checkpoint", tmp_path / "empty", "--size", "micro").returncode == 0
    done = run_santacpu("random-checkpoint", folder, "--size", "micro", "--force")
    assert done.returncode == 0, done.stderr.decode()
    assert filecmp.cmp(folder / "model.safetensors", tmp_path / "empty" / "model.safetensors", shallow=False)
    # --force into a folder where one of its files is a folder: refused before anything is written.
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").mkdir()
    one_error_line(run_santacpu("random-checkpoint", tmp_path / "odd", "--size", "micro", "--force"),
                   "config.json is a folder")
    assert [p.name for p in (tmp_path / "odd").iterdir()] == ["config.json"]
    # Or a link (it had written model.safetensors first), and a disk that fills on the way: none of
    # the run's files is left, so no half checkpoint loads with the bundled tokenizer.
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "config.json").symlink_to(tmp_path / "elsewhere.json")
    one_error_line(run_santacpu("random-checkpoint", tmp_path / "linked", "--force"), "config.json: it is a symbolic link")
    assert [p.name for p in (tmp_path / "linked").iterdir()] == ["config.json"]
    full, listing = tmp_path / "full", tmp_path / "listing"
    full.mkdir()
    done = run_santacpu("random-checkpoint", full, prefix=helpers.on_tmpfs(full, 14 * 1024, listing))
    one_error_line(done, "No space left on device")
    assert listing.read_text() == ""
