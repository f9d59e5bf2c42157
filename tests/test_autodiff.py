"""The autodiff pass (gate rules -> an explicit backward graph), gradcheck, and optimizers as graph updates.

- every differentiable op of the table is gradchecked (float64) over hypothesis-drawn shapes, strides,
  paddings, pool windows and broadcasting; OP_BUILDERS must cover the table, so a new op without a
  gradient test fails test_builders_cover_every_differentiable_op;
- zoo models at small size; a deliberately wrong rule is caught; structure of the backward graph
  (table ops only, a rule on every backward node and edge, copy gates at fan-outs);
- the seeds' worked backward examples and optimizer steps, to the printed precision.
The seeds' numbers are copied in here; nothing outside the project is read at run time.
"""
import math
import os
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import graphc as gc
from graphc import models, shapes
from graphc.ops import OPS
from graphc.ops.conv import im2col, out_hw

from cnn_gradcheck_builders import CNN_BUILDERS

F64 = dict(rtol=1e-10, atol=1e-12)   # float64 graphs at float64 precision (float32 rounding is ~6e-8 relative)
MAX_EXAMPLES = int(os.environ.get("GRAPHC_HYPOTHESIS_EXAMPLES", "10"))   # raise it for a deeper search
PROPERTY = settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ================================================================== helpers
class Case:
    """Draws from hypothesis for structure (shapes, strides, ...) and a seeded numpy RNG for values."""

    def __init__(self, data):
        self.data = data
        self.rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1), label="seed"))
        self.g = gc.Graph("case", dtype="float64")
        self.feeds, self.wrt = {}, []
        self.batch = self.int(1, 2, "batch")

    def int(self, lo, hi, label=None):
        return self.data.draw(st.integers(lo, hi), label=label)

    def pick(self, options, label=None):
        return self.data.draw(st.sampled_from(options), label=label)

    def flag(self, label=None):
        return self.data.draw(st.booleans(), label=label)

    def values(self, shape, lo=None, hi=None):
        if lo is None:
            return self.rng.normal(size=shape)
        return self.rng.uniform(lo, hi, size=shape)

    def param(self, name, shape, lo=None, hi=None):
        """A differentiated parameter."""
        self.wrt.append(name)
        return self.g.param(name, value=self.values(shape, lo, hi))

    def input(self, name, shape, lo=None, hi=None, diff=True):
        """A fed input with the symbolic batch dim first; differentiated on request (wrt inputs)."""
        self.feeds[name] = self.values((self.batch, *shape), lo, hi)
        if diff:
            self.wrt.append(name)
        return self.g.input(name, (None, *shape))

    def const(self, arr):
        return self.g.const(np.asarray(arr))

    def finish(self, y):
        """loss = sum(y * r) with a random r fed alongside (so every output element matters)."""
        shape = tuple(self.batch if isinstance(d, str) else d for d in y.shape)
        self.feeds["r"] = self.rng.normal(size=shape)
        r = self.g.input("r", y.shape)
        loss = self.g.sum(self.g.mul(y, r), name="loss")
        self.g.output(loss)
        return self


def dims(c, rank, lo=1, hi=3):
    return tuple(c.int(lo, hi) for _ in range(rank))


def broadcast_pair(c):
    """Two numpy-broadcastable shapes: b is a suffix of a with some dims set to 1 (roles swapped at random)."""
    a = dims(c, c.int(1, 3), 1, 3)
    k = c.int(0, len(a))
    b = tuple(1 if c.flag() else d for d in a[len(a) - k:])
    return (b, a) if c.flag() else (a, b)


def conv_setup(c):
    """A conv geometry: groups 1, 2 or C (depthwise) and dilation 1-3 included."""
    n, groups = c.int(1, 2), c.pick([1, 2, "C"], "groups")
    if groups == "C":
        ci = groups = c.int(1, 3)
        cg = 1
    else:
        cg = c.int(1, 2)
        ci = cg * groups
    k = groups * c.int(1, 2)
    kh, kw = c.int(1, 3), c.int(1, 3)
    dil = shapes.pair(c.pick([1, 2, 3, (1, 2)], "dilation"))
    eh, ew = (kh - 1) * dil[0] + 1, (kw - 1) * dil[1] + 1
    stride = c.pick([1, 2, 3, (1, 2), (2, 1)], "stride")
    pad = c.pick([0, 1, 2, (1, 0), (0, 2, 1, 0), "same", "valid"], "pad")
    h, w = eh + c.int(0, 3), ew + c.int(0, 3)
    st_ = shapes.pair(stride)
    pads = shapes.conv_pads(pad, (h, w), (eh, ew), st_)
    return dict(n=n, ci=ci, cg=cg, k=k, kh=kh, kw=kw, stride=stride, st=st_, pad=pad, pads=pads, h=h, w=w,
                dil=dil, groups=groups, geo=dict(dilation=dil, groups=groups),
                out=out_hw((h, w), (kh, kw), st_, pads, dil))


