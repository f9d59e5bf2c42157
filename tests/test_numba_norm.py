"""The numba kernels of batch norm (forward in both modes, running statistics, the two backward ops), LRN
(forward and backward, every window size), global max pool and its plane-sized route (NaN handling),
reflect/edge padding and its crop, against the reference in float64 and float32, with gradients
(gc.grad graphs) and SGD steps; every op runs a kernel (nothing falls back)."""
import numpy as np
import pytest

import graphc as gc
from graphc.errors import FeedShapeError


def norm_net(dtype, lrn_size=3):
    rng = np.random.default_rng(11)
    g = gc.Graph("norm_net", dtype=dtype)
    x = g.input("x", (None, 2, 5, 5))
    h = g.conv(x, g.param("w", value=rng.standard_normal((6, 2, 3, 3)) * 0.4), pad=1)
    h = g.lrn(gc.nn.batchnorm2d(g, h, "bn"), lrn_size, 0.1, 0.75, 2.0)
    h = g.pad2d(g.pad2d(h, (1, 0, 2, 1), mode="reflect"), (2, 1, 0, 1), mode="edge")
    z = gc.nn.batchnorm2d(g, g.global_maxpool(h), "bn1d")
    g.output(g.softmax_cross_entropy(g.dense(z, g.param("fc", value=rng.standard_normal((3, 6)))), g.input(
        "y", (None,), dtype="int64"), name="loss"))
    return g


FEEDS = {"x": np.random.default_rng(2).standard_normal((3, 2, 5, 5)), "y": np.array([0, 2, 1])}


def tol(dtype):
    return dict(rtol=1e-10, atol=1e-12) if dtype == "float64" else dict(rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_forward_gradients_and_steps(dtype):
    g = norm_net(dtype)
    f = dict(FEEDS, x=FEEDS["x"].astype(dtype))
    gg = gc.grad(g, wrt=["x", "w", "bn.weight", "bn.bias", "fc"])
    ref, exe = gc.compile(gg), gc.compile(gg, backend="numba", threads=1)
    for training in (True, False):
        r, e = ref.run(f, training=training), exe.run(f, training=training)
        for k in r:
            np.testing.assert_allclose(e[k], r[k], err_msg=f"{k} training={training}", **tol(dtype))
    assert exe.fallbacks() == []
    mk = lambda: gc.optim.SGD(0.1, momentum=0.9)  # noqa: E731
    rt, nt = gc.compile(g, optimizer=mk()), gc.compile(g, backend="numba", optimizer=mk(), threads=1)
    np.testing.assert_allclose([nt.step(f) for _ in range(2)], [rt.step(f) for _ in range(2)], **tol(dtype))
    for k in rt.state:
        np.testing.assert_allclose(nt.state[k], rt.state[k], err_msg=k, **tol(dtype))
    assert nt.fallbacks() == []


@pytest.mark.parametrize("size,beta", [(1, 0.75), (2, 0.75), (5, 0.75), (8, 0.75), (5, 0.6)])
def test_lrn_window_sizes_forward_and_backward(size, beta):
    """(beta 0.75, the papers', is computed with square roots; others with pow)"""
    g = gc.Graph("lrn", dtype="float64")
    x = g.input("x", (None, 6, 2, 3))
    r = g.const(np.random.default_rng(size).standard_normal((1, 6, 2, 3)))
    g.output(g.sum(g.mul(g.lrn(x, size, 0.5, beta, 1.5), r), name="l"))
    gg = gc.grad(g, wrt=["x"], loss="l")
    f = {"x": np.random.default_rng(0).standard_normal((2, 6, 2, 3)) * 2}
    ref, got = gc.compile(gg).run(f), gc.compile(gg, backend="numba", threads=1).run(f)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-12, atol=1e-12)


def test_global_max_pool_and_its_route_nan_and_ties():
    g = gc.Graph("gmp", dtype="float64")
    x = g.input("x", (None, 2, 9, 9))                  # 81 taps: the looped route kernel
    g.output(g.sum(g.mul(g.global_maxpool(x), g.const([[1.0, 2.0]])), name="l"))
    gg = gc.grad(g, wrt=["x"], loss="l")
    v = np.zeros((2, 2, 9, 9))
    v[0, 0, 3, 4] = v[0, 0, 7, 1] = 5.0                # a tie: the first max in row-major order
    v[1, 1, 2, 2], v[1, 1, 6, 6] = 1.0, np.nan         # NaN wins (the first NaN)
    v[1, 0] = -np.arange(81).reshape(9, 9)
    ref, got = gc.compile(gg).run({"x": v}), gc.compile(gg, backend="numba", threads=1).run({"x": v})
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k])
    assert got["grad/x"][0, 0, 3, 4] == 1.0 and got["grad/x"][1, 1, 6, 6] == 2.0


def test_batch_norm_training_needs_two_values_per_channel():
    g = gc.Graph("bn1")
    x = g.input("x", (None, 3))
    g.output(gc.nn.batchnorm2d(g, x, "bn"))
    exe = gc.compile(g, backend="numba")
    exe.run({"x": np.ones((1, 3))})                    # inference: fine
    with pytest.raises(FeedShapeError, match="batch of 2"):
        exe.run({"x": np.ones((1, 3))}, training=True)
