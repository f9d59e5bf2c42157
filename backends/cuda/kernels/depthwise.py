"""Depthwise convolution (groups == C, K = M * C filters, M per input channel): memory-bound stencils, not
GEMMs (a 3x3 depthwise layer does 18 flops per output element).

- forward: one thread per output element (1-D grid-stride, consecutive threads along output rows, so
  reads and writes coalesce), the taps of its channel's filter, bias, then a clip to [lo, hi] (ReLU:
  [0, inf), ReLU6: [0, 6]);
- dL/dX: one thread per input element, the transposed stencil: the taps whose output position lands on
  the stride grid, summed over the M filters of the channel;
- dL/dW: per-channel reductions: block (k, s) walks slice s of filter k's N*Ho*Wo output positions,
  each thread keeping a partial sum per tap, then a shared-memory tree per tap; with several slices the
  partial sums (S, K*KH*KW) are summed by reduce.py's deterministic column sum (no atomics).
"""
from __future__ import annotations

import numpy as np

from graphc.backends.cuda.kernels.device import (alloc_flat, cdiv, check_shape, dummy, empty, factory, fdtype, flat,
                                                 kernel, launch1d, launcher, p2, seq, sm_count)
from graphc.backends.cuda.kernels.gemm import conv_geometry
from graphc.backends.cuda.kernels.reduce import sum_mid_step
from graphc.errors import BackendError

cuda = None                     # numba.cuda (bound by device.kernel)
DW_BLOCK = 256                  # threads of a dL/dW reduction block at most
DW_MAXT = 49                    # filter taps per thread's partial sums at most (7x7)
DIMS = "i64*15"                 # N, C, H, W, M, KH, KW, Ho, Wo, sh, sw, pt, pl, dh, dw


