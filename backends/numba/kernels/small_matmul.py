"""Small 2-D products without BLAS (a batch-1 dense layer): numpy's call into BLAS costs ~1 us of dispatch,
and a run that calls BLAS holds it to one thread around the call (~1 us more): mnist_convnet's 1600 -> 10
layer at batch 1 spent 2.2 us of a ~27 us inference there. Each output element is one sum over the inner
dimension in a fixed order (vectorised), so a row's values do not depend on how many rows there are."""
from numba import njit

from graphc.backends.codegen import FASTMATH


@njit(fastmath=FASTMATH, cache=True, nogil=True)
def dot_rows(a, bt, out):
    """out[i, j] = sum_k a[i, k] * bt[j, k]: a @ bt.T (bt: a dense layer's weights as stored, (out, in)).
    Each row of bt is read once for every row of a (the weights of a batch-1 layer come from memory)."""
    for j in range(bt.shape[0]):
        bj = bt[j]
        for i in range(a.shape[0]):
            ai = a[i]
            s = out.dtype.type(0)
            for k in range(a.shape[1]):
                s += ai[k] * bj[k]
            out[i, j] = s
