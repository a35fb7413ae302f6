"""Numba's on-disk kernel cache notices the sources a kernel is built from (santacpu/kernel_cache.py):
every module with cached kernels installs the locators first, the digest follows the files of a
kernel's folder tree and santacpu/formats, and a cached kernel is compiled again after a change
beside it (in a copy of the package, in a child process), and a compile says so on stderr."""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from numba.core.registry import CPUDispatcher

import santacpu
from santacpu import kernel_cache

PACKAGE = Path(santacpu.__file__).parent
CACHED = re.compile(r"^@(njit|cuda\.jit)\(.*cache=True", re.M)
KERNEL_MODULES = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts and CACHED.search(p.read_text()))


def test_the_locators_are_installed_before_every_cached_kernel():
    assert len(KERNEL_MODULES) >= 10 and kernel_cache.track_kernel_sources()
    for path in KERNEL_MODULES:
        text = path.read_text()
        call = text.find("\ntrack_kernel_sources()")
        assert 0 < call < CACHED.search(text).start(), f"{path} has a cache=True kernel before track_kernel_sources()"
        if "backends/cuda" in path.as_posix():
            continue  # the simulator's dispatchers keep no cache
        module = importlib.import_module(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
        dispatchers = [v for v in vars(module).values() if isinstance(v, CPUDispatcher) and v._cache is not None and v.__module__ == module.__name__]
        assert dispatchers, path
        for dispatcher in dispatchers:
            locator = getattr(dispatcher._cache, "_impl").locator
            assert type(locator).__name__.startswith("Santacpu"), (path, dispatcher)
            if sys.platform != "win32":  # saves under the lock (test_two_processes_saving_...)
                assert getattr(dispatcher._cache._cache_file, "_santacpu_locked", False), (path, dispatcher)


def test_the_digest_follows_the_folder_tree_and_formats(tmp_path):
    copy = tmp_path / "cpu"
    shutil.copytree(PACKAGE / "backends" / "cpu", copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = kernel_cache.sources_digest(str(copy))
    assert before == kernel_cache.sources_digest(str(PACKAGE / "backends" / "cpu"))  # names and contents, not places
    (copy / "__pycache__").mkdir()
    (copy / "__pycache__" / "x.py").write_text("# not a source\n")
    (copy / "notes.txt").write_text("not Python\n")
    assert kernel_cache.sources_digest(str(copy)) == before
    x86 = copy / "isa" / "x86.py"
    x86.write_text(x86.read_text() + "# changed\n")
    kernel_cache._digest.cache_clear()
    changed = kernel_cache.sources_digest(str(copy))
    assert changed != before
    (copy / "isa" / "x86.py").rename(copy / "isa" / "x87.py")  # a file's name counts too
    kernel_cache._digest.cache_clear()
    assert kernel_cache.sources_digest(str(copy)) not in (before, changed)


def test_a_change_beside_a_cached_kernel_compiles_it_again(tmp_path):
    copy = tmp_path / "santacpu"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    run = (
        "import numpy as np\n"
        "from santacpu.loading.transpose import transpose_into as kernel\n"
        "a = np.arange(6, dtype=np.float32).reshape(2, 3); b = np.empty((3, 2), np.float32)\n"
        "kernel(a, b); assert (b == a.T).all()\n"
        "print(kernel.stats.cache_hits.most_common(1)[0][1] if kernel.stats.cache_hits else 0)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "NUMBA_CACHE_DIR": str(tmp_path / "numba-cache")}

    def cache_hits() -> int:
        done = subprocess.run([sys.executable, "-c", run], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr
        hits = int(done.stdout.split()[-1])
        # A compile says so once, on stderr; a load from the cache says nothing.
        assert done.stderr == ("" if hits else kernel_cache.COMPILE_NOTICE + "\n"), done.stderr
        return hits

    assert cache_hits() == 0  # compiled and stored
    assert cache_hits() == 1  # loaded
    sibling = copy / "loading" / "source.py"  # not the kernel's file: Numba's own stamp stays the same
    sibling.write_text(sibling.read_text() + "# changed\n")
    assert cache_hits() == 0
    assert cache_hits() == 1
    shared = copy / "formats" / "blocks.py"
    shared.write_text(shared.read_text() + "# changed\n")
    assert cache_hits() == 0


# Two processes save two signatures of one kernel at once (Numba's save is slowed between reading
# the index and writing it, and both reach it together): each entry must name its own code.
SAVE_AT_ONCE = """
import sys, time
from pathlib import Path
import numpy as np
from numba.core import caching
from santacpu.loading.transpose import transpose_into as kernel

mine, other = Path(sys.argv[1]), Path(sys.argv[2])
cls = caching.IndexDataCacheFile
save, load_index = cls.save, cls._load_index

def save_together(self, key, data):
    mine.touch()
    deadline = time.monotonic() + 60
    while not other.exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    return save(self, key, data)

def slow_load_index(self):
    overloads = load_index(self)
    time.sleep(0.5)
    return overloads

cls.save, cls._load_index = save_together, slow_load_index
a = np.arange(6, dtype=sys.argv[3]).reshape(2, 3)
b = np.empty((3, 2), a.dtype)
kernel(a, b)
assert (b == a.T).all()
"""

LOAD_BOTH = """
import numpy as np
from santacpu.loading.transpose import transpose_into as kernel
for dtype in ("float32", "uint16"):
    a = np.arange(6, dtype=dtype).reshape(2, 3) * 7
    b = np.empty((3, 2), a.dtype)
    kernel(a, b)
    assert (b == a.T).all(), (dtype, b)
print(sum(kernel.stats.cache_hits.values()), sum(kernel.stats.cache_misses.values()))
"""


def test_two_processes_saving_one_kernel_at_once_keep_both_entries(tmp_path):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba-cache")}
    marks = tmp_path / "float32-saving", tmp_path / "uint16-saving"
    children = [
        subprocess.Popen([sys.executable, "-c", SAVE_AT_ONCE, str(mine), str(other), dtype], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for (mine, other), dtype in ((marks, "float32"), (marks[::-1], "uint16"))
    ]
    for child in children:
        _, err = child.communicate(timeout=240)
        assert child.returncode == 0, err
    done = subprocess.run([sys.executable, "-c", LOAD_BOTH], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2", "0"], (done.stdout, done.stderr)  # both loaded, the right code for each


def test_a_save_goes_on_where_the_lock_cannot_be_taken(tmp_path):
    from numba.core import caching

    assert kernel_cache.track_kernel_sources() and getattr(caching.IndexDataCacheFile, "_santacpu_locked", False)
    (tmp_path / kernel_cache.INDEX_LOCK).mkdir()  # cannot be opened as the lock file
    cache_file = caching.IndexDataCacheFile(cache_path=str(tmp_path), filename_base="f-1.py3", source_stamp="stamp")
    cache_file.save("key", ("code",))
    cache_file.save("other", ("more code",))
    assert cache_file.load("key") == ("code",) and cache_file.load("other") == ("more code",)
    assert sorted(p.name for p in tmp_path.glob("*.nbc")) == ["f-1.py3.1.nbc", "f-1.py3.2.nbc"]
