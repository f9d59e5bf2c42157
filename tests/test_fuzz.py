"""Property-based fuzzing (hypothesis) of definitions and feeds. One invariant throughout:

    every call either raises a gc.GraphError subclass whose message is one line,
    or returns what the reference backend returns (NaN and inf positions included).

- Definitions (no compile beyond the reference): random shapes, strides, pads, axes, sizes, dtypes and
  names for every op family. An accepted definition must also *run*: the reference executable, fed a
  valid batch, returns the declared shape and dtype (a check missing at definition shows up here as
  a run-time failure).
- Feeds: a few small graphs are compiled once per module on the reference and numba backends, then fed
  random batches: wrong shapes, ranks, dtypes, empty batches, labels outside 0..K-1, NaN/inf, huge
  values, non-contiguous, reversed, Fortran-ordered and read-only arrays, missing or extra names. Both
  backends must agree: both refuse (GraphError), or numba returns the reference's values.

The examples are derandomized (the same cases on every run, so CI does not flake). To search new cases:
GRAPHC_FUZZ_EXPLORE=1 python -m pytest tests/test_fuzz.py (random, 10x the examples).

Nothing is excluded from the comparison: numba's kernels follow numpy's NaN/inf semantics (max pools and
their routes, the fused conv-ReLU-pool, the loss kernels in float64, float32 elementwise chains), so
every output of every accepted case is compared, NaN and inf positions included.
"""
import os

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import graphc as gc  # noqa: E402
from graphc import shapes  # noqa: E402
from graphc.executable import class_label_inputs  # noqa: E402

EXPLORE = bool(os.environ.get("GRAPHC_FUZZ_EXPLORE"))


