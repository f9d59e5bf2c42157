"""Elementwise gates (numpy broadcasting) and their gradient rules.

The four gates of the course: add (gradient distributor), mul (swap multiplier), copy (gradient adder,
inserted at every fan-out by the autodiff pass) and max (gradient router; ``relu`` is max(x, 0)).
Ties in max go to the *second* input, so relu = max(x, 0) passes no gradient at x == 0 (as PyTorch).
"""
import ast
import math
import numbers
import re
import string

import numpy as np

from graphc import shapes
from graphc.errors import DTypeError, GraphError
from graphc.ops import OPS, OpDef, register


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


def elementwise(name, scalar, ref, grad=None, doc="", differentiable=True, flops_per=1, attrs=None, infer=_infer,
                **props):
    """Registers an elementwise op. ref(*inputs, **attrs) is its numpy semantics; attrs (names -> default
    numbers) are the values its scalar names in braces; props are further OpDef fields (alias,
    commutative, unit, torch...)."""
    attrs = dict(attrs or {})

    def reference(ins, a, ctx):
        return ref(*ins, **{k: a.get(k, v) for k, v in attrs.items()})
    return register(OpDef(name, infer, reference, grad=grad, scalar=scalar, doc=doc, differentiable=differentiable,
                          flops=lambda i, o, a: _ew_flops(i, o, a, flops_per), attrs=attrs, **props))


def _torch(fn):
    """The torch field of an op that is torch.<fn> of its inputs."""
    return lambda F, torch, ins, attrs, ctx: getattr(torch, fn)(*ins)


def _torch_same(F, torch, ins, attrs, ctx):
    return ins[0]


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


elementwise("add", "a0 + a1", np.add, _add_grad, "add gate: gradient distributor", commutative=True, unit=0.0,
            torch=_torch("add"))
elementwise("mul", "a0 * a1", np.multiply, _mul_grad, "mul gate: swap multiplier", commutative=True, unit=1.0,
            torch=_torch("mul"))
elementwise("copy", "a0", np.copy, _copy_grad, "copy (fan-out) gate: gradient adder", flops_per=0, alias=True,
            torch=_torch_same)
# numpy's NaN rule (np.maximum propagates NaN): "a0 != a0" is the NaN test; relu's "not a0 <= 0" is true for NaN.
elementwise("max", "a0 if (a0 > a1 or a0 != a0) else a1", np.maximum, _max_grad,
            "max gate: gradient router (ties to the second input)", commutative=True, torch=_torch("maximum"))
elementwise("relu", "a0 if not a0 <= 0.0 else 0.0", lambda x: np.maximum(x, 0).astype(x.dtype, copy=False),
            _relu_grad, "relu(x) = max(x, 0): the max gate routing to x where x > 0",
            torch=lambda F, torch, ins, a, ctx: F.relu(ins[0]))


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


def _cos_grad(g, node, dy):
    with g.rule("cos:local"):            # d cos(x) / dx = -sin(x) = cos(x + pi/2)
        return [g.mul(dy, g.cos(g.add(node.inputs[0], g.scalar(math.pi / 2))))]


def _sigmoid(x):
    return (0.5 * (np.tanh(0.5 * x) + 1.0)).astype(x.dtype, copy=False)   # stable for large |x|


def _mask(cmp):
    return lambda a, b: cmp(a, b).astype(np.result_type(a, b), copy=False)


elementwise("identity", "a0", lambda x: x, _identity_grad, "identity (a gradient passed through)", flops_per=0,
            alias=True, torch=_torch_same)
elementwise("sub", "a0 - a1", np.subtract, _sub_grad, "a - b", unit=0.0, torch=_torch("sub"))
elementwise("neg", "-a0", np.negative, _neg_grad, "-x", involution=True, torch=_torch("neg"))
elementwise("div", "a0 / a1", np.divide, _div_grad, "a / b", unit=1.0, torch=_torch("div"))
elementwise("exp", "math.exp(a0)", np.exp, _exp_grad, "e^x", torch=_torch("exp"))
elementwise("log", "math.log(a0)", np.log, _log_grad, "natural log", torch=_torch("log"))
elementwise("sqrt", "math.sqrt(a0)", np.sqrt, _sqrt_grad, "square root", torch=_torch("sqrt"))
elementwise("sigmoid", "0.5 * (math.tanh(0.5 * a0) + 1.0)", _sigmoid, _sigmoid_grad, "1 / (1 + e^-x)", flops_per=4,
            torch=_torch("sigmoid"))
elementwise("tanh", "math.tanh(a0)", np.tanh, _tanh_grad, "tanh", flops_per=4, torch=_torch("tanh"))
elementwise("cos", "math.cos(a0)", np.cos, _cos_grad, "cosine (the cosine learning-rate schedule)", flops_per=4,
            torch=_torch("cos"))
elementwise("floor", "math.floor(a0)", np.floor, None, "largest integer <= x (the step learning-rate schedule); "
            "not differentiable", differentiable=False, torch=_torch("floor"))
