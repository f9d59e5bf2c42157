"""matmul: numpy.matmul (np.dot for 2-D products) into the planned buffer (OpenBLAS sgemm/dgemm; Numba's
own np.dot would call the same BLAS through SciPy). A 2-D a @ b.T of at most SMALL_MACS multiply-adds (a
batch-1 dense layer) runs kernels/small_matmul.py instead: no BLAS call, so no BLAS limit in that run. So
does one of at most FEW_ROWS rows whose weights b fill SPLIT_WEIGHT_BYTES, in blocks of outputs on graphc's
threads: such a product reads its weights from memory, which one core does at a fraction of the machine's
bandwidth (MobileNetV2's 1280 -> 1000 classifier, the fc.matmul row of `graphc bench mobilenet_v2 --batch 1`:
0.31 ms on one BLAS thread, 0.16 split, on a Zen 4).

BLAS is held to one thread from a run's first BLAS call (blas_in_use) to its end (its own threads beside
graphc's fought for the cores), so a large 2-D product is split into blocks of rows (or of columns, for
few rows) run on graphc's threads, as many blocks as Numba may run threads: the split does not depend on
how many run it, so neither do the bits. AlexNet's training step at batch 8 spent 59 ms of its 329 in
fully-connected products on one thread."""
import numba
import numpy as np

from graphc.backends.kernel_cache import blas_in_use
from graphc.backends.numba.kernels.small_matmul import dot_rows
from graphc.backends.numba.threads import parallel_for
from graphc.backends.registry import lowerings

lowering, pattern_lowering = lowerings("numba")

SPLIT_FLOPS = 2e7           # a 2-D product of at least this many FLOPs is split over the threads
SMALL_MACS = 1 << 16        # a 2-D a @ b.T of at most this many multiply-adds: no BLAS
FEW_ROWS = 4                # a 2-D a @ b.T of at most this many rows ...
SPLIT_WEIGHT_BYTES = 1 << 20  # ... and b of at least this many bytes: no BLAS, blocks of outputs on the threads


def _split(a, b, out):
    """A step computing out = a @ b (2-D) in blocks on graphc's threads, or None when it stays whole."""
    parts = numba.config.NUMBA_NUM_THREADS
    (M, K), N = a.shape, b.shape[1]
    if parts < 2 or out.ndim != 2 or 2 * M * N * K < SPLIT_FLOPS:
        return None
    if np.may_share_memory(out, a) or np.may_share_memory(out, b):
        return None                  # (numpy copies an overlapping operand first; blocks would race)
    mm = np.matmul
    if M >= 16 * parts:
        rows = [M * p // parts for p in range(parts + 1)]

        def block(lo, hi, k):
            for p in range(lo, hi):
                mm(a[rows[p]:rows[p + 1]], b, out=out[rows[p]:rows[p + 1]])
    else:
        cols = [N * p // parts for p in range(parts + 1)]

        def block(lo, hi, k):
            for p in range(lo, hi):
                mm(a, b[:, cols[p]:cols[p + 1]], out=out[:, cols[p]:cols[p + 1]])
    return lambda: parallel_for(block, parts)


def _rows_split(values, ai, bi, out):
    """out = a @ b.T by kernels/small_matmul.py, in as many blocks of output columns as Numba may run
    threads (each output the same sum whoever computes it: the bits do not depend on the thread count)."""
    parts = numba.config.NUMBA_NUM_THREADS
    cols = [out.shape[1] * p // parts for p in range(parts + 1)]

    def block(lo, hi, k):
        a, bt = values[ai], values[bi]
        for p in range(lo, hi):
            dot_rows(a, bt[cols[p]:cols[p + 1]], out[:, cols[p]:cols[p + 1]])

    return lambda: parallel_for(block, parts)


def _t(x, transpose):
    """x with its last two dims swapped (batched operands too)."""
    return x.swapaxes(-1, -2) if transpose else x


@lowering("matmul", kernel="numpy.matmul into the planned buffer (BLAS); small 2-D products and "
                           "few-row products with large weights (split over the threads): kernels/small_matmul.py")
def matmul(ctx):
    out = ctx.out()
    ta, tb = ctx.attrs.get("trans_a", False), ctx.attrs.get("trans_b", False)
    mm = np.matmul
    values, ai, bi = ctx.values, ctx.index(ctx.inputs[0]), ctx.index(ctx.inputs[1])
    sa, sb = ctx.shape_of(ctx.inputs[0]), ctx.shape_of(ctx.inputs[1])
    flat = out.ndim == 2 and len(sa) == 2 and len(sb) == 2
    inner = sa[0 if ta else 1]
    if flat and tb and not ta and out.size * inner <= SMALL_MACS:      # (a dense layer: b stored (out, in))
        def small_step():
            dot_rows(values[ai], values[bi], out)
        return small_step
    if flat and tb and not ta and out.shape[0] <= FEW_ROWS and out.shape[1] * inner * out.itemsize >= SPLIT_WEIGHT_BYTES:
        return _rows_split(values, ai, bi, out)
    stat = ctx.static()
    if stat is not None:
        a, b = _t(stat[0], ta), _t(stat[1], tb)
        split = _split(a, b, out) if a.ndim == 2 and b.ndim == 2 else None
        if split is not None:
            def split_static():
                blas_in_use()
                split()
            return split_static

        def step():
            blas_in_use()
            mm(a, b, out=out)
        return step
    if flat and 2 * out.size * inner >= SPLIT_FLOPS:
        def split_step():
            blas_in_use()
            a, b = _t(values[ai], ta), _t(values[bi], tb)
            run = _split(a, b, out)
            if run is None:
                mm(a, b, out=out)
            else:
                run()
        return split_step
    if flat:
        # np.dot: the same BLAS call with less of numpy's dispatch around it than np.matmul (~0.3 us)
        dot = np.dot

        def step():
            blas_in_use()
            a, b = values[ai], values[bi]
            dot(a.T if ta else a, b.T if tb else b, out=out)
        return step

    def step():
        blas_in_use()
        mm(_t(values[ai], ta), _t(values[bi], tb), out=out)
    return step
