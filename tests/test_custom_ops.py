"""Elementwise ops declared in user code (gc.ops.elementwise_op) and used with g.apply: checked,
differentiated (gradcheck against finite differences), fused into elementwise kernels with their
attribute values as constants, and run on the reference and numba backends with the same results;
the cuda backend runs them in tests/test_cuda_backend.py (simulator). The README's example is run as
written, on all three backends (cuda in the simulator)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest

import graphc as gc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _leaky_grad(g, node, dy):
    x, = node.inputs
    up = g.gt(x, g.scalar(0.0))
    return [g.mul(dy, g.add(up, g.mul(g.sub(g.scalar(1.0), up), g.scalar(node.attrs["alpha"]))))]


def _lerp_grad(g, node, dy):
    t = g.scalar(node.attrs["t"])
    return [g.mul(dy, g.sub(g.scalar(1.0), t)), g.mul(dy, t)]


def declare_ops():
    """Two ops declared the way a user would: a one-input op with a slope and a two-input op (broadcast
    inputs) with a weight. Declaring again replaces them, so every test may call this."""
    gc.ops.elementwise_op("t_leaky", "a0 if a0 > 0 else {alpha} * a0", lambda x, alpha: np.where(x > 0, x, alpha * x),
                          grad=_leaky_grad, rule="t_leaky:slope", attrs={"alpha": 0.01})
    gc.ops.elementwise_op("t_lerp", "a0 + {t} * (a1 - a0)", lambda a, b, t: a + t * (b - a), grad=_lerp_grad,
                          attrs={"t": 0.5})


def custom_graph(dtype="float32"):
    """dense -> t_leaky(alpha=-0.3: a negative literal) -> t_lerp with a broadcast bias -> a loss, plus a
    second t_leaky with its default slope; every custom node sits in an elementwise chain."""
    g = gc.Graph("custom", seed=2, dtype=dtype)
    x = g.input("x", (None, 5), dtype=dtype)
    h = g.apply("t_leaky", g.dense(x, g.param("w", (6, 5)), g.param("b", (6,), init="normal")), alpha=-0.3,
                name="h")
    m = g.apply("t_lerp", h, g.param("c", (6,), init="normal"), t=0.25, name="m")
    k = g.apply("t_leaky", g.mul(m, 2.0), name="k")
    g.output(g.mean(g.mul(k, k), name="loss"))
    return g


def _feeds(n=4, dtype=np.float32):
    return {"x": np.random.default_rng(1).standard_normal((n, 5)).astype(dtype)}


def _fused_bodies(exe):
    nodes = exe.graph.nx.nodes
    return [[b["op"] for b in nodes[n]["attrs"]["body"]] for n in exe.graph.nx if nodes[n]["op"] == "fused"]


def test_reference_semantics_and_gradcheck():
    declare_ops()
    g = custom_graph("float64")
    feeds = _feeds(dtype=np.float64)
    out = gc.compile(g, keep=["h", "m", "k"]).run(feeds, outputs=["h", "m", "k"])
    z = feeds["x"] @ g.params["w"].T + g.params["b"]
    h = np.where(z > 0, z, -0.3 * z)
    m = h + 0.25 * (g.params["c"] - h)
    np.testing.assert_allclose(out["h"], h, rtol=1e-12)
    np.testing.assert_allclose(out["m"], m, rtol=1e-12)
    np.testing.assert_allclose(out["k"], np.where(2 * m > 0, 2 * m, 0.01 * 2 * m), rtol=1e-12)
    assert gc.gradcheck(g, feeds, wrt=["w", "b", "c", "x"])
    # the gradient's nodes carry the declared rule names
    gg = gc.grad(g)
    rules = {d["rule"] for _, d in gg.nx.nodes(data=True)}
    assert {"t_leaky:slope", "t_lerp:grad"} <= rules


@pytest.mark.parametrize("fuse", [True, False])
def test_numba_runs_custom_ops_fused_with_attribute_constants(fuse):
    declare_ops()
    g = custom_graph()
    feeds = _feeds()
    ref = gc.compile(g, optimizer=gc.optim.SGD(0.1))
    exe = gc.compile(g, backend="numba", optimizer=gc.optim.SGD(0.1), fuse=fuse)
    for _ in range(3):
        np.testing.assert_allclose(exe.step(feeds), ref.step(feeds), rtol=1e-5)
    for k, v in ref.state.items():
        np.testing.assert_allclose(exe.state[k], v, rtol=1e-4, atol=1e-6, err_msg=k)
    bodies = _fused_bodies(exe)
    if fuse:
        assert any("t_leaky" in b and "t_lerp" in b for b in bodies), bodies      # one forward kernel
    else:
        assert not bodies
    assert not any(getattr(f, "fallback", False) for b in exe._bindings.values() for _, f in b.steps)


def test_numba_generated_code_holds_the_attribute_values():
    from graphc.backends import codegen
    declare_ops()
    body = codegen.graph_body([{"op": "t_leaky", "inputs": [("in", 0)], "attrs": {"alpha": -0.3}},
                               {"op": "t_lerp", "inputs": [("body", 0), ("in", 1)], "attrs": {"t": 0.25}}])
    src = codegen.NumbaDialect().source(body, [1], codegen.plan_loop((4, 6), [(4, 6), (4, 6)]), "float32", False)
    assert "(-0.3)" not in src and "_T(-0.3)" not in src      # literals become typed constants ...
    assert re.search(r"c\d+ = _T\(0\.3\)", src) and re.search(r"c\d+ = _T\(0\.25\)", src), src   # ... like these
    assert "{" not in src.split("def kernel")[1]


def test_redeclaring_replaces_and_builtins_are_refused():
    declare_ops()
    gc.ops.elementwise_op("t_twice", "{k} * a0", lambda x, k: k * x, attrs={"k": 2.0})
    g = gc.Graph("tw")
    g.output(g.apply("t_twice", g.input("x", (None, 2))))
    gc.ops.elementwise_op("t_twice", "{k} * a0 + 1.0", lambda x, k: k * x + 1.0, attrs={"k": 2.0})
    x = np.ones((1, 2), np.float32)
    for backend in ("reference", "numba"):
        assert gc.compile(g, backend=backend).run({"x": x})[g.outputs[0]].tolist() == [[3.0, 3.0]]
    with pytest.raises(gc.GraphError, match="'relu' is a built-in op"):
        gc.ops.elementwise_op("relu", "a0", lambda x: x)


@pytest.mark.parametrize("kw, words", [
    (dict(scalar="a0 * {beta}", attrs={"alpha": 1.0}), ["{beta}", "'beta'", "attrs"]),
    (dict(scalar="a0 *", attrs={}), ["not a Python expression"]),
    (dict(scalar="{alpha} * 2", attrs={"alpha": 1.0}), ["reads no input", "a0"]),
    (dict(scalar="{alpha} * a0", attrs={"alpha": "big"}), ["alpha='big'", "plain number"]),
    (dict(scalar="a0", attrs={}, name="not an identifier"), ["identifiers"]),
])
def test_bad_declarations_name_the_problem(kw, words):
    kw = dict(kw)
    name = kw.pop("name", "t_bad")
    with pytest.raises(gc.GraphError) as e:
        gc.ops.elementwise_op(name, ref=lambda *a, **k: a[0], **kw)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_bad_uses_name_the_problem():
    declare_ops()
    g = gc.Graph("bad")
    x = g.input("x", (None, 3))
    with pytest.raises(gc.GraphError, match="no attribute 'slope'.*alpha"):
        g.apply("t_leaky", x, slope=0.1)
    with pytest.raises(gc.GraphError, match="alpha='0.1' must be a plain number"):
        g.apply("t_leaky", x, alpha="0.1")
    with pytest.raises(gc.GraphError, match="takes 2 input"):
        g.apply("t_lerp", x)
    with pytest.raises(gc.GraphError, match="unknown op 't_nope'"):
        g.apply("t_nope", x)
    gc.ops.elementwise_op("t_nograd", "a0 * a0", lambda x: x * x)
    g.output(g.sum(g.apply("t_nograd", x), name="s"))
    with pytest.raises(gc.GradError, match="'t_nograd'.*no gradient rule"):
        gc.grad(g, wrt=["x"])


def _readme_example():
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## Your own ops", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs_as_written_on_all_three_backends():
    code = _readme_example()
    assert "gc.ops.elementwise_op(" in code and 'g.apply("my_leaky_relu"' in code
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")         # cuda without a GPU: Numba's simulator
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert any(re.match(r"worst .*: ok$", ln) for ln in lines), r.stdout
    rows = {ln.split()[0]: ln for ln in lines if ln.split() and ln.split()[0] in ("reference", "numba", "cuda")}
    assert sorted(rows) == ["cuda", "numba", "reference"], r.stdout        # none refused
    losses = {b: [float(v) for v in re.search(r"\[([^\]]*)\]", ln).group(1).split()] for b, ln in rows.items()}
    for b in ("numba", "cuda"):
        np.testing.assert_allclose(losses[b], losses["reference"], rtol=1e-4, err_msg=b)
        assert "['add', 'my_leaky_relu', 'mul']" in rows[b], rows[b]
    assert "my_leaky_relu" in rows["reference"]
