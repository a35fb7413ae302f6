"""Kernel launches with their array arguments prepared once.

Numba's launch path costs tens of microseconds a launch on the host: it types every argument and
turns each array into its ~9 kernel parameters, every call. A decode step makes ~200 launches
whose arrays are the same objects every step (the weights, the reused activation buffers, the
caches): `Launcher` keeps, for each launch site it has seen twice, the compiled kernel and each
array's parameters, and passes them straight to the driver's launch (what Numba itself calls
last); scalars are converted every call. Array identity is checked with `is` (the site holds the
arrays, so their ids stay theirs).

This reaches into numba-cuda's internals (`_Kernel._prepare_args`, `cuda.core.launch`, as of
numba-cuda 0.30): where they are missing or differ, a site falls back to the plain launch, which
is always correct. Under the simulator every launch is the plain one.

May import: numba, numpy.
"""

from __future__ import annotations

import numpy as np

MAX_SITES = 4096  # forgotten all at once beyond this (slices made anew each call never recur)
_SCALARS = (bool, int, float, np.generic)


class _Site:
    __slots__ = ("arrays", "chunks", "types", "kernel", "stream", "config", "function")


class Launcher:
    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.fast_launches = 0  # for the tests and the bench: how many launches took the fast path
        self._sites: dict[tuple, _Site | None] = {}  # None: seen once, or cannot be prepared
        self._seen: set[tuple] = set()
        if enabled:
            try:
                from numba.cuda import types as numba_types
                from numba.cuda.dispatcher import LaunchConfig, launch

                try:
                    from numba.cuda._compat import CUDA_CORE_GE_1_0
                except ImportError:
                    CUDA_CORE_GE_1_0 = True
                self._array_type = numba_types.Array
                self._launch, self._config_class, self._core_ge_1 = launch, LaunchConfig, CUDA_CORE_GE_1_0
            except ImportError:
                self.enabled = False

    def __call__(self, configured, args: tuple) -> None:
        """configured(*args), where `configured` is a kernel[grid, block] of Numba."""
        if not self.enabled:
            configured(*args)
            return
        # a site: the configured kernel, its arrays (by identity) and its scalars' types (any value)
        key = (id(configured),) + tuple(type(a) if isinstance(a, _SCALARS) else id(a) for a in args)
        site = self._sites.get(key)
        if site is not None and all(kept is arg for kept, arg in zip(site.arrays, args) if kept is not None):
            kernelargs: list = []
            for chunk, ty, arg in zip(site.chunks, site.types, args):
                if chunk is None:
                    site.kernel._prepare_args(ty, arg, site.stream, [], kernelargs)
                else:
                    kernelargs.extend(chunk)
            self._launch(site.stream, site.config, site.function, *kernelargs)
            self.fast_launches += 1
            return
        configured(*args)  # compiles on first use
        if key in self._sites:  # it could not be prepared, or these are other arrays under the same ids
            return
        if key not in self._seen:  # prepared the second time: arrays made anew each call never recur
            if len(self._seen) > MAX_SITES:
                self._seen.clear()
            self._seen.add(key)
            return
        if len(self._sites) > MAX_SITES:
            self._sites.clear()
            self._seen.clear()
        self._sites[key] = self._prepare(configured, args)

    def _prepare(self, configured, args: tuple) -> _Site | None:
        try:
            dispatcher = configured.dispatcher
            types = tuple(dispatcher.typeof_pyval(a) for a in args)
            kernel = dispatcher.overloads[types]
            site = _Site()
            site.kernel, site.types, site.stream = kernel, types, configured.stream
            site.arrays = tuple(a if isinstance(t, self._array_type) else None for a, t in zip(args, types))
            site.chunks = []
            for a, t in zip(args, types):
                if isinstance(t, self._array_type):
                    chunk: list = []
                    kernel._prepare_args(t, a, site.stream, [], chunk)
                    site.chunks.append(tuple(chunk))
                else:
                    site.chunks.append(None)
            cooperative = {"is_cooperative" if self._core_ge_1 else "cooperative_launch": kernel.cooperative}
            site.config = self._config_class(
                grid=configured.griddim, block=configured.blockdim, shmem_size=configured.sharedmem, **cooperative
            )
            site.function = kernel._codelibrary.get_cufunc().kernel
            return site
        except Exception:  # another numba-cuda: this site keeps the plain launch
            return None
