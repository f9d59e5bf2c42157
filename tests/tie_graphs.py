"""Tie-heavy graphs and feeds for the differential backend tests (tests/test_backend_ties.py runs them on
numba, tests/test_cuda_backend.py in the CUDA simulator).

Random normal data never ties, so "the first maximum of a window wins" (max pool, its route, the saved
route of the fused conv-ReLU-pool) and "ties of max go to the second input" would go untested. Here every
value is a small integer held in float32: windows tie, ReLU gives exact zeros, whole planes are plateaus
(all equal, all zero, all negative). Integer sums and products are exact in float32 at these sizes
(everything stays far below 2**24), whatever order a kernel adds in, so backends must equal the
reference EXACTLY (==), forward and gradient, and a tie sent to the wrong position shows up as a
different integer. The losses are linear (sum of output * integer constant) to keep gradients integer.

Hand-checked cases (``plateau_*``) pin the rule itself, not just agreement with the reference.
"""
import numpy as np

import graphc as gc


def int_feeds(g, n=2, seed=0, lo=-2, hi=2):
    """Integer-valued float feeds in [lo, hi] for every input of g."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name in g.inputs:
        d = g.nx.nodes[name]
        shape = tuple(n if isinstance(s, str) else s for s in d["shape"])
        feeds[name] = rng.integers(lo, hi + 1, shape).astype(d["dtype"])
    return feeds


def with_linear_loss(g, outs, wrt, seed=1):
    """The backward graph of loss = sum_k sum(out_k * c_k) (c_k integer constants, broadcast over the
    batch), with the forward values `outs` kept as outputs too: one executable checks both."""
    rng = np.random.default_rng(seed)
    total = None
    for o in outs:
        shape = g.nx.nodes[o]["shape"]
        cs = tuple(1 if isinstance(d, str) else d for d in shape)
        term = g.sum(g.mul(g[o], g.const(rng.integers(-3, 4, cs).astype(g.dtype))))
        total = term if total is None else g.add(total, term)
    g.output(g.identity(total, name="the_loss"))
    gg = gc.grad(g, wrt=wrt, loss="the_loss")
    gg.output(*outs, "the_loss")
    return gg


def _plateaus(f):
    """Whole windows and planes of equal values: a positive plateau, an all-zero plane, a negative one."""
    x = f["x"]
    x[0, 0, :4, :5] = 1
    x[-1, -1] = 0
    x[0, -1, 3:, 3:] = -1
    return f


# ----------------------------------------------------------------------------------- max pool, ReLU, max

POOLS = {"mp_3s2": (3, 2), "mp_2s1": (2, 1), "mp_2s2": (2, 2)}     # two overlapping, one not


def pool_ties():
    """(graph with gradients, feeds): unfused max pools, overlapping and not, of x and of relu(x) (all-zero
    windows); gradient wrt x."""
    g = gc.Graph("pool_ties")
    x = g.input("x", (None, 2, 7, 7))
    outs = [g.maxpool(x, k, s, name=n).name for n, (k, s) in POOLS.items()]
    outs.append(g.maxpool(g.relu(x), 2, 1, name="mp_relu_2s1").name)
    return with_linear_loss(g, outs, ["x"]), _plateaus(int_feeds(g))


def relu_max_ties():
    """(graph with gradients, feeds): relu(x) (exact zeros), max(x, y) with x == y at about a third of the
    positions, max(x, 0) as a max gate against a constant; gradients wrt x and y."""
    g = gc.Graph("relu_max_ties")
    x = g.input("x", (None, 2, 7, 7))
    y = g.input("y", (None, 2, 7, 7))
    outs = [g.relu(x, name="relu").name, g.max(x, y, name="max_xy").name,
            g.max(x, g.const(np.zeros((2, 7, 7), np.float32)), name="max_x0").name]
    gg = with_linear_loss(g, outs, ["x", "y"])
    f = _plateaus(int_feeds(g))
    keep = np.random.default_rng(2).random(f["y"].shape) < 0.35
    f["y"] = np.where(keep, f["x"], f["y"]).astype(np.float32)
    return gg, f


# ------------------------------------------------------------------------------------ saved-route ops

def route_ties():
    """(graph, feeds): the saved-route ops on tie-heavy data: maxpool_argmax of relu(x) (relu=True: ~ the
    top-left for all-zero windows) and of x (relu=False), non-overlapping and overlapping; route_scatter with the
    pool geometry (the non-overlapping fast path) and without (generic); maxpool_route, maxpool_gather."""
    g = gc.Graph("route_ties")
    x = g.input("x", (None, 2, 6, 6))
    dy2 = g.input("dy2", (None, 2, 3, 3))
    dy3 = g.input("dy3", (None, 2, 2, 2))
    gv = g.input("gv", (None, 2, 6, 6))
    r = g.relu(x)

    def argmax(v, k, s, relu, name):
        return g.add_node("maxpool_argmax", (v,), {"size": (k, k), "stride": (s, s), "relu": relu}, name=name)

    ra2 = argmax(r, 2, 2, True, "route_relu_2s2")
    ra3 = argmax(r, 3, 2, True, "route_relu_3s2")
    rx2 = argmax(x, 2, 2, False, "route_x_2s2")
    rx3 = argmax(x, 3, 2, False, "route_x_3s2")

    def scatter(dy, route, name, geometry=None):
        attrs = {"in_hw": (6, 6)}
        if geometry:
            attrs.update(size=(geometry[0],) * 2, stride=(geometry[1],) * 2)
        return g.add_node("route_scatter", (dy, route), attrs, name=name)

    g.output(ra2, ra3, rx2, rx3,
             scatter(dy2, ra2, "scatter_relu_2s2", (2, 2)), scatter(dy2, rx2, "scatter_x_2s2"),
             scatter(dy3, ra3, "scatter_relu_3s2", (3, 2)), scatter(dy3, rx3, "scatter_x_3s2"),
             g.maxpool_route(x, dy3, 3, 2, name="maxpool_route_3s2"),
             g.maxpool_gather(x, gv, 3, 2, name="gather_3s2"), g.maxpool_gather(r, gv, 2, 2, name="gather_relu_2s2"))
    f = int_feeds(g)
    f["x"][0, 0, :4, :4] = 1          # positive plateau: routes to each window's top-left
    f["x"][1, 0] = 0                  # all-zero plane: every relu route ~top-left, every x route top-left
    f["x"][1, 1, :3, :3] = -1         # negative plateau: relu route ~top-left, x route top-left
    return g, f


# ------------------------------------------------------------------------ fused conv -> ReLU -> max pool

CONV_POOLS = {"p_2s2": ((2, 2), (2, 2)), "p_3s2": ((3, 3), (2, 2)), "p_2s1": ((2, 2), (1, 1)),
              "p_2x1": ((2, 1), (2, 1))}     # the last is non-square: a separate pool kernel after the conv


def conv_pool_ties(pools=tuple(CONV_POOLS), c_in=2):
    """(graph with gradients, feeds): conv(+bias) -> ReLU -> max-pool branches (`pools`, names from
    CONV_POOLS) on one input of c_in channels, each fusable into conv_relu_maxpool (saving the route for
    route_relu in the backward); integer weights and biases (-1, 0, 1 per filter: a plane of an all-zero
    image becomes a plateau of 1, of 0 or of -1); gradients wrt x, every weight and bias."""
    g = gc.Graph("conv_pool_ties")
    x = g.input("x", (None, c_in, 6, 6))
    rng = np.random.default_rng(7)
    outs, wrt = [], ["x"]
    for name in pools:
        size, stride = CONV_POOLS[name]
        w = g.param(f"{name}.w", value=rng.integers(-1, 2, (3, c_in, 3, 3)))
        b = g.param(f"{name}.b", value=np.array([1, 0, -1]))
        h = g.relu(g.conv(x, w, b, pad=1, name=f"{name}.conv"), name=f"{name}.relu")
        outs.append(g.maxpool(h, size, stride, name=name).name)
        wrt += [f"{name}.w", f"{name}.b"]
    gg = with_linear_loss(g, outs, wrt)
    f = int_feeds(g, lo=-1, hi=1)
    f["x"][1] = 0                     # conv output = the bias: plateaus of 1, 0 and -1
    f["x"][0, 0, :, :3] = 1           # a plateau in the input too
    return gg, f


# ------------------------------------------------------------------------------- hand-checked plateaus

def plateau_pool():
    """max pool 2x2 stride 1 of a 3x3 plateau of 2s: each window's gradient goes to its top-left (first)
    position. Returns (graph, feeds, expected {output: value})."""
    g = gc.Graph("plateau_pool")
    x = g.input("x", (None, 1, 3, 3))
    g.output(g.sum(g.maxpool(x, 2, 1), name="s"))
    gg = gc.grad(g, wrt=["x"], loss="s")
    gg.output("s")
    want = {"grad/x": np.array([[[[1, 1, 0], [1, 1, 0], [0, 0, 0]]]], np.float32), "s": np.float32(8)}
    return gg, {"x": np.full((1, 1, 3, 3), 2, np.float32)}, want


def plateau_route():
    """maxpool_argmax 2x2 stride 1 of a 3x3 plateau: the flat index i*W + j of each window's top-left;
    with relu=True the same windows of zeros give ~ that (= -1 - index: masked, the gradient dy * 0)."""
    g = gc.Graph("plateau_route")
    x = g.input("x", (None, 1, 3, 3))
    z = g.input("z", (None, 1, 3, 3))
    attrs = {"size": (2, 2), "stride": (1, 1)}
    g.output(g.add_node("maxpool_argmax", (x,), dict(attrs, relu=True), name="route"),
             g.add_node("maxpool_argmax", (z,), dict(attrs, relu=True), name="route_zero"))
    feeds = {"x": np.full((1, 1, 3, 3), 2, np.float32), "z": np.zeros((1, 1, 3, 3), np.float32)}
    want = {"route": np.array([[[[0, 1], [3, 4]]]], np.int32), "route_zero": ~np.array([[[[0, 1], [3, 4]]]], np.int32)}
    return g, feeds, want


def plateau_max():
    """max(x, y) with x == y everywhere: the gradient goes to the second input (and relu'(0) = 0)."""
    g = gc.Graph("plateau_max")
    x = g.input("x", (None, 4))
    y = g.input("y", (None, 4))
    g.output(g.add(g.sum(g.max(x, y)), g.sum(g.relu(x)), name="s"))
    gg = gc.grad(g, wrt=["x", "y"], loss="s")
    v = np.array([[0, 1, -1, 2]], np.float32)
    want = {"grad/x": np.array([[0, 1, 0, 1]], np.float32), "grad/y": np.ones((1, 4), np.float32)}
    return gg, {"x": v, "y": v.copy()}, want


def assert_exact(got, ref, what):
    """got == ref elementwise (same shape), with the first differing positions in the message."""
    got, ref = np.asarray(got), np.asarray(ref)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    bad = np.argwhere(got != ref)
    assert not len(bad), (f"{what}: {len(bad)} of {ref.size} differ; first at {tuple(bad[0])}: "
                          f"{got[tuple(bad[0])]} != {ref[tuple(bad[0])]} (reference)")
