"""Tests of the numba backend's convolutions (graphc.backends.numba.conv) and pooling kernels against
straightforward numpy references.

Shapes are tiny and few: every distinct shape compiles a generated kernel (about a second each).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from graphc.backends import kernel_cache
from graphc.backends.numba import conv as nc
from graphc.backends.numba.conv import strategy as conv_strategy
from graphc.backends.numba.kernels import pool as pool_kernels
from graphc.errors import BackendError

ROOT = Path(__file__).resolve().parents[1]

TOL = {np.float32: dict(rtol=1e-4, atol=1e-5), np.float64: dict(rtol=1e-10, atol=1e-12)}
STRATS = ("direct", "im2col")


# --------------------------------------------------------------------------------------------------
# numpy references
# --------------------------------------------------------------------------------------------------

def pad4(x, pads):
    t, b, l, r = pads
    return np.pad(x, ((0, 0), (0, 0), (t, b), (l, r)))


def conv_ref(x, w, b, s, pads):
    """im2col + matmul in float64."""
    xp = pad4(x.astype(np.float64), pads)
    N, C, Hp, Wp = xp.shape
    K, _, KH, KW = w.shape
    Ho, Wo = (Hp - KH) // s + 1, (Wp - KW) // s + 1
    cols = np.empty((N, C, KH, KW, Ho, Wo))
    for kh in range(KH):
        for kw in range(KW):
            cols[:, :, kh, kw] = xp[:, :, kh:kh + s * (Ho - 1) + 1:s, kw:kw + s * (Wo - 1) + 1:s]
    y = np.einsum("kq,nqp->nkp", w.reshape(K, -1).astype(np.float64), cols.reshape(N, C * KH * KW, Ho * Wo))
    y = y.reshape(N, K, Ho, Wo)
    if b is not None:
        y = y + b.astype(np.float64)[None, :, None, None]
    return y


def maxpool_ref(x, size, stride):
    """Max pool with route = flat in-plane index of the first max in row-major order."""
    N, C, H, W = x.shape
    Hq, Wq = (H - size) // stride + 1, (W - size) // stride + 1
    y = np.empty((N, C, Hq, Wq), x.dtype)
    route = np.empty((N, C, Hq, Wq), np.int64)
    for n in range(N):
        for c in range(C):
            for i in range(Hq):
                for j in range(Wq):
                    win = x[n, c, i * stride:i * stride + size, j * stride:j * stride + size]
                    a = int(np.argmax(win))            # first max in row-major order
                    di, dj = divmod(a, size)
                    y[n, c, i, j] = win[di, dj]
                    route[n, c, i, j] = (i * stride + di) * W + j * stride + dj
    return y, route


def scatter_ref(dy, route, hw, mask=None):
    N, C = dy.shape[:2]
    H, W = hw
    dx = np.zeros((N, C, H * W), np.float64)
    for n in range(N):
        for c in range(C):
            for r, g in zip(route[n, c].ravel(), dy[n, c].ravel()):
                if r >= 0:
                    dx[n, c, r] += g
    dx = dx.reshape(N, C, H, W)
    return dx if mask is None else dx * mask


def dx_ref(dy, w, s, pads, hw):
    N, K, Ho, Wo = dy.shape
    _, C, KH, KW = w.shape
    t, b, l, r = pads
    H, W = hw
    dxp = np.zeros((N, C, H + t + b, W + l + r))
    for i in range(Ho):
        for j in range(Wo):
            for kh in range(KH):
                for kw in range(KW):
                    dxp[:, :, i * s + kh, j * s + kw] += dy[:, :, i, j].astype(np.float64) @ w[:, :, kh, kw]
    return dxp[:, :, t:t + H, l:l + W]


def dw_ref(x, dy, s, pads, khw):
    xp = pad4(x.astype(np.float64), pads)
    N, K, Ho, Wo = dy.shape
    KH, KW = khw
    C = x.shape[1]
    dw = np.zeros((K, C, KH, KW))
    for kh in range(KH):
        for kw in range(KW):
            patch = xp[:, :, kh:kh + s * (Ho - 1) + 1:s, kw:kw + s * (Wo - 1) + 1:s]
            dw[:, :, kh, kw] = np.einsum("nkij,ncij->kc", dy.astype(np.float64), patch)
    return dw


def route_scatter(dy, route, hw, size=None, stride=None):
    """dx from a max-pool route, by the numba backend's generated route_scatter kernel."""
    kh, kw = size or (0, 0)
    sh, sw = stride or (0, 0)
    kern = kernel_cache.load_generated(pool_kernels.route_scatter_source(kh, kw, sh, sw, False, False), "graphc_pool_")
    dx = np.empty(dy.shape[:2] + tuple(hw), dy.dtype)
    kern(dy, route.astype(np.int32), dx.reshape(dx.shape[:2] + (-1,)), np.empty((1, 1), np.float64))
    return dx


