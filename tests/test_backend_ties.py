"""Ties, exact zeros and plateaus on the numba backend, compared EXACTLY (==) with the reference backend:
max pool (unfused, overlapping windows), its backward route, the saved-route ops, ReLU and max, and the
fused conv -> ReLU -> max pool (forward route saved for the backward), under both conv strategies, fusion
on and off, forward values and gradients. The graphs and why exact comparison is right are in
tests/tie_graphs.py; the same graphs run in the CUDA simulator in tests/test_cuda_backend.py.

Random normal data (the other backend tests) never ties, so a kernel that sends a tie to the last
maximum instead of the first passes them all; these tests are the ones that catch it.
"""
import numpy as np
import pytest

import graphc as gc
from tie_graphs import (assert_exact, conv_pool_ties, plateau_max, plateau_pool, plateau_route, pool_ties,
                        relu_max_ties, route_ties)

FUSE = [pytest.param(True, id="fused"), pytest.param(False, id="unfused")]


def _runs(build, fuse):
    """(numba executable, its outputs, the reference's outputs) for build() -> (graph, feeds)."""
    g, feeds = build()
    ref = gc.compile(g).run(feeds)
    exe = gc.compile(g, backend="numba", fuse=fuse)
    return exe, exe.run(feeds), ref


def _check(got, ref, names, what):
    assert set(names) <= set(ref), sorted(ref)
    for k in names:
        assert_exact(got[k], ref[k], f"{what}: {k}")


# ------------------------------------------------------------------------------------------ max pool

@pytest.fixture(scope="module", params=FUSE)
def pools(request):
    return _runs(pool_ties, request.param)


def test_maxpool_forward_on_ties_and_zero_windows_exact(pools):
    _, got, ref = pools
    _check(got, ref, ["mp_3s2", "mp_2s1", "mp_2s2", "mp_relu_2s1", "the_loss"], "max pool forward")


def test_maxpool_backward_ties_go_to_first_max(pools):
    """The unfused max-pool backward (maxpool_route) on windows that tie: the gradient lands on each
    window's first maximum in row-major order, as the reference's argmax; overlapping windows add up."""
    _, got, ref = pools
    _check(got, ref, ["grad/x"], "max-pool gradient")


@pytest.mark.parametrize("fuse", FUSE)
def test_plateau_maxpool_gradient_goes_to_each_windows_top_left(fuse):
    g, feeds, want = plateau_pool()
    for backend in ("reference", "numba"):
        out = gc.compile(g, backend=backend, fuse=fuse).run(feeds)
        for k, v in want.items():
            assert_exact(out[k], v, f"{backend}: {k}")


# ------------------------------------------------------------------------------------- ReLU and max

@pytest.mark.parametrize("fuse", FUSE)
def test_relu_and_max_ties_forward_and_grads_exact(fuse):
    """ReLU's gradient is 0 at exactly 0; max(x, y) sends a tie's gradient to its second input."""
    _, got, ref = _runs(relu_max_ties, fuse)
    _check(got, ref, ["relu", "max_xy", "max_x0", "grad/x", "grad/y", "the_loss"], "relu/max")
    g, feeds, want = plateau_max()
    out = gc.compile(g, backend="numba", fuse=fuse).run(feeds)
    for k, v in want.items():
        assert_exact(out[k], v, f"plateau max: {k}")


# ------------------------------------------------------------------------------------- saved route

@pytest.fixture(scope="module")
def routes():
    return _runs(route_ties, False)


def test_maxpool_argmax_route_ties_go_to_first_max(routes):
    """maxpool_argmax (the saved route): the flat index of each window's FIRST maximum on plateaus;
    with relu=True, -1 for windows whose maximum is exactly 0 after a ReLU."""
    _, got, ref = routes
    _check(got, ref, ["route_relu_2s2", "route_relu_3s2", "route_x_2s2", "route_x_3s2"], "route")
    g, feeds, want = plateau_route()
    out = gc.compile(g, backend="numba").run(feeds)
    for k, v in want.items():
        assert_exact(out[k], v, f"plateau route: {k}")


def test_route_scatter_gather_and_maxpool_route_on_ties_exact(routes):
    _, got, ref = routes
    _check(got, ref, ["scatter_relu_2s2", "scatter_x_2s2", "scatter_relu_3s2", "scatter_x_3s2",
                      "maxpool_route_3s2", "gather_3s2", "gather_relu_2s2"], "route ops")


# -------------------------------------------------------------------------- fused conv -> ReLU -> pool

@pytest.fixture(scope="module", params=["direct", "im2col"])
def conv_pools(request):
    """{fuse: (executable, outputs, reference outputs)} under one conv strategy (the strategy is picked
    at the first run, so the variable is set around it)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("GRAPHC_CONV_STRATEGY", request.param)
    try:
        return {fz: _runs(conv_pool_ties, fz) for fz in (True, False)}
    finally:
        mp.undo()


def _fused_patterns(exe):
    g = exe.graph
    return [g.nx.nodes[n]["attrs"] for n in g.nx if g.nx.nodes[n]["op"] == "fused"]


def test_fused_conv_relu_maxpool_saves_first_max_route_on_ties(conv_pools):
    """Fused: each branch is one conv_relu_maxpool kernel saving its route, the backward one route_relu
    pass. Plateaus of 1 (ties), of 0 (route -1) and negative windows: values and gradients (x, weights,
    biases) equal the reference's exactly, so the saved route picks the first maximum."""
    exe, got, ref = conv_pools[True]
    fused = _fused_patterns(exe)
    saving = [a for a in fused if a["pattern"] == "conv_relu_maxpool" and a.get("saves") == ("route",)]
    assert len(saving) == 4 and sum(a["pattern"] == "route_relu" for a in fused) == 4, fused
    _check(got, ref, sorted(ref), "fused conv-relu-pool")


def test_unfused_conv_relu_maxpool_on_ties_exact(conv_pools):
    exe, got, ref = conv_pools[False]
    assert not _fused_patterns(exe)
    _check(got, ref, sorted(ref), "unfused conv-relu-pool")