@factory("dw_conv_fwd", f"fa, fa, fa, fa, {DIMS}, i64, f, f")
def _mk_dw_fwd(nbt):
    def dw_conv_fwd(x, w, b, y, N, C, H, W, M, KH, KW, Ho, Wo, sh, sw, pt, pl, dh, dw, has_bias, lo, hi):
        start = cuda.grid(1)
        step = cuda.gridsize(1)
        K = C * M
        T = KH * KW
        for o in range(start, N * K * Ho * Wo, step):
            ow = o % Wo
            q = o // Wo
            oh = q % Ho
            nk = q // Ho
            k = nk % K
            n = nk // K
            xb = (n * C + k // M) * H
            wb = k * T
            s = nbt(0)
            for kh in range(KH):
                ih = oh * sh - pt + kh * dh
                if ih >= 0 and ih < H:
                    xr = (xb + ih) * W
                    for kw in range(KW):
                        iw = ow * sw - pl + kw * dw
                        if iw >= 0 and iw < W:
                            s += x[xr + iw] * w[wb + kh * KW + kw]
            if has_bias != 0:
                s += b[k]
            if s < lo:
                s = lo
            if s > hi:
                s = hi
            y[o] = s
    return dw_conv_fwd


@factory("dw_conv_dx", f"fa, fa, fa, {DIMS}")
def _mk_dw_dx(nbt):
    def dw_conv_dx(dy, w, dx, N, C, H, W, M, KH, KW, Ho, Wo, sh, sw, pt, pl, dh, dw):
        start = cuda.grid(1)
        step = cuda.gridsize(1)
        K = C * M
        T = KH * KW
        for o in range(start, N * C * H * W, step):
            iw = o % W
            q = o // W
            ih = q % H
            nc = q // H
            c = nc % C
            n = nc // C
            s = nbt(0)
            for m in range(M):
                k = c * M + m
                db = (n * K + k) * Ho
                wb = k * T
                for kh in range(KH):
                    th = ih + pt - kh * dh
                    if th >= 0:
                        oh = th // sh
                        if oh * sh == th and oh < Ho:
                            for kw in range(KW):
                                tw = iw + pl - kw * dw
                                if tw >= 0:
                                    ow = tw // sw
                                    if ow * sw == tw and ow < Wo:
                                        s += dy[(db + oh) * Wo + ow] * w[wb + kh * KW + kw]
            dx[o] = s
    return dw_conv_dx


@factory("dw_conv_dw", f"fa, fa, fa, {DIMS}, i64")
def _mk_dw_dw(nbt):
    def dw_conv_dw(x, dy, part, N, C, H, W, M, KH, KW, Ho, Wo, sh, sw, pt, pl, dh, dw, S):
        acc = cuda.local.array(DW_MAXT, nbt)
        sm = cuda.shared.array(DW_BLOCK, nbt)
        t = cuda.threadIdx.x
        nt = cuda.blockDim.x
        K = C * M
        T = KH * KW
        R = N * Ho * Wo
        chunk = (R + S - 1) // S
        s = cuda.blockIdx.y
        lo = s * chunk
        hi = lo + chunk
        if hi > R:
            hi = R
        for k in range(cuda.blockIdx.x, K, cuda.gridDim.x):
            c = k // M
            for q in range(T):
                acc[q] = nbt(0)
            for e in range(lo + t, hi, nt):
                ow = e % Wo
                r = e // Wo
                oh = r % Ho
                n = r // Ho
                g = dy[((n * K + k) * Ho + oh) * Wo + ow]
                xb = (n * C + c) * H
                for kh in range(KH):
                    ih = oh * sh - pt + kh * dh
                    if ih >= 0 and ih < H:
                        for kw in range(KW):
                            iw = ow * sw - pl + kw * dw
                            if iw >= 0 and iw < W:
                                acc[kh * KW + kw] += g * x[(xb + ih) * W + iw]
            for q in range(T):
                sm[t] = acc[q]
                cuda.syncthreads()
                h = nt // 2
                while h > 0:
                    if t < h:
                        sm[t] += sm[t + h]
                    cuda.syncthreads()
                    h //= 2
                if t == 0:
                    part[(s * K + k) * T + q] = sm[0]
                cuda.syncthreads()
    return dw_conv_dw


# ============================================================================================ steps

def depthwise_geometry(x_shape, w_shape, stride, pads, dilation):
    """(N, C, H, W, M, KH, KW, Ho, Wo, sh, sw, pt, pl, dh, dw) of a depthwise conv (w: (M * C, 1, KH, KW))."""
    C = int(x_shape[1])
    g = conv_geometry(x_shape, w_shape, stride, pads, dilation, C)
    N, C, H, W, K, KH, KW, Ho, Wo, sh, sw, pt, pl, dh, dw, _ = g
    return N, C, H, W, K // C, KH, KW, Ho, Wo, sh, sw, pt, pl, dh, dw


def dw_forward_step(x, w, bias, y, geom, clip=None):
    """y = clip(depthwise conv(x, w) + bias) on flat arrays; clip = (lo, hi) (None on a side: unbounded)."""
    dt = np.dtype(y.dtype)
    lo, hi = clip if clip is not None else (None, None)
    lo = -np.inf if lo is None else lo
    hi = np.inf if hi is None else hi
    n = int(y.size)
    return launch1d("dw_conv_fwd", dt, n, x, w, dummy(dt) if bias is None else bias, y, *geom,
                    int(bias is not None), dt.type(lo), dt.type(hi))


def dw_dx_step(dy, w, dx, geom):
    """dx = dL/dX of the depthwise conv on flat arrays."""
    return launch1d("dw_conv_dx", np.dtype(dx.dtype), int(dx.size), dy, w, dx, *geom)


def dw_dw_step(x, dy, dw, geom, scratch):
    """dw = dL/dW of the depthwise conv on flat arrays; scratch(n, dtype) allocates the partial sums."""
    N, C, H, W, M, KH, KW, Ho, Wo = geom[:9]
    K, T, R = C * M, KH * KW, N * Ho * Wo
    if T > DW_MAXT:
        raise BackendError(f"depthwise dL/dW: {KH}x{KW} filters have more than {DW_MAXT} taps")
    dt = np.dtype(dw.dtype)
    S = max(1, min(cdiv(4 * sm_count(), K), cdiv(R, 8 * DW_BLOCK), 65535))
    block = max(32, p2(cdiv(R, S), DW_BLOCK))
    grid = (max(1, min(K, 1 << 20)), S)
    k = kernel("dw_conv_dw", dt)
    if S == 1:
        return launcher(k, grid, block, x, dy, dw, *geom, S)
    part = scratch(S * K * T, dt)
    return seq([launcher(k, grid, block, x, dy, part, *geom, S), sum_mid_step(part, 1, S, K * T, 1.0, dw)])


# ============================================================================================ public API

def depthwise_conv2d(x, w, b=None, stride=1, pads=0, dilation=1, clip=None):
    """y (N, M*C, Ho, Wo) = clip(depthwise conv(x, w) + b); w (M*C, 1, KH, KW), groups = C."""
    check_shape(x, 4, "depthwise_conv2d x")
    check_shape(w, 4, "depthwise_conv2d w")
    dt = fdtype(x, w, b)
    g = depthwise_geometry(x.shape, w.shape, stride, pads, dilation)
    y = empty((g[0], g[1] * g[4], g[7], g[8]), dt)
    dw_forward_step(flat(x), flat(w), None if b is None else flat(b), flat(y), g, clip)()
    return y


def depthwise_conv2d_dx(dy, w, stride, pads, in_hw, dilation=1, channels=None):
    """dL/dx (N, C, H, W) of the depthwise conv; C = channels (default: one filter per channel, C = K)."""
    check_shape(dy, 4, "depthwise_conv2d_dx dy")
    dt = fdtype(dy, w)
    N, K = int(dy.shape[0]), int(w.shape[0])
    C = K if channels is None else int(channels)
    g = depthwise_geometry((N, C) + tuple(int(v) for v in in_hw), w.shape, stride, pads, dilation)
    if tuple(dy.shape) != (N, K, g[7], g[8]):
        raise BackendError(f"depthwise_conv2d_dx: dy {tuple(dy.shape)} does not fit w {tuple(w.shape)}")
    dx = empty((N, C) + tuple(int(v) for v in in_hw), dt)
    dw_dx_step(flat(dy), flat(w), flat(dx), g)()
    return dx


def depthwise_conv2d_dw(x, dy, stride, pads, k_hw, dilation=1):
    """dL/dw (M*C, 1, KH, KW) of the depthwise conv."""
    check_shape(x, 4, "depthwise_conv2d_dw x")
    dt = fdtype(x, dy)
    K = int(dy.shape[1])
    g = depthwise_geometry(x.shape, (K, 1) + tuple(int(v) for v in k_hw), stride, pads, dilation)
    dw = empty((K, 1) + tuple(int(v) for v in k_hw), dt)
    dw_dw_step(flat(x), flat(dy), flat(dw), g, alloc_flat)()
    return dw
