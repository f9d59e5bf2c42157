"""Batch norm and LRN kernels over flat NC(P) activations (P = H * W, 1 for (N, C) values).

Per-channel reductions run one block per channel (a grid-stride loop over channels), each thread summing
a strided share of the channel's N * P values, then a shared-memory tree: deterministic, no atomics.
Statistics are two-pass (the mean, then centred sums), as the reference. The elementwise passes
(normalise, dL/dx, LRN) are 1-D grid-stride loops. The mode reaches a kernel as an int argument (the
forward: the run's mode) or as the one-element is_training flag array (the backward ops' input).
"""
from __future__ import annotations

import math

import numpy as np

from graphc.backends.cuda.kernels.device import EW_BLOCK, cdiv, factory, grid1d, kernel, p2, sm_count

cuda = None                     # numba.cuda (bound by device.kernel)
NORM_BLOCK = 256                # threads of a per-channel reduction block at most (a power of two)


@factory("bn_stats", "fa, fa, i64, i64, i64, f")
def _mk_bn_stats(nbt):
    """stats[c] = mean of channel c, stats[C + c] = sum of its squared deviations (x flat (N, C, P))."""
    def bn_stats(x, stats, N, C, P, inv_m):
        sm = cuda.shared.array(NORM_BLOCK, nbt)
        t = cuda.threadIdx.x
        nt = cuda.blockDim.x
        M = N * P
        for c in range(cuda.blockIdx.x, C, cuda.gridDim.x):
            acc = nbt(0)
            for e in range(t, M, nt):
                n = e // P
                acc += x[(n * C + c) * P + e - n * P]
            sm[t] = acc
            cuda.syncthreads()
            h = nt // 2
            while h > 0:
                if t < h:
                    sm[t] += sm[t + h]
                cuda.syncthreads()
                h //= 2
            mu = sm[0] * inv_m
            cuda.syncthreads()
            acc = nbt(0)
            for e in range(t, M, nt):
                n = e // P
                d = x[(n * C + c) * P + e - n * P] - mu
                acc += d * d
            sm[t] = acc
            cuda.syncthreads()
            h = nt // 2
            while h > 0:
                if t < h:
                    sm[t] += sm[t + h]
                cuda.syncthreads()
                h //= 2
            if t == 0:
                stats[c] = mu
                stats[C + c] = sm[0]
            cuda.syncthreads()
    return bn_stats


