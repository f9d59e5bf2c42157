"""NaN/inf-heavy graphs and feeds for the differential backend tests (tests/test_backend_nan.py runs them on
numba, tests/test_cuda_backend.py in the CUDA simulator).

The reference is numpy: max, ReLU and max pooling propagate NaN (a window holding NaN pools to NaN and
its gradient goes to the first NaN, np.argmax's rule); losses are formed in float64 as (z - max) -
log(sum), a 0 label weight on a log p of -inf adds 0 (a saturated softmax has loss 0), -y/p is 0 where
y == p == 0; float32 elementwise arithmetic overflows where float32 numpy's does (no log(exp(x)) -> x).
Random normal data never reaches these paths. Here NaN, +-inf, -0.0, huge and tiny values sit where a
kernel could differ: the first, middle and last position of a pooling window, whole rows of logits, a
saturated softmax, a square that overflows float32 but not the float64 mean. Backends must put NaN and
inf exactly where the reference does (`compare`).
"""
import numpy as np

import graphc as gc

NAN, INF = np.float32(np.nan), np.float32(np.inf)


def compare(got, ref, what, names=None):
    """Same keys, shapes and dtypes; NaN, +inf and -inf at the same positions; finite values close."""
    names = sorted(ref) if names is None else names
    for k in names:
        r, n = np.asarray(ref[k]), np.asarray(got[k])
        where = f"{what}: {k}"
        assert r.shape == n.shape and r.dtype == n.dtype, f"{where}: {n.shape} {n.dtype} vs {r.shape} {r.dtype}"
        for test in (np.isnan, np.isposinf, np.isneginf):
            bad = np.argwhere(test(r) != test(n))
            assert not len(bad), f"{where}: {test.__name__} differs first at {tuple(bad[0])}\n{n}\nreference\n{r}"
        fin = np.isfinite(r)
        scale = max(1.0, float(np.abs(r[fin]).max())) if fin.any() else 1.0
        np.testing.assert_allclose(n[fin], r[fin], rtol=2e-4, atol=2e-5 * scale, err_msg=where)


# ------------------------------------------------------------------------------- conv -> ReLU -> pool

def cnn():
    """conv 2@3x3 (pad 1) -> ReLU -> max pool 2 -> dense 3 -> softmax cross-entropy: fusable into
    conv_relu_maxpool (its saved route feeds route_relu in a training graph)."""
    g = gc.Graph("nan_cnn", seed=3)
    x = g.input("x", (None, 1, 4, 4))
    y = g.input("labels", (None,), dtype="int64")
    h = g.maxpool(g.relu(g.conv(x, g.param("c.w", (2, 1, 3, 3)), g.param("c.b", (2,), init="uniform"), pad=1)), 2)
    logits = g.dense(g.flatten(h), g.param("d.w", (3, 8)), g.param("d.b", (3,), init="uniform"), name="logits")
    g.output(logits, g.softmax_cross_entropy(logits, y, name="loss"))
    return g


def cnn_feeds():
    """{case: feeds} with NaN at the first, middle and last position of pooling windows, +-inf, an all
    -inf image, NaN beside a larger number (a NaN-skipping max would return the number)."""
    base = np.linspace(-1, 1, 16, dtype=np.float32).reshape(1, 1, 4, 4)
    cases = {}
    for name, pos, v in (("nan_first", (0, 0), NAN), ("nan_last", (1, 1), NAN), ("nan_mid", (1, 2), NAN),
                         ("posinf", (2, 3), INF), ("neginf", (3, 0), -INF)):
        x = np.repeat(base, 2, axis=0).copy()
        x[0, 0][pos] = v
        x[0, 0, 0, 1] = 5.0                     # a larger number after a NaN in the first window
        cases[name] = x
    cases["all_neginf"] = np.stack([np.full((1, 4, 4), -INF), base[0]])
    return {k: {"x": x, "labels": np.array([0, 2])} for k, x in cases.items()}


# ------------------------------------------------------------------------------------------- losses

LOSSES = ("sce", "ce", "sce_soft", "ce_soft", "mse", "bce")


def loss_graph(which):
    """One loss of z (None, 3) with its gradient wrt z (and wrt the soft labels t): the value and the
    gradient kernels of that loss. Inputs: z, and y (int labels) or t (soft labels, targets)."""
    g = gc.Graph(f"nan_{which}")
    z = g.input("z", (None, 3))
    labels = g.input("y", (None,), dtype="int64") if which in ("sce", "ce") else g.input("t", (None, 3))
    p = g.softmax(z, axis=1)
    if which in ("sce", "sce_soft"):
        g.output(g.softmax_cross_entropy(z, labels, name="L"))
    elif which in ("ce", "ce_soft"):
        g.output(g.cross_entropy(p, labels, name="L"))
    else:
        g.output((g.mse if which == "mse" else g.bce_with_sigmoid)(z, labels, name="L"))
    gg = gc.grad(g, wrt=["z"] + (["t"] if labels.name == "t" else []), loss="L")
    gg.output("L")
    return gg


def feeds_for(g, feeds):
    """The entries of `feeds` that g takes."""
    return {k: v for k, v in feeds.items() if k in g.inputs}


