"""Grouped, dilated and depthwise convolutions on the numba backend, against the reference semantics
(graphc.ops.conv, equal to torch's: tests/test_ops_cnn.py):

- the conv package's kernels on hypothesis-drawn geometries (groups 1, 2 or C, dilation 1-3, stride 1
  or 2, padding including 'same'; float32 and float64): forward, dL/dX and dL/dW by both strategies
  (direct and im2col+GEMM) and, for groups == C, the depthwise stencils with their clip epilogue;
- the strategy choice for grouped/dilated geometries: a static rule on a cold start; timed once in a
  tuning run, remembered under its own key;
- graphs: conv, conv_relu (ReLU), conv_clip (ReLU6) and conv_relu_maxpool fused around grouped,
  dilated and depthwise convs give the reference's values with nothing falling back, inference and
  SGD training steps; their kernels found by the precompile discovery, training bit-identical on one
  and two threads.

Shapes are tiny and the examples few: every distinct shape compiles generated kernels.
"""
import contextlib
import json
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import graphc as gc
from graphc import shapes
from graphc.backends.numba import conv as nc
from graphc.backends.numba import precompile
from graphc.backends.numba.conv import direct
from graphc.backends.numba.conv import depthwise as ndw
from graphc.backends.numba.conv import strategy as conv_strategy
from graphc.ops.conv import conv_dw_ref, conv_dx_ref, conv_ref, effective

