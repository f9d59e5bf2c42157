"""Sums over any axes, deterministic (no atomics): one block per kept element (split over the reduced
range when there are few kept elements, finished by a second pass), or a (32 columns x 8) block tree
when the reduced axes are the middle ones. They accumulate in float64, as the reference (and the numba
kernels): a float32 partial sum overflows to inf where the sum itself is representable; the sums are
memory-bound, so the wider adds cost nothing that shows."""
from __future__ import annotations

import numpy as np
from numba import float64

from graphc.backends.cuda.kernels.copy import copy_step
from graphc.backends.cuda.kernels.device import (alloc_flat, cdiv, empty, factory, fdtype, fill_step, flat, kernel,
                                                 launcher, p2, seq, sm_count)
from graphc.errors import BackendError

cuda = None                     # numba.cuda (bound by device.kernel)
RED_BLOCK = 256                 # threads of a keep-middle reduction block at most


@factory("reduce_keep_mid", "fa, fa, i64, i64, i64, i64, f")
def _mk_reduce_keep_mid(nbt):
    """x viewed as (A, B, C): out[s, b] = scale * sum over (a, c) in slice s of x[a, b, c].
    1-D blocks of a power-of-two size <= RED_BLOCK (sized to the work by the launcher)."""
    def reduce_keep_mid(x, out, A, B, C, S, scale):
        sm = cuda.shared.array(RED_BLOCK, float64)
        t = cuda.threadIdx.x
        nt = cuda.blockDim.x
        s = cuda.blockIdx.y
        AC = A * C
        chunk = (AC + S - 1) // S
        lo = s * chunk
        hi = lo + chunk
        if hi > AC:
            hi = AC
        for b in range(cuda.blockIdx.x, B, cuda.gridDim.x):
            acc = float64(0)
            for e in range(lo + t, hi, nt):
                a = e // C
                acc += x[(a * B + b) * C + (e - a * C)]
            sm[t] = acc
            cuda.syncthreads()
            h = nt // 2
            while h > 0:
                if t < h:
                    sm[t] += sm[t + h]
                cuda.syncthreads()
                h //= 2
            if t == 0:
                out[s * B + b] = sm[0] * scale
            cuda.syncthreads()
    return reduce_keep_mid


@factory("reduce_mid", "fa, fa, i64, i64, i64, f")
def _mk_reduce_mid(nbt):
    """x viewed as (A, B, C): out[a, c] = scale * sum_b x[a, b, c]; block = (<=32 columns) x (<=8 b-lanes)."""
    def reduce_mid(x, out, A, B, C, scale):
        sm = cuda.shared.array((8, 33), float64)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        bdy = cuda.blockDim.y
        c = cuda.blockIdx.x * cuda.blockDim.x + tx
        for a in range(cuda.blockIdx.y, A, cuda.gridDim.y):
            acc = float64(0)
            if c < C:
                for b in range(ty, B, bdy):
                    acc += x[(a * B + b) * C + c]
            sm[ty, tx] = acc
            cuda.syncthreads()
            if ty == 0 and c < C:
                s = sm[0, tx]
                for j in range(1, bdy):
                    s += sm[j, tx]
                out[a * C + c] = s * scale
            cuda.syncthreads()
    return reduce_mid


def sum_mid_step(x, A, B, C, scale, out):
    """out (A, C) = scale * x (A, B, C) summed over B."""
    dt = np.dtype(out.dtype)
    if B == 0:
        return fill_step(out, 0)
    bx, by = p2(C, 32), p2(B, 8)
    return launcher(kernel("reduce_mid", dt), (cdiv(C, bx), max(1, min(A, 65535))), (bx, by), x, out, A, B, C,
                    dt.type(scale))


