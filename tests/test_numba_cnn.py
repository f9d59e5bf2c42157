"""The numba backend on the CNN op set, against the reference backend: every new op and attribute in one
network (forward in both modes, a training run's running statistics, three SGD steps in float64 and
float32), attribute-carrying elementwise ops generated (not run by the reference), batched matmul,
the fusion pass fusing grouped/dilated convs like plain ones, and one training step of the full-width
resnet18, mobilenet_v2 and googlenet at 64x64, batch 2.

Ops without numba kernels yet run the op table's reference on the host (the numba backend's fallback);
FALLBACK_OPS is that list, and the test fails if something else falls back or one of them gets a
kernel (then the list, the backend's docstring and the report move on together)."""
import numpy as np
import pytest

import graphc as gc
from graphc import models

FALLBACK_OPS = set()      # every op of the CNN set has numba kernels


@pytest.fixture(scope="module", autouse=True)
def _im2col_convs():
    mp = pytest.MonkeyPatch()
    mp.setenv("GRAPHC_CONV_STRATEGY", "im2col")        # one conv kernel set for every shape (compile time)
    yield
    mp.undo()


def every_new_op(dtype):
    rng = np.random.default_rng(0)
    g = gc.Graph("cnn_ops", dtype=dtype)
    x = g.input("x", (None, 4, 9, 9))
    h = g.conv(x, g.param("w", value=rng.normal(size=(8, 2, 3, 3)) * 0.3), pad=2, dilation=2, groups=2, name="c")
    h = g.batchnorm(h, g.param("bn.g", value=rng.uniform(0.5, 1.5, 8)), g.param("bn.b", value=rng.normal(size=8)),
                    g.param("bn.rm", value=rng.normal(size=8) * 0.1, trainable=False),
                    g.param("bn.rv", value=rng.uniform(0.5, 2, 8), trainable=False), name="bn")
    h = g.lrn(g.leaky_relu(h, 0.1), 3, 0.1, 0.75, 2.0)
    h = g.prelu(h, g.param("pr", value=np.full(8, 0.25)))
    h = g.clip(g.maxpool(h, 3, 2, pad=1, ceil_mode=True), -1.5, 2.0)
    h = g.pad2d(h, (1, 0, 2, 1), mode="reflect")
    h = g.conv(h, g.param("dw", value=rng.normal(size=(8, 1, 3, 3)) * 0.3), groups=8, pad=1, name="dwc")
    h = g.avgpool(h, 2, 2, pad=1, ceil_mode=True, count_include_pad=False)
    h = g.hardswish(g.silu(g.pad2d(h, 1, mode="edge")))
    z = g.concat([g.global_maxpool(h), g.global_avgpool(h)], axis=1)
    z = g.reshape(g.matmul(g.reshape(z, (z.shape[0], 2, 8)), g.param("mm", value=rng.normal(size=(8, 3)))),
                  (z.shape[0], 6))                                                   # batched matmul
    logits = g.dense(z, g.param("fc", value=rng.normal(size=(3, 6))), name="logits")
    return gc.nn.finish(g, logits)


FEEDS = {"x": np.random.default_rng(1).normal(size=(3, 4, 9, 9)), "labels": np.array([0, 2, 1])}


def fallback_kinds(exe):
    nodes = exe.graph.nx.nodes
    kinds = set()
    for b in exe._bindings.values():
        for n, f in b.steps:
            if getattr(f, "fallback", False):
                d = nodes[n]
                a = d["attrs"]
                if d["op"] in ("conv", "conv_dx", "conv_dw"):
                    kinds.add(f"{d['op']}:grouped/dilated" if not gc.ops.conv.is_plain(a) else d["op"])
                elif d["op"] in ("pad2d", "crop2d"):
                    kinds.add(f"{d['op']}:reflect/edge" if a.get("mode", "constant") != "constant" else d["op"])
                else:
                    kinds.add(d["op"])
    return kinds


@pytest.fixture(scope="module", params=["float64", "float32"])
def both(request):
    """{backend: (losses of 3 SGD steps, state after them, inference loss, training-run loss, running
    mean after the training run, fallback kinds)} for the network above."""
    dt = request.param
    g = every_new_op(dt)
    out = {}
    for be in ("reference", "numba"):
        tr = gc.compile(g, backend=be, optimizer=gc.optim.SGD(0.1, momentum=0.9))
        losses = [tr.step(FEEDS) for _ in range(3)]
        inf = gc.compile(g, backend=be)
        r_inf, r_train = inf.run(FEEDS)["loss"], inf.run(FEEDS, training=True)["loss"]
        out[be] = (losses, tr.state_dict(), r_inf, r_train, inf.state["bn.rm"].copy(),
                   fallback_kinds(tr) | fallback_kinds(inf) if be == "numba" else None)
    return dt, out


