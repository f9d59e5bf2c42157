"""Gradcheck builders for the CNN op set (batch norm, LRN, modern activations, global max pool), used by
tests/test_autodiff.py's test_gradcheck_every_op (which imports CNN_BUILDERS into OP_BUILDERS).

Each builder takes that file's Case `c` (hypothesis draws for structure, a seeded RNG for values) and
returns c.finish(value); c.training = True asks for a training-mode gradcheck (batch norm on batch
statistics)."""
import numpy as np


def _dims(c, rank, lo=1, hi=3):
    return tuple(c.int(lo, hi) for _ in range(rank))


def _x(c, shape):
    """The differentiated input: a fed input (batch dim first) or a param."""
    return c.input("x", shape) if c.flag() else c.param("x", (c.batch, *shape))


def _unary(op, lo=None, hi=None, **attrs):
    def build(c):
        x = c.param("x", _dims(c, c.int(1, 3)), lo, hi)
        kw = {k: c.pick(v) for k, v in attrs.items()}
        return c.finish(getattr(c.g, op)(x, **kw))
    return build


def b_clip(c):
    lo = c.pick([None, -1.0, 0.0, -0.25])
    hi = c.pick([None, 0.5, 1.0, 6.0])
    return c.finish(c.g.clip(c.param("x", _dims(c, c.int(1, 3))), lo, hi))


def b_prelu(c):
    shape = _dims(c, c.pick([1, 3]))                     # (C,) or (C, H, W) after the batch dim
    slope = c.param("slope", (shape[0],) if c.flag() else (1,), -0.5, 0.5)
    return c.finish(c.g.prelu(_x(c, shape), slope))


def b_global_maxpool(c):
    return c.finish(c.g.global_maxpool(_x(c, _dims(c, 3, 1, 4))))


def b_lrn(c):
    shape = _dims(c, c.pick([2, 3]), 1, 4)               # (C, L) or (C, H, W) after the batch dim
    size = c.int(1, 5)
    alpha, beta, k = c.pick([1e-4, 0.1, 1.0]), c.pick([0.5, 0.75, 1.0]), c.pick([1.0, 2.0])
    return c.finish(c.g.lrn(_x(c, shape), size, alpha, beta, k))


def b_batchnorm(c):
    """Both modes: training (batch statistics; the batch count N*H*W must be 2 or more) and inference
    (running statistics, differentiated too)."""
    ch = c.int(1, 3)
    shape = (ch,) if c.flag() else (ch, c.int(1, 3), c.int(1, 3))
    count = c.batch * int(np.prod(shape[1:]))
    c.training = count > 1 and c.flag()
    x = _x(c, shape)
    gamma, beta = c.param("gamma", (ch,), 0.5, 1.5), c.param("beta", (ch,))
    rm = c.g.param("rm", value=c.values((ch,)), trainable=False)
    rv = c.g.param("rv", value=c.values((ch,), 0.5, 2.0), trainable=False)
    if not c.training:
        c.wrt += ["rm", "rv"]
    return c.finish(c.g.batchnorm(x, gamma, beta, rm, rv, eps=c.pick([1e-5, 1e-3, 0.1])))


def _x_dy(c, shape, names=("x", "dy")):
    """Differentiated values of one shape: all fed inputs (batch dim first) or all params."""
    fed = c.flag()
    return [c.input(n, shape) if fed else c.param(n, (c.batch, *shape)) for n in names]


def _bn_grad_inputs(c, names):
    """The values `names` (x, dy, ...: differentiated), the running statistics and the mode flag of a
    batch-norm backward op; c.training as b_batchnorm draws it."""
    ch = c.int(1, 3)
    shape = (ch,) if c.flag() else (ch, c.int(1, 3), c.int(1, 3))
    c.training = c.batch * int(np.prod(shape[1:])) > 1 and c.flag()
    values = _x_dy(c, shape, names)
    rm = c.g.param("rm", value=c.values((ch,)), trainable=False)
    rv = c.g.param("rv", value=c.values((ch,), 0.5, 2.0), trainable=False)
    if not c.training:
        c.wrt += ["rm", "rv"]
    return (ch, *values, rm, rv, c.g.is_training())


def b_bn_grad_sums(c):
    ch, x, dy, rm, rv, f = _bn_grad_inputs(c, ("x", "dy"))
    return c.finish(c.g.apply("bn_grad_sums", x, dy, rm, rv, f, eps=c.pick([1e-5, 0.1])))


def b_bn_grad_x(c):
    ch, x, dy, dy0, rm, rv, f = _bn_grad_inputs(c, ("x", "dy", "dy0"))
    sums = c.g.apply("bn_grad_sums", x, dy0, rm, rv, f, eps=0.1)
    return c.finish(c.g.apply("bn_grad_x", x, dy, c.param("gamma", (ch,), 0.5, 1.5), sums, f))


def b_lrn_grad(c):
    shape = _dims(c, c.pick([2, 3]), 1, 4)
    x, dy = _x_dy(c, shape)
    return c.finish(c.g.apply("lrn_grad", x, dy, size=c.int(1, 5), alpha=c.pick([0.1, 1.0]),
                              beta=c.pick([0.5, 0.75, 1.0]), k=c.pick([1.0, 2.0])))


CNN_BUILDERS = {
    "leaky_relu": _unary("leaky_relu", alpha=[0.01, 0.2, 1.5]), "silu": _unary("silu"),
    "hardswish": _unary("hardswish", -5.0, 5.0), "clip": b_clip, "prelu": b_prelu,
    "global_maxpool": b_global_maxpool, "lrn": b_lrn, "batchnorm": b_batchnorm,
    "bn_grad_sums": b_bn_grad_sums, "bn_grad_x": b_bn_grad_x, "lrn_grad": b_lrn_grad,
}
