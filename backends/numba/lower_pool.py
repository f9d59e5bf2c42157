"""Pooling ops, the saved max-pool route and the fused route-ReLU backward pattern (kernels/pool.py)."""
import numba
import numpy as np

from graphc.backends.kernel_cache import load_generated
from graphc.backends.numba.kernels import plane as plane_kernels
from graphc.backends.numba.kernels import pool as pool_kernels
from graphc.backends.numba.kernels.reduce import sum_rows_k
from graphc.backends.registry import lowerings

lowering, pattern_lowering = lowerings("numba")

_GENERATED = "generated per window geometry (kernels/pool.py {}: window loops unrolled, argmax as selects)"


def _window(attrs):
    (kh, kw), (sh, sw) = attrs["size"], attrs["stride"]
    return kh, kw, sh, sw


def _generated(ctx, source_fn, *args, elements, batch=1):
    """The serial kernel of this geometry (its `batch` shared by threads above parallel_min elements)."""
    return ctx.split_batch(load_generated(source_fn(*args, False), "graphc_pool_"), batch, elements)


def _forward_pool(ctx, source_fn, *args, elements, planes):
    """A forward pool kernel of this geometry over planes (N, C): with fewer images than threads, the
    threads share the N*C planes (each array seen as N*C one-channel images; ResNet-18's batch-1 max
    pool ran on one thread, 0.43 ms), else the images."""
    N, C = planes
    kern = load_generated(source_fn(*args, False), "graphc_pool_")
    if N >= numba.config.NUMBA_NUM_THREADS:
        return ctx.split_batch(kern, N, elements)
    split = ctx.split_batch(kern, N * C, elements)
    if split is kern:
        return kern

    def run(*arrays):
        split(*[a.reshape((N * C, 1) + a.shape[2:]) if a.shape[:2] == (N, C) else a for a in arrays])
    return run


@lowering("maxpool", kernel=_GENERATED.format("maxpool_source"))
def maxpool(ctx):
    y = ctx.out()
    kh, kw, sh, sw = _window(ctx.attrs)
    kern = _forward_pool(ctx, pool_kernels.maxpool_source, kh, kw, sh, sw, False, False, elements=y.size * kh * kw,
                         planes=y.shape[:2])
    return ctx.call(kern, ctx.inputs, (y, np.empty((1, 1, 1, 1), np.int32)))


@pattern_lowering("pad_maxpool", kernel=_GENERATED.format("pad_maxpool_source") + ": no padded copy, "
                                        "windows clipped at the edges")
def pad_maxpool(ctx):
    y = ctx.out()
    top, _, left, _ = ctx.members["pad"]["attrs"]["pads"]
    kh, kw, sh, sw = _window(ctx.members["pool"]["attrs"])
    kern = _forward_pool(ctx, pool_kernels.pad_maxpool_source, kh, kw, sh, sw, int(top), int(left),
                         elements=y.size * kh * kw, planes=y.shape[:2])
    return ctx.call(kern, ctx.inputs, (y, np.empty((1, 1, 1, 1), np.int32)))


@lowering("maxpool_argmax", kernel=_GENERATED.format("maxpool_source"))
def maxpool_argmax(ctx):
    route = ctx.out()
    kh, kw, sh, sw = _window(ctx.attrs)
    relu = bool(ctx.attrs.get("relu", False))
    kern = _forward_pool(ctx, pool_kernels.maxpool_source, kh, kw, sh, sw, True, relu, elements=route.size * kh * kw,
                         planes=route.shape[:2])
    return ctx.call(kern, ctx.inputs, (np.empty(route.shape, ctx.dtype), route))


@lowering("maxpool_route", kernel=_GENERATED.format("maxpool_route_source") + "; windows over 64 taps: "
                                  "kernels/plane.py maxpool_route_loop_k")
def maxpool_route(ctx):
    kh, kw, _, _ = _window(ctx.attrs)
    if kh * kw > 64:                    # (global max pool's plane-sized window): loops, not unrolled
        return ctx.call(plane_kernels.maxpool_route_loop_k, ctx.inputs, (ctx.out(), *_window(ctx.attrs)))
    dx = ctx.out()
    kern = _generated(ctx, pool_kernels.maxpool_route_source, *_window(ctx.attrs), elements=dx.size,
                      batch=dx.shape[0])
    return ctx.call(kern, ctx.inputs, (dx,))


def _route_scatter(ctx, window, dz, db):
    """dz = route scatter of dy (+ db = its per-channel sum): one generated pass."""
    kh, kw = window.get("size") or (0, 0)
    sh, sw = window.get("stride") or (0, 0)
    kern = _generated(ctx, pool_kernels.route_scatter_source, kh, kw, sh, sw, db is not None, elements=dz.size,
                      batch=dz.shape[0])
    plane_sums = np.empty(dz.shape[:2] if db is not None else (1, 1), np.float64)
    assert dz.flags.c_contiguous                                # (a planned buffer): the reshape is a view
    dz = dz.reshape(dz.shape[:2] + (-1,))                       # the planes flat
    if db is None:
        return ctx.call(kern, ctx.inputs, (dz, plane_sums))
    scatter = ctx.call(kern, ctx.inputs, (dz, plane_sums))

    def step():
        scatter()
        sum_rows_k(plane_sums, db)
    return step


@lowering("route_scatter", kernel="generated per pool geometry (kernels/pool.py route_scatter_source)")
def route_scatter(ctx):
    return _route_scatter(ctx, ctx.attrs, ctx.out(), None)


@pattern_lowering("route_relu", kernel="route scatter + ReLU mask (+ the bias gradient) in one generated pass per "
                                      "pool geometry (kernels/pool.py route_scatter_source)")
def route_relu(ctx):
    db = ctx.out(1) if "bias_grad" in ctx.members else None
    return _route_scatter(ctx, ctx.members["scatter"]["attrs"], ctx.out(0), db)


@lowering("avgpool", kernel="kernels/pool.py avgpool_k")
def avgpool(ctx):
    return ctx.call(pool_kernels.avgpool_k, ctx.inputs, (ctx.out(), *_window(ctx.attrs)))


@lowering("avgpool_spread", kernel="kernels/pool.py avgpool_spread_k")
def avgpool_spread(ctx):
    return ctx.call(pool_kernels.avgpool_spread_k, ctx.inputs, (ctx.out(), *_window(ctx.attrs)))


@lowering("global_avgpool", kernel="kernels/pool.py gap_k")
def global_avgpool(ctx):
    n, c, h, w = ctx.shape_of(ctx.inputs[0])
    return ctx.call(pool_kernels.gap_k, ctx.inputs, (ctx.out(),), fix=lambda a: a.reshape(n, c, h * w))


@lowering("global_avgpool_spread", kernel="kernels/pool.py gap_spread_k")
def global_avgpool_spread(ctx):
    n, c, h, w = ctx.shape_of(ctx.name)
    return ctx.call(pool_kernels.gap_spread_k, ctx.inputs[:1], (ctx.out().reshape(n, c, h * w),))


@lowering("global_maxpool", kernel="kernels/plane.py global_max_k")
def global_maxpool(ctx):
    n, c, h, w = ctx.shape_of(ctx.inputs[0])
    return ctx.call(plane_kernels.global_max_k, ctx.inputs, (ctx.out(),), fix=lambda a: a.reshape(n, c, h * w))