TOL = {np.float32: dict(rtol=2e-4, atol=2e-5), np.float64: dict(rtol=1e-10, atol=1e-11)}
KERNELS = settings(max_examples=8, deadline=None, derandomize=True,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def geometries(draw):
    """(x shape, w shape, stride, pads, dilation, groups, dtype): groups 1, 2 or C (depthwise, one or two
    filters per channel), dilation 1-3 (or (1, 2)), stride 1 or 2, padding 0, 1, asymmetric or 'same'."""
    kind = draw(st.sampled_from([1, 2, "C"]))
    if kind == "C":
        groups = c = draw(st.integers(1, 3))
        k = c * draw(st.integers(1, 2))
    else:
        groups = kind
        c, k = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dil = shapes.pair(draw(st.sampled_from([1, 2, 3, (1, 2)])))
    s = draw(st.sampled_from([1, 2]))
    eh, ew = effective(kh, dil[0]), effective(kw, dil[1])
    h, w = eh + draw(st.integers(0, 3)), ew + draw(st.integers(0, 3))
    pad = draw(st.sampled_from([0, 1, (1, 0, 2, 1), "same"]))
    pads = shapes.conv_pads(pad, (h, w), (eh, ew), (s, s))
    n = draw(st.integers(1, 2))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    return (n, c, h, w), (k, c // groups, kh, kw), s, pads, dil, groups, dtype


def _data(x_shape, w_shape, s, pads, dil, groups, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype)
    y = conv_ref(x, w, b, (s, s), pads, dil, groups)
    dy = rng.standard_normal(y.shape).astype(dtype)
    return x, w, b, y, dy


@KERNELS
@given(geometries())
def test_grouped_dilated_kernels_match_the_reference(geo):
    x_shape, w_shape, s, pads, dil, groups, dtype = geo
    x, w, b, y, dy = _data(*geo)
    dx_ref = conv_dx_ref(dy, w, (s, s), pads, x_shape[2:], dil, groups)
    dw_ref = conv_dw_ref(x, dy, (s, s), pads, w_shape[2:], dil, groups)
    tol = TOL[dtype]
    for strategy in nc.STRATEGIES:
        kw = dict(strategy=strategy, dilation=dil, groups=groups)
        np.testing.assert_allclose(nc.conv2d(x, w, b, s, pads, **kw), y, err_msg=strategy, **tol)
        np.testing.assert_allclose(nc.conv2d(x, w, b, s, pads, relu=True, **kw), np.maximum(y, 0), **tol)
        np.testing.assert_allclose(nc.conv2d_dx(dy, w, s, pads, x_shape[2:], **kw), dx_ref, err_msg=strategy, **tol)
        np.testing.assert_allclose(nc.conv2d_dw(x, dy, s, pads, w_shape[2:], **kw), dw_ref, err_msg=strategy,
                                   **dict(tol, atol=10 * tol["atol"]))
    if s == 1:                                       # the prebound direct forward of the lowering
        run = nc.bind_direct_fwd(x_shape, w_shape, True, 1, pads, dtype, "store", (0, 0), dil, groups)
        out = np.empty(y.shape, dtype)
        run(x, w, b, out, np.empty((1, 1, 1, 1), np.int32), False)
        np.testing.assert_allclose(out, y, **tol)


@KERNELS
@given(geometries().filter(lambda g: g[5] == g[0][1]))
def test_depthwise_kernels_match_the_reference(geo):
    x_shape, w_shape, s, pads, dil, groups, dtype = geo
    assert ndw.is_depthwise(x_shape, w_shape, groups)
    x, w, b, y, dy = _data(*geo)
    tol = TOL[dtype]
    for act, want in ((None, y), ((0.0, None), np.maximum(y, 0)), ((0.0, 0.5), np.clip(y, 0, 0.5))):
        out = np.full(y.shape, np.nan, dtype)
        ndw.bind_forward(x_shape, w_shape, (s, s), pads, dil, dtype, act)(x, w, b, out)
        np.testing.assert_allclose(out, want, err_msg=str(act), **tol)
    dx = np.full(x_shape, np.nan, dtype)
    ndw.bind_grad_input(x_shape, w_shape, (s, s), pads, dil, dtype)(dy, w, dx)
    np.testing.assert_allclose(dx, conv_dx_ref(dy, w, (s, s), pads, x_shape[2:], dil, groups), **tol)
    dw = np.full(w_shape, np.nan, dtype)
    ndw.bind_grad_weights(x_shape, w_shape, (s, s), pads, dil, dtype)(x, dy, dw)
    np.testing.assert_allclose(dw, conv_dw_ref(x, dy, (s, s), pads, w_shape[2:], dil, groups),
                               **dict(tol, atol=10 * tol["atol"]))


def test_depthwise_edges_non_square_strides_nan_and_image_groups():
    """Non-square stride and dilation with pads larger than the filter; NaN through the clip epilogue
    (torch's clamp keeps it); dL/dW over several groups of images (partial sums added in float64)."""
    rng = np.random.default_rng(5)
    x_shape, w_shape, stride, pads, dil = (9, 2, 7, 6), (4, 1, 3, 2), (2, 1), (3, 0, 1, 2), (1, 2)
    x = rng.standard_normal(x_shape)
    w = rng.standard_normal(w_shape)
    y = conv_ref(x, w, None, stride, pads, dil, 2)
    x[0, 1, 3, 2] = np.nan
    out = np.empty(y.shape)
    ndw.bind_forward(x_shape, w_shape, stride, pads, dil, np.float64, (0.0, 6.0))(x, w, None, out)
    nan = np.isnan(conv_ref(x, w, None, stride, pads, dil, 2))
    assert nan.any() and np.array_equal(np.isnan(out), nan)
    np.testing.assert_allclose(out[~nan], np.clip(y, 0, 6)[~nan], rtol=1e-12, atol=1e-12)
    x[0, 1, 3, 2] = 0.5
    dy = rng.standard_normal(y.shape)
    run = ndw.bind_grad_weights(x_shape, w_shape, stride, pads, dil, np.float64)
    dw = np.empty(w_shape)
    run(x, dy, dw)
    np.testing.assert_allclose(dw, conv_dw_ref(x, dy, stride, pads, (3, 2), dil, 2), rtol=1e-11, atol=1e-11)
    dx = np.empty(x_shape)
    ndw.bind_grad_input(x_shape, w_shape, stride, pads, dil, np.float64)(dy, w, dx)
    np.testing.assert_allclose(dx, conv_dx_ref(dy, w, stride, pads, (7, 6), dil, 2), rtol=1e-11, atol=1e-11)


def test_one_depthwise_kernel_serves_every_plane_size():
    """The depthwise kernels are generated per filter, stride, dilation and multiplier only: layers of
    other sizes and paddings share them (and their run-time geometry must not leak between layers)."""
    rng = np.random.default_rng(7)
    runs = []
    for x_shape, pads in (((2, 3, 9, 7), (1, 1, 1, 1)), ((1, 5, 6, 11), (2, 0, 0, 1))):
        w_shape = (x_shape[1], 1, 3, 3)
        x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
        y = conv_ref(x, w, None, (2, 2), pads, (1, 1), x_shape[1])
        dy = rng.standard_normal(y.shape)
        fwd = ndw.bind_forward(x_shape, w_shape, (2, 2), pads, (1, 1), np.float64)
        dx = ndw.bind_grad_input(x_shape, w_shape, (2, 2), pads, (1, 1), np.float64)
        dw = ndw.bind_grad_weights(x_shape, w_shape, (2, 2), pads, (1, 1), np.float64)
        runs.append((x, w, y, dy, pads, fwd, dx, dw))
    for x, w, y, dy, pads, fwd, dx, dw in runs + runs[::-1]:         # interleaved: nothing is left behind
        out, gx, gw = np.empty(y.shape), np.empty(x.shape), np.empty(w.shape)
        fwd(x, w, None, out)
        dx(dy, w, gx)
        dw(x, dy, gw)
        np.testing.assert_allclose(out, y, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(gx, conv_dx_ref(dy, w, (2, 2), pads, x.shape[2:], (1, 1), x.shape[1]), atol=1e-11)
        np.testing.assert_allclose(gw, conv_dw_ref(x, dy, (2, 2), pads, (3, 3), (1, 1), x.shape[1]), atol=1e-11)
    for a, b in zip(runs[0][5:], runs[1][5:]):
        assert a.kernel is b.kernel                                    # one kernel for both layers


def test_grouped_pool_epilogue_and_narrow_dw():
    """conv2d_relu_maxpool on a grouped, dilated conv (the direct kernel's pool epilogue reads the group's
    channels); dL/dW of one input channel with dilation (the narrow kernel's shifted copies)."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 4, 9, 9)).astype(np.float32)
    w = rng.standard_normal((6, 2, 3, 3)).astype(np.float32)
    z = np.maximum(conv_ref(x, w, None, (1, 1), (1, 1, 1, 1), (2, 2), 2), 0)
    want = z[:, :, :6, :6].reshape(2, 6, 3, 2, 3, 2).max(axis=(3, 5))
    for strategy in nc.STRATEGIES:
        got = nc.conv2d_relu_maxpool(x, w, None, 1, (1, 1, 1, 1), 2, 2, strategy=strategy, dilation=2, groups=2)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=strategy)
    x1 = rng.standard_normal((2, 1, 20, 20))
    dy = rng.standard_normal((2, 3, 16, 14))
    got = nc.conv2d_dw(x1, dy, 1, (0, 0, 0, 0), (3, 2), strategy="direct", dilation=(2, 6))
    np.testing.assert_allclose(got, conv_dw_ref(x1, dy, (1, 1), (0,) * 4, (3, 2), (2, 6)), rtol=1e-10, atol=1e-10)


def test_strategy_for_grouped_dilated_geometry_is_timed_once_in_a_tuning_run_and_remembered(monkeypatch):
    # a choice file of its own (the generated kernels stay in the kernel cache: warm after one run)
    from graphc.backends.kernel_cache import kernel_cache_dir
    name = f"conv_strategy_test_{os.getpid()}.json"
    path = os.path.join(kernel_cache_dir(), name)
    monkeypatch.setattr(conv_strategy, "_CHOICE_FILE", name)
    monkeypatch.delenv("GRAPHC_CONV_STRATEGY", raising=False)
    monkeypatch.setattr(conv_strategy, "_CHOICES", {})
    monkeypatch.setattr(conv_strategy, "_load_per_cpu", lambda: 0.1)     # no re-timing when the load drops
    calls = []
    real = conv_strategy._time_candidates
    monkeypatch.setattr(conv_strategy, "_time_candidates", lambda fns, r: calls.append(sorted(fns)) or real(fns, 1))
    args = ((4, 4, 8, 8), (4, 2, 3, 3), 1, (2, 2, 2, 2), np.float32)
    try:
        with conv_strategy.tuning(False):                               # a cold start: the static rule, untimed
            assert nc.choose_conv_strategy(*args, op="conv2d_dw", dilation=(2, 2), groups=2) == \
                conv_strategy.static_rule("conv2d_dw", 1, args[1], (2, 2), 2)
        assert calls == [] and not os.path.exists(path)
        with conv_strategy.tuning():
            got = nc.choose_conv_strategy(*args, op="conv2d_dw", dilation=(2, 2), groups=2)
            assert got in nc.STRATEGIES and calls == [["direct", "im2col"]]
            plain = nc.choose_conv_strategy((4, 4, 8, 8), (4, 4, 3, 3), 1, (2, 2, 2, 2), np.float32, op="conv2d_dw")
            assert len(calls) == 2 and plain in nc.STRATEGIES           # another key: timed on its own
            monkeypatch.setattr(conv_strategy, "_CHOICES", {})          # a new process: read from the file
            assert nc.choose_conv_strategy(*args, op="conv2d_dw", dilation=(2, 2), groups=2) == got
            assert len(calls) == 2
        keys = json.load(open(path))
        assert sum("|d2_2|g2" in k for k in keys) == 1 and sum("|g" in k for k in keys) == 1
    finally:
        if os.path.exists(path):
            os.remove(path)


def test_bad_groups_raise_backend_errors():
    x = np.zeros((1, 4, 5, 5), np.float32)
    with pytest.raises(gc.errors.BackendError, match="groups=3"):
        nc.conv2d(x, np.zeros((3, 2, 3, 3), np.float32), None, 1, (0,) * 4, groups=3)
    with pytest.raises(gc.errors.BackendError, match="dilation"):
        nc.conv2d(x, np.zeros((4, 2, 3, 3), np.float32), None, 1, (0,) * 4, groups=2, dilation=0)
    with pytest.raises(gc.errors.BackendError, match="larger than the padded input"):
        nc.conv2d(x, np.zeros((4, 2, 3, 3), np.float32), None, 1, (0,) * 4, groups=2, dilation=3)
    with pytest.raises(gc.errors.BackendError, match="depthwise"):
        ndw.Geometry((1, 4, 5, 5), (4, 2, 3, 3), (1, 1), (0,) * 4, (1, 1))


# ================================================================================ graphs on the backend

def mobile_block(dtype="float32", c=4):
    """A MobileNet-like net: 1x1 expansion + ReLU6, depthwise 3x3 (stride 1, then 2) + ReLU6 / ReLU,
    grouped dilated conv + ReLU + max pool, a depthwise conv with a channel multiplier, a linear head."""
    rng = np.random.default_rng(0)
    g = gc.Graph("mobile", dtype=dtype)
    x = g.input("x", (None, c, 10, 10))

    def p(name, shape):
        return g.param(name, value=rng.standard_normal(shape) * 0.4)
    h = g.clip(g.conv(x, p("e.w", (2 * c, c, 1, 1)), p("e.b", (2 * c,))), 0.0, 6.0)
    h = g.clip(g.conv(h, p("d1.w", (2 * c, 1, 3, 3)), p("d1.b", (2 * c,)), pad=1, groups=2 * c), 0.0, 6.0)
    h = g.relu(g.conv(h, p("d2.w", (2 * c, 1, 3, 3)), None, stride=2, pad="same", groups=2 * c))
    h = g.maxpool(g.relu(g.conv(h, p("g.w", (c, 4, 3, 3)), p("g.b", (c,)), pad=2, dilation=2, groups=2)), 2)
    h = g.conv(h, p("m.w", (2 * c, 1, 2, 2)), p("m.b", (2 * c,)), groups=c, dilation=(1, 2), pad=(1, 1))
    logits = g.dense(g.flatten(h), p("fc", (3, 2 * c * 3 * 2)), name="logits")
    return gc.nn.finish(g, logits)


def _fused_kinds(exe):
    nodes = exe.graph.nx.nodes
    return sorted(nodes[n]["attrs"]["pattern"] for n in exe.graph.nx if nodes[n]["op"] == "fused")


@pytest.fixture(scope="module")
def feeds():
    rng = np.random.default_rng(1)
    return {"x": rng.standard_normal((2, 4, 10, 10)), "labels": np.array([0, 2])}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_mobile_block_inference_fuses_and_matches_the_reference(dtype, feeds):
    g = mobile_block(dtype)
    ref = gc.compile(g).run(feeds)
    exe = gc.compile(g, backend="numba")
    got = exe.run(feeds)
    tol = TOL[np.dtype(dtype).type]
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], err_msg=k, **tol)
    assert exe.fallbacks() == []
    assert _fused_kinds(exe) == ["conv_clip", "conv_clip", "conv_relu", "conv_relu_maxpool"], _fused_kinds(exe)


def test_mobile_block_sgd_steps_match_the_reference(feeds):
    g = mobile_block("float64")
    runs = {}
    for be in ("reference", "numba"):
        exe = gc.compile(g, backend=be, optimizer=gc.optim.SGD(0.05, momentum=0.9))
        runs[be] = ([exe.step(feeds) for _ in range(2)], exe.state_dict(), exe)
    (l_ref, s_ref, _), (l_nb, s_nb, exe) = runs["reference"], runs["numba"]
    np.testing.assert_allclose(l_nb, l_ref, rtol=1e-10)
    for k in s_ref:
        np.testing.assert_allclose(s_nb[k], s_ref[k], rtol=1e-9, atol=1e-11, err_msg=k)
    assert exe.fallbacks() == []
    ops = {exe.graph.nx.nodes[n]["op"] for n in exe.graph.nx}
    assert {"conv_dx", "conv_dw"} <= ops


def test_mobile_block_kernels_are_found_before_the_first_step_and_train_alike_on_any_thread_count(feeds,
                                                                                                monkeypatch):
    """The precompile discovery finds the depthwise kernels (forward, dL/dX, dL/dW) and the grouped direct
    ones; every kernel on Python threads (no call too small to share), one and two threads train
    bit-identically."""
    found = []
    real = precompile.discovering

    @contextlib.contextmanager
    def spy():
        with real() as f:
            yield f
        found.extend(d for d, _, _ in f.values())
    monkeypatch.setattr(precompile, "discovering", spy)
    monkeypatch.setattr(direct, "TINY_CALL_FLOPS", 0)
    g = mobile_block("float64")
    runs = {}
    for t in (1, 2):
        exe = gc.compile(g, backend="numba", optimizer=gc.optim.SGD(0.05), threads=t, parallel_min=1, progress=None)
        runs[t] = ([exe.step(feeds) for _ in range(2)], exe.state_dict())
    kinds = {key[0] for key, k in ndw._KERNELS.items() if any(k is d for d in found)}
    assert kinds == {"fwd", "dx", "dw"}
    assert any(getattr(d, "_graphc_ready", None) is not None and d not in ndw._KERNELS.values() for d in found)
    assert runs[1][0] == runs[2][0]
    for k in runs[1][1]:
        np.testing.assert_array_equal(runs[1][1][k], runs[2][1][k], err_msg=k)


def test_static_rule_for_grouped_and_dilated_convs():
    """A cold start's strategies: dilated and grouped convs as plain ones at stride 1; at stride 2 a
    dilated filter and (unless each group's GEMM is tiny) dL/dX on im2col."""
    rule = conv_strategy.static_rule
    assert rule("conv2d", 1, (32, 32, 3, 3), (2, 2), 1) == rule("conv2d_dx", 1, (32, 4, 3, 3), (1, 1), 8) == "direct"
    assert rule("conv2d_dw", 2, (32, 32, 3, 3), (2, 2), 1) == rule("conv2d", 2, (32, 32, 3, 3), (2, 2), 1) == "im2col"
    assert rule("conv2d_dx", 2, (64, 8, 3, 3), (1, 1), 8) == "direct"            # 8 x 8 per group
    assert rule("conv2d_dx", 2, (32, 1, 3, 3), (1, 1), 32) == "direct"           # depthwise as grouped
    assert rule("conv2d_dx", 2, (128, 16, 3, 3), (1, 1), 4) == "im2col"          # 16 x 32 per group
    assert rule("conv2d_dw", 1, (64, 8, 1, 1), (1, 1), 8) == "im2col"            # 1x1 dL/dW as plain


def test_static_rule_sends_deep_strided_forward_convs_to_im2col():
    """Stride 2 with channels x taps >= 512 (ResNet's 3x3 downsampling convs): im2col; a shallow patch
    (the 7x7 first layer on 3 channels) and stride 1 stay direct."""
    rule = conv_strategy.static_rule
    assert rule("conv2d", 2, (128, 64, 3, 3)) == rule("conv2d_relu_maxpool", 2, (512, 256, 3, 3)) == "im2col"
    assert rule("conv2d", 2, (64, 3, 7, 7)) == rule("conv2d", 1, (512, 512, 3, 3)) == "direct"
    assert rule("conv2d", 2, (64, 32, 3, 3), (1, 1), 2) == "direct"              # 32 x 9 per group


def test_static_rule_runs_deep_1x1_forward_convs_as_gemms():
    """A 1x1 stride-1 forward conv of >= DEEP_1X1 input channels: im2col (a GEMM on the image); fewer
    channels, a grouped one, and its gradients keep their rules."""
    rule, deep = conv_strategy.static_rule, conv_strategy.DEEP_1X1
    assert rule("conv2d", 1, (1280, deep, 1, 1)) == "im2col"
    assert rule("conv2d", 1, (1280, deep - 1, 1, 1)) == rule("conv2d_dx", 1, (1280, deep, 1, 1)) == "direct"
    assert rule("conv2d", 1, (512, deep, 1, 1), (1, 1), 2) == "direct"


def test_bench_measures_memory_bound_kernels_against_the_copy_bandwidth():
    from graphc import bench
    assert bench.copy_gbps(mbytes=8, repeats=2) > 0
    # a 3x3 depthwise layer (18 flops per 8 bytes moved) is memory-bound; a 3x3 conv of 64 channels is not
    frac, which = bench.roofline_share(18e6, 8e6, 1.0, sgemm=100.0, bw=20.0)
    assert which == "memory" and frac == pytest.approx(8e6 / 1e-3 / 1e9 / 20.0)
    frac, which = bench.roofline_share(1152e6, 8e6, 10.0, sgemm=100.0, bw=20.0)
    assert which == "sgemm" and frac == pytest.approx(1152e6 / 1e-2 / 1e9 / 100.0)
    r = {"model": "m", "backend": "numba", "batch": 1, "mode": "infer", "fuse": True, "step_ms": 2.0,
         "kernels": [{"name": "dw", "ops": ["conv", "clip"], "shapes": "s", "ms": 1.0, "gflops": 0.018, "gbps": 8.0,
                      "share": 0.5, "roofline_fraction": 0.4, "roofline": "memory"}],
         "kernel_count": 1, "kernel_ms_sum": 1.0, "compile_s": {"this_process": {"compile_s": 0, "first_step_s": 0}},
         "roofline_gflops": 100.0, "bandwidth_gbps": 20.0, "compare": {}}
    text = bench.report(r)
    assert "40% of memory bandwidth" in text and "memory bandwidth 20.0 GB/s" in text


@pytest.mark.parametrize("strategy", ["direct", "im2col"])
@pytest.mark.parametrize("bounds", [(-1.0, 0.5), (0.0, None), (None, 0.25)])
def test_conv_clip_in_the_direct_epilogue_and_after_im2col(strategy, bounds, monkeypatch):
    """conv -> clip fuses (conv_clip); the direct kernel clips in its epilogue (the bounds in its source; an
    absent bound clips nothing), im2col clips its output in place: both equal the reference, which
    both bounds cut here, and a NaN input passes through as the clip op's."""
    monkeypatch.setenv("GRAPHC_CONV_STRATEGY", strategy)
    rng = np.random.default_rng(4)
    g = gc.Graph("conv_clip")
    x = g.input("x", (None, 3, 7, 7))
    y = g.clip(g.conv(x, g.param("w", value=rng.standard_normal((5, 3, 3, 3))), g.param("b", value=rng.standard_normal(5)),
                      pad=1), *bounds, name="y")
    g.output(y)
    xv = rng.standard_normal((2, 3, 7, 7)).astype(np.float32)
    xv[1, 0, 3, 3] = np.nan
    ref = np.asarray(gc.compile(g).run({"x": xv})["y"])
    exe = gc.compile(g, backend="numba")
    got = np.asarray(exe.run({"x": xv})["y"])
    assert _fused_kinds(exe) == ["conv_clip"]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    finite = ref[np.isfinite(ref)]
    lo, hi = bounds
    assert (lo is None or (finite == lo).any()) and (hi is None or (finite == hi).any())   # both bounds cut
    assert np.isnan(got[1]).any() and np.array_equal(np.isnan(got), np.isnan(ref))
