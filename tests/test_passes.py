"""Every pass leaves the reference interpreter's outputs unchanged (forward and training graphs), keeps
protected names, and the fusion pass finds the patterns it promises."""
import numpy as np
import pytest

import graphc as gc
from graphc import models
from graphc.backends.reference import ReferenceExecutable
from graphc.passes.cse import cse
from graphc.passes.dce import dce
from graphc.passes.fold import fold_constants
from graphc.passes.fuse import fuse
from graphc.passes.memory import build_plan, plan_memory
from graphc.passes.schedule import schedule
from graphc.passes.simplify import simplify
from graphc.passes.transforms.training import training_graph

PASSES = [simplify, fold_constants, cse, dce, fuse, schedule, plan_memory]


def _feeds(g, n=3, seed=0):
    rng = np.random.default_rng(seed)
    f = {}
    for name in g.inputs:
        shape, dt = g.nx.nodes[name]["shape"], g.nx.nodes[name]["dtype"]
        s = tuple(n if isinstance(d, str) else d for d in shape)
        f[name] = rng.integers(0, 2, s) if dt.startswith("int") else rng.standard_normal(s).astype(dt)
    return f


def _want(g):
    return ([g.loss] + list(g.updates.values())) if g.updates else list(g.outputs)


def _run(g, feeds, want, dtype=None):
    exe = ReferenceExecutable(g, dtype=dtype)
    fd, env = exe.check_feeds(feeds)
    vals = exe._execute(fd, env, True, want)
    return {w: vals[w] for w in want}


def _check_chain(g, passes=PASSES, dtype="float64"):
    feeds = _feeds(g)
    want = _want(g)
    base = _run(g, feeds, want, dtype)
    h = g
    for p in passes:
        h = p(h)
        for w in want:
            assert w in h.nx, f"{p.__name__} removed protected value {w!r}"
        got = _run(h, feeds, want, dtype)
        for w in want:
            np.testing.assert_allclose(got[w], base[w], rtol=1e-10, atol=1e-12, err_msg=f"{p.__name__}: {w}")
    return h


def _graph(name, train, opt=None):
    g = models.load(name)
    return training_graph(g, opt or gc.optim.SGD(0.1, momentum=0.9)) if train else g


MODELS = ["seed_cnn", "mlp", "lenet5", "mnist_convnet", "resnet_block", "inception_block"]


@pytest.mark.parametrize("train", [False, True], ids=["infer", "train"])
@pytest.mark.parametrize("name", MODELS)
def test_passes_keep_reference_outputs(name, train):
    _check_chain(_graph(name, train))


def test_passes_with_adam_and_weight_decay():
    _check_chain(training_graph(models.lenet5(), gc.optim.Adam(1e-3)))
    _check_chain(training_graph(models.mlp(), gc.optim.SGD(0.1, weight_decay=1e-4)))


def _ops(g):
    return [g.nx.nodes[n]["op"] for n in g.nx]


def _patterns(g):
    return sorted(g.nx.nodes[n]["attrs"]["pattern"] for n in g.nx if g.nx.nodes[n]["op"] == "fused")


def test_simplify_rules():
    g = gc.Graph("s", dtype="float64")
    x = g.input("x", (None, 4), dtype="float64")
    a = g.mul(x, g.scalar(1.0))
    b = g.add(g.scalar(0.0), a)
    c = g.neg(g.neg(g.identity(g.copy(b))))
    d = g.reshape(g.reshape(c, (None, 2, 2)), (None, 4))
    e = g.transpose(g.transpose(g.reshape(d, (None, 2, 2)), (0, 2, 1)), (0, 2, 1))
    y = g.sub(e, g.scalar(0.0), name="y")
    g.output(y)
    h = _check_chain(g, [simplify, dce])
    assert set(_ops(h)) <= {"input", "reshape", "const"}, _ops(h)
    assert "y" in h.nx and h.outputs == ["y"]


def test_simplify_keeps_protected_names():
    g = gc.Graph("p", dtype="float64")
    x = g.input("x", (None, 3), dtype="float64")
    y = g.identity(g.exp(x), name="y")          # output: exp moves into the node named y
    z = g.mul(y, g.scalar(1.0), name="z")       # output reading another output: stays
    g.output(y, z)
    h = _check_chain(g, [simplify, dce])
    assert h.nx.nodes["y"]["op"] == "exp" and "z" in h.nx


