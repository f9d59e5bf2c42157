"""matmul: numpy.matmul (np.dot for a small 2-D product) into the planned buffer (OpenBLAS sgemm/dgemm;
Numba's own np.dot would call the same BLAS through SciPy).

BLAS is held to one thread during a run (its own threads beside graphc's fought for the cores), so a
large 2-D product is split into blocks of rows (or of columns, for few rows) run on graphc's threads, as
many blocks as Numba may run threads: the split does not depend on how many run it, so neither do the
bits. AlexNet's training step at batch 8 spent 59 ms of its 329 in fully-connected products on one
thread."""
import numba
import numpy as np

from graphc.backends.numba.threads import parallel_for
from graphc.backends.registry import lowerings

lowering, pattern_lowering = lowerings("numba")

SPLIT_FLOPS = 2e7           # a 2-D product of at least this many FLOPs is split over the threads


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


def _t(x, transpose):
    """x with its last two dims swapped (batched operands too)."""
    return x.swapaxes(-1, -2) if transpose else x


@lowering("matmul", kernel="numpy.matmul into the planned buffer (BLAS)")
def matmul(ctx):
    out = ctx.out()
    ta, tb = ctx.attrs.get("trans_a", False), ctx.attrs.get("trans_b", False)
    mm = np.matmul
    stat = ctx.static()
    if stat is not None:
        a, b = _t(stat[0], ta), _t(stat[1], tb)
        split = _split(a, b, out) if a.ndim == 2 and b.ndim == 2 else None
        if split is not None:
            return split

        def step():
            mm(a, b, out=out)
        return step
    values, ai, bi = ctx.values, ctx.index(ctx.inputs[0]), ctx.index(ctx.inputs[1])
    sa, sb = ctx.shape_of(ctx.inputs[0]), ctx.shape_of(ctx.inputs[1])
    if out.ndim == 2 and len(sa) == 2 and len(sb) == 2 and 2 * out.size * sa[0 if ta else 1] >= SPLIT_FLOPS:
        def split_step():
            a, b = _t(values[ai], ta), _t(values[bi], tb)
            run = _split(a, b, out)
            if run is None:
                mm(a, b, out=out)
            else:
                run()
        return split_step

    if out.ndim == 2 and len(sa) == 2 and len(sb) == 2:
        # a small 2-D product: np.dot, the same BLAS call with less of numpy's dispatch around it than
        # np.matmul (a batch-1 dense layer of 1600 -> 10: 1.4 -> 1.1 us)
        dot = np.dot

        def step():
            a, b = values[ai], values[bi]
            dot(a.T if ta else a, b.T if tb else b, out=out)
        return step

    def step():
        mm(_t(values[ai], ta), _t(values[bi], tb), out=out)
    return step
