"""The CNN op set against hand values and PyTorch: grouped/depthwise and dilated conv, ceil-mode and padded
pools with count_include_pad, global max pool, reflect/edge padding, batched matmul, batch norm in both
modes (with its running statistics over training steps and through checkpoints), LRN, leaky ReLU, PReLU,
clip/ReLU6, SiLU, hardswish; and their errors.

Hand values are computed in the comments; the PyTorch comparisons (float64, forward and gradients,
hypothesis-drawn shapes) skip when torch is not installed. COVERED lists the ops with a reference test
here (tests/test_ops.py's table-coverage test reads it)."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import graphc as gc

COVERED: set = set()
PROPERTY = settings(max_examples=12, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def covers(*ops):
    COVERED.update(ops)
    return lambda fn: fn


def run(build, feeds=None, training=False, dtype="float64"):
    g = gc.Graph("t", dtype=dtype)
    out = build(g)
    g.output(out)
    return gc.compile(g).run(feeds or {}, training=training)[out.name]


def const(g, a):
    return g.const(np.asarray(a, dtype=np.float64))


# ================================================================== hand values
@covers("conv")
def test_depthwise_and_grouped_conv_by_hand():
    x = np.arange(18.0).reshape(1, 2, 3, 3)               # channel 0: 0..8, channel 1: 9..17
    w = np.array([[[[1.0, 0.0], [0.0, 0.0]]], [[[0.0, 0.0], [0.0, 2.0]]]])   # (2, 1, 2, 2): one filter each
    y = run(lambda g: g.conv(const(g, x), const(g, w), groups=2))
    # channel 0 picks each window's top-left; channel 1 doubles each window's bottom-right
    np.testing.assert_array_equal(y[0, 0], [[0, 1], [3, 4]])
    np.testing.assert_array_equal(y[0, 1], 2 * np.array([[13, 14], [16, 17]]))
    w2 = np.ones((4, 1, 1, 1)) * np.array([1, 10, 100, 1000]).reshape(4, 1, 1, 1)   # groups=2, two filters each
    y2 = run(lambda g: g.conv(const(g, x), const(g, w2), groups=2))
    np.testing.assert_array_equal(y2[0, :, 0, 0], [0, 0, 900, 9000])                # filters 2, 3 see channel 1


def test_dilated_conv_by_hand():
    x = np.arange(25.0).reshape(1, 1, 5, 5)
    y = run(lambda g: g.conv(const(g, x), const(g, np.ones((1, 1, 2, 2))), dilation=2))
    # taps 2 apart: y[i, j] = x[i, j] + x[i, j+2] + x[i+2, j] + x[i+2, j+2] = 4 x[i, j] + 24
    assert y.shape == (1, 1, 3, 3)
    np.testing.assert_array_equal(y[0, 0], 4 * x[0, 0, :3, :3] + 24)
    same = run(lambda g: g.conv(const(g, x), const(g, np.ones((1, 1, 3, 3))), dilation=2, pad="same"))
    assert same.shape == (1, 1, 5, 5) and same[0, 0, 2, 2] == x[0, 0, ::2, ::2].sum()


@covers("maxpool", "avgpool")
def test_ceil_mode_and_padded_pools_by_hand():
    x = np.arange(25.0).reshape(1, 1, 5, 5)
    # 2x2/2 over 5x5: floor mode drops the last row and column, ceil mode keeps the partial windows
    np.testing.assert_array_equal(run(lambda g: g.maxpool(const(g, x), 2)), [[[[6, 8], [16, 18]]]])
    np.testing.assert_array_equal(run(lambda g: g.maxpool(const(g, x), 2, ceil_mode=True)),
                                  [[[[6, 8, 9], [16, 18, 19], [21, 23, 24]]]])
    # partial windows average over what they cover: (4 + 9) / 2, (20 + 21) / 2, 24 / 1
    avg = run(lambda g: g.avgpool(const(g, x), 2, ceil_mode=True))
    np.testing.assert_array_equal(avg[0, 0, :, 2], [6.5, 16.5, 24])
    np.testing.assert_array_equal(avg[0, 0, 2], [20.5, 22.5, 24])
    x2 = np.array([[[[1.0, 2.0], [3.0, 4.0]]]])
    # pad 1, 2x2/2: every window holds one pixel and three zeros of padding
    np.testing.assert_array_equal(run(lambda g: g.avgpool(const(g, x2), 2, pad=1)), x2 / 4)
    np.testing.assert_array_equal(run(lambda g: g.avgpool(const(g, x2), 2, pad=1, count_include_pad=False)), x2)
    np.testing.assert_array_equal(run(lambda g: g.maxpool(const(g, -x2), 2, pad=1)), -x2)   # -inf padding


@covers("global_maxpool")
def test_global_maxpool_by_hand():
    x = np.array([[[[1.0, 5.0], [5.0, -2.0]], [[-3.0, -1.0], [-4.0, np.nan]]]])
    y = run(lambda g: g.global_maxpool(const(g, x)))
    np.testing.assert_array_equal(y, [[5.0, np.nan]])                 # NaN propagates (torch, numpy)
    gg = gc.Graph("g", dtype="float64")
    v = gg.param("x", value=x[:, :1])
    gg.output(gg.sum(gg.global_maxpool(v), name="loss"))
    d = gc.compile(gc.grad(gg)).run({})["grad/x"]
    np.testing.assert_array_equal(d[0, 0], [[0, 1], [0, 0]])          # ties: the first maximum


@covers("pad2d", "crop2d")
def test_reflect_and_edge_padding_and_their_gradients_by_hand():
    x = np.array([[[[1.0, 2.0, 3.0]]]])
    pads = (0, 0, 2, 2)
    np.testing.assert_array_equal(run(lambda g: g.pad2d(const(g, x), pads, mode="reflect"))[0, 0, 0],
                                  [3, 2, 1, 2, 3, 2, 1])
    np.testing.assert_array_equal(run(lambda g: g.pad2d(const(g, x), pads, mode="edge"))[0, 0, 0],
                                  [1, 1, 1, 2, 3, 3, 3])
    ones = np.ones((1, 1, 1, 7))
    # the gradient folds each border pixel back onto its source: reflect sources 2 1 0 1 2 1 0, edge 0 0 0 1 2 2 2
    np.testing.assert_array_equal(run(lambda g: g.crop2d(const(g, ones), pads, mode="reflect"))[0, 0, 0], [2, 3, 2])
    np.testing.assert_array_equal(run(lambda g: g.crop2d(const(g, ones), pads, mode="edge"))[0, 0, 0], [3, 1, 3])


@covers("matmul")
def test_batched_matmul_broadcasts_by_hand():
    a = np.array([[[1.0, 2.0]], [[3.0, 4.0]]])                        # (2, 1, 2): two 1x2 matrices
    b = np.array([[1.0, 0.0], [0.0, 10.0]])                           # (2, 2), broadcast over the batch
    np.testing.assert_array_equal(run(lambda g: g.matmul(const(g, a), const(g, b))), [[[1, 20]], [[3, 40]]])
    np.testing.assert_array_equal(run(lambda g: g.matmul(const(g, b), const(g, a), trans_b=True)),
                                  [[[1], [20]], [[3], [40]]])


@covers("batchnorm", "bn_running_stat", "is_training")
def test_batchnorm_both_modes_and_running_stats_by_hand():
    g = gc.Graph("bn", dtype="float64")
    x = g.input("x", (None, 1))
    rm = g.param("rm", value=[0.0], trainable=False)
    rv = g.param("rv", value=[1.0], trainable=False)
    y = g.batchnorm(x, g.param("gamma", value=[2.0]), g.param("beta", value=[1.0]), rm, rv, eps=0.0)
    g.output(y, g.is_training(name="flag"))
    exe = gc.compile(g)
    feeds = {"x": np.array([[1.0], [2.0], [3.0], [4.0]])}
    out = exe.run(feeds)                                              # inference: running stats 0 / 1
    np.testing.assert_allclose(out[y.name][:, 0], [3, 5, 7, 9])
    assert out["flag"] == 0.0 and exe.state["rm"][0] == 0.0          # inference stores nothing
    out = exe.run(feeds, training=True)                               # batch mean 2.5, biased var 1.25
    np.testing.assert_allclose(out[y.name][:, 0], 2 * (np.array([1, 2, 3, 4]) - 2.5) / np.sqrt(1.25) + 1)
    assert out["flag"] == 1.0
    # torch's rule: 0.9 * running + 0.1 * batch statistic, the variance unbiased (5/3)
    np.testing.assert_allclose(exe.state["rm"], [0.25])
    np.testing.assert_allclose(exe.state["rv"], [0.9 + 0.1 * 5 / 3])
    assert g.stat_updates == {"rm": "update/rm", "rv": "update/rv"}


@covers("bn_grad_sums", "bn_grad_x")
def test_batchnorm_backward_ops_by_hand():
    x, dy = [[1.0], [2.0], [3.0], [4.0]], [[1.0], [0.0], [0.0], [2.0]]
    r5 = np.sqrt(1.25)

    def both(training):
        def build(g):
            f = g.is_training()
            s = g.apply("bn_grad_sums", const(g, x), const(g, dy), const(g, [0.0]), const(g, [1.0]), f, eps=0.0)
            return g.concat([g.reshape(s, (1, 4)), g.reshape(g.apply("bn_grad_x", const(g, x), const(g, dy),
                                                                       const(g, [2.0]), s, f), (1, 4))], axis=1)
        return run(build, training=training)[0]
    # training: mean 2.5, istd 1/sqrt(1.25), sum(dy) 3, sum(dy xhat) = (-1.5 + 2 * 1.5) / sqrt(1.25);
    # dx = 2 istd (dy - (3 + xhat * 1.5 / sqrt(1.25)) / 4) = 2 istd (dy - (3 + 1.2 (x - 2.5)) / 4)
    np.testing.assert_allclose(both(True), [2.5, 1 / r5, 3.0, 1.5 / r5] + list(2 / r5 * np.array([0.7, -0.6, -0.9, 0.8])))
    # inference: the running statistics 0 / 1; sum(dy x) = 1 + 8; dx = gamma dy
    np.testing.assert_allclose(both(False), [0.0, 1.0, 3.0, 9.0, 2.0, 0.0, 0.0, 4.0])


@covers("lrn_grad")
def test_lrn_backward_by_hand():
    x = np.array([1.0, 2.0, 3.0]).reshape(1, 3, 1, 1)
    dy = np.array([1.0, 0.0, 0.0]).reshape(1, 3, 1, 1)
    # as test_lrn_by_hand: s = 6, 15, 14; y0 = x0 / (1 + x0^2 + x1^2): dy0/dx0 = (6 - 2) / 36, dy0/dx1 = -4 / 36
    dx = run(lambda g: g.apply("lrn_grad", const(g, x), const(g, dy), size=3, alpha=3.0, beta=1.0, k=1.0))
    np.testing.assert_allclose(dx.ravel(), [1 / 9, -1 / 9, 0.0])


@covers("lrn")
def test_lrn_by_hand():
    x = np.array([1.0, 2.0, 3.0]).reshape(1, 3, 1, 1)
    # size 3, alpha 3, beta 1, k 1: s_c = 1 + (3 / 3) * (sum of squares over c-1..c+1, zero padded)
    y = run(lambda g: g.lrn(const(g, x), 3, alpha=3.0, beta=1.0, k=1.0))
    np.testing.assert_allclose(y.ravel(), [1 / 6, 2 / 15, 3 / 14])


@covers("leaky_relu", "prelu", "clip", "silu", "hardswish")
def test_activations_by_hand():
    x = np.array([-4.0, -1.0, 0.0, 2.0, 7.0, np.nan])
    f = {"x": x}

    def act(fn):
        return run(lambda g: fn(g, g.input("x", (6,), dtype="float64")), f)
    np.testing.assert_array_equal(act(lambda g, v: g.leaky_relu(v, 0.1)), [-0.4, -0.1, 0, 2, 7, np.nan])
    np.testing.assert_array_equal(act(lambda g, v: g.clip(v, 0, 6)), [0, 0, 0, 2, 6, np.nan])     # relu6
    np.testing.assert_array_equal(act(lambda g, v: g.clip(v, None, 1)), [-4, -1, 0, 1, 1, np.nan])
    np.testing.assert_allclose(act(lambda g, v: g.silu(v)), x / (1 + np.exp(-x)))
    # hardswish: 0 below -3, x (x + 3) / 6 between, x above 3
    np.testing.assert_array_equal(act(lambda g, v: g.hardswish(v)), [0, -1 / 3, 0, 10 / 6, 7, np.nan])
    xs = np.array([[-2.0, 3.0], [-2.0, 3.0]]).reshape(1, 2, 2, 1)
    y = run(lambda g: g.prelu(const(g, xs), const(g, [0.5, -1.0])))  # one slope per channel
    np.testing.assert_array_equal(y.reshape(2, 2), [[-1, 3], [2, 3]])


# ================================================================== errors
def test_errors_name_the_node_and_the_fix():
    g = gc.Graph("e")
    x = g.input("x", (None, 4, 8, 8))
    cases = [
        (lambda: g.maxpool(x, 3, pad=2, name="p"), ["'p'", "padding (2, 2)", "half the window", "(1, 1)"]),
        (lambda: g.conv(x, g.param("w1", (6, 3, 3, 3)), groups=2, name="c"), ["'c'", "groups=2", "(6, 2, 3, 3)"]),
        (lambda: g.conv(x, g.param("w2", (6, 1, 3, 3)), groups=3, name="c3"), ["'c3'", "groups=3", "divide"]),
        (lambda: g.conv(x, g.param("w3", (1, 4, 3, 3)), dilation=4, name="d"), ["'d'", "dilated", "extent 9x9"]),
        (lambda: g.prelu(x, g.param("s", (3,)), name="pr"), ["'pr'", "(C,) = (4,)", "(1,)"]),
        (lambda: g.pad2d(x, 8, mode="reflect", name="rp"), ["'rp'", "reflect", "smaller", "edge"]),
        (lambda: g.pad2d(x, 1, mode="wrap", name="wp"), ["'wp'", "unknown padding mode 'wrap'", "reflect"]),
        (lambda: g.batchnorm(x, *[g.param(f"b{i}", (3,)) for i in range(4)], name="bn"), ["running_mean", "trainable=False"]),
        (lambda: g.batchnorm(x, *[g.param(f"p{i}", (3,), trainable=i < 2) for i in range(4)], name="bn2"),
         ["'bn2'", "gamma", "4 channels"]),
    ]
    for make, words in cases:
        with pytest.raises(gc.GraphError) as e:
            make()
        msg = str(e.value)
        assert all(w in msg for w in words), (words, msg)
    with pytest.raises(gc.GraphError, match="bounds must be numbers"):
        g.clip(x, float("nan"), 0)


def test_clip_with_lo_above_hi_is_hi_everywhere_as_torch():
    torch = pytest.importorskip("torch")
    g = gc.Graph("clip_swapped", dtype="float64")
    x = g.input("x", (None, 4), dtype="float64")
    g.output(g.clip(x, 2.0, 1.0, name="y"))
    v = np.array([[-3.0, 1.5, 2.5, np.nan]])
    want = torch.clamp(torch.from_numpy(v), 2.0, 1.0).numpy()
    for backend in ("reference", "numba"):
        np.testing.assert_array_equal(gc.compile(g, backend=backend).run({"x": v})["y"], want)


def test_batchnorm_training_needs_two_values_per_channel():
    g = gc.Graph("b1")
    x = g.input("x", (None, 3))
    g.output(gc.nn.batchnorm2d(g, x, "bn"))
    exe = gc.compile(g)
    exe.run({"x": np.ones((1, 3))})                                  # inference: fine
    with pytest.raises(gc.FeedError, match="more than one value per channel"):
        exe.run({"x": np.ones((1, 3))}, training=True)


# ================================================================== PyTorch, float64, forward and gradients
@pytest.fixture(scope="module")
def torch():
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # tiny tensors: one thread (spinning workers cost more on a loaded machine)
    yield torch
    torch.set_num_threads(threads)


def against_torch(torch, build, torch_fn, inputs, training=False, atol=1e-10):
    """build(g, *values) -> value; torch_fn(*tensors) -> tensor. Compares the output and the gradient of
    sum(y * r) with respect to every input (float64)."""
    rng = np.random.default_rng(0)
    g = gc.Graph("vs_torch", dtype="float64")
    vals = [g.param(f"in{i}", value=v) for i, v in enumerate(inputs)]
    y = build(g, *vals)
    y_shape = tuple(y.shape)
    r = rng.normal(size=y_shape)
    g.output(g.sum(g.mul(y, g.const(r)), name="loss"), y)
    out = gc.compile(g).run({}, training=training)
    grads = gc.compile(gc.grad(g, wrt=[v.name for v in vals], loss="loss")).run({}, training=training)
    ts = [torch.tensor(v, requires_grad=True) for v in inputs]
    ty = torch_fn(*ts)
    (ty * torch.tensor(r)).sum().backward()
    np.testing.assert_allclose(out[y.name], ty.detach().numpy(), atol=atol, rtol=1e-9)
    for v, t in zip(vals, ts):
        np.testing.assert_allclose(grads[f"grad/{v.name}"], t.grad.numpy(), atol=atol, rtol=1e-8, err_msg=v.name)


@PROPERTY
@given(st.data())
def test_conv_groups_and_dilation_match_torch(torch, data):
    d = data.draw
    groups = d(st.sampled_from([1, 2, "C"]))
    cg = 1 if groups == "C" else d(st.integers(1, 2))
    groups = d(st.integers(1, 4)) if groups == "C" else groups
    c, k = cg * groups, groups * d(st.integers(1, 2))
    kh, kw, dil = d(st.integers(1, 3)), d(st.integers(1, 3)), (d(st.integers(1, 3)), d(st.integers(1, 3)))
    stride, pad = d(st.sampled_from([1, 2, (2, 1)])), d(st.sampled_from([0, 1, (2, 1)]))
    h, w = (kh - 1) * dil[0] + d(st.integers(1, 4)), (kw - 1) * dil[1] + d(st.integers(1, 4))
    rng = np.random.default_rng(d(st.integers(0, 99)))
    x, wt, b = rng.normal(size=(2, c, h, w)), rng.normal(size=(k, cg, kh, kw)), rng.normal(size=k)
    against_torch(torch, lambda g, x, w, b: g.conv(x, w, b, stride=stride, pad=pad, dilation=dil, groups=groups),
                  lambda x, w, b: torch.nn.functional.conv2d(x, w, b, stride, pad, dil, groups), [x, wt, b])


@PROPERTY
@given(st.data())
def test_pools_ceil_mode_padding_and_count_include_pad_match_torch(torch, data):
    d = data.draw
    size = (d(st.integers(1, 3)), d(st.integers(1, 3)))
    stride = (d(st.integers(1, 3)), d(st.integers(1, 3)))
    pad = (d(st.integers(0, size[0] // 2)), d(st.integers(0, size[1] // 2)))
    ceil, cip = d(st.booleans()), d(st.booleans())
    x = np.random.default_rng(d(st.integers(0, 99))).normal(size=(2, 2, size[0] + d(st.integers(0, 4)),
                                                                  size[1] + d(st.integers(0, 4))))
    F = torch.nn.functional
    against_torch(torch, lambda g, x: g.maxpool(x, size, stride, pad=pad, ceil_mode=ceil),
                  lambda x: F.max_pool2d(x, size, stride, pad, ceil_mode=ceil), [x])
    against_torch(torch, lambda g, x: g.avgpool(x, size, stride, pad=pad, ceil_mode=ceil, count_include_pad=cip),
                  lambda x: F.avg_pool2d(x, size, stride, pad, ceil_mode=ceil, count_include_pad=cip), [x])


def test_global_maxpool_pad_modes_and_batched_matmul_match_torch(torch):
    rng = np.random.default_rng(3)
    F = torch.nn.functional
    x = rng.normal(size=(2, 3, 4, 5))
    against_torch(torch, lambda g, x: g.global_maxpool(x), lambda x: F.adaptive_max_pool2d(x, 1).flatten(1), [x])
    for mode, tmode in (("reflect", "reflect"), ("edge", "replicate"), ("constant", "constant")):
        against_torch(torch, lambda g, x: g.pad2d(x, (1, 3, 2, 0), mode=mode),
                      lambda x: F.pad(x, (2, 0, 1, 3), mode=tmode), [x])
    for sa, sb, ta, tb in (((2, 3, 4), (4, 5), False, False), ((3, 1, 4, 2), (2, 4, 5), True, False),
                           ((4, 3), (6, 2, 5, 3), False, True)):
        against_torch(torch, lambda g, a, b: g.matmul(a, b, trans_a=ta, trans_b=tb),
                      lambda a, b: (a.transpose(-1, -2) if ta else a) @ (b.transpose(-1, -2) if tb else b),
                      [rng.normal(size=sa), rng.normal(size=sb)])


@pytest.mark.parametrize("shape", [(2, 7, 3, 4), (3, 5, 6)])
@pytest.mark.parametrize("size", [1, 2, 5])
def test_lrn_matches_torch(torch, shape, size):
    x = np.random.default_rng(size).normal(size=shape) * 2
    against_torch(torch, lambda g, x: g.lrn(x, size, 0.1, 0.75, 2.0),
                  lambda x: torch.nn.functional.local_response_norm(x, size, 0.1, 0.75, 2.0), [x])


def test_activations_match_torch(torch):
    rng = np.random.default_rng(4)
    F = torch.nn.functional
    x = rng.normal(size=(2, 3, 4)) * 4
    for build, fn in ((lambda g, v: g.leaky_relu(v, 0.2), lambda v: F.leaky_relu(v, 0.2)),
                      (lambda g, v: g.clip(v, -1.0, 2.0), lambda v: torch.clamp(v, -1.0, 2.0)),
                      (lambda g, v: g.clip(v, 0.0, 6.0), F.relu6),
                      (lambda g, v: g.silu(v), F.silu), (lambda g, v: g.hardswish(v), F.hardswish)):
        against_torch(torch, build, fn, [x])
    for slope in (rng.normal(size=3), rng.normal(size=1)):
        against_torch(torch, lambda g, v, a: g.prelu(v, a), F.prelu, [x, slope])
    nan = np.array([np.nan, -1.0, 1.0])
    for build, fn in ((lambda g, v: g.leaky_relu(v), F.leaky_relu), (lambda g, v: g.clip(v, 0, 6), F.relu6),
                      (lambda g, v: g.silu(v), F.silu), (lambda g, v: g.hardswish(v), F.hardswish)):
        got = run(lambda g: build(g, const(g, nan)))
        np.testing.assert_array_equal(got, fn(torch.tensor(nan)).numpy())      # NaN propagates, as torch


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("shape", [(4, 3, 2, 3), (5, 3)])
def test_batchnorm_both_modes_match_torch(torch, training, shape):
    rng = np.random.default_rng(5)
    rm, rv = rng.normal(size=3), rng.uniform(0.5, 2, size=3)

    def build(g, x, gamma, beta):
        return g.batchnorm(x, gamma, beta, g.param("rm", value=rm, trainable=False),
                           g.param("rv", value=rv, trainable=False), eps=1e-3)
    against_torch(torch, build, lambda x, gm, bt: torch.nn.functional.batch_norm(
        x, torch.tensor(rm), torch.tensor(rv), gm, bt, training=training, eps=1e-3),
        [rng.normal(size=shape) * 2 + 1, rng.uniform(0.5, 1.5, 3), rng.normal(size=3)], training=training)


def _bn_net(rng):
    """conv -> BN -> ReLU -> global average pool -> linear -> softmax cross-entropy, float64."""
    g = gc.Graph("bn_net", dtype="float64")
    x = g.input("x", (None, 3, 5, 4))
    h = gc.nn.conv_bn_relu(g, x, 4, 3, pad=1, name="conv", bn_name="bn")
    g.params["conv.weight"] = rng.normal(size=(4, 3, 3, 3)) * 0.3
    g.params["bn.weight"], g.params["bn.bias"] = rng.uniform(0.5, 1.5, 4), rng.normal(size=4)
    logits = gc.nn.linear(g, g.global_avgpool(h), 3, name="fc")
    return gc.nn.finish(g, logits)


def test_batchnorm_training_running_stats_match_torch_after_three_steps(torch, tmp_path):
    rng = np.random.default_rng(6)
    g = _bn_net(rng)
    batches = [(rng.normal(size=(4, 3, 5, 4)) * 2 + 0.5, rng.integers(0, 3, 4)) for _ in range(3)]
    exe = gc.compile(g, optimizer=gc.optim.SGD(0.1, momentum=0.9))
    losses = [exe.step({"x": x, "labels": y}) for x, y in batches]
    nn = torch.nn
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double()
    names = ["conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "fc.weight", "fc.bias"]
    keys = ["0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var", "5.weight", "5.bias"]
    init = gc.compile(g).state
    net.load_state_dict({k: torch.tensor(init[n]) for k, n in zip(keys, names)}, strict=False)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for (x, y), loss in zip(batches, losses):
        opt.zero_grad()
        t = nn.functional.cross_entropy(net(torch.tensor(x)), torch.tensor(y))
        t.backward()
        opt.step()
        assert loss == pytest.approx(t.item(), rel=1e-10)
    sd = net.state_dict()
    for n, k in zip(names, keys):
        np.testing.assert_allclose(exe.state[n], sd[k].numpy(), rtol=1e-9, atol=1e-12, err_msg=n)
    # inference uses the running statistics, as torch's eval mode
    net.eval()
    x0 = batches[0][0]
    ref = nn.functional.cross_entropy(net(torch.tensor(x0)), torch.tensor(batches[0][1])).item()
    infer = gc.compile(g)
    infer.load_state_dict({k: v for k, v in exe.state_dict().items() if k in infer.state or k == "__step__"})
    assert float(infer.run({"x": x0, "labels": batches[0][1]})["loss"]) == pytest.approx(ref, rel=1e-10)
    # a checkpoint carries the running statistics
    from graphc.checkpoint import load_checkpoint, save_checkpoint
    save_checkpoint(tmp_path / "bn.npz", exe)
    fresh = gc.compile(g, optimizer=gc.optim.SGD(0.1, momentum=0.9))
    load_checkpoint(tmp_path / "bn.npz", fresh)
    for n in ("bn.running_mean", "bn.running_var"):
        np.testing.assert_array_equal(fresh.state[n], exe.state[n])
        assert not np.array_equal(fresh.state[n], init[n])
