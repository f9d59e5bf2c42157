"""The numba backend's own @njit kernels (everything but the convolutions, which live in numba_conv.py).

All kernels write into preallocated outputs (the memory plan's buffers) and are compiled with
``cache=True``, so a second process loads machine code from Numba's disk cache. Kernels whose work
grows with the batch come in a parallel (prange over batch x channels) and a serial variant (generated
kernels: parallel=True/False in the source). On this 2-core machine a parallel region costs ~10-25 us to
start, and these kernels are memory-bound (two threads gain little), while on a shared, loaded machine
an OpenMP region waiting for a descheduled worker cost 5-20x (measured: a 204,800-element multiply took
4.9 ms in parallel against 0.23 ms serial). So the backend runs them serially below PARALLEL_MIN
elements (1M; option parallel_min). Reductions accumulate in float64.

Conventions match the reference semantics: max-pool ties go to the first maximum in row-major window
order; routes are flat in-plane indices ``i*W + j`` (int32), -1 = no gradient.

The conv placeholders at the end (``conv_*_fallback``) are used only when backends/numba_conv.py (the
fast conv kernels) is missing or lacks a function: im2col + one BLAS matrix product, correct but slow.
"""
import math

import numpy as np
from numba import njit, prange

PARALLEL_MIN = 1 << 20
_FM = {"nsz", "arcp", "contract", "afn", "reassoc"}     # fastmath without nnan/ninf: NaN and inf keep IEEE meaning


# --------------------------------------------------------------------------------------------- pooling

@njit(parallel=True, fastmath=_FM, cache=True, nogil=True)
def maxpool_k(x, y, route, kh, kw, sh, sw, save, relu_route):
    """y = max over each window; with save, route = flat index of the first max in x's plane
    (relu_route: -1 where that max is <= 0)."""
    N, C, H, W = x.shape
    Ho, Wo = y.shape[2], y.shape[3]
    for t in prange(N * C):
        n = t // C
        c = t - n * C
        xp = x[n, c]
        yp = y[n, c]
        rp = route[n, c] if save else route[0, 0]
        for i in range(Ho):
            for j in range(Wo):
                r0 = i * sh
                c0 = j * sw
                best = xp[r0, c0]
                bi = r0 * W + c0
                for a in range(kh):
                    for b in range(kw):
                        v = xp[r0 + a, c0 + b]
                        gt = v > best or (v != v and best == best)     # branch-free selects below
                        bi = ((r0 + a) * W + c0 + b) if gt else bi
                        best = v if gt else best
                yp[i, j] = best
                if save:
                    rp[i, j] = bi if (best > 0 or not relu_route) else -1


@njit(parallel=True, fastmath=_FM, cache=True, nogil=True)
def maxpool_route_k(x, dy, dx, kh, kw, sh, sw):
    """dx = each window's dy added at its (first) max in x (overlapping windows accumulate)."""
    N, C, H, W = x.shape
    Ho, Wo = dy.shape[2], dy.shape[3]
    for t in prange(N * C):
        n = t // C
        c = t - n * C
        for p in range(H):
            for q in range(W):
                dx[n, c, p, q] = 0.0
        for i in range(Ho):
            for j in range(Wo):
                r0 = i * sh
                c0 = j * sw
                best = x[n, c, r0, c0]
                bp = r0
                bq = c0
                for a in range(kh):
                    for b in range(kw):
                        v = x[n, c, r0 + a, c0 + b]
                        if v > best:
                            best = v
                            bp = r0 + a
                            bq = c0 + b
                dx[n, c, bp, bq] += dy[n, c, i, j]