def test_every_new_op_matches_the_reference(both):
    dt, out = both
    tol = dict(rtol=1e-10, atol=1e-12) if dt == "float64" else dict(rtol=2e-4, atol=2e-5)
    (l_ref, s_ref, i_ref, t_ref, rm_ref, _), (l_nb, s_nb, i_nb, t_nb, rm_nb, _) = out["reference"], out["numba"]
    np.testing.assert_allclose(l_nb, l_ref, **tol)
    for k in s_ref:                     # parameters, momentum buffers and the running statistics
        np.testing.assert_allclose(s_nb[k], s_ref[k], err_msg=k, **tol)
    np.testing.assert_allclose([i_nb, t_nb], [i_ref, t_ref], **tol)
    np.testing.assert_allclose(rm_nb, rm_ref, **tol)
    assert not np.allclose(s_ref["bn.rm"], every_new_op(dt).params["bn.rm"])    # the steps moved them


def test_what_falls_back_is_exactly_the_documented_list(both):
    got = both[1]["numba"][5]
    assert got == FALLBACK_OPS, f"new fallbacks: {got - FALLBACK_OPS}, new kernels: {FALLBACK_OPS - got}"


def test_attribute_elementwise_ops_are_generated_and_fused():
    g = gc.Graph("act")
    x = g.input("x", (None, 5))
    y = g.hardswish(g.clip(g.leaky_relu(x, 0.125), -0.75, None), name="y")
    g.output(g.silu(y))
    exe = gc.compile(g, backend="numba")
    f = {"x": np.linspace(-6, 6, 15, dtype=np.float32).reshape(3, 5)}
    np.testing.assert_allclose(exe.run(f)[g.outputs[0]], gc.compile(g).run(f)[g.outputs[0]], rtol=1e-6, atol=1e-7)
    (n, step), = [(n, s) for b in exe._bindings.values() for n, s in b.steps]   # one kernel for the chain
    assert "_T(0.125)" in step.source and "_T(0.75)" in step.source and "math.inf" in step.source   # the attrs


@pytest.mark.parametrize("ta, tb", [(False, False), (True, True)])
def test_batched_matmul(ta, tb):
    rng = np.random.default_rng(2)
    g = gc.Graph("bmm", dtype="float64")
    a = g.input("a", (None, 3, 4, 5) if not ta else (None, 3, 5, 4))
    b = g.param("b", value=rng.normal(size=(3, 5, 2) if not tb else (3, 2, 5)))
    g.output(g.sum(g.mul(g.matmul(a, b, trans_a=ta, trans_b=tb), g.const(rng.normal(size=(3, 4, 2)))), name="l"))
    gg = gc.grad(g, wrt=["a", "b"], loss="l")
    f = {"a": rng.normal(size=(2,) + tuple(a.shape[1:]))}
    ref, got = gc.compile(gg).run(f), gc.compile(gg, backend="numba").run(f)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-12, atol=1e-12)


def test_fusion_takes_grouped_and_dilated_convs_too():
    from graphc.passes.fuse import fuse
    for kw in (dict(), dict(groups=2), dict(dilation=2), dict(groups=2, dilation=3)):
        g = gc.Graph("f")
        x = g.input("x", (None, 2, 8, 8))
        c = g.conv(x, g.param("w", (4, 2 // kw.get("groups", 1), 3, 3)), pad=2, **kw)
        g.output(g.maxpool(g.relu(c), 2))
        patterns = {d["attrs"]["pattern"] for _, d in fuse(g).nx.nodes(data=True) if d["op"] == "fused"}
        assert "conv_relu_maxpool" in patterns, kw


def test_full_width_models_train_a_step_as_the_reference():
    """resnet18, mobilenet_v2 and googlenet at 64x64, batch 2, float64: one SGD step on numba (depthwise
    convs on their stencils) gives the reference's loss and every new
    parameter, momentum buffer and running statistic (float32 differs by rounding amplified through
    batch norm over tiny batches, so the comparison is in float64)."""
    rng = np.random.default_rng(3)
    feeds = {"x": rng.normal(size=(2, 3, 64, 64)), "labels": np.array([1, 7])}
    for name in ("resnet18", "mobilenet_v2", "googlenet"):
        g = models.load(name, num_classes=10, image_size=64, dtype="float64")
        runs = {}
        for be in ("reference", "numba"):
            opts = {"threads": 1} if be == "numba" else {}          # (skips the thread-count timing runs)
            exe = gc.compile(g, backend=be, optimizer=gc.optim.SGD(0.01, momentum=0.9), **opts)
            runs[be] = (exe.step(feeds), exe.state_dict())
        (l_ref, s_ref), (l_nb, s_nb) = runs["reference"], runs["numba"]
        assert l_nb == pytest.approx(l_ref, rel=1e-9), name
        for k in s_ref:
            np.testing.assert_allclose(s_nb[k], s_ref[k], rtol=1e-7, atol=1e-9 * max(1.0, np.abs(s_ref[k]).max()),
                                       err_msg=f"{name}: {k}")
