"""Pooling ops, the saved max-pool route and the fused route-ReLU backward pattern (kernels/pool.py)."""
import numpy as np

from graphc.backends.cuda.kernels.copy import copy_step, cstrides
from graphc.backends.cuda.kernels.device import seq
from graphc.backends.cuda.kernels.elementwise import elementwise_kernel
from graphc.backends.cuda.kernels.plane import global_max_step
from graphc.backends.cuda.kernels.pool import avgpool_step, gather_step, maxpool_step, route_scatter_step
from graphc.backends.cuda.kernels.reduce import sum_outer_step, sum_step
from graphc.backends.registry import lowerings

lowering, pattern_lowering = lowerings("cuda")


def _numel(shape):
    return int(np.prod(shape, dtype=np.int64))


def _routed(ctx, pooled_shape):
    """(route scratch, step) of a max pool of input 0 that keeps its route."""
    n = _numel(pooled_shape)
    y, route = ctx.alloc(n), ctx.alloc(n, np.int32)
    a = ctx.attrs
    return route, maxpool_step(ctx.array(ctx.inputs[0]), y, route, ctx.shape_of(ctx.inputs[0]), a["size"], a["stride"])


@lowering("maxpool", kernel="kernels/pool.py maxpool")
def maxpool(ctx):
    a = ctx.attrs
    return maxpool_step(ctx.array(ctx.inputs[0]), ctx.out(), None, ctx.shape_of(ctx.inputs[0]), a["size"],
                        a["stride"])


@pattern_lowering("pad_maxpool", kernel="kernels/pool.py maxpool over the unpadded input (windows clipped at its "
                                        "edges: the -inf padding never wins)")
def pad_maxpool(ctx):
    a = ctx.members["pool"]["attrs"]
    return maxpool_step(ctx.array(ctx.inputs[0]), ctx.out(), None, ctx.shape_of(ctx.inputs[0]), a["size"], a["stride"],
                        ctx.members["pad"]["attrs"]["pads"])


@lowering("maxpool_argmax", kernel="kernels/pool.py maxpool (+ a route fix-up for relu=True)")
def maxpool_argmax(ctx):
    a, route = ctx.attrs, ctx.out()
    y = ctx.alloc(route.size)
    pool = maxpool_step(ctx.array(ctx.inputs[0]), y, route, ctx.shape_of(ctx.inputs[0]), a["size"], a["stride"])
    if not a.get("relu", False):
        return pool
    fix = elementwise_kernel("a1 if a0 > 0 else -1 - a1", 2)
    return seq([pool, lambda: fix(y, route, out=route)])


@lowering("maxpool_route", kernel="kernels/pool.py maxpool (route) + fill + route_scatter")
def maxpool_route(ctx):
    dy = ctx.inputs[1]
    route, pool = _routed(ctx, ctx.shape_of(dy))
    return seq([pool, route_scatter_step(ctx.array(dy), route, ctx.out(), ctx.shape_of(dy),
                                         ctx.shape_of(ctx.inputs[0])[2:])])


@lowering("maxpool_gather", kernel="kernels/pool.py maxpool (route) + gather")
def maxpool_gather(ctx):
    route, pool = _routed(ctx, ctx.shape_of(ctx.name))
    g = ctx.array(ctx.inputs[1])
    return seq([pool, gather_step(g, route, ctx.out(), ctx.shape_of(ctx.name), ctx.shape_of(ctx.inputs[0])[2:])])


@lowering("route_scatter", kernel="kernels/pool.py fill + route_scatter (atomic)")
def route_scatter(ctx):
    dy, route = ctx.arrays()
    return route_scatter_step(dy, route, ctx.out(), ctx.shape_of(ctx.inputs[0]), tuple(ctx.attrs["in_hw"]))


@pattern_lowering("route_relu", kernel="kernels/pool.py fill + route_scatter (+ a reduction for the bias gradient)")
def route_relu(ctx):
    dy, route = ctx.arrays()
    dy_shape = ctx.shape_of(ctx.inputs[0])
    hw = tuple(ctx.members["scatter"]["attrs"]["in_hw"])
    dz = ctx.out(0)
    steps = [route_scatter_step(dy, route, dz, dy_shape, hw)]
    if "bias_grad" in ctx.members:
        axes = tuple(ctx.members["bias_grad"]["attrs"]["axes"])
        steps.append(sum_step(dz, dy_shape[:2] + hw, axes, 1.0, ctx.out(1), ctx.alloc))
    return seq(steps)


@lowering("avgpool", kernel="kernels/pool.py avgpool")
def avgpool(ctx):
    a = ctx.attrs
    return avgpool_step(ctx.array(ctx.inputs[0]), ctx.out(), ctx.shape_of(ctx.inputs[0]), a["size"], a["stride"])


@lowering("avgpool_spread", kernel="kernels/pool.py avgpool_bwd")
def avgpool_spread(ctx):
    a = ctx.attrs
    return avgpool_step(ctx.array(ctx.inputs[0]), ctx.out(), ctx.shape_of(ctx.name), a["size"], a["stride"],
                        backward=True)


@lowering("global_avgpool", kernel="kernels/reduce.py reduce_keep_mid")
def global_avgpool(ctx):
    n, c, h, w = ctx.shape_of(ctx.inputs[0])
    return sum_outer_step(ctx.array(ctx.inputs[0]), 1, n * c, h * w, 1.0 / (h * w), ctx.out(), ctx.alloc)


@lowering("global_avgpool_spread", kernel="kernels/copy.py strided copy, scaled")
def global_avgpool_spread(ctx):
    shape = ctx.shape_of(ctx.name)
    n, c, h, w = shape
    return copy_step(ctx.array(ctx.inputs[0]), ctx.out(), shape, (c, 1, 0, 0), cstrides(shape), scale=1.0 / (h * w))


@lowering("global_maxpool", kernel="kernels/plane.py global_max (a thread per plane; NaN propagates)")
def global_maxpool(ctx):
    return global_max_step(ctx.array(ctx.inputs[0]), ctx.out(), ctx.shape_of(ctx.inputs[0]))
