"""The winograd conv strategy (backends/numba/conv/winograd_gemm.py): Winograd F(4x4, 3x3) with BLAS
products for 3x3 stride-1 forward convs, dL/dX and dL/dW, against the direct kernels (the oracle of the
conv strategies, themselves tested against the reference backend) and the reference backend."""
import numba
import numpy as np
import pytest

import graphc as gc
from graphc.backends.numba.conv import direct
from graphc.backends.numba.conv import strategy as conv_strategy
from graphc.backends.numba.conv import winograd_gemm as wg
from graphc.backends.numba.precompile import discovering

# (N, C, K, H, W, pads): odd sizes (partial tiles), no padding, asymmetric padding up to 2
SHAPES = [(2, 5, 7, 9, 11, (1, 1, 1, 1)), (3, 4, 6, 8, 7, (0, 0, 0, 0)), (2, 3, 5, 10, 9, (2, 1, 0, 2)),
          (1, 6, 4, 13, 5, (1, 0, 2, 1))]


@pytest.fixture(params=["chunks", "whole"])
def mode(request, monkeypatch):
    """Both ways run() goes over the batch: chunks of tile rows, or each step once over the whole batch."""
    chunks = request.param == "chunks"
    monkeypatch.setattr(wg, "WHOLE_RATIO", float("inf") if chunks else 0.0)
    monkeypatch.setattr(wg, "DW_PARTIAL_BYTES", float("inf") if chunks else 0)
    monkeypatch.setattr(wg, "MIN_TILES", 1)
    monkeypatch.setattr(wg, "CHUNK_BYTES", 1)          # a chunk per tile row: several chunks per image
    return request.param


def _data(shape, dtype, seed=0):
    N, C, K, H, W, pads = shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((K, C, 3, 3)).astype(dtype)
    b = rng.standard_normal(K).astype(dtype)
    Ho, Wo = H + pads[0] + pads[1] - 2, W + pads[2] + pads[3] - 2
    dy = rng.standard_normal((N, K, Ho, Wo)).astype(dtype)
    return x, w, b, dy


def _close(got, want, tol):
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= tol * np.abs(want).max(), np.abs(got - want).max() / np.abs(want).max()


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_dx_dw_equal_direct_in_float64(shape, mode):
    # float64: Winograd's rounding is ~1e-15 of the largest value, so any wrong index or coefficient shows
    x, w, b, dy = _data(shape, np.float64)
    pads = shape[-1]
    for epi, relu in (("store", False), ("store", True), ("pool", True)):
        want = direct.forward(x, w, b, 1, pads, epi, relu=relu, ps=2, pst=2)[0]
        got, route = wg.forward(x, w, b, 1, pads, epi, relu=relu, ps=2, pst=2)
        assert route is None
        _close(got, want, 1e-13)
    H, W = x.shape[2:]
    _close(wg.grad_input(dy, w, 1, pads, (H, W)), direct.grad_input(dy, w, 1, pads, (H, W)), 1e-13)
    _close(wg.grad_weights(x, dy, 1, pads, (3, 3)), direct.grad_weights(x, dy, 1, pads, (3, 3)), 1e-13)


def test_results_do_not_depend_on_the_thread_count(mode):
    # chunks follow the thread count; each output, and dL/dW's partial sums (fixed groups), do not
    x, w, b, dy = _data((3, 16, 16, 12, 12, (1, 1, 1, 1)), np.float32)
    runs = []
    before = numba.get_num_threads()
    try:
        for t in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(t)
            runs.append((wg.forward(x, w, b, 1, (1, 1, 1, 1), "store")[0].copy(),
                         wg.grad_input(dy, w, 1, (1, 1, 1, 1), (12, 12)).copy(),
                         wg.grad_weights(x, dy, 1, (1, 1, 1, 1), (3, 3)).copy()))
    finally:
        numba.set_num_threads(before)
    for a, b_ in zip(runs[0], runs[-1]):
        assert np.array_equal(a, b_)