@njit(parallel=True, fastmath=_FM, cache=True, nogil=True)
def route_scatter_k(dy, route, dx, db, want_db):
    """dx (N, C, H, W) = dy added at the routed positions (route -1: dropped); with want_db also
    db[c] = sum of the routed dy (= sum of dx over N, H, W: the conv bias gradient), in one pass.
    Parallel over channels, so each task owns its dx planes and its db entry."""
    N, C = dy.shape[0], dy.shape[1]
    Ho, Wo = dy.shape[2], dy.shape[3]
    W = dx.shape[3]
    for c in prange(C):
        acc = 0.0
        for n in range(N):
            plane = dx[n, c]
            for p in range(dx.shape[2]):
                for q in range(W):
                    plane[p, q] = 0.0
            for i in range(Ho):
                for j in range(Wo):
                    r = route[n, c, i, j]
                    if r >= 0:
                        v = dy[n, c, i, j]
                        p = r // W
                        plane[p, r - p * W] += v
                        acc += v
        if want_db:
            db[c] = acc


@njit(parallel=True, fastmath=_FM, cache=True, nogil=True)
def route_scatter_pool_k(dy, route, dx, dbp, kh, kw, sh, sw):
    """route_scatter_k for non-overlapping pools (sh >= kh, sw >= kw), the common case: every dx
    element is written exactly once, in order, without branches (a window position gets dy where the
    route points at it, else 0), so the pass runs at memory speed. dbp (N, C) gets each plane's sum
    of routed dy (the caller adds over N: the bias gradient). Parallel over (image, channel) planes."""
    N, C = dy.shape[0], dy.shape[1]
    Ho, Wo = dy.shape[2], dy.shape[3]
    H, W = dx.shape[2], dx.shape[3]
    for t in prange(N * C):
        n = t // C
        c = t - n * C
        rp = route[n, c]
        dp = dy[n, c]
        xp = dx[n, c]
        acc = 0.0
        for i in range(Ho):
            for a in range(sh):
                row = i * sh + a
                if a >= kh:
                    for q in range(W):
                        xp[row, q] = 0.0
                    continue
                base = row * W
                for j in range(Wo):
                    r = rp[i, j]
                    v = dp[i, j]
                    for b in range(sw):
                        col = j * sw + b
                        xp[row, col] = v if r == base + col else 0.0
                for q in range(Wo * sw, W):
                    xp[row, q] = 0.0
        for row in range(Ho * sh, H):
            for q in range(W):
                xp[row, q] = 0.0
        for i in range(Ho):
            for j in range(Wo):
                acc += dp[i, j] if rp[i, j] >= 0 else 0.0
        dbp[n, c] = acc


@njit(fastmath=_FM, cache=True, nogil=True)
def sum_rows_k(a, out):
    """out[c] = sum over n of a[n, c] (float64 accumulation)."""
    N, C = a.shape
    for c in range(C):
        s = 0.0
        for n in range(N):
            s += a[n, c]
        out[c] = s


@njit(fastmath=_FM, cache=True, nogil=True)
def dropout_mask_k(u, rate, scale, out):
    """out = scale where u >= rate else 0 (u: the reference's float64 uniform draws, so the mask is
    the same bits as the reference backend's)."""
    for i in prange(u.size):
        out[i] = scale if u[i] >= rate else 0.0


@njit(parallel=True, fastmath=_FM, cache=True, nogil=True)
def avgpool_k(x, y, kh, kw, sh, sw):
    N, C = x.shape[0], x.shape[1]
    Ho, Wo = y.shape[2], y.shape[3]
    inv = 1.0 / (kh * kw)
    for t in prange(N * C):
        n = t // C
        c = t - n * C
        for i in range(Ho):
            for j in range(Wo):
                s = 0.0
                for a in range(kh):
                    for b in range(kw):
                        s += x[n, c, i * sh + a, j * sw + b]
                y[n, c, i, j] = s * inv


