"""Batch norm and LRN kernels (@njit), over activations viewed as (N, C, P) with P = H * W (1 for (N, C)).

Batch norm works per channel (prange over C): the channel's N * P values are read two or three times in
a row (mean, then centred sums, then the output), so the repeated reads mostly hit the cache. Sums
accumulate in float64; the statistics are two-pass (mean, then centred squares), as the reference.
LRN works per (n, c) plane, summing the `size` planes of its channel window.
"""
import math

import numpy as np
from numba import njit, prange

from graphc.backends.codegen import FASTMATH


@njit(fastmath=FASTMATH, cache=True, nogil=True)
def _mean_var(x, c):
    """(mean, sum of squared deviations) of channel c of x (N, C, P), float64, two passes."""
    N, _, P = x.shape
    s = 0.0
    for n in range(N):
        for p in range(P):
            s += x[n, c, p]
    mu = s / (N * P)
    v = 0.0
    for n in range(N):
        for p in range(P):
            d = x[n, c, p] - mu
            v += d * d
    return mu, v


@njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
def bn_forward_k(x, gamma, beta, rm, rv, y, eps, training):
    """y = (x - mean) / sqrt(var + eps) * gamma + beta per channel; batch statistics when training."""
    N, C, P = x.shape
    for c in prange(C):
        if training:
            mu, v = _mean_var(x, c)
            var = v / (N * P)
        else:
            mu, var = rm[c], rv[c]
        a = gamma[c] / math.sqrt(var + eps)
        b = beta[c]
        for n in range(N):
            for p in range(P):
                y[n, c, p] = (x[n, c, p] - mu) * a + b


@njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
def bn_running_k(x, r, out, unbiased_var, momentum):
    """out = (1 - momentum) r + momentum * (the batch mean, or the unbiased batch variance)."""
    N, C, P = x.shape
    for c in prange(C):
        if unbiased_var:
            s = _mean_var(x, c)[1] / (N * P - 1)
        else:                                    # the mean alone: one pass, not two
            s = 0.0
            for n in range(N):
                for p in range(P):
                    s += x[n, c, p]
            s = s / (N * P)
        out[c] = (1.0 - momentum) * r[c] + momentum * s


@njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
def bn_grad_sums_k(x, dy, rm, rv, out, eps, training):
    """out (4, C): mean, istd (of the mode), sum(dy), sum(dy * xhat) per channel."""
    N, C, P = x.shape
    for c in prange(C):
        if training:
            s = 0.0
            for n in range(N):
                for p in range(P):
                    s += x[n, c, p]
            mu = s / (N * P)
        else:
            mu = rm[c]
        v, sdy, sdx = 0.0, 0.0, 0.0
        for n in range(N):
            for p in range(P):
                d = x[n, c, p] - mu
                g = dy[n, c, p]
                v += d * d
                sdy += g
                sdx += g * d
        istd = 1.0 / math.sqrt((v / (N * P) if training else rv[c]) + eps)
        out[0, c] = mu
        out[1, c] = istd
        out[2, c] = sdy
        out[3, c] = sdx * istd


@njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
def bn_grad_x_k(x, dy, gamma, sums, dx, training):
    """dx = gamma istd (dy - (sum(dy) + xhat sum(dy xhat)) / M) (training), gamma istd dy (inference)."""
    N, C, P = x.shape
    m = N * P
    for c in prange(C):
        mu, istd = sums[0, c], sums[1, c]
        k = gamma[c] * istd
        a = sums[2, c] / m if training else 0.0
        b = sums[3, c] * istd / m if training else 0.0
        for n in range(N):
            for p in range(P):
                dx[n, c, p] = k * (dy[n, c, p] - a - (x[n, c, p] - mu) * b)


@njit(fastmath=FASTMATH, cache=True, nogil=True)
def _window_scale(x, t, size, alpha, k, s):
    """s[p] = k + alpha / size * (sum of x[n, j, p]^2 over j in [c - size // 2, c + (size - 1) // 2]) for
    plane t = n * C + c, float64."""
    C, P = x.shape[1], x.shape[2]
    n = t // C
    c = t - n * C
    s[:] = 0.0
    for j in range(max(c - size // 2, 0), min(c + (size - 1) // 2, C - 1) + 1):
        for p in range(P):
            v = x[n, j, p]
            s[p] += v * v
    for p in range(P):
        s[p] = k + alpha / size * s[p]


@njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
def lrn_k(x, y, size, alpha, beta, k):
    """y = x / s^beta per plane (_window_scale)."""
    N, C, P = x.shape
    for t in prange(N * C):
        s = np.empty(P, np.float64)
        _window_scale(x, t, size, alpha, k, s)
        n = t // C
        c = t - n * C
        for p in range(P):
            y[n, c, p] = x[n, c, p] * s[p] ** -beta


@njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
def lrn_grad_k(x, dy, dx, sp, tw, size, alpha, beta, k):
    """dx of y = lrn(x); sp, tw: float64 work arrays shaped like x (s^-beta, and dy x s^(-beta - 1))."""
    N, C, P = x.shape
    for t in prange(N * C):
        s = np.empty(P, np.float64)
        _window_scale(x, t, size, alpha, k, s)
        n = t // C
        c = t - n * C
        for p in range(P):
            q = s[p] ** -beta
            sp[n, c, p] = q
            tw[n, c, p] = dy[n, c, p] * x[n, c, p] * q / s[p]
    f = 2.0 * alpha * beta / size
    for t in prange(N * C):
        n = t // C
        c = t - n * C
        back = np.zeros(P, np.float64)
        for j in range(max(c - (size - 1) // 2, 0), min(c + size // 2, C - 1) + 1):
            for p in range(P):
                back[p] += tw[n, j, p]
        for p in range(P):
            dx[n, c, p] = dy[n, c, p] * sp[n, c, p] - f * x[n, c, p] * back[p]
