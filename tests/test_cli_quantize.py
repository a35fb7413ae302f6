"""`santacpu quantize`, `info`, `perplexity`, and the first-use quantization of `complete`,
run as real subprocesses on the tiny checkpoint."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import santacpu
from helpers import line, settled, tiny_checkpoint
from quantize.cache import cached_file_for

PROMPT = "def fibonacci(n):"


def run(*args: str, cache: Path, stdin: bytes = b"") -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", SANTACPU_CACHE=str(cache), PYTHONIOENCODING="utf-8", COLUMNS="120")
    env.pop("SANTACPU_MODEL", None)
    return settled(subprocess.run([sys.executable, "-m", "santacpu", *args], input=stdin, capture_output=True, env=env,
                                  timeout=300))


def one_error_line(done: subprocess.CompletedProcess, fragment: str, code: int = 1) -> None:
    err = done.stderr.decode()
    assert done.returncode == code and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("santacpu: error: ") and fragment in lines[0], err


def test_quantize_then_info_then_complete(tmp_path):
    out = tmp_path / "tiny-q4_m.safetensors"
    cache = tmp_path / "cache"
    done = run("quantize", str(tiny_checkpoint()), str(out), "--type", "q4_m", "--keep", "h.0.*=q8_0", cache=cache)
    assert done.returncode == 0, done.stderr.decode()
    assert "bits/weight" in done.stderr.decode() and out.is_file()

    info = run("info", str(out), cache=tmp_path)
    text = info.stdout.decode()
    assert info.returncode == 0 and "q4_m" in text and "keep h.0.*=q8_0" in text and "q6_0" in text
    assert "most used rows q8_0" in text  # calibration measured the embedding rows, and the budget bought some
    # Provenance: each source file's sha256, and the revision (none for a local folder).
    digest = hashlib.sha256((tiny_checkpoint() / "model.safetensors").read_bytes()).hexdigest()
    assert f"model.safetensors  {digest}" in text and "revision        - (none asked for)" in text

    kept = list(cache.iterdir())  # the calibration, for the next quantization of this checkpoint
    assert [p.name.startswith("calibration-gpt_bigcode-float32-mq-0-") for p in kept] == [True]
    completed = run("complete", PROMPT, "--model", str(out), "--max-new-tokens", "6", cache=cache)
    assert completed.returncode == 0 and completed.stderr == b""
    assert completed.stdout.decode() == line(santacpu.load(out).complete(PROMPT, max_new_tokens=6))
    assert list(cache.iterdir()) == kept  # a quantized file is run as is: nothing cached

    again = run("quantize", str(tiny_checkpoint()), str(out), cache=tmp_path)
    one_error_line(again, "--force")


def test_quantize_refuses_a_checkpoint_it_would_make_an_unusable_file_of(tmp_path):
    # Found by a red team: a tokenizer.json no load can use was copied into the file (exit 0), and
    # weights past float16's range said so in three lines (numpy's overflow warning first).
    import shutil

    from helpers import rewrite_safetensors

    folder = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint(), folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    (folder / "tokenizer.json").write_text(json.dumps({**spec, "model": None}))
    out = tmp_path / "out.safetensors"
    one_error_line(run("quantize", str(folder), str(out), "--type", "q8_0", cache=tmp_path),
                   f"tokenizer {folder / 'tokenizer.json'}: not a usable tokenizer.json")
    assert not out.exists()

    (folder / "tokenizer.json").write_text(json.dumps(spec))

    def huge(tensors):
        tensors["transformer.h.0.attn.c_attn.weight"] *= np.float32(3e38)

    rewrite_safetensors(tiny_checkpoint() / "model.safetensors", folder / "model.safetensors", tensors=huge)
    one_error_line(run("quantize", str(folder), str(out), "--type", "q8_0", cache=tmp_path),
                   "a block scale overflows float16")
    assert not out.exists()


@pytest.mark.parametrize("source", ["folder", "weight file"])
def test_quantize_never_replaces_its_own_source(tmp_path, source):
    # --force replaces OUT; OUT being the checkpoint's own weight file destroyed the source.
    import shutil

    folder = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint(), folder)
    weights = folder / "model.safetensors"
    before = weights.read_bytes()
    src = folder if source == "folder" else weights
    done = run("quantize", str(src), str(weights), "--force", "--calibration", "none", cache=tmp_path)
    one_error_line(done, f"{weights} is a file of the checkpoint being quantized", code=2)  # (as perplexity's --json)
    assert weights.read_bytes() == before


@pytest.mark.parametrize(
    "args, fragment, code",
    [
        (["--type", "q3_k"], "Invalid value for '--type' / '-t': 'q3_k' is not one of q8_0, q4_0, q4_m, q6_0", 2),
        (["--keep", "wte"], "Invalid value for '--keep': --keep takes PATTERN=TYPE", 2),
        (["--keep", "wte=q3"], "--keep wte=q3: unknown type 'q3'", 2),
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

    # Another type is another cached file (q6_0: no calibration, so this stays quick).
    q6 = run("complete", PROMPT, "--model", str(tiny_checkpoint()), "--max-new-tokens", "6", "--quant", "q6_0",
             cache=cache)
    assert q6.returncode == 0 and len(list(cache.iterdir())) == 2

    full = run("complete", PROMPT, "--model", str(tiny_checkpoint()), "--max-new-tokens", "6", "--quant", "none",
               cache=cache)
    assert full.stdout.decode() == line(santacpu.load(tiny_checkpoint(), quant="none").complete(PROMPT, max_new_tokens=6))
    one_error_line(run("complete", PROMPT, "--model", str(tiny_checkpoint()), "--quant", "q5", cache=cache),
                   "Invalid value for '--quant': 'q5' is not one of none, q8_0", code=2)

    # The cache command: what first use wrote (size, type, source), and freeing it.
    listed = run("cache", "list", cache=cache)
    assert listed.returncode == 0, listed.stderr.decode()
    rows = listed.stdout.decode().splitlines()
    assert rows[0].startswith(f"{cache}: 2 files")
    assert sorted(row.split()[1] for row in rows[2:]) == ["q6_0", "q8_0"]
    assert all(str(tiny_checkpoint()) in row for row in rows[2:])
    # Files the cache did not write (a folder of the user's own named as the cache) are not its own.
    foreign = {".bashrc": b"alias x=y\n", "notes.txt": b"mine\n", "my-model.safetensors": (cache / cached).read_bytes()}
    for name, data in foreign.items():
        (cache / name).write_bytes(data)
    assert run("cache", "list", cache=cache).stdout.decode().splitlines()[0].startswith(f"{cache}: 2 files")
    # A partial copy whose writer was killed outright (its process is gone) goes too, with a warning.
    from santacpu.atomic_file import host_tag

    dead = next(pid for pid in range(4_000_000, 4_100_000) if not Path(f"/proc/{pid}").exists())
    (cache / f".{cached}.{host_tag()}-{dead}-abcd1234.partial").write_bytes(b"half a model")
    partial_row = run("cache", "list", cache=cache).stdout.decode().splitlines()[-1]
    assert partial_row.split()[:3] == ["0.0", "?", "?"] and "(a partial file left by an interrupted write)" in partial_row
    everything = run("cache", "clear", cache=cache)
    assert everything.returncode == 0 and everything.stdout.decode().startswith("removed 3 files")  # the partial one counted
    assert "was killed" in everything.stderr.decode()
    assert sorted(p.name for p in cache.iterdir()) == sorted(foreign)
    for name in foreign:
        (cache / name).unlink()
    first = run("complete", PROMPT, "--model", str(tiny_checkpoint()), "--max-new-tokens", "6", cache=cache)
    q6 = run("complete", PROMPT, "--model", str(tiny_checkpoint()), "--max-new-tokens", "6", "--quant", "q6_0",
             cache=cache)
    assert first.returncode == q6.returncode == 0 and len(list(cache.iterdir())) == 2
    one_error_line(run("cache", "clear", "", cache=cache), "the model name is empty", code=2)  # (not every model's files)
    other = run("cache", "clear", str(tiny_checkpoint(seed=1)), cache=cache)  # made from another model: kept
    assert other.returncode == 0 and other.stdout.decode().startswith("removed 0 files") and len(list(cache.iterdir())) == 2
    cleared = run("cache", "clear", str(tiny_checkpoint()), cache=cache)
    assert cleared.returncode == 0 and cleared.stdout.decode().startswith("removed 2 files made from")
    assert list(cache.iterdir()) == []
    assert run("cache", "list", cache=cache).stdout.decode() == f"the quantization cache {cache} is empty\n"


def test_load_runs_what_the_command_line_runs(tmp_path, monkeypatch):
    """One first-use policy: santacpu.load quantizes a full-precision model to q8_0 once, as every
    command does; quant="none" runs it in full precision; a quantized file runs as it is."""
    from santacpu.formats.blocks import QuantizedWeight

    monkeypatch.setenv("SANTACPU_CACHE", str(tmp_path))
    default = santacpu.load(tiny_checkpoint())
    cached = cached_file_for(tiny_checkpoint(), "q8_0")
    assert [p.name for p in tmp_path.iterdir()] == [cached.name]
    assert isinstance(default.weights.layers[0].mlp_c_fc_weight, QuantizedWeight)
    assert default.weights.layers[0].mlp_c_fc_weight.qtype == "q8_0"
    assert default.complete(PROMPT, max_new_tokens=6) == santacpu.load(cached).complete(PROMPT, max_new_tokens=6)
    full = santacpu.load(tiny_checkpoint(), quant="none")
    assert full.weights.layers[0].mlp_c_fc_weight.dtype.name == "float32"
    santacpu.load(tiny_checkpoint(), quant="q4_0")
    from santacpu.formats.quantized_file import read_metadata

    # First use makes the file `santacpu quantize --type q4_0` makes (calibrated, upgrades measured).
    made = read_metadata(cached_file_for(tiny_checkpoint(), "q4_0"))
    done = run("quantize", tiny_checkpoint(), tmp_path / "cli-q4_0.safetensors", "--type", "q4_0", cache=tmp_path)
    assert done.returncode == 0, done.stderr.decode()
    by_cli = read_metadata(tmp_path / "cli-q4_0.safetensors")
    assert made[1]["quantization"] == by_cli[1]["quantization"] and made[1]["quantization"]["type"] == "q4_0"
    assert made[1]["provenance"]["calibration"] == by_cli[1]["provenance"]["calibration"]
    assert "standard library" in made[1]["provenance"]["calibration"]
    assert made[1]["tensors"] == by_cli[1]["tensors"]
    import numpy as np
    from safetensors.numpy import load_file

    ours, theirs = load_file(cached_file_for(tiny_checkpoint(), "q4_0")), load_file(tmp_path / "cli-q4_0.safetensors")
    assert sorted(ours) == sorted(theirs) and all(np.array_equal(ours[k], theirs[k]) for k in ours)
    with pytest.warns(santacpu.SantacpuWarning, match="quantization q4_0 is ignored"):
        santacpu.load(cached, quant="q4_0")
    with pytest.raises(santacpu.SantacpuError, match="unknown quantization 'q5'"):
        santacpu.load(tiny_checkpoint(), quant="q5")


def test_first_use_without_standard_library_sources_quantizes_uncalibrated(tmp_path, monkeypatch):
    import sysconfig

    from santacpu.formats.quantized_file import read_metadata

    monkeypatch.setenv("SANTACPU_CACHE", str(tmp_path / "cache"))
    (tmp_path / "stdlib").mkdir()  # a slim image's: compiled modules only (an empty sitecustomize)
    (tmp_path / "stdlib" / "sitecustomize.py").write_text("")
    paths = sysconfig.get_paths()
    monkeypatch.setattr(sysconfig, "get_paths", lambda *a, **k: {**paths, "stdlib": str(tmp_path / "stdlib")})
    from quantize.cache import _stdlib_calibrates

    _stdlib_calibrates.cache_clear()  # (judged once a process: unwrapped here, judged afresh after)
    monkeypatch.setattr("quantize.cache._stdlib_calibrates", _stdlib_calibrates.__wrapped__)
    with pytest.warns(santacpu.SantacpuWarning, match="no standard library sources to calibrate q4_0 on"):
        model = santacpu.load(tiny_checkpoint(), quant="q4_0")
    assert model.complete(PROMPT, max_new_tokens=2) is not None
    [made] = (tmp_path / "cache").iterdir()
    assert read_metadata(made)[1]["provenance"]["calibration"] is None  # (info shows "none")


def test_a_cache_entry_that_is_a_dangling_link_is_listed_cleared_and_made_again(tmp_path, monkeypatch):
    monkeypatch.setenv("SANTACPU_CACHE", str(tmp_path / "cache"))
    first = santacpu.load(tiny_checkpoint()).complete(PROMPT, max_new_tokens=4)
    cached = cached_file_for(tiny_checkpoint(), "q8_0")
    cached.rename(tmp_path / "moved.safetensors")
    cached.symlink_to(tmp_path / "gone.safetensors")
    listed = run("cache", "list", cache=tmp_path / "cache").stdout.decode()
    assert "(a symbolic link that leads nowhere)" in listed
    assert santacpu.load(tiny_checkpoint()).complete(PROMPT, max_new_tokens=4) == first  # made again
    assert cached.is_file() and not cached.is_symlink()
    cached.unlink()
    cached.symlink_to(tmp_path / "gone.safetensors")
    cleared = run("cache", "clear", cache=tmp_path / "cache")
    assert cleared.stdout.decode().startswith("removed 1 file") and not os.path.lexists(cached)


def test_cache_clear_finds_a_models_files_from_any_folder_and_after_the_model_is_gone(tmp_path, monkeypatch):
    # First use recorded the source as typed ("tiny"): `cache clear` resolved it against its own
    # folder, missing the files from elsewhere and removing another "tiny"'s; a deleted source's
    # files could not be cleared by name at all.
    import shutil

    from helpers import copy_checkpoint
    from quantize.cache import cache_entries, clear_cache

    monkeypatch.setenv("SANTACPU_CACHE", str(tmp_path / "cache"))
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    copy_checkpoint(first / "tiny")
    copy_checkpoint(second / "tiny", seed=1)
    monkeypatch.chdir(first)
    santacpu.load("tiny")
    [entry] = cache_entries()
    assert entry.source == str(first / "tiny")
    monkeypatch.chdir(second)
    assert clear_cache("tiny") == [] and len(cache_entries()) == 1  # another folder's "tiny"
    assert [e.path for e in clear_cache(str(first / "tiny"))] == [entry.path] and cache_entries() == []
    monkeypatch.chdir(first)
    santacpu.load("tiny")
    shutil.rmtree(first / "tiny")
    assert [e.path for e in clear_cache(str(first / "tiny"))] == [entry.path] and cache_entries() == []
    with pytest.raises(santacpu.SantacpuError, match="is neither a local folder nor in the hub cache"):
        clear_cache(str(first / "tiny"))  # (and nothing of it left: said as before)


def test_a_quantized_file_written_into_its_source_folder_is_not_taken_for_a_source_file(tmp_path, monkeypatch):
    # It changed the cache's keys (the first-use file and the kept calibration made again) and
    # was hashed into later files' provenance as part of the checkpoint.
    from helpers import copy_checkpoint
    from quantize.converter import sha256_of_sources

    monkeypatch.setenv("SANTACPU_CACHE", str(tmp_path / "cache"))
    folder = copy_checkpoint(tmp_path / "tiny")
    key, digests = cached_file_for(folder, "q8_0"), sha256_of_sources(folder)
    done = run("quantize", folder, folder / "q6.safetensors", "--type", "q6_0", cache=tmp_path / "cache")
    assert done.returncode == 0, done.stderr.decode()
    assert cached_file_for(folder, "q8_0") == key and sha256_of_sources(folder) == digests
    (folder / "notes.safetensors").write_bytes(b"not a quantized file")  # (still counted: it may be weights)
    assert cached_file_for(folder, "q8_0") != key


def test_first_use_waits_for_another_process_quantizing_the_same_model(tmp_path, monkeypatch, capfd):
    # Three first uses at once each quantized the whole model (minutes and ~2 GB each for SantaCoder).
    import shutil

    monkeypatch.setenv("SANTACPU_CACHE", str(tmp_path / "made"))
    santacpu.load(tiny_checkpoint())
    made = cached_file_for(tiny_checkpoint(), "q8_0")
    monkeypatch.setenv("SANTACPU_CACHE", str(tmp_path / "cache"))
    target = cached_file_for(tiny_checkpoint(), "q8_0")
    target.parent.mkdir()
    staged = target.parent / "staged"
    shutil.copy(made, staged)
    writer = subprocess.Popen(  # (another first use: it holds the lock, then publishes its file)
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(1.0); os.rename(sys.argv[2], sys.argv[3])",
         str(target.parent / f".{target.name}.lock"), str(staged), str(target)], stdout=subprocess.PIPE)
    assert writer.stdout.readline() == b"held\n"
    capfd.readouterr()
    model = santacpu.load(tiny_checkpoint())
    writer.wait(timeout=30)
    err = capfd.readouterr().err
    assert "another santacpu process is quantizing" in err and "first use" not in err, err
    assert model.complete(PROMPT, max_new_tokens=4) == santacpu.load(made).complete(PROMPT, max_new_tokens=4)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [target.name]  # (no lock file left)


def test_a_cached_file_removed_between_its_check_and_its_load_is_made_again(tmp_path, monkeypatch):
    import quantize.cache as cache

    monkeypatch.setenv("SANTACPU_CACHE", str(tmp_path / "cache"))
    first = santacpu.load(tiny_checkpoint()).complete(PROMPT, max_new_tokens=4)
    checked = cache._damage

    def checked_then_cleared(path):  # (`santacpu cache clear` from another process, just then)
        found = checked(path)
        path.unlink()
        monkeypatch.setattr(cache, "_damage", checked)
        return found

    monkeypatch.setattr(cache, "_damage", checked_then_cleared)
    assert santacpu.load(tiny_checkpoint()).complete(PROMPT, max_new_tokens=4) == first
    assert cached_file_for(tiny_checkpoint(), "q8_0").is_file()


def test_a_cache_folder_that_is_a_dangling_link_is_said_so(tmp_path):
    (tmp_path / "cache").symlink_to(tmp_path / "cache")  # a loop
    for command in (("cache", "list"), ("complete", PROMPT, "--model", str(tiny_checkpoint()))):
        one_error_line(run(*command, cache=tmp_path / "cache"), "symbolic link that leads nowhere")


def test_a_damaged_cached_file_is_named_and_made_again(tmp_path, monkeypatch):
    """A cached file whose values turned NaN (it reads whole, so only a scan finds it) is named
    in the warning and made again, and the model runs."""
    import numpy as np

    from helpers import rewrite_safetensors

    monkeypatch.setenv("SANTACPU_CACHE", str(tmp_path / "cache"))
    first = santacpu.load(tiny_checkpoint()).complete(PROMPT, max_new_tokens=6)
    cached = cached_file_for(tiny_checkpoint(), "q8_0")

    def poison(tensors):
        scales = tensors["h.1.mlp_c_fc_weight.d"].copy()
        scales.view(np.uint16)[0, 0] = 0x7E00  # fp16 NaN
        tensors["h.1.mlp_c_fc_weight.d"] = scales

    damaged = rewrite_safetensors(cached, tmp_path / "damaged.safetensors", tensors=poison)
    damaged.replace(cached)
    with pytest.warns(santacpu.SantacpuWarning) as caught:
        again = santacpu.load(tiny_checkpoint())
    message = " ".join(str(w.message) for w in caught)
    assert f"the cached quantization {cached} of {tiny_checkpoint()} is damaged" in message
    assert "h.1.mlp_c_fc_weight" in message and "making it again" in message
    assert again.complete(PROMPT, max_new_tokens=6) == first


def test_the_report_says_per_type_what_was_written_and_the_whole_time(tmp_path, capsys):
    from quantize.converter import convert
    from quantize.pipeline import report_lines, run_quantize

    # q6_0: no calibration and no upgrades by default (the budget is for the 4-bit types).
    run_quantize(str(tiny_checkpoint()), tmp_path / "q6.safetensors", qtype="q6_0", calibration=None,
                 calibration_tokens=4096, keep=[], upgrade_budget=None, revision=None, force=False)
    err = capsys.readouterr().err
    assert "calibrating" not in err
    assert "santacpu: q6_0 (the type asked for): 9 tensors" in err  # the embedding and all 8 linear weights
    assert "q8_0" not in err

    # A budget larger than the linear weights raises them all: the report says q4_m got nothing.
    report = convert(tiny_checkpoint(), tmp_path / "q4m.safetensors", qtype="q4_m", upgrade_budget=1.0)
    lines = report_lines(report, seconds=12.0, calibration_s=11.5)
    assert lines[0].endswith(f"in 12.0 s (calibration 11.5 s, conversion {report.seconds:.1f} s)")
    assert lines[1].startswith("q4_m: no tensor (asked for, but the upgrade budget raised every linear weight")
    assert sum(int(line.split(": ")[1].split()[0]) for line in lines[2:] if not line.startswith("largest")) == \
        len(report.tensors)
    # Where --keep rules took every matrix, the report says so (it blamed the budget, even at 0).
    kept = convert(tiny_checkpoint(), tmp_path / "kept.safetensors", qtype="q4_m", upgrade_budget=0.0,
                   keep=[("h.*", "f32"), ("wte", "q8_0")])
    assert report_lines(kept)[1] == "q4_m: no tensor (asked for, but the --keep rules (and any upgrades) chose other types for every matrix)"


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
                   "--ctx 65 is past the model's context of 64 tokens: give --ctx 64 or less", code=2)
    # A reference with a shorter context than the model's: named, before any scoring.
    trained = Path(__file__).parent / "fixtures" / "trained_tiny"  # 256 positions against the tiny one's 64
    done = run("perplexity", str(text), "--model", str(trained), "--quant", "none", "--reference", str(tiny_checkpoint()),
               "--ctx", "128", cache=tmp_path)  # (its stderr also warns of the fixture's missing tokenizer.json)
    assert done.returncode == 2 and done.stderr.decode().splitlines()[-1] == (
        "santacpu: error: --ctx 128 is past the reference's context of 64 tokens: give --ctx 64 or less")
    assert scores["model"] == str(quantized) and scores["reference"] == str(tiny_checkpoint())  # what was scored
    assert scores["files"] == [str(text)]


def test_perplexity_and_info_refuse_empty_names_and_keep_their_json_when_stdout_fails(tmp_path):
    # "" became Path('.') ("file . is a folder"); --reference "" scored everything, then was a
    # TypeError traceback; a stdout that failed lost the --json file (written after the table).
    text = tmp_path / "code.py"
    text.write_text("import os\n\ndef main():\n    print(os.getcwd())\n" * 12)
    model = str(tiny_checkpoint())
    for args in (("perplexity", str(text), "-m", model, "--reference", ""), ("perplexity", "", "-m", model),
                 ("info", "")):
        one_error_line(run(*args, cache=tmp_path / "cache"), "empty", code=2)
    report = tmp_path / "scores.json"
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "santacpu", "perplexity", str(text), "-m", model, "--ctx", "32",
                               "--json", str(report)], stdout=full, stderr=subprocess.PIPE, timeout=300,
                              env=dict(os.environ, SANTACPU_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1"))
    assert done.returncode == 1 and json.loads(report.read_text())["chunks"] >= 2
    assert report.read_text().startswith("{") and json.loads(report.read_text())["model"] == f"{model} (q8_0)"
    # Nor may --json replace the cached quantization the command itself runs.
    cached = cached_file_for(tiny_checkpoint(), "q8_0")
    cached_copy = (tmp_path / "cache" / cached.name)
    one_error_line(run("perplexity", str(text), "-m", model, "--json", str(cached_copy), "--force", cache=tmp_path / "cache"),
                   "is a file this command reads", code=2)
    assert cached_copy.is_file()


def test_a_perplexity_past_a_floats_range_is_infinite_and_null_in_json():
    import math

    from santacpu.evaluate import Scores, _perplexity

    assert _perplexity(800.0) == math.inf and _perplexity(1.0) == pytest.approx(math.e)
    scores = Scores(10, 1, 32, math.inf, math.inf, math.nan, 0.5, 0.9, 0.1)
    figures = json.loads(scores.to_json(model="m"))
    assert figures["perplexity"] is None and figures["delta_perplexity"] is None and figures["model"] == "m"
    assert "perplexity            inf" in scores.table("m", "r")


def test_cache_clear_of_a_hub_id_finds_its_files_after_its_hub_cache_is_gone(tmp_path, monkeypatch):
    import shutil

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--rt--fake"
    shutil.copytree(tiny_checkpoint(), repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    done = run("complete", PROMPT, "--model", "rt/fake", "--max-new-tokens", "2", cache=tmp_path / "cache")
    assert done.returncode == 0 and "first use of rt/fake" in done.stderr.decode(), done.stderr.decode()
    shutil.rmtree(tmp_path / "hf")
    cleared = run("cache", "clear", "rt/fake", cache=tmp_path / "cache")
    assert cleared.returncode == 0 and cleared.stdout.decode().startswith("removed 1 file"), cleared.stderr.decode()
    assert list((tmp_path / "cache").iterdir()) == []


def test_cache_clear_goes_on_past_a_file_it_may_not_remove(tmp_path, monkeypatch):
    # In a shared sticky cache folder another user's file stopped the clear at the first one.
    from quantize.cache import clear_cache

    monkeypatch.setenv("SANTACPU_CACHE", str(tmp_path / "cache"))
    santacpu.load(tiny_checkpoint())
    santacpu.load(tiny_checkpoint(), quant="q6_0")
    theirs = cached_file_for(tiny_checkpoint(), "q8_0")
    unlink = Path.unlink

    def refused(self, *args, **kwargs):
        if self == theirs:
            raise PermissionError(1, "Operation not permitted")
        return unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", refused)
    with pytest.warns(santacpu.SantacpuWarning, match=f"cannot remove {theirs}: Operation not permitted"):
        removed = clear_cache()
    assert [e.path for e in removed] == [cached_file_for(tiny_checkpoint(), "q6_0")] and theirs.exists()
