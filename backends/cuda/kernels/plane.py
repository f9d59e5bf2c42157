"""Kernels over whole (n, c) planes: global max pool (one thread per plane; NaN propagates, as the
reference), and reflect/edge padding by row/column index maps with its transpose, the crop that folds
the border back (each output pixel gathers the padded pixels copied from it: deterministic, no atomics,
rows summed first as the reference)."""
from __future__ import annotations

import numpy as np

from graphc.backends.cuda.kernels.device import factory, launch1d, load_cuda

cuda = None                     # numba.cuda (bound by device.kernel)


@factory("global_max", "fa, fa, i64, i64")
def _mk_global_max(nbt):
    def global_max(x, y, NC, P):
        start = cuda.grid(1)
        step = cuda.gridsize(1)
        for t in range(start, NC, step):
            base = t * P
            best = x[base]
            for p in range(1, P):
                v = x[base + p]
                if v > best or v != v:
                    best = v
            y[t] = best
    return global_max


@factory("gather2d", "fa, la, la, fa, i64, i64, i64, i64, i64")
def _mk_gather2d(nbt):
    """out[nc, p, q] = x[nc, rows[p], cols[q]]."""
    def gather2d(x, rows, cols, out, n, H, W, Hp, Wp):
        start = cuda.grid(1)
        step = cuda.gridsize(1)
        for i in range(start, n, step):
            q = i % Wp
            t = i // Wp
            p = t % Hp
            nc = t // Hp
            out[i] = x[(nc * H + rows[p]) * W + cols[q]]
    return gather2d


@factory("fold2d", "fa, la, la, la, la, fa, i64, i64, i64, i64, i64")
def _mk_fold2d(nbt):
    """dx[nc, i, j] = sum over the padded rows p copied from row i (row_ptr/row_src, CSR) and the padded
    columns q copied from column j of dy[nc, p, q]."""
    def fold2d(dy, row_ptr, row_src, col_ptr, col_src, dx, n, H, W, Hp, Wp):
        start = cuda.grid(1)
        step = cuda.gridsize(1)
        for i in range(start, n, step):
            j = i % W
            t = i // W
            r = t % H
            nc = t // H
            acc = nbt(0)
            for b in range(col_ptr[j], col_ptr[j + 1]):
                q = col_src[b]
                part = nbt(0)
                for a in range(row_ptr[r], row_ptr[r + 1]):
                    part += dy[(nc * Hp + row_src[a]) * Wp + q]
                acc += part
            dx[i] = acc
    return fold2d


def global_max_step(x, y, nchw):
    N, C, H, W = nchw
    return launch1d("global_max", np.dtype(y.dtype), N * C, x, y, N * C, H * W)


def _inverse(src, n):
    """CSR (ptr, idx) of the padded positions copied from each of the n source positions, in order."""
    order = np.argsort(src, kind="stable")
    ptr = np.searchsorted(src[order], np.arange(n + 1))
    return ptr.astype(np.int64), order.astype(np.int64)


def pad_step(x, out, nchw, rows, cols):
    """out = x padded by the index maps rows (Hp,) and cols (Wp,) (reflect/edge); flat arrays."""
    N, C, H, W = nchw
    c = load_cuda()
    r, q = c.to_device(np.ascontiguousarray(rows, np.int64)), c.to_device(np.ascontiguousarray(cols, np.int64))
    n = N * C * rows.size * cols.size
    return launch1d("gather2d", np.dtype(out.dtype), n, x, r, q, out, n, H, W, rows.size, cols.size)


def fold_step(dy, dx, nchw, rows, cols):
    """dx (N, C, H, W) = the transpose of pad_step: each padded pixel added back onto its source."""
    N, C, H, W = nchw
    c = load_cuda()
    (rp, ri), (cp, ci) = _inverse(np.asarray(rows), H), _inverse(np.asarray(cols), W)
    rp, ri, cp, ci = (c.to_device(a) for a in (rp, ri, cp, ci))
    n = N * C * H * W
    return launch1d("fold2d", np.dtype(dx.dtype), n, dy, rp, ri, cp, ci, dx, n, H, W, rows.size, cols.size)