def loss_feeds():
    """{case: feeds}: saturated logits (on the label and off it), +-inf and NaN logits, |z| beyond 2**53,
    soft labels of inf and of 0 against a -inf log p, squares that overflow float32 only."""
    y = np.array([0, 1, 2])
    onehot = np.eye(3, dtype=np.float32)[y]
    z0 = np.array([[1e4, 0, 0], [0, 1e4, 0], [0, 0, 1e4]], np.float32)
    cases = {"saturated_on_label": z0, "saturated_off_label": z0[::-1].copy(),
             "inf_logits": np.array([[INF, 0, 0], [-INF, 0, 1], [INF, INF, 0]], np.float32),
             "nan_logits": np.array([[NAN, 0, 0], [0, 1, 2], [0, -INF, NAN]], np.float32),
             "huge_logits": np.array([[3e38, -3e38, 0], [1e16, 0, -1e16], [2e19, 1e19, -2e19]], np.float32)}
    out = {k: {"z": z, "y": y, "t": onehot} for k, z in cases.items()}
    soft = onehot.copy()
    soft[0] = [INF, 0, 0]
    soft[1] = [0, 1e-45, 1]                     # a denormal weight on a finite log p
    out["soft_inf_labels"] = {"z": z0, "y": y, "t": soft}
    # two equal maxima beyond 2**53: log p = (z - max) - log 2 = -0.69 (inf * it: -inf); z - (max + log 2)
    # loses the log 2 and gives 0 (inf * 0: NaN)
    huge = np.array([[1e17, 1e17, 0], [0, 1, 2], [0, 0, 0]], np.float32)
    out["huge_ties_soft_inf"] = {"z": huge, "y": y, "t": soft}
    # (2e19)**2 and 2e19 * 2e19 overflow float32; the float64 means (~4.4e37) do not
    out["squares_overflow"] = {"z": np.array([[2e19, -2e19, 1], [0, 0, 0], [0, 0, 0]], np.float32), "y": y,
                               "t": np.array([[2e19, 0, 0], [0, 0, 0], [0, 0, 0]], np.float32)}
    return out


# -------------------------------------------------------------------------------------- elementwise

def elementwise():
    """Float32 chains whose intermediates overflow, underflow or meet -0.0 and NaN: a backend that keeps
    them in float64, folds log(exp(x)) to x, divides by a reciprocal or drops signed zeros differs."""
    g = gc.Graph("nan_ew")
    a, b = g.input("a", (None,)), g.input("b", (None,))
    g.output(g.log(g.exp(a), name="logexp"), g.sqrt(g.exp(a), name="sqrtexp"), g.div(a, b, name="div"),
             g.div(g.scalar(1.0), g.neg(b), name="inv_neg"), g.relu(g.add(a, b), name="relu_sum"),
             g.max(a, b, name="max"), g.sigmoid(g.mul(a, b), name="sigmoid_prod"),
             g.tanh(g.sub(a, b), name="tanh_diff"), g.sum(g.mul(a, a), name="sumsq"))
    return g


def elementwise_feeds():
    a = np.array([89, 100, 1e-30, 1e-38, 3e38, -3e38, NAN, INF, -INF, 0.0, -0.0, 88.0, 2.0], np.float32)
    b = np.array([1, 1e-10, 1e-40, 1e-40, -3e38, 3e38, 1.0, INF, 1.0, -0.0, 0.0, -1.0, NAN], np.float32)
    return {"a": a.reshape(1, -1).repeat(2, 0).reshape(-1), "b": b.reshape(1, -1).repeat(2, 0).reshape(-1)}


# --------------------------------------------------------------------------------------------- pools

def pools():
    """Unfused max pools (overlapping 3x3/2 and 2x2/1, non-overlapping 2x2/2), a pool of relu(x), an
    average pool and a global max pool of NaN/inf data, with the gradient wrt x (maxpool_route: each
    window's gradient to its first NaN)."""
    g = gc.Graph("nan_pools")
    x = g.input("x", (None, 1, 5, 5))
    outs = [g.maxpool(x, 3, 2, name="mp3s2"), g.maxpool(x, 2, 1, name="mp2s1"), g.maxpool(x, 2, 2, name="mp2s2"),
            g.maxpool(g.relu(x), 2, 2, name="mp_relu"), g.avgpool(x, 2, 2, name="avg"),
            g.global_maxpool(x, name="gmp")]
    total = None
    for o in outs:
        t = g.sum(g.mul(o, g.scalar(0.5)))
        total = t if total is None else g.add(total, t)
    g.output(g.identity(total, name="L"))
    gg = gc.grad(g, wrt=["x"], loss="L")
    gg.output(*[o.name for o in outs], "L")
    return gg


def pool_feeds():
    x = np.arange(50, dtype=np.float32).reshape(2, 1, 5, 5) % 7 - 3
    x[0, 0, 0, 0] = NAN                         # first position of windows, a larger number after it
    x[0, 0, 2, 3] = NAN                         # middle of overlapping windows
    x[0, 0, 4, 4] = INF
    x[1, 0, 1, 1] = -INF
    x[1, 0, 3, 2] = NAN
    return {"x": x}
