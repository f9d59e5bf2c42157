"""Kernels that walk whole (n, c) planes with plain loops (prange over N * C): global max pool, the max-pool
route for windows too large to unroll (global max pool's gradient: one window covering the plane), and
reflect/edge padding and its transpose (the crop that folds the border back), by row and column index
maps. Max and argmax follow the reference: NaN wins (the first NaN of a window), else the first maximum.
"""
import numpy as np
from numba import njit, prange

from graphc.backends.codegen import FASTMATH


@njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
def global_max_k(x, y):
    """y (N, C) = max of each plane of x (N, C, P); NaN propagates."""
    N, C, P = x.shape
    for t in prange(N * C):
        n = t // C
        c = t - n * C
        best = x[n, c, 0]
        for p in range(1, P):
            v = x[n, c, p]
            if v > best or v != v:
                best = v
                if v != v:
                    break
        y[n, c] = best


@njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
def maxpool_route_loop_k(x, dy, dx, kh, kw, sh, sw):
    """dx = each window's dy added at its first max in x (NaN first); windows walked with loops."""
    N, C, H, W = x.shape
    Ho, Wo = dy.shape[2], dy.shape[3]
    for t in prange(N * C):
        n = t // C
        c = t - n * C
        xp = x[n, c]
        gp = dx[n, c]
        gp[:, :] = 0.0
        for i in range(Ho):
            for j in range(Wo):
                r0, c0 = i * sh, j * sw
                best = xp[r0, c0]
                bp, bq = r0, c0
                for a in range(kh):
                    for b in range(kw):
                        v = xp[r0 + a, c0 + b]
                        if v > best or (v != v and best == best):
                            best = v
                            bp, bq = r0 + a, c0 + b
                gp[bp, bq] += dy[n, c, i, j]


@njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
def gather2d_k(x, rows, cols, out):
    """out[n, c, p, q] = x[n, c, rows[p], cols[q]] (reflect/edge padding)."""
    N, C = x.shape[0], x.shape[1]
    for t in prange(N * C):
        n = t // C
        c = t - n * C
        for p in range(rows.size):
            r = rows[p]
            for q in range(cols.size):
                out[n, c, p, q] = x[n, c, r, cols[q]]


@njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
def scatter2d_k(dy, rows, cols, dx):
    """dx = 0, then dy[n, c, p, q] added at dx[n, c, rows[p], cols[q]]: rows first, then columns (the
    reference's order of additions)."""
    N, C, Hp, Wp = dy.shape
    H, W = dx.shape[2], dx.shape[3]
    for t in prange(N * C):
        n = t // C
        c = t - n * C
        tmp = np.zeros((H, Wp), dx.dtype)
        for p in range(Hp):
            r = rows[p]
            for q in range(Wp):
                tmp[r, q] += dy[n, c, p, q]
        dx[n, c] = 0.0
        for i in range(H):
            for q in range(Wp):
                dx[n, c, i, cols[q]] += tmp[i, q]