@njit(parallel=True, fastmath=_FM, cache=True, nogil=True)
def avgpool_spread_k(dy, dx, kh, kw, sh, sw):
    N, C = dy.shape[0], dy.shape[1]
    Ho, Wo = dy.shape[2], dy.shape[3]
    inv = 1.0 / (kh * kw)
    for t in prange(N * C):
        n = t // C
        c = t - n * C
        for p in range(dx.shape[2]):
            for q in range(dx.shape[3]):
                dx[n, c, p, q] = 0.0
        for i in range(Ho):
            for j in range(Wo):
                v = dy[n, c, i, j] * inv
                for a in range(kh):
                    for b in range(kw):
                        dx[n, c, i * sh + a, j * sw + b] += v


@njit(parallel=True, fastmath=_FM, cache=True, nogil=True)
def gap_k(x3, y2):
    """y (N, C) = mean of each (H*W) plane of x3 (N, C, H*W)."""
    N, C, P = x3.shape
    for t in prange(N * C):
        n = t // C
        c = t - n * C
        s = 0.0
        for p in range(P):
            s += x3[n, c, p]
        y2[n, c] = s / P


@njit(parallel=True, fastmath=_FM, cache=True, nogil=True)
def gap_spread_k(dy2, dx3):
    N, C, P = dx3.shape
    for t in prange(N * C):
        n = t // C
        c = t - n * C
        v = dy2[n, c] / P
        for p in range(P):
            dx3[n, c, p] = v


# ------------------------------------------------------------------------------------------ reductions

@njit(parallel=True, fastmath=_FM, cache=True, nogil=True)
def sum4_par(x, out, scale):
    """out (K0, K1) = scale * sum over r0, r1 of x (R0, K0, R1, K1): every reduction over any set of
    axes, after merging adjacent axes of the same kind, fits this form. Parallel over K0."""
    R0, K0, R1, K1 = x.shape
    for k0 in prange(K0):
        acc = np.zeros(K1, np.float64)
        for r0 in range(R0):
            for r1 in range(R1):
                for k1 in range(K1):
                    acc[k1] += x[r0, k0, r1, k1]
        for k1 in range(K1):
            out[k0, k1] = acc[k1] * scale


@njit(fastmath=_FM, cache=True, nogil=True)
def sum4_ser(x, out, scale):
    R0, K0, R1, K1 = x.shape
    acc = np.zeros(K1, np.float64)
    for k0 in range(K0):
        acc[:] = 0.0
        for r0 in range(R0):
            for r1 in range(R1):
                for k1 in range(K1):
                    acc[k1] += x[r0, k0, r1, k1]
        for k1 in range(K1):
            out[k0, k1] = acc[k1] * scale


# ------------------------------------------------------------------------------------ softmax and losses

@njit(fastmath=_FM, cache=True, nogil=True)
def softmax_rows_k(x, y):
    M, K = x.shape
    for i in range(M):
        m = x[i, 0]
        for k in range(1, K):
            if x[i, k] > m:
                m = x[i, k]
        s = 0.0
        for k in range(K):
            e = math.exp(x[i, k] - m)
            y[i, k] = e
            s += e
        inv = 1.0 / s
        for k in range(K):
            y[i, k] = y[i, k] * inv


@njit(fastmath=_FM, cache=True, nogil=True)
def sce_int_k(z, labels, out):
    """mean over rows of -log softmax(z)[label]"""
    M, K = z.shape
    tot = 0.0
    for i in range(M):
        m = z[i, 0]
        for k in range(1, K):
            if z[i, k] > m:
                m = z[i, k]
        s = 0.0
        for k in range(K):
            s += math.exp(z[i, k] - m)
        tot += (m + math.log(s)) - z[i, labels[i]]
    out[0] = tot / M


@njit(fastmath=_FM, cache=True, nogil=True)
def sce_dense_k(z, y, out):
    M, K = z.shape
    tot = 0.0
    for i in range(M):
        m = z[i, 0]
        for k in range(1, K):
            if z[i, k] > m:
                m = z[i, k]
        s = 0.0
        for k in range(K):
            s += math.exp(z[i, k] - m)
        lse = m + math.log(s)
        for k in range(K):
            tot -= y[i, k] * (z[i, k] - lse)
    out[0] = tot / M


