"""ONNX elementwise ops and activations -> graphc's elementwise gates (numpy broadcasting, float only)."""
import numpy as np

from graphc.onnx.registry import onnx_op

UNARY = {"Neg": "neg", "Exp": "exp", "Log": "log", "Sqrt": "sqrt", "Sigmoid": "sigmoid", "Tanh": "tanh",
         "Relu": "relu"}
BINARY = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div"}


def floats(ctx, *idx):
    """Inputs idx (default all) as graphc values; graphc's gates compute in floats only."""
    idx = idx or [i for i in range(len(ctx.node.input)) if ctx.has(i)]
    for i in idx:
        if not ctx.dtype(i).startswith("float"):
            ctx.unsupported(f"input {i} is {ctx.dtype(i)}; graphc's elementwise gates compute in float32/float64")
    return [ctx.x(i) for i in idx]


@onnx_op(*UNARY)
def unary(ctx):
    x, = floats(ctx, 0)
    return getattr(ctx.g, UNARY[ctx.op])(x, name=ctx.out())


@onnx_op(*BINARY)
def binary(ctx):
    a, b = floats(ctx, 0, 1)
    return getattr(ctx.g, BINARY[ctx.op])(a, b, name=ctx.out())


@onnx_op("Abs")
def abs_(ctx):
    x, = floats(ctx, 0)
    return ctx.g.max(x, ctx.g.neg(x, name=ctx.tmp("neg")), name=ctx.out())


@onnx_op("Reciprocal")
def reciprocal(ctx):
    x, = floats(ctx, 0)
    return ctx.g.div(ctx.scalar(1.0), x, name=ctx.out())


@onnx_op("Pow", const_inputs=(1,))
def pow_(ctx):
    """Only the exponents graphc has gates for: 1, 2, 0.5, -1."""
    x, = floats(ctx, 0)
    e = ctx.const(1)
    if e.size != 1 or float(e.ravel()[0]) not in (1.0, 2.0, 0.5, -1.0):
        ctx.unsupported("exponent must be one number out of 1, 2, 0.5, -1 (graphc has no general power gate)")
    e, g = float(e.ravel()[0]), ctx.g
    if e == 1.0:
        return g.identity(x, name=ctx.out())
    if e == 2.0:
        return g.mul(x, x, name=ctx.out())
    if e == 0.5:
        return g.sqrt(x, name=ctx.out())
    return g.div(ctx.scalar(1.0), x, name=ctx.out())


def _variadic(ctx, op):
    xs = floats(ctx)
    if len(xs) == 1:
        return [ctx.g.identity(xs[0], name=ctx.out())]
    acc = xs[0]
    for k, x in enumerate(xs[1:], 1):
        acc = getattr(ctx.g, op)(acc, x, name=ctx.out() if k == len(xs) - 1 else ctx.tmp(f"{op}{k}"))
    return [acc]


@onnx_op("Sum")
def sum_(ctx):
    return _variadic(ctx, "add")


@onnx_op("Max")
def max_(ctx):
    return _variadic(ctx, "max")


@onnx_op("Mean")
def mean_(ctx):
    xs = floats(ctx)
    if len(xs) == 1:
        return ctx.g.identity(xs[0], name=ctx.out())
    total = ctx.g.add(xs[0], xs[1], name=ctx.tmp("add1"))
    for k, x in enumerate(xs[2:], 2):
        total = ctx.g.add(total, x, name=ctx.tmp(f"add{k}"))
    return ctx.g.div(total, ctx.scalar(float(len(xs))), name=ctx.out())


@onnx_op("Min")
def min_(ctx):
    """min(a, b) = -max(-a, -b): exact, and its gradient routes like max's."""
    xs = floats(ctx)
    g = ctx.g
    if len(xs) == 1:
        return g.identity(xs[0], name=ctx.out())
    acc = g.neg(xs[0], name=ctx.tmp("neg0"))
    for k, x in enumerate(xs[1:], 1):
        acc = g.max(acc, g.neg(x, name=ctx.tmp(f"neg{k}")), name=ctx.tmp(f"max{k}"))
    return g.neg(acc, name=ctx.out())


# --- activations of the CNN op set (issue 12) ---------------------------------------------------

@onnx_op("LeakyRelu")
def leaky_relu(ctx):
    x, = floats(ctx, 0)
    alpha = ctx.attr("alpha", 0.01)
    ctx.need("leaky_relu")
    return ctx.g.leaky_relu(x, alpha=float(alpha), name=ctx.out())


@onnx_op("PRelu")
def prelu(ctx):
    """graphc's prelu takes one slope or one per channel (dim 1), as torch.nn.PReLU."""
    x, = floats(ctx, 0)
    xs, ss = ctx.shape(0), ctx.shape(1)
    padded = (1,) * (len(xs) - len(ss)) + tuple(ss)
    per_channel = tuple(1 if k != 1 else xs[1] for k in range(len(xs)))
    if int(np.prod(ss)) == 1:
        target = (1,)
    elif len(xs) >= 2 and (padded == per_channel or (ctx.imp.source_opset < 7 and tuple(ss) == (xs[1],))):
        target = (xs[1],)         # (before opset 7 a (C,) slope was per channel; the converter keeps it)
    else:
        ctx.unsupported(f"slope shape {tuple(ss)} for input {tuple(xs)}: graphc's prelu takes one slope or one "
                        "per channel (dim 1)")
    ctx.need("prelu")
    slope = ctx.x(1)
    if tuple(slope.shape) != target:
        slope = ctx.g.reshape(slope, target, name=ctx.tmp("slope"))
    return ctx.g.prelu(x, slope, name=ctx.out())


def _bounds(ctx):
    if ctx.opset < 11:
        return ctx.attr("min", -np.inf), ctx.attr("max", np.inf)
    lo, hi = ctx.const(1, np.array(-np.inf)), ctx.const(2, np.array(np.inf))
    if lo.size != 1 or hi.size != 1:
        ctx.unsupported("min and max must be scalars")
    return float(lo.ravel()[0]), float(hi.ravel()[0])


@onnx_op("Clip", const_inputs=(1, 2))
def clip(ctx):
    x, = floats(ctx, 0)
    lo, hi = _bounds(ctx)
    if lo == -np.inf and hi == np.inf:
        return ctx.g.identity(x, name=ctx.out())
    ctx.need("clip")
    return ctx.g.clip(x, float(lo), float(hi), name=ctx.out())


@onnx_op("HardSigmoid")
def hard_sigmoid(ctx):
    """max(0, min(1, alpha * x + beta)) = clip(alpha * x + beta, 0, 1)."""
    x, = floats(ctx, 0)
    alpha, beta = float(ctx.attr("alpha", 0.2)), float(ctx.attr("beta", 0.5))
    ctx.need("clip")
    g = ctx.g
    y = g.add(g.mul(x, ctx.scalar(alpha), name=ctx.tmp("scale")), ctx.scalar(beta), name=ctx.tmp("shift"))
    return g.clip(y, 0.0, 1.0, name=ctx.out())


@onnx_op("HardSwish")
def hard_swish(ctx):
    x, = floats(ctx, 0)
    ctx.need("hardswish")
    return ctx.g.hardswish(x, name=ctx.out())


@onnx_op("Swish")
def swish(ctx):
    """x * sigmoid(alpha x); alpha = 1 is SiLU."""
    x, = floats(ctx, 0)
    if float(ctx.attr("alpha", 1.0)) != 1.0:
        ctx.unsupported("alpha != 1: graphc's silu is x * sigmoid(x)", attribute="alpha")
    ctx.need("silu")
    return ctx.g.silu(x, name=ctx.out())
