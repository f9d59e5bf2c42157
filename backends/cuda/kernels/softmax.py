"""Row softmax and cross-entropy kernels: one 32-thread row of the block per matrix row, SM_ROWS rows a
block; the one-hot rows of integer labels and the dense-label cross-entropy rows.

NaN and inf come out where the reference's (numpy's) do: the row max is NaN-propagating (a NaN in the
row makes the row NaN), the losses are formed in float64 as (z - max) - log(sum), and a label weight of
0 on a log p of -inf contributes 0 (a saturated softmax has loss 0). A label outside 0..K-1 is never
used as an index: its row gets NaN and the kernel sets ``flag[0]``, which the lowering reads (after the
kernel) when the labels are computed in the graph, where the feed check cannot see them."""
from __future__ import annotations

import math

import numpy as np
from numba import float64

from graphc.backends.cuda.kernels.device import (cdiv, check_shape, dummy, empty, factory, fdtype, flag_sink, flat,
                                                 kernel, launch1d, launcher, sm_count)
from graphc.errors import BackendError

cuda = None                     # numba.cuda (bound by device.kernel)
SM_ROWS = 8                     # rows per block (one 32-thread row each)
ROWS_SIGNATURE = "fa, ia, fa, f, fa, i64, i64, ia"
ROWS_SIGNATURES = (ROWS_SIGNATURE, "fa, la, fa, f, fa, i64, i64, ia")     # int32 or int64 labels


def _mk_softmax_family(which):
    """which: 0 softmax rows, 1 per-row cross-entropy loss, 2 cross-entropy gradient. The loss sums and
    logs in float64 (the reference's loss); softmax and its gradient stay in the dtype (the reference's
    softmax is float32 numpy for float32)."""
    def make(nbt):
        acc = float64 if which == 1 else nbt

        def softmax_rows(x, labels, dy, dyscale, out, M, Ncol, flag):
            sm = cuda.shared.array((SM_ROWS, 32), nbt)
            s64 = cuda.shared.array((SM_ROWS, 32), acc)
            tx = cuda.threadIdx.x
            ty = cuda.threadIdx.y
            neg_inf = nbt(-math.inf)
            zero = nbt(0)
            for r0 in range(cuda.blockIdx.x * SM_ROWS, M, cuda.gridDim.x * SM_ROWS):
                row = r0 + ty
                active = row < M
                base = row * Ncol
                mx = neg_inf
                if active:
                    for j in range(tx, Ncol, 32):
                        v = x[base + j]
                        if v > mx or v != v:
                            mx = v
                sm[ty, tx] = mx
                cuda.syncthreads()
                h = 16
                while h > 0:
                    if tx < h:
                        v = sm[ty, tx + h]
                        if v > sm[ty, tx] or v != v:
                            sm[ty, tx] = v
                    cuda.syncthreads()
                    h //= 2
                mx = sm[ty, 0]
                cuda.syncthreads()
                s = acc(0)
                if active:
                    for j in range(tx, Ncol, 32):
                        s += math.exp(acc(x[base + j]) - mx)
                s64[ty, tx] = s
                cuda.syncthreads()
                h = 16
                while h > 0:
                    if tx < h:
                        s64[ty, tx] += s64[ty, tx + h]
                    cuda.syncthreads()
                    h //= 2
                tot = s64[ty, 0]
                cuda.syncthreads()
                if active:
                    if which == 0:
                        inv = nbt(1) / nbt(tot)
                        for j in range(tx, Ncol, 32):
                            out[base + j] = math.exp(x[base + j] - mx) * inv
                    elif which == 1:
                        if tx == 0:
                            lab = labels[row]
                            if lab >= 0 and lab < Ncol:
                                out[row] = -((acc(x[base + lab]) - mx) - math.log(tot))
                            else:
                                out[row] = nbt(math.nan)
                                flag[0] = 1
                    else:
                        lab = labels[row]
                        g = dy[0] * dyscale / nbt(M)
                        inv = nbt(1) / nbt(tot)
                        bad = lab < 0 or lab >= Ncol
                        if bad and tx == 0:
                            flag[0] = 1
                        for j in range(tx, Ncol, 32):
                            p = math.exp(x[base + j] - mx) * inv
                            if j == lab:
                                p -= nbt(1)
                            if bad:
                                p = nbt(math.nan)
                            out[base + j] = p * g
        return softmax_rows
    return make


factory("softmax", ROWS_SIGNATURE)(_mk_softmax_family(0))
factory("xent_rows", ROWS_SIGNATURES)(_mk_softmax_family(1))
factory("xent_grad", ROWS_SIGNATURE)(_mk_softmax_family(2))


@factory("onehot", "la, fa, i64, i64, ia")
def _mk_onehot(nbt):
    """out (M, K): 1 where j == labels[row], else 0 (an out-of-range label gives a NaN row and sets
    flag[0]; no label is used as an index)."""
    def onehot_k(labels, out, n, ncls, flag):
        start = cuda.grid(1)
        step = cuda.gridsize(1)
        one = nbt(1)
        zero = nbt(0)
        for i in range(start, n, step):
            r = i // ncls
            lab = labels[r]
            if lab < 0 or lab >= ncls:
                out[i] = nbt(math.nan)
                flag[0] = 1
            elif lab == i - r * ncls:
                out[i] = one
            else:
                out[i] = zero
    return onehot_k


