"""matmul: numpy.matmul into the planned buffer (OpenBLAS sgemm/dgemm; Numba's own np.dot would call
the same BLAS through SciPy)."""
import numpy as np

from graphc.backends.registry import lowerings

lowering, pattern_lowering = lowerings("numba")


@lowering("matmul", kernel="numpy.matmul into the planned buffer (BLAS)")
def matmul(ctx):
    out = ctx.out()
    ta, tb = ctx.attrs.get("trans_a", False), ctx.attrs.get("trans_b", False)
    mm = np.matmul
    stat = ctx.static()
    if stat is not None:
        a = stat[0].T if ta else stat[0]
        b = stat[1].T if tb else stat[1]

        def step():
            mm(a, b, out=out)
        return step
    values, ai, bi = ctx.values, ctx.index(ctx.inputs[0]), ctx.index(ctx.inputs[1])

    def step():
        a = values[ai].T if ta else values[ai]
        b = values[bi].T if tb else values[bi]
        mm(a, b, out=out)
    return step
