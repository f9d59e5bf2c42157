"""The fusion pass groups exactly what it grouped before its patterns became data.

tests/data/fused_groups.json was recorded by running this file as a script (``python
tests/test_fuse_patterns.py --record``) on main *before* fusion patterns were declared as data (when
passes/fuse.py still hand-coded its matchers). For every case below it holds, in schedule order, one
entry per fused node of the numba pipeline's output:

    [pattern, replaced node names, body ops, result indices, saved values]

e.g. for lenet5 training, ``["conv_relu_maxpool", ["c1", "c1.relu", "s2"], ["conv", "relu", "maxpool",
"maxpool_argmax"], [2, 3], ["route"]]``: the first conv block saves its pool route, and later
``["route_relu", [...maxpool_route, gt, mul, sum...], ["route_scatter", "sum"], [0, 1], []]`` is its
backward. The cases: every zoo model for inference and for an SGD-with-momentum training step, the small
ones also with Adam, and a few graphs at the edges of the patterns (no conv bias, overlapping pool
windows, a ReLU read elsewhere, a kept value, an average pool). Any change to what is grouped — a group
more or less, a member more or less, another body — fails here.

Re-recorded once since, when the op set of real CNNs landed: only alexnet (LRN after conv1/conv2) and the
digit resnet (batch norm) changed among the models recorded before, as their definitions did; the new
zoo models (resnet18/34/50, mobilenet_v2, googlenet(_lrn), vgg16_bn, squeezenet1_0) were added. And
again when batch norm's and LRN's backward became ops of their own (bn_grad_sums, bn_grad_x, lrn_grad:
fewer elementwise groups in training) and inference graphs began to fold batch norm into the conv before
it (passes/fold_bn.py: conv_relu groups, and the folded weights' elementwise groups): only the models
with batch norm or LRN changed (alexnet, googlenet(_lrn), mobilenet_v2, resnet, resnet18/34/50, vgg16_bn).
And when the conv_clip pattern (conv -> clip, ReLU6) met the folded batch norms: only mobilenet_v2's
inference graph changed (35 conv_clip groups where conv -> folded batch norm -> clip was unfused).
And when the dropout pattern (x * dropout_mask(x), the mask read by nothing else) came: only inference
graphs with dropout changed, each by one dropout group per dropout layer and nothing else (alexnet,
googlenet(_lrn), mnist_convnet, mobilenet_v2, squeezenet1_0, vgg16, vgg16_bn).
And when the pad_maxpool pattern (a -inf pad2d into a max pool) came: only graphs with a padded or ceil-mode
max pool whose padded value nothing else reads changed, each by one pad_maxpool group per such pool and
nothing else (the inference graphs of googlenet(_lrn), inception, inception_block, resnet18/34/50 and
squeezenet1_0, and inception_block's training graphs, whose pooled branch reads the input, which takes
no gradient).
"""
from __future__ import annotations

import json
import os
import sys

import pytest

import graphc as gc
from graphc import models

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "fused_groups.json")
SMALL = ("codelab_cnn", "inception_block", "lenet5", "mlp", "mnist_convnet", "resnet_block", "seed_cnn")


def _edge_graph(kind):
    """Graphs at the edges of the conv patterns (training graphs unless said otherwise)."""
    g = gc.Graph(f"edge_{kind}")
    x = g.input("x", (None, 2, 8, 8))
    y = g.input("y", (None,), "int64")
    bias = None if kind == "no_bias_overlap" else g.param("c.b", (3,), init="normal")
    r = g.relu(g.conv(x, g.param("c.w", (3, 2, 3, 3)), bias, pad=1, name="c"), name="c.relu")
    if kind == "no_bias_overlap":
        h = g.maxpool(r, 3, stride=2, name="p")                    # overlapping windows, no bias gradient
    elif kind == "avgpool":
        h = g.avgpool(r, 2, name="p")
    else:
        h = g.maxpool(r, 2, name="p")
    logits = g.dense(g.flatten(h), g.param("d.w", (4, h.shape[1] * h.shape[2] * h.shape[3])), name="logits")
    loss = g.softmax_cross_entropy(logits, y, name="loss")
    if kind == "relu_read_elsewhere":
        loss = g.add(loss, g.mean(r), name="loss2")
    g.output(loss)
    return g


