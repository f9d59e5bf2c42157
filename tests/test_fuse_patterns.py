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
    assert pats == {"conv_relu", "conv_relu_maxpool", "route_relu", "elementwise"}


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
