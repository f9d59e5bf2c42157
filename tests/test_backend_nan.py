"""The numba backend's half of the hardening (issue 11): NaN/inf semantics of every kernel family against
the reference (graphs and feeds: tests/nan_graphs.py; the same cases run in the CUDA simulator in
tests/test_cuda_backend.py), the class-loss kernels' own label-range guard (labels computed inside the
graph, which the feed check cannot see), and routes (only graphc computes them; the kernels write
through them).
"""
import numpy as np
import pytest

import graphc as gc
from graphc.errors import FeedError
from nan_graphs import (LOSSES, cnn, cnn_feeds, compare, elementwise, elementwise_feeds, feeds_for, loss_feeds,
                        loss_graph, pool_feeds, pools)

pytest.importorskip("numba")
FUSE = [pytest.param(True, id="fused"), pytest.param(False, id="unfused")]


def _pair(g, **kw):
    return gc.compile(g, **kw), gc.compile(g, backend="numba", **kw)


def _run(exe, feeds):
    with np.errstate(all="ignore"):
        return exe.run(feeds)


# ------------------------------------------------------------------------------------ NaN and inf

@pytest.mark.parametrize("which", LOSSES)
def test_losses_and_their_gradients_put_nan_and_inf_where_the_reference_does(which):
    """Saturated softmaxes (#8: cross_entropy(softmax(z))'s gradient divided by a zero probability and
    raised ZeroDivisionError), inf/NaN logits, |z| beyond 2**53, soft labels of inf, squares that
    overflow float32 but not the float64 mean."""
    g = loss_graph(which)
    ref, nb = _pair(g)
    for case, feeds in loss_feeds().items():
        f = feeds_for(g, feeds)
        compare(_run(nb, f), _run(ref, f), f"{which} {case}")


def test_elementwise_chains_keep_float32_semantics():
    """No log(exp(x)) -> x or sqrt(exp(x)) -> exp(x / 2) (fastmath reassoc), no x * (1 / y) (arcp), -0.0
    kept (nsz): the generated elementwise kernels use no fastmath flag."""
    ref, nb = _pair(elementwise())
    feeds = elementwise_feeds()
    got, want = _run(nb, feeds), _run(ref, feeds)
    compare(got, want, "elementwise")
    assert np.isposinf(got["logexp"][1]) and np.isposinf(got["sqrtexp"][1])     # exp(100) overflows float32
    assert np.isneginf(got["inv_neg"][10]) and np.isposinf(got["inv_neg"][9])     # 1 / -(+0.0), 1 / -(-0.0)


@pytest.mark.parametrize("fuse", FUSE)
def test_pools_and_their_gradient_follow_numpy_nan_rules(fuse):
    """Max pools (overlapping or not) are NaN where a window holds NaN, and their gradient goes to the
    window's first NaN (np.argmax), not to its largest number."""
    ref, nb = _pair(pools(), fuse=fuse)
    compare(_run(nb, pool_feeds()), _run(ref, pool_feeds()), "pools")


@pytest.fixture(scope="module", params=FUSE)
def cnn_pair(request):
    g = cnn()
    sgd = gc.optim.SGD(0.1)
    return (gc.compile(g), gc.compile(g, backend="numba", fuse=request.param),
            gc.compile(g, optimizer=sgd), gc.compile(g, backend="numba", optimizer=sgd, fuse=request.param))


def test_conv_relu_pool_forward_and_training_step_follow_numpy_nan_rules(cnn_pair):
    """The fused conv -> ReLU -> max pool (a NaN beside a larger number in a window: NaN) and its saved
    route (a masked window routes dy * 0 to the ReLU output's first max: NaN where dy is not finite,
    as the unfused maxpool_route * gt), forward and one SGD step: every parameter NaN exactly where the
    reference's is."""
    ref, nb, rt, nt = cnn_pair
    init = rt.state_dict()
    for case, feeds in cnn_feeds().items():
        compare(_run(nb, feeds), _run(ref, feeds), f"forward {case}")
        rt.load_state_dict(init)
        nt.load_state_dict(init)
        with np.errstate(all="ignore"):
            losses = {"loss": np.float32(rt.step(feeds))}, {"loss": np.float32(nt.step(feeds))}
        compare({**losses[1], **nt.params}, {**losses[0], **rt.params}, f"step {case}")


