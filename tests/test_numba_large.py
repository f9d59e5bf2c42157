"""The numba backend on data the small differential tests never produce: arrays past PARALLEL_MIN
(2**20 elements), where elementwise, reduction and pooling kernels switch to their parallel variants
(the variants a real training batch runs: mnist_convnet's first conv output at batch 128 has 2.8M
elements), and logits large enough to overflow exp() in float32 without softmax's max shift.

Integer-valued data again (tests/tie_graphs.py): sums are exact, so the parallel kernels must equal
the reference exactly whatever order their threads add in.
"""
import numpy as np
import pytest

import graphc as gc
from tie_graphs import assert_exact, int_feeds, with_linear_loss

BIG = (1024, 1025)            # one image: 1,049,600 elements >= 2**20


@pytest.fixture(scope="module")
def parallel_case():
    g = gc.Graph("parallel")
    x = g.input("x", (None, *BIG))
    im = g.input("im", (None, 4, 512, 512))                # 2**20 elements: parallel pool kernels
    b = g.param("b", value=np.arange(BIG[1]) % 5 - 2.0)
    outs = [g.add(g.mul(g.relu(x), g.scalar(2.0)), g.scalar(1.0), name="chain").name,   # one flat loop
            g.add(x, b, name="bias").name,                                                  # two loop dims
            g.sum(x, axes=(1,), name="colsum").name, g.mean(x, axes=(2,), name="rowmean").name,
            g.maxpool(im, 2, 2, name="pool").name]
    gg = with_linear_loss(g, outs, ["x", "im", "b"])
    feeds = int_feeds(g, n=1)
    feeds["im"][0, :, :8, :8] = 1                          # plateaus: first max wins in parallel too
    ref = gc.compile(gg).run(feeds)
    got = gc.compile(gg, backend="numba").run(feeds)
    return ref, got


def test_parallel_kernel_variants_match_reference_exactly(parallel_case):
    """Above PARALLEL_MIN elements: the fused elementwise chain (flat chunked loop and a broadcast
    bias), sums and means (sum4_par), max pool and its route, and their gradients."""
    ref, got = parallel_case
    for k in ref:
        if k == "rowmean":         # a mean divides by 1025: not exact, one rounding
            np.testing.assert_allclose(got[k], ref[k], rtol=1e-6, err_msg=k)
        else:
            assert_exact(got[k], ref[k], k)


@pytest.mark.parametrize("fuse", [True, False])
def test_softmax_and_cross_entropy_of_large_logits_match_reference(fuse):
    """Logits of +-200: exp() overflows float32 (max ~88.7) unless the row max is subtracted first."""
    g = gc.Graph("large_logits")
    z = g.input("z", (None, 5))
    lab = g.input("lab", (None,), "int64")
    p = g.softmax(z, axis=1, name="p")
    loss = g.add(g.softmax_cross_entropy(z, lab), g.sum(g.mul(p, g.const(np.arange(5.0)))), name="loss")
    g.output(p, loss)
    gg = gc.grad(g, wrt=["z"], loss="loss")
    gg.output("p", "loss")
    rng = np.random.default_rng(0)
    feeds = {"z": (rng.standard_normal((3, 5)) * 100 + 100).astype(np.float32), "lab": np.array([0, 3, 4])}
    ref = gc.compile(gg).run(feeds)
    got = gc.compile(gg, backend="numba", fuse=fuse).run(feeds)
    for k in ref:
        assert np.isfinite(ref[k]).all(), k
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-4, atol=1e-5, err_msg=k)
