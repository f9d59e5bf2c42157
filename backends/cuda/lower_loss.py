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


def _labels(ctx, rows, ncls, steps):
    """The label input as a dense (rows, ncls) array: itself, or one-hot rows of int labels."""
    labels = ctx.inputs[1]
    if len(ctx.exe.graph.nx.nodes[labels]["shape"]) == 2:
        return ctx.array(labels)
    dense = ctx.alloc(rows * ncls)
    steps.append(onehot_step(ctx.array(labels), dense, rows, ncls))
    return dense


def _mean_step(ctx, x, n):
    return sum_outer_step(x, 1, 1, n, 1.0 / max(n, 1), ctx.out(), ctx.alloc)


@lowering("softmax_cross_entropy", kernel="kernels/softmax.py xent_rows (one-hot labels: xent_dense_rows) + a mean")
def softmax_cross_entropy(ctx):
    rows, ncls = ctx.shape_of(ctx.inputs[0])
    z, labels = ctx.arrays()
    per_row = ctx.alloc(rows)
    if len(ctx.exe.graph.nx.nodes[ctx.inputs[1]]["shape"]) == 2:
        first = xent_dense_rows_step(z, labels, per_row, rows, ncls)
    else:
        first = rows_step("xent_rows", z, labels, None, 1.0, per_row, rows, ncls)
    return seq([first, _mean_step(ctx, per_row, rows)])


@lowering("softmax_ce_grad", kernel="kernels/softmax.py xent_grad (one-hot labels: softmax rows + elementwise)")
def softmax_ce_grad(ctx):
    shape = ctx.shape_of(ctx.inputs[0])
    rows, ncls = shape
    z, labels, dy = ctx.arrays()
    if len(ctx.exe.graph.nx.nodes[ctx.inputs[1]]["shape"]) != 2:
        return rows_step("xent_grad", z, labels, dy, 1.0, ctx.out(), rows, ncls)
    p = ctx.alloc(rows * ncls)
    grad = expression_step(ctx, f"(a0 - a1) * (a2 / {literal(rows)})", [p, labels, dy], ctx.out(), shape,
                           [shape, shape, ()])
    return seq([rows_step("softmax", z, None, None, 1.0, p, rows, ncls), grad])


@lowering("cross_entropy", kernel="elementwise y * log(p) + a mean (int labels: one-hot rows first)")
def cross_entropy(ctx):
    shape = ctx.shape_of(ctx.inputs[0])
    steps = []
    dense = _labels(ctx, *shape, steps)
    n = int(np.prod(shape, dtype=np.int64))
    terms = ctx.alloc(n)
    steps.append(expression_step(ctx, "a1 * log(a0)", [ctx.array(ctx.inputs[0]), dense], terms, shape, [shape, shape]))
    steps.append(sum_outer_step(terms, 1, 1, n, -1.0 / max(shape[0], 1), ctx.out(), ctx.alloc))
    return seq(steps)


@lowering("cross_entropy_grad", kernel="elementwise -(y / p) * dy / rows (int labels: one-hot rows first)")
def cross_entropy_grad(ctx):
    shape = ctx.shape_of(ctx.inputs[0])
    steps = []
    dense = _labels(ctx, *shape, steps)
    steps.append(expression_step(ctx, f"-(a1 / a0) * (a2 / {literal(shape[0])})",
                                 [ctx.array(ctx.inputs[0]), dense, ctx.array(ctx.inputs[2])], ctx.out(), shape,
                                 [shape, shape, ()]))
    return seq(steps)


@lowering("mse", "mse_grad", "bce_with_sigmoid", "bce_grad",
          kernel="generated elementwise from the formula (the op table's loss_term / grad_term): + a mean, or term * dy / n")
def mean_loss(ctx):
    """The loss term elementwise then its mean; or the gradient term * dy / n in one kernel."""
    term, grad = codegen.mean_loss(ctx.op)
    shape = ctx.shape_of(ctx.inputs[0])
    n = int(np.prod(shape, dtype=np.int64))
    if grad:
        return expression_step(ctx, f"({term}) * (a2 / {literal(n)})", ctx.arrays(), ctx.out(), shape,
                               [shape, shape, ()])
    terms = ctx.alloc(n)
    return seq([expression_step(ctx, term, ctx.arrays(), terms, shape, [shape, shape]), _mean_step(ctx, terms, n)])
