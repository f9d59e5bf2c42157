"""Pooling: max (route), average (distribute), global average and global max; windows may overlap.

Max-pool ties go to the first maximum in row-major order within the window (as PyTorch).

The pool ops take whole windows of their input. Padding, ceil mode and count_include_pad (torch's
MaxPool2d / AvgPool2d arguments) are made by the define API (graph.maxpool / graph.avgpool) from these
ops and the rules below: the input is padded (-inf for max, 0 for average) by the padding plus the
extra bottom/right rows ceil mode needs, and an average whose windows do not all divide by kh*kw is
rescaled by a constant map of kh*kw / divisor (torch's divisor per window).
"""
import numpy as np
from numpy.lib.stride_tricks import as_strided

from graphc import shapes
from graphc.errors import ShapeError
from graphc.ops import OpDef, register
from graphc.ops.elementwise import _float_dtype

POOL_RULE = "output size = (W - P) / S + 1"


def pool_geometry(in_hw, size, stride, pad, ceil_mode):
    """torch's pooling output size: floor (or ceil) of (H + 2P - K) / S + 1, where in ceil mode a last
    window that would start in the bottom/right padding is dropped. Returns (out_hw, extra): extra =
    rows/cols of padding past the bottom/right padding the last window reaches."""
    out, extra = [], []
    for n, k, s, p in zip(in_hw, size, stride, pad):
        span = n + 2 * p - k
        o = (-(-span // s) if ceil_mode else span // s) + 1
        if ceil_mode and (o - 1) * s >= n + p:
            o -= 1
        out.append(o)
        extra.append(max(0, (o - 1) * s + k - (n + 2 * p)))
    return tuple(out), tuple(extra)


def avg_divisors(in_hw, size, stride, pad, out_hw, count_include_pad):
    """(Ho, Wo) divisor of each average-pool window, torch's rule: the window clipped to the padded
    input (count_include_pad) or to the input itself."""
    axes = []
    for n, k, s, p, o in zip(in_hw, size, stride, pad, out_hw):
        start = np.arange(o) * s - p
        end = np.minimum(start + k, n + p)
        full = end - start
        inner = np.minimum(end, n) - np.maximum(start, 0)
        axes.append(full if count_include_pad else inner)
    return np.outer(axes[0], axes[1]).astype(np.float64)


def windows(x, size, stride):
    """(N, C, H, W) -> view (N, C, Ho, Wo, kh*kw) of the pooling windows."""
    n, c, h, w = x.shape
    ho, wo = (h - size[0]) // stride[0] + 1, (w - size[1]) // stride[1] + 1
    x = np.ascontiguousarray(x)
    sn, sc, sh, sw = x.strides
    v = as_strided(x, (n, c, ho, wo, size[0], size[1]), (sn, sc, sh * stride[0], sw * stride[1], sh, sw))
    return v.reshape(n, c, ho, wo, size[0] * size[1])


def argmax_index(x, size, stride):
    """Flat index (into the H*W plane) of each window's first maximum."""
    n, c, h, w = x.shape
    win = windows(x, size, stride)
    a = win.argmax(axis=-1)
    ho, wo = a.shape[2:]
    r0 = (np.arange(ho) * stride[0])[:, None]
    c0 = (np.arange(wo) * stride[1])[None, :]
    return (r0 + a // size[1]) * w + (c0 + a % size[1])


def maxpool_route_ref(x, dy, size, stride):
    n, c, h, w = x.shape
    idx = argmax_index(x, size, stride).reshape(n * c, -1)
    dx = np.zeros((n * c, h * w), dy.dtype)
    rows = np.repeat(np.arange(n * c), idx.shape[1])
    np.add.at(dx, (rows, idx.ravel()), dy.reshape(n * c, -1).ravel())   # overlapping windows accumulate
    return dx.reshape(n, c, h, w)


def maxpool_gather_ref(x, g, size, stride):
    n, c, h, w = x.shape
    idx = argmax_index(x, size, stride)
    return np.take_along_axis(g.reshape(n, c, h * w), idx.reshape(n, c, -1), axis=2).reshape(idx.shape)


def avgpool_spread_ref(dy, size, stride, in_hw):
    n, c, ho, wo = dy.shape
    dx = np.zeros((n, c, *in_hw), dy.dtype)
    share = dy / (size[0] * size[1])
    for i in range(size[0]):
        for j in range(size[1]):
            dx[:, :, i:i + ho * stride[0]:stride[0], j:j + wo * stride[1]:stride[1]] += share
    return dx


def _pool_infer(node, in_types):
    (s, _), = in_types[:1]
    if len(s) != 4:
        node.fail(ShapeError, f"pooling takes NCHW input, got {shapes.fmt(s)}", "pool after a conv layer")
    size, stride = node.attrs["size"], node.attrs["stride"]
    if min(size) < 1 or min(stride) < 1:
        node.fail(ShapeError, f"window {size} and stride {stride} must be positive", "")
    ho = shapes.window_out(s[2], size[0], stride[0])
    wo = shapes.window_out(s[3], size[1], stride[1])
    if ho < 1 or wo < 1:
        node.fail(ShapeError, f"{POOL_RULE}: input {s[2]}x{s[3]}, window {size}, stride {stride} gives {ho}x{wo}",
                  "use a smaller window, or pool earlier")
    return (s[0], s[1], ho, wo), _float_dtype(node, in_types[:1])


def _maxpool_grad(g, node, dy):
    x, = node.inputs
    with g.rule("pool:route"):
        return [g.maxpool_route(x, dy, **node.attrs)]


def _avgpool_grad(g, node, dy):
    x, = node.inputs
    with g.rule("pool:distribute"):
        return [g.avgpool_spread(dy, in_hw=tuple(x.shape[2:]), **node.attrs)]


def _pool_flops(in_shapes, out_shape, attrs):
    n = 1
    for d in out_shape:
        n *= d
    return n * attrs["size"][0] * attrs["size"][1]


register(OpDef("maxpool", _pool_infer, lambda ins, a, ctx: windows(ins[0], a["size"], a["stride"]).max(-1),
               _maxpool_grad, flops=_pool_flops, doc="max pooling",
               torch=lambda F, torch, ins, a, ctx: F.max_pool2d(ins[0], tuple(a["size"]), tuple(a["stride"]))))
register(OpDef("avgpool", _pool_infer,      # means accumulate in float64, as the compiled kernels
               lambda ins, a, ctx: windows(ins[0], a["size"], a["stride"]).mean(-1, dtype=np.float64).astype(ins[0].dtype),
               _avgpool_grad, flops=_pool_flops, doc="average pooling",
               torch=lambda F, torch, ins, a, ctx: F.avg_pool2d(ins[0], tuple(a["size"]), tuple(a["stride"]))))


def _route_infer(node, in_types):
    return in_types[0][0], _float_dtype(node, in_types)


def _route_grad(g, node, dgrad):
    x, dy = node.inputs
    with g.rule("pool:gather"):
        return [None, g.maxpool_gather(x, dgrad, size=node.attrs["size"], stride=node.attrs["stride"])]


def _gather_grad(g, node, dgrad):
    x, gv = node.inputs
    with g.rule("pool:route"):
        return [None, g.maxpool_route(x, dgrad, size=node.attrs["size"], stride=node.attrs["stride"])]


register(OpDef("maxpool_route", _route_infer,
               lambda ins, a, ctx: maxpool_route_ref(ins[0], ins[1], a["size"], a["stride"]), _route_grad,
               doc="max-pool backward: each window's gradient goes to its (first) maximum"))
register(OpDef("maxpool_gather", lambda node, t: _pool_infer(node, t[:1]),
               lambda ins, a, ctx: maxpool_gather_ref(ins[0], ins[1], a["size"], a["stride"]), _gather_grad,
               doc="picks, per window of x, the value of g at x's maximum (the route's transpose)"))


def _spread_infer(node, in_types):
    s = in_types[0][0]
    return (s[0], s[1], *node.attrs["in_hw"]), _float_dtype(node, in_types)


def _spread_grad(g, node, dgrad):
    with g.rule("pool:average"):
        return [g.avgpool(dgrad, size=node.attrs["size"], stride=node.attrs["stride"])]


register(OpDef("avgpool_spread", _spread_infer,
               lambda ins, a, ctx: avgpool_spread_ref(ins[0], a["size"], a["stride"], a["in_hw"]), _spread_grad,
               doc="average-pool backward: each window's gradient shared evenly"))


def _global_infer(node, in_types):
    """global_avgpool / global_maxpool: (N, C, H, W) -> (N, C)."""
    s = in_types[0][0]
    if len(s) != 4:
        node.fail(ShapeError, f"global pooling takes NCHW input, got {shapes.fmt(s)}", "pool after a conv layer")
    return (s[0], s[1]), _float_dtype(node, in_types)


def _gap_grad(g, node, dy):
    with g.rule("pool:distribute"):
        return [g.global_avgpool_spread(dy, node.inputs[0])]


def _gap_spread_grad(g, node, dgrad):
    with g.rule("pool:average"):
        return [g.global_avgpool(dgrad), None]


register(OpDef("global_avgpool", _global_infer,
               lambda ins, a, ctx: ins[0].mean(axis=(2, 3), dtype=np.float64).astype(ins[0].dtype), _gap_grad,
               flops=lambda i, o, a: int(np.prod(i[0])), doc="mean over each channel's H x W plane",
               torch=lambda F, torch, ins, a, ctx: ins[0].mean(dim=(2, 3))))
register(OpDef("global_avgpool_spread", lambda node, t: (t[1][0], _float_dtype(node, t[:1])),
               lambda ins, a, ctx: np.broadcast_to(
                   (ins[0] / (ins[1].shape[2] * ins[1].shape[3]))[:, :, None, None], ins[1].shape).copy(),
               _gap_spread_grad, doc="global-average-pool backward: dy / (H*W) over the plane"))


def _gmp_grad(g, node, dy):
    x, = node.inputs
    hw = tuple(x.shape[2:])
    with g.rule("pool:route"):      # one window covering the plane: the max pool's route
        return [g.maxpool_route(x, g.reshape(dy, (x.shape[0], x.shape[1], 1, 1)), size=hw, stride=hw)]


register(OpDef("global_maxpool", _global_infer, lambda ins, a, ctx: ins[0].max(axis=(2, 3)), _gmp_grad,
               flops=lambda i, o, a: int(np.prod(i[0])),
               doc="max over each channel's H x W plane (NaN propagates); gradient to the first maximum",
               torch=lambda F, torch, ins, a, ctx: ins[0].amax(dim=(2, 3))))
