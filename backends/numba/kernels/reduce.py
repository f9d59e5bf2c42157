"""Reductions (any axes, float64 accumulation) and the row softmax."""
import math

import numpy as np
from numba import njit, prange

from graphc.backends.codegen import FASTMATH


@njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
def sum4_par(x, out, scale):
    """out (K0, K1) = scale * sum over r0, r1 of x (R0, K0, R1, K1): every reduction over any set of
    axes, after merging adjacent axes of the same kind, fits this form. Parallel over K0."""
    R0, K0, R1, K1 = x.shape
    for k0 in prange(K0):
        acc = np.zeros(K1, np.float64)
        for r0 in range(R0):
            for r1 in range(R1):
                for k1 in range(K1):
                    acc[k1] += x[r0, k0, r1, k1]
        for k1 in range(K1):
            out[k0, k1] = acc[k1] * scale


@njit(fastmath=FASTMATH, cache=True, nogil=True)
def sum4_ser(x, out, scale, acc):
    """sum4_par on one thread; acc: a float64 scratch of K1 (the caller's: an np.zeros and a slice fill
    here cost this kernel's compile 0.12-0.25 s of its 0.25-0.4 s)."""
    R0, K0, R1, K1 = x.shape
    for k0 in range(K0):
        for k1 in range(K1):
            acc[k1] = 0.0
        for r0 in range(R0):
            for r1 in range(R1):
                for k1 in range(K1):
                    acc[k1] += x[r0, k0, r1, k1]
        for k1 in range(K1):
            out[k0, k1] = acc[k1] * scale


def reduce_form(shape, axes):
    """(R0, K0, R1, K1): x.reshape(...) summed over R0 and R1 gives the kept (K0, K1); None when the
    reduced and kept axes alternate more often than that."""
    blocks = []
    for d, s in enumerate(shape):
        kind = "R" if d in axes else "K"
        if s == 1:
            continue
        if blocks and blocks[-1][0] == kind:
            blocks[-1][1] *= s
        else:
            blocks.append([kind, s])
    if blocks and blocks[0][0] == "K":
        blocks.insert(0, ["R", 1])
    if len(blocks) > 4:
        return None
    while len(blocks) < 4:
        blocks.append(["R" if len(blocks) % 2 == 0 else "K", 1])
    return tuple(s for _, s in blocks)


@njit(fastmath=FASTMATH, cache=True, nogil=True)
def sum_rows_k(a, out):
    """out[c] = sum over n of a[n, c] (float64 accumulation)."""
    N, C = a.shape
    for c in range(C):
        s = 0.0
        for n in range(N):
            s += a[n, c]
        out[c] = s


@njit(fastmath=FASTMATH, cache=True, nogil=True)
def softmax_row(z, out, i, scale):
    """out[i] = softmax(z[i]) * scale (max-subtracted; a NaN in the row makes the max, so the row, NaN
    as numpy's max does)."""
    ncls = z.shape[1]
    m = z[i, 0]
    for k in range(1, ncls):
        v = z[i, k]
        if v > m or v != v:
            m = v
    s = 0.0
    for k in range(ncls):
        e = math.exp(z[i, k] - m)
        out[i, k] = e
        s += e
    inv = scale / s
    for k in range(ncls):
        out[i, k] = out[i, k] * inv


@njit(fastmath=FASTMATH, cache=True, nogil=True)
def softmax_rows_k(x, y):
    for i in range(x.shape[0]):
        softmax_row(x, y, i, 1.0)
