"""Elementwise ops and fused elementwise groups: one generated serial @njit loop nest per node or group."""
import numpy as np

from graphc.backends import codegen
from graphc.backends.kernel_cache import load_generated
from graphc.backends.registry import lowerings

lowering, pattern_lowering = lowerings("numba")


@pattern_lowering("elementwise", scalar_ops=True,
                  kernel="generated elementwise loop nest (codegen.NumbaDialect), one per group")
def elementwise(ctx):
    plan = ctx.loop_plan()
    total = int(np.prod(ctx.out_shape, dtype=np.int64))
    # one serial kernel per group (compiled once for every size); large ones shared between threads
    # along the outer loop dim
    src = codegen.NumbaDialect().source(codegen.graph_body(ctx.body), ctx.result_index, plan, ctx.dtype.name, False)
    kern = ctx.split_batch(load_generated(src, "graphc_ew_"), plan.dims[0] if plan.dims else 1, total)
    args = [ctx.out(k).reshape(plan.dims) for k in range(len(ctx.result_index))]
    dynamic = []                    # (argument position, value index, shape) read per call
    for k in plan.loaded():
        name, shape = ctx.inputs[k], plan.input_shape(k)
        if ctx.is_dynamic(name):
            dynamic.append((len(args), ctx.index(name), shape))
            args.append(None)
        else:
            args.append(np.ascontiguousarray(ctx.array(name)).reshape(shape))
    if not dynamic:
        def step():
            kern(*args)
    else:
        values = ctx.values

        def step():
            a = list(args)
            for pos, i, shape in dynamic:
                a[pos] = values[i].reshape(shape)
            kern(*a)
    step.source = src
    return step
