"""matmul: C = op(A) @ op(B) with op = optional transpose (dense uses B transposed, like torch.nn.Linear)."""
import numpy as np

from graphc import shapes
from graphc.errors import ShapeError
from graphc.ops import OpDef, register
from graphc.ops.elementwise import _float_dtype


def _mm_infer(node, in_types):
    (sa, _), (sb, _) = in_types
    ta, tb = node.attrs.get("trans_a", False), node.attrs.get("trans_b", False)
    if len(sa) != 2 or len(sb) != 2:
        node.fail(ShapeError, f"matmul takes 2-D operands, got {shapes.fmt(sa)} and {shapes.fmt(sb)}",
                  "flatten the input first (g.flatten)")
    m, k = (sa[1], sa[0]) if ta else sa
    k2, n = (sb[1], sb[0]) if tb else sb
    if k != k2:
        node.fail(ShapeError, f"inner dims differ: {shapes.fmt(sa)}{'ᵀ' if ta else ''} @ "
                  f"{shapes.fmt(sb)}{'ᵀ' if tb else ''} needs {k} == {k2}",
                  "for dense(x, w, b) w is shaped (out_features, in_features) = (out, x.shape[1])")
    return (m, n), _float_dtype(node, in_types)


def _mm_ref(inputs, attrs, ctx):
    a, b = inputs
    a = a.T if attrs.get("trans_a") else a
    b = b.T if attrs.get("trans_b") else b
    return a @ b


def _mm_grad(g, node, dy):
    """mul's swap rule for matrices: dA = dY op(B)ᵀ, dB = op(A)ᵀ dY (transposed back where needed)."""
    a, b = node.inputs
    ta, tb = node.attrs.get("trans_a", False), node.attrs.get("trans_b", False)
    with g.rule("matmul:swap"):
        da = g.matmul(b, dy, trans_a=tb, trans_b=True) if ta else g.matmul(dy, b, trans_b=not tb)
        db = g.matmul(dy, a, trans_a=True, trans_b=ta) if tb else g.matmul(a, dy, trans_a=not ta)
    return [da, db]


def _mm_flops(in_shapes, out_shape, attrs):
    sa = in_shapes[0]
    k = sa[0] if attrs.get("trans_a") else sa[1]
    return 2 * out_shape[0] * out_shape[1] * k


def _mm_torch(F, torch, ins, attrs, ctx):
    a, b = ins
    return (a.t() if attrs.get("trans_a") else a) @ (b.t() if attrs.get("trans_b") else b)


register(OpDef("matmul", _mm_infer, _mm_ref, _mm_grad, flops=_mm_flops,
               doc="2-D matrix product with optional transposes", torch=_mm_torch))