@factory("xent_dense_rows", "fa, fa, fa, i64, i64")
def _mk_xent_dense_rows(nbt):
    """rows[r] = -sum_j y[r, j] * log_softmax(z[r])_j in float64, one thread per row (max-subtracted;
    y == 0 on a log p of -inf adds 0)."""
    def xent_dense_rows(z, y, rows, M, ncls):
        start = cuda.grid(1)
        step = cuda.gridsize(1)
        for r in range(start, M, step):
            base = r * ncls
            mx = float64(z[base])
            for j in range(1, ncls):
                v = z[base + j]
                if v > mx or v != v:
                    mx = v
            tot = float64(0)
            for j in range(ncls):
                tot += math.exp(z[base + j] - mx)
            lt = math.log(tot)
            s = float64(0)
            for j in range(ncls):
                logp = (z[base + j] - mx) - lt
                yj = float64(y[base + j])
                if not (yj == 0 and logp == -math.inf):
                    s -= yj * logp
            rows[r] = s
    return xent_dense_rows


def rows_step(name, x, labels, dy, dyscale, out, M, ncls, flag=None):
    """A launch of the softmax family kernel `name` ("softmax", "xent_rows", "xent_grad") over M rows of
    ncls; labels and dy may be None where the kernel does not read them; flag (int32, 1 element) is set
    to 1 when a label is outside 0..ncls-1."""
    dt = np.dtype(x.dtype)
    grid = max(1, min(cdiv(M, SM_ROWS), 32 * sm_count()))
    labels = dummy(np.int32) if labels is None else labels
    dy = dummy(dt, 1) if dy is None else dy
    flag = flag_sink() if flag is None else flag
    return launcher(kernel(name, dt), grid, (32, SM_ROWS), x, labels, dy, dt.type(dyscale), out, M, ncls, flag)


def onehot_step(labels, out, M, ncls, flag=None):
    """out (M, ncls): 1 at each row's label, else 0 (an out-of-range label: a NaN row, flag[0] = 1)."""
    flag = flag_sink() if flag is None else flag
    return launch1d("onehot", np.dtype(out.dtype), M * ncls, labels, out, M * ncls, ncls, flag)


def xent_dense_rows_step(z, y, rows, M, ncls):
    """rows[r] = -sum_j y[r, j] * log_softmax(z[r])_j (dense labels)."""
    return launch1d("xent_dense_rows", np.dtype(z.dtype), M, z, y, rows, M, ncls)


# ============================================================================================== public API

def softmax(x):
    """Row-wise softmax of a 2-D array (max-subtracted)."""
    check_shape(x, 2, "softmax x")
    out = empty(x.shape, fdtype(x))
    M, ncls = (int(s) for s in x.shape)
    if M:
        rows_step("softmax", flat(x), None, None, 1.0, flat(out), M, ncls)()
    return out


def _check_labels(logits, labels):
    check_shape(logits, 2, "softmax_xent logits")
    if len(labels.shape) != 1 or int(labels.shape[0]) != int(logits.shape[0]):
        raise BackendError(f"softmax_xent: labels {tuple(labels.shape)} must be 1-D with one label per row of "
                           f"logits {tuple(logits.shape)}")
    if np.dtype(labels.dtype).kind not in "iu":
        raise BackendError(f"softmax_xent: labels must be integers, got {labels.dtype}")


def softmax_xent(logits, labels):
    """Mean over the batch of -log softmax(logits)[label]; a 0-d device array. Out-of-range labels
    give NaN (the executables refuse them: kernels/labels.py)."""
    from graphc.backends.cuda.kernels.reduce import reduce_sum
    _check_labels(logits, labels)
    M, ncls = (int(s) for s in logits.shape)
    rows = empty((M,), fdtype(logits))
    if M:
        rows_step("xent_rows", flat(logits), flat(labels), None, 1.0, rows, M, ncls)()
    return reduce_sum(rows, scale=1.0 / max(M, 1))


def softmax_xent_grad(logits, labels, dy=1.0):
    """d loss / d logits = (softmax - onehot) / N * dy; dy a number or a 1-element device array."""
    _check_labels(logits, labels)
    dt = fdtype(logits)
    out = empty(logits.shape, dt)
    if isinstance(dy, (int, float, np.number)):
        dyarr, scale = None, float(dy)
    else:
        if dy.size != 1:
            raise BackendError(f"softmax_xent_grad: dy must be a scalar, got shape {tuple(dy.shape)}")
        if np.dtype(dy.dtype) != dt:
            raise BackendError(f"softmax_xent_grad: dy dtype {dy.dtype} differs from logits {dt}")
        dyarr, scale = flat(dy), 1.0
    M, ncls = (int(s) for s in logits.shape)
    if M:
        rows_step("xent_grad", flat(logits), flat(labels), dyarr, scale, flat(out), M, ncls)()
    return out
