"""Class loss kernels and their gradients: (rows M, classes ncls) logits or probabilities; labels as int
class indices or dense (one-hot or soft) rows; dy a 1-element array. (The mean losses mse and bce are
generated from their formulas: the op table's loss_term / grad_term.)

They follow the reference (graphc/ops/loss.py) operation by operation, so NaN and inf come out where
numpy's do: the losses in float64, the row max NaN-propagating, log p = (z - max) - log(sum), a label
weight of 0 on a log p of -inf contributes 0 (a saturated softmax has loss 0), the gradients' -y/p is 0
where y == p == 0, and no ZeroDivisionError (error_model "numpy": 1/0 is inf). No fastmath: these rows
are short, and reassociation would move the reference's NaN/inf cases.

The int-label kernels check every label against 0..ncls-1 before they index with it (a label computed
inside the graph, which the feed check cannot see, e.g. a concat of labels with a const) and return the
first bad row (-1: all in range); a bad row reads column 0 instead, so nothing is read or written
outside z and out, and the lowering raises the FeedError. (Measured: the check costs about nothing,
a compare per row beside a row's exps; skipping the row with `continue` cost 2-3 %.)"""
import math

from numba import njit

from graphc.backends.numba.kernels.reduce import softmax_row

_JIT = {"cache": True, "nogil": True, "error_model": "numpy"}
# The row helpers below are inlined into their callers by Numba (inline="always": same flags, the same
# machine code): compiled apart, each was a compile of its own (0.04-0.05 s) in every process compiling
# a caller; the two int-label kernels' compile measured 0.42 s of CPU with them apart, 0.33 s inlined.


@njit(inline="always", **_JIT)
def _row_max(z, i):
    """max of z[i] as float64; NaN if the row holds one (np.max's rule)."""
    m = float(z[i, 0])
    for k in range(1, z.shape[1]):
        v = z[i, k]
        if v > m or v != v:
            m = v
    return m


@njit(inline="always", **_JIT)
def _log_sum_exp(z, i, m):
    """log(sum(exp(z[i] - m))) in float64."""
    s = 0.0
    for k in range(z.shape[1]):
        s += math.exp(z[i, k] - m)
    return math.log(s)


@njit(inline="always", **_JIT)
def _weighted(y, logp):
    """y * log p in float64, 0 where y == 0 and log p == -inf (graphc.ops.loss.label_dot's rule)."""
    y = float(y)
    return 0.0 if y == 0 and logp == -math.inf else y * logp


@njit(inline="always", **_JIT)
def _label(labels, i, ncls, bad, outside):
    """(labels[i], bad) when the label is in 0..ncls-1; else (`outside`: a column the kernel may use, or
    -1 for none, and the first bad row so far): no kernel indexes with a bad label, the caller raises."""
    lab = labels[i]
    if lab < 0 or lab >= ncls:
        return outside, (i if bad < 0 else bad)
    return lab, bad


@njit(**_JIT)
def sce_int_k(z, labels, out):
    """mean over rows of -log softmax(z)[label]; returns the first row whose label is outside 0..ncls-1."""
    M, ncls = z.shape
    tot = 0.0
    bad = M - M - 1       # an int64 from the start, not the literal -1
    for i in range(M):
        lab, bad = _label(labels, i, ncls, bad, 0)
        m = _row_max(z, i)
        tot += (z[i, lab] - m) - _log_sum_exp(z, i, m)
    out[0] = 0.0 - tot / M
    return bad


@njit(**_JIT)
def sce_dense_k(z, y, out):
    M, ncls = z.shape
    tot = 0.0
    for i in range(M):
        m = _row_max(z, i)
        lse = _log_sum_exp(z, i, m)
        for k in range(ncls):
            tot += _weighted(y[i, k], (z[i, k] - m) - lse)
    out[0] = 0.0 - tot / M
    return -1


@njit(**_JIT)
def sce_grad_int_k(z, labels, dy, out):
    """(softmax(z) - onehot) * dy / M; returns the first row with a label outside 0..ncls-1."""
    M, ncls = z.shape
    scale = dy[0] / M
    bad = M - M - 1
    for i in range(M):
        softmax_row(z, out, i, scale)
        lab, bad = _label(labels, i, ncls, bad, 0)
        out[i, lab] -= scale
    return bad


@njit(**_JIT)
def sce_grad_dense_k(z, y, dy, out):
    M, ncls = z.shape
    scale = dy[0] / M
    for i in range(M):
        softmax_row(z, out, i, scale)
        for k in range(ncls):
            out[i, k] -= y[i, k] * scale
    return -1


@njit(**_JIT)
def ce_int_k(p, labels, out):
    M, ncls = p.shape
    tot = 0.0
    bad = M - M - 1
    for i in range(M):
        lab, bad = _label(labels, i, ncls, bad, 0)
        tot += math.log(float(p[i, lab]))
    out[0] = 0.0 - tot / M
    return bad


@njit(**_JIT)
def ce_dense_k(p, y, out):
    M, ncls = p.shape
    tot = 0.0
    for i in range(M):
        for k in range(ncls):
            tot += _weighted(y[i, k], math.log(float(p[i, k])))
    out[0] = 0.0 - tot / M
    return -1


@njit(**_JIT)
def ce_grad_int_k(p, labels, dy, out):
    """-(y / p) * dy / M in p's dtype, 0 where y == p == 0 (y one-hot: -(0 / p) is NaN where p is)."""
    M, ncls = p.shape
    T = out.dtype.type
    scale = dy[0] / T(M)
    zero, one = T(0), T(1)
    bad = M - M - 1
    for i in range(M):
        lab, bad = _label(labels, i, ncls, bad, -1)
        for k in range(ncls):
            y = one if k == lab else zero
            pk = p[i, k]
            out[i, k] = (zero if y == 0 and pk == 0 else -(y / pk)) * scale
    return bad


@njit(**_JIT)
def ce_grad_dense_k(p, y, dy, out):
    M, ncls = p.shape
    T = out.dtype.type
    scale = dy[0] / T(M)
    zero = T(0)
    for i in range(M):
        for k in range(ncls):
            yk, pk = y[i, k], p[i, k]
            out[i, k] = (zero if yk == 0 and pk == 0 else -(yk / pk)) * scale
    return -1
