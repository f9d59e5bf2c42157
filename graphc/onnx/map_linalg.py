"""ONNX Gemm, MatMul, Softmax/LogSoftmax and the mean/sum reductions -> graphc's matmul, softmax, mean, sum."""
from graphc import shapes
from graphc.onnx.map_elementwise import floats
from graphc.onnx.map_tensor import reshape_to
from graphc.onnx.registry import ISSUE_12_NOTE, batched_matmul, onnx_op


@onnx_op("Gemm")
def gemm(ctx):
    """alpha * op(A) @ op(B) + beta * C (C broadcast)."""
    a, b = floats(ctx, 0, 1)
    alpha, beta = float(ctx.attr("alpha", 1.0)), float(ctx.attr("beta", 1.0))
    ta, tb = bool(ctx.attr("transA", 0)), bool(ctx.attr("transB", 0))
    if len(a.shape) != 2 or len(b.shape) != 2:
        ctx.unsupported(f"operands {tuple(a.shape)} and {tuple(b.shape)}: Gemm takes matrices")
    g = ctx.g
    bias = ctx.has(2) and beta != 0.0
    last = not bias and alpha == 1.0
    y = g.matmul(a, b, trans_a=ta, trans_b=tb, name=ctx.out() if last else ctx.tmp("matmul"))
    if alpha != 1.0:
        y = g.mul(y, ctx.scalar(alpha), name=ctx.out() if not bias else ctx.tmp("alpha"))
    if bias:
        c, = floats(ctx, 2)
        if beta != 1.0:
            c = g.mul(c, ctx.scalar(beta), name=ctx.tmp("beta"))
        y = g.add(y, c, name=ctx.out())
    return y


@onnx_op("MatMul")
def matmul(ctx):
    """numpy's matmul: 2-D now; rank > 2 (batched) with issue 12's g.matmul; 1-D operands as a row/column."""
    a, b = floats(ctx, 0, 1)
    g = ctx.g
    ra, rb = len(a.shape), len(b.shape)
    if ra == rb == 2:
        return g.matmul(a, b, name=ctx.out())
    if max(ra, rb) > 2 and not batched_matmul():
        ctx.unsupported(f"batched (rank > 2) operands need g.matmul with numpy batching, {ISSUE_12_NOTE}",
                        waits_for="matmul(batched)")
    if ra == 1:
        a = g.reshape(a, (1, a.shape[0]), name=ctx.tmp("row"))
    if rb == 1:
        b = g.reshape(b, (b.shape[0], 1), name=ctx.tmp("col"))
    if ra > 1 and rb > 1:
        return g.matmul(a, b, name=ctx.out())
    y = g.matmul(a, b, name=ctx.tmp("matmul"))
    out = list(y.shape)
    if ra == 1:
        del out[-2]
    if rb == 1:
        del out[-1]
    return reshape_to(ctx, y, out, ctx.out())


def _softmax(ctx, name):
    """Opset < 13 softmax flattens the dims from `axis` on into one; opset 13 takes one axis."""
    x, = floats(ctx, 0)
    rank = len(x.shape)
    g = ctx.g
    if ctx.opset >= 13:
        return g.softmax(x, axis=int(ctx.attr("axis", -1)) % rank, name=name)
    axis = int(ctx.attr("axis", 1)) % rank
    if axis == rank - 1:
        return g.softmax(x, axis=axis, name=name)
    tail = shapes.numel(x.shape[axis:])
    if tail is None:
        ctx.unsupported(f"softmax over dims {axis}.. of {tuple(x.shape)} includes the batch dim", attribute="axis")
    flat = g.reshape(x, (*x.shape[:axis], tail), name=ctx.tmp("flat"))
    return g.reshape(g.softmax(flat, axis=axis, name=ctx.tmp("softmax")), x.shape, name=name)


@onnx_op("Softmax")
def softmax(ctx):
    return _softmax(ctx, ctx.out())


@onnx_op("LogSoftmax")
def log_softmax(ctx):
    """log(softmax(x)): exact while no probability underflows (logit gaps below ~87 in float32)."""
    return ctx.g.log(_softmax(ctx, ctx.tmp("softmax")), name=ctx.out())


def _reduce(ctx, method, attr_until):
    x, = floats(ctx, 0)
    rank = len(x.shape)
    axes = ctx.attr("axes") if ctx.opset < attr_until else ctx.const(1)
    keep = bool(ctx.attr("keepdims", 1))
    noop = bool(ctx.attr("noop_with_empty_axes", 0))
    axes = [] if axes is None else [int(a) % rank for a in list(axes if isinstance(axes, tuple) else axes.ravel())]
    if not axes:
        if noop:
            return x
        axes = list(range(rank))
    return getattr(ctx.g, method)(x, axes=tuple(sorted(set(axes))), keepdims=keep, name=ctx.out())


@onnx_op("ReduceMean", const_inputs=(1,))
def reduce_mean(ctx):
    return _reduce(ctx, "mean", 18)


@onnx_op("ReduceSum", const_inputs=(1,))
def reduce_sum(ctx):
    return _reduce(ctx, "sum", 13)