def cases():
    out = {}
    for name in models.names():
        out[f"{name}/infer"] = (lambda n=name: models.load(n), None, ())
        out[f"{name}/sgd"] = (lambda n=name: models.load(n), lambda: gc.optim.SGD(0.01, momentum=0.9), ())
        if name in SMALL:
            out[f"{name}/adam"] = (lambda n=name: models.load(n), lambda: gc.optim.Adam(1e-3), ())
    for kind in ("no_bias_overlap", "avgpool", "relu_read_elsewhere"):
        out[f"edge_{kind}/sgd"] = (lambda k=kind: _edge_graph(k), lambda: gc.optim.SGD(0.1), ())
    out["lenet5_keep_relu/sgd"] = (lambda: models.load("lenet5"), lambda: gc.optim.SGD(0.1), ("c1.relu",))
    out["lenet5_keep_conv/infer"] = (lambda: models.load("lenet5"), None, ("c3",))
    return out


def structure(make_graph, make_opt, keep):
    """The fused groups of the numba pipeline's output, in schedule order."""
    from graphc.passes.transforms.training import training_graph
    from graphc.pipeline import Pipeline
    g = make_graph()
    if make_opt is not None:
        g = training_graph(g, make_opt())
    if keep:
        g = g.clone()
        g.keep |= set(keep)
    p = Pipeline("numba")(g)
    groups = []
    for n in p.schedule:
        d = p.nx.nodes[n]
        if d["op"] == "fused":
            a = d["attrs"]
            groups.append([a["pattern"], list(a["replaces"]), [b["op"] for b in a["body"]], list(a["results"]),
                           list(a.get("saves", ()))])
    return groups


CASES = cases()


@pytest.fixture(scope="module")
def recorded():
    with open(DATA) as f:
        return json.load(f)