@njit(fastmath=_FM, cache=True, nogil=True)
def sce_grad_int_k(z, labels, dy, out):
    """(softmax(z) - onehot) * dy / M"""
    M, K = z.shape
    scale = dy[0] / M
    for i in range(M):
        m = z[i, 0]
        for k in range(1, K):
            if z[i, k] > m:
                m = z[i, k]
        s = 0.0
        for k in range(K):
            e = math.exp(z[i, k] - m)
            out[i, k] = e
            s += e
        inv = 1.0 / s
        for k in range(K):
            out[i, k] = out[i, k] * inv * scale
        out[i, labels[i]] -= scale


@njit(fastmath=_FM, cache=True, nogil=True)
def sce_grad_dense_k(z, y, dy, out):
    M, K = z.shape
    scale = dy[0] / M
    for i in range(M):
        m = z[i, 0]
        for k in range(1, K):
            if z[i, k] > m:
                m = z[i, k]
        s = 0.0
        for k in range(K):
            e = math.exp(z[i, k] - m)
            out[i, k] = e
            s += e
        inv = 1.0 / s
        for k in range(K):
            out[i, k] = (out[i, k] * inv - y[i, k]) * scale


@njit(fastmath=_FM, cache=True, nogil=True)
def ce_int_k(p, labels, out):
    M = p.shape[0]
    tot = 0.0
    for i in range(M):
        tot -= math.log(p[i, labels[i]])
    out[0] = tot / M


@njit(fastmath=_FM, cache=True, nogil=True)
def ce_dense_k(p, y, out):
    M, K = p.shape
    tot = 0.0
    for i in range(M):
        for k in range(K):
            if y[i, k] != 0:
                tot -= y[i, k] * math.log(p[i, k])
    out[0] = tot / M


@njit(fastmath=_FM, cache=True, nogil=True)
def ce_grad_int_k(p, labels, dy, out):
    M, K = p.shape
    scale = dy[0] / M
    for i in range(M):
        for k in range(K):
            out[i, k] = 0.0
        out[i, labels[i]] = -scale / p[i, labels[i]]


@njit(fastmath=_FM, cache=True, nogil=True)
def ce_grad_dense_k(p, y, dy, out):
    M, K = p.shape
    scale = dy[0] / M
    for i in range(M):
        for k in range(K):
            out[i, k] = -(y[i, k] / p[i, k]) * scale


# ------------------------------------------------------------------- conv placeholders (slow, correct)

@njit(parallel=True, cache=True, nogil=True)
def _im2col_k(xp, cols, kh, kw, sh, sw, Ho, Wo):
    """cols (N, C*kh*kw, Ho*Wo) from the padded input xp."""
    N, C = xp.shape[0], xp.shape[1]
    for t in prange(N * C):
        n = t // C
        c = t - n * C
        for a in range(kh):
            for b in range(kw):
                row = (c * kh + a) * kw + b
                for i in range(Ho):
                    for j in range(Wo):
                        cols[n, row, i * Wo + j] = xp[n, c, i * sh + a, j * sw + b]


def _pad(x, pads):
    t, b, l, r = pads
    if not any(pads):
        return np.ascontiguousarray(x)
    return np.pad(x, ((0, 0), (0, 0), (t, b), (l, r)))


def conv2d_fallback(x, w, b, stride, pads, relu=False):
    N, C, H, W = x.shape
    K, _, kh, kw = w.shape
    sh, sw = stride
    Ho = (H + pads[0] + pads[1] - kh) // sh + 1
    Wo = (W + pads[2] + pads[3] - kw) // sw + 1
    cols = np.empty((N, C * kh * kw, Ho * Wo), x.dtype)
    _im2col_k(_pad(x, pads), cols, kh, kw, sh, sw, Ho, Wo)
    y = np.matmul(w.reshape(K, -1), cols).reshape(N, K, Ho, Wo)
    if b is not None:
        y += b.reshape(1, K, 1, 1)
    if relu:
        np.maximum(y, 0, out=y)
    return y


