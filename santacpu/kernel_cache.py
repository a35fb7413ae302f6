"""Numba's on-disk kernel cache (`cache=True`), made to notice every source a kernel is built from.

Numba keys a cached function by its own file (its contents' SHA-256, or its time and size in older
versions). Code compiled into it from elsewhere is not in that key: another module's `@njit`
function it calls, an `@intrinsic`'s code generation (the CPU backend's `isa/` modules), a
constant from `santacpu.formats`. After a change there alone (a `git pull`; an upgrade that keeps
the caller's file as it was, since pip leaves Numba's files in `__pycache__` behind) the old
machine code would load and run. Here the stamp of every santacpu function also holds a digest
of the Python files of its own folder's tree (`backends/cpu/` with `isa/`, ...) and of
`santacpu/formats`, so such a change compiles the kernels again.

`track_kernel_sources()` puts these locators ahead of Numba's own; each module with cached kernels
calls it before its first `cache=True` decorator (Numba picks a function's locator there). Where a
Numba lacks the internals used (`CacheImpl._locator_classes`, the locator classes below), it
leaves Numba as it is. It also has the first compile of a santacpu function in a process say so
on stderr (`COMPILE_NOTICE`): a first run compiles for tens of seconds, which had passed in silence.

It also makes a cache entry's save safe beside other processes (`LockedIndexDataCacheFile`).
Numba saves an entry by reading the function's index, taking the first data file number the index
does not name, writing the index, then the data file. Two processes saving two signatures of one
function at once (two first runs, the test suite's two workers) both take number 1: the index ends
up naming one process's machine code for the other's signature, and a later load runs it on the
wrong argument types. And a reader between the index and the data write loads the data file an
older build left under that number. Here the save holds an exclusive lock on the cache folder
(POSIX `flock`), and the data file is written before the index entry that names it.

May import: numba, the standard library.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import os
import sys

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_SHARED = os.path.join(_PACKAGE, "formats")  # constants and helpers every kernel package may use


def sources_digest(folder: str) -> bytes:
    """SHA-256 over the names and contents of the .py files under `folder` (recursively) and
    under santacpu/formats, in a fixed order."""
    return _digest(os.path.abspath(folder), _SHARED)


@functools.lru_cache(maxsize=None)
def _digest(*folders: str) -> bytes:
    digest = hashlib.sha256()
    for folder in dict.fromkeys(folders):  # each tree once, in the order given: not by where it lies
        for root, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(f for f in files if f.endswith(".py")):
                path = os.path.join(root, name)
                with open(path, "rb") as file:
                    contents = file.read()
                digest.update(os.path.relpath(path, folder).encode() + b"\0" + len(contents).to_bytes(8, "little") + contents)
    return digest.digest()


def _in_package(py_file: str) -> bool:
    return os.path.abspath(py_file).startswith(_PACKAGE + os.sep)


def _with_sources(base: type) -> type:
    """A subclass of Numba's locator `base` for santacpu's files only, whose stamp adds
    sources_digest of the function's folder."""

    class Locator(base):
        @classmethod
        def from_function(cls, py_func, py_file):
            return super().from_function(py_func, py_file) if _in_package(py_file) else None

        def get_source_stamp(self):
            return super().get_source_stamp(), sources_digest(os.path.dirname(self._py_file))

    Locator.__name__ = Locator.__qualname__ = f"Santacpu{base.__name__}"
    return Locator


COMPILE_NOTICE = "santacpu: compiling kernels for this CPU (once: Numba's cache keeps them for later runs)"


@functools.cache
def track_kernel_sources() -> bool:
    """Install the locators and the compile notice (once a process); False where this Numba's
    internals differ."""
    _announce_first_compile()
    try:
        from numba.core import caching

        impl = caching.CacheImpl
        bases = [caching.UserProvidedCacheLocator, caching.InTreeCacheLocator, caching.UserWideCacheLocator]
        current = list(impl._locator_classes)
    except (ImportError, AttributeError):
        return False
    if not all(base in current for base in bases):
        return False
    impl._locator_classes = [_with_sources(base) for base in bases] + current
    _lock_index_updates(caching)
    return True


INDEX_LOCK = "santacpu-numba-index.lock"  # in each cache folder: taken while an entry is saved


def _lock_index_updates(caching) -> None:
    """Numba's caches save through `LockedIndexDataCacheFile` (see the module docstring), where
    this Numba's cache file has the internals it uses and the system has `flock`."""
    base = getattr(caching, "IndexDataCacheFile", None)
    internals = ("_load_index", "_save_index", "_save_data", "_data_name")
    if base is None or getattr(base, "_santacpu_locked", False) or not all(hasattr(base, n) for n in internals):
        return
    if not _can_lock():
        return

    class LockedIndexDataCacheFile(base):
        _santacpu_locked = True

        def save(self, key, data):
            with _folder_lock(self._cache_path):
                overloads = self._load_index()
                name = overloads.get(key)
                if name is None:
                    taken = set(overloads.values())
                    name = next(n for n in map(self._data_name, itertools.count(1)) if n not in taken)
                self._save_data(name, data)  # before the entry that names it
                if overloads.get(key) != name:
                    overloads[key] = name
                    self._save_index(overloads)

    caching.IndexDataCacheFile = LockedIndexDataCacheFile


def _can_lock() -> bool:
    """Whether this system has `flock` (POSIX; elsewhere Numba saves as it always has)."""
    import importlib.util

    return importlib.util.find_spec("fcntl") is not None


@contextlib.contextmanager
def _folder_lock(folder: str):
    """An exclusive lock on `folder`'s INDEX_LOCK, held for the block; the block runs without one
    where the file cannot be opened or locked (a read-only folder, where the save itself fails as
    Numba's would; a file system without locks), as Numba alone would run it."""
    import fcntl

    try:
        fd = os.open(os.path.join(folder, INDEX_LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # (releases the lock)


def _announce_first_compile() -> None:
    """Print COMPILE_NOTICE when Numba first compiles a santacpu function in this process (a
    cache miss: loads from the cache send no compile event)."""
    try:
        from numba.core import event
    except ImportError:
        return

    class FirstCompile(event.Listener):
        said = False  # (not unregistered: Numba is iterating over its listeners when it calls this)

        def on_start(self, started):
            dispatcher = (started.data or {}).get("dispatcher")
            code = getattr(getattr(dispatcher, "py_func", None), "__code__", None)
            if not self.said and code is not None and _in_package(code.co_filename):
                self.said = True
                try:  # never the compile's failure: a closed or full stderr only loses the line
                    if sys.stderr is not None:  # (print(file=None) would write it to stdout)
                        print(COMPILE_NOTICE, file=sys.stderr, flush=True)
                except (OSError, ValueError):
                    pass

        def on_end(self, ended):
            pass

    event.register("numba:compile", FirstCompile())
