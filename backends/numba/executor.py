"""The numba CPU executable: host arrays over the shared executor (backends/base.py).

Feeds are used where they lie (no copy); parameters and optimizer state are the executable's own
arrays, updated in place by the kernels. During a run every loaded BLAS is held to one thread
(kernel_cache.BlasLimit) and Numba's thread count is the one chosen for the binding
(``threads="auto"``: measured, see _choose_threads).
"""
from __future__ import annotations

import time

import numba
import numpy as np

from graphc import shapes
from graphc.backends.base import CompiledExecutable, LowerContext
from graphc.backends.kernel_cache import BlasLimit, aligned_empty
from graphc.backends.numba.compile_stats import add_tuning
from graphc.backends.numba.kernels import PARALLEL_MIN
from graphc.errors import BackendError

_RAW_NUM_THREADS = []


def num_threads():
    """numba.get_num_threads() without its Python wrapper (0.7 us -> 0.15 us; called by every conv
    step) once Numba's thread pool is up."""
    if _RAW_NUM_THREADS:
        return _RAW_NUM_THREADS[0]()
    t = numba.get_num_threads()          # launches the pool
    raw = getattr(getattr(numba.np.ufunc, "parallel", None), "_get_num_threads", None)
    if callable(raw):
        try:
            if raw() == t:
                _RAW_NUM_THREADS.append(raw)
        except Exception:                # pragma: no cover - another Numba: keep the public call
            pass
    return t


class NumbaContext(LowerContext):
    """LowerContext with the numba backend's call helpers."""

    def parallel(self, elements):
        """Whether a kernel over `elements` runs Numba-parallel (above the option parallel_min)."""
        return elements >= self.exe.parallel_min

    def call(self, kern, inputs, tail=(), fix=None):
        """A step kern(*inputs, *tail), the input arrays bound now when static, read per call when
        dynamic; fix(array) adapts each input (a reshape)."""
        stat = self.static(inputs)
        if stat is not None:
            args = tuple(fix(a) if fix else a for a in stat) + tuple(tail)

            def step():
                kern(*args)
            return step
        values, idx, tail = self.values, [self.index(i) for i in inputs], tuple(tail)
        if fix is None:
            def step():
                kern(*[values[i] for i in idx], *tail)
        else:
            def step():
                kern(*[fix(values[i]) for i in idx], *tail)
        return step


