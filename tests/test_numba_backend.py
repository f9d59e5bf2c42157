"""Differential tests of the numba backend against the reference backend: every op (forward and, through
gc.grad, backward), every fused pattern, the zoo models' training steps — with fusion on and off.

Shapes are tiny; kernels are shared through Numba's disk cache. Most convolutions run the numba conv module's
im2col strategy here (one set of kernels for every shape); the shape-generated direct kernels are
exercised by a few fused-pattern tests (tests/test_numba_conv.py covers them shape by shape)."""
import numpy as np
import pytest

import graphc as gc
from graphc import models
from graphc import ops as optable

RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(scope="module", autouse=True)
def _im2col_convs():
    mp = pytest.MonkeyPatch()
    mp.setenv("GRAPHC_CONV_STRATEGY", "im2col")
    yield
    mp.undo()


def _feeds(g, n=2, seed=0, positive=False):
    rng = np.random.default_rng(seed)
    f = {}
    for name in g.inputs:
        shape, dt = g.nx.nodes[name]["shape"], g.nx.nodes[name]["dtype"]
        s = tuple(n if isinstance(d, str) else d for d in shape)
        if dt.startswith("int"):
            f[name] = rng.integers(0, 3, s)
        else:
            v = rng.standard_normal(s)
            f[name] = (np.abs(v) + 0.5 if positive else v).astype(dt)
    return f


def _close(a, b, what, dtype=None):
    """a == b to the precision of `dtype` (default: b's): float32 (RTOL, ATOL); float64 graphs at float64
    precision (1e-10 relative), so a kernel that rounds a float64 graph through float32 fails."""
    dtype = np.dtype(np.asarray(b).dtype if dtype is None else dtype)
    rtol, atol = (1e-10, 1e-12) if dtype == np.float64 else (RTOL, ATOL)
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=rtol, atol=atol,
                               err_msg=what)


def check_run(g, feeds=None, fuse=(True, False), outputs=None, **kw):
    feeds = feeds or _feeds(g)
    ref = gc.compile(g).run(feeds, outputs=outputs)
    for fz in fuse:
        exe = gc.compile(g, backend="numba", fuse=fz, **kw)
        got = exe.run(feeds, outputs=outputs)
        for k in ref:
            _close(got[k], ref[k], f"{g.name} fuse={fz}: {k}")
    return exe


def check_grad(g, out, wrt, feeds=None, fuse=(True, False), seed=1):
    """The backward graph of sum(out * c) (c a fixed random constant), numba vs reference."""
    rng = np.random.default_rng(seed)
    shape = tuple(2 if isinstance(d, str) else d for d in g.nx.nodes[out]["shape"])
    c = g.const(rng.standard_normal(shape[1:] if shape and g.nx.nodes[out]["shape"][0] == "N" else shape))
    loss = g.sum(g.mul(g[out], c), name="the_loss")
    g.output(loss)
    gg = gc.grad(g, wrt=wrt, loss="the_loss")
    feeds = feeds or _feeds(g)
    return check_run(gg, feeds, fuse=fuse)


def check_train(g, opt=None, fuse=(True, False), steps=2, n=2, feeds=None, **kw):
    feeds = feeds or _feeds(g, n=n)
    mk = (lambda: opt()) if callable(opt) else (lambda: gc.optim.SGD(0.05, momentum=0.9))
    ref = gc.compile(g, optimizer=mk(), **kw)
    ref_losses = [ref.step(feeds) for _ in range(steps)]
    exes = []
    for fz in fuse:
        exe = gc.compile(g, backend="numba", optimizer=mk(), fuse=fz, **kw)
        losses = [exe.step(feeds) for _ in range(steps)]
        _close(losses, ref_losses, f"{g.name} fuse={fz}: losses", g.dtype)
        for k, v in ref.state.items():
            _close(exe.state[k], v, f"{g.name} fuse={fz}: state {k}")
        exes.append(exe)
    return exes


def _patterns(exe):
    g = exe.graph
    return sorted(g.nx.nodes[n]["attrs"]["pattern"] for n in g.nx if g.nx.nodes[n]["op"] == "fused")


# ------------------------------------------------------------------------------------- elementwise

UNARY = ["relu", "neg", "exp", "log", "sqrt", "sigmoid", "tanh", "identity", "copy"]
BINARY = ["add", "mul", "sub", "div", "max", "gt"]