elementwise("gt", "1.0 if a0 > a1 else 0.0", _mask(np.greater), None,
            "mask a > b as 0/1 (used by the max route); not differentiable", differentiable=False)


# --- activations of modern CNNs (torch semantics; NaN propagates, as numpy's) ------------------------

def _ge(g, a, b):
    """1.0 where a >= b, else 0.0 (= 1 - gt(b, a))."""
    return g.sub(g.scalar(1.0), g.gt(b, a))


def _leaky_relu_grad(g, node, dy):
    x, = node.inputs
    alpha = node.attrs["alpha"]
    with g.rule("leaky_relu:local"):     # slope 1 where x > 0, alpha elsewhere (alpha at 0, as torch)
        return [g.mul(dy, g.add(g.scalar(alpha), g.mul(g.scalar(1.0 - alpha), g.gt(x, g.scalar(0.0)))))]


def _prelu_grad(g, node, dy):
    x, a = node.inputs
    with g.rule("prelu:local"):
        pos = g.gt(x, g.scalar(0.0))
        neg = g.sub(g.scalar(1.0), pos)
        dx = g.mul(dy, g.add(pos, g.mul(a, neg)))
        da = g.mul(dy, g.mul(x, neg))
        return [_unbroadcast(g, dx, x), _unbroadcast(g, da, a)]


def _clip_grad(g, node, dy):
    x, = node.inputs
    lo, hi = node.attrs["lo"], node.attrs["hi"]
    with g.rule("clip:pass"):            # passes where lo <= x <= hi (torch.clamp's rule)
        return [g.mul(dy, g.mul(_ge(g, x, g.scalar(lo)), _ge(g, g.scalar(hi), x)))]


def _silu_grad(g, node, dy):
    x, = node.inputs
    with g.rule("silu:local"):           # d/dx x s(x) = s (1 + x (1 - s))
        s = g.sigmoid(x)
        return [g.mul(dy, g.mul(s, g.add(g.scalar(1.0), g.mul(x, g.sub(g.scalar(1.0), s)))))]


def _hardswish_grad(g, node, dy):
    x, = node.inputs
    with g.rule("hardswish:local"):      # torch: 0 below -3, x / 3 + 1/2 on [-3, 3], 1 above 3
        above = g.gt(x, g.scalar(3.0))
        middle = g.mul(_ge(g, x, g.scalar(-3.0)), g.sub(g.scalar(1.0), above))
        slope = g.add(g.mul(middle, g.add(g.mul(x, g.scalar(1.0 / 3.0)), g.scalar(0.5))), above)
        return [g.mul(dy, slope)]


def _leaky_relu(x, alpha):
    return np.where(x > 0, x, (alpha * x).astype(x.dtype, copy=False))


def _prelu(x, a):
    return np.where(x > 0, x, a * x).astype(np.result_type(x, a), copy=False)


def _clip(x, lo, hi):
    return np.clip(x, lo, hi).astype(x.dtype, copy=False)


def _silu(x):
    return (x * _sigmoid(x)).astype(x.dtype, copy=False)


def _hardswish(x):
    return (x * np.clip(x + 3.0, 0.0, 6.0) / 6.0).astype(x.dtype, copy=False)


elementwise("leaky_relu", "a0 if a0 > 0 else {alpha} * a0", _leaky_relu, _leaky_relu_grad,
            "x where x > 0, else alpha * x", attrs={"alpha": 0.01},
            torch=lambda F, torch, ins, a, ctx: F.leaky_relu(ins[0], a["alpha"]))
elementwise("prelu", "a0 if a0 > 0 else a1 * a0", _prelu, _prelu_grad,
            "x where x > 0, else slope * x with a learned slope (per channel, broadcast)",
            torch=lambda F, torch, ins, a, ctx: torch.where(ins[0] > 0, ins[0], ins[1] * ins[0]))
# min(max(x, lo), hi): NaN passes through both tests; lo > hi gives hi everywhere (torch, numpy, ONNX)
elementwise("clip", "({hi} if ({lo} if a0 < {lo} else a0) > {hi} else ({lo} if a0 < {lo} else a0))", _clip, _clip_grad,
            "x clamped to [lo, hi] (relu6 = clip(x, 0, 6))", attrs={"lo": float("-inf"), "hi": float("inf")},
            torch=lambda F, torch, ins, a, ctx: torch.clamp(ins[0], a["lo"], a["hi"]))
elementwise("silu", "a0 * (0.5 * (math.tanh(0.5 * a0) + 1.0))", _silu, _silu_grad,
            "x * sigmoid(x) (swish)", flops_per=5, torch=lambda F, torch, ins, a, ctx: F.silu(ins[0]))
elementwise("hardswish", "0.0 if a0 <= -3.0 else (a0 if a0 >= 3.0 else a0 * (a0 + 3.0) / 6.0)", _hardswish,
            _hardswish_grad, "x * relu6(x + 3) / 6 (MobileNetV3)", flops_per=3,
            torch=lambda F, torch, ins, a, ctx: F.hardswish(ins[0]))


