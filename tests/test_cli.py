"""The `santacpu` command line, run as a real subprocess (`python -m santacpu`) on a tiny checkpoint:
output equals the Python API's, prompts from arguments, stdin and FIM files, stop strings, seeds,
and every user error as one `santacpu: error:` line on stderr with nothing on stdout.

Every run is offline with an empty hub cache, so nothing can reach the network.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import helpers
from helpers import line
import santacpu

PROMPT = "def fibonacci(n):"
FIM_PREFIX = "def add(a, b):\n    return "
FIM_SUFFIX = "\n\nprint(add(1, 2))\n"
N = "8"  # --max-new-tokens for every run: a tiny model, a few tokens


@pytest.fixture(scope="module")
def ckpt() -> Path:
    return helpers.tiny_checkpoint()


@pytest.fixture(scope="module", autouse=True)
def quant_cache(tmp_path_factory, ckpt) -> Path:
    """A private quantization cache for this module, filled before any CLI run: `complete` on a
    full-precision folder runs its cached q8_0 quantization (tested on its own below)."""
    from quantize.cache import CACHE_ENV, quantized_for

    folder = tmp_path_factory.mktemp("santacpu-cache")
    saved = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(folder)
    quantized_for(str(ckpt), None, "q8_0")
    yield folder
    if saved is None:
        del os.environ[CACHE_ENV]
    else:
        os.environ[CACHE_ENV] = saved


@pytest.fixture(scope="module")
def model(ckpt, quant_cache) -> santacpu.Model:
    """What `santacpu complete --model CKPT` runs, by the same policy: the cached q8_0 file."""
    return santacpu.load(ckpt)


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("hf-home")
    (home / "hub").mkdir()
    return home


def run(hf_home: Path, *args: str, stdin: bytes = b"", debug: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    for name in ("SANTACPU_MODEL", "HUGGINGFACE_HUB_CACHE", "HF_ENDPOINT", "PYTHONWARNINGS"):
        env.pop(name, None)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_HOME=str(hf_home),
        HF_HUB_CACHE=str(hf_home / "hub"),
        PYTHONIOENCODING="utf-8",
        NO_COLOR="1",
        COLUMNS="120",
    )
    command = [sys.executable, "-m", "santacpu", *(["--debug"] if debug else []), *args]
    return helpers.settled(subprocess.run(command, input=stdin, capture_output=True, env=env, timeout=120))


def ok(done: subprocess.CompletedProcess) -> str:
    """stdout of a successful run; stderr must be empty."""
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert done.stderr == b"", done.stderr.decode(errors="replace")
    return done.stdout.decode("utf-8")


def assert_error(done: subprocess.CompletedProcess, fragment: str) -> str:
    """One `santacpu: error:` line on stderr, nothing on stdout, a non-zero exit, no traceback."""
    err = done.stderr.decode("utf-8")
    assert done.returncode == 1, (done.returncode, err)
    assert done.stdout == b""
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("santacpu: error: "), err
    assert fragment in lines[0], err
    return lines[0]


def assert_usage_error(done: subprocess.CompletedProcess, fragment: str) -> None:
    """A usage error from the option parser: exit 2, one `santacpu: error:` line that says where
    the usage is, no traceback."""
    line = helpers.one_error_line(done, fragment, code=2)
    assert "--help'" in line


# ---------------------------------------------------------------------------------------------
# Output


def test_complete_matches_the_api(hf_home, ckpt, model):
    expected = model.complete(PROMPT, max_new_tokens=8)
    assert expected  # a non-empty completion, so the comparison means something
    assert ok(run(hf_home, "complete", PROMPT, "--model", str(ckpt), "--max-new-tokens", N)) == line(expected)
    # -m, a weight file instead of its folder, and option order do not matter.
    done = run(hf_home, "complete", "-m", str(ckpt / "model.safetensors"), "--max-new-tokens", N, PROMPT)
    assert ok(done) == line(expected)


@pytest.mark.parametrize("how", ["dash", "absent"])
def test_prompt_from_stdin(hf_home, ckpt, model, how):
    expected = model.complete(PROMPT, max_new_tokens=8)
    args = ["complete", *(["-"] if how == "dash" else []), "--model", str(ckpt), "--max-new-tokens", N]
    assert ok(run(hf_home, *args, stdin=PROMPT.encode())) == line(expected)


def test_fim_prints_only_the_middle(hf_home, ckpt, model, tmp_path):
    (tmp_path / "prefix.py").write_text(FIM_PREFIX)
    (tmp_path / "suffix.py").write_text(FIM_SUFFIX)
    expected = model.complete(FIM_PREFIX, FIM_SUFFIX, max_new_tokens=8)
    assert expected and expected != model.complete(FIM_PREFIX, max_new_tokens=8)
    args = ["complete", "--fim", str(tmp_path / "prefix.py"), str(tmp_path / "suffix.py"), "--model", str(ckpt)]
    out = ok(run(hf_home, *args, "--max-new-tokens", N))
    assert out == expected
    assert FIM_PREFIX not in out and FIM_SUFFIX not in out
    # The other order is a different prompt, so (for this model and text) a different middle.
    spm = model.complete(FIM_PREFIX, FIM_SUFFIX, max_new_tokens=8, fim_order="spm")
    assert ok(run(hf_home, *args, "--max-new-tokens", N, "--fim-order", "spm")) == spm


def test_stop_string_cuts_the_output(hf_home, ckpt, model):
    full = model.complete(PROMPT, max_new_tokens=8)
    # A stop string that really occurs, after some text: the output must end just before it.
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = full.find(stop)
    assert len(stop) == 3 and 0 < cut < len(full) - len(stop)
    expected = full[:cut]
    assert model.complete(PROMPT, max_new_tokens=8, stop=[stop]) == expected
    base = ["complete", PROMPT, "--model", str(ckpt), "--max-new-tokens", N]
    out = ok(run(hf_home, *base, "--stop", stop))
    assert out == line(expected) and stop not in out
    # Repeatable: the earliest of several stop strings wins; one that never occurs changes nothing.
    assert ok(run(hf_home, *base, "--stop", "never-in-output", "--stop", stop)) == line(expected)
    assert ok(run(hf_home, *base, "--stop", "never-in-output")) == line(full)


def test_seeded_sampling_is_reproducible(hf_home, ckpt, model):
    base = ["complete", PROMPT, "--model", str(ckpt), "--max-new-tokens", N, "--temperature", "0.8"]
    first = ok(run(hf_home, *base, "--seed", "1"))
    assert first == ok(run(hf_home, *base, "--seed", "1"))
    assert first == line(model.complete(PROMPT, max_new_tokens=8, temperature=0.8, seed=1))
    other = ok(run(hf_home, *base, "--seed", "2"))
    assert other == line(model.complete(PROMPT, max_new_tokens=8, temperature=0.8, seed=2))
    assert other != first
    assert first != line(model.complete(PROMPT, max_new_tokens=8))  # sampling really happened


def test_starcoder_markers_warn_and_still_complete(hf_home, ckpt, model):
    prompt = "<fim_prefix>def add(a, b):"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = model.complete(prompt, max_new_tokens=8)
    done = run(hf_home, "complete", prompt, "--model", str(ckpt), "--max-new-tokens", N)
    assert done.returncode == 0
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("santacpu: warning: "), lines
    assert "<fim-prefix>" in lines[0]
    assert done.stdout.decode() == line(expected) and expected


def test_a_length_past_the_context_is_said_once(hf_home, ckpt, model):
    """The default 128 new tokens do not fit the tiny model's 64-token context: one warning line says
    how many will, and the text still ends with a newline."""
    done = run(hf_home, "complete", PROMPT, "--model", str(ckpt))
    assert done.returncode == 0, done.stderr.decode()
    room = 64 - len(model.tokenizer.encode(PROMPT))
    assert done.stderr.decode() == (f"santacpu: warning: at most {room} new tokens, not 128: the model's context "
                                    "holds 64 tokens, prompt included\n")
    assert done.stdout.decode() == line(model.complete(PROMPT))


def test_console_script():
    script = Path(sys.executable).with_name("santacpu")
    if not script.exists():
        pytest.skip("no santacpu console script beside this interpreter")
    done = subprocess.run([str(script), "--help"], capture_output=True, timeout=60)
    assert done.returncode == 0 and b"complete" in done.stdout


# ---------------------------------------------------------------------------------------------
# Errors


def test_empty_prompt(hf_home, ckpt):
    assert_error(run(hf_home, "complete", "", "--model", str(ckpt)), "the prompt is empty")
    assert_error(run(hf_home, "complete", "--model", str(ckpt), stdin=b""), "the prompt is empty")
    assert_error(run(hf_home, "complete", "-", "--model", str(ckpt), stdin=b""), "the prompt is empty")


def test_bad_fim_files(hf_home, ckpt, tmp_path):
    good = tmp_path / "good.py"
    good.write_text("x = 1\n")
    binary = tmp_path / "binary.py"
    binary.write_bytes(b"x = 1\n\x00\x01\x02")
    latin1 = tmp_path / "latin1.py"
    latin1.write_bytes("s = 'café'\n".encode("latin-1"))
    folder = tmp_path / "folder"
    folder.mkdir()

    def fim(prefix: Path, suffix: Path):
        return run(hf_home, "complete", "--fim", str(prefix), str(suffix), "--model", str(ckpt), "--max-new-tokens", N)

    assert "binary.py" in assert_error(fim(binary, good), "binary file")
    line = assert_error(fim(good, latin1), "not UTF-8")
    assert "latin1.py" in line and "0xe9" in line
    assert "missing.py" in assert_error(fim(good, tmp_path / "missing.py"), "no such file")
    assert_error(fim(folder, good), "is a folder")
    helpers.one_error_line(run(hf_home, "complete", "x", "--fim", str(good), str(good), "--model", str(ckpt)), "not both", code=2)
    assert_error(run(hf_home, "complete", "--model", str(ckpt), stdin=b"\xff\xfe"), "standard input is not UTF-8")


def test_arguments_that_are_not_utf8(hf_home, ckpt):
    # Python carries such bytes in sys.argv as lone surrogates; os.fsdecode makes the same here.
    prompt = run(hf_home, "complete", os.fsdecode(b"s = '\xe9'"), "--model", str(ckpt))
    assert_error(prompt, "the prompt is not UTF-8 text (byte 0xe9 at character 5)")
    stop = run(hf_home, "complete", "x", "--stop", os.fsdecode(b"\xff"), "--model", str(ckpt))
    assert_error(stop, "each stop string is not UTF-8 text (byte 0xff at character 0)")


def test_a_model_variable_that_names_nothing_names_the_variable(hf_home, tmp_path):
    missing = tmp_path / "nope"
    done = helpers.run_santacpu("complete", PROMPT, env={"SANTACPU_MODEL": str(missing), "HF_HOME": str(hf_home)})
    line = helpers.one_error_line(done, f"SANTACPU_MODEL={missing}: no such file or folder")
    assert "--model" in line


def test_prompt_longer_than_the_context(hf_home, ckpt):
    assert_error(run(hf_home, "complete", "x = 1\n" * 40, "--model", str(ckpt)), "context holds 64")


def test_hub_id_offline_without_cache(hf_home):
    line = assert_error(run(hf_home, "complete", PROMPT, "--model", "bigcode/santacoder"), "'bigcode/santacoder'")
    assert "give that folder in its place (e.g. /path/to/santacoder)" in line
    assert "santacpu random-checkpoint /tmp/tiny" in line  # the offline path
    # The default model is the hub's too, and fails the same way.
    assert "give that folder in its place" in assert_error(run(hf_home, "complete", PROMPT), "'bigcode/santacoder'")
    assert list((hf_home / "hub").iterdir()) == []


def test_bad_model_paths(hf_home, tmp_path):
    assert_error(run(hf_home, "complete", PROMPT, "--model", str(tmp_path / "nope")), "no such file or folder")
    broken = helpers.copy_checkpoint(tmp_path / "broken")
    raw = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    assert_error(run(hf_home, "complete", PROMPT, "--model", str(broken)), "truncated")
    (broken / "model.safetensors").unlink()
    assert_error(run(hf_home, "complete", PROMPT, "--model", str(broken)), "no weights")
    (broken / "config.json").write_text("{")
    assert_error(run(hf_home, "complete", PROMPT, "--model", str(broken)), "not valid JSON")


def test_bad_fim_order_with_fim(hf_home, ckpt, tmp_path):
    (tmp_path / "p.py").write_text(FIM_PREFIX)
    (tmp_path / "s.py").write_text(FIM_SUFFIX)
    done = run(hf_home, "complete", "--fim", str(tmp_path / "p.py"), str(tmp_path / "s.py"), "--model", str(ckpt),
               "--fim-order", "pms")
    assert_usage_error(done, "Invalid value for '--fim-order': 'pms' is not one of psm, spm")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (("--temperature", "-1"), "--temperature"),
        (("--temperature", "inf"), "--temperature': inf is not a finite number >= 0"),
        (("--temperature", "nan"), "--temperature': nan is not a finite number >= 0"),
        (("--max-new-tokens", "-3"), "--max-new-tokens"),
        (("--max-new-tokens", "many"), "--max-new-tokens"),
        (("--no-such-option",), "No such option"),
        (("--top-p", "0"), "--top-p': 0.0 is not in the range 0 < P <= 1"),
        (("--top-p", "1.5"), "--top-p"),
        (("--seed", "-5"), "--seed"),
        (("--fim-order", "xyz"), "Invalid value for '--fim-order': 'xyz' is not one of psm, spm"),
        (("--device", "tpu"), "Invalid value for '--device': 'tpu' is not one of auto, cpu, cuda"),
    ],
)
def test_usage_errors(hf_home, ckpt, args, fragment):
    assert_usage_error(run(hf_home, "complete", PROMPT, "--model", str(ckpt), *args), fragment)


def test_unknown_command(hf_home):
    assert_usage_error(run(hf_home, "compleet", PROMPT), "No such command")


def test_debug_shows_the_traceback(hf_home, ckpt):
    done = run(hf_home, "complete", "", "--model", str(ckpt), debug=True)
    err = done.stderr.decode()
    assert done.returncode != 0 and done.stdout == b""
    assert "Traceback" in err and "SantacpuError" in err and "the prompt is empty" in err
