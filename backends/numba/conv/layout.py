"""Work arrays, zero-padded flat planes and argument checks shared by the conv strategies.

A padded input plane of Hp x Wp is stored flat ("wide rows", see gen.py); ``place`` writes the
planes of a batch (zeros around, the image inside, optionally strided for dL/dX), ``place_t`` the
channel-major layout of the dL/dW kernels.
"""
from __future__ import annotations

import threading

import numpy as np
from numba import njit

from graphc.backends.kernel_cache import aligned_empty
from graphc.backends.numba.threads import parallel_for
from graphc.errors import BackendError

_TLS = threading.local()
_U = np.uint64


# The tags of work arrays no conv call holds at the same time share one buffer (ResNet-18 batch 16 kept
# 126 MB of work arrays, one per tag, against 54 MB pooled): "planes" holds a call's input placed in
# padded planes, "work" what it holds beside them (the per-thread im2col columns, the dL/dW kernels'
# placed dy, the direct kernels' accumulators, the Winograd transforms' V). A tag not listed has a buffer of its own.
_POOLS = {**dict.fromkeys(("fwd_x", "i2c_x", "dx_dy", "dw_x", "dw_xs", "i2c_dx", "wino_x"), "planes"),
          **dict.fromkeys(("i2c_cols", "dw_dy", "fwd_acc", "wino_v"), "work")}


def scratch(tag, shape, dtype):
    """A work array private to this module, kept per thread and reused from call to call.

    Fresh large numpy arrays come from mmap (glibc hands every allocation above its threshold
    straight back to the kernel on free), so each call would pay a page fault per 4 KiB touched --
    about 1.4 us each on this VM, milliseconds per layer.  One buffer per (pool of the tag, dtype),
    grown to the largest shape asked for and handed out as a view of its start (every caller writes
    what it reads before reading it), so the layers of a network share it instead of keeping one per
    shape. Never returned to callers; a call holds at most one array of each pool (_POOLS)."""
    bufs = getattr(_TLS, "bufs", None)
    if bufs is None:
        bufs = _TLS.bufs = {}
    dtype = np.dtype(dtype)
    shape = tuple(int(d) for d in shape)
    n = int(np.prod(shape, dtype=np.int64))
    tag = _POOLS.get(tag, tag)
    a = bufs.get((tag, dtype.str))
    if a is None or a.size < n:
        a = bufs[(tag, dtype.str)] = aligned_empty(max(n, 1), dtype)
    return a[:n].reshape(shape)


def clear_scratch() -> None:
    """Free the work arrays this thread keeps between calls."""
    _TLS.bufs = {}


_SERIAL_BELOW = 1 << 16       # elements: smaller placements run on the calling thread


def _threads(dst):
    """1 for a placement too small to share (a parallel call costs more than the copy), else None
    (Numba's thread count)."""
    return 1 if dst.size < _SERIAL_BELOW else None


@njit(cache=True, nogil=True)
def fill_plane(out, off, end, img, Hd, Wd, s, pt, pl):
    """out[off:end] = zeros with the (Hd x Wd, rows Wd wide, flat) plane at its start holding
    img[i, j] at row i*s+pt, column j*s+pl (entries falling outside are dropped).  Every element is
    written once, each row as zeros + one contiguous copy + zeros when s == 1."""
    h, w = img.shape
    if s == 1:
        j0 = -pl if pl < 0 else 0           # max(0, -pl) and min(w, Wd - pl), without the compiled
        j1 = w if w < Wd - pl else Wd - pl   # functions Numba makes of min and max (0.02 s each)
        # the copy with unsigned offsets (all >= 0 here): Numba wraps negative signed indices around, and
        # that select made it a scatter, 7x slower than numpy's (ResNet-18 b16's 64 x 56 x 56 input: 4.0
        # ms); only there (each cast is typed and compiled: 0.15 s more of a cold start with them all)
        uj0, n = _U(j0), _U(j1 - j0)
        for r in range(Hd):
            base = off + r * Wd
            i = r - pt
            if 0 <= i < h and j1 > j0:
                for q in range(base, base + j0 + pl):
                    out[q] = 0
                src = img[i]
                dst = _U(base + pl + j0)
                for j in range(n):
                    out[dst + j] = src[uj0 + j]
                for q in range(base + j1 + pl, base + Wd):
                    out[q] = 0
            else:
                for q in range(base, base + Wd):
                    out[q] = 0
    else:
        for q in range(off, off + Hd * Wd):
            out[q] = 0
        for i in range(h):
            r = i * s + pt
            if 0 <= r < Hd:
                for j in range(w):
                    col = j * s + pl
                    if 0 <= col < Wd:
                        out[off + r * Wd + col] = img[i, j]
    for q in range(off + Hd * Wd, end):
        out[q] = 0


