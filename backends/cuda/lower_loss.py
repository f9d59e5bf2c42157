"""Softmax and the losses with their gradients: the row kernels of kernels/softmax.py, generated
elementwise kernels (lower_elementwise.expression_step) and reductions."""
import numpy as np

from graphc.backends import codegen
from graphc.backends.codegen import literal
from graphc.backends.cuda.kernels.copy import copy_step, cstrides
from graphc.backends.cuda.kernels.device import seq
from graphc.backends.cuda.kernels.reduce import sum_outer_step
from graphc.backends.cuda.kernels.softmax import onehot_step, rows_step, xent_dense_rows_step
from graphc.backends.cuda.lower_elementwise import expression_step
from graphc.backends.registry import lowerings
from graphc.executable import check_labels, label_source

lowering, pattern_lowering = lowerings("cuda")


@lowering("softmax", kernel="kernels/softmax.py rows (another axis than the last: permuted there and back)")
def softmax(ctx):
    shape = ctx.shape_of(ctx.name)
    axis = ctx.attrs["axis"]
    ncls = shape[axis]
    rows = int(np.prod(shape, dtype=np.int64)) // max(ncls, 1)
    x, out = ctx.array(ctx.inputs[0]), ctx.out()
    if axis == len(shape) - 1:
        return rows_step("softmax", x, None, None, 1.0, out, rows, ncls)
    perm = [d for d in range(len(shape)) if d != axis] + [axis]
    moved = [shape[d] for d in perm]
    xst, mst = cstrides(shape), cstrides(moved)
    t1, t2 = ctx.alloc(rows * ncls), ctx.alloc(rows * ncls)
    there = copy_step(x, t1, moved, [xst[d] for d in perm], mst)
    back = copy_step(t2, out, shape, [mst[perm.index(d)] for d in range(len(shape))], xst)
    if there is None or back is None:
        return None
    return seq([there, rows_step("softmax", t1, None, None, 1.0, t2, rows, ncls), back])


def label_check(ctx):
    """(flag, step) for a class-loss node with int labels: the kernels set the int32 flag when a label is
    outside 0..K-1 (they never index with it), and the step, run right after them (before any update
    of a training step), reads it and raises the FeedError. Labels that are fed or const were checked
    before the run: (None, None), no flag is read (reading one waits for the device)."""
    src = ctx.inputs[1]
    if label_source(ctx.exe.graph, src) in ctx.exe.labels:
        return None, None
    flag, host = ctx.alloc(1, np.int32), np.zeros(1, np.int32)
    flag.copy_to_device(host)
    labels, ncls, name = ctx.array(src), ctx.shape_of(ctx.inputs[0])[1], ctx.name

    def check():
        flag.copy_to_host(host)
        if host[0]:
            flag.copy_to_device(np.zeros(1, np.int32))
            check_labels(src, labels.copy_to_host(), ncls, name, "value")
    return flag, check


def _int_labels(ctx):
    return len(ctx.exe.graph.nx.nodes[ctx.inputs[1]]["shape"]) == 1


def _labels(ctx, rows, ncls, steps):
    """The label input as a dense (rows, ncls) array: itself, or one-hot rows of int labels (checked)."""
    labels = ctx.inputs[1]
    if not _int_labels(ctx):
        return ctx.array(labels)
    dense = ctx.alloc(rows * ncls)
    flag, check = label_check(ctx)
    steps += [onehot_step(ctx.array(labels), dense, rows, ncls, flag), check]
    return dense


def _mean_step(ctx, x, n):
    return sum_outer_step(x, 1, 1, n, 1.0 / max(n, 1), ctx.out(), ctx.alloc)


@lowering("softmax_cross_entropy", kernel="kernels/softmax.py xent_rows (one-hot labels: xent_dense_rows) + a mean")
def softmax_cross_entropy(ctx):
    rows, ncls = ctx.shape_of(ctx.inputs[0])
    z, labels = ctx.arrays()
    per_row = ctx.alloc(rows)
    if not _int_labels(ctx):
        return seq([xent_dense_rows_step(z, labels, per_row, rows, ncls), _mean_step(ctx, per_row, rows)])
    flag, check = label_check(ctx)
    return seq([rows_step("xent_rows", z, labels, None, 1.0, per_row, rows, ncls, flag), check,
                _mean_step(ctx, per_row, rows)])


