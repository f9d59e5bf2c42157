"""The numba backend's own @njit kernels (the convolutions are in backends/numba/conv/).

All kernels write into preallocated outputs (the memory plan's buffers) and are compiled with
``cache=True``, so a second process loads machine code from Numba's disk cache. Kernels are serial; the
lowerings share a large one's batch between threads (threads.py: the kernel runs on a slice of the batch
on each; generated kernels take a task range). On a 2-core machine a parallel call costs ~10-40 us, and
these kernels are memory-bound (two threads gain little), while on a shared, loaded machine a parallel
region waiting for a descheduled worker cost 5-20x (measured: a 204,800-element multiply took 4.9 ms in
parallel against 0.23 ms serial). So the backend runs them on one thread below PARALLEL_MIN elements
(1M; option parallel_min). Reductions accumulate in float64.

Conventions match the reference semantics: max-pool ties go to the first maximum in row-major window
order, a NaN wins over numbers (the first NaN); routes are flat in-plane indices ``i*W + j`` (int32),
~index where a ReLU masked the window (its gradient is dy * 0 there).
"""
PARALLEL_MIN = 1 << 20