@njit(cache=True, nogil=True)
def place_k(src, dst, Hd, Wd, s, pt, pl, lo, hi):
    """Tasks lo..hi-1 of place (task t: image t // C', channel t % C')."""
    C = src.shape[1]
    Cd = dst.shape[1]
    L = dst.shape[2]
    off = L - L                   # an int64, not the literal 0 (one compiled fill_plane for all callers)
    for t in range(lo, hi):
        n = t // Cd
        c = t - n * Cd
        plane = dst[n, c]
        if c < C:
            fill_plane(plane, off, L, src[n, c], Hd, Wd, s, pt, pl)
        else:
            for q in range(L):
                plane[q] = 0


NUMPY_BELOW = 1 << 21        # elements: a stride-1 placement smaller than this is numpy's zero fill and copy


def _numpy_place(src, planes, Hd, Wd, pt, pl):
    """planes (C or N, ..., L-strided views made by the caller) zeroed, then src's window inside."""
    h, w = src.shape[2], src.shape[3]
    i0, i1 = max(0, -pt), min(h, Hd - pt)
    j0, j1 = max(0, -pl), min(w, Wd - pl)
    if i1 > i0 and j1 > j0:
        planes[:, :, i0 + pt:i1 + pt, j0 + pl:j1 + pl] = src[:, :, i0:i1, j0:j1]


def _plane_view(dst, shape, strides):
    """A view of dst's memory (never a copy: the placement must land in dst)."""
    return np.lib.stride_tricks.as_strided(dst, shape, strides, writeable=True)


def place(src, dst, Hd, Wd, s, pt, pl):
    """dst (N, C', L): plane (n, c) becomes a zero (Hd x Wd, rows Wd wide, flat) plane followed by
    zeros up to L, with src[n, c, i, j] at row i*s+pt, column j*s+pl (entries falling outside are
    dropped).  Channels c >= src.shape[1] stay all zero.

    Stride-1 placements from _SERIAL_BELOW to NUMPY_BELOW elements are numpy's, as fast there (mnist_convnet b128's
    inputs and dL/dX's dy: 0.012 / 0.23 / 0.41 ms against place_k's 0.013 / 0.22 / 0.48 on 2 threads),
    so that a network of such layers never compiles place_k (0.4-0.5 s of CPU of a cold start); larger
    ones are place_k's on all threads (ResNet-18 b16's 64 x 56 x 56 input 0.21 ms against numpy's 0.73;
    its 128 x 28 x 28 one, under the bound, 0.37 against 0.20); smaller ones place_k's on the calling
    thread (numpy's calls cost a batch-1 mnist_convnet run 6 us more: 37 against 31)."""
    if s == 1 and _SERIAL_BELOW <= dst.size < NUMPY_BELOW and dst.flags.c_contiguous and dst.dtype == src.dtype:
        N, Cd, L = dst.shape
        dst[...] = 0
        isz = dst.itemsize
        _numpy_place(src, _plane_view(dst, (N, src.shape[1], Hd, Wd), (Cd * L * isz, L * isz, Wd * isz, isz)),
                     Hd, Wd, pt, pl)
        return
    ntasks = src.shape[0] * dst.shape[1]
    if _threads(dst) == 1:          # (directly: a batch-1 MNIST layer's input, 1 us of the 7 of its call)
        place_k(src, dst, Hd, Wd, s, pt, pl, 0, ntasks)
    else:
        parallel_for(lambda lo, hi, k: place_k(src, dst, Hd, Wd, s, pt, pl, lo, hi), ntasks)


def place_rows(src, dst, rows, Hd, Wd, s, pt, pl):
    """place for a filter run with its rows as channels: plane c*rows + kh of dst is src's channel c placed
    as by place but moved up kh rows (Hd rows kept)."""
    for kh in range(rows):
        place(src, dst[:, kh::rows], Hd, Wd, s, pt - kh, pl)


@njit(cache=True, nogil=True)
def place_t_k(src, dst, Hd, Wd, L, pt, pl, lo, hi):
    """Tasks lo..hi-1 of place_t (task t: channel t // N, image t % N)."""
    N, C = src.shape[0], src.shape[1]
    tot = dst.shape[1]
    s = L // L                    # an int64 1 (see place_k)
    for t in range(lo, hi):
        c = t // N
        n = t - c * N
        row = dst[c]
        end = (n + 1) * L if n < N - 1 else tot
        if c < C:
            fill_plane(row, n * L, end, src[n, c], Hd, Wd, s, pt, pl)
        else:
            for q in range(n * L, end):
                row[q] = 0