@pytest.mark.parametrize("op", UNARY)
def test_unary(op):
    g = gc.Graph(op)
    x = g.input("x", (None, 3, 4, 5))
    y = g.add_node(op, (x,), name="y")
    g.output(y, g.mul(y, g.scalar(2.0), name="y2"))
    positive = op in ("log", "sqrt")
    check_run(g, _feeds(g, positive=positive))
    if op not in ("copy",):
        check_grad(g, "y", ["x"], feeds=_feeds(g, positive=positive), fuse=(True,))


@pytest.mark.parametrize("bshape", [(3, 4, 5), (5,), (1, 3, 1, 1), (), (3, 1, 5)])
@pytest.mark.parametrize("op", BINARY)
def test_binary_broadcasting(op, bshape):
    g = gc.Graph(f"{op}")
    x = g.input("x", (None, 3, 4, 5))
    b = g.param("b", bshape, init="normal") if bshape else g.param("b", value=np.float32(0.7))
    if op == "div":
        b = g.add(g.mul(b, b), g.scalar(0.5))
    y = g.add_node(op, (x, b), name="y")
    g.output(y)
    check_run(g)
    if op != "gt":
        check_grad(g, "y", ["x", "b"], fuse=(True,))


def test_elementwise_chain_fuses_into_one_kernel():
    g = gc.Graph("chain")
    x = g.input("x", (None, 6))
    w = g.param("w", (4, 6))
    h = g.matmul(x, w, trans_b=True)
    z = g.tanh(g.mul(g.relu(g.add(h, g.param("b", (4,), init="normal"))), g.scalar(1.5)))
    g.output(g.sub(z, g.sigmoid(h), name="out"))
    exe = check_run(g, fuse=(True,))
    assert _patterns(exe) == ["elementwise"]


# ---------------------------------------------------------------------------------- linear algebra

@pytest.mark.parametrize("ta,tb", [(False, False), (False, True), (True, False), (True, True)])
def test_matmul(ta, tb):
    g = gc.Graph("mm")
    a = g.param("a", (3, 4) if ta else (4, 3), init="normal")
    b = g.param("b", (5, 3) if tb else (3, 5), init="normal")
    x = g.input("x", (4, 5))
    y = g.add(g.matmul(a, b, trans_a=ta, trans_b=tb), x, name="y")
    g.output(y)
    check_run(g, fuse=(False,))
    check_grad(g, "y", ["a", "b"], fuse=(False,))