@factory("bn_apply", "fa, fa, fa, fa, fa, fa, i64, i64, i64, f, f")
def _mk_bn_apply(nbt):
    """y = (x - mean[c]) / sqrt(var_scale * var[c] + eps) * gamma[c] + beta[c] over n elements."""
    def bn_apply(x, mean, var, gamma, beta, y, n, C, P, var_scale, eps):
        start = cuda.grid(1)
        step = cuda.gridsize(1)
        for i in range(start, n, step):
            c = (i // P) % C
            y[i] = (x[i] - mean[c]) * (gamma[c] / math.sqrt(var[c] * var_scale + eps)) + beta[c]
    return bn_apply


@factory("bn_running", "fa, fa, fa, i64, i64, f, f")
def _mk_bn_running(nbt):
    """out[c] = (1 - momentum) r[c] + momentum * (the mean, or the unbiased variance when var != 0)."""
    def bn_running(stats, r, out, C, var, inv_div, momentum):
        start = cuda.grid(1)
        step = cuda.gridsize(1)
        for c in range(start, C, step):
            s = stats[C + c] * inv_div if var != 0 else stats[c]
            out[c] = (nbt(1) - momentum) * r[c] + momentum * s
    return bn_running


@factory("bn_grad_sums", "fa, fa, fa, fa, fa, fa, i64, i64, i64, f, f")
def _mk_bn_grad_sums(nbt):
    """out (4, C): mean, istd of the mode (flag[0] != 0: the batch's), sum(dy), sum(dy * xhat)."""
    def bn_grad_sums(x, dy, rm, rv, flag, out, N, C, P, eps, inv_m):
        sm = cuda.shared.array((3, NORM_BLOCK), nbt)
        t = cuda.threadIdx.x
        nt = cuda.blockDim.x
        M = N * P
        training = flag[0] != nbt(0)
        for c in range(cuda.blockIdx.x, C, cuda.gridDim.x):
            mu = rm[c]
            if training:
                acc = nbt(0)
                for e in range(t, M, nt):
                    n = e // P
                    acc += x[(n * C + c) * P + e - n * P]
                sm[0, t] = acc
                cuda.syncthreads()
                h = nt // 2
                while h > 0:
                    if t < h:
                        sm[0, t] += sm[0, t + h]
                    cuda.syncthreads()
                    h //= 2
                mu = sm[0, 0] * inv_m
                cuda.syncthreads()
            v = nbt(0)
            sdy = nbt(0)
            sdx = nbt(0)
            for e in range(t, M, nt):
                n = e // P
                k = (n * C + c) * P + e - n * P
                d = x[k] - mu
                g = dy[k]
                v += d * d
                sdy += g
                sdx += g * d
            sm[0, t] = v
            sm[1, t] = sdy
            sm[2, t] = sdx
            cuda.syncthreads()
            h = nt // 2
            while h > 0:
                if t < h:
                    sm[0, t] += sm[0, t + h]
                    sm[1, t] += sm[1, t + h]
                    sm[2, t] += sm[2, t + h]
                cuda.syncthreads()
                h //= 2
            if t == 0:
                var = sm[0, 0] * inv_m if training else rv[c]
                istd = nbt(1) / math.sqrt(var + eps)
                out[c] = mu
                out[C + c] = istd
                out[2 * C + c] = sm[1, 0]
                out[3 * C + c] = sm[2, 0] * istd
            cuda.syncthreads()
    return bn_grad_sums


@factory("bn_grad_x", "fa, fa, fa, fa, fa, fa, i64, i64, i64, f")
def _mk_bn_grad_x(nbt):
    """dx = gamma istd (dy - (sum(dy) + xhat sum(dy xhat)) / M) (training, flag[0] != 0), gamma istd dy."""
    def bn_grad_x(x, dy, gamma, sums, flag, dx, n, C, P, inv_m):
        start = cuda.grid(1)
        step = cuda.gridsize(1)
        training = flag[0] != nbt(0)
        for i in range(start, n, step):
            c = (i // P) % C
            istd = sums[C + c]
            g = dy[i]
            if training:
                g -= (sums[2 * C + c] + (x[i] - sums[c]) * istd * sums[3 * C + c]) * inv_m
            dx[i] = gamma[c] * istd * g
    return bn_grad_x


@factory("lrn", "fa, fa, i64, i64, i64, i64, f, f, f")
def _mk_lrn(nbt):
    """y = x / (k + alpha / size * sum of x^2 over channels [c - size // 2, c + (size - 1) // 2])^beta."""
    def lrn(x, y, n, C, P, size, scale, beta, k):
        start = cuda.grid(1)
        step = cuda.gridsize(1)
        for i in range(start, n, step):
            c = (i // P) % C
            lo = c - size // 2
            if lo < 0:
                lo = 0
            hi = c + (size - 1) // 2
            if hi > C - 1:
                hi = C - 1
            acc = nbt(0)
            for j in range(lo, hi + 1):
                v = x[i + (j - c) * P]
                acc += v * v
            y[i] = x[i] * math.pow(k + scale * acc, -beta)
    return lrn


@factory("lrn_grad", "fa, fa, fa, i64, i64, i64, i64, f, f, f")
def _mk_lrn_grad(nbt):
    """dx = dy s^-beta - 2 alpha beta / size * x * sum over j in [c - (size - 1) // 2, c + size // 2] of
    dy_j x_j s_j^(-beta - 1); s recomputed per window (no work arrays)."""
    def lrn_grad(x, dy, dx, n, C, P, size, scale, beta, k):
        start = cuda.grid(1)
        step = cuda.gridsize(1)
        f = (beta + beta) * scale
        bm1 = -beta - nbt(1)
        for i in range(start, n, step):
            c = (i // P) % C
            back = nbt(0)
            s_c = nbt(1)
            jlo = c - (size - 1) // 2
            if jlo < 0:
                jlo = 0
            jhi = c + size // 2
            if jhi > C - 1:
                jhi = C - 1
            for j in range(jlo, jhi + 1):
                lo = j - size // 2
                if lo < 0:
                    lo = 0
                hi = j + (size - 1) // 2
                if hi > C - 1:
                    hi = C - 1
                acc = nbt(0)
                for q in range(lo, hi + 1):
                    v = x[i + (q - c) * P]
                    acc += v * v
                s = k + scale * acc
                ij = i + (j - c) * P
                back += dy[ij] * x[ij] * math.pow(s, bm1)
                if j == c:
                    s_c = s
            dx[i] = dy[i] * math.pow(s_c, -beta) - f * x[i] * back
    return lrn_grad


# ================================================================================================= steps

def _reduce_launch(C, M):
    """(grid, block) of a per-channel reduction: one block per channel, sized to the work."""
    return max(1, min(C, 65535)), max(32, p2(M, NORM_BLOCK))


def bn_stats_step(x, stats, ncp):
    """stats (2C) = per-channel mean and sum of squared deviations of x (flat (N, C, P))."""
    N, C, P = ncp
    grid, block = _reduce_launch(C, N * P)
    dt = np.dtype(stats.dtype)
    k, inv_m = kernel("bn_stats", dt), dt.type(1.0 / (N * P))
    return lambda: k[grid, block](x, stats, N, C, P, inv_m)


def bn_apply_step(x, mean, var, gamma, beta, y, ncp, var_scale, eps):
    N, C, P = ncp
    n = N * C * P
    dt = np.dtype(y.dtype)
    k = kernel("bn_apply", dt)
    grid, vs, e = grid1d(n), dt.type(var_scale), dt.type(eps)
    return lambda: k[grid, EW_BLOCK](x, mean, var, gamma, beta, y, n, C, P, vs, e)


def bn_running_step(stats, r, out, C, var, count, momentum):
    dt = np.dtype(out.dtype)
    k = kernel("bn_running", dt)
    grid = max(1, min(cdiv(C, EW_BLOCK), 4 * sm_count()))
    args = (stats, r, out, C, int(var), dt.type(1.0 / max(count - 1, 1)), dt.type(momentum))
    return lambda: k[grid, EW_BLOCK](*args)


def bn_grad_sums_step(x, dy, rm, rv, flag, out, ncp, eps):
    N, C, P = ncp
    grid, block = _reduce_launch(C, N * P)
    dt = np.dtype(out.dtype)
    k = kernel("bn_grad_sums", dt)
    eps, inv_m = dt.type(eps), dt.type(1.0 / (N * P))
    return lambda: k[grid, block](x, dy, rm, rv, flag, out, N, C, P, eps, inv_m)


def bn_grad_x_step(x, dy, gamma, sums, flag, dx, ncp):
    N, C, P = ncp
    n = N * C * P
    dt = np.dtype(dx.dtype)
    k, grid, inv_m = kernel("bn_grad_x", dt), grid1d(n), dt.type(1.0 / (N * P))
    return lambda: k[grid, EW_BLOCK](x, dy, gamma, sums, flag, dx, n, C, P, inv_m)


def lrn_step(x, y, ncp, attrs, dy=None):
    """y = lrn(x); with dy: y is dL/dx of lrn (lrn_grad)."""
    N, C, P = ncp
    n = N * C * P
    dt = np.dtype(y.dtype)
    size = int(attrs["size"])
    scal = (size, dt.type(attrs["alpha"] / size), dt.type(attrs["beta"]), dt.type(attrs["k"]))
    grid = grid1d(n)
    if dy is None:
        k = kernel("lrn", dt)
        return lambda: k[grid, EW_BLOCK](x, y, n, C, P, *scal)
    k = kernel("lrn_grad", dt)
    return lambda: k[grid, EW_BLOCK](x, dy, y, n, C, P, *scal)
