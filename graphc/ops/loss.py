"""softmax and the losses. Losses are means over the batch (seeds' mini-batch definition).

The reference evaluates each loss in float64 and rounds the result to the value's dtype (as the compiled
kernels accumulate): a float32 intermediate must not overflow when the loss itself is representable.

The softmax + cross-entropy pair has its own op whose gradient collapses to (O - y) / m (seeds/000);
`softmax` followed by `cross_entropy` gives the same gradient through the generic rules (tested).
"""
import numpy as np

from graphc import shapes
from graphc.errors import DTypeError, FeedError, ShapeError
from graphc.ops import OpDef, register
from graphc.ops.elementwise import _float_dtype


def softmax_ref(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _softmax_grad(g, node, dy):
    y, axis = node.out, node.attrs["axis"]
    with g.rule("softmax:jacobian"):      # dx = y * (dy - sum(dy * y))
        return [g.mul(y, g.sub(dy, g.sum(g.mul(dy, y), axes=axis, keepdims=True)))]


def _softmax_infer(node, in_types):
    if not 0 <= node.attrs["axis"] < len(in_types[0][0]):
        node.fail(ShapeError, f"softmax axis {node.attrs['axis']} is out of range for {shapes.fmt(in_types[0][0])}", "")
    return in_types[0][0], _float_dtype(node, in_types)


register(OpDef("softmax", _softmax_infer,
               lambda ins, a, ctx: softmax_ref(ins[0], a["axis"]), _softmax_grad,
               flops=lambda i, o, a: 4 * int(np.prod(o)), doc="softmax along an axis",
               torch=lambda F, torch, ins, a, ctx: F.softmax(ins[0], dim=a["axis"])))


def class_ids(labels, k):
    """Integer labels, checked against 0..k-1 before anything indexes with them: labels computed in the
    graph (a concat with a const, a reshape of a 2-D input) escape the feed check; numpy would raise a
    bare IndexError, or wrap -1 round to class k-1."""
    if labels.size and (labels.min() < 0 or labels.max() >= k):
        bad = np.flatnonzero((labels < 0) | (labels >= k))
        raise FeedError(f"class labels computed in the graph: label {int(labels[bad[0]])} at position {int(bad[0])} "
                        f"is outside 0..{k - 1} ({len(bad)} bad label(s)). Fix: labels must be class ids 0..{k - 1}")
    return labels


def labels_matrix(labels, k, dtype):
    """Integer labels (N,) or one-hot / soft labels (N, K) -> (N, K) float."""
    if labels.ndim == 2:
        return labels.astype(dtype, copy=False)
    labels = class_ids(labels, k)
    out = np.zeros((labels.shape[0], k), dtype)
    out[np.arange(labels.shape[0]), labels] = 1
    return out


def label_dot(labels, logp):
    """sum over the batch of y . logp for int labels (the label's entry only) or one-hot/soft labels
    (y == 0 where logp is -inf contributes 0, not 0 * -inf = NaN: a saturated softmax has loss 0; a NaN
    still propagates)."""
    if labels.ndim == 1:
        return logp[np.arange(labels.shape[0]), class_ids(labels, logp.shape[1])].sum()
    y = labels.astype(logp.dtype, copy=False)
    with np.errstate(invalid="ignore"):
        return np.where((y == 0) & np.isneginf(logp), 0, y * logp).sum()


def _class_loss_infer(node, in_types):
    (sx, dt), (sl, ldt) = in_types[:2]
    if len(sx) != 2:
        node.fail(ShapeError, f"expects (batch, classes) scores, got {shapes.fmt(sx)}", "flatten/dense first")
    if len(sl) == 1:
        if not ldt.startswith("int"):
            node.fail(DTypeError, f"1-D labels must be integer class ids, got {ldt}",
                      "declare labels with dtype='int64', or feed one-hot (batch, classes) floats")
        if sl[0] != sx[0]:
            node.fail(ShapeError, f"labels {shapes.fmt(sl)} and scores {shapes.fmt(sx)} disagree on the batch", "")
    elif tuple(sl) != tuple(sx):
        node.fail(ShapeError, f"one-hot labels {shapes.fmt(sl)} must match scores {shapes.fmt(sx)}", "")
    return (), _float_dtype(node, in_types[:1])


def _sce_ref(inputs, attrs, ctx):
    z, labels = inputs
    dt, z = z.dtype, z.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return np.asarray(0.0 - label_dot(labels, logp) / z.shape[0], dt)    # 0.0 - : no -0.0


def _sce_grad(g, node, dy):
    z, labels = node.inputs
    with g.rule("softmax-ce:(O-y)/m"):
        dz = g.softmax_ce_grad(z, labels, dy)
    return [dz, _soft_label_grad(g, labels, lambda: g.log(g.softmax(z, axis=1)), dy, z)]


def _soft_label_grad(g, labels, log_p, dy, like):
    """d/dy of -sum(y log p)/m for float (one-hot or soft) labels that are graph values: -log(p)/m * dy.
    Integer class ids have no gradient."""
    if not labels.dtype.startswith("float"):
        return None
    with g.rule("ce:-log(p)/m"):
        return g.neg(g.mul(log_p(), _per_element(g, dy, like, float(like.shape[1]))))


def _sce_grad_ref(inputs, attrs, ctx):
    z, labels, dy = inputs
    y = labels_matrix(labels, z.shape[1], z.dtype)
    return ((softmax_ref(z, 1) - y) * (dy / z.shape[0])).astype(z.dtype)


def _sce_torch(F, torch, ins, attrs, ctx):
    z, y = ins
    return F.cross_entropy(z, y) if y.dim() == 1 else -(y * F.log_softmax(z, 1)).sum() / z.shape[0]


register(OpDef("softmax_cross_entropy", _class_loss_infer, _sce_ref, _sce_grad,
               flops=lambda i, o, a: 5 * int(np.prod(i[0])),
               doc="mean over the batch of -sum(y log softmax(z)); labels int (N,) or one-hot (N, K)",
               torch=_sce_torch))


def _per_element(g, dy, like, scale=1.0):
    """dy / like.size (times scale), broadcast to like's shape: the 1/m or 1/n of a mean-loss gradient,
    bound when the graph runs (the batch dim is symbolic)."""
    c = g.broadcast_like(dy, like, axes=tuple(range(len(like.shape))), keepdims=False, mean=True)
    return c if scale == 1.0 else g.mul(c, g.scalar(scale))


def _d_dy(g, node, dgrad, op):
    """Gradient of a loss-gradient op w.r.t. its upstream dy (a scalar): sum(dgrad * op(..., dy=1))."""
    return g.sum(g.mul(dgrad, getattr(g, op)(*node.inputs[:2], g.scalar(1.0))))


def _sce_grad_grad(g, node, dgrad):
    z, labels, dy = node.inputs
    with g.rule("softmax-ce-grad:jacobian"):    # d/dz of (softmax(z) - y) * dy/m: softmax's Jacobian
        h = g.mul(dgrad, _per_element(g, dy, z, float(z.shape[1])))
        p = g.softmax(z, axis=1)
        dz = g.mul(p, g.sub(h, g.sum(g.mul(h, p), axes=1, keepdims=True)))
        dl = g.neg(g.mul(dgrad, _per_element(g, dy, z, float(z.shape[1])))) \
            if labels.dtype.startswith("float") else None
        return [dz, dl, _d_dy(g, node, dgrad, "softmax_ce_grad")]


register(OpDef("softmax_ce_grad", lambda node, t: (t[0][0], t[0][1]), _sce_grad_ref, _sce_grad_grad,
               flops=lambda i, o, a: 5 * int(np.prod(o)), doc="(softmax(z) - y) / m * dy: the collapsed rule"))


def _ce_ref(inputs, attrs, ctx):
    p, labels = inputs
    with np.errstate(divide="ignore"):
        return np.asarray(0.0 - label_dot(labels, np.log(p.astype(np.float64))) / p.shape[0], p.dtype)


def _ce_grad_ref(inputs, attrs, ctx):
    p, labels, dy = inputs
    y = labels_matrix(labels, p.shape[1], p.dtype)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (np.where((y == 0) & (p == 0), 0, -(y / p)) * (dy / p.shape[0])).astype(p.dtype)   # as the loss


register(OpDef("cross_entropy", _class_loss_infer, _ce_ref,
               lambda g, n, dy: [_with(g, "ce:-y/p", lambda: g.cross_entropy_grad(n.inputs[0], n.inputs[1], dy)),
                                 _soft_label_grad(g, n.inputs[1], lambda: g.log(n.inputs[0]), dy, n.inputs[0])],
               doc="mean over the batch of -sum(y log p) for probabilities p"))


def _ce_grad_grad(g, node, dgrad):
    p, labels, dy = node.inputs
    with g.rule("ce-grad:local"):     # d/dp of -y/p * dy/m = -(out)/p;  d/dy = -1/p * dy/m
        dl = g.neg(g.mul(g.div(dgrad, p), _per_element(g, dy, p, float(p.shape[1])))) \
            if labels.dtype.startswith("float") else None
        return [g.mul(dgrad, g.neg(g.div(node.out, p))), dl, _d_dy(g, node, dgrad, "cross_entropy_grad")]


register(OpDef("cross_entropy_grad", lambda node, t: (t[0][0], t[0][1]), _ce_grad_ref, _ce_grad_grad,
               doc="-y / p / m * dy"))


def _with(g, rule, fn):
    with g.rule(rule):
        return fn()


def _pair_infer(node, in_types):
    (sa, _), (sb, _) = in_types[:2]
    if tuple(sa) != tuple(sb):
        node.fail(ShapeError, f"prediction {shapes.fmt(sa)} and target {shapes.fmt(sb)} must have the same shape", "")
    return (), _float_dtype(node, in_types[:2])


def _mse_grad(g, node, dy):
    a, b = node.inputs
    with g.rule("mse:2(p-t)/n"):
        da = g.mse_grad(a, b, dy)
        return [da, g.neg(da)]


# The mean losses' formulas, written once: each backend (numpy here, Numba, CUDA) evaluates these scalar
# expressions (the op table's elementwise language over a0 = prediction, a1 = target).
MSE_TERM = "(a0 - a1) * (a0 - a1)"
MSE_GRAD_TERM = "2.0 * (a0 - a1)"
BCE_TERM = "max(a0, 0.0) - a0 * a1 + math.log1p(math.exp(-abs(a0)))"     # stable for large |z|
BCE_GRAD_TERM = "0.5 * (math.tanh(0.5 * a0) + 1.0) - a1"                   # sigmoid(z) - t

_NUMPY = {"math": np, "max": np.maximum, "min": np.minimum, "abs": np.abs}


def eval_term(expr, *arrays):
    """A loss_term / grad_term expression evaluated elementwise over numpy arrays (a0, a1, ...)."""
    return eval(expr, dict(_NUMPY), {f"a{k}": a for k, a in enumerate(arrays)})  # noqa: S307 (the table's own text)


def _mean_loss_ref(inputs, attrs, ctx, term):
    a, b = inputs          # accumulated in float64, as the kernels do (a float32 partial sum can overflow)
    return np.asarray(np.mean(eval_term(term, a.astype(np.float64), b)), a.dtype)


def _mean_loss_grad_ref(inputs, attrs, ctx, term):
    a, b, dy = inputs
    return (eval_term(term, a, b) * (dy / a.size)).astype(a.dtype)


register(OpDef("mse", _pair_infer, lambda ins, a, ctx: _mean_loss_ref(ins, a, ctx, MSE_TERM),
               _mse_grad, doc="mean squared error over all elements", loss_term=MSE_TERM,
               torch=lambda F, torch, ins, a, ctx: F.mse_loss(*ins)))


def _mse_grad_grad(g, node, dgrad):
    a, b, dy = node.inputs
    with g.rule("mse-grad:local"):
        da = g.mul(dgrad, _per_element(g, dy, a, 2.0))
        return [da, g.neg(da), _d_dy(g, node, dgrad, "mse_grad")]


register(OpDef("mse_grad", lambda node, t: (t[0][0], t[0][1]),
               lambda ins, a, ctx: _mean_loss_grad_ref(ins, a, ctx, MSE_GRAD_TERM), _mse_grad_grad,
               doc="2 (p - t) / n * dy", grad_term=MSE_GRAD_TERM))


def _bce_grad(g, node, dy):
    z, t = node.inputs
    with g.rule("bce:(sigmoid(z)-t)/n"):
        dz = g.bce_grad(z, t, dy)
    with g.rule("bce:-z/n"):           # the targets are float graph values: d/dt = -z/n
        dt = g.neg(g.mul(z, _per_element(g, dy, z)))
    return [dz, dt]


register(OpDef("bce_with_sigmoid", _pair_infer, lambda ins, a, ctx: _mean_loss_ref(ins, a, ctx, BCE_TERM),
               _bce_grad,
               doc="binary cross-entropy of sigmoid(z) against targets t, mean over all elements (seeds/002)",
               loss_term=BCE_TERM, torch=lambda F, torch, ins, a, ctx: F.binary_cross_entropy_with_logits(*ins)))


def _bce_grad_grad(g, node, dgrad):
    z, t, dy = node.inputs
    with g.rule("bce-grad:local"):
        gc_ = g.mul(dgrad, _per_element(g, dy, z))
        s = g.sigmoid(z)
        return [g.mul(gc_, g.mul(s, g.sub(g.scalar(1.0), s))), g.neg(gc_), _d_dy(g, node, dgrad, "bce_grad")]


register(OpDef("bce_grad", lambda node, t: (t[0][0], t[0][1]),
               lambda ins, a, ctx: _mean_loss_grad_ref(ins, a, ctx, BCE_GRAD_TERM), _bce_grad_grad,
               doc="(sigmoid(z) - t) / n * dy", grad_term=BCE_GRAD_TERM))
