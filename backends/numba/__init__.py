"""The numba CPU backend: lowers a scheduled, fused, memory-planned graph to @njit kernels.

    exe = gc.compile(graph, backend="numba")                      # inference: exe.run(feeds)
    tr = gc.compile(graph, backend="numba", optimizer=gc.optim.SGD(0.1))
    tr.step(feeds)     # forward + backward + update in one call; parameters updated in place

The executable is backends/base.py's shared executor over host arrays (executor.py); each op and fused
pattern is lowered where it is registered (lower_*.py); ``kernel_table()`` lists what runs for each.
Compile times: ``exe.compile_times``; ``exe.precompile(batch)`` binds and runs once on zero feeds.
"""
import sys

from graphc.backends import registry
from graphc.backends.kernel_cache import (guard_numba_cache, import_numba_unhighlighted,
                                          load_scipy_blas_before_numba, skip_cfunc_wrappers)
from graphc.backends.numba import compile_memo

import_numba_unhighlighted()
compile_memo.install()       # a call's types and an LLVM type's size found once per process, not per use
load_scipy_blas_before_numba()   # single-threaded, before Numba's first compile would load it
from graphc.backends.numba import (lower_conv, lower_elementwise, lower_linalg, lower_loss, lower_norm,  # noqa: F401
                                   lower_pool, lower_reduce, lower_shape, lower_sources)
from graphc.backends.numba.executor import NumbaExecutable

# every cached @njit kernel of the backend's modules (imported above) survives a corrupted cache entry
# and is compiled without a C wrapper
_MODULES = [m for n, m in list(sys.modules.items()) if n.startswith(__name__ + ".") and m is not None]
guard_numba_cache(*_MODULES)
skip_cfunc_wrappers(*_MODULES)

__all__ = ["NumbaExecutable", "lower", "kernel_table"]


def kernel_table():
    """[(op or "fused:<pattern>", kernel)] for every op of the table and every fused pattern."""
    return registry.registry("numba").kernel_table()


def lower(graph, dtype=None, pipeline=None, **options):
    """graph (after the pipeline) -> NumbaExecutable. options: blas_threads (default 1; None leaves BLAS
    alone), parallel_min (elements above which kernels share their work between threads), threads
    ("auto" or a count), progress ("auto": a line on stderr while kernels compile; None; or a
    callable(done, total))."""
    options.pop("strategy", None)
    return NumbaExecutable(graph, dtype=dtype, pipeline=pipeline, **options)
