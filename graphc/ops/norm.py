"""Normalisation: batch norm (training and inference modes) and local response normalisation.

Batch norm, as torch's BatchNorm1d/2d. Inputs x (N, C, H, W) or (N, C), gamma, beta, running_mean,
running_var (all (C,); the running statistics are non-trainable params, i.e. graph state).
- Training (exe.step, exe.run(..., training=True)): normalise with the batch's mean and biased
  variance over every axis but C; the running statistics become (1 - momentum) * running +
  momentum * batch statistic, with the *unbiased* batch variance (torch's rule). The define API adds
  these two new values as ``bn_running_stat`` nodes (role "update") and records them in
  ``graph.stat_updates``; the executable stores them after a training run or step, like optimizer
  updates (a training graph lists them in ``graph.updates`` too).
- Inference: normalise with the running statistics.
The mode is a run-time flag (`is_training`), so one compiled graph serves both. The gradient rule reads
that flag (rules bn:stats, bn:dgamma, bn:dbeta, bn:dX, bn:d-running): two ops of graphc/ops/norm_grad.py,
one pass each over the activations (bn_grad_sums: the statistics and the sums dgamma, dbeta;
bn_grad_x: dL/dx), then per-channel arithmetic. In training the batch statistics depend on x (the full
batch-norm backward), in inference BN is an affine map per channel.

LRN, as torch's LocalResponseNorm(size, alpha, beta, k) (AlexNet, GoogLeNet): over channels,
y_c = x_c / (k + alpha / size * sum of x_j^2 for j in [c - size // 2, c + (size - 1) // 2])^beta, the
sum over a zero-padded channel window (divided by size even at the borders, as torch). Its gradient is
one op, lrn_grad (graphc/ops/norm_grad.py).
"""
import numpy as np

from graphc import shapes
from graphc.errors import FeedShapeError, ShapeError
from graphc.ops import OpDef, register
from graphc.ops.elementwise import _float_dtype


def bn_axes(rank):
    """The axes batch norm reduces over: all but the channels (axis 1)."""
    return (0,) if rank == 2 else (0, 2, 3)


def _per_channel(v, rank):
    return v.reshape((1, -1) + (1,) * (rank - 2))


def batch_count(shape):
    """Values per channel of a batch-norm input of `shape`; a FeedShapeError below 2 (training mode)."""
    n = int(np.prod(shape, dtype=np.int64)) // shape[1]
    if n < 2:
        raise FeedShapeError(f"batch norm in training mode needs more than one value per channel; its input is "
                             f"{tuple(shape)}. Fix: train with a batch of 2 or more (torch refuses this too)")
    return n


def _batch_count(x):
    return batch_count(x.shape)


def _bn_infer(node, in_types):
    sx = in_types[0][0]
    if len(sx) not in (2, 4):
        node.fail(ShapeError, f"batch norm takes (N, C, H, W) or (N, C) input, got {shapes.fmt(sx)}",
                  "normalise conv outputs (4-D) or dense outputs (2-D)")
    c = sx[1]
    for what, (s, _) in zip(("gamma", "beta", "running_mean", "running_var"), in_types[1:]):
        if tuple(s) != (c,):
            node.fail(ShapeError, f"{what} has shape {shapes.fmt(s)} but the input has {c} channels",
                      f"declare {what} as ({c},)")
    return sx, _float_dtype(node, in_types)


def _bn_ref(inputs, attrs, ctx):
    x, gamma, beta, rm, rv = inputs
    axes = bn_axes(x.ndim)
    if ctx.training:
        _batch_count(x)
        mean, var = x.mean(axis=axes), x.var(axis=axes)
    else:
        mean, var = rm, rv
    r = x.ndim
    y = (x - _per_channel(mean, r)) / np.sqrt(_per_channel(var, r) + attrs["eps"])
    return (y * _per_channel(gamma, r) + _per_channel(beta, r)).astype(x.dtype, copy=False)


def _bn_grad(g, node, dy):
    """Two passes over the activations (graphc/ops/norm_grad.py): bn_grad_sums (the statistics of the
    mode and the sums dgamma, dbeta), then bn_grad_x; the rest is per-channel arithmetic."""
    from graphc.ops.norm_grad import sums_row
    x, gamma, beta, rm, rv = node.inputs
    with g.rule("bn:stats"):           # the statistics the forward used: batch (training) or running
        f = g.is_training()
        s = g.add_node("bn_grad_sums", (x, dy, rm, rv, f), {"eps": node.attrs["eps"]})
    with g.rule("bn:dbeta"):
        dbeta = sums_row(g, s, 2)
    with g.rule("bn:dgamma"):
        dgamma = sums_row(g, s, 3)
    with g.rule("bn:dX"):              # training: istd gamma (dy - mean(dy) - xhat mean(dy xhat))
        dx = g.add_node("bn_grad_x", (x, dy, gamma, s, f), {})
    with g.rule("bn:d-running"):       # inference only: y depends on the running statistics
        nf = g.sub(g.scalar(1.0), f)
        gi = g.mul(gamma, sums_row(g, s, 1))
        drm = g.mul(nf, g.neg(g.mul(gi, dbeta)))
        drv = g.mul(nf, g.mul(g.scalar(-0.5), g.mul(g.mul(gi, sums_row(g, s, 1)), dgamma)))
    return [dx, dgamma, dbeta, drm, drv]


