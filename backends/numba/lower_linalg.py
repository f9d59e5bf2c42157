"""matmul: numpy.matmul into the planned buffer (OpenBLAS sgemm/dgemm; Numba's own np.dot would call
the same BLAS through SciPy)."""
import numpy as np

from graphc.backends.registry import lowerings

lowering, pattern_lowering = lowerings("numba")


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

        def step():
            mm(a, b, out=out)
        return step
    values, ai, bi = ctx.values, ctx.index(ctx.inputs[0]), ctx.index(ctx.inputs[1])

    def step():
        mm(_t(values[ai], ta), _t(values[bi], tb), out=out)
    return step