def fuzz(n):
    """hypothesis settings for n examples (10n, random, when exploring)."""
    return settings(max_examples=n * (10 if EXPLORE else 1), derandomize=not EXPLORE, deadline=None,
                    database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


COUNT = {"cases": 0, "accepted": 0}    # generated cases run by this module, and how many ran to the end


def attempt(fn):
    """("ok", result) or ("error", exception) for a GraphError with a one-line message; any other
    exception propagates (and fails the test with hypothesis's minimal example)."""
    try:
        return "ok", fn()
    except gc.GraphError as e:
        msg = str(e)
        assert msg.strip() and "\n" not in msg, f"{type(e).__name__} message is not one line: {msg!r}"
        return "error", e


# ================================================================== definitions

def valid_feeds(g, batch=2, seed=0):
    """A feed every declared input accepts: floats, and labels inside 0..K-1 of the losses they feed."""
    rng = np.random.default_rng(seed)
    labels = class_label_inputs(g)
    feeds = {}
    for name in g.inputs:
        d = g.nx.nodes[name]
        shape = shapes.resolve(d["shape"], {s: batch for s in d["shape"] if isinstance(s, str)})
        if d["dtype"].startswith("int"):
            feeds[name] = rng.integers(0, labels[name][0] if name in labels else 3, shape).astype(d["dtype"])
        else:
            feeds[name] = rng.standard_normal(shape).astype(d["dtype"])
    return feeds


def check_definition(build):
    """build() -> (graph, value). Refused: one line. Accepted: the reference runs it on a valid feed and
    returns the declared shape and dtype."""
    COUNT["cases"] += 1
    kind, res = attempt(build)
    if kind == "error":
        return
    g, v = res
    COUNT["accepted"] += 1
    g.output(v)
    exe = gc.compile(g)
    with np.errstate(all="ignore"):          # log/sqrt of random normals: NaN is a value, not a failure
        out = exe.run(valid_feeds(g))[v.name]
    want = shapes.resolve(v.shape, {s: 2 for s in v.shape if isinstance(s, str)})
    assert out.shape == want, f"{v.op}: declared {v.shape}, the reference computed {out.shape}"
    assert str(out.dtype) == (str(exe.dtype) if v.dtype.startswith("float") else v.dtype)


def mostly(valid, *invalid):
    """Draws from `valid` about five times in six, else from one of the invalid strategies: enough
    valid cases reach the run (and the comparison), enough invalid ones test the refusals."""
    if not invalid:
        return valid
    bad = st.one_of(*invalid)
    return st.integers(0, 5).flatmap(lambda i: bad if i == 5 else valid)


ODD = st.sampled_from([None, 1.5, "2", True, (), (1, 2, 3), [2], "same", "valid", "full", float("nan")])
SMALL = st.integers(-2, 6)
NAMES = mostly(st.text(st.characters(codec="utf-8"), min_size=1, max_size=6),
               st.sampled_from(["__step__", "__meta__", "x", "w", "", None, 3]))
STRIDE = mostly(st.one_of(st.integers(1, 3), st.tuples(st.integers(1, 3), st.integers(1, 3))),
                SMALL, st.tuples(SMALL, SMALL), ODD)
PADS = mostly(st.one_of(st.integers(0, 2), st.tuples(st.integers(0, 2), st.integers(0, 2)),
                        st.tuples(*[st.integers(0, 2)] * 4), st.sampled_from(["same", "valid"])),
              SMALL, st.tuples(SMALL, SMALL), st.tuples(SMALL, SMALL, SMALL, SMALL), ODD)
DTYPES = mostly(st.none(), st.sampled_from(["float32", "float64", "int64", "int32", "float16", "bool", "complex64",
                                            "x", np.float32, 3]))
DIM = mostly(st.integers(1, 4), st.integers(-1, 0), st.sampled_from([None, 2.5, "a", True]))


def image(g, c, hw, name="x"):
    return g.input(name, (None, c) + tuple(hw))


@fuzz(150)
@given(c=st.integers(1, 3), hw=st.tuples(st.integers(2, 7), st.integers(2, 7)), k=st.integers(1, 3),
       cw=mostly(st.none(), st.integers(1, 3)), khw=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       bias=mostly(st.sampled_from([None, "k"]), st.integers(1, 3)), stride=STRIDE, pad=PADS,
       name=st.one_of(st.none(), NAMES))
def test_define_conv(c, hw, k, cw, khw, bias, stride, pad, name):
    def build():
        g = gc.Graph("fz")
        x = image(g, c, hw)
        b = None if bias is None else g.param("b", (k if bias == "k" else bias,))
        return g, g.conv(x, g.param("w", (k, c if cw is None else cw) + khw), b, stride=stride, pad=pad, name=name)
    check_definition(build)


@fuzz(150)
@given(op=st.sampled_from(["maxpool", "avgpool"]), hw=st.tuples(st.integers(2, 8), st.integers(2, 8)),
       size=mostly(st.integers(1, 3), SMALL, st.tuples(SMALL, SMALL), ODD),
       stride=mostly(st.one_of(st.none(), st.integers(1, 3)), SMALL, ODD),
       pad=mostly(st.integers(0, 1), SMALL, st.tuples(SMALL, SMALL, SMALL, SMALL), ODD))
def test_define_pool(op, hw, size, stride, pad):
    def build():
        g = gc.Graph("fz")
        x = image(g, 2, hw)
        kw = {"pad": pad} if op == "maxpool" else {}
        return g, getattr(g, op)(x, size, stride, **kw)
    check_definition(build)


@fuzz(100)
@given(shape=st.tuples(st.integers(1, 4), st.integers(1, 4)), data=st.data())
def test_define_reshape(shape, data):
    a, b = shape
    valid = st.sampled_from([(None, -1), (None, a * b), (None, b, a), (None, -1, 1), (None, 1, -1, a),
                             (-1, a * b), (None, a, b, 1)])
    target = data.draw(mostly(valid, st.lists(st.one_of(st.none(), st.sampled_from([-1, -2, 0, 1.5, "N"]),
                                                        st.integers(1, 16)), max_size=4).map(tuple), ODD))

    def build():
        g = gc.Graph("fz")
        return g, g.reshape(g.input("x", (None,) + shape), target)
    check_definition(build)


@fuzz(100)
@given(dims=st.lists(st.integers(1, 3), min_size=1, max_size=4), data=st.data())
def test_define_transpose(dims, data):
    r = len(dims)
    axes = data.draw(mostly(st.one_of(st.none(), st.permutations(range(r)).map(tuple)),
                            st.lists(st.integers(-5, 5), max_size=5).map(tuple), ODD))

    def build():
        g = gc.Graph("fz")
        return g, g.transpose(g.input("x", (None,) + tuple(dims[1:])), axes)
    check_definition(build)


@fuzz(100)
@given(chans=st.lists(st.integers(1, 3), min_size=1, max_size=3),
       hws=mostly(st.just([3, 3, 3]), st.lists(st.integers(2, 3), min_size=3, max_size=3)),
       axis=mostly(st.sampled_from([1, -3, 2, 3]), st.integers(-6, 6), ODD))
def test_define_concat(chans, hws, axis):
    def build():
        g = gc.Graph("fz")
        vals = [image(g, c, (hws[i], 3), name=f"x{i}") for i, c in enumerate(chans)]
        return g, g.concat(vals, axis=axis)
    check_definition(build)


@fuzz(150)
@given(op=st.sampled_from(["softmax", "sum", "mean"]), dims=st.lists(st.integers(1, 3), max_size=3),
       data=st.data(), keepdims=st.booleans())
def test_define_axes(op, dims, data, keepdims):
    r = len(dims) + 1
    axes = data.draw(mostly(st.one_of(st.integers(-r, r - 1), st.lists(st.integers(0, r - 1), max_size=r,
                                                                         unique=True).map(tuple)),
                            st.integers(-6, 6), st.lists(st.integers(-6, 6), max_size=4).map(tuple), ODD))

    def build():
        g = gc.Graph("fz")
        x = g.input("x", (None,) + tuple(dims))
        if op == "softmax":
            return g, g.softmax(x, axis=axes)
        return g, getattr(g, op)(x, axes=axes, keepdims=keepdims)
    check_definition(build)


@fuzz(100)
@given(axis=mostly(st.sampled_from([1, 2, -1, -2]), st.integers(-5, 5), ODD), data=st.data())
def test_define_slice(axis, data):
    dim = {1: 5, 2: 4, -1: 4, -2: 5}.get(axis, 5) if type(axis) is int else 5
    start = data.draw(mostly(st.integers(0, dim - 1), st.integers(-2, 7), ODD))
    stop = data.draw(mostly(st.integers(start + 1, dim) if isinstance(start, int) and 0 <= start < dim
                            else st.integers(-2, 8), st.integers(-2, 8), ODD))

    def build():
        g = gc.Graph("fz")
        return g, g.slice(g.input("x", (None, 5, 4)), axis, start, stop)
    check_definition(build)


@fuzz(100)
@given(op=st.sampled_from(["pad2d", "crop2d"]), hw=st.tuples(st.integers(1, 6), st.integers(1, 6)),
       pads=mostly(st.one_of(st.integers(0, 2), st.tuples(*[st.integers(0, 2)] * 4)),
                   SMALL, st.tuples(SMALL, SMALL, SMALL, SMALL), ODD))
def test_define_pad_crop(op, hw, pads):
    def build():
        g = gc.Graph("fz")
        return g, getattr(g, op)(image(g, 1, hw), pads)
    check_definition(build)


BCAST = st.lists(st.sampled_from([1, 2, 3, None]), max_size=3).map(tuple)


@fuzz(150)
@given(op=st.sampled_from(["add", "mul", "sub", "div", "max", "gt", "relu", "exp", "log", "sqrt", "sigmoid",
                           "tanh", "neg", "identity", "copy"]), sa=BCAST, sb=BCAST, da=DTYPES, db=DTYPES)
def test_define_elementwise(op, sa, sb, da, db):
    def build():
        g = gc.Graph("fz")
        a = g.input("a", sa, dtype=da)
        if op in ("relu", "exp", "log", "sqrt", "sigmoid", "tanh", "neg", "identity", "copy"):
            return g, getattr(g, op)(a)
        return g, getattr(g, op)(a, g.input("b", sb, dtype=db))
    check_definition(build)


@fuzz(100)
@given(m=st.sampled_from([None, 2]), k=st.integers(1, 4), n=st.integers(1, 4), ta=st.booleans(), tb=st.booleans(),
       dense=st.booleans(), k2=mostly(st.none(), DIM), bias=mostly(st.none(), DIM))
def test_define_matmul(m, k, n, ta, tb, dense, k2, bias):
    k2 = k if k2 is None else k2

    def build():
        g = gc.Graph("fz")
        if dense:
            a, w = g.input("a", (m, k)), g.param("w", (n, k2))
            return g, g.dense(a, w, g.param("b", (n if bias is None else bias,)))
        a = g.input("a", (k, m) if ta else (m, k))
        return g, g.matmul(a, g.param("w", (n, k2) if tb else (k2, n)), trans_a=ta, trans_b=tb)
    check_definition(build)


@fuzz(150)
@given(op=st.sampled_from(["softmax_cross_entropy", "cross_entropy", "mse", "bce_with_sigmoid"]),
       k=st.integers(1, 4), form=mostly(st.sampled_from(["int", "onehot"]), st.sampled_from(["2d-int", "float1d",
                                                                                              "3d", "wrongk"])),
       ldt=st.sampled_from(["int64", "int32"]))
def test_define_losses(op, k, form, ldt):
    if op in ("mse", "bce_with_sigmoid") and form == "int":
        form = "onehot"
    shape, dtype = {"int": ((None,), ldt), "onehot": ((None, k), None), "2d-int": ((None, k), ldt),
                    "float1d": ((None,), None), "3d": ((None, k, 1), None), "wrongk": ((None, k + 1), None)}[form]

    def build():
        g = gc.Graph("fz")
        z = g.input("z", (None, k))
        if op == "cross_entropy":
            z = g.softmax(z, axis=-1)
        return g, getattr(g, op)(z, g.input("labels", shape, dtype=dtype))
    check_definition(build)


@fuzz(150)
@given(kind=st.sampled_from(["input", "param", "param_value", "const"]), name=NAMES,
       shape=mostly(st.lists(st.integers(1, 3), min_size=1, max_size=3).map(tuple),
                    st.lists(DIM, max_size=3).map(tuple), ODD),
       dtype=DTYPES, init=mostly(st.sampled_from(["he", "zeros", "glorot", "torch"]), st.sampled_from(["bogus", None])))
def test_define_sources(kind, name, shape, dtype, init):
    def build():
        g = gc.Graph("fz")
        if kind == "input":
            v = g.input(name, shape, dtype=dtype)
        elif kind == "param":
            v = g.param(name, shape, init=init, dtype=dtype)
        elif kind == "param_value":
            v = g.param(name, value=np.ones([d for d in shape if type(d) is int and 0 < d < 4])
                        if isinstance(shape, tuple) else shape, dtype=dtype)
        else:
            v = g.const(np.arange(6).reshape(2, 3) if shape is None else shape, name=name, dtype=dtype)
        return g, v
    check_definition(build)


@fuzz(60)
@given(rate=mostly(st.floats(0, 0.9), st.floats(-1, 2), st.sampled_from([float("nan"), "x", None, True])),
       seed=mostly(st.one_of(st.none(), st.integers(0, 3)), st.integers(-3, -1), st.sampled_from([1.5, "s"])),
       gseed=mostly(st.integers(0, 3), st.integers(-2, -1), st.sampled_from([1.5, "s", None])))
def test_define_dropout_and_seeds(rate, seed, gseed):
    def build():
        g = gc.Graph("fz", seed=gseed)
        return g, g.dropout(g.input("x", (None, 3)), rate, seed=seed)
    check_definition(build)


# ================================================================== feeds: reference vs numba

def build_cnn():
    g = gc.Graph("fz_cnn", seed=1)
    x = g.input("x", (None, 1, 6, 6))
    y = g.input("labels", (None,), dtype="int64")
    h = g.maxpool(g.relu(g.conv(x, g.param("c.w", (2, 1, 3, 3)), g.param("c.b", (2,), init="uniform"))), 2)
    logits = g.dense(g.flatten(h), g.param("d.w", (4, 8)), g.param("d.b", (4,), init="uniform"), name="logits")
    g.output(logits, g.softmax_cross_entropy(logits, y, name="loss"))
    return g


def build_elementwise():
    g = gc.Graph("fz_ew", seed=2)
    a, b = g.input("a", (None, 5)), g.input("b", (None, 5))
    c = g.param("c", (5,), init="uniform")
    g.output(g.relu(a, name="relu"), g.max(a, b, name="max"), g.add(g.mul(g.sigmoid(a), g.tanh(b)), c, name="mix"),
             g.div(a, b, name="div"), g.sqrt(g.exp(a), name="sqrtexp"), g.log(g.relu(b), name="logrelu"),
             g.sum(a, axes=1, name="sum"), g.mean(b, name="mean"), g.softmax(a, axis=1, name="softmax"),
             g.gt(a, b, name="gt"), g.sub(g.neg(a), b, name="sub"))
    return g


def build_losses():
    g = gc.Graph("fz_loss", seed=3)
    z, y, t = g.input("z", (None, 3)), g.input("y", (None,), dtype="int64"), g.input("t", (None, 3))
    g.output(g.softmax_cross_entropy(z, y, name="sce"), g.cross_entropy(g.softmax(z, axis=1), y, name="ce"),
             g.mse(z, t, name="mse"), g.bce_with_sigmoid(z, t, name="bce"),
             g.softmax_cross_entropy(z, t, name="sce_soft"))
    return g


def build_shapes():
    g = gc.Graph("fz_shapes", seed=4)
    x = g.input("x", (None, 2, 4, 4))
    g.output(g.avgpool(x, 2, name="avg"), g.global_avgpool(x, name="gap"),
             g.concat([x, g.pad2d(g.crop2d(x, 1), 1)], axis=1, name="cat"),
             g.transpose(x, (0, 2, 3, 1), name="nhwc"), g.slice(x, 1, 1, 2, name="sl"),
             g.maxpool(x, 3, 1, pad=1, name="incpool"), g.reshape(x, (None, 8, 4), name="rs"))
    return g


GRAPHS = {"cnn": build_cnn, "elementwise": build_elementwise, "losses": build_losses, "shapes": build_shapes}


@pytest.fixture(scope="module")
def compiled():
    """{graph name: (graph, reference executable, numba executable)} compiled once for the module."""
    pytest.importorskip("numba")
    out = {}
    for name, build in GRAPHS.items():
        g = build()
        out[name] = (g, gc.compile(g), gc.compile(g, backend="numba"))
    return out


SPECIALS = st.sampled_from([np.nan, -np.nan, np.inf, -np.inf, -0.0, 1e30, -1e30, 3e38])
LAYOUTS = st.sampled_from(["c", "fortran", "strided", "reversed", "readonly", "list", "scalar"])
CASTS = st.sampled_from([None] * 6 + ["float64", "float16", "int32", "uint8", "bool", "complex64", "object", "<U3",
                                      "int8", "uint64"])


def _layout(arr, how):
    if how == "fortran":
        return np.asfortranarray(arr)
    if how == "strided" and arr.ndim:
        big = np.zeros((arr.shape[0] * 2,) + arr.shape[1:], arr.dtype)
        big[::2] = arr
        return big[::2]
    if how == "reversed" and arr.ndim:
        return arr[::-1].copy()[::-1]
    if how == "readonly":
        arr = arr.copy()
        arr.flags.writeable = False
        return arr
    if how == "list":
        return arr.tolist()
    if how == "scalar":
        return arr.reshape(-1)[0] if arr.size else 0.0
    return arr


@st.composite
def feeds_for(draw, g):
    """A feed dict for graph g: valid by default, with drawn mutations of shape, dtype, values, layout,
    labels and names."""
    n = draw(st.sampled_from([1, 2, 3, 3, 0]))
    labels = class_label_inputs(g)
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    feeds = {}
    for name in g.inputs:
        d = g.nx.nodes[name]
        shape = list(shapes.resolve(d["shape"], {s: n for s in d["shape"] if isinstance(s, str)}))
        if draw(st.integers(0, 9)) == 0:                  # a wrong shape: a dim changed, dropped or added
            how = draw(st.sampled_from(["change", "drop", "add", "batch"]))
            i = draw(st.integers(0, max(len(shape) - 1, 0)))
            if how == "change" and shape:
                shape[i] = draw(st.integers(0, 7))
            elif how == "drop" and shape:
                shape.pop(i)
            elif how == "add":
                shape.insert(i, draw(st.integers(1, 3)))
            elif shape:
                shape[0] = draw(st.integers(1, 4))
        if d["dtype"].startswith("int"):
            k = labels[name][0] if name in labels else 3
            lo, hi = draw(st.sampled_from([(0, k), (0, k), (0, k), (-3, k + 3), (-2**40, 2**40)]))
            arr = rng.integers(lo, hi, shape, dtype=np.int64)
        else:
            arr = rng.standard_normal(shape) * draw(st.sampled_from([1.0, 1.0, 10.0, 1e3, 1e20]))
            for _ in range(draw(st.integers(0, 3)) if arr.size else 0):
                arr.flat[draw(st.integers(0, arr.size - 1))] = draw(SPECIALS)
        cast = draw(CASTS)
        if cast is not None:
            with np.errstate(all="ignore"):
                arr = arr.astype(cast)
        feeds[name] = _layout(arr, draw(LAYOUTS) if draw(st.integers(0, 3)) == 0 else "c")
    keys = draw(st.sampled_from(["same"] * 8 + ["missing", "extra", "notdict"]))
    if keys == "missing":
        feeds.pop(next(iter(feeds)))
    elif keys == "extra":
        feeds["bogus"] = np.zeros(1)
    elif keys == "notdict":
        return list(feeds.values())
    return feeds


def magnitude(feeds):
    """The largest finite |value| fed (float64). float32 sums of products of such values carry rounding
    errors about eps * magnitude**2 whatever the order: the tolerance of the value comparison."""
    m = 0.0
    for v in feeds.values():
        a = np.asarray(v)
        if a.dtype.kind in "fiu" and a.size:
            a = np.abs(a.astype(np.float64))
            fin = a[np.isfinite(a)]
            m = max(m, float(fin.max()) if fin.size else 0.0)
    return m


def same_values(ref, got, where, feeds=None):
    """numba's result equals the reference's: keys, shapes, dtypes, NaN and inf positions, values (within
    a tolerance scaled by the fed magnitudes)."""
    big = magnitude(feeds) ** 2 if feeds else 0.0
    assert set(ref) == set(got), where
    for k in ref:
        r, n = np.asarray(ref[k]), np.asarray(got[k])
        assert r.shape == n.shape and r.dtype == n.dtype, f"{where} {k}: {r.shape} {r.dtype} vs {n.shape} {n.dtype}"
        assert np.array_equal(np.isnan(r), np.isnan(n)), f"{where} {k}: NaN positions differ\n{r}\n{n}"
        assert np.array_equal(np.isposinf(r), np.isposinf(n)) and np.array_equal(np.isneginf(r), np.isneginf(n)), \
            f"{where} {k}: inf positions differ\n{r}\n{n}"
        fin = np.isfinite(r)
        scale = max(1.0, big, float(np.abs(r[fin]).max())) if fin.any() else 1.0
        np.testing.assert_allclose(n[fin], r[fin], rtol=2e-4, atol=2e-5 * scale, err_msg=f"{where} {k}")


def compare_backends(name, ref, nb, feeds):
    COUNT["cases"] += 1
    rk, rv = attempt(lambda: ref.run(feeds))
    nk, nv = attempt(lambda: nb.run(feeds))
    assert rk == nk, f"{name}: reference {rk} ({rv!r}), numba {nk} ({nv!r})"
    if rk == "ok":
        COUNT["accepted"] += 1
        same_values(rv, nv, name, feeds)


@pytest.mark.parametrize("name", list(GRAPHS))
def test_feeds_reference_vs_numba(compiled, name):
    g, ref, nb = compiled[name]

    @fuzz(200)
    @given(feeds=feeds_for(g))
    def check(feeds):
        compare_backends(name, ref, nb, feeds)
    check()


@pytest.fixture(scope="module")
def trainers():
    """The cnn graph as SGD training executables on both backends, and its initial state."""
    pytest.importorskip("numba")
    g = build_cnn()
    ref = gc.compile(g, optimizer=gc.optim.SGD(0.1))
    nb = gc.compile(g, backend="numba", optimizer=gc.optim.SGD(0.1))
    return g, ref, nb, ref.state_dict()


@fuzz(200)
@given(data=st.data())
def test_training_step_reference_vs_numba(trainers, data):
    """One SGD step from the same state on both backends: the same loss and the same new parameters."""
    g, ref, nb, init = trainers
    COUNT["cases"] += 1
    feeds = data.draw(feeds_for(g))
    ref.load_state_dict(init)
    nb.load_state_dict(init)
    rk, rloss = attempt(lambda: ref.step(feeds))
    nk, nloss = attempt(lambda: nb.step(feeds))
    assert rk == nk, f"step: reference {rk} ({rloss!r}), numba {nk} ({nloss!r})"
    if rk == "ok":
        COUNT["accepted"] += 1
        same_values({"loss": np.asarray(rloss), **ref.params}, {"loss": np.asarray(nloss), **nb.params}, "step",
                    feeds)


def test_enough_cases():
    """The module ran at least 2,000 generated cases (when run whole; skipped under -k selections)."""
    if COUNT["cases"] < 100:
        pytest.skip("run the whole module to count its cases")
    assert COUNT["cases"] >= 2000, COUNT
    assert COUNT["accepted"] >= COUNT["cases"] // 4, f"too few cases get past the checks to be compared: {COUNT}"
