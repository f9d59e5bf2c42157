"""The op table's properties (graphc.ops.OpDef: alias, to_shape, commutative, unit, involution,
loss_term/grad_term, torch) hold for the ops that declare them, and the passes and tools that read them
behave as they did with their own lists of op names.

Each property is checked against the op's reference semantics on random data, so a wrong declaration
fails here before a pass relies on it; the torch field of every op that has one is checked against the
reference through the bench's torch translator (in a child process: torch and Numba in one process
stall each other's threads)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import graphc as gc
from graphc.executable import RunContext
from graphc.ops import OPS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RNG = np.random.default_rng(0)


def _ref(op, ins, attrs=None, out_shape=None):
    ctx = RunContext({}, False, 0)
    ctx.out_shape = out_shape
    return np.asarray(OPS[op].ref(ins, attrs or {}, ctx))


def _with(prop):
    return sorted(n for n, d in OPS.items() if getattr(d, prop))


def test_commutative_ops_commute():
    assert _with("commutative")
    a, b = RNG.standard_normal((3, 4)), RNG.standard_normal((3, 4))
    for op in _with("commutative"):
        np.testing.assert_array_equal(_ref(op, [a, b]), _ref(op, [b, a]), err_msg=op)


def test_unit_elements_leave_values_unchanged():
    ops = sorted(n for n, d in OPS.items() if d.unit is not None)
    assert set(ops) >= {"add", "mul", "sub", "div"}
    x = RNG.standard_normal((3, 4))
    for op in ops:
        u = np.full_like(x, OPS[op].unit)
        np.testing.assert_array_equal(_ref(op, [x, u]), x, err_msg=op)
        if OPS[op].commutative:
            np.testing.assert_array_equal(_ref(op, [u, x]), x, err_msg=op)
        else:       # a unit only on the right: simplify must not use it on the left
            assert not np.array_equal(_ref(op, [u, x]), x), op


def test_involutions_undo_themselves():
    x = RNG.standard_normal((3, 4))
    for op in _with("involution"):
        np.testing.assert_array_equal(_ref(op, [_ref(op, [x])]), x, err_msg=op)


def _to_own_shape(g, op, x):
    """op applied to x with x's own shape as the target (every alias / to_shape op needs its own way to
    say the target)."""
    if op == "reshape":
        return g.reshape(x, x.shape)
    if op in ("reshape_like", "sum_to", "expand_like"):
        return g.add_node(op, (x, x))
    return g.add_node(op, (x,))


def test_alias_and_to_shape_ops_to_their_own_shape_are_their_input():
    ops = sorted(set(_with("alias")) | set(_with("to_shape")))
    assert {"reshape", "reshape_like", "identity", "copy", "sum_to", "expand_like"} <= set(ops)
    g = gc.Graph("own", dtype="float64")
    x = g.input("x", (None, 3), dtype="float64")
    outs = [_to_own_shape(g, op, x) for op in ops]
    g.output(*outs)
    xv = RNG.standard_normal((2, 3))
    res = gc.compile(g, simplify=False).run({"x": xv})
    for op, o in zip(ops, outs):
        np.testing.assert_array_equal(res[o.name], xv, err_msg=op)
    # simplify removes every one of them (where it reads them in front of another op)
    from graphc.passes.simplify import simplify
    g2 = gc.Graph("own2", dtype="float64")
    x2 = g2.input("x", (None, 3), dtype="float64")
    g2.output(*[g2.exp(_to_own_shape(g2, op, x2)) for op in ops])
    assert {g2.nx.nodes[n]["op"] for n in simplify(g2).nx} == {"input", "exp"}


def test_alias_ops_share_their_input_buffer_in_the_memory_plan():
    from graphc.passes.memory import build_plan
    g = gc.Graph("views", dtype="float64")
    x = g.input("x", (None, 6), dtype="float64")
    e = g.exp(x, name="e")
    outs = [g.reshape(e, (None, 2, 3), name="r"), g.identity(e, name="i"), g.copy(e, name="c"),
            g.reshape_like(e, e, name="rl")]
    g.output(*outs)
    plan = build_plan(g, [o.name for o in outs])
    for o in outs:
        assert OPS[g.nx.nodes[o.name]["op"]].alias
        assert plan.kind[o.name] == "alias" and plan.root[o.name] == "e", o.name


def test_cse_merges_every_commutative_op_with_swapped_inputs():
    from graphc.passes.cse import cse
    g = gc.Graph("comm", dtype="float64")
    a, b = g.input("a", (None, 3), dtype="float64"), g.input("b", (None, 3), dtype="float64")
    total = None
    for op in _with("commutative"):
        pair = g.add(g.add_node(op, (a, b)), g.add_node(op, (b, a)))
        total = pair if total is None else g.add(total, pair)
    g.output(g.identity(total, name="out"))
    h = cse(g)
    for op in _with("commutative"):
        n = sum(1 for m in h.nx if h.nx.nodes[m]["op"] == op and set(h.nx.nodes[m]["inputs"]) == {"a", "b"})
        assert n == 1, op


def test_mean_loss_formulas_are_written_once():
    """loss_term / grad_term are the only place the mean losses' formulas live: no backend and no other
    module of graphc spells the stable BCE term (its log1p) again."""
    from graphc.ops import loss
    assert OPS["bce_with_sigmoid"].loss_term == loss.BCE_TERM and "log1p" in loss.BCE_TERM
    hits = []
    for top in ("graphc", "backends"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if f.endswith(".py"):
                    text = open(os.path.join(dirpath, f)).read()
                    hits += [os.path.join(dirpath, f)] * text.count("log1p(")
    assert [os.path.relpath(h, ROOT) for h in hits] == [os.path.join("graphc", "ops", "loss.py")]
    # and the formula is the stable BCE with logits
    z, t = np.array([-800.0, -2.0, 0.0, 3.0, 800.0]), np.array([1.0, 0.0, 0.5, 1.0, 0.0])
    terms = loss.eval_term(loss.BCE_TERM, z, t)
    sig = 1 / (1 + np.exp(-z[1:4]))
    np.testing.assert_allclose(terms[1:4], -(t[1:4] * np.log(sig) + (1 - t[1:4]) * np.log(1 - sig)), rtol=1e-12)
    assert np.isfinite(terms).all() and terms[0] == pytest.approx(800.0) and terms[-1] == pytest.approx(800.0)


# ------------------------------------------------------------------------------------ the torch field

def every_torch_op_graph():
    """One graph using every op that has a torch field (float32, batch 2)."""
    g = gc.Graph("torch_ops", seed=3)
    x = g.input("x", (None, 2, 4, 4))
    t = g.input("t", (None, 2, 4, 4))
    y = g.input("y", (None,), "int64")
    pos = g.add(g.sigmoid(t), g.scalar(0.5))
    flat = g.reshape(x, (None, 32))
    outs = [g.add(x, t), g.mul(x, t), g.max(x, t), g.relu(x), g.sub(x, t), g.neg(x), g.div(x, pos), g.exp(x),
            g.log(pos), g.sqrt(pos), g.sigmoid(x), g.tanh(x), g.cos(x), g.floor(g.mul(x, 3.0)), g.identity(x),
            g.copy(x),
            g.transpose(x, (0, 2, 3, 1)), g.concat([x, t], axis=1), g.slice(x, 1, 0, 1),
            g.pad2d(x, (1, 0, 2, 1), value=0.5), g.sum(x, axes=(1, 2)), g.mean(x, axes=(0, 3), keepdims=True),
            g.maxpool(x, 2), g.avgpool(x, 2), g.global_avgpool(x),
            g.matmul(flat, g.param("w", (8, 32)), trans_b=True), g.matmul(flat, g.mul(flat, 2.0), trans_a=True),
            g.conv(x, g.param("k", (3, 2, 3, 3)), g.param("kb", (3,), init="normal"), pad=1),
            g.conv(x, g.param("k2", (1, 2, 2, 2)), pads=(1, 0, 0, 1), stride=2),
            g.softmax(flat, axis=1), g.softmax_cross_entropy(g.slice(flat, 1, 0, 5), y),
            g.mse(x, t), g.bce_with_sigmoid(x, g.sigmoid(t)),
            g.add_node("dropout_mask", (x,), {"rate": 0.5, "seed": 1}),
            # the CNN op set: attribute ops, grouped/dilated conv, padding modes, batch norm, LRN
            g.leaky_relu(x, 0.2), g.prelu(x, g.param("slope", (2,), init="constant", scale=0.25)),
            g.clip(x, -0.5, 0.7), g.silu(x), g.hardswish(g.mul(x, 4.0)), g.global_maxpool(x),
            g.conv(x, g.param("kg", (4, 1, 3, 3)), pad=2, dilation=2, groups=2),
            g.pad2d(x, (1, 1, 2, 0), mode="reflect"), g.pad2d(x, 1, mode="edge"),
            g.lrn(x, 3, 0.1, 0.75, 2.0), g.batchnorm(x, g.param("bn.g", (2,), init="ones"),
                                                     g.param("bn.b", (2,), init="zeros"),
                                                     g.param("bn.m", (2,), init="zeros", trainable=False),
                                                     g.param("bn.v", (2,), init="ones", trainable=False)),
            g.add_node("is_training", (), {"dtype": "float32"})]
    outs += [g[u] for u in g.stat_updates.values()]
    g.output(*outs)
    return g


_TORCH_SCRIPT = r"""
import json, sys
import numpy as np
import torch
sys.path.insert(0, sys.argv[1] + "/tests")
import graphc as gc
from graphc.bench import _torch_forward_factory, make_feeds
from test_op_properties import every_torch_op_graph
g = every_torch_op_graph()
feeds = make_feeds(g, 2)
feeds["t"] = feeds["t"].astype(np.float32)
ref = gc.compile(g).run(feeds)
forward, _ = _torch_forward_factory(g, torch, 2)
with torch.no_grad():
    got = forward({k: torch.from_numpy(v) for k, v in feeds.items()}, False)
out = {}
for o in g.outputs:
    a, b = np.asarray(got[o].numpy(), np.float64), np.asarray(ref[o], np.float64)
    out[o] = [g.nx.nodes[o]["op"], list(a.shape) == list(b.shape) and bool(np.allclose(a, b, rtol=1e-4, atol=1e-5))]
print(json.dumps(out))
"""


def test_torch_field_of_every_op_matches_the_reference():
    pytest.importorskip("torch")
    g = every_torch_op_graph()
    have = {g.nx.nodes[n]["op"] for n in g.nx}
    assert set(_with("torch")) <= have, sorted(set(_with("torch")) - have)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", _TORCH_SCRIPT, ROOT], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(res) == len(g.outputs)
    bad = {o: op for o, (op, ok) in res.items() if not ok}
    assert not bad, bad