def conv2d_relu_maxpool_fallback(x, w, b, stride, pads, pool_size, pool_stride, save_route=False):
    z = conv2d_fallback(x, w, b, stride, pads, relu=False)
    N, K, Ho, Wo = z.shape
    ps, pst = pool_size, pool_stride
    Hq, Wq = (Ho - ps) // pst + 1, (Wo - ps) // pst + 1
    y = np.empty((N, K, Hq, Wq), x.dtype)
    route = np.empty((N, K, Hq, Wq), np.int32)
    maxpool_k(z, y, route, ps, ps, pst, pst, True, True)
    np.maximum(y, 0, out=y)
    return (y, route) if save_route else y


def maxpool_route_backward_fallback(dy, route, conv_out_hw):
    dz = np.empty(dy.shape[:2] + tuple(conv_out_hw), dy.dtype)
    route_scatter_k(dy, route, dz, np.empty(1, dy.dtype), False)
    return dz


def conv2d_dx_fallback(dy, w, stride, pads, in_hw):
    from graphc.ops.conv import conv_dx_ref
    return np.ascontiguousarray(conv_dx_ref(dy, w, tuple(stride), tuple(pads), tuple(in_hw)))


def conv2d_dw_fallback(x, dy, stride, pads, k_hw):
    N, C = x.shape[:2]
    K = dy.shape[1]
    kh, kw = k_hw
    Ho, Wo = dy.shape[2:]
    cols = np.empty((N, C * kh * kw, Ho * Wo), x.dtype)
    _im2col_k(_pad(x, pads), cols, kh, kw, stride[0], stride[1], Ho, Wo)
    dw = np.zeros((K, C * kh * kw), x.dtype)
    for n in range(N):
        dw += dy[n].reshape(K, -1) @ cols[n].T
    return dw.reshape(K, C, kh, kw)


# ------------------------------------------------------------- pooling kernels generated per geometry
#
# With the window size and stride as literals the window loops unroll and the argmax becomes
# branch-free selects: 2.5 ms instead of 23 ms for a 2x2 max pool with route over 128x32x26x26 here
# (one thread). The backend writes these sources into the kernel cache dir (numba.load_generated).

_HDR = ("# Generated by graphc.backends.numba_kernels -- do not edit; the file name is a hash of this text.\n"
        "import numpy as np\nfrom numba import njit, prange\n\n")
_DEC = "@njit(parallel={par}, fastmath={{'nsz', 'arcp', 'contract', 'afn', 'reassoc'}}, cache=True, nogil=True)\n"


def _plane_loop(parallel):
    return [f"    for t in {'prange' if parallel else 'range'}(N * C):",
            "        n = t // C", "        c = t - n * C"]


def maxpool_source(kh, kw, sh, sw, save, relu, parallel):
    """kernel(x, y, route): y = window max; route (when save) = flat in-plane index of the first max,
    -1 where it is <= 0 (relu). NaN propagates as in the reference (a NaN wins over numbers)."""
    L = [_HDR + _DEC.format(par=parallel) + "def kernel(x, y, route):",
         "    N, C, H, W = x.shape", "    Ho, Wo = y.shape[2], y.shape[3]"]
    L += _plane_loop(parallel)
    L += ["        xp = x[n, c]", "        yp = y[n, c]"]
    if save:
        L.append("        rp = route[n, c]")
    L += ["        for i in range(Ho):", f"            r0 = i * {sh}", "            for j in range(Wo):",
          f"                c0 = j * {sw}", "                best = xp[r0, c0]"]
    if save:
        L.append("                bi = r0 * W + c0")
    for a in range(kh):
        for b in range(kw):
            if a == 0 and b == 0:
                continue
            L.append(f"                v = xp[r0 + {a}, c0 + {b}]")
            L.append("                gt = v > best or (v != v and best == best)")
            if save:
                L.append(f"                bi = (r0 + {a}) * W + c0 + {b} if gt else bi")
            L.append("                best = v if gt else best")
    L.append("                yp[i, j] = best")
    if save:
        L.append("                rp[i, j] = bi if best > 0 else -1" if relu else "                rp[i, j] = bi")
    return "\n".join(L) + "\n"