def test_recording_covers_every_case(recorded):
    assert sorted(recorded) == sorted(CASES)
    # the recording is not trivially empty: the conv patterns and their backward are all in it
    pats = {grp[0] for groups in recorded.values() for grp in groups}
    assert pats == {"conv_relu", "conv_relu_maxpool", "conv_clip", "dropout", "route_relu", "elementwise",
                    "pad_maxpool"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_groups_as_before(case, recorded):
    assert structure(*CASES[case]) == recorded[case]


if __name__ == "__main__" and "--record" in sys.argv:
    os.makedirs(os.path.dirname(DATA), exist_ok=True)
    rec = {c: structure(*CASES[c]) for c in sorted(CASES)}
    with open(DATA, "w") as f:
        json.dump(rec, f, indent=None, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {DATA}: {len(rec)} cases, {sum(len(v) for v in rec.values())} groups")


# ------------------------------------------------------------------------------------------ roles

ROLE_OPS = {"conv_relu_maxpool": {"conv": "conv", "act": "relu", "pool": "maxpool", "route": "maxpool_argmax"},
            "conv_relu": {"conv": "conv", "act": "relu"},
            "route_relu": {"scatter": "route_scatter", "bias_grad": "sum"}}


def test_body_nodes_carry_their_roles():
    from graphc.ops.fused import members
    from graphc.passes.transforms.training import training_graph
    from graphc.pipeline import Pipeline
    seen = set()
    for g in (training_graph(models.lenet5(), gc.optim.SGD(0.1)), models.lenet5(),
              training_graph(_edge_graph("no_bias_overlap"), gc.optim.SGD(0.1)),
              training_graph(_edge_graph("relu_read_elsewhere"), gc.optim.SGD(0.1))):
        p = Pipeline("numba")(g)
        for n in p.nx:
            d = p.nx.nodes[n]
            if d["op"] != "fused":
                continue
            a = d["attrs"]
            m = members(a)
            assert len(m) == len(a["body"]), a["pattern"]            # roles are unique within a group
            if a["pattern"] == "elementwise":
                assert list(m) == [f"ew{k}" for k in range(len(a["body"]))]
            else:
                assert {r: b["op"] for r, b in m.items()} == {r: o for r, o in ROLE_OPS[a["pattern"]].items()
                                                              if r in m}
                seen.add((a["pattern"], tuple(sorted(m))))
    # the optional members appear exactly where they should: the route when saved, the bias gradient
    # when the conv has a bias
    assert seen == {("conv_relu_maxpool", ("act", "conv", "pool", "route")),
                    ("conv_relu_maxpool", ("act", "conv", "pool")),
                    ("route_relu", ("bias_grad", "scatter")), ("route_relu", ("scatter",)),
                    ("conv_relu", ("act", "conv"))}


# ------------------------------------------------------------------------ a new pattern: one declaration

def _stride2(g, n):
    return tuple(g.nx.nodes[n]["attrs"]["stride"]) == (2, 2)


def _strided_net():
    """conv(stride 2) -> relu -> conv(stride 1) -> relu -> dense -> loss; 8x8 images."""
    g = gc.Graph("strided", seed=1)
    x = g.input("x", (None, 2, 8, 8))
    y = g.input("y", (None,), "int64")
    h = g.relu(g.conv(x, g.param("c1.w", (3, 2, 3, 3)), g.param("c1.b", (3,), init="normal"), stride=2, pad=1,
                      name="c1"), name="c1.relu")
    h = g.relu(g.conv(h, g.param("c2.w", (2, 3, 3, 3)), pad=1, name="c2"), name="c2.relu")
    logits = g.dense(g.flatten(h), g.param("d.w", (3, 32)), name="logits")
    g.output(g.softmax_cross_entropy(logits, y, name="loss"))
    return g


@pytest.fixture
def with_strided_pattern(monkeypatch):
    """An extra pattern declared here, in the test, and nowhere in graphc: a stride-2 conv and its ReLU
    (guarded by the conv's stride), tried before conv_relu. No backend has a lowering for it."""
    from graphc.passes import patterns as P
    extra = P.Chain("conv_relu_strided", roles=(P.Role("conv", "conv", guard=_stride2), P.Role("act", "relu")),
                    guard=lambda g, m: m.shape(g, "conv")[1] <= 64, prepare=P.relu_masks_on_outputs)
    monkeypatch.setattr(P, "PATTERNS", [P.CONV_RELU_MAXPOOL, extra, P.CONV_RELU, P.ELEMENTWISE])
    return extra


def test_a_new_pattern_is_one_declaration(with_strided_pattern):
    from graphc.passes.fuse import fuse
    from graphc.passes.transforms.training import training_graph
    for g in (_strided_net(), training_graph(_strided_net(), gc.optim.SGD(0.1))):
        f = fuse(g)
        groups = {tuple(f.nx.nodes[n]["attrs"]["replaces"]): f.nx.nodes[n]["attrs"]["pattern"] for n in f.nx
                  if f.nx.nodes[n]["op"] == "fused"}
        assert groups[("c1", "c1.relu")] == "conv_relu_strided"       # the guard holds: stride 2
        assert groups[("c2", "c2.relu")] == "conv_relu"                # the guard fails: stride 1


@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_a_pattern_without_lowering_runs_its_body_correctly(with_strided_pattern, backend):
    """The backends do not know conv_relu_strided: they run its body with the reference ops (a fallback),
    and a training step still gives the reference's unfused losses and weights."""
    import numpy as np
    g = _strided_net()
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((2, 2, 8, 8)).astype(np.float32), "y": np.array([0, 2])}
    ref = gc.compile(g, optimizer=gc.optim.SGD(0.1), fuse=False)
    exe = gc.compile(g, backend=backend, optimizer=gc.optim.SGD(0.1), fuse=True)
    fused = exe.graph.nx.nodes
    pats = [fused[n]["attrs"]["pattern"] for n in exe.graph.nx if fused[n]["op"] == "fused"]
    assert "conv_relu_strided" in pats
    for _ in range(2):
        np.testing.assert_allclose(exe.step(feeds), ref.step(feeds), rtol=1e-5)
    for k, v in ref.state.items():
        np.testing.assert_allclose(exe.state[k], v, rtol=1e-4, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(exe.run(feeds)["loss"], ref.run(feeds)["loss"], rtol=1e-5)