def test_float32_rounding_stays_small():
    # float32 against float64 sums: F(4x4, 3x3) rounds to ~1e-6 of the largest value here (the direct
    # kernel ~1e-7); 64 channels as in the networks it runs
    x, w, b, dy = _data((2, 64, 64, 12, 12, (1, 1, 1, 1)), np.float32)
    x64, w64, b64, dy64 = (a.astype(np.float64) for a in (x, w, b, dy))
    pads = (1, 1, 1, 1)
    _close(wg.forward(x, w, b, 1, pads, "store")[0], direct.forward(x64, w64, b64, 1, pads, "store")[0], 2e-5)
    _close(wg.grad_input(dy, w, 1, pads, (12, 12)), direct.grad_input(dy64, w64, 1, pads, (12, 12)), 2e-5)
    _close(wg.grad_weights(x, dy, 1, pads, (3, 3)), direct.grad_weights(x64, dy64, 1, pads, (3, 3)), 2e-5)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")      # the direct kernels' sums of infs
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_non_finite_values_give_the_direct_kernels_results(bad):
    # an inf input would become NaN in the transforms (inf - inf) where the direct sum gives inf, and a
    # pool could drop a NaN: such calls are run by the direct kernel
    x, w, b, dy = _data((2, 4, 5, 8, 8, (1, 1, 1, 1)), np.float32)
    x[1, 2, 3, 4] = bad
    dy[0, 1, 2, 2] = bad
    pads = (1, 1, 1, 1)
    for epi in ("store", "pool"):
        want = direct.forward(x, w, b, 1, pads, epi, relu=True, ps=2, pst=2)[0]
        got = wg.forward(x, w, b, 1, pads, epi, relu=True, ps=2, pst=2)[0]
        assert np.array_equal(got, want, equal_nan=True)
    assert np.array_equal(wg.grad_input(dy, w, 1, pads, (8, 8)), direct.grad_input(dy, w, 1, pads, (8, 8)),
                          equal_nan=True)
    assert np.array_equal(wg.grad_weights(x, dy, 1, pads, (3, 3)), direct.grad_weights(x, dy, 1, pads, (3, 3)),
                          equal_nan=True)


def test_other_convs_and_training_pools_go_to_the_direct_kernel():
    x, w, b, dy = _data((2, 3, 4, 9, 9, (1, 1, 1, 1)), np.float64)
    pads = (1, 1, 1, 1)
    y, route = wg.forward(x, w, b, 1, pads, "pool", relu=True, ps=2, pst=2, save_route=True)
    y0, route0 = direct.forward(x, w, b, 1, pads, "pool", relu=True, ps=2, pst=2, save_route=True)
    assert np.array_equal(y, y0) and np.array_equal(route, route0)
    w5 = np.ones((4, 3, 5, 5))
    assert np.array_equal(wg.forward(x, w5, b, 1, (2, 2, 2, 2), "store")[0],
                          direct.forward(x, w5, b, 1, (2, 2, 2, 2), "store")[0])
    assert np.array_equal(wg.forward(x, w, b, 2, pads, "store")[0], direct.forward(x, w, b, 2, pads, "store")[0])


def test_a_kernel_discovery_records_and_computes_nothing(mode):
    x, w, b, dy = _data((2, 3, 4, 9, 9, (1, 1, 1, 1)), np.float32)
    with discovering() as found:
        wg.forward(x, w, b, 1, (1, 1, 1, 1), "store")
        wg.grad_input(dy, w, 1, (1, 1, 1, 1), (9, 9))
        wg.grad_weights(x, dy, 1, (1, 1, 1, 1), (3, 3))
    names = {d.py_func.__name__ for d, _, _ in found.values()}
    want = {"_chunks_k", "_dw_chunks_k"} if mode == "chunks" else \
        {"_input_k", "_products_k", "_output_k", "_dy_k", "_dw_products_k"}
    assert want <= names, names