def route_scatter_source(kh, kw, sh, sw, want_db, parallel):
    """kernel(dy, route, dx, dbp): dx = dy added at the routed positions (-1: dropped); dbp (N, C) =
    each plane's routed-dy sum when want_db. Non-overlapping windows (sh >= kh, sw >= kw, or an unknown
    geometry given as 0s) write every dx element once, branch-free; overlapping ones zero then add."""
    L = [_HDR + _DEC.format(par=parallel) + "def kernel(dy, route, dx, dbp):",
         "    N, C, Ho, Wo = dy.shape", "    H, W = dx.shape[2], dx.shape[3]"]
    L += _plane_loop(parallel)
    L += ["        rp = route[n, c]", "        dp = dy[n, c]", "        xp = dx[n, c]"]
    if kh and sh >= kh and sw >= kw:
        L.append("        for i in range(Ho):")
        for a in range(sh):
            L.append(f"            row = i * {sh} + {a}")
            if a >= kh:
                L += ["            for q in range(W):", "                xp[row, q] = 0.0"]
                continue
            L += ["            base = row * W", "            for j in range(Wo):",
                  "                r = rp[i, j]", "                v = dp[i, j]"]
            for b in range(sw):
                col = f"j * {sw} + {b}"
                if b < kw:
                    L.append(f"                xp[row, {col}] = v if r == base + {col} else 0.0")
                else:
                    L.append(f"                xp[row, {col}] = 0.0")
            L += [f"            for q in range(Wo * {sw}, W):", "                xp[row, q] = 0.0"]
        L += [f"        for row in range(Ho * {sh}, H):", "            for q in range(W):",
              "                xp[row, q] = 0.0"]
    else:
        L += ["        for p in range(H):", "            for q in range(W):", "                xp[p, q] = 0.0",
              "        for i in range(Ho):", "            for j in range(Wo):", "                r = rp[i, j]",
              "                if r >= 0:", "                    p = r // W",
              "                    xp[p, r - p * W] += dp[i, j]"]
    if want_db:
        L += ["        acc = 0.0", "        for i in range(Ho):", "            for j in range(Wo):",
              "                acc += dp[i, j] if rp[i, j] >= 0 else 0.0", "        dbp[n, c] = acc"]
    return "\n".join(L) + "\n"


def maxpool_route_source(kh, kw, sh, sw, parallel):
    """kernel(x, dy, dx): each window's dy added at its first max in x (the maxpool_route op)."""
    L = [_HDR + _DEC.format(par=parallel) + "def kernel(x, dy, dx):",
         "    N, C, H, W = x.shape", "    Ho, Wo = dy.shape[2], dy.shape[3]"]
    L += _plane_loop(parallel)
    L += ["        xp = x[n, c]", "        dp = dy[n, c]", "        gp = dx[n, c]",
          "        for p in range(H):", "            for q in range(W):", "                gp[p, q] = 0.0",
          "        for i in range(Ho):", f"            r0 = i * {sh}", "            for j in range(Wo):",
          f"                c0 = j * {sw}", "                best = xp[r0, c0]", "                bp = r0",
          "                bq = c0"]
    for a in range(kh):
        for b in range(kw):
            if a == 0 and b == 0:
                continue
            L += [f"                v = xp[r0 + {a}, c0 + {b}]", "                gt = v > best",
                  f"                bp = r0 + {a} if gt else bp", f"                bq = c0 + {b} if gt else bq",
                  "                best = v if gt else best"]
    L.append("                gp[bp, bq] += dp[i, j]")
    return "\n".join(L) + "\n"
