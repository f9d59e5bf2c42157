"""The dropout mask from the reference's uniform draws."""
from numba import njit, prange

from graphc.backends.codegen import FASTMATH


@njit(fastmath=FASTMATH, cache=True, nogil=True)
def dropout_mask_k(u, rate, scale, out):
    """out = scale where u >= rate else 0 (u: the reference's float64 uniform draws, so the mask is
    the same bits as the reference backend's)."""
    for i in prange(u.size):
        out[i] = scale if u[i] >= rate else 0.0
