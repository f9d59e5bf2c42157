"""Elementwise gates (numpy broadcasting) and their gradient rules.

The four gates of the course: add (gradient distributor), mul (swap multiplier), copy (gradient adder,
inserted at every fan-out by the autodiff pass) and max (gradient router; ``relu`` is max(x, 0)).
Ties in max go to the *second* input, so relu = max(x, 0) passes no gradient at x == 0 (as PyTorch).
"""
import numpy as np

from graphc import shapes
from graphc.errors import DTypeError
from graphc.ops import OpDef, register


def _float_dtype(node, in_types):
    dts = {dt for _, dt in in_types}
    if any(not dt.startswith("float") for dt in dts):
        node.fail(DTypeError, f"needs float inputs, got {', '.join(sorted(dts))}",
                  "cast integer data with a float input or use floats in the graph")
    return "float64" if "float64" in dts else sorted(dts)[0]


def _infer(node, in_types):
    return shapes.broadcast(node, *[s for s, _ in in_types]), _float_dtype(node, in_types)


def _unbroadcast(g, grad, x):
    """add:distribute over broadcasting: sum the gradient back to the input's shape."""
    return grad if tuple(grad.shape) == tuple(x.shape) else g.sum_to(grad, x)


def _ew_flops(in_shapes, out_shape, attrs, per=1):
    n = 1
    for d in out_shape:
        n *= d
    return per * n


def elementwise(name, scalar, ref, grad=None, doc="", differentiable=True, flops_per=1):
    return register(OpDef(name, _infer, lambda ins, attrs, ctx: ref(*ins), grad=grad, scalar=scalar,
                          doc=doc, differentiable=differentiable,
                          flops=lambda i, o, a: _ew_flops(i, o, a, flops_per)))


# --- the gates ---------------------------------------------------------------------------------

def _add_grad(g, node, dy):
    with g.rule("add:distribute"):
        return [_unbroadcast(g, g.identity(dy), x) for x in node.inputs]


def _mul_grad(g, node, dy):
    a, b = node.inputs
    with g.rule("mul:swap"):
        return [_unbroadcast(g, g.mul(dy, b), a), _unbroadcast(g, g.mul(dy, a), b)]


def _copy_grad(g, node, dy):
    with g.rule("copy:add"):   # the sum over the fan-out was already formed by the autodiff pass
        return [g.identity(dy)]


def _max_grad(g, node, dy):
    a, b = node.inputs
    with g.rule("max:route"):
        win_a = g.gt(a, b)                     # ties go to b
        return [_unbroadcast(g, g.mul(dy, win_a), a),
                _unbroadcast(g, g.mul(dy, g.sub(g.scalar(1.0), win_a)), b)]


def _relu_grad(g, node, dy):
    x, = node.inputs
    with g.rule("max:route"):
        return [g.mul(dy, g.gt(x, g.scalar(0.0)))]


elementwise("add", "a0 + a1", np.add, _add_grad, "add gate: gradient distributor")
elementwise("mul", "a0 * a1", np.multiply, _mul_grad, "mul gate: swap multiplier")
elementwise("copy", "a0", np.copy, _copy_grad, "copy (fan-out) gate: gradient adder", flops_per=0)
# numpy's NaN rule (np.maximum propagates NaN): "a0 != a0" is the NaN test; relu's "not a0 <= 0" is true for NaN.
elementwise("max", "a0 if (a0 > a1 or a0 != a0) else a1", np.maximum, _max_grad,
            "max gate: gradient router (ties to the second input)")
elementwise("relu", "a0 if not a0 <= 0.0 else 0.0", lambda x: np.maximum(x, 0).astype(x.dtype, copy=False),
            _relu_grad, "relu(x) = max(x, 0): the max gate routing to x where x > 0")


# --- the rest: 'any other function' = upstream x local gradient ----------------------------------

def _identity_grad(g, node, dy):
    with g.rule("identity"):
        return [g.identity(dy)]


def _sub_grad(g, node, dy):
    a, b = node.inputs
    with g.rule("sub:distribute"):
        return [_unbroadcast(g, g.identity(dy), a), _unbroadcast(g, g.neg(dy), b)]


def _neg_grad(g, node, dy):
    with g.rule("neg:negate"):
        return [g.neg(dy)]


def _div_grad(g, node, dy):
    a, b = node.inputs
    with g.rule("div:quotient"):
        da = g.div(dy, b)
        db = g.neg(g.div(g.mul(da, a), b))
        return [_unbroadcast(g, da, a), _unbroadcast(g, db, b)]


def _exp_grad(g, node, dy):
    with g.rule("exp:local"):
        return [g.mul(dy, node.out)]


def _log_grad(g, node, dy):
    with g.rule("log:local"):
        return [g.div(dy, node.inputs[0])]


def _sqrt_grad(g, node, dy):
    with g.rule("sqrt:local"):
        return [g.div(dy, g.mul(g.scalar(2.0), node.out))]


def _sigmoid_grad(g, node, dy):
    s = node.out
    with g.rule("sigmoid:local"):
        return [g.mul(dy, g.mul(s, g.sub(g.scalar(1.0), s)))]


def _tanh_grad(g, node, dy):
    t = node.out
    with g.rule("tanh:local"):
        return [g.mul(dy, g.sub(g.scalar(1.0), g.mul(t, t)))]


def _sigmoid(x):
    return (0.5 * (np.tanh(0.5 * x) + 1.0)).astype(x.dtype, copy=False)   # stable for large |x|


def _mask(cmp):
    return lambda a, b: cmp(a, b).astype(np.result_type(a, b), copy=False)


elementwise("identity", "a0", lambda x: x, _identity_grad, "identity (a gradient passed through)", flops_per=0)
elementwise("sub", "a0 - a1", np.subtract, _sub_grad, "a - b")
elementwise("neg", "-a0", np.negative, _neg_grad, "-x")
elementwise("div", "a0 / a1", np.divide, _div_grad, "a / b")
elementwise("exp", "math.exp(a0)", np.exp, _exp_grad, "e^x")
elementwise("log", "math.log(a0)", np.log, _log_grad, "natural log")
elementwise("sqrt", "math.sqrt(a0)", np.sqrt, _sqrt_grad, "square root")
elementwise("sigmoid", "0.5 * (math.tanh(0.5 * a0) + 1.0)", _sigmoid, _sigmoid_grad, "1 / (1 + e^-x)", flops_per=4)
elementwise("tanh", "math.tanh(a0)", np.tanh, _tanh_grad, "tanh", flops_per=4)
elementwise("gt", "1.0 if a0 > a1 else 0.0", _mask(np.greater), None,
            "mask a > b as 0/1 (used by the max route); not differentiable", differentiable=False)
