"""Reductions (sum, mean, sum_to: kernels/reduce.py sum4) and their broadcasting inverses."""
import numpy as np

from graphc.backends.numba.kernels.reduce import reduce_form, sum4_par, sum4_ser
from graphc.backends.registry import lowerings

lowering, pattern_lowering = lowerings("numba")

_SUM4 = "kernels/reduce.py sum4 (any axes, float64 accumulation)"


@lowering("sum", "mean", "sum_to", kernel=_SUM4)
def reduction(ctx):
    axes, scale = ctx.reduction()
    xs = ctx.shape_of(ctx.inputs[0])
    form = reduce_form(xs, set(axes))
    if form is None:
        return None
    out = ctx.out().reshape(form[1], form[3])
    if ctx.parallel(int(np.prod(xs, dtype=np.int64))) and form[1] >= 2:
        kern, tail = sum4_par, (out, scale)
    else:                                              # its float64 accumulators: one row, kept
        kern, tail = sum4_ser, (out, scale, np.empty(form[3], np.float64))
    return ctx.call(kern, ctx.inputs[:1], tail, fix=lambda a: a.reshape(form))


@lowering("broadcast_like", kernel="numpy broadcast multiply into the planned buffer")
def broadcast_like(ctx):
    out = ctx.out()
    axes = ctx.attrs["axes"]
    keep = tuple(1 if d in axes else s for d, s in enumerate(out.shape))
    scale = 1.0 / max(int(np.prod([out.shape[d] for d in axes], dtype=np.int64)), 1) if ctx.attrs["mean"] else 1.0
    values, di = ctx.values, ctx.index(ctx.inputs[0])

    def step():
        np.multiply(np.broadcast_to(values[di].reshape(keep), out.shape), scale, out=out)
    return step


@lowering("expand_like", kernel="numpy broadcast copy into the planned buffer")
def expand_like(ctx):
    out = ctx.out()
    values, xi = ctx.values, ctx.index(ctx.inputs[0])

    def step():
        np.copyto(out, np.broadcast_to(values[xi], out.shape))
    return step
