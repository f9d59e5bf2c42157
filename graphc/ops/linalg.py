"""matmul: C = op(A) @ op(B) with op = optional transpose of the last two dims (dense uses B transposed,
like torch.nn.Linear). Operands of rank > 2 are stacks of matrices whose leading (batch) dims broadcast
as numpy's matmul does."""
import numpy as np

from graphc import shapes
from graphc.errors import ShapeError
from graphc.ops import OpDef, register
from graphc.ops.elementwise import _float_dtype


def _mm_infer(node, in_types):
    (sa, _), (sb, _) = in_types
    ta, tb = node.attrs.get("trans_a", False), node.attrs.get("trans_b", False)
    if len(sa) < 2 or len(sb) < 2:
        node.fail(ShapeError, f"matmul takes operands of rank >= 2, got {shapes.fmt(sa)} and {shapes.fmt(sb)}",
                  "flatten the input first (g.flatten), or reshape a vector to (1, n) / (n, 1)")
    m, k = (sa[-1], sa[-2]) if ta else sa[-2:]
    k2, n = (sb[-1], sb[-2]) if tb else sb[-2:]
    if k != k2:
        node.fail(ShapeError, f"inner dims differ: {shapes.fmt(sa)}{'ᵀ' if ta else ''} @ "
                  f"{shapes.fmt(sb)}{'ᵀ' if tb else ''} needs {k} == {k2}",
                  "for dense(x, w, b) w is shaped (out_features, in_features) = (out, x.shape[-1])")
    batch = shapes.broadcast(node, sa[:-2], sb[:-2]) if len(sa) > 2 or len(sb) > 2 else ()
    return (*batch, m, n), _float_dtype(node, in_types)


def _t(x, flag):
    return np.swapaxes(x, -1, -2) if flag else x


def _mm_ref(inputs, attrs, ctx):
    a, b = inputs
    return np.matmul(_t(a, attrs.get("trans_a")), _t(b, attrs.get("trans_b")))


def _mm_grad(g, node, dy):
    """mul's swap rule for matrices: dA = dY op(B)ᵀ, dB = op(A)ᵀ dY (transposed back where needed),
    summed over the batch dims an operand was broadcast along."""
    a, b = node.inputs
    ta, tb = node.attrs.get("trans_a", False), node.attrs.get("trans_b", False)
    with g.rule("matmul:swap"):
        da = g.matmul(b, dy, trans_a=tb, trans_b=True) if ta else g.matmul(dy, b, trans_b=not tb)
        db = g.matmul(dy, a, trans_a=True, trans_b=ta) if tb else g.matmul(a, dy, trans_a=not ta)
        da = da if tuple(da.shape) == tuple(a.shape) else g.sum_to(da, a)
        db = db if tuple(db.shape) == tuple(b.shape) else g.sum_to(db, b)
    return [da, db]


def _mm_flops(in_shapes, out_shape, attrs):
    sa = in_shapes[0]
    k = sa[-2] if attrs.get("trans_a") else sa[-1]
    return 2 * int(np.prod(out_shape)) * k


def _mm_torch(F, torch, ins, attrs, ctx):
    a, b = ins
    return (a.transpose(-1, -2) if attrs.get("trans_a") else a) @ (b.transpose(-1, -2) if attrs.get("trans_b") else b)


register(OpDef("matmul", _mm_infer, _mm_ref, _mm_grad, flops=_mm_flops,
               doc="matrix product with optional transposes; rank > 2: batched, batch dims broadcast",
               torch=_mm_torch))