def rand(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def close(a, b, dtype):
    np.testing.assert_allclose(a, b, **TOL[dtype])


# Conv cases: (N, C, K, H, W, KH, KW, stride, pads).  Few distinct shapes on purpose.
CASES = {
    "3x3_asym_pad_Kodd": (2, 3, 5, 7, 6, 3, 3, 1, (1, 0, 2, 1)),
    "even_4x2_stride2": (2, 3, 5, 9, 8, 4, 2, 2, (1, 2, 0, 1)),
    "C1_5x5_pad2": (3, 1, 4, 10, 10, 5, 5, 1, (2, 2, 2, 2)),
    "1x1": (2, 4, 3, 5, 5, 1, 1, 1, (0, 0, 0, 0)),
    # a top pad larger than the filter: dL/dX crops the output gradient
    "batch1_stride2_3x3": (1, 2, 3, 7, 7, 3, 3, 2, (3, 0, 2, 1)),
    # 4x4 taps after space-to-depth: the direct forward splits the filter rows into channels
    "7x7_stride2": (2, 3, 4, 13, 12, 7, 7, 2, (3, 3, 2, 3)),
    # 5x5 filters, 16 channels in and out: split by filter row (the forward; dL/dX's dy planes at strides 1, 2)
    "5x5_C16_K16": (2, 16, 16, 9, 8, 5, 5, 1, (2, 2, 1, 2)),
    "5x5_C16_K16_stride2": (1, 16, 16, 11, 10, 5, 5, 2, (2, 1, 2, 2)),
}


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(1234)


# --------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", STRATS)
@pytest.mark.parametrize("case", list(CASES))
def test_conv2d_forward_float32(case, strategy, rng):
    N, C, K, H, W, KH, KW, s, pads = CASES[case]
    x = rand(rng, (N, C, H, W), np.float32)
    w = rand(rng, (K, C, KH, KW), np.float32, 0.5)
    b = rand(rng, (K,), np.float32)
    y = nc.conv2d(x, w, b, s, pads, strategy=strategy)
    assert y.dtype == np.float32
    close(y, conv_ref(x, w, b, s, pads), np.float32)
    yr = nc.conv2d(x, w, None, s, pads, relu=True, strategy=strategy)
    close(yr, np.maximum(conv_ref(x, w, None, s, pads), 0), np.float32)


@pytest.mark.parametrize("strategy", STRATS)
def test_conv2d_forward_float64(strategy, rng):
    # the same shape as the other float64 tests: every float64 kernel compiles once
    N, C, K, H, W, KH, KW, s, pads = CASES["even_4x2_stride2"]
    x = rand(rng, (N, C, H, W), np.float64)
    w = rand(rng, (K, C, KH, KW), np.float64)
    b = rand(rng, (K,), np.float64)
    y = nc.conv2d(x, w, b, s, pads, strategy=strategy)
    assert y.dtype == np.float64
    close(y, conv_ref(x, w, b, s, pads), np.float64)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("geo", ["3x3_s2_pad", "1x1_s1"])
@pytest.mark.parametrize("N", [1, 3])
def test_im2col_forward_split_over_filters_and_unbuilt_columns(N, geo, threads, rng):
    """im2col's forward with fewer images than threads (batch 1 on 2 threads): columns built in
    parallel, each image's GEMM split over blocks of 16 filters; a 1x1 stride-1 unpadded conv uses the
    image as its column matrix (no copy). Each against the reference, with ReLU and with the fused pool
    and its route, on 1 thread (one image per task) and 2."""
    import numba
    if threads > numba.config.NUMBA_NUM_THREADS:
        pytest.skip("needs 2 Numba threads")
    KH, s, pads = (3, 2, (1, 1, 1, 1)) if geo == "3x3_s2_pad" else (1, 1, (0, 0, 0, 0))
    C, K, H = 3, 40, 8                     # 40 filters: blocks of 20 on 2 threads
    x = rand(rng, (N, C, H, H), np.float32)
    w = rand(rng, (K, C, KH, KH), np.float32, 0.5)
    b = rand(rng, (K,), np.float32)
    prev = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        z = conv_ref(x, w, b, s, pads)
        y = nc.conv2d(x, w, b, s, pads, relu=True, strategy="im2col")
        close(y, np.maximum(z, 0), np.float32)
        out = np.full_like(y, np.nan)
        assert nc.conv2d(x, w, b, s, pads, relu=True, strategy="im2col", out=out) is out
        np.testing.assert_array_equal(out, y)                       # into the caller's array, same bits
        y, route = nc.conv2d_relu_maxpool(x, w, b, s, pads, 2, 2, save_route=True, strategy="im2col")
        yr, rr = maxpool_ref(np.maximum(z, 0), 2, 2)
        close(y, yr, np.float32)
        np.testing.assert_array_equal(route[yr > 0], rr[yr > 0])
    finally:
        numba.set_num_threads(prev)


# --------------------------------------------------------------------------------------------------
# fused conv + relu + max pool
# --------------------------------------------------------------------------------------------------

FUSED = {
    # conv output 7x6 -> pool 2/2 floors to 3x3 (last row and column dropped)
    "pool2_floor": ("3x3_asym_pad_Kodd", 2, 2),
    # overlapping windows: pool 3 stride 2
    "pool3s2_overlap": ("3x3_asym_pad_Kodd", 3, 2),
    "C1_pool2": ("C1_5x5_pad2", 2, 2),
}


@pytest.mark.parametrize("strategy", STRATS)
@pytest.mark.parametrize("fcase", list(FUSED))
def test_fused_matches_unfused(fcase, strategy, rng):
    case, ps, pst = FUSED[fcase]
    N, C, K, H, W, KH, KW, s, pads = CASES[case]
    x = rand(rng, (N, C, H, W), np.float32)
    w = rand(rng, (K, C, KH, KW), np.float32, 0.5)
    b = rand(rng, (K,), np.float32)
    y, route = nc.conv2d_relu_maxpool(x, w, b, s, pads, ps, pst, save_route=True, strategy=strategy)
    z = conv_ref(x, w, b, s, pads)
    a = np.maximum(z, 0)
    yr, rr = maxpool_ref(a, ps, pst)
    close(y, yr, np.float32)
    assert route.dtype == np.int32 and route.shape == y.shape
    # route: the first max of the ReLU output where it is > 0, else ~ that (maxpool_argmax's relu rule)
    assert np.array_equal(route, np.where(yr > 0, rr, ~rr))
    # without the route: same values
    y2 = nc.conv2d_relu_maxpool(x, w, b, s, pads, ps, pst, strategy=strategy)
    close(y2, yr, np.float32)
    # backward through the route == relu mask * unfused max-pool backward
    dy = rand(rng, y.shape, np.float32)
    dz = route_scatter(dy, route, z.shape[2:])
    expect = scatter_ref(dy, rr, z.shape[2:], mask=(z > 0))
    close(dz, expect, np.float32)


def test_fused_route_relu_kills_and_ties(rng):
    """All-negative windows route ~(their first position): dy * 0 goes there; ties go to the first
    position in row-major order."""
    x = np.zeros((1, 1, 4, 4), np.float32)
    x[0, 0] = [[1, 3, -1, -2],
               [3, 2, -3, -1],
               [0, 0, 5, 5],
               [0, 0, 5, 5]]
    w = np.ones((2, 1, 1, 1), np.float32)
    w[1] = -1
    b = np.zeros(2, np.float32)
    for strategy in STRATS:
        y, route = nc.conv2d_relu_maxpool(x, w, b, 1, (0, 0, 0, 0), 2, 2, save_route=True,
                                          strategy=strategy)
        assert route[0, 0].tolist() == [[1, ~2], [~8, 10]]          # all <= 0, zeros: ~first position
        assert y[0, 0].tolist() == [[3, 0], [0, 5]]
        # channel 1 is -x: only the top-right window has a positive max (3 at row 1, column 2)
        assert route[0, 1].tolist() == [[~0, 6], [~8, ~10]]
        assert y[0, 1].tolist() == [[0, 3], [0, 0]]


# --------------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------------

BWD_CASES = ["3x3_asym_pad_Kodd", "even_4x2_stride2", "C1_5x5_pad2", "batch1_stride2_3x3", "5x5_C16_K16",
             "5x5_C16_K16_stride2"]


@pytest.mark.parametrize("strategy", STRATS)
@pytest.mark.parametrize("case", BWD_CASES)
def test_conv2d_dx_dw_float32(case, strategy, rng):
    N, C, K, H, W, KH, KW, s, pads = CASES[case]
    x = rand(rng, (N, C, H, W), np.float32)
    w = rand(rng, (K, C, KH, KW), np.float32, 0.5)
    Ho, Wo = conv_ref(x, w, None, s, pads).shape[2:]
    dy = rand(rng, (N, K, Ho, Wo), np.float32)
    dx = nc.conv2d_dx(dy, w, s, pads, (H, W), strategy=strategy)
    assert dx.shape == x.shape and dx.dtype == np.float32
    close(dx, dx_ref(dy, w, s, pads, (H, W)), np.float32)
    dw = nc.conv2d_dw(x, dy, s, pads, (KH, KW), strategy=strategy)
    assert dw.shape == w.shape and dw.dtype == np.float32
    close(dw, dw_ref(x, dy, s, pads, (KH, KW)), np.float32)


@pytest.mark.parametrize("strategy", STRATS)
def test_conv2d_dx_dw_float64(strategy, rng):
    N, C, K, H, W, KH, KW, s, pads = CASES["even_4x2_stride2"]
    x = rand(rng, (N, C, H, W), np.float64)
    w = rand(rng, (K, C, KH, KW), np.float64)
    Ho, Wo = conv_ref(x, w, None, s, pads).shape[2:]
    dy = rand(rng, (N, K, Ho, Wo), np.float64)
    close(nc.conv2d_dx(dy, w, s, pads, (H, W), strategy=strategy), dx_ref(dy, w, s, pads, (H, W)), np.float64)
    close(nc.conv2d_dw(x, dy, s, pads, (KH, KW), strategy=strategy), dw_ref(x, dy, s, pads, (KH, KW)),
          np.float64)


@pytest.mark.parametrize("strategy", STRATS)
def test_finite_differences_float64(strategy, rng):
    """dL/dX and dL/dW of L = sum(conv(x, w) * g) against central differences."""
    N, C, K, H, W, KH, KW, s, pads = CASES["even_4x2_stride2"]
    x = rand(rng, (N, C, H, W), np.float64)
    w = rand(rng, (K, C, KH, KW), np.float64)
    g = rand(rng, nc.conv2d(x, w, None, s, pads, strategy=strategy).shape, np.float64)

    def loss(xx, ww):
        return float(np.sum(nc.conv2d(xx, ww, None, s, pads, strategy=strategy) * g))

    dx = nc.conv2d_dx(g, w, s, pads, (H, W), strategy=strategy)
    dw = nc.conv2d_dw(x, g, s, pads, (KH, KW), strategy=strategy)
    eps = 1e-6
    for arr, grad, which in ((x, dx, "x"), (w, dw, "w")):
        idx = [tuple(int(v) for v in np.unravel_index(i, arr.shape))
               for i in rng.choice(arr.size, size=12, replace=False)]
        for ix in idx:
            p, m = arr.copy(), arr.copy()
            p[ix] += eps
            m[ix] -= eps
            num = (loss(p, w) - loss(m, w)) / (2 * eps) if which == "x" else \
                  (loss(x, p) - loss(x, m)) / (2 * eps)
            assert abs(num - grad[ix]) < 1e-6 * max(1.0, abs(num)), (which, ix, num, grad[ix])


# --------------------------------------------------------------------------------------------------
# pooling
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size,stride", [(2, 2), (3, 2)])
def test_generated_maxpool_and_route_scatter(size, stride, dtype, rng):
    x = rand(rng, (2, 3, 7, 6), dtype)
    x[0, 0, :3, :3] = 1.5                         # ties across (overlapping) windows
    x[1, 2] = np.round(x[1, 2])                   # many ties
    yr, rr = maxpool_ref(x, size, stride)
    kern = kernel_cache.load_generated(pool_kernels.maxpool_source(size, size, stride, stride, True, False, False),
                                       "graphc_pool_")
    y, route = np.empty(yr.shape, dtype), np.empty(yr.shape, np.int32)
    kern(x, y, route)
    close(y, yr, dtype)
    assert np.array_equal(route, rr)
    dy = rand(rng, y.shape, dtype)
    close(route_scatter(dy, route, (7, 6), (size, size), (stride, stride)), scatter_ref(dy, rr, (7, 6)), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size,stride", [(2, 2), (3, 2)])
def test_avgpool_kernels(size, stride, dtype, rng):
    x = rand(rng, (2, 3, 7, 6), dtype)
    Hq, Wq = (7 - size) // stride + 1, (6 - size) // stride + 1
    yr = np.zeros((2, 3, Hq, Wq))
    for di in range(size):
        for dj in range(size):
            yr += x[:, :, di:di + stride * (Hq - 1) + 1:stride, dj:dj + stride * (Wq - 1) + 1:stride]
    y = np.empty((2, 3, Hq, Wq), dtype)
    pool_kernels.avgpool_k(x, y, size, size, stride, stride)
    close(y, yr / size ** 2, dtype)
    dy = rand(rng, (2, 3, Hq, Wq), dtype)
    dxr = np.zeros((2, 3, 7, 6))
    for i in range(Hq):
        for j in range(Wq):
            dxr[:, :, i * stride:i * stride + size, j * stride:j * stride + size] += \
                dy[:, :, i:i + 1, j:j + 1] / size ** 2
    dx = np.empty((2, 3, 7, 6), dtype)
    pool_kernels.avgpool_spread_k(dy, dx, size, size, stride, stride)
    close(dx, dxr, dtype)


# --------------------------------------------------------------------------------------------------
# strategy choice, caching, errors
# --------------------------------------------------------------------------------------------------

def test_choose_strategy_is_remembered(rng):
    _, C, K, H, W, KH, KW, s, pads = CASES["3x3_asym_pad_Kodd"]
    N = conv_strategy.SMALL_BATCH_DIRECT + 1      # (forward batches up to that take direct untimed, unremembered)
    env = os.environ.pop("GRAPHC_CONV_STRATEGY", None)
    try:
        with conv_strategy.tuning():         # a tuning run times and remembers (a cold start does not)
            got = nc.choose_conv_strategy((N, C, H, W), (K, C, KH, KW), s, pads, np.float32)
        assert got in nc.STRATEGIES
        data = json.loads((Path(kernel_cache.kernel_cache_dir()) / "conv_strategy.json").read_text())
        entries = [v for k, v in data.items() if k.startswith(f"conv2d|x{N}x3x7x6|w5x3x3x3|")]
        assert entries and entries[0]["strategy"] == got
        conv_strategy._CHOICES.clear()                                          # next answer from the file
        assert nc.choose_conv_strategy((N, C, H, W), (K, C, KH, KW), s, pads, np.float32) == got
        x = rand(rng, (N, C, H, W), np.float32)
        w = rand(rng, (K, C, KH, KW), np.float32)
        close(nc.conv2d(x, w, None, s, pads), conv_ref(x, w, None, s, pads), np.float32)
    finally:
        if env is not None:
            os.environ["GRAPHC_CONV_STRATEGY"] = env


def test_generated_kernels_are_cached_on_disk():
    x = np.ones((2, 3, 7, 6), np.float32)
    nc.conv2d(x, np.ones((5, 3, 3, 3), np.float32), None, 1, (1, 0, 2, 1), strategy="direct")
    d = Path(kernel_cache.kernel_cache_dir())
    files = list(d.glob("graphc_kernel_*.py"))
    assert files, "no generated kernel files"
    assert list((d / "__pycache__").glob("graphc_kernel_*.nbi")), "no Numba cache index"
    # a fresh process finds the machine code on disk: generation and compilation both skipped
    code = (
        "import numpy as np\n"
        "from graphc.backends import kernel_cache\n"
        "from graphc.backends.numba import conv as nc\n"
        "x = np.ones((2, 3, 7, 6), np.float32); w = np.ones((5, 3, 3, 3), np.float32)\n"
        "nc.conv2d(x, w, None, 1, (1, 0, 2, 1), strategy='direct')\n"
        "k = kernel_cache.loaded('graphc_kernel_')[0]\n"
        "print(sum(k.stats.cache_hits.values()), sum(k.stats.cache_misses.values()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    hits, misses = (int(v) for v in out.stdout.split()[-2:])
    assert hits >= 1 and misses == 0, out.stdout


def test_errors():
    x = np.zeros((1, 2, 5, 5), np.float32)
    with pytest.raises(BackendError):
        nc.conv2d(x, np.zeros((3, 4, 3, 3), np.float32), None, 1, (0, 0, 0, 0), strategy="direct")
    with pytest.raises(BackendError):
        nc.conv2d(x.astype(np.int32), np.zeros((3, 2, 3, 3)), None, 1, (0, 0, 0, 0), strategy="direct")
    with pytest.raises(BackendError):
        nc.conv2d(x, np.zeros((3, 2, 3, 3), np.float32), None, 1, (0, 0, 0, 0), strategy="fft")
    with pytest.raises(BackendError):
        nc.conv2d_relu_maxpool(x, np.zeros((3, 2, 3, 3), np.float32), None, 1, (0, 0, 0, 0), 6, 1)


def test_strategy_rules_small_batch_and_margin(monkeypatch):
    # forward convs of one or two images take direct untimed (im2col serialises them on one thread);
    # otherwise im2col must beat direct by IM2COL_MARGIN, also for entries recorded before the rule
    monkeypatch.delenv("GRAPHC_CONV_STRATEGY", raising=False)
    conv_strategy._CHOICES.clear()
    timed = []
    monkeypatch.setattr(conv_strategy, "_time_candidates", lambda fns, r: timed.append(1) or {"direct": 1.0, "im2col": 0.5})
    for op, pool in (("conv2d", None), ("conv2d_relu_maxpool", (2, 2))):
        assert nc.choose_conv_strategy((1, 3, 9, 9), (4, 3, 3, 3), 1, (0, 0, 0, 0), np.float32,
                                       op=op, pool=pool) == "direct"
    assert not timed
    assert conv_strategy._pick({"direct": 1.0, "im2col": 0.9}) == "direct"
    assert conv_strategy._pick({"direct": 1.0, "im2col": 0.8}) == "im2col"
    key = conv_strategy._choice_key("conv2d", (8, 3, 9, 9), (4, 3, 3, 3), 1, (0, 0, 0, 0), np.dtype(np.float32), None)
    conv_strategy._record_choice(key, {"strategy": "im2col", "ms": {"direct": 1.0, "im2col": 0.95}, "load": 0.1})
    assert nc.choose_conv_strategy((8, 3, 9, 9), (4, 3, 3, 3), 1, (0, 0, 0, 0), np.float32) == "direct"
    assert not timed
    # an untimed entry (an older version's rule answer) is not a measurement: the static rule answers
    conv_strategy._CHOICES.clear()
    key = conv_strategy._choice_key("conv2d", (8, 8, 9, 9), (4, 8, 1, 1), 2, (0, 0, 0, 0), np.dtype(np.float32), None)
    conv_strategy._record_choice(key, {"rule": "batch <= 2", "strategy": "direct"})
    assert conv_strategy.static_rule("conv2d", 2, (4, 8, 1, 1)) == "im2col"
    assert nc.choose_conv_strategy((8, 8, 9, 9), (4, 8, 1, 1), 2, (0, 0, 0, 0), np.float32) == "im2col"
    assert not timed
    conv_strategy._CHOICES.clear()


@pytest.mark.parametrize("avx512", [True, False])
def test_static_rule_strided_dw(monkeypatch, avx512):
    """A strided, ungrouped dL/dW with a deep patch (channels x taps >= 512) takes im2col; a shallow one
    (a first layer on RGB) and grouped ones stay direct. At stride 1 a deep one is direct on an AVX-512
    host, im2col without AVX-512 (dL/dX too; a 1-channel first layer, 1 x 9 taps, and the forward stay
    direct)."""
    monkeypatch.setattr(conv_strategy, "AVX512", avx512)
    rule = conv_strategy.static_rule
    assert rule("conv2d_dw", 2, (128, 64, 3, 3)) == "im2col"
    assert rule("conv2d_dw", 2, (64, 3, 7, 7)) == "direct"
    assert rule("conv2d_dw", 2, (64, 64, 3, 3), groups=2) == "direct"
    deep = "direct" if avx512 else "im2col"
    assert rule("conv2d_dw", 1, (64, 32, 3, 3)) == rule("conv2d_dx", 1, (16, 6, 5, 5)) == deep
    assert rule("conv2d_dw", 1, (32, 1, 3, 3)) == rule("conv2d", 1, (64, 32, 3, 3)) == "direct"
    assert rule("conv2d_dx", 1, (64, 32, 3, 3), groups=2) == rule("conv2d_dx", 1, (64, 32, 3, 3), (2, 2)) == "direct"


@pytest.mark.parametrize("ks", [3, 5])
@pytest.mark.parametrize("data", ["normal", "ties"])
@pytest.mark.parametrize("pads", [(0, 0, 0, 0), (1, 1, 1, 1), (0, 1, 2, 0)])
@pytest.mark.parametrize("epi", ["store", "pool"])
def test_bind_direct_fwd_matches_reference(rng, pads, epi, data, ks, monkeypatch):
    """Values and (pool) the saved route: the flat index in the conv-output plane of each window's
    first maximum, ~ that where it is <= 0. "ties": small integers (exact sums: compared with ==), an
    all-zero image whose planes are the biases (plateaus of 1, 0, -1), tied windows everywhere. 5x5
    filters run with their rows as channels (1x5 taps)."""
    N, C, H, W, K = 2, 3, 10, 9, 5
    if data == "ties":
        x = rng.integers(-1, 2, (N, C, H, W)).astype(np.float32)
        x[1] = 0
        w = rng.integers(-1, 2, (K, C, ks, ks)).astype(np.float32)
        b = np.array([1, 0, -1, 1, 0], np.float32)
    else:
        x = rand(rng, (N, C, H, W), np.float32)
        w = rand(rng, (K, C, ks, ks), np.float32)
        b = rand(rng, (K,), np.float32)
    from graphc.backends.numba.conv import direct
    monkeypatch.setattr(direct, "ROW_SPLIT_CHANNELS", C)
    run = nc.bind_direct_fwd(x.shape, w.shape, True, 1, pads, np.float32, epi, (2, 2))

    def reference():
        z = np.maximum(conv_ref(x, w, b, 1, pads), 0)
        if epi == "store":
            return z, None
        yq, rq = maxpool_ref(z, 2, 2)                    # the first max of the ReLU output ...
        return yq, np.where(yq > 0, rq, ~rq)            # ... is the pre-activation's where it is > 0
    ref, ref_route = reference()
    y = np.empty(ref.shape, np.float32)
    route = np.full(ref.shape if epi == "pool" else (1, 1, 1, 1), -7, np.int32)
    for _ in range(3):                         # weights updated in place between calls: followed
        run(x, w, b, y, route, True)
        ref, ref_route = reference()
        if data == "ties":
            np.testing.assert_array_equal(y, ref)
        else:
            close(y, ref, np.float32)
        if epi == "pool":
            np.testing.assert_array_equal(route, ref_route)
            y2 = np.full_like(y, 7.0)
            run(x, w, b, y2, np.empty((1, 1, 1, 1), np.int32), False)    # inference: its own pool loop
            np.testing.assert_array_equal(y2, y)
            if data == "ties":                 # image 1 is all zero: its planes are the biases 1, 0, -1
                Hq, Wq = route.shape[2:]
                wo = W + pads[2] + pads[3] - ks + 1  # conv-output width: the route's row length
                top_left = (2 * np.arange(Hq))[:, None] * wo + 2 * np.arange(Wq)[None, :]
                np.testing.assert_array_equal(route[1, 0], top_left)     # a plateau of 1: first position
                np.testing.assert_array_equal(route[1, 1:3], np.broadcast_to(~top_left, (2,) + top_left.shape))
        w *= 0.5
    assert nc.bind_direct_fwd(x.shape, w.shape, True, 2, pads, np.float32, epi, (2, 2)) is None
    assert (run.plan.KH, run.plan.C) == ((1, C * ks) if ks == 5 else (ks, C))     # 5x5: rows as channels


@pytest.mark.parametrize("pool", [(2, 2), (3, 2), (2, 3)])
def test_inference_pool_nan_at_every_window_position(pool, rng):
    """The fused conv + ReLU + max pool without a route (inference: one strided loop over pooled wide
    rows, NaN found by a sum and fixed up after it): a NaN at any position of a window makes it NaN (a
    1x1 conv keeps it in one place), +-inf does not; overlapping, non-overlapping and gapped windows."""
    ps, pst = pool
    N, C, H, W, K = 1, 2, 9, 11, 3
    x = rand(rng, (N, C, H, W), np.float32)
    w = rand(rng, (K, C, 1, 1), np.float32)
    b = rand(rng, (K,), np.float32)
    run = nc.bind_direct_fwd(x.shape, w.shape, True, 1, (0, 0, 0, 0), np.float32, "pool", pool)
    no_route = np.empty((1, 1, 1, 1), np.int32)
    Hq, Wq = (H - ps) // pst + 1, (W - ps) // pst + 1
    for i, j in [(0, 0), (ps - 1, ps - 1), (0, ps - 1), (H - 1, W - 1), (2, 5)]:
        for v in (np.nan, np.inf, -np.inf):
            xv = x.copy()
            xv[0, 1, i, j] = v
            with np.errstate(all="ignore"):
                ref = maxpool_ref(np.maximum(conv_ref(xv, w, b, 1, (0, 0, 0, 0)), 0), ps, pst)[0]
            y = np.empty((N, K, Hq, Wq), np.float32)
            with np.errstate(all="ignore"):
                run(xv, w, b, y, no_route, False)
            assert np.array_equal(np.isnan(y), np.isnan(ref)), (i, j, v)
            assert np.isnan(ref).any() == (np.isnan(v) and i < (Hq - 1) * pst + ps and j < (Wq - 1) * pst + ps
                                          and (i % pst < ps) and (j % pst < ps))
            fin = ~np.isnan(ref)
            np.testing.assert_allclose(y[fin], ref[fin], rtol=1e-5, atol=1e-6)


def test_choice_timed_under_load_is_retimed_when_quiet(monkeypatch):
    """A remembered strategy measured on a busy machine is measured again once the machine is quiet."""
    monkeypatch.setattr(conv_strategy, "_load_per_cpu", lambda: 0.1)
    assert conv_strategy._retime(3.0)            # busy then, quiet now
    assert conv_strategy._retime(None)           # recorded before the load was kept
    assert not conv_strategy._retime(0.2)        # quiet then: keep
    monkeypatch.setattr(conv_strategy, "_load_per_cpu", lambda: 2.0)
    assert not conv_strategy._retime(3.0)        # still busy: timing again would not be better


# --------------------------------------------------------------------------------------------------
# out=: results written into the caller's array (the executor's planned buffers)
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", STRATS)
@pytest.mark.parametrize("case", ["3x3_asym_pad_Kodd", "even_4x2_stride2", "1x1"])
def test_out_argument_gives_the_same_values(case, strategy, rng):
    """conv2d, conv2d_dx and conv2d_dw with out= write the very values of a call without it into out
    (bit for bit) and return it: padded and unpadded, stride 1 and 2 (space-to-depth, im2col's crop)."""
    N, C, K, H, W, KH, KW, s, pads = CASES[case]
    x = rand(rng, (N, C, H, W), np.float32)
    w = rand(rng, (K, C, KH, KW), np.float32, 0.5)
    b = rand(rng, (K,), np.float32)
    y = nc.conv2d(x, w, b, s, pads, relu=True, strategy=strategy)
    dy = rand(rng, y.shape, np.float32)
    calls = {"conv2d": (lambda out: nc.conv2d(x, w, b, s, pads, relu=True, strategy=strategy, out=out), y),
             "conv2d_dx": (lambda out: nc.conv2d_dx(dy, w, s, pads, (H, W), strategy=strategy, out=out), None),
             "conv2d_dw": (lambda out: nc.conv2d_dw(x, dy, s, pads, (KH, KW), strategy=strategy, out=out), None)}
    for what, (call, expect) in calls.items():
        expect = call(None) if expect is None else expect
        out = np.full(expect.shape, np.nan, np.float32)
        assert call(out) is out, what
        np.testing.assert_array_equal(out, expect, err_msg=what)
    close(calls["conv2d_dx"][0](None), dx_ref(dy, w, s, pads, (H, W)), np.float32)


def test_out_argument_is_checked(rng):
    x = rand(rng, (2, 3, 7, 6), np.float32)
    w = rand(rng, (5, 3, 3, 3), np.float32)
    dy = np.zeros((2, 5, 7, 6), np.float32)
    bad = {"shape": np.empty((2, 5, 7, 5), np.float32), "dtype": np.empty((2, 5, 7, 6), np.float64),
           "layout": np.empty((2, 5, 6, 7), np.float32).transpose(0, 1, 3, 2), "list": [[0.0]]}
    for what, out in bad.items():
        with pytest.raises(BackendError, match="out="):
            nc.conv2d(x, w, None, 1, (1, 1, 1, 1), strategy="direct", out=out)
    with pytest.raises(BackendError, match="overlaps an input"):
        nc.conv2d_dx(dy, w, 1, (1, 1, 1, 1), (7, 6), strategy="direct", out=dy.reshape(-1)[:2 * 3 * 7 * 6].reshape(2, 3, 7, 6))
    with pytest.raises(BackendError, match="out="):
        nc.conv2d_dw(x, dy, 1, (1, 1, 1, 1), (3, 3), strategy="im2col", out=np.empty((5, 3, 3, 2), np.float32))


def test_dw_partial_sums_rounded_once_in_chunks(monkeypatch):
    """sum_partials: the float64 sum over the partial sums, rounded once, whatever the chunk of rows."""
    from graphc.backends.numba.conv import layout
    rng = np.random.default_rng(5)
    part = rng.standard_normal((3, 7, 2, 5)).astype(np.float32) * np.float32(1e4)
    expect = part[:, :6].sum(axis=0, dtype=np.float64).astype(np.float32)
    for chunk in (1, 10, 1 << 17):
        monkeypatch.setattr(layout, "_SUM_CHUNK", chunk)
        out = np.empty((6, 2, 5), np.float32)
        np.testing.assert_array_equal(layout.sum_partials(part, out), expect)
    np.testing.assert_array_equal(layout.sum_partials(part[:1], np.empty((6, 2, 5), np.float32)), part[0, :6])


def test_bind_direct_fwd_shared_planes_follow_other_calls(rng, monkeypatch):
    """A prebound forward whose padded planes are too big to keep its own places its input into the
    shared work array on every call: right after other conv calls wrote that array, and with x changed."""
    from graphc.backends.numba.conv import direct
    monkeypatch.setattr(direct, "OWN_PLANES_MAX", 0)
    N, C, K, H, W, KH, KW, s, pads = CASES["3x3_asym_pad_Kodd"]
    x = rand(rng, (N, C, H, W), np.float32)
    w = rand(rng, (K, C, KH, KW), np.float32)
    run = nc.bind_direct_fwd(x.shape, w.shape, False, 1, pads, np.float32, "store")
    y = np.empty((N, K) + conv_ref(x, w, None, 1, pads).shape[2:], np.float32)
    for _ in range(2):
        # the other calls write the shared planes (an input placed, larger than this one's)
        nc.conv2d(rand(rng, (3, 1, 10, 10), np.float32), rand(rng, (4, 1, 5, 5), np.float32), None, 1,
                  (2, 2, 2, 2), strategy="direct")
        run(x, w, None, y, np.empty((1, 1, 1, 1), np.int32), False)
        close(y, conv_ref(x, w, None, 1, pads), np.float32)
        x = x[::-1].copy()


@pytest.mark.parametrize("inner", [1, 100, 10 ** 6])
def test_im2col_dw_images_per_gemm(inner, rng, monkeypatch):
    """im2col's dL/dW takes several images per GEMM (their columns side by side): one image per GEMM
    (accumulated), a few (the last batch of a group shorter), all of a group's, give dw_ref's values."""
    from graphc.backends.numba.conv import im2col
    monkeypatch.setattr(im2col, "DW_INNER", inner)
    N, C, K, H, W, KH, KW, s, pads = CASES["3x3_asym_pad_Kodd"]
    N = 7
    x = rand(rng, (N, C, H, W), np.float32)
    dy = rand(rng, (N, K) + conv_ref(x, rand(rng, (K, C, KH, KW), np.float32), None, s, pads).shape[2:], np.float32)
    close(nc.conv2d_dw(x, dy, s, pads, (KH, KW), strategy="im2col"), dw_ref(x, dy, s, pads, (KH, KW)), np.float32)


@pytest.mark.parametrize("shape,Hd,Wd,pt,pl,extra", [((2, 3, 5, 6), 7, 8, 1, 1, 0), ((1, 2, 4, 4), 4, 4, -1, 0, 2),
                                                     ((3, 1, 6, 5), 9, 6, 2, -2, 1), ((2, 2, 3, 3), 3, 3, 3, 0, 0)])
def test_numpy_placement_equals_the_kernels(shape, Hd, Wd, pt, pl, extra, monkeypatch):
    # layout.place / place_t take numpy's zero fill and copy from _SERIAL_BELOW to NUMPY_BELOW elements
    # and place_k / place_t_k elsewhere: the same planes either way (negative offsets and rows past the
    # plane dropped, extra channels, the tail after each plane and the whole rest zero), garbage in dst
    # overwritten
    from graphc.backends.numba.conv import layout
    monkeypatch.setattr(layout, "_SERIAL_BELOW", 0)           # (these small shapes on the numpy path)
    rng = np.random.default_rng(0)
    src = rng.standard_normal(shape).astype(np.float32)
    N, C = shape[:2]
    L = Hd * Wd + 5
    want = np.full((N, C + extra, L), np.nan, np.float32)
    layout.place_k(src, want, Hd, Wd, 1, pt, pl, 0, N * (C + extra))
    got = np.full_like(want, np.nan)
    layout.place(src, got, Hd, Wd, 1, pt, pl)
    assert np.array_equal(got, want)
    want_t = np.full((C + extra, N * L + 7), np.nan, np.float32)
    layout.place_t_k(src, want_t, Hd, Wd, L, pt, pl, 0, (C + extra) * N)
    got_t = np.full_like(want_t, np.nan)
    layout.place_t(src, got_t, Hd, Wd, L, pt, pl)
    assert np.array_equal(got_t, want_t)