def pool_setup(c):
    size = (c.int(1, 3), c.int(1, 3))
    stride = (c.int(1, 3), c.int(1, 3))              # stride < size: overlapping windows
    h, w = size[0] + c.int(0, 4), size[1] + c.int(0, 4)
    out = ((h - size[0]) // stride[0] + 1, (w - size[1]) // stride[1] + 1)
    return size, stride, (h, w), out


# ================================================================== one builder per differentiable op
def _binary(op, b_lo=None, b_hi=None):
    def build(c):
        sa, sb = broadcast_pair(c)
        a = c.param("a", sa)
        bv = c.values(sb, b_lo, b_hi)
        if b_lo is not None:                         # div: keep the denominator away from 0
            bv *= np.where(c.rng.random(sb) < 0.5, -1.0, 1.0)
        c.wrt.append("b")
        b = c.g.param("b", value=bv)
        return c.finish(getattr(c.g, op)(a, b))
    return build


def _unary(op, lo=None, hi=None):
    def build(c):
        x = c.input("x", dims(c, c.int(0, 3)), lo, hi) if c.flag() else c.param("x", dims(c, c.int(1, 3)), lo, hi)
        return c.finish(getattr(c.g, op)(x))
    return build


def b_matmul(c):
    m, k, n = c.int(1, 4), c.int(1, 4), c.int(1, 4)
    ta, tb = c.flag(), c.flag()
    batch_a, batch_b = broadcast_pair(c) if c.flag() else ((), ())    # rank > 2: batched, broadcast
    a = c.param("a", batch_a + ((k, m) if ta else (m, k)))
    b = c.param("b", batch_b + ((n, k) if tb else (k, n)))
    return c.finish(c.g.matmul(a, b, trans_a=ta, trans_b=tb))


def b_conv(c):
    s = conv_setup(c)
    x = c.input("x", (s["ci"], s["h"], s["w"]))
    w = c.param("w", (s["k"], s["cg"], s["kh"], s["kw"]))
    b = c.param("b", (s["k"],)) if c.flag() else None
    return c.finish(c.g.conv(x, w, b, stride=s["stride"], pad=s["pad"], **s["geo"]))


def b_conv_dx(c):
    s = conv_setup(c)
    dy = c.param("dy", (s["n"], s["k"], *s["out"]))
    w = c.param("w", (s["k"], s["cg"], s["kh"], s["kw"]))
    return c.finish(c.g.conv_dx(dy, w, s["st"], s["pads"], (s["h"], s["w"]), **s["geo"]))


def b_conv_dw(c):
    s = conv_setup(c)
    x = c.param("x", (s["n"], s["ci"], s["h"], s["w"]))
    dy = c.param("dy", (s["n"], s["k"], *s["out"]))
    return c.finish(c.g.conv_dw(x, dy, s["st"], s["pads"], (s["kh"], s["kw"]), **s["geo"]))


def b_maxpool(c):
    size, stride, hw, _ = pool_setup(c)
    pad = 1 if min(size) >= 2 and c.flag() else 0    # padded max pool (-inf border, Inception's 3x3/1)
    x = c.input("x", (c.int(1, 2), *hw))
    return c.finish(c.g.maxpool(x, size, stride, pad=pad, ceil_mode=c.flag()))


def b_avgpool(c):
    size, stride, hw, _ = pool_setup(c)
    pad = 1 if min(size) >= 2 and c.flag() else 0
    return c.finish(c.g.avgpool(c.input("x", (c.int(1, 2), *hw)), size, stride, pad=pad, ceil_mode=c.flag(),
                                count_include_pad=c.flag()))


def b_maxpool_route(c):
    size, stride, hw, out = pool_setup(c)
    ch = c.int(1, 2)
    x = c.const(c.values((c.batch, ch, *hw)))
    return c.finish(c.g.maxpool_route(x, c.param("dy", (c.batch, ch, *out)), size, stride))


def b_maxpool_gather(c):
    size, stride, hw, _ = pool_setup(c)
    shape = (c.batch, c.int(1, 2), *hw)
    return c.finish(c.g.maxpool_gather(c.const(c.values(shape)), c.param("gv", shape), size, stride))


def b_avgpool_spread(c):
    size, stride, hw, out = pool_setup(c)
    return c.finish(c.g.avgpool_spread(c.param("dy", (c.batch, c.int(1, 2), *out)), size, stride, hw))


def b_global_avgpool(c):
    return c.finish(c.g.global_avgpool(c.input("x", dims(c, 3, 1, 4))))


def b_global_avgpool_spread(c):
    n, ch, h, w = c.batch, c.int(1, 3), c.int(1, 4), c.int(1, 4)
    return c.finish(c.g.global_avgpool_spread(c.param("dy", (n, ch)), c.const(np.zeros((n, ch, h, w)))))


def _axes(c, rank):
    if c.flag():
        return None
    axes = tuple(i for i in range(rank) if c.flag())
    return axes or (rank - 1,)


def _reduce(op):
    def build(c):
        shape = dims(c, c.int(1, 4))
        x = c.param("x", shape)
        return c.finish(getattr(c.g, op)(x, axes=_axes(c, len(shape)), keepdims=c.flag()))
    return build


def b_broadcast_like(c):
    like = dims(c, c.int(1, 4))
    axes = _axes(c, len(like)) or tuple(range(len(like)))
    keep = c.flag()
    red = tuple(1 if i in axes else d for i, d in enumerate(like)) if keep else \
        tuple(d for i, d in enumerate(like) if i not in axes)
    return c.finish(c.g.broadcast_like(c.param("dy", red), c.const(np.zeros(like)), axes, keep, mean=c.flag()))


def _small_and_big(c):
    small = tuple(1 if c.flag() else d for d in dims(c, c.int(1, 3)))
    big = dims(c, c.int(0, 2)) + tuple(c.int(1, 3) if d == 1 else d for d in small)
    return small, big


def b_sum_to(c):
    small, big = _small_and_big(c)
    return c.finish(c.g.sum_to(c.param("x", big), c.const(np.zeros(small))))


def b_expand_like(c):
    small, big = _small_and_big(c)
    return c.finish(c.g.expand_like(c.param("x", small), c.const(np.zeros(big))))


def b_reshape(c):
    a, b, d = c.int(1, 3), c.int(1, 3), c.int(1, 4)
    x = c.input("x", (a, b, d))
    target = c.pick([(None, -1), (None, a * b, d), (None, d, -1), (None, 1, a, b * d)], "target")
    return c.finish(c.g.reshape(x, target) if c.flag() else c.g.flatten(x))


def b_reshape_like(c):
    a, b, d = c.int(1, 3), c.int(1, 3), c.int(1, 3)
    return c.finish(c.g.reshape_like(c.param("x", (a, b * d)), c.const(np.zeros((b, a, d)))))


def b_transpose(c):
    shape = dims(c, c.int(2, 4))
    perm = tuple(int(i) for i in c.rng.permutation(len(shape)))
    return c.finish(c.g.transpose(c.param("x", shape), perm if c.flag() else None))


def b_concat(c):
    rank = c.int(1, 4)
    base = dims(c, rank)
    axis = c.int(0, rank - 1)
    parts = []
    for i in range(c.int(2, 3)):
        shape = tuple(c.int(1, 3) if j == axis else d for j, d in enumerate(base))
        parts.append(c.param(f"p{i}", shape))
    return c.finish(c.g.concat(parts, axis=axis))


def b_slice(c):
    shape = dims(c, c.int(1, 3), 1, 4)
    axis = c.int(0, len(shape) - 1)
    start = c.int(0, shape[axis] - 1)
    stop = c.int(start + 1, shape[axis])
    return c.finish(c.g.slice(c.param("x", shape), axis, start, stop))


def b_unslice(c):
    like = dims(c, c.int(1, 3), 1, 4)
    axis = c.int(0, len(like) - 1)
    start = c.int(0, like[axis] - 1)
    gshape = tuple(c.int(1, like[axis] - start) if i == axis else d for i, d in enumerate(like))
    return c.finish(c.g.unslice(c.param("gv", gshape), c.const(np.zeros(like)), axis, start))


def b_pad2d(c):
    shape = dims(c, 3, 1, 3)
    mode = c.pick(["constant", "reflect", "edge"], "mode")
    top = 2 if mode != "reflect" else shape[1] - 1            # reflect pads less than the dim (torch)
    side = 2 if mode != "reflect" else shape[2] - 1
    pads = (c.int(0, top), c.int(0, top), c.int(0, side), c.int(0, side))
    return c.finish(c.g.pad2d(c.input("x", shape), pads, value=float(c.int(-1, 1)), mode=mode))


def b_crop2d(c):
    pads = dims(c, 4, 0, 2)
    mode = c.pick(["constant", "reflect", "edge"], "mode")
    h0 = c.int(1, 3) if mode != "reflect" else max(pads[:2]) + c.int(1, 2)   # reflect: border < plane
    w0 = c.int(1, 3) if mode != "reflect" else max(pads[2:]) + c.int(1, 2)
    h, w = pads[0] + pads[1] + h0, pads[2] + pads[3] + w0
    return c.finish(c.g.crop2d(c.input("x", (c.int(1, 2), h, w)), pads, mode=mode))


def b_softmax(c):
    shape = dims(c, c.int(1, 3), 1, 4)
    return c.finish(c.g.softmax(c.param("x", shape), axis=c.int(-len(shape), len(shape) - 1)))


def _labels(c, m, k):
    """Integer class ids, or float one-hot / soft labels (graph values: differentiated too)."""
    ids = c.rng.integers(0, k, size=m)
    if c.flag():
        return c.const(ids.astype(np.int64))
    soft = c.rng.uniform(0.1, 1.0, size=(m, k)) if c.flag() else np.eye(k)[ids]
    c.wrt.append("labels")
    return c.g.param("labels", value=soft / soft.sum(axis=1, keepdims=True))


def b_softmax_cross_entropy(c):
    m, k = c.int(1, 4), c.int(2, 5)
    return c.finish(c.g.softmax_cross_entropy(c.param("z", (m, k)), _labels(c, m, k)))


def b_softmax_ce_grad(c):
    m, k = c.int(1, 4), c.int(2, 5)
    return c.finish(c.g.softmax_ce_grad(c.param("z", (m, k)), _labels(c, m, k), c.param("dy", ())))


def b_cross_entropy(c):
    m, k = c.int(1, 4), c.int(2, 5)
    return c.finish(c.g.cross_entropy(c.param("p", (m, k), 0.2, 1.0), _labels(c, m, k)))


def b_cross_entropy_grad(c):
    m, k = c.int(1, 4), c.int(2, 5)
    return c.finish(c.g.cross_entropy_grad(c.param("p", (m, k), 0.2, 1.0), _labels(c, m, k), c.param("dy", ())))


def _pair_loss(op, with_dy):
    def build(c):
        shape = dims(c, c.int(1, 3))
        a = c.param("a", shape)
        b = c.param("b", shape, 0.05, 0.95)              # targets in (0, 1) (for bce)
        args = (a, b, c.param("dy", ())) if with_dy else (a, b)
        return c.finish(getattr(c.g, op)(*args))
    return build


OP_BUILDERS = {
    "add": _binary("add"), "mul": _binary("mul"), "sub": _binary("sub"), "max": _binary("max"),
    "div": _binary("div", 0.5, 2.0),
    "copy": _unary("copy"), "identity": _unary("identity"), "neg": _unary("neg"), "exp": _unary("exp"),
    "log": _unary("log", 0.5, 2.0), "sqrt": _unary("sqrt", 0.5, 2.0), "sigmoid": _unary("sigmoid"),
    "tanh": _unary("tanh"), "relu": _unary("relu"), "cos": _unary("cos"),
    "matmul": b_matmul, "conv": b_conv, "conv_dx": b_conv_dx, "conv_dw": b_conv_dw,
    "maxpool": b_maxpool, "avgpool": b_avgpool, "maxpool_route": b_maxpool_route,
    "maxpool_gather": b_maxpool_gather, "avgpool_spread": b_avgpool_spread,
    "global_avgpool": b_global_avgpool, "global_avgpool_spread": b_global_avgpool_spread,
    "sum": _reduce("sum"), "mean": _reduce("mean"), "broadcast_like": b_broadcast_like,
    "sum_to": b_sum_to, "expand_like": b_expand_like,
    "reshape": b_reshape, "reshape_like": b_reshape_like, "transpose": b_transpose, "concat": b_concat,
    "slice": b_slice, "unslice": b_unslice, "pad2d": b_pad2d, "crop2d": b_crop2d,
    "softmax": b_softmax, "softmax_cross_entropy": b_softmax_cross_entropy, "softmax_ce_grad": b_softmax_ce_grad,
    "cross_entropy": b_cross_entropy, "cross_entropy_grad": b_cross_entropy_grad,
    "mse": _pair_loss("mse", False), "mse_grad": _pair_loss("mse_grad", True),
    "bce_with_sigmoid": _pair_loss("bce_with_sigmoid", False), "bce_grad": _pair_loss("bce_grad", True),
}
OP_BUILDERS.update(CNN_BUILDERS)      # batchnorm, lrn, prelu, ... (tests/cnn_gradcheck_builders.py)


def b_allreduce(c):
    """One rank (no launcher): the reduction is a copy and its gradient rule, another allreduce, the identity
    (tests/test_mpi.py checks the rule on two ranks)."""
    from graphc.distributed import world
    from graphc.ops.collective import allreduce
    return c.finish(allreduce(c.g, c.param("x", dims(c, c.int(1, 3))), world().id, c.pick(["mean", "sum"])))


OP_BUILDERS.update(allreduce=b_allreduce, allreduce_wait=b_allreduce)

DIFFERENTIABLE = sorted(n for n, d in OPS.items() if d.differentiable and not d.source)


def test_builders_cover_every_differentiable_op():
    missing = sorted(set(DIFFERENTIABLE) - set(OP_BUILDERS))
    assert not missing, f"differentiable ops with no gradcheck builder in tests/test_autodiff.py: {missing}"
    for name in DIFFERENTIABLE:
        assert OPS[name].grad is not None, f"op {name!r} is differentiable but has no gradient rule"


def assert_backward_structure(gg):
    """Only table ops; every backward node and every edge into one names the gate rule that made it."""
    for n, d in gg.nx.nodes(data=True):
        assert d["op"] in OPS, n
        if d["role"] == "backward":
            assert d["rule"], f"backward node {n!r} ({d['op']}) has no rule"
    for u, v, e in gg.nx.edges(data=True):
        if gg.nx.nodes[v]["role"] == "backward":
            assert e.get("rule"), f"edge {u!r} -> {v!r} into a backward node has no rule"


@pytest.mark.parametrize("op", sorted(OP_BUILDERS))
@PROPERTY
@given(data=st.data())
def test_gradcheck_every_op(op, data):
    c = OP_BUILDERS[op](Case(data))
    assert any(d["op"] == op for _, d in c.g.nx.nodes(data=True))
    report = gc.gradcheck(c.g, c.feeds, wrt=c.wrt, loss="loss", tol=1e-6, training=getattr(c, "training", False))
    assert report.ok and report.worst <= 1e-6
    assert set(report.errors) == set(c.wrt)
    assert_backward_structure(gc.grad(c.g, wrt=c.wrt, loss="loss"))


# ================================================================== zoo models at small size
ZOO_SMALL = {
    "mlp": lambda: models.mlp(),
    "lenet5": lambda: models.lenet5(),
    "mnist_convnet": lambda: models.mnist_convnet(),     # dropout in the graph, fixed: identity at inference
    "codelab_cnn": lambda: models.codelab_cnn(),
    "resnet_block": lambda: models.resnet_block(),
    "inception_block": lambda: models.inception_block(),
    "seed_cnn": lambda: models.seed_cnn(),
}


def zoo_feeds(g, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    feeds = {}
    for n in g.inputs:
        d = g.nx.nodes[n]
        shape = tuple(batch if isinstance(s, str) else s for s in d["shape"])
        feeds[n] = rng.integers(0, 10 if n == "labels" else 2, size=shape) if d["dtype"].startswith("int") \
            else rng.normal(size=shape)
    if "labels" in feeds and g.name == "seed_cnn":
        feeds["labels"] %= 2
    return feeds


@pytest.mark.parametrize("name", sorted(ZOO_SMALL))
def test_gradcheck_zoo_models(name):
    g = ZOO_SMALL[name]()
    feeds = zoo_feeds(g)
    report = gc.gradcheck(g, feeds, wrt=g.param_names + ["x"], max_elements=6, tol=1e-6)   # the image on request
    assert report.ok
    assert set(report.errors) == set(g.param_names) | {"x"}


def test_gradcheck_seed_cnn_at_exact_seed_input():
    g = models.seed_cnn()
    assert gc.gradcheck(g, {"x": models.SEED_X, "labels": models.SEED_LABELS}, wrt=g.param_names + ["x"]).ok


# ================================================================== gradcheck catches a wrong rule
def _mul_graph():
    g = gc.Graph("mul", dtype="float64")
    x = g.input("x", (None, 3))
    w = g.param("w", value=[0.5, -1.0, 2.0])
    g.output(g.sum(g.mul(g.tanh(x), w), name="loss"))
    return g, {"x": np.array([[0.1, 0.2, 0.3], [-1.0, 0.5, 2.0]])}


def test_wrong_rule_is_caught(monkeypatch):
    g, feeds = _mul_graph()
    assert gc.gradcheck(g, feeds, wrt=["w", "x"]).ok

    def wrong_swap(gb, node, dy):      # mul:swap with the swap forgotten: dL/da = dy * a
        a, b = node.inputs
        with gb.rule("mul:swap"):
            return [gb.sum_to(gb.mul(dy, a), a) if tuple(a.shape) != tuple(dy.shape) else gb.mul(dy, a),
                    gb.sum_to(gb.mul(dy, b), b) if tuple(b.shape) != tuple(dy.shape) else gb.mul(dy, b)]

    monkeypatch.setattr(OPS["mul"], "grad", wrong_swap)
    with pytest.raises(gc.GradError) as e:
        gc.gradcheck(g, feeds, wrt=["w"])
    assert "w" in str(e.value) and "FAIL" in str(e.value)
    report = gc.gradcheck(g, feeds, wrt=["w", "x"], raise_on_failure=False)
    assert not report and not report.ok
    assert report.errors["w"] > 1e-3


# ================================================================== public names and structure
def test_grad_outputs_are_named_grad_slash_value():
    g = models.lenet5()
    gg = gc.grad(g)
    assert isinstance(gg, gc.Graph)
    assert gg.outputs == [f"grad/{p}" for p in g.param_names]
    for p in g.param_names:
        assert gg.nx.nodes[f"grad/{p}"]["shape"] == g.nx.nodes[p]["shape"]
    gx = gc.grad(g, wrt=[g["x"], "c1.w"])            # values or names; inputs on request
    assert gx.outputs == ["grad/x", "grad/c1.w"]
    assert len(g) < len(gg)                          # the forward graph is left as it was
    assert not any(d["role"] == "backward" for _, d in g.nx.nodes(data=True))


def test_gradient_wrt_inputs_on_request():
    g = gc.Graph("lin", dtype="float64")
    x = g.input("x", (None, 2))
    w = g.param("w", value=[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    g.output(g.sum(g.dense(x, w), name="loss"))
    out = gc.compile(gc.grad(g, wrt=["x"])).run({"x": np.zeros((4, 2))})
    np.testing.assert_allclose(out["grad/x"], np.tile([9.0, 12.0], (4, 1)), **F64)   # column sums of w


def test_gradient_of_unrelated_param_is_zero():
    g = gc.Graph("u", dtype="float64")
    x = g.input("x", (None, 2))
    g.param("unused", value=[1.0, 2.0])
    g.output(g.sum(g.mul(x, g.param("w", value=[1.0, 1.0])), name="loss"))
    out = gc.compile(gc.grad(g)).run({"x": np.ones((1, 2))})
    np.testing.assert_array_equal(out["grad/unused"], [0.0, 0.0])


def _finite_diff(exe, feeds, state_name, idx, loss="loss", eps=1e-6):
    arr = exe.state[state_name].reshape(-1)
    old = arr[idx]
    arr[idx] = old + eps
    up = float(exe.run(feeds, outputs=[loss])[loss])
    arr[idx] = old - eps
    down = float(exe.run(feeds, outputs=[loss])[loss])
    arr[idx] = old
    return (up - down) / (2 * eps)


def test_lenet5_backward_graph_is_table_ops_with_rules_and_equals_finite_differences():
    g = models.lenet5()
    gg = gc.grad(g)
    assert_backward_structure(gg)
    backward = [d for _, d in gg.nx.nodes(data=True) if d["role"] == "backward"]
    rules = {d["rule"] for d in backward}
    for r in ("conv:dW", "conv:dX-fullconv", "conv:db", "pool:route", "max:route", "matmul:swap",
              "add:distribute", "softmax-ce:(O-y)/m", "reshape:undo"):
        assert r in rules, r
    assert {d["op"] for d in backward} <= set(OPS)
    feeds = zoo_feeds(g, batch=3, seed=1)
    grads = gc.compile(gg, backend="reference", dtype="float64").run(feeds)
    fwd = gc.compile(g, backend="reference", dtype="float64")
    rng = np.random.default_rng(2)
    for p in g.param_names:
        for idx in rng.choice(int(np.prod(g.nx.nodes[p]["shape"])), 3, replace=False):
            num = _finite_diff(fwd, feeds, p, idx)
            assert grads[f"grad/{p}"].reshape(-1)[idx] == pytest.approx(num, rel=1e-5, abs=1e-8), (p, idx)


# ================================================================== copy gates at fan-outs
def _copy_add_nodes(gg):
    return [n for n, d in gg.nx.nodes(data=True) if d["role"] == "backward" and d["rule"] == "copy:add"
            and d["op"] == "add"]


def test_copy_gate_at_x_times_x_sums_the_gradients():
    g = gc.Graph("sq", dtype="float64")
    x = g.input("x", (None, 3))
    g.output(g.sum(g.mul(x, x), name="loss"))
    gg = gc.grad(g, wrt=["x"])
    cp = gg.nx.nodes["x.copy"]
    assert cp["op"] == "copy" and cp["inputs"] == ("x",)
    mul = [d for _, d in gg.nx.nodes(data=True) if d["op"] == "mul" and d["role"] == "forward"][0]
    assert mul["inputs"] == ("x.copy", "x.copy")
    assert len(_copy_add_nodes(gg)) == 1                  # the gradient adder sums the two uses
    xv = np.array([[1.0, -2.0, 3.0]])
    np.testing.assert_allclose(gc.compile(gg).run({"x": xv})["grad/x"], 2 * xv, **F64)


def test_copy_gate_at_a_shared_weight_sums_both_uses():
    g = gc.Graph("tied", dtype="float64")
    x = g.input("x", (None, 3))
    w = g.param("w", value=np.array([[0.5, -1.0, 0.2], [0.3, 0.8, -0.6], [1.0, 0.1, 0.4]]))
    h = g.tanh(g.dense(x, w))
    g.output(g.sum(g.mul(g.dense(h, w), g.const(np.array([1.0, -2.0, 0.5]))), name="loss"))
    gg = gc.grad(g)
    assert gg.nx.nodes["w.copy"]["op"] == "copy" and len(_copy_add_nodes(gg)) == 1
    assert gc.gradcheck(g, {"x": np.array([[0.2, -0.4, 1.0], [1.5, 0.3, -0.7]])}).ok


def test_copy_gate_at_resnet_skip_fork():
    g = models.resnet_block()
    gg = gc.grad(g, wrt=["x"] + g.param_names)
    users = sorted(u for u in gg.nx.successors("x.copy") if gg.nx.nodes[u]["role"] == "forward")
    assert users == ["res1.conv1", "res1.proj"]          # the fork: main path and projection skip
    assert sorted(gg.nx.successors("x")) == ["x.copy"]
    adders = _copy_add_nodes(gg)
    # the adder that feeds x's gradient sums the two conv dX gradients
    into_x = [n for n in adders if all(gg.nx.nodes[i]["rule"] == "conv:dX-fullconv" for i in gg.nx.nodes[n]["inputs"])]
    assert len(into_x) == 1
    feeds = zoo_feeds(g)
    out = gc.compile(gg, dtype="float64", keep=gg.nx.nodes[into_x[0]]["inputs"]).run(
        feeds, outputs=["grad/x", *gg.nx.nodes[into_x[0]]["inputs"]])
    a, b = (out[i] for i in gg.nx.nodes[into_x[0]]["inputs"])
    np.testing.assert_allclose(out["grad/x"], a + b, **F64)
    assert gc.gradcheck(g, feeds, wrt=["x"], max_elements=16).ok
    # the identity skip of the small resnet forks a derived value (the stem's ReLU output)
    gr = gc.grad(models.resnet())
    assert sorted(u for u in gr.nx.successors("stem.relu.copy")
                  if gr.nx.nodes[u]["role"] == "forward") == ["res1.conv1", "res1.join"]


# ================================================================== ties
def test_max_ties_go_to_the_second_input_and_relu_grad_is_zero_at_zero():
    g = gc.Graph("ties", dtype="float64")
    a = g.param("a", value=[1.0, 2.0, 3.0])
    b = g.param("b", value=[1.0, 5.0, 0.0])
    x = g.param("x", value=[0.0, -1.0, 2.0])
    r = g.const(np.array([1.0, 10.0, 100.0]))
    g.output(g.add(g.sum(g.mul(g.max(a, b), r)), g.sum(g.mul(g.relu(x), r)), name="loss"))
    out = gc.compile(gc.grad(g)).run({})
    np.testing.assert_array_equal(out["grad/a"], [0.0, 0.0, 100.0])     # tie at index 0 -> b
    np.testing.assert_array_equal(out["grad/b"], [1.0, 10.0, 0.0])
    np.testing.assert_array_equal(out["grad/x"], [0.0, 0.0, 100.0])     # relu'(0) = 0


def test_maxpool_ties_go_to_the_first_max():
    # seeds/002's example A2 -> [[4,8],[22,26]]; its bottom-left window [[9,20],[22,22]] holds a tie.
    # graphc routes ties to the first maximum in row-major order (as PyTorch); the seed's figure draws
    # each gradient at the bottom-right of its window, which for that window is the second 22.
    a2 = np.array([[2, 2, 5, 6], [3, 4, 7, 8], [9, 20, 23, 24], [22, 22, 25, 26]], dtype=float)
    g = gc.Graph("tie", dtype="float64")
    x = g.input("x", (None, 1, 4, 4))
    dp = g.const(np.array([[[[1.0, 2.0], [3.0, 4.0]]]]))           # dL/dP1 = [[x1,x2],[x3,x4]]
    g.output(g.sum(g.mul(g.maxpool(x, 2), dp), name="loss"))
    out = gc.compile(gc.grad(g, wrt=["x"])).run({"x": a2[None, None]})["grad/x"][0, 0]
    np.testing.assert_array_equal(out, [[0, 0, 0, 0], [0, 1, 0, 2], [0, 0, 0, 0], [3, 0, 0, 4]])
    flat = gc.compile(gc.grad(g, wrt=["x"])).run({"x": np.full((1, 1, 4, 4), 5.0)})["grad/x"][0, 0]
    np.testing.assert_array_equal(flat, [[1, 0, 2, 0], [0, 0, 0, 0], [3, 0, 4, 0], [0, 0, 0, 0]])


def test_overlapping_maxpool_windows_accumulate():
    x = np.array([[[[0.0, 1.0, 0.0], [1.0, 9.0, 1.0], [0.0, 1.0, 0.0]]]])
    g = gc.Graph("ov", dtype="float64")
    g.output(g.sum(g.maxpool(g.input("x", (None, 1, 3, 3)), 2, 1), name="loss"))
    out = gc.compile(gc.grad(g, wrt=["x"])).run({"x": x})["grad/x"]
    np.testing.assert_array_equal(out[0, 0], [[0, 0, 0], [0, 4, 0], [0, 0, 0]])


# ================================================================== the collapsed softmax-CE rule
@pytest.mark.parametrize("one_hot", [False, True])
def test_collapsed_softmax_ce_equals_softmax_then_cross_entropy(one_hot):
    def build(collapsed):
        g = gc.Graph("ce", dtype="float64")
        x = g.input("x", (None, 4))
        y = g.input("labels", (None, 3) if one_hot else (None,), dtype="float64" if one_hot else "int64")
        z = g.dense(x, g.param("w", (3, 4), init="normal", scale=0.7), g.param("b", (3,), init="normal"), name="z")
        loss = g.softmax_cross_entropy(z, y, name="loss") if collapsed else \
            g.cross_entropy(g.softmax(z, name="O"), y, name="loss")
        g.output(loss)
        return g
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, 5)
    feeds = {"x": rng.normal(size=(5, 4)), "labels": np.eye(3)[labels] if one_hot else labels}
    ga, gb = build(True), build(False)
    wa, wb = gc.grad(ga, wrt=["w", "b", "z", "x"]), gc.grad(gb, wrt=["w", "b", "z", "x"])
    rules_a = {d["rule"] for _, d in wa.nx.nodes(data=True) if d["role"] == "backward"}
    rules_b = {d["rule"] for _, d in wb.nx.nodes(data=True) if d["role"] == "backward"}
    assert "softmax-ce:(O-y)/m" in rules_a and "softmax:jacobian" not in rules_a
    assert {"softmax:jacobian", "ce:-y/p"} <= rules_b and "softmax-ce:(O-y)/m" not in rules_b
    ra, rb = gc.compile(wa).run(feeds), gc.compile(wb).run(feeds)
    for k in ra:
        np.testing.assert_allclose(ra[k], rb[k], rtol=1e-10, atol=1e-12)
    # and it is (O - y) / m
    z = gc.compile(ga, keep=["z"]).run(feeds, outputs=["z"])["z"]
    o = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(ra["grad/z"], (o - np.eye(3)[labels]) / 5, **F64)


# ================================================================== second use of gc.grad
def _second_order_case(kind):
    g = gc.Graph(kind, dtype="float64")
    rng = np.random.default_rng(4)
    if kind == "dense":
        x = g.input("x", (None, 3))
        w = g.param("w", value=rng.normal(size=(2, 3)) * 0.7)
        y = g.tanh(g.dense(x, w, g.param("b", value=rng.normal(size=2))))
        g.output(g.sum(g.mul(y, y), name="loss"))
        feeds = {"x": rng.normal(size=(4, 3))}
    else:
        x = g.input("x", (None, 1, 5, 5))
        y = g.input("labels", (None,), dtype="int64")
        w = g.param("w", value=rng.normal(size=(2, 1, 3, 3)) * 0.5)
        h = g.maxpool(g.tanh(g.conv(x, w, g.param("b", value=[0.1, -0.2]), pad=1)), 2)
        logits = g.dense(g.flatten(h), g.param("v", value=rng.normal(size=(3, 8)) * 0.5))
        g.output(g.softmax_cross_entropy(logits, y, name="loss"))
        feeds = {"x": rng.normal(size=(2, 1, 5, 5)), "labels": np.array([0, 2])}
    return g, feeds


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_second_use_of_grad_on_its_own_output(kind):
    g, feeds = _second_order_case(kind)
    gg = gc.grad(g)
    gw = gg["grad/w"]
    gg.output(gg.sum(gg.mul(gw, gw), name="r"))            # r = sum((dL/dw)^2)
    g2 = gc.grad(gg, wrt=["w"], loss="r")
    assert g2.outputs == ["grad/w"]
    assert_backward_structure(g2)
    d2 = gc.compile(g2).run(feeds)["grad/w"]
    fwd = gc.compile(gg, dtype="float64")
    for idx in range(d2.size):
        num = _finite_diff(fwd, feeds, "w", idx, loss="r")
        assert d2.reshape(-1)[idx] == pytest.approx(num, rel=1e-5, abs=1e-8)
    assert gc.gradcheck(gg, feeds, wrt=["w", "x"], loss="r").ok
    # the first-order gradient is still there, renamed, and unchanged
    first = gc.compile(gg).run(feeds)["grad/w"]
    renamed = [n for n in g2.nx.nodes if re.fullmatch(r"grad/w\.\d+", n)]
    assert len(renamed) == 1
    np.testing.assert_allclose(gc.compile(g2, keep=renamed).run(feeds, outputs=renamed)[renamed[0]], first, **F64)


def test_second_use_when_the_new_loss_reads_a_gradient_independent_of_wrt():
    # r also reads grad/c, which does not depend on w: the second pass must keep the first pass's nodes
    g = gc.Graph("two", dtype="float64")
    x = g.input("x", (None, 3))
    w, c = g.param("w", value=[1.0, 2.0, 3.0]), g.param("c", value=[0.5, 0.5, 0.5])
    g.output(g.add(g.sum(g.mul(g.mul(w, w), x)), g.sum(g.mul(c, x)), name="loss"))
    gg = gc.grad(g)
    gg.output(gg.add(gg.sum(gg.mul(gg["grad/w"], gg["grad/w"])), gg.sum(gg.mul(gg["grad/c"], gg["grad/c"])), name="r"))
    g2 = gc.grad(gg, wrt=["w"], loss="r")
    # grad/w = 2 w sum_n x = 4 w (x = ones, batch 2); r = 16 sum(w^2) + const; dr/dw = 32 w
    np.testing.assert_allclose(gc.compile(g2).run({"x": np.ones((2, 3))})["grad/w"], [32.0, 64.0, 96.0], **F64)


# ================================================================== dropout in training
def test_dropout_gradient_uses_the_same_mask_as_the_forward():
    g = gc.Graph("drop", dtype="float64")
    x = g.param("x", value=np.linspace(1.0, 2.0, 200).reshape(2, 100))
    rv = np.random.default_rng(5).normal(size=(2, 100))
    g.output(g.sum(g.mul(g.dropout(x, 0.5, seed=3, name="d"), g.const(rv)), name="loss"))
    gg = gc.grad(g)
    mask = gc.compile(gg, keep=["d.mask"]).run({}, outputs=["d.mask"], training=True)["d.mask"]
    assert set(np.unique(mask)) == {0.0, 2.0}
    np.testing.assert_allclose(gc.compile(gg).run({}, training=True)["grad/x"], mask * rv, **F64)
    np.testing.assert_allclose(gc.compile(gg).run({})["grad/x"], rv, **F64)            # inference: identity


# ================================================================== the seeds' backward examples
def assert_printed(actual, printed, decimals):
    """Equal to the value the seed prints, within 1.5 units of its last digit (the course adds rounded
    components, e.g. dL/db1 = 0.0846 + 0.1128 + 0.141 + 0.1692 = 0.5076 where the exact sum is 0.50772)."""
    np.testing.assert_allclose(np.asarray(actual, float).reshape(-1), np.asarray(printed, float).reshape(-1),
                               rtol=0, atol=1.5 * 10.0 ** -decimals)


SEED_FEEDS = {"x": models.SEED_X, "labels": models.SEED_LABELS}


def test_seed_notes_worked_cnn_backward():
    g = models.seed_cnn()
    o = g.softmax(g["logits"], name="O")
    g.output(o)
    out = gc.compile(g).run(SEED_FEEDS)
    assert_printed(out["O"], [0.295, 0.705], 3)
    gg = gc.grad(g, wrt=["logits", "h", "C", "conv.w", "conv.b"], loss="loss")
    gr = gc.compile(gg).run(SEED_FEEDS)
    assert_printed(gr["grad/logits"], [-0.705, 0.705], 3)                       # O - y
    assert_printed(gr["grad/h"], [0.141, 0.141], 3)
    assert_printed(gr["grad/C"], [0.0846, 0.1128, 0.141, 0.1692], 4)            # C1..C4 = flatten order
    assert_printed(gr["grad/conv.w"], [0.2538] * 4, 4)
    assert_printed(gr["grad/conv.b"], [0.5076], 4)


def test_seed_notes_worked_cnn_one_sgd_step():
    exe = gc.compile(models.seed_cnn(), optimizer=gc.optim.SGD(0.5))
    loss = exe.step(SEED_FEEDS)
    assert loss == pytest.approx(-math.log(0.295), abs=2e-3)
    p = exe.params
    assert_printed(p["conv.w"], [0.7731, -0.0269, -0.0269, 0.7731], 4)          # F+
    assert_printed(p["conv.b"], [-0.1538], 4)                                   # b1+
    # wo+ is listed as wo1..wo4 = o1's two weights then o2's: out.w is (out, in), row o1 first
    assert_printed(p["out.w"], [0.558, 1.278, -0.158, -0.678], 3)
    assert_printed(p["out.b"], [0.652, -0.052], 3)                              # bo+
    assert_printed(p["hidden.b"], [0.1295, 0.1295], 4)                          # bh+
    # the hidden weights follow the same rule: wh+ = wh - 0.5 * dL/dh (x) C
    wh = np.array([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]])
    np.testing.assert_allclose(p["hidden.w"], wh - 0.5 * np.outer([0.141032] * 2, [1.9, 0.3, 0.3, 1.9]), atol=1e-5)


def test_seed_000_5x5_filter_gradient_through_im2col():
    intended = np.array([[1, 0, -1], [1, 0, -1], [1, 0, -1]], dtype=float)[None, None]   # see test_ops
    img = np.arange(1, 26, dtype=float).reshape(1, 1, 5, 5)
    g = gc.Graph("f", dtype="float64")
    o = g.conv(g.input("I", (None, 1, 5, 5)), g.param("F", value=intended), name="O")
    g.output(g.sum(g.mul(o, g.const(np.ones((1, 1, 3, 3)))), name="loss"))   # delta = ones (3x3)
    d_f = gc.compile(gc.grad(g)).run({"I": img})["grad/F"]
    # the seed's algorithm: dL/dF = (im2col(I) x G^T) reshaped to the filter, G = delta flattened (1 x 9)
    G = np.ones((1, 9))
    seed_way = (im2col(img, 3, 3, (1, 1), (0, 0, 0, 0))[0] @ G.T).reshape(1, 1, 3, 3)
    # by hand: tap (i, j) sums the 9 patch values 63 + 9 (5i + j)
    by_hand = np.array([[63, 72, 81], [108, 117, 126], [153, 162, 171]], dtype=float)
    np.testing.assert_array_equal(seed_way[0, 0], by_hand)
    np.testing.assert_allclose(d_f[0, 0], by_hand, **F64)


def test_seed_000_maxpool_routing():
    # x_conv = [[1,3],[2,4]]: 2x2 max pool -> [4]; delta_maxpool = [10] -> delta_conv = [[0,0],[0,10]];
    # the ReLU derivative leaves it (x_conv > 0 everywhere)
    for relu in (False, True):
        g = gc.Graph("route", dtype="float64")
        x = g.input("x_conv", (None, 1, 2, 2))
        p = g.maxpool(g.relu(x) if relu else x, 2, 2)
        g.output(g.sum(g.mul(p, g.const(np.array([[[[10.0]]]]))), name="loss"))
        out = gc.compile(gc.grad(g, wrt=["x_conv"])).run({"x_conv": np.array([[[[1.0, 3.0], [2.0, 4.0]]]])})
        np.testing.assert_array_equal(out["grad/x_conv"][0, 0], [[0, 0], [0, 10]])


def test_seed_004_1d_conv_backward_formulas():
    x1, x2, x3, x4 = 2.0, -1.0, 3.0, 5.0
    w1, w2 = 0.5, -2.0
    dy1, dy2, dy3 = 1.0, 2.0, -3.0
    g = gc.Graph("conv1d", dtype="float64")
    x = g.input("x", (None, 1, 1, 4))
    y = g.conv(x, g.param("w", value=[[[[w1, w2]]]]), g.param("b", value=[0.25]), name="y")
    g.output(g.sum(g.mul(y, g.const(np.array([[[[dy1, dy2, dy3]]]]))), name="loss"))
    xv = np.array([[[[x1, x2, x3, x4]]]])
    yv = gc.compile(g, keep=["y"]).run({"x": xv}, outputs=["y"])["y"].reshape(-1)
    np.testing.assert_allclose(yv, [w1 * x1 + w2 * x2 + 0.25, w1 * x2 + w2 * x3 + 0.25, w1 * x3 + w2 * x4 + 0.25],
                               **F64)
    out = gc.compile(gc.grad(g, wrt=["x", "w", "b"])).run({"x": xv})
    assert out["grad/b"].tolist() == [dy1 + dy2 + dy3]                                   # db
    np.testing.assert_allclose(out["grad/w"].reshape(-1), [x1 * dy1 + x2 * dy2 + x3 * dy3,   # dw1
                                                           x2 * dy1 + x3 * dy2 + x4 * dy3], **F64)  # dw2
    dx = [w1 * dy1, w2 * dy1 + w1 * dy2, w2 * dy2 + w1 * dy3, w2 * dy3]
    np.testing.assert_allclose(out["grad/x"].reshape(-1), dx, **F64)
    # dx = [0, dy1, dy2, dy3, 0] * [w2, w1]: the full convolution with the flipped filter
    full = np.correlate(np.array([0, dy1, dy2, dy3, 0]), np.array([w2, w1]), mode="valid")
    np.testing.assert_allclose(out["grad/x"].reshape(-1), full, **F64)


def test_seed_004_2d_conv_backward_summary():
    # db = sum dy; dW = x * dy (valid correlation of the input with dL/dY); dx = dy_0 * w' where dy_0 is
    # dL/dY zero-padded by 1 and w' the 180-degree rotated filter.
    rng = np.random.default_rng(6)
    xv, wv, dy = rng.normal(size=(4, 4)), rng.normal(size=(2, 2)), rng.normal(size=(3, 3))
    g = gc.Graph("conv2d", dtype="float64")
    y = g.conv(g.input("x", (None, 1, 4, 4)), g.param("w", value=wv[None, None]), g.param("b", value=[0.0]))
    g.output(g.sum(g.mul(y, g.const(dy[None, None])), name="loss"))
    out = gc.compile(gc.grad(g, wrt=["x", "w", "b"])).run({"x": xv[None, None]})

    def corr(a, k):
        return np.array([[np.sum(a[i:i + k.shape[0], j:j + k.shape[1]] * k)
                          for j in range(a.shape[1] - k.shape[1] + 1)] for i in range(a.shape[0] - k.shape[0] + 1)])
    assert out["grad/b"][0] == pytest.approx(dy.sum(), rel=1e-12)
    np.testing.assert_allclose(out["grad/w"][0, 0], corr(xv, dy), **F64)
    np.testing.assert_allclose(out["grad/x"][0, 0], corr(np.pad(dy, 1), wv[::-1, ::-1]), **F64)


# ================================================================== optimizers as graph updates
def _const_grad_graph(w0, grad):
    """loss = sum(w * g_const): its gradient w.r.t. w is exactly g_const."""
    g = gc.Graph("const_grad", dtype="float64")
    w = g.param("w", value=w0)
    g.output(g.sum(g.mul(w, g.const(np.asarray(grad, float))), name="loss"))
    return g


# seeds/000's Adam example: w1, w2, b0, b1, conv1 and their gradients
ADAM_W = [0.5, 0.3, 0.2, -0.1, 0.8]
ADAM_G = [0.02, 0.01, 0.01, -0.03, 0.05]


def test_seed_000_adam_first_step_uncorrected():
    exe = gc.compile(_const_grad_graph(ADAM_W, ADAM_G),
                     optimizer=gc.optim.Adam(0.01, beta1=0.9, beta2=0.995, bias_correction=False))
    exe.step({})
    m, v = exe.state["optim/m/w"], exe.state["optim/v/w"]
    assert m[0] == pytest.approx(0.002, rel=1e-12) and v[0] == pytest.approx(2e-6, rel=1e-12)     # momentum_w1, velocity_w1
    # the seed prints momentum_w2 = -0.004 and velocity_w2 = 0.000008; with dw2 = 0.01 the formulas give
    # 0.1 * 0.01 = 0.001 and 0.005 * 0.01^2 = 5e-7 (the seed's w2 line is a slip); b0, b1, conv1 as printed
    np.testing.assert_allclose(m, [0.002, 0.001, 0.001, -0.003, 0.005], rtol=1e-12)
    np.testing.assert_allclose(v, [0.000002, 0.0000005, 0.0000005, 0.0000045, 0.0000125], rtol=1e-12)
    eps = 1e-8
    w1 = 0.5 - 0.01 * 0.002 / (math.sqrt(0.000002) + eps)
    assert exe.params["w"][0] == pytest.approx(w1, rel=1e-12)
    np.testing.assert_allclose(exe.params["w"], np.array(ADAM_W) - 0.01 * m / (np.sqrt(v) + eps), rtol=1e-12)


def test_seed_000_adam_first_step_bias_corrected():
    exe = gc.compile(_const_grad_graph(ADAM_W, ADAM_G), optimizer=gc.optim.Adam(0.01, beta1=0.9, beta2=0.995))
    exe.step({})
    # m_hat = 0.002 / 0.1 = 0.02, v_hat = 2e-6 / 0.005 = 4e-4, sqrt = 0.02: w1 = 0.5 - 0.01 = 0.49
    assert exe.params["w"][0] == pytest.approx(0.49, abs=1e-8)                # eps moves it by 5e-9
    dw = np.array(ADAM_G)
    m_hat, v_hat = 0.1 * dw / 0.1, 0.005 * dw * dw / 0.005
    np.testing.assert_allclose(exe.params["w"], np.array(ADAM_W) - 0.01 * m_hat / (np.sqrt(v_hat) + 1e-8), **F64)
    assert exe.state["optim/t"] == 1


def test_adam_matches_the_paper_over_steps():
    rng = np.random.default_rng(7)
    w0, c = rng.normal(size=4), rng.normal(size=4)
    g = gc.Graph("quad", dtype="float64")
    w = g.param("w", value=w0)
    g.output(g.sum(g.mul(g.mul(w, w), g.const(c ** 2)), name="loss"))       # grad = 2 c^2 w
    exe = gc.compile(g, optimizer=gc.optim.Adam(0.05, beta1=0.8, beta2=0.99, eps=1e-6))
    wn, m, v = w0.copy(), np.zeros(4), np.zeros(4)
    for t in range(1, 4):
        exe.step({})
        grad = 2 * c ** 2 * wn
        m = 0.8 * m + 0.2 * grad
        v = 0.99 * v + 0.01 * grad ** 2
        wn = wn - 0.05 * (m / (1 - 0.8 ** t)) / (np.sqrt(v / (1 - 0.99 ** t)) + 1e-6)
        np.testing.assert_allclose(exe.params["w"], wn, rtol=1e-10)


def test_sgd_momentum_weight_decay_follows_alexnet_rule_over_two_steps():
    rng = np.random.default_rng(8)
    w0, c = rng.normal(size=(2, 3)), rng.normal(size=(2, 3))
    g = gc.Graph("quad", dtype="float64")
    w = g.param("w", value=w0)
    g.output(g.sum(g.mul(g.mul(w, w), g.const(c)), name="loss"))            # dL/dw = 2 c w
    lr = 0.1
    exe = gc.compile(g, optimizer=gc.optim.SGD(lr, momentum=0.9, weight_decay=0.0005))
    wn, vel = w0.copy(), np.zeros_like(w0)
    for _ in range(2):
        exe.step({})
        vel = 0.9 * vel - 0.0005 * lr * wn - lr * (2 * c * wn)              # v = 0.9 v - 0.0005 lr w - lr dL/dw
        wn = wn + vel                                                        # w = w + v
        np.testing.assert_allclose(exe.state["optim/v/w"], vel, rtol=1e-12)
        np.testing.assert_allclose(exe.params["w"], wn, rtol=1e-12)


def test_plain_sgd_and_weight_decay_without_momentum():
    exe = gc.compile(_const_grad_graph([1.0, -2.0], [0.5, 0.25]), optimizer=gc.optim.SGD(0.1, weight_decay=0.01))
    exe.step({})
    np.testing.assert_allclose(exe.params["w"], np.array([1.0, -2.0]) - 0.1 * (np.array([0.5, 0.25])
                                                                              + 0.01 * np.array([1.0, -2.0])), **F64)


def _drop_net():
    g = gc.Graph("dropnet", dtype="float64", seed=1)
    x = g.input("x", (None, 6))
    y = g.input("labels", (None,), dtype="int64")
    h = g.dropout(g.relu(g.dense(x, g.param("w1", (8, 6), init="he"), g.param("b1", (8,), init="zeros"))), 0.5)
    g.output(g.softmax_cross_entropy(g.dense(h, g.param("w2", (3, 8), init="glorot")), y, name="loss"))
    return g


@pytest.mark.parametrize("opt", [lambda: gc.optim.Adam(0.01), lambda: gc.optim.SGD(0.1, momentum=0.9,
                                                                                   weight_decay=0.0005)])
def test_optimizer_state_saved_and_restored_continues_identically(opt):
    rng = np.random.default_rng(9)
    batches = [{"x": rng.normal(size=(4, 6)), "labels": rng.integers(0, 3, 4)} for _ in range(4)]
    a = gc.compile(_drop_net(), optimizer=opt())
    for b in batches[:2]:
        a.step(b)
    sd = a.state_dict()
    assert sd["__step__"] == 2
    assert any(k.startswith("optim/") and k != "optim/lr" for k in sd)
    b_exe = gc.compile(_drop_net(), optimizer=opt())
    b_exe.load_state_dict(sd)
    losses_a = [a.step(b) for b in batches[2:]]
    losses_b = [b_exe.step(b) for b in batches[2:]]
    assert losses_a == losses_b                                # dropout masks too (seeded by the step)
    for k, v in a.state.items():
        np.testing.assert_array_equal(b_exe.state[k], v, err_msg=k)
    # the saved dict was a copy, and a fresh executable that did not load it goes elsewhere
    assert not all(np.array_equal(sd[k], a.state[k]) for k in a.state)
    fresh = gc.compile(_drop_net(), optimizer=opt())
    assert [fresh.step(b) for b in batches[2:]] != losses_a


def test_state_dict_mismatch_is_a_checkpoint_error():
    a = gc.compile(_drop_net(), optimizer=gc.optim.Adam(0.01))
    sd = a.state_dict()
    sd["w1"] = np.zeros((2, 2))
    with pytest.raises(gc.CheckpointError):
        a.load_state_dict(sd)


def test_l2_penalty_gradient_is_lambda_w():
    rng = np.random.default_rng(10)
    lam = 0.3
    w1v, w2v = rng.normal(size=(3, 4)), rng.normal(size=(2, 3))

    def build(with_penalty):
        g = gc.Graph("l2", dtype="float64")
        x = g.input("x", (None, 4))
        w1, w2 = g.param("w1", value=w1v), g.param("w2", value=w2v)
        data_loss = g.mse(g.dense(g.tanh(g.dense(x, w1)), w2), g.input("t", (None, 2)))
        loss = g.add(data_loss, g.l2_penalty([w1, w2], lam, name="pen"), name="loss") if with_penalty else \
            g.identity(data_loss, name="loss")
        g.output(loss)
        return g
    feeds = {"x": rng.normal(size=(5, 4)), "t": rng.normal(size=(5, 2))}
    with_p = gc.compile(gc.grad(build(True))).run(feeds)
    without = gc.compile(gc.grad(build(False))).run(feeds)
    np.testing.assert_allclose(with_p["grad/w1"], without["grad/w1"] + lam * w1v, rtol=1e-12)
    np.testing.assert_allclose(with_p["grad/w2"], without["grad/w2"] + lam * w2v, rtol=1e-12)
    # the penalty alone: lam / 2 * sum(w^2)
    g = gc.Graph("pen", dtype="float64")
    w = g.param("w", value=w1v)
    g.output(g.l2_penalty([w], lam, name="pen"))
    assert gc.compile(g).run({})["pen"] == pytest.approx(lam / 2 * np.sum(w1v ** 2), rel=1e-12)
    np.testing.assert_allclose(gc.compile(gc.grad(g)).run({})["grad/w"], lam * w1v, **F64)