def test_fold_and_cse():
    g = gc.Graph("f", dtype="float64")
    x = g.input("x", (None, 3), dtype="float64")
    k = g.exp(g.const(np.array([1.0, 2.0, 3.0])))          # folds
    a = g.mul(x, k)
    b = g.mul(k, x)                                         # same as a (commutative)
    g.output(g.add(a, b, name="out"))
    h = _check_chain(g, [fold_constants, cse, dce])
    assert _ops(h).count("mul") == 1 and "exp" not in _ops(h)


def test_fuse_patterns_lenet_training():
    h = _check_chain(_graph("lenet5", True, gc.optim.SGD(0.1)), [simplify, fold_constants, cse, dce, fuse])
    pats = _patterns(h)
    assert pats.count("conv_relu_maxpool") == 2 and pats.count("route_relu") == 2
    # the backward needs no full-resolution forward value: no maxpool_route, no relu/conv nodes left
    assert not {"maxpool_route", "relu", "conv", "maxpool"} & set(_ops(h))
    fwd = [n for n in h.nx if h.nx.nodes[n]["op"] == "fused"
           and h.nx.nodes[n]["attrs"]["pattern"] == "conv_relu_maxpool"]
    for f in fwd:
        body = h.nx.nodes[f]["attrs"]["body"]
        assert [b["op"] for b in body] == ["conv", "relu", "maxpool", "maxpool_argmax"]
        assert len(h.nx.nodes[f]["attrs"]["results"]) == 2
    # every update is one elementwise group
    for u in h.updates.values():
        assert h.nx.nodes[u]["op"] in ("fused", "getitem")


def test_fuse_inference_single_result_keeps_names():
    h = _check_chain(models.mnist_convnet(loss=False), [simplify, dce, fuse])
    assert _patterns(h) == ["conv_relu_maxpool", "conv_relu_maxpool", "dropout"]
    assert "pool1" in h.nx and h.nx.nodes["pool1"]["op"] == "fused"
    assert "getitem" not in _ops(h)


def test_fuse_conv_relu_when_relu_is_read_elsewhere():
    g = gc.Graph("cr", dtype="float64")
    x = g.input("x", (None, 2, 6, 6), dtype="float64")
    w = g.param("w", (3, 2, 3, 3))
    r = g.relu(g.conv(x, w, g.param("b", (3,), init="normal"), pad=1), name="r")
    p = g.maxpool(r, 2, name="p")
    g.output(p, g.sum(r, name="s"))             # r read by another node: pool cannot join
    h = _check_chain(g, [fuse])
    assert _patterns(h) == ["conv_relu"]


def test_fuse_elementwise_never_makes_cycles():
    g = gc.Graph("cyc", dtype="float64")
    x = g.input("x", (None, 4), dtype="float64")
    a = g.exp(x)
    m = g.matmul(a, g.param("w", (4, 4)))       # a -> matmul -> b: a and b must not fuse across it
    b = g.add(a, m)
    g.output(g.relu(b, name="out"))
    h = _check_chain(g, [fuse, schedule])
    h.topo()


def test_fuse_protects_outputs_inside_groups():
    g = gc.Graph("prot", dtype="float64")
    x = g.input("x", (None, 4), dtype="float64")
    a = g.exp(x, name="a")
    b = g.mul(a, g.scalar(2.0), name="b")
    g.output(g.add(b, x, name="c"), a)
    h = _check_chain(g, [fuse])
    assert "a" in h.nx and h.nx.nodes["a"]["op"] == "getitem"


def test_memory_plan_reuses_and_updates_in_place():
    g = plan_memory(schedule(fuse(dce(cse(fold_constants(simplify(_graph("lenet5", True, gc.optim.SGD(0.1)))))))))
    plan = g.memory_plan
    st = plan.stats({"N": 64})
    assert st["planned"] < st["unplanned"] and st["slots"] < st["values"]
    assert set(plan.inplace.values()) == set(g.param_names)
    # no two values live at the same time share a slot
    prog = plan.program
    _no_two_live_share_a_slot(plan, plan.slot_of)
    # a run that only wants the loss updates nothing in place
    run_plan = build_plan(g, [g.loss])
    assert not run_plan.inplace and len(run_plan.program) < len(prog)


