"""backends/numba/conv/winograd.py: the Winograd F(2x2, 3x3) inference kernel of a fused 3x3 conv + ReLU +
2x2/2 max pool, against a float64 numpy reference and the direct kernel it stands in for: shapes with
partial blocks of tiles and of channels, padding, odd sizes; filters edited in place (the state version)
or replaced; NaN and inf (the direct kernel's values, which it falls back to); and in an executable against
the reference backend while the state changes."""
import numpy as np
import pytest

import graphc as gc
from graphc.backends.numba import conv as nc
from graphc.backends.numba.conv import winograd

pytest.importorskip("numba")


def reference(x, w, b, pads):
    """conv (float64) -> ReLU -> max pool 2/2."""
    t, bo, l, r = pads
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (t, bo), (l, r)))
    N, C, Hp, Wp = xp.shape
    Ho, Wo = Hp - 2, Wp - 2
    z = np.zeros((N, w.shape[0], Ho, Wo))
    for kh in range(3):
        for kw in range(3):
            z += np.einsum("kc,nchw->nkhw", w[:, :, kh, kw].astype(np.float64), xp[:, :, kh:kh + Ho, kw:kw + Wo])
    z = np.maximum(z + b.astype(np.float64)[None, :, None, None], 0)
    Hq, Wq = Ho // 2, Wo // 2
    return z[:, :, :2 * Hq, :2 * Wq].reshape(N, -1, Hq, 2, Wq, 2).max(axis=(3, 5))


# (N, C, K, H, W, pads): blocks of 5 tiles and 4 channels with remainders, padding, rows wider than tall
SHAPES = [(1, 8, 5, 12, 15, (0, 0, 0, 0)), (2, 9, 7, 9, 10, (1, 1, 1, 1))]


def _bind(shape, dtype, version):
    N, C, K, H, W, pads = shape
    return nc.bind_direct_fwd((N, C, H, W), (K, C, 3, 3), True, 1, pads, dtype, "pool", (2, 2),
                              weights_version=version)


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_the_reference_and_follows_filter_changes(shape):
    N, C, K, H, W, pads = shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    w = (rng.standard_normal((K, C, 3, 3)) * 0.3).astype(np.float32)
    b = rng.standard_normal(K).astype(np.float32) * 0.3
    version = [0]
    run = _bind(shape, np.float32, lambda: version[0])
    assert run.winograd is not None
    ref = reference(x, w, b, pads)
    y = np.full(ref.shape, 7.0, np.float32)
    no_route = np.empty((1, 1, 1, 1), np.int32)
    run(x, w, b, y, no_route, False)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    w *= -0.5                                 # edited in place: followed once the version says so
    version[0] += 1
    run(x, w, b, y, no_route, False)
    np.testing.assert_allclose(y, reference(x, w, b, pads), rtol=1e-5, atol=1e-5)
    w2 = w * 2.0                              # another array: followed at once
    run(x, w2, b, y, no_route, False)
    np.testing.assert_allclose(y, reference(x, w2, b, pads), rtol=1e-5, atol=1e-5)
    ro = x.copy()
    ro.flags.writeable = False
    for xv in (np.asfortranarray(x), ro):     # not usable as the planes themselves: the padded copy, same bits
        y3 = np.empty_like(y)
        run(xv, w2, b, y3, no_route, False)
        np.testing.assert_array_equal(y3, y)
    route = np.empty(ref.shape, np.int32)     # training (a route): the direct kernel, the same values
    y2 = np.empty_like(y)
    run(x, w2, b, y2, route, True)
    np.testing.assert_allclose(y2, y, rtol=1e-5, atol=1e-5)


