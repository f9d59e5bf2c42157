"""Pooling kernels: max pool (with its route), the route scatter and gather, average pool and its
gradient. 1-D grid-stride loops (consecutive threads touch consecutive outputs).

NaN follows numpy: a window holding NaN has max NaN and routes to its first NaN (np.argmax). A route r
< 0 is ~i (= -1 - i) for a window a ReLU masked: the scatter adds dy * 0 at i (0, or NaN where dy is not
finite, as the unfused maxpool_route * gt). Routes are only ever values these kernels (or the fused
conv-pool kernel) computed, window positions inside the plane (route_scatter refuses any other route at
definition); the scatter checks the bound anyway."""
from __future__ import annotations

import math

import numpy as np

from graphc.backends.cuda.kernels.device import (check_shape, dummy, empty, factory, fdtype, fill_step, flat,
                                                 launch1d, pair, seq)
from graphc.errors import BackendError

cuda = None                     # numba.cuda (bound by device.kernel)


@factory("maxpool", "fa, fa, ia, i64*12")
def _mk_maxpool(nbt):
    def maxpool(x, y, route, NC, H, W, Ho, Wo, PH, PW, sh, sw, TH, TW, save_route):
        # TH, TW: -inf padding above and left of x (the pad_maxpool pattern; 0 otherwise): a window's taps
        # outside x are padding, which never wins, so they are skipped
        start = cuda.grid(1)
        step = cuda.gridsize(1)
        for o in range(start, NC * Ho * Wo, step):
            ow = o % Wo
            q = o // Wo
            oh = q % Ho
            nc = q // Ho
            base = nc * H * W
            h0 = oh * sh - TH
            w0 = ow * sw - TW
            bi = -1
            best = x[base]
            # (conditional expressions: numba.cuda's min/max builtins need a device to compile to PTX)
            for i in range(0 if h0 >= 0 else -h0, PH if h0 + PH <= H else H - h0):
                for j in range(0 if w0 >= 0 else -w0, PW if w0 + PW <= W else W - w0):
                    idx = (h0 + i) * W + w0 + j
                    v = x[base + idx]
                    if bi < 0 or v > best or (v != v and best == best):
                        best = v
                        bi = idx
            if bi < 0:
                y[o] = -math.inf           # (a window wholly in the padding; no route is saved with padding)
            else:
                y[o] = best
            if save_route != 0:
                route[o] = bi
    return maxpool


@factory("route_scatter", "fa, ia, fa, i64, i64, i64")
def _mk_route_scatter(nbt):
    """dz[nc, route[o]] += dy[o] for every pooled output o, dy[o] * 0 at -1 - route[o] where the route
    is < 0 (atomic: windows overlap)."""
    def route_scatter(dy, route, dz, NC, HpWp, HW):
        start = cuda.grid(1)
        step = cuda.gridsize(1)
        for o in range(start, NC * HpWp, step):
            r = route[o]
            v = dy[o]
            if r < 0:
                r = -1 - r
                v = v * nbt(0)
            if r < HW:
                nc = o // HpWp
                cuda.atomic.add(dz, nc * HW + r, v)
    return route_scatter


