"""Elementwise ops and fused elementwise groups: one generated grid-stride kernel per node or group."""
from graphc.backends import codegen
from graphc.backends.cuda.kernels.elementwise import graph_kernel_source, graph_step
from graphc.backends.registry import lowerings

lowering, pattern_lowering = lowerings("cuda")


@pattern_lowering("elementwise", scalar_ops=True,
                  kernel="generated elementwise kernel (codegen.CudaDialect), one per group, broadcasting by "
                         "coordinates")
def elementwise(ctx):
    plan = ctx.loop_plan()
    src, rank = graph_kernel_source(codegen.graph_body(ctx.body), ctx.result_index, plan)
    ins = [ctx.array(ctx.inputs[k]) for k in plan.loaded()]
    return graph_step(src, rank, plan, ins, [ctx.out(k) for k in range(len(ctx.result_index))], ctx.dtype)


def expression_step(ctx, expr, ins, out, out_shape, in_shapes, dtype=None):
    """A generated kernel out = expr(a0, a1, ...) over flat arrays `ins` (broadcast to out_shape),
    computed in `dtype` (default: the graph's; the inputs are read as it)."""
    plan = codegen.plan_loop(out_shape, in_shapes)
    src, rank = graph_kernel_source([(expr, [("in", k) for k in range(len(ins))])], [0], plan)
    return graph_step(src, rank, plan, [ins[k] for k in plan.loaded()], [out], dtype or ctx.dtype)
