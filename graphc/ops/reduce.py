"""Reductions (sum, mean) and the broadcasting pair (sum_to, expand_like) that gradients need."""
import numpy as np

from graphc import shapes
from graphc.errors import ShapeError
from graphc.ops import OpDef, register
from graphc.ops.elementwise import _float_dtype


def norm_axes(axes, ndim):
    """None (all), an axis or axes in -ndim..ndim-1 -> sorted non-negative axes; out of range or
    repeated axes are a ShapeError (numpy's rule: never wrapped)."""
    if axes is None:
        return tuple(range(ndim))
    axes = tuple(axes) if isinstance(axes, (tuple, list)) else (axes,)
    out = sorted(shapes.norm_axis(a, ndim, "reduction axis") for a in axes)
    if len(set(out)) != len(out):
        raise ShapeError(f"reduction axes {axes} name an axis twice")
    return tuple(out)


def _reduce_infer(node, in_types):
    s = in_types[0][0]
    axes = node.attrs["axes"]
    if any(not 0 <= a < len(s) for a in axes):
        node.fail(ShapeError, f"axes {axes} out of range for {shapes.fmt(s)}", "")
    if node.attrs["keepdims"]:
        out = tuple(1 if i in axes else d for i, d in enumerate(s))
    else:
        out = tuple(d for i, d in enumerate(s) if i not in axes)
    return out, _float_dtype(node, in_types)


def _sum_grad(g, node, dy, mean=False):
    with g.rule("mean:spread" if mean else "sum:broadcast"):
        return [g.broadcast_like(dy, node.inputs[0], axes=node.attrs["axes"],
                                 keepdims=node.attrs["keepdims"], mean=mean)]


def _count(shape, axes):
    n = 1
    for a in axes:
        n *= shape[a]
    return n


# Accumulated in float64 (as the compiled backends do): a float32 partial sum must not overflow to inf
# when the result itself is representable.
register(OpDef("sum", _reduce_infer,
               lambda ins, a, ctx: np.sum(ins[0], axis=a["axes"], keepdims=a["keepdims"],
                                          dtype=np.float64).astype(ins[0].dtype),
               _sum_grad, flops=lambda i, o, a: int(np.prod(i[0])), doc="sum over axes",
               torch=lambda F, torch, ins, a, ctx: ins[0].sum(dim=tuple(a["axes"]), keepdim=a["keepdims"])
               if a["axes"] else ins[0]))
register(OpDef("mean", _reduce_infer,
               lambda ins, a, ctx: np.mean(ins[0], axis=a["axes"], keepdims=a["keepdims"],
                                           dtype=np.float64).astype(ins[0].dtype),
               lambda g, n, dy: _sum_grad(g, n, dy, mean=True), flops=lambda i, o, a: int(np.prod(i[0])),
               doc="mean over axes",
               torch=lambda F, torch, ins, a, ctx: ins[0].mean(dim=tuple(a["axes"]), keepdim=a["keepdims"])
               if a["axes"] else ins[0]))


def broadcast_like_ref(dy, like_shape, axes, keepdims, mean):
    if not keepdims:
        dy = np.expand_dims(dy, axes)
    out = np.broadcast_to(dy, like_shape)
    if mean:
        return (out / _count(like_shape, axes)).astype(dy.dtype)
    return out.copy()


def _bl_grad(g, node, dgrad):
    a = node.attrs
    with g.rule("broadcast:sum"):
        r = (g.mean if a["mean"] else g.sum)(dgrad, axes=a["axes"], keepdims=a["keepdims"])
    return [r, None]


register(OpDef("broadcast_like", lambda node, t: (t[1][0], _float_dtype(node, t[:1])),
               lambda ins, a, ctx: broadcast_like_ref(ins[0], ins[1].shape, a["axes"], a["keepdims"], a["mean"]),
               _bl_grad, doc="spreads a reduced gradient back over the reduced axes (divided by the count for mean)"))


def sum_to_ref(x, shape):
    lead = x.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(lead + i for i, d in enumerate(shape) if d == 1 and x.shape[lead + i] != 1)
    return np.sum(x, axis=axes, keepdims=True).reshape(shape) if axes else x


register(OpDef("sum_to", lambda node, t: (t[1][0], _float_dtype(node, t[:1])),
               lambda ins, a, ctx: sum_to_ref(ins[0], ins[1].shape),
               lambda g, n, d: [_rule(g, "sum_to:expand", lambda: g.expand_like(d, n.inputs[0])), None],
               doc="sums a broadcast result back to the shape of `like` (add:distribute over broadcasting)",
               to_shape=True))
register(OpDef("expand_like", lambda node, t: (t[1][0], _float_dtype(node, t[:1])),
               lambda ins, a, ctx: np.broadcast_to(ins[0], ins[1].shape).copy(),
               lambda g, n, d: [_rule(g, "expand:sum_to", lambda: g.sum_to(d, n.inputs[0])), None],
               doc="broadcasts to the shape of `like`", to_shape=True))


def _rule(g, rule, fn):
    with g.rule(rule):
        return fn()
