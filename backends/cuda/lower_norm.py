"""Batch norm (forward in both modes, running statistics, the two backward passes), the mode flag, and
LRN forward and backward (kernels/norm.py). Activations are flat (N, C, P) device arrays."""
import numpy as np

from graphc.backends.cuda.kernels import norm as kernels
from graphc.backends.cuda.kernels.device import kernel
from graphc.backends.registry import lowerings
from graphc.ops.norm import batch_count

lowering, pattern_lowering = lowerings("cuda")


def _ncp(shape):
    return (shape[0], shape[1], int(np.prod(shape[2:], dtype=np.int64)))


@lowering("is_training", kernel="kernels/device.py fill (1.0 in a training run, else 0.0)")
def is_training(ctx):
    out, run = ctx.out(), ctx.run
    k = kernel("fill", np.dtype(out.dtype))
    one, zero = out.dtype.type(1), out.dtype.type(0)
    return lambda: k[1, 32](out, one if run.training else zero, 1)


@lowering("batchnorm", kernel="kernels/norm.py bn_stats (per-channel blocks, two-pass; training) + bn_apply")
def batchnorm(ctx):
    shape = ctx.shape_of(ctx.inputs[0])
    ncp = _ncp(shape)
    x, gamma, beta, rm, rv = ctx.arrays()
    y, eps, run = ctx.out(), ctx.attrs["eps"], ctx.run
    stats = ctx.alloc(2 * ncp[1])
    batch = kernels.bn_stats_step(x, stats, ncp)
    train = kernels.bn_apply_step(x, stats, stats[ncp[1]:], gamma, beta, y, ncp, 1.0 / (ncp[0] * ncp[2]), eps)
    infer = kernels.bn_apply_step(x, rm, rv, gamma, beta, y, ncp, 1.0, eps)

    def step():
        if run.training:
            batch_count(shape)
            batch()
            train()
        else:
            infer()
    return step


@lowering("bn_running_stat", kernel="kernels/norm.py bn_stats + bn_running")
def bn_running_stat(ctx):
    shape = ctx.shape_of(ctx.inputs[0])
    ncp = _ncp(shape)
    x, r = ctx.arrays()
    stats = ctx.alloc(2 * ncp[1])
    stat = kernels.bn_stats_step(x, stats, ncp)
    update = kernels.bn_running_step(stats, r, ctx.out(), ncp[1], ctx.attrs["stat"] == "var", ncp[0] * ncp[2],
                                     ctx.attrs["momentum"])

    def step():
        batch_count(shape)
        stat()
        update()
    return step


@lowering("bn_grad_sums", kernel="kernels/norm.py bn_grad_sums (per-channel blocks: the mean, then one pass)")
def bn_grad_sums(ctx):
    shape = ctx.shape_of(ctx.inputs[0])
    x, dy, rm, rv, flag = ctx.arrays()
    sums = kernels.bn_grad_sums_step(x, dy, rm, rv, flag, ctx.out(), _ncp(shape), ctx.attrs["eps"])
    run = ctx.run

    def step():
        if run.training:
            batch_count(shape)
        sums()
    return step


@lowering("bn_grad_x", kernel="kernels/norm.py bn_grad_x (one pass)")
def bn_grad_x(ctx):
    x, dy, gamma, sums, flag = ctx.arrays()
    return kernels.bn_grad_x_step(x, dy, gamma, sums, flag, ctx.out(), _ncp(ctx.shape_of(ctx.inputs[0])))


@lowering("lrn", kernel="kernels/norm.py lrn (the channel window per element)")
def lrn(ctx):
    return kernels.lrn_step(ctx.array(ctx.inputs[0]), ctx.out(), _ncp(ctx.shape_of(ctx.inputs[0])), ctx.attrs)


@lowering("lrn_grad", kernel="kernels/norm.py lrn_grad (the windows of the windows per element; no work arrays)")
def lrn_grad(ctx):
    x, dy = ctx.arrays()
    return kernels.lrn_step(x, ctx.out(), _ncp(ctx.shape_of(ctx.inputs[0])), ctx.attrs, dy=dy)
