"""The numba CPU executable: host arrays over the shared executor (backends/base.py).

Feeds are used where they lie (no copy); parameters and optimizer state are the executable's own
arrays, updated in place by the kernels. During a run every loaded BLAS is held to one thread from
its first BLAS call on (kernel_cache.BlasLimit, lazy) and Numba's thread count is the one chosen for
the binding (``threads="auto"``: measured, see _choose_threads).
"""
from __future__ import annotations

import time
import weakref

import numba
import numpy as np

from graphc import shapes
from graphc.backends.base import CompiledExecutable, LowerContext
from graphc.backends.kernel_cache import BlasLimit, aligned_empty
from graphc.backends.numba.compile_stats import add_tuning
from graphc.backends.numba.kernels import PARALLEL_MIN
from graphc.backends.numba.precompile import precompile_steps
from graphc.backends.numba.threads import batch_split, discover_spin, num_threads, parallel_for, set_num_threads
from graphc.errors import BackendError

RECHECK_RUNS = (20, 200)   # threads="auto": the count is chosen again this many runs after the choice before,
                           # for programs under 100 ms a run
SLOW_RUN_S = 0.5           # threads="auto": a program whose run on all threads takes longer keeps them, untried


class NumbaContext(LowerContext):
    """LowerContext with the numba backend's call helpers."""

    def parallel(self, elements):
        """Whether a kernel over `elements` runs in parallel (above the option parallel_min)."""
        return elements >= self.exe.parallel_min

    def split_batch(self, kern, batch, elements):
        """kern itself, or (above parallel_min elements) a function running it on Numba's thread count,
        each thread on a contiguous share of the `batch` (the first axis of every array argument whose
        first axis is that long; threads.batch_split): a serial kernel compiles in a third to half
        the time of a prange one."""
        if not self.parallel(elements) or batch < 2:
            return kern

        def run(*args):
            parallel_for(batch_split(kern, args, batch), batch)
        return run

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


class HostState(dict):
    """``exe.state`` of the numba backend: name -> the executable's own array, which the kernels read and
    update in place. What it hands out (``exe.state[name]``, ``get``, ``values()``, ``items()``) is a view
    of that array, so the executor knows which states a caller may edit in place: those handed out since
    the last run, or whose views are still alive, count as changed at the next run (values computed from
    the state ahead of a run, such as folded batch norm, are then recomputed)."""

    def __init__(self, d):
        super().__init__(d)
        self._handed = {}                # name -> weak references to the views handed out
        self.version = 0                 # bumped by every change of an entry (not of an array's values)

    def __setitem__(self, n, v):
        dict.__setitem__(self, n, v)
        self.version += 1

    def __delitem__(self, n):
        dict.__delitem__(self, n)
        self.version += 1

    def update(self, *a, **kw):
        dict.update(self, *a, **kw)
        self.version += 1

    def __ior__(self, other):
        self.update(other)
        return self

    def setdefault(self, n, default=None):
        self.version += 1
        return dict.setdefault(self, n, default)

    def pop(self, *a):
        self.version += 1
        return dict.pop(self, *a)

    def popitem(self):
        self.version += 1
        return dict.popitem(self)

    def clear(self):
        dict.clear(self)
        self.version += 1

    def __getitem__(self, n):
        v = dict.__getitem__(self, n).view()
        self._handed.setdefault(n, []).append(weakref.ref(v))
        return v

    def get(self, n, default=None):
        return self[n] if n in self else default

    def values(self):
        return [self[n] for n in self]

    def items(self):
        return [(n, self[n]) for n in self]

    def raw(self, n):
        """The array itself (the executor's own access; not handed out)."""
        return dict.__getitem__(self, n)

    def touched(self):
        """States handed out since the last call or still held by a caller (forgets the others)."""
        if not self._handed:
            return set()
        out = set(self._handed)
        alive = {n: [r for r in refs if r() is not None] for n, refs in self._handed.items()}
        self._handed = {n: refs for n, refs in alive.items() if refs}
        return out


