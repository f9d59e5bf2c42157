"""The winograd conv strategy: Winograd F(4x4, 3x3) with BLAS products, for 3x3 stride-1 convs with many
channels (VGG's, ResNet's and AlexNet's 64-512-channel layers): forward, dL/dX and dL/dW.

Forward: each 4x4 block of output pixels (a tile) is made from the 6x6 input patch around it: its
transform V = B^T d B (36 values per channel), then for each of the 36 transform points p a product over
the input channels, M[p] (K x tiles) = U[p] (K x C) @ V[p] (C x tiles), with the filters transformed
once a call (U = G g G^T, a GEMM), and the output transform Y = A^T M A (+ bias, ReLU, or a 2x2/2 max
pool, whose windows lie inside a tile). The products take 36 multiply-adds per 16 outputs against the
direct kernel's 144, and run as BLAS GEMMs: one thread of OpenBLAS at ~200 GFLOP/s on these shapes
(its AVX-512 kernels on this machine), where the direct kernel runs at its FMA peak of ~190.
dL/dX is the forward of dy with the filters turned 180 degrees and transposed (pads 2 - p). dL/dW is
the adjoint: dU[p] (K x C) = sum over tiles of D[p] (K x tiles) @ V[p]^T, D = A dY A^T of each 4x4 tile
of dy, then dW = G^T dU G.

The batch's tile rows (over images) are cut into chunks, each transformed, multiplied (one BLAS thread)
and transformed back by one thread while its V and M stay in cache; where every chunk re-reading U would
move more memory than V and M of the whole batch (512 channels on 7x7 to 28x28 planes), each step runs
once over the whole batch instead, the threads splitting channels, points, then filters. dL/dW sums
chunks into fixed partial sums (or runs whole, for large K x C). Chunks and split work are sized by the
threads Numba may run, not by those running now: results do not depend on the thread count.

Rounding: the transforms add and subtract scaled inputs before the products, so float32 results differ
from the direct sum by ~1e-6 of the largest output (the direct kernel's by ~1e-7): the strategy is
chosen for float32 only (strategy.py); float64 runs it only when asked (errors ~1e-15). Non-finite
values are not Winograd's to handle (an inf input makes NaN where the direct sum gives inf, a pooled
window could drop a NaN): a call whose outputs before the epilogue hold a NaN or an inf is run again
by the direct kernel.

Layout: the input is placed in zero-padded planes (Hp x Wp, covering every tile's patch); U (36, K, C);
V (36, C, T) and M (36, K, T) flat, T tiles row-major, planes plane_stride apart.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import njit

from graphc.backends.kernel_cache import BlasLimit
from graphc.backends.numba.conv import direct
from graphc.backends.numba.conv.im2col import kernel_ready
from graphc.backends.numba.conv.layout import new_or, out_hw, place, pool_hw, scratch
from graphc.backends.numba.precompile import discovering_here
from graphc.backends.numba.threads import parallel_for
from graphc.backends.codegen import FASTMATH

CHUNK_BYTES = 3 << 20        # a chunk's V and M together at most this big (~ a core's share of L3) ...
MIN_TILES = 32               # ... but at least this many tiles (BLAS on thinner products runs slower)
WHOLE_RATIO = 1.0            # chunks re-read the filters U; above this ratio to the batch's V and M: whole
DW_PARTIAL_BYTES = 4 << 20   # dL/dW in chunks (a partial sum of the 36 x K x C point gradients per thread)
                             # up to this size, else over the whole batch at once


def applies(x_shape, w_shape, stride, dil=(1, 1), groups=1) -> bool:
    """Whether this conv (its forward, dL/dX and dL/dW) is one for Winograd F(4x4, 3x3)."""
    return (tuple(w_shape[2:]) == (3, 3) and int(stride) == 1 and tuple(dil) == (1, 1) and int(groups) == 1)


# ------------------------------------------------------------------------------------------ kernels

@njit(fastmath=FASTMATH, inline="always")
def _bt(d0, d1, d2, d3, d4, d5, kc):
    """B^T d of F(4x4, 3x3) (interpolation points 0, 1, -1, 2, -2, inf); kc = (2, 4, 5, 8) in the
    arrays' dtype (a float64 literal would turn float32 arithmetic into float64)."""
    k2, k4, k5 = kc[0], kc[1], kc[2]
    return (k4 * d0 - k5 * d2 + d4, d3 + d4 - k4 * (d1 + d2), k4 * (d1 - d2) - d3 + d4,
            k2 * (d3 - d1) - d2 + d4, k2 * (d1 - d3) - d2 + d4, k4 * d1 - k5 * d3 + d5)


