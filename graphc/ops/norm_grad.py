"""The backward ops of batch norm and LRN: what their gradient rules (graphc/ops/norm.py) emit, so a
backend runs batch norm's backward in two passes over the activations and LRN's in one op, instead of
a chain of reductions and elementwise ops.

    bn_grad_sums(x, dy, running_mean, running_var, flag; eps) -> (4, C), per channel:
        row 0 mean, row 1 istd = 1 / sqrt(var + eps): the statistics the forward normalised with (the
        batch's when flag = 1, i.e. training; the running ones when flag = 0);
        row 2 sum(dy) (= dL/dbeta), row 3 sum(dy * xhat) with xhat = (x - mean) * istd (= dL/dgamma).
    bn_grad_x(x, dy, gamma, sums, flag) -> dL/dx:
        training  gamma * istd * (dy - (sum(dy) + xhat * sum(dy * xhat)) / M), M values per channel;
        inference gamma * istd * dy (the statistics are constants).
    lrn_grad(x, dy; size, alpha, beta, k) -> dL/dx of y = lrn(x):
        dy * s^-beta - 2 alpha beta / size * x * (transposed window sum of dy * x * s^(-beta - 1)),
        s = k + alpha / size * (window sum of x^2).

Sums accumulate in float64 (as the compiled kernels do). Each op is differentiable: its gradient rule
is the gradient of the composition of table ops it equals (graphc.ops.composite.vjp), so gc.grad of a
gradient graph still works (second order through batch norm and LRN).
"""
import numpy as np

from graphc import shapes
from graphc.errors import ShapeError
from graphc.ops import OpDef, register
from graphc.ops.composite import vjp
from graphc.ops.elementwise import _float_dtype
from graphc.ops.norm import _batch_count, _per_channel, _window_mean, bn_axes

SUM_ROWS = ("mean", "istd", "dbeta", "dgamma")      # the rows of bn_grad_sums


def _check_like(node, in_types, names):
    sx = tuple(in_types[0][0])
    if len(sx) not in (2, 4):
        node.fail(ShapeError, f"batch norm's backward takes (N, C, H, W) or (N, C), got {shapes.fmt(sx)}", "")
    for what, (s, _) in zip(names, in_types[1:]):
        if tuple(s) != sx:
            node.fail(ShapeError, f"{what} has shape {shapes.fmt(s)}, the input {shapes.fmt(sx)}", "")
    return sx


def _check_channels(node, sx, pairs):
    for what, s, want in pairs:
        if tuple(s) != tuple(want):
            node.fail(ShapeError, f"{what} has shape {shapes.fmt(s)}; input {shapes.fmt(sx)} needs {shapes.fmt(want)}",
                      "")


def _sums_infer(node, in_types):
    sx = _check_like(node, in_types[:2], ("dy",))
    c = sx[1]
    _check_channels(node, sx, [("running_mean", in_types[2][0], (c,)), ("running_var", in_types[3][0], (c,)),
                               ("flag", in_types[4][0], ())])
    return (4, c), _float_dtype(node, in_types[:2])


def _grad_x_infer(node, in_types):
    sx = _check_like(node, in_types[:2], ("dy",))
    c = sx[1]
    _check_channels(node, sx, [("gamma", in_types[2][0], (c,)), ("sums", in_types[3][0], (4, c)),
                               ("flag", in_types[4][0], ())])
    return sx, _float_dtype(node, in_types[:2])


def statistics(x, rm, rv, training, eps):
    """(mean, istd) per channel, float64: the batch's (training) or the running ones."""
    axes = bn_axes(x.ndim)
    if training:
        _batch_count(x)
        x64 = x.astype(np.float64)
        mean = x64.mean(axis=axes)
        var = ((x64 - _per_channel(mean, x.ndim)) ** 2).mean(axis=axes)
    else:
        mean, var = rm.astype(np.float64), rv.astype(np.float64)
    return mean, 1.0 / np.sqrt(var + eps)


def bn_grad_sums_ref(x, dy, rm, rv, flag, eps):
    mean, istd = statistics(x, rm, rv, float(flag) != 0.0, eps)
    r = x.ndim
    xhat = (x.astype(np.float64) - _per_channel(mean, r)) * _per_channel(istd, r)
    axes = bn_axes(r)
    d64 = dy.astype(np.float64)
    return np.stack([mean, istd, d64.sum(axis=axes), (d64 * xhat).sum(axis=axes)]).astype(x.dtype)


def bn_grad_x_ref(x, dy, gamma, sums, flag):
    r = x.ndim
    mean, istd, sdy, sdx = (_per_channel(v, r) for v in sums.astype(np.float64))
    g = _per_channel(gamma.astype(np.float64), r)
    dy64 = dy.astype(np.float64)
    if float(flag) != 0.0:
        m = x.size // x.shape[1]
        xhat = (x.astype(np.float64) - mean) * istd
        dy64 = dy64 - (sdy + xhat * sdx) / m
    return (g * istd * dy64).astype(x.dtype)


# --- the compositions the two ops equal (their gradients differentiate these) --------------------------

def _col(g, v, rank):
    """(C,) -> broadcastable against an (N, C[, H, W]) value."""
    return v if rank == 2 else g.reshape(v, (v.shape[0], 1, 1))