# --- elementwise ops declared in user code -------------------------------------------------------------

_ARG = re.compile(r"\ba(\d+)\b")
CUSTOM: set = set()          # names declared with elementwise_op (declaring one again replaces it)


def _number(v):
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _check_scalar(name, scalar, attrs):
    """The number of inputs `scalar` reads; GraphError when it is not a usable scalar expression."""
    if not isinstance(scalar, str) or not scalar.strip():
        raise GraphError(f"op {name!r}: scalar must be an expression over a0, a1, ... (a str), got {scalar!r}")
    try:
        fields = {f.split(".")[0].split("[")[0] for _, f, _, _ in string.Formatter().parse(scalar) if f}
        text = scalar.format(**{k: "1.0" for k in fields})
        ast.parse(text, mode="eval")
    except (ValueError, SyntaxError) as e:
        raise GraphError(f"op {name!r}: scalar {scalar!r} is not a Python expression ({e})") from None
    missing = sorted(fields - set(attrs))
    if missing:
        raise GraphError(f"op {name!r}: scalar names {{{missing[0]}}} but attrs has no {missing[0]!r}. Fix: "
                         f"declare it with a default, attrs={{{missing[0]!r}: ...}}")
    args = [int(k) for k in _ARG.findall(text)]
    if not args:
        raise GraphError(f"op {name!r}: scalar {scalar!r} reads no input; name them a0, a1, ...")
    return max(args) + 1


def elementwise_op(name, scalar, ref, grad=None, rule=None, attrs=None, doc="", torch=None, flops=1):
    """Declares a new elementwise op from user code, in one place. graphc then checks its shapes,
    differentiates it, fuses it into elementwise groups and compiles it on every backend; nothing in
    graphc is edited.

    name    the op's name; a graph uses it with g.apply(name, x, ..., attr=value)
    scalar  the op on one element: a Python expression over the inputs a0, a1, ... in the op table's
            scalar language (arithmetic, comparisons, ``x if c else y``, math.exp/log/sqrt/tanh/...,
            abs, min, max) that may name attributes in braces: "a0 if a0 > 0 else {alpha} * a0"
    ref     its numpy reference, ref(*inputs, **attrs) -> array: the oracle the backends are tested against
    grad    its gradient rule, grad(g, node, dy) -> [gradient per input, or None]: a small graph of table
            ops built with the gradient builder g from node.inputs, node.out and node.attrs, as the
            built-in gates do; gradients of inputs that were broadcast up are summed back to their
            shapes for you (None: the op cannot be differentiated through)
    rule    the gate-rule name the gradient's nodes and edges carry (default "<name>:grad")
    attrs   attribute names -> default values (plain numbers; each node may set its own)
    torch   optional torch(F, torch, inputs, attrs, ctx) -> tensor, for `graphc bench --compare torch`
    flops   floating-point operations per element (benchmarks)

    Declaring the same name again replaces the op (re-running a script); a built-in op's name is refused."""
    if not isinstance(name, str) or not name.isidentifier():
        raise GraphError(f"op names are identifiers, got {name!r}")
    if name in OPS and name not in CUSTOM:
        raise GraphError(f"{name!r} is a built-in op; give the new op another name")
    attrs = dict(attrs or {})
    bad = [k for k, v in attrs.items() if not _number(v)]
    if bad:
        raise GraphError(f"op {name!r}: attribute {bad[0]}={attrs[bad[0]]!r} must be a plain number "
                         "(elementwise attributes become constants in the generated code)")
    arity = _check_scalar(name, scalar, attrs)
    if not callable(ref) or (grad is not None and not callable(grad)):
        raise GraphError(f"op {name!r}: ref (and grad, when given) must be functions")
    rule = rule or f"{name}:grad"

    def infer(node, in_types):
        if len(in_types) != arity:
            node.fail(GraphError, f"takes {arity} input(s), got {len(in_types)}",
                      f"g.apply({name!r}, ...) with {arity} value(s)")
        return _infer(node, in_types)

    def reference(*ins, **values):
        return np.asarray(ref(*ins, **values)).astype(np.result_type(*ins), copy=False)

    def gradient(g, node, dy):
        with g.rule(rule):
            grads = list(grad(g, node, dy))
            if len(grads) != len(node.inputs):
                return grads             # autodiff names the mismatch
            # a gradient of an input that was broadcast up is summed back to its shape
            return [gx if gx is None else _unbroadcast(g, gx, x) for gx, x in zip(grads, node.inputs)]

    OPS.pop(name, None)
    CUSTOM.add(name)
    return elementwise(name, scalar, reference, gradient if grad is not None else None,
                       doc or f"user-declared elementwise op: {scalar}", flops_per=flops, attrs=attrs, infer=infer,
                       torch=torch)