class NumbaExecutable(CompiledExecutable):
    backend = "numba"
    conv_module = "numba conv (direct per-shape kernels or im2col+GEMM, chosen per shape)"

    def __init__(self, graph, dtype=None, pipeline=None, blas_threads=1, parallel_min=PARALLEL_MIN,
                 threads="auto", progress="auto", **options):
        self.parallel_min = parallel_min
        self.threads = threads
        self.progress = progress        # "auto": a line on stderr; a callable(done, total); None: silent
        self._blas = BlasLimit(blas_threads, lazy=True)     # (applied at a run's first BLAS call)
        self._bound_state = {}
        self._pushed = None              # (exe.state, its version, bound states) at the last _push_state
        super().__init__(graph, dtype, pipeline, **options)
        if self.dtype not in (np.float32, np.float64):
            raise BackendError(f"the numba backend runs float32 or float64, not {self.dtype}")

    def _setup(self):
        self.state = HostState(self.state)
        nodes = self.graph.nx.nodes
        # np.array(order="C"), not np.ascontiguousarray, which turns a 0-d value into shape (1,)
        self.consts = {n: np.array(self._cast(np.asarray(nodes[n]["attrs"]["value"]), nodes[n]["dtype"]), order="C")
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
        arr = self._bound_state[name] = self.state.raw(name)
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
            a = feeds[name]
            values[i] = a if a.flags.c_contiguous else np.array(a, order="C")     # 0-d stays 0-d

    def _fetch(self, b, i, shape):
        return np.array(b.values[i])

    def _push_state(self):
        """Bindings hold the state arrays themselves (updates are written in place); if a user replaced
        an entry of exe.state, its values are copied into the bound array (True when one was). Skipped
        while exe.state's entries are as they were at the last look (its version)."""
        state = self.state
        mark = (id(state), state.version, len(self._bound_state))
        if mark == self._pushed:
            return False
        changed = False
        for n, arr in self._bound_state.items():
            cur = state.raw(n)
            if cur is not arr:
                np.copyto(arr, np.asarray(cur, dtype=arr.dtype).reshape(arr.shape))
                state[n] = arr
                changed = True
        self._pushed = (id(state), state.version, len(self._bound_state))
        return changed

    def _volatile_state(self):
        return self.state.touched()

    def state_dict(self):
        d = {n: np.array(self.state.raw(n)) for n in self.state}
        d["__step__"] = np.array(self.step_count)
        return d

    def load_state_dict(self, d):
        super().load_state_dict(d)
        self._push_state()

    def _copy_back(self, b, pairs):
        values = b.values
        for s, i in pairs:
            np.copyto(self.state.raw(s), values[i])

    # ------------------------------------------------------------------ running
    def _run_steps(self, b, threads=None):
        prev = num_threads()
        threads = prev if threads is None else threads
        if threads != prev:
            set_num_threads(threads)
        try:
            with self._blas:
                for _, f in b.steps:
                    f()
        finally:
            if threads != prev:
                set_num_threads(prev)

    def _first_run(self, b):
        # every kernel is found and loaded from the disk cache or compiled (in parallel; discovery on a
        # snapshot of the state), then the first real run, timed like the next ones while the thread
        # count is being chosen
        t0 = time.perf_counter()
        with self._state_saved():
            self._precompile(b)
        self._start_thread_choice(b)
        self._run_binding(b)
        b.first_run_s = time.perf_counter() - t0

    def _run_binding(self, b):
        if not b.thread_trials:
            self._run_steps(b, b.threads)
            b.runs_since_choice += 1
            if b.recheck and b.runs_since_choice == b.recheck[0] and max(b.thread_times.values(), default=1e9) < 100:
                # again, later: a busy moment during the first runs kept MobileNetV2 at batch 1 on one thread
                # (10.9 ms instead of 7.6) for a whole benchmark, and ResNet-18 (33 ms instead of 20)
                b.recheck = b.recheck[1:]
                b.thread_times, b.thread_trials = {}, [numba.config.NUMBA_NUM_THREADS, 1] * 3
            return
        n = b.thread_trials.pop(0)
        t0 = time.perf_counter()
        self._run_steps(b, n)
        if b.trial_warmups:             # (not a trial: see _start_thread_choice)
            b.trial_warmups -= 1
            if time.perf_counter() - t0 > SLOW_RUN_S:
                b.thread_trials, b.trial_warmups = [], 0    # a slow program: all threads, no trial on one
        else:
            b.thread_times.setdefault(n, []).append(time.perf_counter() - t0)
        self._thread_choice(b)

    def _precompile(self, b):
        """backends/numba/precompile.py over this binding's steps (discovery on one thread)."""
        prev = num_threads()
        numba.set_num_threads(1)
        try:
            with self._blas:
                env = ", ".join(f"{k}={v}" for k, v in sorted(b.env.items()))
                steps = [f for _, f in b.steps] + ([discover_spin] if numba.config.NUMBA_NUM_THREADS > 1 else [])
                b.compile_stats = precompile_steps(steps, self.progress,
                                                   f" for {self.graph.name}" + (f" ({env})" if env else ""))
        finally:
            numba.set_num_threads(prev)

    def _start_thread_choice(self, b):
        """threads="auto": the binding's first runs alternate all Numba threads and one (three rounds at
        most, after a round whose times are not kept), then it keeps the faster, and chooses again
        RECHECK_RUNS runs later. Results do not depend on the count (every parallel kernel splits work
        whose sums do not depend on how it is split), so the choice is made on real runs and costs
        nothing. On a quiet 2-core machine two threads win on big batches; on a loaded, shared one a
        parallel region waiting for a descheduled worker made a batch-128 training step 2.6x slower
        than one thread (176 ms vs 68 ms measured), and batch-1 kernels 50x slower. The first run on
        each count pays once for what was never touched (ResNet-18 at batch 1: 60 ms on one thread,
        then 35; its first run on two, after the compile, more), so it is no trial: with it as one, one
        slow run on two threads against two on one decided (MobileNetV2 at batch 1 went to one thread
        in 2 of 3 processes, at 13-15 ms a run instead of 10-11; a scratch script: 3 fresh processes, 10
        runs each; with the warm-up round 1 of 3, where the two counts measured 12.8 and 11.5 ms)."""
        maxt = numba.config.NUMBA_NUM_THREADS
        b.thread_times = {}
        b.runs_since_choice, b.recheck = 0, RECHECK_RUNS if self.threads == "auto" else ()
        b.trial_warmups = 0
        if self.threads != "auto":
            b.threads, b.thread_trials = max(1, min(int(self.threads), maxt)), []
        elif maxt == 1 or not b.steps:
            b.threads, b.thread_trials = 1, []
        else:
            b.threads, b.thread_trials, b.trial_warmups = maxt, [maxt, 1] * 4, 2

    def _thread_choice(self, b):
        """After each trial run: stop when a program is slow (over SLOW_RUN_S a run: all threads) or one
        count clearly wins (1.3x, after two rounds); keep the faster."""
        if b.trial_warmups:
            return
        times = b.thread_times
        maxt = numba.config.NUMBA_NUM_THREADS
        rounds = min(len(times.get(maxt, ())), len(times.get(1, ())))
        if max(times.get(maxt, [0.0])) > SLOW_RUN_S and rounds == 0:
            b.thread_trials = []
        elif rounds >= 2:
            a, c = min(times[maxt]), min(times[1])
            if max(a, c) > 1.3 * min(a, c):
                b.thread_trials = []
        if not b.thread_trials:
            best = {n: 1e3 * float(min(v)) for n, v in times.items()}
            b.threads = min(best, key=best.get) if best else b.threads
            b.thread_times = best
            b.runs_since_choice = 0
            add_tuning("threads", 0.0)

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