def test_float64():
    shape = SHAPES[1]
    N, C, K, H, W, pads = shape
    rng = np.random.default_rng(1)
    x, w, b = rng.standard_normal((N, C, H, W)), rng.standard_normal((K, C, 3, 3)), rng.standard_normal(K)
    run = _bind(shape, np.float64, lambda: 0)
    y = np.empty((N, K, (H + 2 - 2) // 2, (W + 2 - 2) // 2))
    run(x, w, b, y, np.empty((1, 1, 1, 1), np.int32), False)
    np.testing.assert_allclose(y, reference(x, w, b, pads), rtol=1e-12, atol=1e-12)


def test_not_finite_values_are_the_direct_kernels():
    """inf - inf = NaN inside the transforms where the direct sum gives inf: a call seeing a NaN or an inf
    runs the direct kernel (NaN and inf exactly where it puts them)."""
    shape = SHAPES[0]
    N, C, K, H, W, pads = shape
    rng = np.random.default_rng(2)
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    w = np.abs(rng.standard_normal((K, C, 3, 3))).astype(np.float32)
    b = rng.standard_normal(K).astype(np.float32)
    wino, direct = _bind(shape, np.float32, lambda: 0), _bind(shape, np.float32, None)
    assert direct.winograd is None
    no_route = np.empty((1, 1, 1, 1), np.int32)
    cases = []
    for v in (np.inf, -np.inf, np.nan):
        xv = x.copy()
        xv[0, 3, 5, 6] = v
        cases.append((xv, w, b))
    wv = w.copy()
    wv[2, 1, 0, 0] = np.inf
    cases += [(x, wv, b), (x * 1e36, w * 1e3, b)]           # inf filters; sums overflowing
    for k, (xv, wv, bv) in enumerate(cases):
        y1 = np.empty((N, K, 5, 6), np.float32)
        y2 = np.empty_like(y1)
        with np.errstate(all="ignore"):
            wino(xv, wv, bv, y1, no_route, False)
            direct(xv, wv, bv, y2, no_route, False)
        assert np.isfinite(y2).all() == (k == 1), k        # (-inf: ReLU makes it 0)
        np.testing.assert_array_equal(y1, y2, err_msg=str(k))


def test_applies_only_where_it_pays():
    assert winograd.applies(8, 3, 3, (1, 1), 1, "pool", 2, 2, 5, 5, 13, 4, 64)
    assert not winograd.applies(4, 3, 3, (1, 1), 1, "pool", 2, 2, 5, 5, 13, 4, 64)         # few channels
    assert not winograd.applies(8, 3, 3, (1, 1), 1, "pool", 3, 2, 5, 5, 13, 4, 64)         # a 3x3 pool
    assert not winograd.applies(8, 5, 5, (1, 1), 1, "pool", 2, 2, 5, 5, 13, 4, 64)         # a 5x5 filter
    assert not winograd.applies(8, 3, 3, (1, 1), 1, "store", 0, 0, 5, 5, 13, 4, 64)        # no pool
    assert not winograd.applies(64, 3, 3, (1, 1), 1, "pool", 2, 2, 111, 111, 224, 4, 64)   # V would not fit L2
    assert winograd.applies(512, 3, 3, (1, 1), 1, "pool", 2, 2, 3, 3, 9, 4, 64)
    assert not winograd.applies(512, 3, 3, (1, 1), 1, "pool", 2, 2, 3, 3, 9, 4, 512)    # U: 16 MB


def test_executable_follows_the_state(monkeypatch):
    """conv 8 -> 6 (3x3, pad 1) + ReLU + pool: inference on the numba backend equals the reference's while
    the state is edited in place (a held view, a temporary one), replaced, loaded, and trained."""
    calls = []
    call = winograd.WinogradPool.__call__
    monkeypatch.setattr(winograd.WinogradPool, "__call__", lambda self, *a: calls.append(1) or call(self, *a))
    rng = np.random.default_rng(3)
    g = gc.Graph("wino")
    x = g.input("x", (None, 8, 6, 6))
    h = g.maxpool(g.relu(g.conv(x, g.param("c.w", value=rng.normal(size=(6, 8, 3, 3)) * 0.3),
                                g.param("c.b", value=rng.normal(size=6) * 0.1), pad=1)), 2)
    z = g.dense(g.flatten(h), g.param("d.w", value=rng.normal(size=(3, 54)) * 0.3), name="logits")
    g.output(z, g.softmax_cross_entropy(z, g.input("y", (None,), dtype="int64"), name="loss"))
    feeds = {"x": rng.normal(size=(1, 8, 6, 6)).astype(np.float32), "y": np.array([0])}
    ref, exe = gc.compile(g), gc.compile(g, backend="numba", threads=1)

    def same(what):
        np.testing.assert_allclose(exe.run(feeds)["logits"], ref.run(feeds)["logits"], rtol=1e-5, atol=1e-5,
                                   err_msg=what)
    same("first")
    assert calls
    held, rheld = exe.state["c.w"], ref.state["c.w"]
    for k in range(2):
        held[k] *= -1.0
        rheld[k] *= -1.0
        same(f"held view, edit {k}")
    del held
    exe.state["c.w"][0, 0, 1, 1] = 3.0
    ref.state["c.w"][0, 0, 1, 1] = 3.0
    same("temporary view")
    for e in (exe, ref):
        e.state["c.w"] = np.full((6, 8, 3, 3), 0.1)
    same("replaced")
    tr = gc.compile(g, backend="numba", optimizer=gc.optim.SGD(0.01))
    tr.step(feeds)
    for e in (exe, ref):
        e.load_state_dict({k: v for k, v in tr.state_dict().items() if not k.startswith("optim/")})
    same("loaded")
    before = tr.run(feeds, outputs=["logits"])["logits"]
    tr.step(feeds)                           # the training executable's own inference run follows its steps
    after = tr.run(feeds, outputs=["logits"])["logits"]
    ref.load_state_dict({k: v for k, v in tr.state_dict().items() if not k.startswith("optim/")})
    np.testing.assert_allclose(after, ref.run(feeds)["logits"], rtol=1e-5, atol=1e-5)
    assert not np.allclose(before, after)