def _bn_sums_composition(eps):
    def build(g, x, dy, rm, rv, f):
        rank, c = len(x.shape), x.shape[1]
        axes = bn_axes(rank)
        nf = g.sub(g.scalar(1.0), f)
        mu_b = g.mean(x, axes, keepdims=True)
        xc = g.sub(x, mu_b)
        var_b = g.mean(g.mul(xc, xc), axes, keepdims=True)
        mu = g.add(g.mul(f, mu_b), g.mul(nf, _col(g, rm, rank)))
        var = g.add(g.mul(f, var_b), g.mul(nf, _col(g, rv, rank)))
        istd = g.div(g.scalar(1.0), g.sqrt(g.add(var, g.scalar(eps))))
        xhat = g.mul(g.sub(x, mu), istd)
        rows = [mu, istd, g.sum(dy, axes, keepdims=True), g.sum(g.mul(dy, xhat), axes, keepdims=True)]
        return g.concat([g.reshape(v, (1, c)) for v in rows], axis=0)
    return build


def sums_row(g, s, k):
    """Row k of a bn_grad_sums value, as (C,)."""
    return g.reshape(g.slice(s, 0, k, k + 1), (s.shape[1],))


def _bn_grad_x_composition(g, x, dy, gamma, s, f):
    rank = len(x.shape)
    axes = bn_axes(rank)
    mu, istd, sdy, sdx = (_col(g, sums_row(g, s, k), rank) for k in range(4))
    count = g.sum(g.expand_like(g.scalar(1.0), x), axes, keepdims=True)     # M, as a value (N is symbolic)
    xhat = g.mul(g.sub(x, mu), istd)
    corr = g.div(g.add(sdy, g.mul(xhat, sdx)), count)
    return g.mul(g.mul(_col(g, gamma, rank), istd), g.sub(dy, g.mul(f, corr)))


def _sums_grad(g, node, dgrad):
    with g.rule("bn:sums-grad"):
        return vjp(g, _bn_sums_composition(node.attrs["eps"]), node.inputs, dgrad)


def _grad_x_grad(g, node, dgrad):
    with g.rule("bn:dX-grad"):
        return vjp(g, _bn_grad_x_composition, node.inputs, dgrad)


register(OpDef("bn_grad_sums", _sums_infer,
               lambda ins, a, ctx: bn_grad_sums_ref(*ins, a["eps"]), _sums_grad,
               flops=lambda i, o, a: 6 * int(np.prod(i[0])), attrs={"eps": 1e-5},
               doc="batch norm backward, pass 1: per channel the mean and istd the forward used and the sums "
                   "of dy and dy * xhat (rows mean, istd, dbeta, dgamma)"))
register(OpDef("bn_grad_x", _grad_x_infer, lambda ins, a, ctx: bn_grad_x_ref(*ins), _grad_x_grad,
               flops=lambda i, o, a: 6 * int(np.prod(i[0])),
               doc="batch norm backward, pass 2: dL/dx from the per-channel sums of bn_grad_sums"))


# --- LRN -------------------------------------------------------------------------------------------------

def _window_sum(v, before, after):
    """Sum over the zero-padded channel window [c - before, c + after] (axis 1)."""
    c = v.shape[1]
    p = np.pad(v, [(0, 0), (before, after)] + [(0, 0)] * (v.ndim - 2))
    out = np.zeros_like(v)
    for j in range(before + after + 1):
        out += p[:, j:j + c]
    return out


def lrn_grad_ref(x, dy, size, alpha, beta, k):
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    s = k + alpha / size * _window_sum(x64 * x64, size // 2, (size - 1) // 2)
    back = _window_sum(dy64 * x64 * s ** (-beta - 1.0), (size - 1) // 2, size // 2)
    return (dy64 * s ** -beta - 2.0 * alpha * beta / size * x64 * back).astype(x.dtype)


def _lrn_grad_infer(node, in_types):
    (sx, _), (sd, _) = in_types
    if tuple(sx) != tuple(sd) or len(sx) < 3:
        node.fail(ShapeError, f"lrn_grad takes x and dy of one (N, C, ...) shape, got {shapes.fmt(sx)} and "
                  f"{shapes.fmt(sd)}", "")
    return sx, _float_dtype(node, in_types)


def lrn_grad_composition(a):
    """The LRN backward as table ops (the pre-lrn_grad rule): window means of x^2 and of dy y / s."""
    size, alpha, beta = a["size"], a["alpha"], a["beta"]

    def build(g, x, dy):
        y = g.lrn(x, size, alpha, beta, a["k"])
        s = g.add(g.scalar(a["k"]), g.mul(g.scalar(alpha), _window_mean(g, g.mul(x, x), size // 2,
                                                                          (size - 1) // 2, size)))
        p = g.exp(g.mul(g.scalar(-beta), g.log(s)))
        back = _window_mean(g, g.div(g.mul(dy, y), s), (size - 1) // 2, size // 2, size)
        return g.sub(g.mul(dy, p), g.mul(g.scalar(2.0 * alpha * beta), g.mul(x, back)))
    return build


def _lrn_grad_grad(g, node, dgrad):
    with g.rule("lrn:dX-grad"):
        return vjp(g, lrn_grad_composition(node.attrs), node.inputs, dgrad)


register(OpDef("lrn_grad", _lrn_grad_infer,
               lambda ins, a, ctx: lrn_grad_ref(ins[0], ins[1], a["size"], a["alpha"], a["beta"], a["k"]),
               _lrn_grad_grad, flops=lambda i, o, a: int(np.prod(o)) * (2 * a["size"] + 10),
               attrs={"size": 5, "alpha": 1e-4, "beta": 0.75, "k": 1.0},
               doc="LRN backward: dL/dx of lrn(x) given dL/dy (one pass over the channel windows)"))