def sum_outer_step(x, A, B, C, scale, out, scratch):
    """out (B,) = scale * x (A, B, C) summed over A and C (split over the reduced range when B is small)."""
    if C == 1:
        return sum_mid_step(x, 1, A, B, scale, out)
    dt = np.dtype(out.dtype)
    AC = A * C
    S = 1
    target = 4 * sm_count()
    if B < target:
        S = max(1, min(cdiv(target, B), cdiv(AC, 8 * RED_BLOCK), 65535))
    k = kernel("reduce_keep_mid", dt)
    block = max(32, p2(cdiv(AC, S), RED_BLOCK))
    grid = (max(1, min(B, 1 << 20)), S)
    if S == 1:
        return launcher(k, grid, block, x, out, A, B, C, S, dt.type(scale))
    part = scratch(S * B, np.float64)          # the partial sums stay float64 between the passes
    return seq([launcher(k, grid, block, x, part, A, B, C, S, dt.type(1.0)), sum_mid_step(part, 1, S, B, scale, out)])


def sum_step(x, shape, axes, scale, out, scratch):
    """out = scale * x (flat, of `shape`) summed over `axes`; scratch(n, dtype) allocates work arrays."""
    shape = tuple(int(s) for s in shape)
    nd = len(shape)
    red = sorted({a % nd for a in axes}) if nd else []
    if not red:
        return copy_step(x, out, [int(np.prod(shape, dtype=np.int64))], [1], [1], scale=scale)
    kept = [i for i in range(nd) if i not in red]

    def prod(seq_):
        return int(np.prod([shape[i] for i in seq_], dtype=np.int64))
    if not kept:
        return sum_outer_step(x, 1, 1, prod(range(nd)), scale, out, scratch)
    if kept == list(range(kept[0], kept[-1] + 1)):      # kept axes contiguous: (A, B=kept, C)
        return sum_outer_step(x, prod(range(kept[0])), prod(kept), prod(range(kept[-1] + 1, nd)), scale, out, scratch)
    if red == list(range(red[0], red[-1] + 1)):         # reduced axes contiguous: (A, B=reduced, C)
        return sum_mid_step(x, prod(range(red[0])), prod(red), prod(range(red[-1] + 1, nd)), scale, out)
    # general: reduce the last run of reduced axes first, then the rest
    last = [red[-1]]
    while last[0] - 1 in red:
        last.insert(0, last[0] - 1)
    new_shape = tuple(s for i, s in enumerate(shape) if i not in last)
    part = scratch(int(np.prod(new_shape, dtype=np.int64)), np.float64)
    first = sum_mid_step(x, prod(range(last[0])), prod(last), prod(range(last[-1] + 1, nd)), 1.0, part)
    return seq([first, sum_step(part, new_shape, [a for a in red if a < last[0]], scale, out, scratch)])


def reduce_sum(x, axes=None, keepdims=False, scale=1.0):
    """Sum over ``axes`` (None: all); any axis set works, e.g. all, (0,) of 2-D, (0, 2, 3) of 4-D.
    Also available as ``sum`` (left out of ``__all__`` so that ``import *`` does not shadow the builtin).

    ``scale`` multiplies the result (``scale=1/n`` gives a mean). All axes give a 0-d device array.
    Deterministic (no atomics): per-block tree reductions, then a second pass when the work was split.
    """
    dt = fdtype(x)
    shape = tuple(int(s) for s in x.shape)
    nd = len(shape)
    if axes is None:
        axes = tuple(range(nd))
    elif isinstance(axes, (int, np.integer)):
        axes = (int(axes),)
    for a in axes:
        if not -nd <= a < nd:
            raise BackendError(f"sum: axis {a} out of range for shape {shape}")
    red = {a % nd for a in axes} if nd else set()
    kept_shape = tuple(s for i, s in enumerate(shape) if i not in red)
    final_shape = tuple(1 if i in red else s for i, s in enumerate(shape)) if keepdims else kept_shape
    out = empty((max(int(np.prod(kept_shape, dtype=np.int64)), 1),), dt)
    sum_step(flat(x), shape, tuple(red), scale, out, alloc_flat)()
    return out.reshape(final_shape) if final_shape else out.reshape(())


sum = reduce_sum  # noqa: A001


def conv2d_db(dy):
    """dL/db (K,) = sum of dy over (N, H, W)."""
    return reduce_sum(dy, axes=(0, 2, 3))