@lowering("softmax_ce_grad", kernel="kernels/softmax.py xent_grad (one-hot labels: softmax rows + elementwise)")
def softmax_ce_grad(ctx):
    shape = ctx.shape_of(ctx.inputs[0])
    rows, ncls = shape
    z, labels, dy = ctx.arrays()
    if _int_labels(ctx):
        flag, check = label_check(ctx)
        return seq([rows_step("xent_grad", z, labels, dy, 1.0, ctx.out(), rows, ncls, flag), check])
    p = ctx.alloc(rows * ncls)
    grad = expression_step(ctx, f"(a0 - a1) * (a2 / {literal(rows)})", [p, labels, dy], ctx.out(), shape,
                           [shape, shape, ()])
    return seq([rows_step("softmax", z, None, None, 1.0, p, rows, ncls), grad])


# The reference's terms (graphc/ops/loss.py label_dot): int labels read the label's entry only; dense
# ones add y * log(p) except where y == 0 and p == 0 (0 * -inf: a saturated softmax has loss 0). In
# float64, summed in float64, as the reference.
_CE_TERM = {True: "log(a0) if a1 != 0 else 0", False: "0 if a1 == 0 and a0 == 0 else a1 * log(a0)"}


@lowering("cross_entropy", kernel="elementwise y * log(p) in float64 + a mean (int labels: one-hot rows first)")
def cross_entropy(ctx):
    shape = ctx.shape_of(ctx.inputs[0])
    steps = []
    dense = _labels(ctx, *shape, steps)
    n = int(np.prod(shape, dtype=np.int64))
    terms = ctx.alloc(n, np.float64)
    steps.append(expression_step(ctx, _CE_TERM[_int_labels(ctx)], [ctx.array(ctx.inputs[0]), dense], terms, shape,
                                 [shape, shape], np.float64))
    steps.append(sum_outer_step(terms, 1, 1, n, -1.0 / max(shape[0], 1), ctx.out(), ctx.alloc))
    return seq(steps)


@lowering("cross_entropy_grad", kernel="elementwise -(y / p) * dy / rows, 0 where y == p == 0 (int labels: one-hot "
                                       "rows first)")
def cross_entropy_grad(ctx):
    shape = ctx.shape_of(ctx.inputs[0])
    steps = []
    dense = _labels(ctx, *shape, steps)
    steps.append(expression_step(ctx, f"(0 if a1 == 0 and a0 == 0 else -(a1 / a0)) * (a2 / {literal(shape[0])})",
                                 [ctx.array(ctx.inputs[0]), dense, ctx.array(ctx.inputs[2])], ctx.out(), shape,
                                 [shape, shape, ()]))
    return seq(steps)


@lowering("mse", "mse_grad", "bce_with_sigmoid", "bce_grad",
          kernel="generated elementwise from the formula (the op table's loss_term / grad_term): in float64 + a mean, "
                 "or term * dy / n")
def mean_loss(ctx):
    """The loss term elementwise in float64 (as the reference: a float32 square overflows where the loss
    does not) then its mean; or the gradient term * dy / n in one kernel."""
    term, grad = codegen.mean_loss(ctx.op)
    shape = ctx.shape_of(ctx.inputs[0])
    n = int(np.prod(shape, dtype=np.int64))
    if grad:
        return expression_step(ctx, f"({term}) * (a2 / {literal(n)})", ctx.arrays(), ctx.out(), shape,
                               [shape, shape, ()])
    terms = ctx.alloc(n, np.float64)
    return seq([expression_step(ctx, term, ctx.arrays(), terms, shape, [shape, shape], np.float64),
                _mean_step(ctx, terms, n)])