def place_t(src, dst, Hd, Wd, L, pt, pl):
    """Channel-major placement for the dL/dW kernels: dst (C', N*L + tail); the (Hd x Wd) plane of
    image n, channel c starts at dst[c, n*L] and holds src[n, c, i, j] at row i+pt, column j+pl;
    everything else (borders, the rest of L, the tail, channels c >= src.shape[1]) is zero. From
    _SERIAL_BELOW to NUMPY_BELOW elements numpy's zero fill and copy, as place (mnist_convnet b128's dy 0.18 ms against
    place_t_k's 0.34)."""
    if _SERIAL_BELOW <= dst.size < NUMPY_BELOW and dst.flags.c_contiguous and dst.dtype == src.dtype:
        dst[...] = 0
        isz = dst.itemsize
        N, C = src.shape[0], src.shape[1]
        planes = _plane_view(dst, (N, C, Hd, Wd), (L * isz, dst.shape[1] * isz, Wd * isz, isz))
        _numpy_place(src, planes, Hd, Wd, pt, pl)
        return
    parallel_for(lambda lo, hi, k: place_t_k(src, dst, Hd, Wd, L, pt, pl, lo, hi), dst.shape[0] * src.shape[0],
                 _threads(dst))


@njit(cache=True, nogil=True)
def shift_copies_k(src, dst, Hp, Wo, pt, pl, dw, lo, hi):
    """Tasks lo..hi-1 of shift_copies (task t: image t // C, channel t % C)."""
    N, C, h, w = src.shape
    KW = dst.shape[2]
    for t in range(lo, hi):
        n = t // C
        c = t - n * C
        for kw in range(KW):
            plane = dst[n, c, kw]
            for r in range(Hp):
                i = r - pt
                for j in range(Wo):
                    jj = j + kw * dw - pl
                    if 0 <= i < h and 0 <= jj < w:
                        plane[r * Wo + j] = src[n, c, i, jj]
                    else:
                        plane[r * Wo + j] = 0


def shift_copies(src, dst, Hp, Wo, pt, pl, dw=1):
    """dst (N, C, KW, Hp*Wo): dst[n, c, kw, r*Wo + j] = xpad[n, c, r, j + kw*dw] where xpad is src
    zero-padded by pt rows on top and pl columns on the left (and zeros beyond its end); dw: the
    filter's column dilation."""
    parallel_for(lambda lo, hi, k: shift_copies_k(src, dst, Hp, Wo, pt, pl, dw, lo, hi),
                 src.shape[0] * src.shape[1], _threads(dst))


@njit(cache=True, nogil=True)
def clip_k(y, lo, hi, a, b):
    """y[a:b] clamped to [lo, hi] in place; NaN passes through (as the clip op)."""
    lo_, hi_ = y.dtype.type(lo), y.dtype.type(hi)
    for i in range(a, b):
        v = y[i]
        v = lo_ if v < lo_ else v
        y[i] = hi_ if v > hi_ else v


