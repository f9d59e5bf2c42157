"""The elementwise code generator (backends/codegen.py): loop plans, expression translation in both
dialects, and op attributes reaching generated code as constants (the {attr} convention)."""
import numpy as np
import pytest

import graphc as gc
from graphc import ops as optable
from graphc.backends import codegen
from graphc.errors import BackendError

LEAKY = "leaky_test_op"          # a throwaway elementwise op with an attribute (registered per test)


@pytest.fixture
def leaky_op():
    from graphc.ops.elementwise import _infer
    optable.register(optable.OpDef(
        LEAKY, _infer, lambda ins, a, ctx: np.where(ins[0] > 0, ins[0], a["alpha"] * ins[0]).astype(ins[0].dtype),
        scalar="a0 if a0 > 0 else {alpha} * a0", attrs={"alpha": 0.01}))
    yield LEAKY
    del optable.OPS[LEAKY]


def test_loop_plan_merges_dims_and_classifies_inputs():
    plan = codegen.plan_loop((2, 3, 4, 5), [(2, 3, 4, 5), (4, 5), (1, 3, 1, 1), (), (1,)], consts={4: 2.0})
    assert plan.dims == (2, 3, 20)
    assert plan.modes == ["full", (False, False, True), (False, True, False), "scalar", "const"]
    assert plan.loaded() == [0, 1, 2, 3]
    assert plan.input_shape(1) == (1, 1, 20) and plan.input_shape(3) == (1,)


def test_translation_types_literals_and_rewrites_calls():
    cuda = codegen.translate("max(a0, 0.5) + math.exp(a1) * (a0 > a1)", ["x", 3.0], codegen.CudaDialect())
    assert "_T(0.5)" in cuda and "math.exp(_T(3.0))" in cuda and "max(" not in cuda
    assert "_T(1) if x > _T(3.0) else _T(0)" in cuda
    numba = codegen.NumbaDialect()
    text = codegen.translate("0.5 * (math.tanh(0.5 * a0) + 1.0)", ["a0_"], numba)
    assert numba.consts == {"0.5": "c0", "1.0": "c1"} and text == "c0 * (_T(math.tanh(c0 * a0_)) + c1)"
    for bad in ("a0 + b", "a2 * 2", "import os", "a0.real", "o0 + 1", "__import__('os')"):
        with pytest.raises(BackendError):
            codegen.translate(bad, ["x", "y"], codegen.CudaDialect())


def test_attribute_reaches_generated_code_as_a_constant(leaky_op):
    assert codegen.scalar_expr(leaky_op, {"alpha": 0.2}) == "a0 if a0 > 0 else (0.2) * a0"
    assert codegen.scalar_expr(leaky_op, {}) == "a0 if a0 > 0 else (0.01) * a0"      # the op's default
    assert codegen.translate(codegen.scalar_expr(leaky_op, {"alpha": -2}), ["x"], codegen.CudaDialect()) == \
        "x if x > _T(0) else -_T(2.0) * x"
    plan = codegen.plan_loop((4,), [(4,)])
    body = codegen.graph_body([{"op": leaky_op, "attrs": {"alpha": 0.2}, "inputs": [("in", 0)]}])
    numba_src = codegen.NumbaDialect().source(body, [0], plan, "float32", False)
    cuda_src, _ = codegen.CudaDialect().source(body, [0], plan)
    assert "_T(0.2)" in numba_src and "_T(0.2)" in cuda_src


@pytest.mark.parametrize("fuse", [True, False])
def test_op_with_attribute_on_numba_matches_reference(leaky_op, fuse):
    g = gc.Graph("leaky")
    x = g.input("x", (None, 3, 4))
    b = g.param("b", (4,), init="normal")
    h = g.add_node(leaky_op, (g.add(x, b),), {"alpha": 0.25}, name="h")
    g.output(g.mul(h, g.scalar(2.0), name="y"))
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)}
    ref = gc.compile(g).run(feeds)["y"]
    got = gc.compile(g, backend="numba", fuse=fuse).run(feeds)["y"]
    xb = feeds["x"] + gc.compile(g).params["b"]
    np.testing.assert_allclose(ref, 2 * np.where(xb > 0, xb, 0.25 * xb), rtol=1e-6)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)