@njit(fastmath=FASTMATH, inline="always")
def _at(m0, m1, m2, m3, m4, m5, kc):
    """A^T m of F(4x4, 3x3)."""
    a, b = m1 + m2, m1 - m2
    c, d = m3 + m4, m3 - m4
    return m0 + a + c, b + kc[0] * d, a + kc[1] * c, b + kc[3] * d + m5


# The kernels index flat arrays with unsigned offsets: Numba wraps a negative signed index around, and
# that select made every load of a vector loop a gather. The planes of one transform point are a cache
# line more than a multiple of 16 values apart (plane_stride): 36 streams a multiple of 4 KiB apart fell
# into one set of the L1 cache and evicted each other (the output transform of 112 tiles x 64 filters
# took 0.31 ms, 0.09 with the planes apart).
_U = np.uint64


def stride_of(n):
    """The distance between the planes of n values of V, M and yt."""
    return (n + 15) // 16 * 16 + 16


plane_stride = njit(cache=True, nogil=True)(stride_of)      # (in the kernels; Python calls stride_of, which
                                                            # a kernel discovery does not intercept)


@njit(fastmath=FASTMATH, cache=True, nogil=True)
def _input_k(xp, V, rows, kc, g0, R, th, tw, Wp, c_lo, c_hi):
    """Channels c_lo..c_hi-1 of V (36, C, R*tw), flat (planes plane_stride apart), of the tile rows
    g0..g0+R-1 of the batch (row g: image g // th, its tile row g % th) of the padded planes xp (N, C,
    Hp*Wp): each row's transform along columns first (contiguous), into rows (6, Wp), then along rows."""
    C = xp.shape[1]
    w = _U(Wp)
    w2, w3, w4, w5 = w + w, _U(3) * w, _U(4) * w, _U(5) * w
    ct = _U(plane_stride(C * R * tw))
    ct2, ct3, ct4, ct5 = ct + ct, _U(3) * ct, _U(4) * ct, _U(5) * ct
    one, four = _U(1), _U(4)
    for c in range(c_lo, c_hi):
        for r in range(R):
            plane = xp[(g0 + r) // th, c]
            top = _U(4 * ((g0 + r) % th) * Wp)
            for q in range(w):
                o = top + q
                t = _bt(plane[o], plane[o + w], plane[o + w2], plane[o + w3], plane[o + w4], plane[o + w5], kc)
                rows[q], rows[q + w], rows[q + w2], rows[q + w3], rows[q + w4], rows[q + w5] = t
            for a in range(6):
                src = _U(a * Wp)
                dst = _U(a * 6) * ct + _U(c * R * tw + r * tw)
                for j in range(_U(tw)):
                    q = src + four * j
                    t = _bt(rows[q], rows[q + one], rows[q + one + one], rows[q + _U(3)], rows[q + four],
                            rows[q + _U(5)], kc)
                    o = dst + j
                    V[o], V[o + ct], V[o + ct2], V[o + ct3], V[o + ct4], V[o + ct5] = t


@njit(fastmath=FASTMATH, inline="always")
def _a6(e0, e1, e2, e3, kc):
    """A e of F(4x4, 3x3) (4 outputs' gradients to the 6 points: the adjoint of A^T)."""
    s02, s13 = e0 + e2, e1 + e3
    t02, t13 = e0 + kc[1] * e2, kc[0] * e1 + kc[3] * e3
    return e0, s02 + s13, s02 - s13, t02 + t13, t02 - t13, e3


@njit(fastmath=FASTMATH, cache=True, nogil=True)
def _dy_k(dyp, D, rows, kc, g0, R, th, tw, k_lo, k_hi):
    """Filters k_lo..k_hi-1 of D (36, K, R*tw), flat (planes plane_stride apart): A dY A^T of every 4x4
    tile in the batch's tile rows g0..g0+R-1 (as _input_k's) of dy, placed in zero planes dyp (N, K, 4th
    x 4tw) (rows first, as _input_k)."""
    K = dyp.shape[1]
    Wd = 4 * tw
    T = R * tw
    w = _U(Wd)
    w2, w3 = w + w, _U(3) * w
    ct = _U(plane_stride(K * T))
    ct2, ct3, ct4, ct5 = ct + ct, _U(3) * ct, _U(4) * ct, _U(5) * ct
    one, four = _U(1), _U(4)
    for k in range(k_lo, k_hi):
        for r in range(R):
            g = g0 + r
            plane = dyp[g // th, k]
            top = _U(4 * (g % th) * Wd)
            for q in range(w):
                o = top + q
                t = _a6(plane[o], plane[o + w], plane[o + w2], plane[o + w3], kc)
                rows[q], rows[q + w], rows[q + w2], rows[q + w3], rows[q + four * w], rows[q + _U(5) * w] = t
            for a in range(6):
                src = _U(a * Wd)
                dst = _U(a * 6) * ct + _U(k * T + r * tw)
                for j in range(_U(tw)):
                    q = src + four * j
                    t = _a6(rows[q], rows[q + one], rows[q + one + one], rows[q + _U(3)], kc)
                    o = dst + j
                    D[o], D[o + ct], D[o + ct2], D[o + ct3], D[o + ct4], D[o + ct5] = t


@njit(cache=True, nogil=True)
def _dw_products_k(D, V, dU, T, lo, hi):
    """dU[p] (K, C) = D[p] (K, T) @ V[p]^T for points lo..hi-1 (the filters' gradient at the 36 points,
    summed over every tile). BLAS; keep it to one thread around this call."""
    K, C = dU.shape[1], dU.shape[2]
    sd, sv = plane_stride(K * T), plane_stride(C * T)
    for p in range(lo, hi):
        np.dot(D[p * sd:p * sd + K * T].reshape(K, T), V[p * sv:p * sv + C * T].reshape(C, T).T, dU[p])


@njit(cache=True, nogil=True)
def _dw_chunks_k(xp, dyp, V, D, rows, dU, tmp, kc, Wp, th, tw, R, G, g):
    """Group g of G of the chunks of dL/dW (chunk c, R tile rows from c*R, belongs to group c % G): for
    each, V and D of its rows (in cache), then dU[p] (K, C) += D[p] @ V[p]^T (the first one stores).
    Groups are fixed by the count Numba may run, not the count it runs, so the sums do not depend on it."""
    C, K = xp.shape[1], dyp.shape[1]
    rows_all = xp.shape[0] * th
    nc = (rows_all + R - 1) // R
    first = True
    for c in range(g, nc, G):
        r = min(R, rows_all - c * R)
        T = r * tw
        _input_k(xp, V, rows, kc, c * R, r, th, tw, Wp, 0, C)
        _dy_k(dyp, D, rows, kc, c * R, r, th, tw, 0, K)
        sd, sv = plane_stride(K * T), plane_stride(C * T)
        for p in range(36):
            dp = D[p * sd:p * sd + K * T].reshape(K, T)
            vp = V[p * sv:p * sv + C * T].reshape(C, T).T
            if first:
                np.dot(dp, vp, dU[p])
            else:
                np.dot(dp, vp, tmp)
                dU[p] += tmp
        first = False
    return not first


@njit(fastmath=FASTMATH, cache=True, nogil=True)
def _output_k(M, bias, y, yt, kc, g0, R, th, tw, Ho, Wo, pool, lo, hi, k_lo, k_hi):
    """Filters k_lo..k_hi-1 of tile rows g0..g0+R-1 of y (as _input_k's) from the chunk's products M (36,
    K, R*tw), flat: Y = A^T M A (into yt (16, K, R*tw), flat: one loop over these filters' tiles, long
    enough to vectorise), then + bias, clipped to [lo, hi] (ReLU: 0, inf); pool: the max of each 2x2
    window of Y (a tile holds four) + bias, then the clip. Returns the sum of these Y (NaN or inf when
    one is not finite)."""
    K = y.shape[1]
    T = R * tw
    P = _U(plane_stride(K * T))         # one transform point's products are K * T of these
    o = (_U(0), P, _U(2) * P, _U(3) * P, _U(4) * P, _U(5) * P, _U(6) * P, _U(7) * P, _U(8) * P, _U(9) * P,
         _U(10) * P, _U(11) * P, _U(12) * P, _U(13) * P, _U(14) * P, _U(15) * P, _U(16) * P, _U(17) * P,
         _U(18) * P, _U(19) * P, _U(20) * P, _U(21) * P, _U(22) * P, _U(23) * P, _U(24) * P, _U(25) * P,
         _U(26) * P, _U(27) * P, _U(28) * P, _U(29) * P, _U(30) * P, _U(31) * P, _U(32) * P, _U(33) * P,
         _U(34) * P, _U(35) * P)
    total = bias[0] - bias[0]
    for t in range(_U(k_lo * T), _U(k_hi * T)):
        c0 = _at(M[t], M[o[6] + t], M[o[12] + t], M[o[18] + t], M[o[24] + t], M[o[30] + t], kc)
        c1 = _at(M[o[1] + t], M[o[7] + t], M[o[13] + t], M[o[19] + t], M[o[25] + t], M[o[31] + t], kc)
        c2 = _at(M[o[2] + t], M[o[8] + t], M[o[14] + t], M[o[20] + t], M[o[26] + t], M[o[32] + t], kc)
        c3 = _at(M[o[3] + t], M[o[9] + t], M[o[15] + t], M[o[21] + t], M[o[27] + t], M[o[33] + t], kc)
        c4 = _at(M[o[4] + t], M[o[10] + t], M[o[16] + t], M[o[22] + t], M[o[28] + t], M[o[34] + t], kc)
        c5 = _at(M[o[5] + t], M[o[11] + t], M[o[17] + t], M[o[23] + t], M[o[29] + t], M[o[35] + t], kc)
        y0 = _at(c0[0], c1[0], c2[0], c3[0], c4[0], c5[0], kc)
        y1 = _at(c0[1], c1[1], c2[1], c3[1], c4[1], c5[1], kc)
        y2 = _at(c0[2], c1[2], c2[2], c3[2], c4[2], c5[2], kc)
        y3 = _at(c0[3], c1[3], c2[3], c3[3], c4[3], c5[3], kc)
        yt[t], yt[o[1] + t], yt[o[2] + t], yt[o[3] + t] = y0
        yt[o[4] + t], yt[o[5] + t], yt[o[6] + t], yt[o[7] + t] = y1
        yt[o[8] + t], yt[o[9] + t], yt[o[10] + t], yt[o[11] + t] = y2
        yt[o[12] + t], yt[o[13] + t], yt[o[14] + t], yt[o[15] + t] = y3
        total += (y0[0] + y0[1] + y0[2] + y0[3]) + (y1[0] + y1[1] + y1[2] + y1[3]) \
            + (y2[0] + y2[1] + y2[2] + y2[3]) + (y3[0] + y3[1] + y3[2] + y3[3])
    Hy, Wy = y.shape[2], y.shape[3]
    for k in range(k_lo, k_hi):
        bk = bias[k]
        for r in range(R):
            yk = y[(g0 + r) // th, k]
            i = (g0 + r) % th
            base = _U(k * T + r * tw)
            if pool:
                full = _U(Wy // 2)                  # tiles with both pooled columns inside y
                for h in range(2):
                    if 2 * i + h < Hy:
                        yr = yk[2 * i + h]
                        a = base + o[8 * h]
                        b = base + o[8 * h + 2]
                        for j in range(full):
                            jj = j + j
                            yr[jj] = min(max(max(max(yt[a + j], yt[a + P + j]),
                                                 max(yt[a + o[4] + j], yt[a + o[5] + j])) + bk, lo), hi)
                            yr[jj + _U(1)] = min(max(max(max(yt[b + j], yt[b + P + j]),
                                                         max(yt[b + o[4] + j], yt[b + o[5] + j])) + bk, lo), hi)
                        if Wy % 2:
                            yr[Wy - 1] = min(max(max(max(yt[a + full], yt[a + P + full]),
                                                     max(yt[a + o[4] + full], yt[a + o[5] + full])) + bk, lo), hi)
            else:
                full = _U(Wo // 4)                  # tiles with all four columns inside y
                for u in range(4):
                    if 4 * i + u < Ho:
                        yr = yk[4 * i + u]
                        a = base + o[4 * u]
                        for j in range(full):
                            q = _U(4) * j
                            yr[q] = min(max(yt[a + j] + bk, lo), hi)
                            yr[q + _U(1)] = min(max(yt[a + P + j] + bk, lo), hi)
                            yr[q + _U(2)] = min(max(yt[a + o[2] + j] + bk, lo), hi)
                            yr[q + _U(3)] = min(max(yt[a + o[3] + j] + bk, lo), hi)
                        for v in range(Wo % 4):
                            yr[4 * (Wo // 4) + v] = min(max(yt[a + o[v] + full] + bk, lo), hi)
    return total


@njit(cache=True, nogil=True)
def _products_k(U, V, M, T, trans, lo, hi):
    """The products M[p] (K, T) = U[p] (K, C) @ V[p] (C, T) of points lo..hi-1 (flat planes plane_stride
    apart); trans: U holds (36, C, K), its transposes are taken. BLAS; keep it to one thread around this
    call."""
    K, C = (U.shape[2], U.shape[1]) if trans else (U.shape[1], U.shape[2])
    sv, sm = plane_stride(C * T), plane_stride(K * T)
    for p in range(lo, hi):
        v = V[p * sv:p * sv + C * T].reshape(C, T)
        m = M[p * sm:p * sm + K * T].reshape(K, T)
        if trans:
            np.dot(U[p].T, v, m)
        else:
            np.dot(U[p], v, m)


@njit(cache=True, nogil=True)
def _chunks_k(xp, U, trans, bias, y, V, M, rows, yt, cst, Wp, th, tw, R, Ho, Wo, pool, lo, hi, c0, c1):
    """Chunks c0..c1-1 (chunk c: the batch's tile rows c*R.. (see _input_k), R of them or what is left):
    input transform, the 36 products (BLAS; keep it to one thread around this call), output transform.
    Returns the sum of every Y of these chunks."""
    C, K = xp.shape[1], y.shape[1]
    rows_all = y.shape[0] * th
    kc = (cst[0], cst[1], cst[2], cst[3])
    total = bias[0] - bias[0]
    for c in range(c0, c1):
        g0 = c * R
        r = min(R, rows_all - g0)
        T = r * tw
        _input_k(xp, V, rows, kc, g0, r, th, tw, Wp, 0, C)
        _products_k(U, V, M, T, trans, 0, 36)
        total += _output_k(M, bias, y, yt, kc, g0, r, th, tw, Ho, Wo, pool, lo, hi, 0, K)
    return total


# ------------------------------------------------------------------------------------------ calls

_ONE_BLAS_THREAD = BlasLimit(1)
def _blocks(fn, n):
    """fn(lo, hi, k) over range(n) in NUMBA_NUM_THREADS fixed blocks, shared by the threads running now:
    a block's work (its BLAS calls' shapes, which of its elements a vector loop's remainder takes) does
    not depend on how many threads run, so neither do the results' bits."""
    B = max(1, min(n, numba.config.NUMBA_NUM_THREADS))

    def block(b0, b1, k):
        for b in range(b0, b1):
            fn(n * b // B, n * (b + 1) // B, k)
    parallel_for(block, B)


def _finite(a) -> bool:
    with np.errstate(invalid="ignore", over="ignore"):
        return bool(np.isfinite(a.sum()))


def _rows_per_chunk(rows, tw, C, K, itemsize, threads):
    """Tile rows per chunk (of the batch's rows): as many as CHUNK_BYTES allows (at least MIN_TILES
    tiles), fewer when a thread would be left without a chunk."""
    per_row = 36 * (C + K) * tw * itemsize
    R = min(rows, max(1, CHUNK_BYTES // per_row, -(-MIN_TILES // tw)))
    while R > 1 and -(-rows // R) < threads:
        R = (R + 1) // 2
    return R


_G = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
               [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]])
_GG = np.kron(_G, _G)        # (36, 9): U[a*6 + b] = sum over taps (r, s) of G[a, r] G[b, s] g[r, s]


def transformed_filters(w, flip=False, out=None):
    """U (36, K, C) of w (K, C, 3, 3), a GEMM; flip: of the filters turned 180 degrees (dL/dX's filters
    are their transposes, which its products take: no transposed copy of w, 2.2 ms at 512 x 512)."""
    K, C = w.shape[:2]
    U = out if out is not None else scratch("wino_u", (36, K, C), w.dtype)
    taps = w.reshape(K * C, 9)
    gg = (_GG[:, ::-1] if flip else _GG).astype(w.dtype)
    flat = U.reshape(36, -1)
    # the threads each a block of filters, one BLAS thread each (OpenBLAS's own threads beside the waiting
    # Numba workers took 12 ms for 64 x 64 filters, not 0.05)
    with _ONE_BLAS_THREAD:
        _blocks(lambda lo, hi, k: np.matmul(gg, taps[lo:hi].T, out=flat[:, lo:hi]), K * C)
    return U


def run(x, U, bias, pads, Ho, Wo, pool, lo, hi, y, trans=False):
    """y from x (N, C, H, W) and the transformed filters U (36, K, C; trans: (36, C, K), their transposes
    taken): the conv with these pads (any >= 0) whose output is Ho x Wo, its epilogue (bias, clip to
    [lo, hi], pool: a 2x2/2 max pool first); False when a value before the epilogue is not finite (y then
    holds garbage)."""
    N, C, H, W = x.shape
    K = y.shape[1]
    th, tw = -(-Ho // 4), -(-Wo // 4)
    top, _, left, _ = pads
    Hp, Wp = 4 * th + 2, 4 * tw + 2
    xp = scratch("wino_x", (N, C, Hp * Wp), x.dtype)
    place(x, xp, Hp, Wp, 1, top, left)
    b = bias if bias is not None else np.zeros(K, x.dtype)
    cst = np.array([2, 4, 5, 8], x.dtype)
    lo, hi = x.dtype.type(lo), x.dtype.type(hi)
    nthreads = numba.config.NUMBA_NUM_THREADS
    rows = scratch("wino_rows", (nthreads, 6 * Wp), x.dtype)
    totals = np.zeros(nthreads, x.dtype)
    R = _rows_per_chunk(N * th, tw, C, K, x.dtype.itemsize, nthreads)     # (not the count running now: the
                                                                        # chunks, so the bits, would follow it)
    chunks = -(-N * th // R)
    if chunks * U.nbytes > WHOLE_RATIO * 36 * (C + K) * N * th * tw * x.dtype.itemsize:
        # re-reading the filters for every chunk would cost more than V and M of the whole batch
        # through memory: each step once over the batch, the threads splitting channels, points, filters
        T = N * th * tw
        V = scratch("wino_v", (36 * stride_of(C * T),), x.dtype)
        M = scratch("wino_m", (36 * stride_of(K * T),), x.dtype)
        yt = scratch("wino_yt", (16 * stride_of(K * T),), x.dtype)
        kc = tuple(cst)
        inputs = (xp, V, rows[0], kc, 0, N * th, th, tw, Wp)
        outputs = (M, b, y, yt, kc, 0, N * th, th, tw, Ho, Wo, bool(pool), lo, hi)
        if not (kernel_ready(_input_k, inputs + (0, 0)) & kernel_ready(_output_k, outputs + (0, 0))
                & kernel_ready(_products_k, (U, V, M, T, bool(trans), 0, 0))):
            return True              # a discovery: recorded, nothing to run

        def out_task(k0, k1, k):
            totals[k] += _output_k(*outputs, k0, k1)
        parallel_for(lambda c0, c1, k: _input_k(xp, V, rows[k], *inputs[3:], c0, c1), C)
        with _ONE_BLAS_THREAD:
            parallel_for(lambda p0, p1, k: _products_k(U, V, M, T, bool(trans), p0, p1), 36)
        _blocks(out_task, K)
        return _finite(totals)
    V = scratch("wino_v", (nthreads, 36 * stride_of(C * R * tw)), x.dtype)
    M = scratch("wino_m", (nthreads, 36 * stride_of(K * R * tw)), x.dtype)
    yt = scratch("wino_yt", (nthreads, 16 * stride_of(K * R * tw)), x.dtype)
    head = (xp, U, bool(trans), b, y)
    tail = (cst, Wp, th, tw, R, Ho, Wo, bool(pool), lo, hi)
    if not kernel_ready(_chunks_k, head + (V[0], M[0], rows[0], yt[0]) + tail + (0, 0)):
        return True                  # a discovery: recorded, nothing to run

    def task(c0, c1, k):
        totals[k] = _chunks_k(*head, V[k], M[k], rows[k], yt[k], *tail, c0, c1)
    with _ONE_BLAS_THREAD:
        parallel_for(task, chunks)
    return _finite(totals)


def forward(x, w, b, stride, pads, epi, relu=False, ps=0, pst=0, save_route=False, dil=(1, 1), groups=1, out=None):
    """The conv strategies' forward (conv/direct.py's signature): Winograd where it applies (3x3,
    stride 1, a store or a 2x2/2 pool without route), the direct kernel otherwise and where a value is
    not finite."""
    pooled = epi == "pool"
    if not applies(x.shape, w.shape, stride, dil, groups) or (pooled and ((ps, pst) != (2, 2) or save_route)):
        return direct.forward(x, w, b, stride, pads, epi, relu=relu, ps=ps, pst=pst, save_route=save_route,
                              dil=dil, groups=groups, out=out)
    N, K = x.shape[0], w.shape[0]
    Ho, Wo = out_hw(x.shape[2], x.shape[3], 3, 3, 1, pads)
    if pooled:
        y = np.empty((N, K) + pool_hw(Ho, Wo, 2, 2, "conv2d_relu_maxpool"), x.dtype)
    else:
        y = new_or(out, (N, K, Ho, Wo), x.dtype)
    lo = 0.0 if (relu or pooled) else -np.inf
    if run(x, transformed_filters(w), b, pads, Ho, Wo, pooled, lo, np.inf, y) or discovering_here():
        return y, None
    return direct.forward(x, w, b, stride, pads, epi, relu=relu, ps=ps, pst=pst, dil=dil, groups=groups, out=out)


def grad_input(dy, w, stride, pads, in_hw, dil=(1, 1), groups=1, out=None):
    """dL/dX: for a 3x3 stride-1 conv with pads <= 2, the correlation of dy with the filters turned
    180 degrees and transposed, padded by 2 - pads (Winograd); the direct kernel otherwise."""
    H, W = in_hw
    if not applies((0, 0, H, W), w.shape, stride, dil, groups) or max(pads) > 2:
        return direct.grad_input(dy, w, stride, pads, in_hw, dil=dil, groups=groups, out=out)
    N = dy.shape[0]
    dx = new_or(out, (N, w.shape[1], H, W), dy.dtype)
    flipped = tuple(2 - p for p in pads)
    if run(dy, transformed_filters(w, flip=True), None, flipped, H, W, False, -np.inf, np.inf, dx, trans=True) \
            or discovering_here():
        return dx
    return direct.grad_input(dy, w, stride, pads, in_hw, dil=dil, groups=groups, out=out)


def _dw_whole(xp, dyp, rows, kc, Wp, th, tw):
    """dU (36, K, C) over the whole batch at once: V and D of every tile (the threads splitting channels,
    then filters), then one GEMM per point (the threads splitting points); None in a discovery."""
    N, C, K = xp.shape[0], xp.shape[1], dyp.shape[1]
    T = N * th * tw
    V = scratch("wino_v", (36 * stride_of(C * T),), xp.dtype)
    D = scratch("wino_m", (36 * stride_of(K * T),), xp.dtype)
    dU = scratch("wino_u", (36, K, C), xp.dtype)
    inputs = (xp, V, rows[0], kc, 0, N * th, th, tw, Wp)
    grads = (dyp, D, rows[0], kc, 0, N * th, th, tw)
    if not (kernel_ready(_input_k, inputs + (0, 0)) & kernel_ready(_dy_k, grads + (0, 0))
            & kernel_ready(_dw_products_k, (D, V, dU, T, 0, 0))):
        return None
    parallel_for(lambda c0, c1, k: _input_k(xp, V, rows[k], *inputs[3:], c0, c1), C)
    parallel_for(lambda k0, k1, k: _dy_k(dyp, D, rows[k], *grads[3:], k0, k1), K)
    with _ONE_BLAS_THREAD:
        parallel_for(lambda p0, p1, k: _dw_products_k(D, V, dU, T, p0, p1), 36)
    return dU


def _dw_chunked(xp, dyp, rows, kc, Wp, th, tw, G):
    """dU (36, K, C) from chunks of tile rows (V and D of a chunk stay in cache), summed into G partial
    sums (G fixed: the count of threads Numba may run), then added in order; None in a discovery."""
    N, C, K = xp.shape[0], xp.shape[1], dyp.shape[1]
    R = _rows_per_chunk(N * th, tw, C, K, xp.dtype.itemsize, 1)
    T = R * tw
    V = scratch("wino_v", (G, 36 * stride_of(C * T)), xp.dtype)
    D = scratch("wino_m", (G, 36 * stride_of(K * T)), xp.dtype)
    part = scratch("wino_u", (G, 36, K, C), xp.dtype)
    tmp = scratch("wino_yt", (G, K, C), xp.dtype)
    done = np.zeros(G, np.bool_)
    args = (kc, Wp, th, tw, R, G)
    if not kernel_ready(_dw_chunks_k, (xp, dyp, V[0], D[0], rows[0], part[0], tmp[0]) + args + (0,)):
        return None

    def task(g0, g1, k):
        for g in range(g0, g1):
            done[g] = _dw_chunks_k(xp, dyp, V[k], D[k], rows[k], part[g], tmp[k], *args, g)
    with _ONE_BLAS_THREAD:
        parallel_for(task, G)
    dU = part[0]
    for g in range(1, G):
        if done[g]:
            dU += part[g]
    return dU


def grad_weights(x, dy, stride, pads, k_hw, dil=(1, 1), groups=1, out=None):
    """dL/dW of a 3x3 stride-1 conv by Winograd: the gradient at the 36 points, dU[p] = sum over tiles of
    (A dY A^T)[p] V[p]^T (36 GEMMs over the batch's tiles), then dW = G^T dU G (the adjoint of the filter
    transform); the direct kernel for other convs or where a value is not finite."""
    N, C, H, W = x.shape
    K = dy.shape[1]
    if not applies(x.shape, (K, C) + tuple(k_hw), stride, dil, groups):
        return direct.grad_weights(x, dy, stride, pads, k_hw, dil=dil, groups=groups, out=out)
    Ho, Wo = dy.shape[2], dy.shape[3]
    th, tw = -(-Ho // 4), -(-Wo // 4)
    Hp, Wp = 4 * th + 2, 4 * tw + 2
    xp = scratch("wino_x", (N, C, Hp * Wp), x.dtype)
    place(x, xp, Hp, Wp, 1, pads[0], pads[2])
    dyp = scratch("wino_dy", (N, K, 16 * th * tw), x.dtype)
    place(dy, dyp, 4 * th, 4 * tw, 1, 0, 0)
    nthreads = numba.config.NUMBA_NUM_THREADS
    rows = scratch("wino_rows", (nthreads, 6 * Wp), x.dtype)
    kc = tuple(np.array([2, 4, 5, 8], x.dtype))
    dw = new_or(out, (K, C, 3, 3), x.dtype)
    if 36 * K * C * x.dtype.itemsize <= DW_PARTIAL_BYTES:
        dU = _dw_chunked(xp, dyp, rows, kc, Wp, th, tw, nthreads)
    else:
        dU = _dw_whole(xp, dyp, rows, kc, Wp, th, tw)
    if dU is None:
        return dw                    # a discovery: recorded, nothing to run
    flat, du = dw.reshape(K * C, 9), dU.reshape(36, K * C)
    gg = _GG.astype(x.dtype)

    def adjoint(r0, r1, k):                  # dW = G^T dU G of filters r0..r1-1 (their flat (k, c) index)
        with np.errstate(invalid="ignore", over="ignore"):     # (non-finite: caught below)
            np.matmul(du[:, r0:r1].T, gg, out=flat[r0:r1])
    with _ONE_BLAS_THREAD:
        _blocks(adjoint, K * C)
    if not _finite(dw):
        return direct.grad_weights(x, dy, stride, pads, k_hw, dil=dil, groups=groups, out=out)
    return dw