def clip_inplace(y, lo, hi):
    """y (flat) clamped to [lo, hi] in place (chunks of 4096 elements as tasks)."""
    n = y.shape[0]
    parallel_for(lambda a, b, k: clip_k(y, lo, hi, a * 4096, min(n, b * 4096)), -(-n // 4096), _threads(y))


def float_array(a, name):
    a = np.asarray(a)
    if a.dtype not in (np.float32, np.float64):
        raise BackendError(f"{name}: numba conv kernels take float32 or float64, got {a.dtype}")
    return np.ascontiguousarray(a)


def check_out(out, shape, dtype, what, inputs=()):
    """``out`` (None, or the array a conv function is to write its result into: the executor passes the
    value's planned buffer), checked: C-contiguous, writeable, of this shape and dtype, and apart from
    the inputs (the kernels write parts of the result before they have read all of them)."""
    if out is None:
        return None
    if not isinstance(out, np.ndarray) or out.shape != tuple(shape) or out.dtype != dtype \
            or not out.flags.c_contiguous or not out.flags.writeable:
        got = type(out).__name__ if not isinstance(out, np.ndarray) else \
            f"{out.dtype} {out.shape}" + ("" if out.flags.c_contiguous else ", not C-contiguous") \
            + ("" if out.flags.writeable else ", read-only")
        raise BackendError(f"{what}: out= must be a writeable C-contiguous {np.dtype(dtype)} array of shape "
                           f"{tuple(shape)}, got {got}")
    if any(a is not None and np.may_share_memory(out, a) for a in inputs):
        raise BackendError(f"{what}: out= overlaps an input; pass a separate array")
    return out


def new_or(out, shape, dtype):
    """out, or a new array (a conv function's result)."""
    return np.empty(shape, dtype) if out is None else out


_SUM_CHUNK = 1 << 17          # elements of float64 partial sums made at a time (1 MB)


def sum_partials(part, out):
    """out (K, ...) = the sum over part's first axis of part[:, :K] (part (P, K' >= K, ...)), summed in
    float64 and rounded once, so the result does not depend on how many partial sums there were; a
    few rows at a time, so the float64 temporary stays small (a whole one was as large as dL/dW twice)."""
    P, K = part.shape[0], out.shape[0]
    o = out.reshape(K, -1)
    p = part.reshape(P, part.shape[1], -1)
    if P == 1:
        o[...] = p[0, :K]
        return out
    rows = max(1, _SUM_CHUNK // max(1, o.shape[1]))
    for k0 in range(0, K, rows):
        k1 = min(K, k0 + rows)
        o[k0:k1] = p[:, k0:k1].sum(axis=0, dtype=np.float64)
    return out


def dilation_pair(d):
    """An int or an (dh, dw) pair of filter dilations, checked."""
    dh, dw = (int(d), int(d)) if np.ndim(d) == 0 else (int(d[0]), int(d[1]))
    if dh < 1 or dw < 1:
        raise BackendError(f"conv2d: dilation must be >= 1, got {d}")
    return dh, dw


def check_groups(C, w_shape, groups):
    groups = int(groups)
    if groups < 1 or C % groups or w_shape[0] % groups or w_shape[1] * groups != C:
        raise BackendError(f"conv2d: x has {C} channels but w {tuple(w_shape)} with groups={groups} expects "
                           f"{w_shape[1] * groups} (and groups must divide the {w_shape[0]} filters)")
    return groups


def check_conv(x, w, b, stride, pads, dilation=(1, 1), groups=1):
    x = float_array(x, "x")
    w = np.ascontiguousarray(np.asarray(w, dtype=x.dtype))
    if x.ndim != 4 or w.ndim != 4:
        raise BackendError(f"conv2d wants x (N,C,H,W) and w (K,C,KH,KW), got {x.shape} and {w.shape}")
    check_groups(x.shape[1], w.shape, groups)
    if b is not None:
        b = np.ascontiguousarray(np.asarray(b, dtype=x.dtype).reshape(-1))
        if b.shape[0] != w.shape[0]:
            raise BackendError(f"conv2d: bias has {b.shape[0]} entries for {w.shape[0]} filters")
    stride, pads = check_geometry(x.shape, w.shape, stride, pads, dilation)
    return x, w, b, stride, pads


def check_geometry(x_shape, w_shape, stride, pads, dilation=(1, 1)):
    stride = int(stride)
    if stride < 1:
        raise BackendError(f"conv2d: stride must be >= 1, got {stride}")
    pads = tuple(int(p) for p in pads)
    if len(pads) != 4 or min(pads) < 0:
        raise BackendError(f"conv2d: pads must be (top, bottom, left, right) >= 0, got {pads}")
    _, _, H, W = x_shape
    _, _, KH, KW = w_shape
    dh, dw = dilation_pair(dilation)
    KH, KW = (KH - 1) * dh + 1, (KW - 1) * dw + 1                 # the dilated filter's extent
    if H + pads[0] + pads[1] < KH or W + pads[2] + pads[3] < KW:
        raise BackendError(f"conv2d: filter {KH}x{KW} larger than the padded input "
                           f"{H + pads[0] + pads[1]}x{W + pads[2] + pads[3]}")
    return stride, pads


def out_hw(H, W, KH, KW, stride, pads):
    top, bottom, left, right = pads
    return (H + top + bottom - KH) // stride + 1, (W + left + right - KW) // stride + 1


def pool_hw(H, W, size, stride, what="pool"):
    size, stride = int(size), int(stride)
    if size < 1 or stride < 1:
        raise BackendError(f"{what}: size and stride must be >= 1, got {size}, {stride}")
    if H < size or W < size:
        raise BackendError(f"{what}: window {size} larger than the {H}x{W} input")
    return (H - size) // stride + 1, (W - size) // stride + 1