def test_fused_conv_pool_kernels_nan_windows_and_masked_routes():
    """Both conv strategies' pool epilogues, by hand (1x1 identity conv: the conv output is the input):
    NaN first, NaN after a larger number, all <= 0, all zero; the route and the scatter of an inf dy."""
    from graphc.backends.numba import conv as nconv
    from graphc.ops.fused import maxpool_argmax_ref, route_scatter_ref
    from graphc.ops.pool import windows
    x = np.array([[[[np.nan, 5, -1, -2], [1, 2, -3, -1], [0, 0, 1, np.nan], [0, 0, 7, 2]]]], np.float32)
    w, b = np.ones((1, 1, 1, 1), np.float32), np.zeros(1, np.float32)
    relu = np.maximum(x, 0)
    want_y, want_route = windows(relu, (2, 2), (2, 2)).max(-1), maxpool_argmax_ref(relu, (2, 2), (2, 2), True)
    assert want_route.tolist() == [[[[~0, ~2], [~8, ~11]]]]             # NaN windows: their first NaN
    dy = np.array([[[[np.inf, 1], [np.inf, 2]]]], np.float32)
    want_dx = route_scatter_ref(dy, want_route, (4, 4))
    assert np.isnan(want_dx[0, 0, 0, 0]) and np.isnan(want_dx[0, 0, 2, 0]) and want_dx[0, 0, 0, 2] == 0
    for strategy in ("direct", "im2col"):
        y, route = nconv.conv2d_relu_maxpool(x, w, b, 1, (0, 0, 0, 0), 2, 2, save_route=True, strategy=strategy)
        compare({"y": y, "route": route}, {"y": want_y, "route": want_route}, strategy)
    g = gc.Graph("scatter")
    xi, dyi = g.input("x", (None, 1, 4, 4)), g.input("dy", (None, 1, 2, 2))
    r = g.add_node("maxpool_argmax", (g.relu(xi),), {"size": (2, 2), "stride": (2, 2), "relu": True})
    g.output(g.add_node("route_scatter", (dyi, r), {"in_hw": (4, 4), "size": (2, 2), "stride": (2, 2)}, name="fast"),
             g.add_node("route_scatter", (dyi, r), {"in_hw": (4, 4)}, name="generic"))
    out = gc.compile(g, backend="numba").run({"x": x, "dy": dy})
    compare(out, {"fast": want_dx, "generic": want_dx}, "route_scatter")


# --------------------------------------------------------------------------------- label guards

def _computed_labels(loss, how):
    """Labels the feed check cannot see: a concat of fed labels with const ones, or a reshape of a fed
    2-D int array."""
    g = gc.Graph(f"computed_{loss}_{how}")
    z = g.input("z", (4, 3))
    if how == "concat":
        lab = g.concat([g.input("y", (2,), dtype="int64"), g.const(np.array([5, 1]))], axis=0, name="lab")
    else:
        lab = g.reshape(g.input("y", (2, 2), dtype="int64"), (4,), name="lab")
    zw = g.mul(z, g.param("w", value=np.ones(3)))
    scores = zw if loss == "sce" else g.softmax(zw, axis=1)
    g.output((g.softmax_cross_entropy if loss == "sce" else g.cross_entropy)(scores, lab, name="L"))
    return g


@pytest.mark.parametrize("how, y, bad", [("concat", [0, 2], "label 5 at position 2"),
                                         ("reshape", [[0, 1], [2, 10**9]], "label 1000000000 at position 3")])
