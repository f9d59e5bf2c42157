"""Batch norm (forward in both modes, running statistics, the two backward passes), the mode flag, and
LRN forward and backward (kernels/norm.py). Activations are handed to the kernels as (N, C, P) views."""
import numpy as np

from graphc.backends.numba.kernels import norm as kernels
from graphc.backends.registry import lowerings
from graphc.ops.norm import batch_count

lowering, pattern_lowering = lowerings("numba")


def _ncp(shape):
    """(N, C, P): an (N, C, H, W) or (N, C) shape with its spatial dims merged."""
    return (shape[0], shape[1], int(np.prod(shape[2:], dtype=np.int64)))


def _reader(ctx, names, shapes=None):
    """fn() -> the arrays of `names` (reshaped to `shapes` where given), bound now when all are static."""
    shapes = shapes or [None] * len(names)
    fix = [(lambda a: a) if s is None else (lambda a, s=s: a.reshape(s)) for s in shapes]
    stat = ctx.static(names)
    if stat is not None:
        arrays = tuple(f(a) for f, a in zip(fix, stat))
        return lambda: arrays
    values, idx = ctx.values, [ctx.index(n) for n in names]
    return lambda: tuple(f(values[i]) for f, i in zip(fix, idx))


@lowering("is_training", kernel="a host write of 1.0 / 0.0 into the flag's buffer")
def is_training(ctx):
    out, run = ctx.out(), ctx.run

    def step():
        out[()] = 1.0 if run.training else 0.0
    return step


@lowering("batchnorm", kernel="kernels/norm.py bn_forward_k (per channel: two-pass batch statistics when training, "
                              "then the normalised output)")
def batchnorm(ctx):
    ncp = _ncp(ctx.shape_of(ctx.inputs[0]))
    args = _reader(ctx, ctx.inputs, [ncp, None, None, None, None])
    y, eps, run, kern = ctx.out().reshape(ncp), ctx.attrs["eps"], ctx.run, kernels.bn_forward_k

    def step():
        x, gamma, beta, rm, rv = args()
        if run.training:
            batch_count(x.shape)       # FeedShapeError when a channel has a single value
        kern(x, gamma, beta, rm, rv, y, eps, run.training)
    return step


@lowering("bn_running_stat", kernel="kernels/norm.py bn_running_k (per channel: batch mean or unbiased variance)")
def bn_running_stat(ctx):
    args = _reader(ctx, ctx.inputs, [_ncp(ctx.shape_of(ctx.inputs[0])), None])
    out, var, momentum, kern = ctx.out(), ctx.attrs["stat"] == "var", ctx.attrs["momentum"], kernels.bn_running_k

    def step():
        x, r = args()
        batch_count(x.shape)
        kern(x, r, out, var, momentum)
    return step


def _flag(ctx, name):
    """fn() -> the mode flag's value (the is_training input) as a bool."""
    values, i = ctx.values, ctx.index(name)
    return lambda: bool(values[i].reshape(-1)[0] != 0)


@lowering("bn_grad_sums", kernel="kernels/norm.py bn_grad_sums_k (one pass per channel after the mean)")
def bn_grad_sums(ctx):
    ncp = _ncp(ctx.shape_of(ctx.inputs[0]))
    args = _reader(ctx, ctx.inputs[:4], [ncp, ncp, None, None])
    flag, out, eps, kern = _flag(ctx, ctx.inputs[4]), ctx.out(), ctx.attrs["eps"], kernels.bn_grad_sums_k

    def step():
        x, dy, rm, rv = args()
        training = flag()
        if training:
            batch_count(x.shape)
        kern(x, dy, rm, rv, out, eps, training)
    return step


@lowering("bn_grad_x", kernel="kernels/norm.py bn_grad_x_k (one pass)")
def bn_grad_x(ctx):
    ncp = _ncp(ctx.shape_of(ctx.inputs[0]))
    args = _reader(ctx, ctx.inputs[:4], [ncp, ncp, None, None])
    flag, dx, kern = _flag(ctx, ctx.inputs[4]), ctx.out().reshape(ncp), kernels.bn_grad_x_k

    def step():
        kern(*args(), dx, flag())
    return step


def _lrn_attrs(a):
    return int(a["size"]), float(a["alpha"]), float(a["beta"]), float(a["k"])


@lowering("lrn", kernel="kernels/norm.py lrn_k (per plane: the channel window's squares summed)")
def lrn(ctx):
    ncp = _ncp(ctx.shape_of(ctx.inputs[0]))
    return ctx.call(kernels.lrn_k, ctx.inputs, (ctx.out().reshape(ncp), *_lrn_attrs(ctx.attrs)),
                    fix=lambda a: a.reshape(ncp))


@lowering("lrn_grad", kernel="kernels/norm.py lrn_grad_k (two passes over the channel windows)")
def lrn_grad(ctx):
    ncp = _ncp(ctx.shape_of(ctx.inputs[0]))
    work = (ctx.scratch(ncp, np.float64), ctx.scratch(ncp, np.float64))
    return ctx.call(kernels.lrn_grad_k, ctx.inputs, (ctx.out().reshape(ncp), *work, *_lrn_attrs(ctx.attrs)),
                    fix=lambda a: a.reshape(ncp))
