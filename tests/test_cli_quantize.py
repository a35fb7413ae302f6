"""`santacpu quantize`, `info`, `perplexity`, and the first-use quantization of `complete`,
run as real subprocesses on the tiny checkpoint."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import santacpu
from helpers import tiny_checkpoint
from quantize.cache import cached_file_for

PROMPT = "def fibonacci(n):"


def run(*args: str, cache: Path, stdin: bytes = b"") -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", SANTACPU_CACHE=str(cache), PYTHONIOENCODING="utf-8", COLUMNS="120")
    env.pop("SANTACPU_MODEL", None)
    return subprocess.run([sys.executable, "-m", "santacpu", *args], input=stdin, capture_output=True, env=env,
                          timeout=300)


def one_error_line(done: subprocess.CompletedProcess, fragment: str, code: int = 1) -> None:
    err = done.stderr.decode()
    assert done.returncode == code and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("santacpu: error: ") and fragment in lines[0], err


def test_quantize_then_info_then_complete(tmp_path):
    out = tmp_path / "tiny-q4_m.safetensors"
    done = run("quantize", str(tiny_checkpoint()), str(out), "--type", "q4_m", "--keep", "h.0.*=q8_0", cache=tmp_path)
    assert done.returncode == 0, done.stderr.decode()
    assert "bits/weight" in done.stderr.decode() and out.is_file()

    info = run("info", str(out), cache=tmp_path)
    text = info.stdout.decode()
    assert info.returncode == 0 and "q4_m" in text and "keep h.0.*=q8_0" in text and "q6_0" in text
    assert "most used rows q8_0" in text  # calibration measured the embedding rows, and the budget bought some
    # Provenance: each source file's sha256, and the revision (none for a local folder).
    digest = hashlib.sha256((tiny_checkpoint() / "model.safetensors").read_bytes()).hexdigest()
    assert f"model.safetensors  {digest}" in text and "revision        - (none asked for)" in text

    completed = run("complete", PROMPT, "--model", str(out), "--max-new-tokens", "6", cache=tmp_path)
    assert completed.returncode == 0 and completed.stderr == b""
    assert completed.stdout.decode() == santacpu.load(out).complete(PROMPT, max_new_tokens=6)
    assert list(tmp_path.iterdir()) == [out]  # a quantized file is run as is: nothing cached

    again = run("quantize", str(tiny_checkpoint()), str(out), cache=tmp_path)
    one_error_line(again, "--force")


@pytest.mark.parametrize(
    "args, fragment, code",
    [
        (["--type", "q3_k"], "Invalid value for '--type' / '-t': 'q3_k' is not one of q8_0, q4_0, q4_m, q6_0", 2),
        (["--keep", "wte"], "--keep takes PATTERN=TYPE", 1),
        (["--calibration", "/no/such/folder"], "calibration folder /no/such/folder does not exist", 1),
    ],
)
def test_quantize_errors(tmp_path, args, fragment, code):
    out = tmp_path / "x.safetensors"
    one_error_line(run("quantize", str(tiny_checkpoint()), str(out), *args, cache=tmp_path), fragment, code)
    assert not out.exists()


def test_quantize_with_calibration_folder(tmp_path):
    calib = tmp_path / "calib"
    calib.mkdir()
    (calib / "a.py").write_text("def f(x):\n    return [i * x for i in range(10)]\n" * 30)
    (calib / "blob.bin").write_bytes(bytes(range(256)))  # not text: skipped
    out = tmp_path / "w.safetensors"
    done = run("quantize", str(tiny_checkpoint()), str(out), "--type", "q4_0", "--calibration", str(calib),
               "--calibration-tokens", "256", cache=tmp_path)
    assert done.returncode == 0, done.stderr.decode()
    assert "importance-weighted" in run("info", str(out), cache=tmp_path).stdout.decode()


def test_info_on_a_foreign_file_is_one_line(tmp_path):
    one_error_line(run("info", str(tiny_checkpoint() / "model.safetensors"), cache=tmp_path), "not a santacpu quantized")


def test_first_use_quantizes_once_into_the_cache(tmp_path):
    cache = tmp_path / "cache"
    first = run("complete", PROMPT, "--model", str(tiny_checkpoint()), "--max-new-tokens", "6", cache=cache)
    assert first.returncode == 0, first.stderr.decode()
    assert "first use" in first.stderr.decode() and "q8_0" in first.stderr.decode()
    cached = cached_file_for(tiny_checkpoint(), "q8_0").name
    assert [p.name for p in cache.iterdir()] == [cached]
    stamp = (cache / cached).stat().st_mtime_ns
    second = run("complete", PROMPT, "--model", str(tiny_checkpoint()), "--max-new-tokens", "6", cache=cache)
    assert second.returncode == 0 and second.stderr == b"" and second.stdout == first.stdout
    assert (cache / cached).stat().st_mtime_ns == stamp  # reused, not rebuilt

    q4 = run("complete", PROMPT, "--model", str(tiny_checkpoint()), "--max-new-tokens", "6", "--quant", "q4_m",
             cache=cache)
    assert q4.returncode == 0 and len(list(cache.iterdir())) == 2

    full = run("complete", PROMPT, "--model", str(tiny_checkpoint()), "--max-new-tokens", "6", "--quant", "none",
               cache=cache)
    assert full.stdout.decode() == santacpu.load(tiny_checkpoint()).complete(PROMPT, max_new_tokens=6)
    one_error_line(run("complete", PROMPT, "--model", str(tiny_checkpoint()), "--quant", "q5", cache=cache),
                   "Invalid value for '--quant': 'q5' is not one of none, q8_0", code=2)


def test_perplexity_against_a_reference(tmp_path):
    quantized = tmp_path / "q8.safetensors"
    assert run("quantize", str(tiny_checkpoint()), str(quantized), cache=tmp_path).returncode == 0
    text = tmp_path / "code.py"
    text.write_text("import os\n\ndef main():\n    for name in os.listdir('.'):\n        print(name)\n" * 6)
    report = tmp_path / "scores.json"
    done = run("perplexity", str(text), "--model", str(quantized), "--reference", str(tiny_checkpoint()),
               "--ctx", "32", "--json", str(report), cache=tmp_path)
    assert done.returncode == 0, done.stderr.decode()
    scores = json.loads(report.read_text())
    assert scores["chunks"] >= 2 and scores["tokens_scored"] == scores["chunks"] * 15
    assert 0 <= scores["mean_kld"] < 0.05 and 0.8 <= scores["top1_agreement"] <= 1.0
    assert "mean KLD" in done.stdout.decode() and "top-1 agreement" in done.stdout.decode()
    too_short = run("perplexity", str(text), "--model", str(quantized), "--ctx", "4", cache=tmp_path)
    assert too_short.returncode == 2 and "--ctx" in too_short.stderr.decode()  # the parser's range: a usage error
    one_error_line(run("perplexity", str(text), "--model", str(quantized), "--ctx", "65", cache=tmp_path),
                   "--ctx must be between 8 and the model's context 64")
