"""The NaN rule of the direct conv kernels' fused max pool (gen.py), shared by all of them.

A generated conv+ReLU+maxpool kernel compares its pool windows branch-free and only notes whether a
row of windows held a NaN; such a row (rare) is fixed up here: a window holding NaN has max NaN, the
first NaN in row-major order (as np.max), and routes to ~ its index (as np.argmax). One compiled
function for every shape (the geometry comes as run-time ints): the unrolled fix-up in each generated
kernel was about a quarter of its Numba compile (mnist_convnet's layer 2: 0.94 s, 0.63 s without it).
The generated text names this file's hash (gen.py), so a change here gives new kernel files, never
machine code cached with the old rule linked in.
"""
from numba import njit

from graphc.backends.codegen import FASTMATH


@njit(fastmath=FASTMATH, cache=True, nogil=True)
def fix_nan_row(aq, bq, yk, rk, flag, i, r0, Wq, ps, pst, Wp, Wo):
    """Row i of pooled output yk (and, when flag, its route rk): each window j whose taps
    aq[(r0 + di) * Wp + j * pst + dj] + bq (di, dj < ps) hold a NaN gets that NaN, the first in
    row-major order, and the route ~((r0 + di) * Wo + j * pst + dj) of it; other windows are left."""
    for j in range(Wq):
        c0 = j * pst
        p0 = -1
        m = bq
        for di in range(ps - 1, -1, -1):           # backwards: the first NaN is found last
            for dj in range(ps - 1, -1, -1):
                v = aq[(r0 + di) * Wp + c0 + dj] + bq
                if v != v:
                    m = v
                    p0 = (r0 + di) * Wo + c0 + dj
        if p0 >= 0:
            yk[i, j] = m
            if flag:
                rk[i, j] = ~p0
