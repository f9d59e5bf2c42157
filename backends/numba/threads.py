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
A parallel call costs about the same either way (10-30 us to wake the other thread).
"""
from __future__ import annotations

import os
import threading

import numba
import numpy as np

# Numba's OpenMP workers (the prange kernels that remain) spin only briefly after a parallel loop. By
# libgomp's default (300000 spins) a spinning worker holds the core that the next kernel's Python
# worker thread needs: on 2 cores ResNet-18's batch-1 step took 26.9 ms and its first conv 3.9 ms
# instead of 18.5 and 1.8 (OMP_WAIT_POLICY=ACTIVE: 48 ms). Sleeping at once (PASSIVE) costs the
# small kernels their wake-up instead (mnist_convnet batch 1: 0.053 against 0.040 ms); 30000 spins
# served both (graphc bench, 2026-11-30). libgomp reads it when Numba first launches its pool, so it
# is set on import, unless the user set either variable.
SPINCOUNT_DEFAULTED = "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ
if SPINCOUNT_DEFAULTED:
    os.environ["GOMP_SPINCOUNT"] = "30000"

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


class _Worker:
    """One daemon thread that runs the chunks posted to it. Its two locks are binary semaphores (a
    plain lock may be released by another thread; acquiring one is a futex wait in C, cheaper than
    threading.Semaphore's Condition)."""

    def __init__(self, k):
        self.k = k
        self.go = threading.Lock()
        self.done = threading.Lock()
        self.go.acquire()
        self.done.acquire()
        self.job = None
        self.error = None
        threading.Thread(target=self._loop, name=f"graphc-numba-{k}", daemon=True).start()

    def _loop(self):
        while True:
            self.go.acquire()
            fn, lo, hi = self.job
            try:
                fn(lo, hi, self.k)
            except BaseException as e:     # re-raised in the calling thread
                self.error = e
            self.job = None
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
            threads = min(threads, ntasks)
            while len(self.workers) < threads - 1:
                self.workers.append(_Worker(len(self.workers) + 1))
            bounds = [ntasks * k // threads for k in range(threads + 1)]
            posted = self.workers[:threads - 1]
            for w, lo, hi in zip(posted, bounds[1:], bounds[2:]):
                w.job = (fn, lo, hi)
                w.go.release()
            err = None
            try:
                fn(bounds[0], bounds[1], 0)
            except BaseException as e:
                err = e
            for w in posted:
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