def test_static_rule_takes_winograd_for_deep_float32_3x3_convs():
    rule = conv_strategy.static_rule
    deep = (16, 64, 56, 56)
    for op in ("conv2d", "conv2d_relu_maxpool", "conv2d_dx", "conv2d_dw"):
        assert rule(op, 1, (64, 64, 3, 3), x_shape=deep, dtype=np.float32) == "winograd", op
    assert rule("conv2d", 1, (64, 64, 3, 3), x_shape=deep, dtype=np.float64) == "direct"   # exact sums
    assert rule("conv2d", 1, (64, 64, 3, 3), x_shape=(1, 64, 56, 56), dtype=np.float32) == "direct"  # batch 1
    assert rule("conv2d", 1, (64, 32, 3, 3), x_shape=(16, 32, 56, 56), dtype=np.float32) == "direct"
    assert rule("conv2d", 1, (512, 512, 3, 3), x_shape=(2, 512, 14, 14), dtype=np.float32) == "direct"  # 32 tiles
    assert rule("conv2d", 2, (64, 64, 3, 3), x_shape=deep, dtype=np.float32) != "winograd"
    assert rule("conv2d", 1, (64, 64, 5, 5), x_shape=deep, dtype=np.float32) == "direct"
    assert rule("conv2d", 1, (64, 64, 3, 3), x_shape=deep, dtype=np.float32, dil=(2, 2)) == "direct"
    assert conv_strategy._pick({"direct": 1.0, "im2col": 2.0, "winograd": 0.8}) == "winograd"
    assert conv_strategy._pick({"direct": 1.0, "im2col": 2.0, "winograd": 0.9}) == "direct"
    # a tuning run times winograd where it can run the conv (a 2x2/2 pool, not a 3x3/2 one)
    cands = conv_strategy._candidates
    assert set(cands("conv2d_dw", deep, (64, 64, 3, 3), 1, (1, 1, 1, 1), np.float32, None)) == \
        set(conv_strategy.STRATEGIES)
    assert "winograd" in cands("conv2d_relu_maxpool", deep, (64, 64, 3, 3), 1, (1, 1, 1, 1), np.float32, (2, 2))
    assert "winograd" not in cands("conv2d_relu_maxpool", deep, (64, 64, 3, 3), 1, (1, 1, 1, 1), np.float32,
                                   (3, 2))
    assert "winograd" not in cands("conv2d", deep, (64, 64, 5, 5), 1, (2, 2, 2, 2), np.float32, None)
    # a remembered timing from before winograd existed is not taken for a conv it can run
    old = {"strategy": "direct", "ms": {"direct": 1.0, "im2col": 2.0}, "load": 0.1}
    assert conv_strategy._remembered(old, False, conv_strategy.STRATEGIES) is None
    assert conv_strategy._remembered(old, False, ("direct", "im2col")) == "direct"


def _net():
    rng = np.random.default_rng(0)
    g = gc.Graph("wino", dtype="float32")
    x = g.input("x", (None, 8, 16, 16))

    def p(name, shape):
        return g.param(name, value=rng.standard_normal(shape) * 0.1)
    h = g.relu(g.conv(x, p("c1.w", (64, 8, 3, 3)), p("c1.b", (64,)), pad=1))
    h = g.maxpool(g.relu(g.conv(h, p("c2.w", (64, 64, 3, 3)), p("c2.b", (64,)), pad=1)), 2)
    logits = g.dense(g.flatten(h), p("fc", (3, 64 * 8 * 8)), name="logits")
    return gc.nn.finish(g, logits)


def test_a_network_step_on_winograd_agrees_with_the_reference_backend():
    # a float32 64 -> 64 channel 3x3 conv at batch 4 on 16x16 planes: 64 tiles, taken by the static rule
    # (forward, dL/dX, dL/dW); one SGD step's parameter changes agree with the reference backend's
    assert conv_strategy.static_rule("conv2d_dw", 1, (64, 64, 3, 3), x_shape=(4, 64, 16, 16),
                                     dtype=np.float32) == "winograd"
    g = _net()
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((4, 8, 16, 16)).astype(np.float32), "labels": np.array([0, 1, 2, 1])}
    moved = {}
    for be in ("reference", "numba"):
        exe = gc.compile(g, backend=be, optimizer=gc.optim.SGD(0.5))
        before = {k: np.array(v) for k, v in exe.state_dict().items()}
        moved[be] = (exe.step(feeds), {k: np.asarray(v) - before[k] for k, v in exe.state_dict().items()})
    (loss_ref, d_ref), (loss_nb, d_nb) = moved["reference"], moved["numba"]
    assert abs(loss_nb - loss_ref) <= 1e-5 * abs(loss_ref)
    for k in d_ref:
        _close(d_nb[k], d_ref[k], 1e-4)