@factory("gather", "fa, ia, fa, i64, i64, i64")
def _mk_gather(nbt):
    """out[o] = g[nc * HW + route[o]] with nc = o // HpWp (the max-pool route's transpose; the route is
    the maxpool kernel's, made in the same step: a window position in the plane)."""
    def gather_k(g, route, out, n, HpWp, HW):
        start = cuda.grid(1)
        step = cuda.gridsize(1)
        for o in range(start, n, step):
            out[o] = g[(o // HpWp) * HW + route[o]]
    return gather_k


@factory("avgpool", "fa, fa, i64*9, f")
def _mk_avgpool(nbt):
    def avgpool(x, y, NC, H, W, Ho, Wo, PH, PW, sh, sw, inv):
        start = cuda.grid(1)
        step = cuda.gridsize(1)
        for o in range(start, NC * Ho * Wo, step):
            ow = o % Wo
            q = o // Wo
            oh = q % Ho
            nc = q // Ho
            base = nc * H * W
            s = nbt(0)
            for i in range(PH):
                rb = base + (oh * sh + i) * W + ow * sw
                for j in range(PW):
                    s += x[rb + j]
            y[o] = s * inv
    return avgpool


@factory("avgpool_bwd", "fa, fa, i64*9, f")
def _mk_avgpool_bwd(nbt):
    """Gather form: each input pixel sums dy over the windows that cover it (no atomics, deterministic)."""
    def avgpool_bwd(dy, dx, NC, H, W, Ho, Wo, PH, PW, sh, sw, inv):
        start = cuda.grid(1)
        step = cuda.gridsize(1)
        for i in range(start, NC * H * W, step):
            iw = i % W
            q = i // W
            ih = q % H
            nc = q // H
            # windows covering ih: oh*sh <= ih < oh*sh + PH  (no builtin min/max: see codegen)
            oh_lo = (ih - PH + sh) // sh
            if oh_lo < 0:
                oh_lo = 0
            oh_hi = ih // sh
            if oh_hi > Ho - 1:
                oh_hi = Ho - 1
            ow_lo = (iw - PW + sw) // sw
            if ow_lo < 0:
                ow_lo = 0
            ow_hi = iw // sw
            if ow_hi > Wo - 1:
                ow_hi = Wo - 1
            s = nbt(0)
            for oh in range(oh_lo, oh_hi + 1):
                rb = (nc * Ho + oh) * Wo
                for ow in range(ow_lo, ow_hi + 1):
                    s += dy[rb + ow]
            dx[i] = s * inv
    return avgpool_bwd


def pooled_hw(H, W, size, stride, what):
    PH, PW = pair(size, "size")
    sh, sw = pair(stride if stride is not None else size, "stride")
    Ho, Wo = (H - PH) // sh + 1, (W - PW) // sw + 1
    if Ho < 1 or Wo < 1:
        raise BackendError(f"{what}: window {PH}x{PW} larger than the input {H}x{W}")
    return Ho, Wo, PH, PW, sh, sw


def maxpool_step(x, y, route, x_shape, size, stride, pads=(0, 0, 0, 0)):
    """y = max pool of x (N, C, H, W), route (int32, flat in-plane index of each window's first max) when
    given; flat arrays. pads (top, bottom, left, right): x taken as padded with -inf (no route then)."""
    N, C, H, W = x_shape
    top, bottom, left, right = (int(p) for p in pads)
    Ho, Wo, PH, PW, sh, sw = pooled_hw(H + top + bottom, W + left + right, size, stride, "maxpool2d")
    save = route is not None
    dt = np.dtype(y.dtype)
    return launch1d("maxpool", dt, N * C * Ho * Wo, x, y, route if save else dummy(np.int32), N * C, H, W, Ho, Wo,
                    PH, PW, sh, sw, top, left, int(save))


def route_scatter_step(dy, route, dz, dy_shape, in_hw):
    """dz (N, C, H, W) = 0, then each dy added at its route (dy * 0 at ~route where it is < 0); flat
    arrays."""
    N, C, Hp, Wp = dy_shape
    H, W = in_hw
    scatter = launch1d("route_scatter", np.dtype(dz.dtype), N * C * Hp * Wp, dy, route, dz, N * C, Hp * Wp, H * W)
    return seq([fill_step(dz, 0), scatter])


def gather_step(g, route, out, out_shape, in_hw):
    """out[o] = g at route[o] in its plane (the max-pool route's transpose); flat arrays."""
    n = int(np.prod(out_shape, dtype=np.int64))
    return launch1d("gather", np.dtype(out.dtype), n, g, route, out, n, out_shape[2] * out_shape[3],
                    in_hw[0] * in_hw[1])


def avgpool_step(x, y, x_shape, size, stride, backward=False):
    """y = average pool of x (N, C, H, W); backward: dx (x_shape) from dy (the pooled shape)."""
    N, C, H, W = x_shape
    Ho, Wo, PH, PW, sh, sw = pooled_hw(H, W, size, stride, "avgpool2d")
    dt = np.dtype(y.dtype)
    n = N * C * (H * W if backward else Ho * Wo)
    return launch1d("avgpool_bwd" if backward else "avgpool", dt, n, x, y, N * C, H, W, Ho, Wo, PH, PW, sh, sw,
                    dt.type(1.0 / (PH * PW)))


# ============================================================================================== public API

def maxpool2d(x, size=2, stride=None, save_route=False):
    """Max pool (no padding, floor sizes, ties to the first max); route = flat index i*W+j in the input
    plane (int32)."""
    check_shape(x, 4, "maxpool2d x")
    dt = fdtype(x)
    N, C, H, W = (int(s) for s in x.shape)
    Ho, Wo = pooled_hw(H, W, size, stride, "maxpool2d")[:2]
    y = empty((N, C, Ho, Wo), dt)
    route = empty((N, C, Ho, Wo), np.int32) if save_route else None
    maxpool_step(flat(x), flat(y), None if route is None else flat(route), (N, C, H, W), size,
                 stride if stride is not None else size)()
    return (y, route) if save_route else y


def maxpool_route_backward(dy, route, conv_out_hw, out=None):
    """dz (N, K, Ho, Wo): each dy lands on its route (flat index in the conv plane); a route < 0 puts dy * 0
    at ~route (a window the ReLU masked).
    Scatter with atomic adds (pool windows may overlap); dz is zeroed first."""
    check_shape(dy, 4, "maxpool_route_backward dy")
    dt = fdtype(dy)
    if tuple(route.shape) != tuple(dy.shape):
        raise BackendError(f"route shape {tuple(route.shape)} differs from dy shape {tuple(dy.shape)}")
    N, K = (int(s) for s in dy.shape[:2])
    Ho, Wo = (int(v) for v in conv_out_hw)
    dz = out if out is not None else empty((N, K, Ho, Wo), dt)
    route_scatter_step(flat(dy), flat(route), flat(dz), tuple(int(s) for s in dy.shape), (Ho, Wo))()
    return dz


def maxpool2d_backward(dy, route, in_hw, out=None):
    """dx (N, C, H, W) from a maxpool2d route (atomic scatter, as maxpool_route_backward)."""
    return maxpool_route_backward(dy, route, in_hw, out=out)


def avgpool2d(x, size=2, stride=None):
    """Average pool (no padding, floor sizes): mean over each size window."""
    check_shape(x, 4, "avgpool2d x")
    dt = fdtype(x)
    N, C, H, W = (int(s) for s in x.shape)
    Ho, Wo = pooled_hw(H, W, size, stride, "avgpool2d")[:2]
    y = empty((N, C, Ho, Wo), dt)
    avgpool_step(flat(x), flat(y), (N, C, H, W), size, stride if stride is not None else size)()
    return y


def avgpool2d_backward(dy, size, stride, in_hw):
    """dx (N, C, H, W): each input pixel gathers dy/(PH*PW) from the windows covering it."""
    check_shape(dy, 4, "avgpool2d_backward dy")
    dt = fdtype(dy)
    N, C, Ho, Wo = (int(s) for s in dy.shape)
    H, W = (int(v) for v in in_hw)
    if pooled_hw(H, W, size, stride, "avgpool2d_backward")[:2] != (Ho, Wo):
        raise BackendError(f"avgpool2d_backward: dy {Ho}x{Wo} does not fit input {H}x{W}, window {size}, "
                           f"stride {stride}")
    dx = empty((N, C, H, W), dt)
    avgpool_step(flat(dy), flat(dx), (N, C, H, W), size, stride if stride is not None else size, backward=True)()
    return dx
