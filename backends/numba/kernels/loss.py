"""Class loss kernels and their gradients: (rows M, classes ncls) logits or probabilities; labels as int
class indices or dense (one-hot) rows; dy a 1-element array. (The mean losses mse and bce are generated
from their formulas: the op table's loss_term / grad_term.)"""
import math

from numba import njit

from graphc.backends.codegen import FASTMATH
from graphc.backends.numba.kernels.reduce import softmax_row


@njit(fastmath=FASTMATH, cache=True, nogil=True)
def _logsumexp_row(z, i):
    """log(sum(exp(z[i]))), max-subtracted."""
    ncls = z.shape[1]
    m = z[i, 0]
    for k in range(1, ncls):
        if z[i, k] > m:
            m = z[i, k]
    s = 0.0
    for k in range(ncls):
        s += math.exp(z[i, k] - m)
    return m + math.log(s)


@njit(fastmath=FASTMATH, cache=True, nogil=True)
def sce_int_k(z, labels, out):
    """mean over rows of -log softmax(z)[label]"""
    M = z.shape[0]
    tot = 0.0
    for i in range(M):
        tot += _logsumexp_row(z, i) - z[i, labels[i]]
    out[0] = tot / M


@njit(fastmath=FASTMATH, cache=True, nogil=True)
def sce_dense_k(z, y, out):
    M, ncls = z.shape
    tot = 0.0
    for i in range(M):
        lse = _logsumexp_row(z, i)
        for k in range(ncls):
            tot -= y[i, k] * (z[i, k] - lse)
    out[0] = tot / M


@njit(fastmath=FASTMATH, cache=True, nogil=True)
def sce_grad_int_k(z, labels, dy, out):
    """(softmax(z) - onehot) * dy / M"""
    M = z.shape[0]
    scale = dy[0] / M
    for i in range(M):
        softmax_row(z, out, i, scale)
        out[i, labels[i]] -= scale


@njit(fastmath=FASTMATH, cache=True, nogil=True)
def sce_grad_dense_k(z, y, dy, out):
    M, ncls = z.shape
    scale = dy[0] / M
    for i in range(M):
        softmax_row(z, out, i, scale)
        for k in range(ncls):
            out[i, k] -= y[i, k] * scale


@njit(fastmath=FASTMATH, cache=True, nogil=True)
def ce_int_k(p, labels, out):
    M = p.shape[0]
    tot = 0.0
    for i in range(M):
        tot -= math.log(p[i, labels[i]])
    out[0] = tot / M


@njit(fastmath=FASTMATH, cache=True, nogil=True)
def ce_dense_k(p, y, out):
    M, ncls = p.shape
    tot = 0.0
    for i in range(M):
        for k in range(ncls):
            if y[i, k] != 0:
                tot -= y[i, k] * math.log(p[i, k])
    out[0] = tot / M


@njit(fastmath=FASTMATH, cache=True, nogil=True)
def ce_grad_int_k(p, labels, dy, out):
    M, ncls = p.shape
    scale = dy[0] / M
    for i in range(M):
        for k in range(ncls):
            out[i, k] = 0.0
        out[i, labels[i]] = -scale / p[i, labels[i]]


@njit(fastmath=FASTMATH, cache=True, nogil=True)
def ce_grad_dense_k(p, y, dy, out):
    M, ncls = p.shape
    scale = dy[0] / M
    for i in range(M):
        for k in range(ncls):
            out[i, k] = -(y[i, k] / p[i, k]) * scale