@pytest.mark.parametrize("loss", ["sce", "ce"])
def test_labels_computed_in_the_graph_are_refused_by_the_loss_kernels(loss, how, y, bad):
    """The class-loss kernels check every label before indexing with it (numba: the kernel returns the
    first bad row; the reference ops check too): a FeedError naming the label, its position and the
    range, for the loss and for a training step (whose gradient kernel refuses before any update)."""
    g = _computed_labels(loss, how)
    assert gc.compile(g).labels == {}                                 # no feed check covers these labels
    feeds = {"z": np.zeros((4, 3), np.float32), "y": np.array(y)}
    for backend in ("reference", "numba"):
        with pytest.raises(FeedError, match=bad + r" is outside 0\.\.2") as e:
            gc.compile(g, backend=backend).run(feeds)
        assert "\n" not in str(e.value)
        trainer = gc.compile(g, backend=backend, optimizer=gc.optim.SGD(0.5))
        with pytest.raises(FeedError, match=bad):
            trainer.step(feeds)
        assert np.array_equal(trainer.params["w"], np.ones(3, np.float32)), backend     # no update happened


@pytest.mark.parametrize("loss", ["sce", "ce"])
def test_in_range_computed_labels_run_as_the_reference(loss):
    g = gc.Graph(f"ok_{loss}")
    z, y = g.input("z", (4, 3)), g.input("y", (2, 2), dtype="int32")
    lab = g.reshape(y, (4,))
    scores = z if loss == "sce" else g.softmax(z, axis=1)
    g.output((g.softmax_cross_entropy if loss == "sce" else g.cross_entropy)(scores, lab, name="L"))
    gg = gc.grad(g, wrt=["z"], loss="L")
    gg.output("L")
    feeds = {"z": np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32),
             "y": np.array([[0, 1], [2, 1]], np.int32)}
    compare(gc.compile(gg, backend="numba").run(feeds), gc.compile(gg).run(feeds), loss)


def test_loss_kernels_report_the_first_bad_row_and_never_index_with_it():
    """The kernels themselves, with labels far outside (an unchecked index would read or write outside
    the row: 10**9, -2**40): they return the first bad row and leave out, the gradient rows, finite."""
    from graphc.backends.numba.kernels import loss as k
    z = np.zeros((3, 4), np.float32)
    labels = np.array([1, 10**9, -(2**40)])
    out, g = np.zeros(1, np.float32), np.zeros((3, 4), np.float32)
    dy = np.ones(1, np.float32)
    for fn, args in ((k.sce_int_k, (out,)), (k.ce_int_k, (out,)), (k.sce_grad_int_k, (dy, g)),
                     (k.ce_grad_int_k, (dy, g))):
        assert fn(z + 0.25, labels, *args) == 1, fn
        assert np.isfinite(out).all() and np.isfinite(g).all(), fn
        assert fn(z[:1] + 0.25, labels[:1], *args[:-1], args[-1][:1]) == -1, fn


# ---------------------------------------------------------------------------------------- routes

def test_only_graphc_computed_routes_can_be_scattered():
    """route_scatter writes dy at the indices its route holds: a route must be a maxpool_argmax (or a
    fused group's saved one) of matching shape, never an input, a const or another int value."""
    g = gc.Graph("routes")
    dy = g.input("dy", (None, 1, 2, 2))
    x = g.input("x", (None, 1, 4, 4))
    bad = [g.input("r", (None, 1, 2, 2), dtype="int32"), g.const(np.full((1, 1, 2, 2), 10**6, np.int32)),
           g.add_node("maxpool_argmax", (x,), {"size": (2, 2), "stride": (1, 1)})]       # 3x3: not dy's shape
    for r in bad:
        with pytest.raises(gc.GraphError, match="route must be a maxpool_argmax") as e:
            g.add_node("route_scatter", (dy, r), {"in_hw": (4, 4)})
        assert "\n" not in str(e.value)
    ok = g.add_node("maxpool_argmax", (x,), {"size": (2, 2), "stride": (2, 2)})
    assert g.add_node("route_scatter", (dy, ok), {"in_hw": (4, 4)}).shape == ("N", 1, 4, 4)