def test_small_dense_products_call_no_blas(monkeypatch):
    """A dense layer's product of at most SMALL_MACS multiply-adds runs kernels/small_matmul.py: numpy's
    values, a row's bits whatever rows are beside it, and no BLAS call, so the run leaves BLAS's thread
    count alone; a larger product calls BLAS, held to one thread from then to the run's end."""
    from graphc.backends import kernel_cache
    from graphc.backends.numba import lower_linalg
    puts = []
    monkeypatch.setattr(kernel_cache, "_all_thread_calls", lambda: ((lambda: 2, puts.append),))
    g = gc.Graph("dense")
    x = g.input("x", (None, 40))
    w = g.param("w", (30, 40), init="normal")
    g.output(g.matmul(x, w, trans_b=True, name="y"))
    exe = gc.compile(g, backend="numba")
    rng = np.random.default_rng(0)
    big = lower_linalg.SMALL_MACS // (30 * 40) + 1
    xs = rng.standard_normal((big, 40)).astype(np.float32)
    want = xs.astype(np.float64) @ exe.state["w"].astype(np.float64).T
    one, two = exe.run({"x": xs[:1]})["y"], exe.run({"x": xs[:2]})["y"]
    assert puts == []
    np.testing.assert_allclose(two, want[:2], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(one[0], two[0])
    exe.run({"x": xs})                                 # (its binding's first run: kernels found, compiled)
    puts.clear()
    got = exe.run({"x": xs})["y"]
    assert puts == [1, 2]                              # held to one thread, restored
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_few_row_products_with_large_weights_split_without_blas(monkeypatch):
    """A dense layer of at most FEW_ROWS rows whose weights fill SPLIT_WEIGHT_BYTES (a batch-1 classifier)
    runs kernels/small_matmul.py in blocks of outputs on the threads: numpy's values, no BLAS call, and the
    same bits on one thread or all of them, and for a row whatever rows are beside it."""
    from graphc.backends import kernel_cache
    from graphc.backends.numba import lower_linalg
    puts = []
    monkeypatch.setattr(kernel_cache, "_all_thread_calls", lambda: ((lambda: 2, puts.append),))
    K = 256
    N = lower_linalg.SPLIT_WEIGHT_BYTES // (4 * K) + 3           # (odd: the blocks differ in size)
    g = gc.Graph("classifier")
    x = g.input("x", (None, K))
    g.output(g.matmul(x, g.param("w", (N, K), init="normal"), trans_b=True, name="y"))
    rng = np.random.default_rng(1)
    xs = rng.standard_normal((lower_linalg.FEW_ROWS, K)).astype(np.float32)
    runs = {}
    for threads in ("auto", 1):
        exe = gc.compile(g, backend="numba", threads=threads)
        runs[threads] = [exe.run({"x": xs[:n]})["y"] for n in (1, lower_linalg.FEW_ROWS)]
    want = xs.astype(np.float64) @ exe.state["w"].astype(np.float64).T
    assert puts == []
    np.testing.assert_allclose(runs["auto"][1], want, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(runs["auto"][0][0], runs["auto"][1][0])
    for a, b in zip(runs["auto"], runs[1]):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------ conv and pool

CONVS = [dict(stride=1, pad=1), dict(stride=2, pad=(0, 1, 1, 0)), dict(stride=1, pad=0, bias=False),
         dict(stride=(2, 1), pad=1)]


@pytest.mark.parametrize("cfg", CONVS, ids=["s1p1", "s2asym", "nobias", "s21"])
def test_conv_forward_and_grads(cfg):
    g = gc.Graph("conv")
    x = g.input("x", (None, 3, 7, 6))
    w = g.param("w", (4, 3, 3, 3), init="normal")
    b = g.param("b", (4,), init="normal") if cfg.get("bias", True) else None
    y = g.conv(x, w, b, stride=cfg["stride"], pad=cfg["pad"], name="y")
    g.output(y)
    check_run(g, fuse=(False,))
    check_grad(g, "y", ["x", "w"] + (["b"] if b is not None else []), fuse=(False,))


POOLS = [(2, None), (3, 1), ((2, 1), (2, 1))]


@pytest.mark.parametrize("size,stride", POOLS, ids=["2x2", "3x3s1", "2x1"])
@pytest.mark.parametrize("kind", ["maxpool", "avgpool"])
def test_pool_forward_and_grads(kind, size, stride):
    g = gc.Graph(kind)
    x = g.input("x", (None, 2, 6, 5))
    y = getattr(g, kind)(x, size, stride, name="y")
    g.output(y)
    check_run(g, fuse=(False,))
    check_grad(g, "y", ["x"], fuse=(False,))


def test_global_avgpool_and_grad():
    g = gc.Graph("gap")
    x = g.input("x", (None, 3, 4, 4))
    g.output(g.global_avgpool(x, name="y"))
    check_run(g, fuse=(False,))
    check_grad(g, "y", ["x"], fuse=(False,))


def test_route_ops_and_gather():
    g = gc.Graph("route")
    x = g.input("x", (None, 2, 6, 6))
    dy = g.input("dy", (None, 2, 3, 3))
    r = g.add_node("maxpool_argmax", (g.relu(x),), {"size": (2, 2), "stride": (2, 2), "relu": True}, name="r")
    s = g.add_node("route_scatter", (dy, r), {"in_hw": (6, 6)}, name="s")
    gth = g.maxpool_gather(x, g.exp(x), size=2, stride=2, name="gth")
    g.output(s, gth)
    check_run(g, fuse=(False,))


# ----------------------------------------------------------------------------- reductions and shapes

@pytest.mark.parametrize("axes,keep", [((0, 2, 3), False), ((1,), True), (None, False), ((0, 2), False),
                                       ((1, 3), True)])
@pytest.mark.parametrize("kind", ["sum", "mean"])
def test_reductions(kind, axes, keep):
    g = gc.Graph(kind)
    x = g.input("x", (None, 3, 4, 5))
    g.output(getattr(g, kind)(x, axes=axes, keepdims=keep, name="y"))
    check_run(g, fuse=(False,))
    check_grad(g, "y", ["x"], fuse=(False,))


def test_shape_ops_and_grads():
    g = gc.Graph("shapes")
    x = g.input("x", (None, 4, 3, 2))
    t = g.transpose(x, (0, 2, 3, 1))
    r = g.reshape(t, (None, 6, 4))
    c = g.concat([x, g.exp(x)], axis=1)
    s = g.slice(c, axis=1, start=2, stop=6)
    p = g.pad2d(s, (1, 0, 2, 1), value=0.5)
    cr = g.crop2d(p, (0, 1, 1, 1))
    y = g.add(g.sum(r, axes=(1, 2)), g.sum(cr, axes=(1, 2, 3)), name="y")
    g.output(y, g.reshape_like(r, x, name="back"))
    check_run(g, fuse=(False, True))
    check_grad(g, "y", ["x"], fuse=(False,))


def test_sum_to_expand_broadcast_like():
    g = gc.Graph("bcast")
    x = g.input("x", (None, 3, 4))
    b = g.param("b", (3, 1), init="normal")
    y = g.mul(x, b, name="y")                       # its gradient needs sum_to
    g.output(y, g.expand_like(b, x, name="e"), g.broadcast_like(g.sum(x, axes=1), x, axes=(1,), keepdims=False,
                                                                   mean=True, name="bl"))
    check_run(g, fuse=(False,))
    check_grad(g, "y", ["x", "b"], fuse=(False,))


# ------------------------------------------------------------------------------------ softmax, losses

def test_softmax_axes():
    g = gc.Graph("sm")
    x = g.input("x", (None, 5))
    z = g.input("z", (None, 3, 4))
    g.output(g.softmax(x, name="a"), g.softmax(z, axis=1, name="b"))
    check_run(g, fuse=(False,))
    check_grad(g, "a", ["x"], fuse=(False,))


@pytest.mark.parametrize("labels", ["int", "onehot"])
def test_class_losses(labels):
    g = gc.Graph("ce")
    x = g.input("x", (None, 4))
    lab = g.input("labels", (None,), dtype="int64") if labels == "int" else g.input("labels", (None, 4))
    sce = g.softmax_cross_entropy(x, lab, name="sce")
    ce = g.cross_entropy(g.softmax(x), lab, name="ce")
    g.output(g.add(sce, ce, name="y"))
    feeds = _feeds(g)
    if labels == "onehot":
        feeds["labels"] = np.eye(4, dtype=np.float32)[[1, 3]]
    check_run(g, feeds, fuse=(False,))
    check_grad(g, "y", ["x"], feeds=feeds, fuse=(False,))


def test_mse_and_bce():
    g = gc.Graph("pair")
    p = g.input("p", (None, 3))
    t = g.input("t", (None, 3))
    g.output(g.add(g.mse(p, t), g.bce_with_sigmoid(p, g.sigmoid(t)), name="y"))
    check_run(g, fuse=(False,))
    check_grad(g, "y", ["p"], fuse=(False,))


# ------------------------------------------------------------------------------------ fused patterns

def _conv_pool_graph(pool=2, pool_stride=None, stride=1, pad=1, relu_pool=True, bias=True, c_in=2):
    g = gc.Graph("cp")
    x = g.input("x", (None, c_in, 8, 8))
    labels = g.input("labels", (None,), dtype="int64")
    w = g.param("c.w", (4, c_in, 3, 3))
    b = g.param("c.b", (4,), init="normal") if bias else None
    h = g.relu(g.conv(x, w, b, stride=stride, pad=pad, name="c"), name="c.relu")
    h = g.maxpool(h, pool, pool_stride, name="p") if relu_pool else h
    logits = g.dense(g.flatten(h), g.param("fc.w", (3, int(np.prod(h.shape[1:])))), g.param("fc.b", (3,)))
    g.output(g.softmax_cross_entropy(logits, labels, name="loss"))
    return g


@pytest.mark.parametrize("strategy", ["im2col", "direct"])
def test_conv_relu_maxpool_fused_inference_and_training(strategy, monkeypatch):
    monkeypatch.setenv("GRAPHC_CONV_STRATEGY", strategy)
    g = _conv_pool_graph()
    exe = check_run(g, fuse=(True,))
    assert _patterns(exe).count("conv_relu_maxpool") == 1
    fused, _ = check_train(g, fuse=(True, False))
    assert _patterns(fused)[:2] == ["conv_relu_maxpool", "elementwise"] or "route_relu" in _patterns(fused)
    assert {"conv_relu_maxpool", "route_relu"} <= set(_patterns(fused))


def test_conv_relu_maxpool_variants():
    # overlapping pool, stride-2 conv, no bias (route_relu without db), non-square pool (fallback path)
    for kw in (dict(pool=3, pool_stride=1), dict(stride=2, pad=1, pool=2), dict(bias=False),
               dict(pool=(2, 1), pool_stride=(2, 1))):
        g = _conv_pool_graph(**kw)
        (exe,) = check_train(g, fuse=(True,), steps=1)
        assert "conv_relu_maxpool" in _patterns(exe), kw


def test_conv_relu_fused():
    g = _conv_pool_graph(relu_pool=False)
    exe = check_run(g, fuse=(True,))
    assert "conv_relu" in _patterns(exe)
    (tr,) = check_train(g, fuse=(True,))
    assert "conv_relu" in _patterns(tr)


@pytest.mark.parametrize("rate", [0.5, 0.0])
def test_dropout_fused_at_inference(rate):
    """x * dropout_mask(x) read by nothing else is one fused step: a copy of x at inference, the reference's
    seeded mask and product in training (the same bits as the reference and as the unfused nodes), its
    mode switching from run to run; in a training graph the backward reads the mask and nothing fuses."""
    g = gc.Graph(f"drop{rate}")
    x = g.input("x", (None, 40))
    w = g.param("w", (40,), init="normal")
    g.output(g.sum(g.relu(g.dropout(g.mul(x, w, name="xw"), rate, seed=3, name="y"), name="out"), name="loss"))
    feeds = _feeds(g)
    ref = gc.compile(g)
    fused, plain = gc.compile(g, backend="numba"), gc.compile(g, backend="numba", fuse=False)
    assert _patterns(fused) == ["dropout"] and _patterns(plain) == []
    for exe in (fused, plain):
        exe.load_state_dict(ref.state_dict())
    for step in range(2):
        for training in (True, False, True):
            ref.step_count = fused.step_count = plain.step_count = step
            want = ref.run(feeds, outputs=["out"], training=training)["out"]
            for exe in (fused, plain):
                got = exe.run(feeds, outputs=["out"], training=training)["out"]
                np.testing.assert_array_equal(got, want, err_msg=f"training={training} step={step}")
            if training and rate:
                assert 0 < (want == 0).mean() < 1
    assert {b.kinds["y"][0] for b in fused._bindings.values()} == {"dropout"}    # its own lowering, no fallback
    (tr,) = check_train(g, fuse=(True,), steps=2)
    assert "dropout" not in _patterns(tr)


def test_first_layer_single_channel():
    g = _conv_pool_graph(c_in=1)
    check_train(g, fuse=(True,))


@pytest.mark.parametrize("opt", ["sgd", "momentum", "adam", "wd"])
def test_optimizer_updates_fused_in_place(opt):
    make = {"sgd": lambda: gc.optim.SGD(0.1), "momentum": lambda: gc.optim.SGD(0.1, momentum=0.9),
            "adam": lambda: gc.optim.Adam(0.01), "wd": lambda: gc.optim.SGD(0.1, 0.9, weight_decay=1e-3)}[opt]
    g = models.mlp()
    (exe,) = check_train(g, opt=make, fuse=(True,), steps=3, n=3)
    plan = exe.graph.memory_plan
    assert set(exe.graph.param_names) <= set(plan.inplace.values())
    b = next(iter(exe._bindings.values()))
    assert not b.copy_back                 # every update written in place: nothing copied back


# ------------------------------------------------------------------------------------- zoo models

ZOO = ["seed_cnn", "mlp", "lenet5", "mnist_convnet", "resnet_block", "inception_block"]


@pytest.mark.parametrize("name", ZOO)
def test_zoo_training_and_inference(name):
    g = models.load(name)
    feeds = _feeds(g, n=2)
    if name == "seed_cnn":
        feeds = {"x": models.SEED_X, "labels": models.SEED_LABELS}
    check_train(g, fuse=(True, False), feeds=feeds)
    check_run(models.load(name, loss=False), {"x": feeds["x"]}, fuse=(True,))


def test_seed_example_float64_matches_reference_exactly():
    g = models.seed_cnn()                  # float64 graph
    feeds = {"x": models.SEED_X, "labels": models.SEED_LABELS}
    ref = gc.compile(g, optimizer=gc.optim.SGD(0.5))
    exe = gc.compile(g, backend="numba", optimizer=gc.optim.SGD(0.5))
    assert exe.dtype == np.float64
    assert abs(ref.step(feeds) - exe.step(feeds)) < 1e-12
    for k, v in ref.params.items():
        np.testing.assert_allclose(exe.params[k], v, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- executable interface

def test_executable_interface():
    g = models.lenet5()
    exe = gc.compile(g, backend="numba", optimizer=gc.optim.SGD(0.05, momentum=0.9), keep=["logits"])
    ref = gc.compile(g, optimizer=gc.optim.SGD(0.05, momentum=0.9))
    f2, f3 = _feeds(g, n=2), _feeds(g, n=3, seed=1)
    before = exe.state_dict()
    t = exe.precompile(batch=2)
    assert t > 0 and all(np.array_equal(exe.state_dict()[k], v) for k, v in before.items())
    for f in (f2, f3, f2):                     # a new batch size binds again; the old binding is reused
        _close(exe.step(f), ref.step(f), "loss", np.float32)
    assert len(exe._bindings) == 2
    out = exe.run(f3, outputs=["logits", "loss"])
    _close(out["logits"], ref.run(f3, outputs=["logits"])["logits"], "logits")
    sd = exe.state_dict()
    assert sd["__step__"] == 3
    exe.step(f2)
    exe.load_state_dict(sd)                    # restores values into the bound arrays
    _close(exe.step(f2), ref.step(f2), "loss after restore", np.float32)
    exe.state["optim/lr"] = np.array(0.01)     # replaced arrays are picked up too
    ref.state["optim/lr"] = np.array(0.01, np.float32)
    _close(exe.step(f2), ref.step(f2), "loss after lr change", np.float32)
    for k, v in ref.params.items():
        _close(exe.params[k], v, k)
    with pytest.raises(gc.GraphError):
        exe.run(f2, outputs=["c1.relu"])     # fused away
    rows = exe.profile(f2, repeats=2, warmup=1)
    assert rows and all(r["ms"] >= 0 for r in rows)
    assert {"conv_relu_maxpool", "route_relu"} <= {r["kind"] for r in rows}
    assert exe.compile_times["lower_s"] >= 0 and exe.compile_times["bindings"]


def test_kernel_table_covers_every_op():
    from graphc.backends.numba import kernel_table
    ops = {op for op, _ in kernel_table()}
    for op, d in optable.OPS.items():
        if not d.source and op != "fused":
            assert op in ops
    assert {"fused:conv_relu_maxpool", "fused:route_relu", "fused:elementwise", "fused:conv_relu"} <= ops


def test_generated_kernels_are_files_in_the_cache_dir():
    import os
    from graphc.backends import codegen, kernel_cache
    plan = codegen.plan_loop((5,), [(5,), (1,)])
    src = codegen.NumbaDialect().source([("a0 + a1", [("in", 0), ("in", 1)])], [0], plan, "float32", False)
    k = kernel_cache.load_generated(src, "graphc_ew_")
    x = np.arange(5, dtype=np.float32)
    out = np.empty_like(x)
    k(out, x, np.array([2.0], np.float32))
    np.testing.assert_array_equal(out, x + 2)
    assert any(f.endswith(".py") and f.startswith("graphc_ew_") for f in os.listdir(kernel_cache.kernel_cache_dir()))


# ------------------------------------------------------------------------------------------ bench

def test_run_bench_report_and_json(tmp_path):
    import importlib.util
    import json
    from graphc.bench import run_bench
    path = tmp_path / "b.json"
    compare = ["torch"] if importlib.util.find_spec("torch") else ["jax_that_is_absent"]
    r = run_bench("lenet5", batch=2, train=True, repeats=3, json_path=str(path), measure_compile=False,
                  roofline=False, compare=compare, quiet=True)
    d = json.loads(path.read_text())
    for k in ("model", "backend", "batch", "mode", "step_ms", "compile_s", "roofline_gflops", "kernels", "compare"):
        assert k in d
    assert d["mode"] == "train" and d["step_ms"] > 0 and {"cold", "warm"} <= set(d["compile_s"])
    assert all({"name", "ops", "ms", "gflops"} <= set(k) for k in d["kernels"])
    assert any(k["ops"][:3] == ["conv", "relu", "maxpool"] for k in d["kernels"])
    peer = next(iter(d["compare"].values()))
    if compare == ["torch"]:
        assert peer["step_ms"] > 0 and peer["same_model"]
    else:
        assert "error" in peer or "absent" in peer
    from graphc.bench import report
    assert "whole step" in report(r)


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("kw", [dict(pad=0), dict(pad=1), dict(bias=False, pad=0), dict(relu_pool=False),
                                dict(c_in=1, pad=0), dict(pool=3, pool_stride=1)])
def test_direct_prebound_conv_into_planned_buffers(n, kw, monkeypatch):
    # the direct forward bound once per shape (numba.conv.bind_direct_fwd) writes into the memory
    # plan's buffers: inference and training (weights changing between calls) against the reference
    monkeypatch.setenv("GRAPHC_CONV_STRATEGY", "direct")
    g = _conv_pool_graph(**kw)
    check_run(g, feeds=_feeds(g, n=n), fuse=(True, False))
    check_train(g, fuse=(True,), n=n, steps=3)


def test_direct_prebound_conv_odd_filter_count_and_plain_conv(monkeypatch):
    monkeypatch.setenv("GRAPHC_CONV_STRATEGY", "direct")
    g = gc.Graph("k5")
    x = g.input("x", (None, 3, 9, 7))
    labels = g.input("labels", (None,), dtype="int64")
    h = g.conv(x, g.param("c.w", (5, 3, 3, 3)), g.param("c.b", (5,), init="normal"), pad=1, name="c")
    h = g.maxpool(g.relu(h), 2, name="p")
    h = g.conv(h, g.param("d.w", (3, 5, 2, 2)), None, name="d")          # no ReLU: plain conv
    logits = g.dense(g.flatten(h), g.param("fc.w", (3, int(np.prod(h.shape[1:])))), g.param("fc.b", (3,)))
    g.output(g.softmax_cross_entropy(logits, labels, name="loss"))
    for n in (1, 2):
        exe = check_run(g, feeds=_feeds(g, n=n), fuse=(True, False))
        check_run(g, feeds=_feeds(g, n=n, seed=3), fuse=(True,))
    check_train(g, fuse=(True, False), steps=3)
    assert exe.run(_feeds(g, n=1))["loss"].shape == ()


@pytest.mark.parametrize("strategy", ["direct", "im2col"])
def test_conv_results_written_into_the_memory_plan(strategy, monkeypatch):
    """Convs, dL/dX and dL/dW write into their planned buffers (no run-time arrays beside the plan): a
    training step agrees with the reference, and no value shares memory with one live at the same time
    (a kernel's result with its inputs included)."""
    from graphc import nn
    monkeypatch.setenv("GRAPHC_CONV_STRATEGY", strategy)
    g = gc.Graph("planned_convs")
    x = g.input("x", (None, 3, 9, 8))
    h = nn.residual_block(g, x, 6, stride=2, name="res")          # 3x3 stride 2, 3x3, 1x1 stride 2
    h = nn.residual_block(g, h, 6, name="res2")                     # the identity skip
    nn.finish(g, nn.dense(g, g.global_avgpool(h, name="gap"), 4, name="logits"), True)
    (exe,) = check_train(g, fuse=(True,), steps=2, n=3)
    b = next(iter(exe._bindings.values()))
    nodes, plan = exe.graph.nx.nodes, b.plan
    convs = [n for n in plan.program if nodes[n]["op"] in ("conv", "conv_dx", "conv_dw")
             or (nodes[n]["op"] == "fused" and nodes[n]["attrs"]["pattern"].startswith("conv"))]
    assert {nodes[n]["op"] for n in convs} >= {"conv_dx", "conv_dw"} and not set(convs) & b.dynamic
    live = [(n, plan.def_idx[n], plan.last_use.get(n, plan.def_idx[n])) for n in plan.slot_of]
    for i, (a, da, la) in enumerate(live):
        for c, dc, lc in live[i + 1:]:
            if not (la < dc or lc < da):
                assert not np.shares_memory(b.values[b.index[a]], b.values[b.index[c]]), (a, c)


@pytest.mark.parametrize("rows, K, N", [(4, 2048, 2048), (64, 512, 512)])
def test_large_matmul_split_over_threads_matches_reference_and_not_the_thread_count(rows, K, N):
    """A 2-D product over SPLIT_FLOPS runs as blocks (of columns for 4 rows, of rows for 64) on graphc's
    threads, BLAS held to one thread: the reference's values, and the same bits on 1 and 2 threads."""
    from graphc.backends.numba import lower_linalg
    assert 2 * rows * K * N >= lower_linalg.SPLIT_FLOPS
    g = gc.Graph("mm")
    x = g.input("x", (None, K))
    w = g.param("w", (K, N))
    y = g.matmul(x, w)
    g.output(y)
    feeds = {"x": np.random.default_rng(0).standard_normal((rows, K)).astype(np.float32)}
    ref_exe = gc.compile(g, backend="reference")
    ref = np.asarray(ref_exe.run(feeds)[y.name])
    outs = {}
    for t in (1, 2):
        exe = gc.compile(g, backend="numba", threads=t, progress=None)
        exe.load_state_dict(ref_exe.state_dict())
        outs[t] = np.array(exe.run(feeds)[y.name])
    np.testing.assert_allclose(outs[2], ref, rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(outs[1], outs[2])


def test_batch1_padded_max_pool_shares_planes_between_threads():
    """With fewer images than threads the forward max pools (maxpool, and maxpool_argmax in training)
    split the N*C planes between threads, and the constant pad2d before them fills only its border:
    the reference's values on 1 and 2 threads, the same bits on both (parallel_min=1: every kernel on
    its parallel path)."""
    g = gc.Graph("pad_pool", seed=2)
    x = g.input("x", (None, 3, 11, 11))
    h = g.relu(g.conv(x, g.param("w", (5, 3, 3, 3), init="he"), pad=1))
    h = g.maxpool(h, 3, 2, pad=1, ceil_mode=True)
    h = g.flatten(h)
    g.output(g.softmax_cross_entropy(g.dense(h, g.param("fc", (4, 5 * 6 * 6), init="glorot"), name="logits"),
                                     g.input("labels", (None,), dtype="int64"), name="loss"))
    feeds = {"x": np.random.default_rng(1).standard_normal((1, 3, 11, 11)).astype(np.float32),
             "labels": np.array([2])}
    ref = gc.compile(g, optimizer=gc.optim.SGD(0.1))
    ref_out = ref.run(feeds, outputs=["logits"])["logits"]
    ref_losses = [ref.step(feeds) for _ in range(2)]
    runs = {}
    for t in (1, 2):
        exe = gc.compile(g, backend="numba", optimizer=gc.optim.SGD(0.1), threads=t, parallel_min=1, progress=None)
        out = np.array(exe.run(feeds, outputs=["logits"])["logits"])
        runs[t] = (out, [exe.step(feeds) for _ in range(2)])
        _close(out, ref_out, f"{t} threads: logits")
        _close(runs[t][1], ref_losses, f"{t} threads: losses", np.float32)
    np.testing.assert_array_equal(runs[1][0], runs[2][0])
    assert runs[1][1] == runs[2][1]


@pytest.mark.parametrize("size,stride,pad,ceil", [(3, 2, 1, False), (3, 2, 1, True), (2, 2, 1, False),
                                                   ((3, 2), (2, 1), (1, 0), True)], ids=["3s2p1", "ceil", "2s2p1", "rect"])
def test_padded_max_pool_fuses_into_one_kernel_at_inference(size, stride, pad, ceil):
    """maxpool(pad=...) is pad2d(-inf) + maxpool; at inference the pad_maxpool pattern runs them as one
    kernel over the unpadded input (windows clipped at its edges): the reference's values, NaN and -inf
    included, and the unfused kernels' bits (-0.0 beside 0.0: the first of equal maxima, where the reference's
    np.max may take either), on 1 thread and 2. A training graph reads the
    padded value in the backward pass, so there the pad stays its own node (gradients checked)."""
    g = gc.Graph("pad_maxpool")
    x = g.input("x", (None, 3, 9, 8))
    g.output(g.maxpool(x, size, stride, pad=pad, ceil_mode=ceil, name="y"))
    xs = np.random.default_rng(0).standard_normal((2, 3, 9, 8)).astype(np.float32)
    xs[0, 0, 0, 0], xs[1, 1, 4, 4], xs[1, 2, 8, 7] = np.nan, np.nan, -np.inf
    xs[0, 2, :2, :2], xs[1, 0, :3, :] = -0.0, 0.0
    xs[1, 0, 0, :3] = -0.0
    want = gc.compile(g).run({"x": xs})["y"]
    unfused = gc.compile(g, backend="numba", fuse=False, progress=None).run({"x": xs})["y"]
    for t in (1, 2):
        exe = gc.compile(g, backend="numba", threads=t, parallel_min=1, progress=None)
        assert _patterns(exe) == ["pad_maxpool"]
        got = exe.run({"x": xs})["y"]
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got.view(np.int32), unfused.view(np.int32))
    h = gc.Graph("pad_maxpool_grad")
    xv = h.input("x", (None, 3, 9, 8))
    h.output(h.maxpool(xv, size, stride, pad=pad, ceil_mode=ceil, name="y"))
    check_grad(h, "y", ["x"], fuse=(True,))
    trained = gc.compile(gc.grad(h, wrt=["x"], loss="the_loss"), backend="numba", progress=None)
    assert "pad_maxpool" not in _patterns(trained)
