"""Parallel loops of the numba backend: serial @njit(nogil=True) kernels over a range of tasks, run on
Python threads.

A kernel written ``kernel(..., lo, hi)`` does tasks lo..hi-1 (an image, a block of channels, ...);
``parallel_for(fn, ntasks)`` splits the tasks into one contiguous chunk per thread and calls
``fn(lo, hi, k)`` (k: the thread's index, for per-thread work arrays) on the calling thread and on
worker threads, which run at once because the kernels release the GIL. The thread count is Numba's
(``numba.set_num_threads``: the executor picks it per binding), so nothing else changes for users.

Why not ``prange``: a Numba-parallel kernel costs 2-3x the compile time of the same kernel serial
(measured on a cold mnist_convnet training step: 2.1 s against 1.2 s of CPU for the fused conv of
layer 2, 1.8 s against 0.5 s for the max-pool route scatter; the parfor pass and the gufunc it
builds re-optimise the whole task body), and nine of them made half of that step's cold compile.
A parallel call costs about the same either way. Waiting threads spin for a while (``SPIN_US``, yielding
the CPU between reads, without the GIL) before they sleep: waking a sleeping thread took 20-50 us on
these virtual machines.
"""
from __future__ import annotations

import os
import platform
import sys
import threading
import time

import numba
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core.extending import intrinsic

# Numba's OpenMP workers (the prange kernels that remain) spin only briefly after a parallel loop. By
# libgomp's default (300000 spins) a spinning worker holds the core that the next kernel's Python
# worker thread needs: on 2 cores ResNet-18's batch-1 step took 26.9 ms and its first conv 3.9 ms
# instead of 18.5 and 1.8 (OMP_WAIT_POLICY=ACTIVE: 48 ms); with 30000 spins beside this module's own
# spinning waits, its batch-16 training step took 5.8 s instead of 1.24 (3000 spins, or PASSIVE).
# Against PASSIVE and 300 spins (one run each, 2026-11-30): mobilenet_v2 b1 7.0 ms (PASSIVE 9.9, 300: 10.9),
# resnet18 b1 16.5 (16.7, 29.7), lenet5 train 2.3 (1.9, 2.5). libgomp reads it when Numba first
# launches its pool, so it is set on import, unless the user set it or OMP_WAIT_POLICY.
SPINCOUNT_DEFAULTED = "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ
if SPINCOUNT_DEFAULTED:
    os.environ["GOMP_SPINCOUNT"] = "3000"

_RAW_NUM_THREADS = []


def num_threads():
    """numba.get_num_threads() without its Python wrapper (0.7 us -> 0.15 us; called by every parallel
    call) once Numba's thread pool is up."""
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


def set_num_threads(n):
    """numba.set_num_threads(n) for a count already known to be valid (1..NUMBA_NUM_THREADS), without its
    Python checks (1.6 -> 0.4 us a pair: the executor sets and restores its count around every run, a
    batch-1 MNIST run takes ~33 us) once Numba's thread pool is up."""
    if not _RAW_NUM_THREADS:
        num_threads()                    # launches the pool, finds the raw calls
    raw = getattr(getattr(numba.np.ufunc, "parallel", None), "_set_num_threads", None)
    if _RAW_NUM_THREADS and callable(raw):
        raw(n)
    else:                                # pragma: no cover - another Numba: the public call
        numba.set_num_threads(n)


# between two reads of a spin: sched_yield (another runnable thread on this CPU, e.g. an OpenMP worker
# of a prange kernel, gets the core: with x86's pause instead, spinning workers beside OpenMP's made
# ResNet-18's batch-1 step 3x slower on 2 threads), or pause where there is no sched_yield
if sys.platform != "win32":
    _YIELD = ("sched_yield", ir.FunctionType(ir.IntType(32), []))
elif platform.machine() in ("x86_64", "AMD64"):
    _YIELD = ("llvm.x86.sse2.pause", ir.FunctionType(ir.VoidType(), []))
else:
    _YIELD = None


