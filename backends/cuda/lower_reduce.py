"""Reductions (sum, mean, sum_to: kernels/reduce.py) and their broadcasting inverses (strided copies)."""
import numpy as np

from graphc.backends.cuda.kernels.copy import broadcast_strides, copy_step, cstrides
from graphc.backends.cuda.kernels.reduce import sum_step
from graphc.backends.registry import lowerings

lowering, pattern_lowering = lowerings("cuda")

_SUM = "kernels/reduce.py reduce_keep_mid / reduce_mid (deterministic, no atomics)"


@lowering("sum", "mean", "sum_to", kernel=_SUM)
def reduction(ctx):
    axes, scale = ctx.reduction()
    return sum_step(ctx.array(ctx.inputs[0]), ctx.shape_of(ctx.inputs[0]), axes, scale, ctx.out(), ctx.alloc)


@lowering("expand_like", kernel="kernels/copy.py strided copy (up to 6-D; more: fallback)")
def expand_like(ctx):
    out_shape = ctx.shape_of(ctx.name)
    return copy_step(ctx.array(ctx.inputs[0]), ctx.out(), out_shape,
                     broadcast_strides(ctx.shape_of(ctx.inputs[0]), out_shape), cstrides(out_shape))


@lowering("broadcast_like", kernel="kernels/copy.py strided copy, scaled (up to 6-D; more: fallback)")
def broadcast_like(ctx):
    a = ctx.attrs
    out_shape = ctx.shape_of(ctx.name)
    keep = tuple(1 if d in a["axes"] else s for d, s in enumerate(out_shape))
    count = int(np.prod([out_shape[d] for d in a["axes"]], dtype=np.int64))
    return copy_step(ctx.array(ctx.inputs[0]), ctx.out(), out_shape, broadcast_strides(keep, out_shape),
                     cstrides(out_shape), scale=(1.0 / count) if a["mean"] else None)
