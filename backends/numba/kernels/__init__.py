"""The numba backend's own @njit kernels (the convolutions are in backends/numba/conv/).

All kernels write into preallocated outputs (the memory plan's buffers) and are compiled with
``cache=True``, so a second process loads machine code from Numba's disk cache. Kernels whose work
grows with the batch come in a parallel (prange over batch x channels) and a serial variant (generated
kernels: parallel=True/False in the source). On a 2-core machine a parallel region costs ~10-25 us to
start, and these kernels are memory-bound (two threads gain little), while on a shared, loaded machine
an OpenMP region waiting for a descheduled worker cost 5-20x (measured: a 204,800-element multiply took
4.9 ms in parallel against 0.23 ms serial). So the backend runs them serially below PARALLEL_MIN
elements (1M; option parallel_min). Reductions accumulate in float64.

Conventions match the reference semantics: max-pool ties go to the first maximum in row-major window
order, a NaN wins over numbers (the first NaN); routes are flat in-plane indices ``i*W + j`` (int32),
~index where a ReLU masked the window (its gradient is dy * 0 there).
"""
PARALLEL_MIN = 1 << 20