@intrinsic
def _load_acquire(typingctx, arr, i):
    """arr[i] of a 1-d int64 array as an atomic acquire load (read again on every call: never hoisted
    out of a loop), then a yield of the CPU (_YIELD)."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.int64 and arr.ndim == 1):
        return None

    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        v = builder.load_atomic(builder.gep(a.data, [args[1]]), "acquire", 8)
        if _YIELD is not None:
            builder.call(cgutils.get_or_insert_function(builder.module, _YIELD[1], _YIELD[0]), [])
        return v
    return types.int64(arr, types.intp), codegen


@njit(nogil=True, cache=True)
def _spin_until(flags, i, old, iters):
    """True once flags[i] != old, False after ``iters`` reads (without the GIL)."""
    for _ in range(iters):
        if _load_acquire(flags, i) != old:
            return True
    return False


# A worker waits for its next chunk spinning (without the GIL) for about SPIN_US before it sleeps, and
# the caller waits for the workers' chunks the same way: waking a sleeping thread took 20-50 us on these
# virtual machines, which made a parallel call of 100 us of work no faster on 2 threads than on one
# (105 / 121 us; spinning: 56 us).
SPIN_US = 150
_SPIN = []                 # [reads of _spin_until in SPIN_US], measured once
_FLAGS = np.zeros(2 * 256, np.int64)        # per worker k: [2k] chunks posted, [2k + 1] chunks done


def _spin_reads():
    if not _SPIN:
        probe = np.zeros(1, np.int64)
        _spin_until(probe, 0, 0, 10)
        t0 = time.perf_counter()
        _spin_until(probe, 0, 0, 20000)
        per = max((time.perf_counter() - t0) / 20000, 1e-9)
        _SPIN.append(int(SPIN_US * 1e-6 / per))
    return _SPIN[0]


def discover_spin():
    """A call of the spin-wait kernel that reads nothing (0 reads): run as a step under precompile's
    discovery, which runs steps on one thread, it brings that kernel into the binding's compile instead
    of the first parallel call's (0.05-0.1 s after every other kernel was ready)."""
    _spin_until(_FLAGS, 0, 0, 0)


class _Worker:
    """One daemon thread that runs the chunks posted to it. Its two locks are binary semaphores (a
    plain lock may be released by another thread; acquiring one is a futex wait in C, cheaper than
    threading.Semaphore's Condition). The locks order everything; _FLAGS only lets either side see
    the other's step early, spinning, instead of sleeping on the lock."""

    def __init__(self, k):
        self.k = k
        self.go = threading.Lock()
        self.done = threading.Lock()
        self.go.acquire()
        self.done.acquire()
        self.job = None
        self.error = None
        threading.Thread(target=self._loop, args=(_spin_reads(),), name=f"graphc-numba-{k}", daemon=True).start()

    def _loop(self, spin):
        seen = int(_FLAGS[2 * self.k])
        while True:
            _spin_until(_FLAGS, 2 * self.k, seen, spin)
            self.go.acquire()
            seen = int(_FLAGS[2 * self.k])
            fn, lo, hi = self.job
            try:
                fn(lo, hi, self.k)
            except BaseException as e:     # re-raised in the calling thread
                self.error = e
            self.job = None
            _FLAGS[2 * self.k + 1] += 1
            self.done.release()


class _Pool:
    def __init__(self):
        self.workers = []
        self.lock = threading.Lock()      # one parallel loop at a time; a second caller runs serially

    def run(self, fn, ntasks, threads):
        if threads <= 1 or ntasks <= 1 or not self.lock.acquire(blocking=False):
            fn(0, ntasks, 0)
            return
        try:
            threads = min(threads, ntasks, _FLAGS.size // 2)
            while len(self.workers) < threads - 1:
                self.workers.append(_Worker(len(self.workers) + 1))
            bounds = [ntasks * k // threads for k in range(threads + 1)]
            posted = self.workers[:threads - 1]
            done = [int(_FLAGS[2 * w.k + 1]) for w in posted]
            for w, lo, hi in zip(posted, bounds[1:], bounds[2:]):
                w.job = (fn, lo, hi)
                _FLAGS[2 * w.k] += 1
                w.go.release()
            err = None
            try:
                fn(bounds[0], bounds[1], 0)
            except BaseException as e:
                err = e
            spin = _spin_reads()
            for w, d in zip(posted, done):
                _spin_until(_FLAGS, 2 * w.k + 1, d, spin)
                w.done.acquire()
                if w.error is not None and err is None:
                    err = w.error
                w.error = None
            if err is not None:
                raise err
        finally:
            self.lock.release()


_POOL = _Pool()


def parallel_for(fn, ntasks, threads=None):
    """fn(lo, hi, k) over contiguous chunks of range(ntasks), one per thread (k = 0 on the calling
    thread); ``threads`` defaults to Numba's current thread count."""
    _POOL.run(fn, int(ntasks), num_threads() if threads is None else int(threads))


def batch_split(kern, args, batch):
    """fn for parallel_for: kern on the images lo..hi-1 of every array argument whose first axis is the
    batch (views along axis 0 keep their layout, so one compiled kernel serves every chunk)."""
    split = [isinstance(a, np.ndarray) and a.ndim >= 1 and a.shape[0] == batch
             for a in args]

    def fn(lo, hi, k):
        kern(*[a[lo:hi] if s else a for a, s in zip(args, split)])
    return fn