def _no_two_live_share_a_slot(plan, slot_of):
    for a, sa in slot_of.items():
        for b, sb in slot_of.items():
            if a < b and sa == sb:
                la = plan.last_use.get(a, plan.def_idx[a])
                lb = plan.last_use.get(b, plan.def_idx[b])
                assert la < plan.def_idx[b] or lb < plan.def_idx[a], (a, b)


def test_memory_plan_takes_the_smaller_slot_assignment():
    """Largest-first and program-order greedy assignments both keep values live at the same time apart;
    the plan takes the smaller. In a ResNet block's training step largest-first wins (program order lets
    small early values take slots a large later one then cannot use)."""
    from graphc.passes import memory
    g = plan_memory(schedule(fuse(dce(cse(fold_constants(simplify(_graph("resnet_block", True))))))))
    plan, nodes = g.memory_plan, g.nx.nodes
    args = (nodes, plan.program, plan.kind, plan.def_idx, plan.last_use)
    env = {"N": memory.REP_BATCH}
    totals = []
    for way in (memory._assign_slots, memory._assign_by_size):
        slot_of = way(*args)
        assert set(slot_of) == set(plan.slot_of)
        _no_two_live_share_a_slot(plan, slot_of)
        sizes = {}
        for n, k in slot_of.items():
            sizes[k] = max(sizes.get(k, 0), plan.nbytes(n, env))
        totals.append(sum(sizes.values()))
    assert sum(plan.slot_nbytes(env)) == min(totals) and totals[1] < totals[0]


def test_pipeline_prints_and_switches():
    from graphc.pipeline import Pipeline
    p = Pipeline("numba", fuse=False)
    text = str(p)
    assert "fuse" in text and "off" in text
    assert "fuse" not in p.enabled and "memory" in p.enabled


def test_cse_does_not_merge_a_minus_b_with_b_minus_a():
    g = gc.Graph("sub", dtype="float64")
    x = g.input("x", (None, 3), dtype="float64")
    y = g.input("y", (None, 3), dtype="float64")
    g.output(g.add(g.sub(x, y), g.exp(g.sub(y, x)), name="out"))     # only add and mul commute
    h = _check_chain(g, [cse, dce])
    assert _ops(h).count("sub") == 2


def test_fuse_takes_over_only_the_pools_own_route():
    """conv-ReLU-pool fusion rewrites the backward route + ReLU mask only when the route is the fused
    pool's (same window and stride). A chain routing through another window (a hand-built graph)
    keeps its own route: the conv and ReLU fuse, the pool does not."""
    g = gc.Graph("geo", dtype="float64")
    x = g.input("x", (None, 2, 6, 6), dtype="float64")
    dy = g.input("dy", (None, 3, 4, 4), dtype="float64")        # pooled shape of 3x3 windows, stride 1
    r = g.relu(g.conv(x, g.param("w", (3, 2, 3, 3)), g.param("b", (3,), init="normal"), pad=1), name="r")
    p = g.maxpool(r, 2, name="p")
    m = g.mul(g.maxpool_route(r, dy, 3, 1), g.gt(r, g.scalar(0.0)), name="m")
    g.output(p, m)
    h = _check_chain(g, [fuse])
    assert _patterns(h) == ["conv_relu", "elementwise"]        # the mask and its product: elementwise


def test_fuse_never_groups_forward_with_backward_values():
    """An elementwise group is all forward or all backward: a forward group computing a backward value
    would make every forward run (inference on a training executable) do backward work."""
    g = dce(cse(simplify(_graph("lenet5", True, gc.optim.SGD(0.1)))))
    h = _check_chain(g, [fuse])
    roles = {n: g.nx.nodes[n]["role"] for n in g.nx}
    groups = [h.nx.nodes[n]["attrs"]["replaces"] for n in h.nx
              if h.nx.nodes[n]["op"] == "fused" and h.nx.nodes[n]["attrs"]["pattern"] == "elementwise"]
    assert groups
    for members in groups:
        assert len({roles[m] == "forward" for m in members}) == 1, {m: roles[m] for m in members}