class NumbaExecutable(CompiledExecutable):
    backend = "numba"
    conv_module = "numba conv (direct per-shape kernels or im2col+GEMM, chosen per shape)"

    def __init__(self, graph, dtype=None, pipeline=None, blas_threads=1, parallel_min=PARALLEL_MIN,
                 threads="auto", **options):
        self.parallel_min = parallel_min
        self.threads = threads
        self._blas = BlasLimit(blas_threads)
        self._bound_state = {}
        super().__init__(graph, dtype, pipeline, **options)
        if self.dtype not in (np.float32, np.float64):
            raise BackendError(f"the numba backend runs float32 or float64, not {self.dtype}")

    def _setup(self):
        nodes = self.graph.nx.nodes
        self.consts = {n: np.ascontiguousarray(self._cast(np.asarray(nodes[n]["attrs"]["value"]), nodes[n]["dtype"]))
                       for n in self.schedule if nodes[n]["op"] == "const"}

    # ------------------------------------------------------------------ storage
    def _alloc(self, nbytes):
        return aligned_empty(nbytes, np.uint8)

    def _view(self, buf, shape, dtype):
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        return buf[:nbytes].view(dtype).reshape(shape)

    def _scratch(self, shape, dtype):
        return aligned_empty(shape, dtype)

    def _state_array(self, name):
        arr = self._bound_state[name] = self.state[name]
        return arr

    def _const_array(self, name):
        return self.consts[name]

    def _bind_input(self, b, name, i):
        b.dynamic.add(name)                 # the fed array itself, set per run

    def _bind_alias(self, b, name, src):
        i, si = b.slot(name), b.slot(src)
        shape = tuple(shapes.resolve(self.graph.nx.nodes[name]["shape"], b.env))
        if src not in b.dynamic:
            b.values[i] = b.values[si].reshape(shape)
            return None
        b.dynamic.add(name)
        values = b.values

        def step():
            values[i] = values[si].reshape(shape)
        return step

    def _context(self, b, name, node):
        return NumbaContext(self, b, name, node)

    # ------------------------------------------------------------------ feeds, fetches, state
    def _upload(self, b, feeds):
        values = b.values
        for name, i in b.feeds:
            values[i] = np.ascontiguousarray(feeds[name])

    def _fetch(self, b, i, shape):
        return np.array(b.values[i])

    def _push_state(self):
        """Bindings hold the state arrays themselves (updates are written in place); if a user replaced
        an entry of exe.state, its values are copied into the bound array."""
        for n, arr in self._bound_state.items():
            cur = self.state[n]
            if cur is not arr:
                np.copyto(arr, np.asarray(cur, dtype=arr.dtype).reshape(arr.shape))
                self.state[n] = arr

    def load_state_dict(self, d):
        super().load_state_dict(d)
        self._push_state()

    def _copy_back(self, b, pairs):
        values = b.values
        for s, i in pairs:
            np.copyto(self.state[s], values[i])

    # ------------------------------------------------------------------ running
    def _run_steps(self, b, threads=None):
        prev = num_threads()
        threads = prev if threads is None else threads
        if threads != prev:
            numba.set_num_threads(threads)
        try:
            with self._blas:
                for _, f in b.steps:
                    f()
        finally:
            if threads != prev:
                numba.set_num_threads(prev)

    def _first_run(self, b):
        # the first run compiles (or loads from the disk cache) every kernel; then the thread count
        # is chosen; both on a snapshot of the state, so the real run below starts from it
        with self._state_saved():
            t0 = time.perf_counter()
            self._run_steps(b, numba.get_num_threads())
            b.first_run_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            b.threads = self._choose_threads(b) if b.steps else 1
            add_tuning("threads", time.perf_counter() - t0)
        self._run_steps(b, b.threads)

    def _choose_threads(self, b):
        """threads="auto": time the bound program with all Numba threads and with one, keep the faster.
        On a quiet 2-core machine two threads win on big batches; on a loaded, shared one an OpenMP
        region waiting for a descheduled worker made a batch-128 training step 2.6x slower than one
        thread (176 ms vs 68 ms measured), and batch-1 kernels 50x slower. Programs slower than
        0.5 s a run keep all threads (timing them would cost too much)."""
        maxt = numba.config.NUMBA_NUM_THREADS
        if self.threads != "auto":
            return max(1, min(int(self.threads), maxt))
        if maxt == 1:
            return 1
        self._run_steps(b, 1)                # compiles what a one-thread run needs (conv strategies)
        t0 = time.perf_counter()
        self._run_steps(b, 1)
        if time.perf_counter() - t0 > 0.5:
            return maxt
        times = {maxt: [], 1: []}
        for rnd in range(3):
            for n in (maxt, 1):
                t0 = time.perf_counter()
                self._run_steps(b, n)
                times[n].append(time.perf_counter() - t0)
            if rnd >= 1:
                a, c = min(times[maxt]), min(times[1])
                if max(a, c) > 1.3 * min(a, c):
                    break                    # clear winner: stop early (tuning is part of compile time)
        b.thread_times = {n: 1e3 * float(min(v)) for n, v in times.items()}
        return min(b.thread_times, key=b.thread_times.get)

    def _profiling(self, b):
        return _ThreadsAndBlas(b.threads, self._blas)


class _ThreadsAndBlas:
    """Numba's thread count set to the binding's, and BLAS held, while profiling."""

    def __init__(self, threads, blas):
        self.threads, self.blas = threads, blas

    def __enter__(self):
        self.prev = numba.get_num_threads()
        numba.set_num_threads(self.threads)
        self.blas.__enter__()

    def __exit__(self, *exc):
        self.blas.__exit__(*exc)
        numba.set_num_threads(self.prev)
