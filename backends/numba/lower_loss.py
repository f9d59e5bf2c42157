"""Softmax and the losses with their gradients (kernels/loss.py, kernels/reduce.py softmax_rows_k)."""
from graphc.backends import codegen
from graphc.backends.kernel_cache import load_generated
from graphc.backends.numba.kernels import loss as loss_kernels
from graphc.backends.numba.kernels.reduce import softmax_rows_k
from graphc.backends.registry import lowerings
from graphc.executable import check_labels

lowering, pattern_lowering = lowerings("numba")


@lowering("softmax", kernel="kernels/reduce.py softmax_rows_k (last axis; other axes: fallback)")
def softmax(ctx):
    shape = ctx.shape_of(ctx.name)
    if not shape or ctx.attrs["axis"] != len(shape) - 1:
        return None
    cols = shape[-1]
    return ctx.call(softmax_rows_k, ctx.inputs, (ctx.out().reshape(-1, cols),), fix=lambda a: a.reshape(-1, cols))


def _class_loss(int_kernel, dense_kernel, grad):
    """Lowering of a loss over (logits or probabilities, labels[, dy]): int class labels or dense rows.
    The int-label kernels return the first row whose label is outside 0..K-1 (they skip it): labels
    computed in the graph, which the feed check cannot see, are refused here."""
    def lower(ctx):
        dense = len(ctx.exe.graph.nx.nodes[ctx.inputs[1]]["shape"]) == 2
        kern, dtype = (dense_kernel if dense else int_kernel), ctx.dtype
        out = ctx.out()
        out = out.reshape(1) if out.ndim == 0 else out
        values, name, src = ctx.values, ctx.name, ctx.inputs[1]
        zi, li = ctx.index(ctx.inputs[0]), ctx.index(src)
        di = ctx.index(ctx.inputs[2]) if grad else None

        def step():
            labels = values[li]
            if dense and labels.dtype != dtype:
                labels = labels.astype(dtype)
            z = values[zi]
            bad = kern(z, labels, values[di].reshape(1), out) if grad else kern(z, labels, out)
            if bad >= 0:
                check_labels(src, labels, z.shape[1], name, "value")
        return step
    return lower


@lowering("mse", "mse_grad", "bce_with_sigmoid", "bce_grad",
          kernel="generated from the formula (the op table's loss_term / grad_term): the term's mean (float64 sum) or term * dy / n")
def mean_loss(ctx):
    """A mean loss over two same-shape arrays (and dy for the gradient), all read flat."""
    term, grad = codegen.mean_loss(ctx.op)
    kern = load_generated(codegen.NumbaDialect().mean_loss_source(term, grad, ctx.dtype.name), "graphc_loss_")
    return ctx.call(kern, ctx.inputs, (ctx.out().reshape(-1),), fix=lambda a: a.reshape(-1))


for _op, _int, _dense, _grad in (("softmax_cross_entropy", "sce_int_k", "sce_dense_k", False),
                                 ("softmax_ce_grad", "sce_grad_int_k", "sce_grad_dense_k", True),
                                 ("cross_entropy", "ce_int_k", "ce_dense_k", False),
                                 ("cross_entropy_grad", "ce_grad_int_k", "ce_grad_dense_k", True)):
    lowering(_op, kernel=f"kernels/loss.py {_int} / {_dense}")(
        _class_loss(getattr(loss_kernels, _int), getattr(loss_kernels, _dense), _grad))
