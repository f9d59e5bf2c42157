"""Strided copies: data movement (transpose, concat, slice, pad, crop) and broadcasts, up to 6-D."""
from __future__ import annotations

import numpy as np

from graphc.backends.cuda.kernels.device import factory, launch1d, nothing

cuda = None                     # numba.cuda (bound by device.kernel)
MAX_COPY_RANK = 6


def _mk_copy(scaled):
    """dst[dbase + sum c_d*b_d] = src[sbase + sum c_d*a_d] (* scale) over a <= 6-D index space."""
    def make(nbt):
        def copy_k(src, dst, n, s0, s1, s2, s3, s4, s5, a0, a1, a2, a3, a4, a5,
                   b0, b1, b2, b3, b4, b5, sbase, dbase, scale):
            start = cuda.grid(1)
            step = cuda.gridsize(1)
            for i in range(start, n, step):
                q = i
                c5 = q % s5
                q = q // s5
                c4 = q % s4
                q = q // s4
                c3 = q % s3
                q = q // s3
                c2 = q % s2
                q = q // s2
                c1 = q % s1
                c0 = q // s1
                si = sbase + c0 * a0 + c1 * a1 + c2 * a2 + c3 * a3 + c4 * a4 + c5 * a5
                di = dbase + c0 * b0 + c1 * b1 + c2 * b2 + c3 * b3 + c4 * b4 + c5 * b5
                if scaled:
                    dst[di] = src[si] * scale
                else:
                    dst[di] = src[si]
        return copy_k
    return make


factory("copy", "fa, fa, i64*21, f")(_mk_copy(False))
factory("copy_scaled", "fa, fa, i64*21, f")(_mk_copy(True))


def cstrides(shape):
    """Element strides of a C-contiguous array of `shape`."""
    st, acc = [], 1
    for d in reversed(shape):
        st.append(acc)
        acc *= d
    return list(reversed(st))


def broadcast_strides(src_shape, out_shape):
    """Element strides of a contiguous `src_shape` read as broadcast to `out_shape` (0 on broadcast dims)."""
    nd = len(out_shape)
    s = (1,) * (nd - len(src_shape)) + tuple(src_shape)
    st = cstrides(s)
    return [0 if (s[d] == 1 and out_shape[d] != 1) else st[d] for d in range(nd)]


def copy_step(src, dst, space, sstr, dstr, sbase=0, dbase=0, scale=None):
    """A strided copy over the index space `space` (<= 6-D) of flat arrays; None when the rank is higher."""
    space = [int(s) for s in space]
    if len(space) > MAX_COPY_RANK:
        return None
    pad = MAX_COPY_RANK - len(space)
    n = int(np.prod(space, dtype=np.int64))
    if n == 0:
        return nothing
    dt = np.dtype(dst.dtype)
    return launch1d("copy" if scale is None else "copy_scaled", dt, n, src, dst, n, *([1] * pad + space),
                    *([0] * pad + [int(v) for v in sstr]), *([0] * pad + [int(v) for v in dstr]), int(sbase),
                    int(dbase), dt.type(1 if scale is None else scale))
