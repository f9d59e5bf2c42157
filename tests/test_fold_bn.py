"""passes/fold_bn.py: inference conv -> batchnorm folded into the conv (weights and bias computed from the
current parameters), on the numba backend against the reference: what folds and what does not, the
fused kernels it enables, parameter and state changes after compiling, a training executable's state
loaded into an inference one, training-mode runs (an unfolded twin sharing the state), and the switch."""
import numpy as np
import pytest

import graphc as gc
from graphc.passes.fold_bn import fold_bn

F64 = dict(rtol=1e-10, atol=1e-12)


def bn(g, h, name, rng):
    c = h.shape[1]
    return g.batchnorm(h, g.param(f"{name}.g", value=rng.uniform(0.5, 1.5, c)),
                       g.param(f"{name}.b", value=rng.normal(size=c)),
                       g.param(f"{name}.rm", value=rng.normal(size=c) * 0.3, trainable=False),
                       g.param(f"{name}.rv", value=rng.uniform(0.5, 2.0, c), trainable=False), name=name)


def net(dtype="float64"):
    """conv+bias -> BN -> ReLU -> max pool; depthwise conv -> BN -> ReLU6; a conv whose output is also read
    elsewhere -> BN (not folded); BN of a dense layer (not folded)."""
    rng = np.random.default_rng(0)
    g = gc.Graph("fold", dtype=dtype)
    x = g.input("x", (None, 3, 8, 8))
    h = g.conv(x, g.param("c1.w", value=rng.normal(size=(4, 3, 3, 3)) * 0.3),
               g.param("c1.b", value=rng.normal(size=4)), pad=1, name="c1")
    h = g.maxpool(g.relu(bn(g, h, "bn1", rng)), 2)
    h = g.conv(h, g.param("dw.w", value=rng.normal(size=(4, 1, 3, 3)) * 0.3), pad=1, groups=4, name="dw")
    h = g.clip(bn(g, h, "bn2", rng), 0.0, 6.0)
    c3 = g.conv(h, g.param("c3.w", value=rng.normal(size=(4, 4, 1, 1)) * 0.3), name="c3")
    h = g.add(bn(g, c3, "bn3", rng), c3)
    z = bn(g, g.dense(g.flatten(g.global_avgpool(h)), g.param("fc.w", value=rng.normal(size=(5, 4)))), "bn4", rng)
    g.output(g.softmax_cross_entropy(z, g.input("y", (None,), dtype="int64"), name="loss"))
    return g


FEEDS = {"x": np.random.default_rng(1).normal(size=(3, 3, 8, 8)), "y": np.array([0, 4, 2])}


@pytest.fixture(scope="module")
def pair():
    g = net()
    return g, gc.compile(g), gc.compile(g, backend="numba", threads=1)


def _same(exe, ref, what):
    np.testing.assert_allclose(exe.run(FEEDS)["loss"], ref.run(FEEDS)["loss"], err_msg=what, **F64)


def test_what_folds_and_what_it_fuses(pair):
    g, ref, exe = pair
    assert exe.folded_bn() == ("bn1", "bn2")
    nodes = exe.graph.nx.nodes
    assert not {"bn1", "bn2"} & {n for n in nodes if nodes[n]["op"] == "batchnorm"}
    assert {"bn3", "bn4"} <= {n for n in nodes if nodes[n]["op"] == "batchnorm"}
    assert "c1" not in nodes and "update/bn1.rm" not in nodes     # the conv and its BN's updates are gone
    assert exe.graph.stat_updates.keys() == {"bn3.rm", "bn3.rv", "bn4.rm", "bn4.rv"}
    kinds = {nodes[n]["attrs"]["pattern"] for n in nodes if nodes[n]["op"] == "fused"}
    assert "conv_relu_maxpool" in kinds                     # conv(+BN)+ReLU+pool: one kernel
    _same(exe, ref, "inference")


def test_parameter_changes_reach_the_folded_conv(pair):
    g, ref, exe = pair
    for e in (exe, ref):
        e.state["bn1.rv"][...] = np.linspace(0.3, 3.0, 4)
        e.state["c1.w"][0] *= -2.0
        e.state["bn2.g"] = np.array([0.1, 2.0, -1.0, 0.5])         # replaced, not edited in place
    _same(exe, ref, "after state edits")
    tr = gc.compile(g, optimizer=gc.optim.SGD(0.05, momentum=0.9))  # a training executable's state
    for _ in range(2):
        tr.step(FEEDS)
    d = tr.state_dict()
    for e in (exe, ref):
        e.load_state_dict({k: v for k, v in d.items() if not k.startswith("optim/")})
    _same(exe, ref, "after load_state_dict")


def test_folded_weights_are_computed_when_the_state_changed(pair):
    g, ref, exe = pair
    _same(exe, ref, "")
    b = exe._last_binding[3]
    prologue = {n for n, _ in b.prologue}
    assert prologue and not prologue & {n for n, _ in b.steps}       # not part of every run
    assert {"c1.w", "bn1.rv", "bn2.g"} <= b.prologue_state
    gen = b.prologue_gen
    exe.run(FEEDS)
    assert b.prologue_gen == gen                                     # nothing changed: not recomputed
    w, rv = exe.state["c1.w"], ref.state["c1.w"]                     # held, edited in place between runs
    for k in range(2):
        w[1] += 0.5
        rv[1] += 0.5
        _same(exe, ref, f"held array edited, run {k}")
    del w
    exe.state["bn1.b"][2] = 3.0                                      # edited through a temporary view
    ref.state["bn1.b"][2] = 3.0
    _same(exe, ref, "temporary view")


def test_training_mode_runs_use_batch_statistics(pair):
    g, ref, exe = pair
    for _ in range(2):
        np.testing.assert_allclose(exe.run(FEEDS, training=True)["loss"], ref.run(FEEDS, training=True)["loss"], **F64)
    for k in ("bn1.rm", "bn1.rv", "bn2.rm", "bn4.rv"):
        np.testing.assert_allclose(exe.state[k], ref.state[k], err_msg=k, **F64)
    assert not np.allclose(ref.state["bn1.rm"], g.params["bn1.rm"])      # the runs moved them
    _same(exe, ref, "inference after training runs (the new running statistics)")


def test_switch_and_training_graphs():
    g = net()
    assert gc.compile(g, backend="numba", fold_bn=False).folded_bn() == ()
    assert gc.compile(g, backend="numba", optimizer=gc.optim.SGD(0.1), fuse=False).folded_bn() == ()
    assert fold_bn(gc.grad(g)).nx.number_of_nodes() == gc.grad(g).nx.number_of_nodes()   # BN inputs read by grads
    assert "fold_bn" in gc.compile(g, backend="numba").pipeline.enabled
    assert "fold_bn" not in gc.compile(g).pipeline.enabled


def test_float32_folding_matches_the_unfolded_graph():
    g = net("float32")
    f = {"x": FEEDS["x"].astype(np.float32), "y": FEEDS["y"]}
    a = gc.compile(g, backend="numba", threads=1).run(f)["loss"]
    b = gc.compile(g, backend="numba", threads=1, fold_bn=False).run(f)["loss"]
    np.testing.assert_allclose(a, b, rtol=2e-5)