def _bn_flops(in_shapes, out_shape, attrs):
    return 8 * int(np.prod(out_shape))


register(OpDef("batchnorm", _bn_infer, _bn_ref, _bn_grad, flops=_bn_flops, run_dependent=True,
               doc="batch normalisation: batch statistics in training, running statistics at inference",
               attrs={"eps": 1e-5, "momentum": 0.1},
               # the running statistics are graphc's bn_running_stat nodes: torch updates copies
               torch=lambda F, torch, ins, a, ctx: F.batch_norm(ins[0], ins[3].clone(), ins[4].clone(), ins[1], ins[2],
                                                                ctx.training, a["momentum"], a["eps"])))


def _stat_infer(node, in_types):
    (sx, _), (sr, _) = in_types
    if len(sx) not in (2, 4) or tuple(sr) != (sx[1],):
        node.fail(ShapeError, f"running statistic {shapes.fmt(sr)} must be (C,) for input {shapes.fmt(sx)}", "")
    if node.attrs["stat"] not in ("mean", "var"):
        node.fail(ShapeError, f"unknown statistic {node.attrs['stat']!r}", "use 'mean' or 'var'")
    return sr, _float_dtype(node, in_types)


def running_stat_ref(x, r, stat, momentum):
    """(1 - momentum) * r + momentum * the batch mean or unbiased variance (torch's update)."""
    axes = bn_axes(x.ndim)
    _batch_count(x)
    s = x.mean(axis=axes) if stat == "mean" else x.var(axis=axes, ddof=1)
    return ((1.0 - momentum) * r + momentum * s).astype(r.dtype, copy=False)


def _running_stat_torch(F, torch, ins, a, ctx):
    x, r = ins
    dims = [d for d in range(x.dim()) if d != 1]
    s = x.mean(dim=dims) if a["stat"] == "mean" else x.var(dim=dims, unbiased=True)
    return (1.0 - a["momentum"]) * r + a["momentum"] * s


register(OpDef("bn_running_stat", _stat_infer,
               lambda ins, a, ctx: running_stat_ref(ins[0], ins[1], a["stat"], a["momentum"]),
               differentiable=False, flops=lambda i, o, a: 3 * int(np.prod(i[0])),
               doc="batch norm's running mean or variance after one training batch (a state update; "
                   "running statistics are buffers: no gradient flows through them, as in torch)",
               attrs={"stat": "mean", "momentum": 0.1},
               torch=_running_stat_torch))


def _flag_infer(node, in_types):
    return (), node.attrs["dtype"]


register(OpDef("is_training", _flag_infer,
               lambda ins, a, ctx: np.asarray(1.0 if ctx.training else 0.0, dtype=a["dtype"]),
               differentiable=False, run_dependent=True,
               doc="1.0 in a training run (exe.step, exe.run(training=True)), else 0.0: blends batch "
                   "norm's two modes in its gradient",
               torch=lambda F, torch, ins, a, ctx: torch.tensor(1.0 if ctx.training else 0.0)))


# --- local response normalisation ----------------------------------------------------------------

def _lrn_infer(node, in_types):
    s = in_types[0][0]
    if len(s) < 3:
        node.fail(ShapeError, f"LRN normalises over channels of (N, C, ...) input, got {shapes.fmt(s)}",
                  "apply it to conv outputs")
    a = node.attrs
    if not isinstance(a["size"], int) or a["size"] < 1:
        node.fail(ShapeError, f"LRN size must be a positive int, got {a['size']!r}", "")
    return s, _float_dtype(node, in_types)


def lrn_ref(x, size, alpha, beta, k):
    c = x.shape[1]
    sq = np.pad(x * x, [(0, 0), (size // 2, (size - 1) // 2)] + [(0, 0)] * (x.ndim - 2))
    acc = np.zeros_like(x)
    for j in range(size):
        acc += sq[:, j:j + c]
    return (x / (k + alpha / size * acc) ** beta).astype(x.dtype, copy=False)


def _window_mean(g, v, before, after, size):
    """Mean over a zero-padded channel window [c - before, c + after] (size = before + after + 1): the
    channels laid along H, padded, average-pooled (as torch computes LRN)."""
    c = v.shape[1]
    col = g.reshape(v, (v.shape[0], 1, c, -1))
    pooled = g.avgpool(g.pad2d(col, (before, after, 0, 0)), (size, 1), (1, 1))
    return g.reshape_like(pooled, v)


def _lrn_grad(g, node, dy):
    with g.rule("lrn:dX"):             # one op: graphc/ops/norm_grad.py lrn_grad
        return [g.add_node("lrn_grad", (node.inputs[0], dy), dict(node.attrs))]


register(OpDef("lrn", _lrn_infer, lambda ins, a, ctx: lrn_ref(ins[0], a["size"], a["alpha"], a["beta"], a["k"]),
               _lrn_grad, flops=lambda i, o, a: int(np.prod(o)) * (a["size"] + 6),
               doc="local response normalisation across channels (torch.nn.LocalResponseNorm)",
               attrs={"size": 5, "alpha": 1e-4, "beta": 0.75, "k": 1.0},
               torch=lambda F, torch, ins, a, ctx: F.local_response_norm(ins[0], a["size"], a["alpha"], a["beta"],
                                                                         a["k"])))
