"""The im2col conv strategy: the forward runs one image per task (threads.parallel_for, Python threads
over serial nogil kernels); im2col of each image into a per-thread buffer, a BLAS GEMM (numpy's dot
inside @njit; BLAS held to one thread meanwhile: two thread pools on two cores fight), and the
epilogue straight from the product. With fewer images than threads (batch 1) the columns are built in
parallel first and each image's GEMM is split over blocks of filters. dL/dX (col2im) and dL/dW
(per-thread partial sums) run one image, or group of images, per task too: as Numba-parallel loops they
were the slowest kernels to compile (mnist_convnet's training step, where a CPU without AVX-512 runs its
gradients on im2col: first step 11.3-12.1 s from empty caches with them, 10.6-10.8 s without, on a Zen 3;
`python examples/first_step_time.py`). Dilated filters read taps ``dil``
apart in im2col (and col2im); grouped convs run one GEMM per group on the group's rows of the column
matrix.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import njit

from graphc.backends.kernel_cache import BlasLimit, load_scipy_blas_single_threaded, rescan_blas
from graphc.backends.numba.precompile import compile_for, discovering_here
from graphc.backends.numba.conv.layout import new_or, out_hw, place, pool_hw, scratch, sum_partials
from graphc.backends.numba.threads import num_threads, parallel_for


@njit(cache=True, nogil=True)
def _cols_of(xp, cols, KH, KW, s, Ho, Wo, dh=1, dw=1):
    """cols (C*KH*KW, Ho*Wo) of one padded image xp (C, Hp, Wp); filter taps (dh, dw) apart."""
    for r in range(xp.shape[0] * KH):
        _cols_band(xp, cols, r, KH, KW, s, Ho, Wo, dh, dw)


@njit(cache=True, nogil=True)
def _cols_band(xp, cols, r, KH, KW, s, Ho, Wo, dh, dw):
    """The KW rows of cols for channel r // KH and filter row r % KH."""
    c, kh = r // KH, r % KH
    for kw in range(KW):
        row = cols[(c * KH + kh) * KW + kw]
        for i in range(Ho):
            src = xp[c, i * s + kh * dh]
            if s == 1:                   # (unsigned offsets: a copy, not a gather; see layout.fill_plane)
                d, o = np.uint64(i * Wo), np.uint64(kw * dw)
                for j in range(np.uint64(Wo)):
                    row[d + j] = src[o + j]
            else:
                for j in range(Wo):
                    row[i * Wo + j] = src[j * s + kw * dw]


@njit(cache=True, nogil=True)
def _group_dot(a, b, G):
    """a @ b (G == 1), or the G products of the groups: rows g*M/G.. of a with rows g*R.. of b (R =
    a's columns), stacked: (M, P)."""
    if G == 1:
        return np.dot(a, b)
    Mg, R = a.shape[0] // G, a.shape[1]
    out = np.empty((a.shape[0], b.shape[1]), a.dtype)
    for g in range(G):
        np.dot(a[g * Mg:(g + 1) * Mg], b[g * R:(g + 1) * R], out[g * Mg:(g + 1) * Mg])
    return out


@njit(cache=True, nogil=True)
def _first_nan(z, bk, r0, c0, Wo, ps):
    """(the NaN, its flat index) of the first NaN of a pool window of z (+ bk) that holds one."""
    for di in range(ps):
        for dj in range(ps):
            v = z[(r0 + di) * Wo + c0 + dj] + bk
            if v != v:
                return v, (r0 + di) * Wo + c0 + dj
    return z[r0 * Wo + c0] + bk, r0 * Wo + c0


@njit(cache=True, nogil=True)
def _pool_epilogue(z, bk, yk, rk, Wo, ps, pst, save):
    """bias + ReLU + max pool of one conv-output plane z (Ho*Wo,) into yk (Hq, Wq); route as in
    conv2d_relu_maxpool (flat index of the window's first max, the first NaN winning as in np.max; ~index
    of the ReLU output's max where the max is not > 0: its first NaN, or its first element)."""
    Hq, Wq = yk.shape
    for i in range(Hq):
        for j in range(Wq):
            r0 = i * pst
            c0 = j * pst
            m = z[r0 * Wo + c0] + bk
            mi = r0 * Wo + c0
            nan = False
            for di in range(ps):
                for dj in range(ps):
                    v = z[(r0 + di) * Wo + c0 + dj] + bk
                    if v > m:
                        m = v
                        mi = (r0 + di) * Wo + c0 + dj
                    nan |= v != v
            p0 = r0 * Wo + c0
            if nan:                       # rare: off the fast path of selects
                m, p0 = _first_nan(z, bk, r0, c0, Wo, ps)
            yk[i, j] = 0.0 if m <= 0 else m
            if save:
                rk[i, j] = mi if m > 0 else ~p0


@njit(cache=True, nogil=True)
def _route_of(route, n):
    """Image n's route planes, or the (1, 1, 1, 1) placeholder's when no route is saved."""
    return route[n] if route.shape[0] > 1 else route[0]


@njit(cache=True, nogil=True)
def _epilogue(z, k0, yn, rn, b, Wo, epi, flag, ps, pst):
    """Rows k0.. of one image's output yn (K, ...) from z (rows, Ho*Wo), the product for filters
    k0..k0+rows-1. epi 0: store (+bias, ReLU when flag); epi 1: bias + ReLU + max pool into yn with
    the route rn (when flag)."""
    P = z.shape[1]
    for r in range(z.shape[0]):
        k = k0 + r
        bk = b[k]
        zk = z[r]
        if epi == 0:
            yk = yn[k].reshape(P)
            if flag:
                for q in range(P):
                    v = zk[q] + bk
                    yk[q] = 0.0 if v < 0 else v
            else:
                for q in range(P):
                    yk[q] = zk[q] + bk
        else:
            _pool_epilogue(zk, bk, yn[k], rn[k if flag else 0], Wo, ps, pst, flag)


@njit(cache=True, nogil=True)
def _i2c_fwd(xp, wm, b, y, route, cl, KH, KW, s, Ho, Wo, epi, flag, ps, pst, dh, dw, G, lo, hi):
    """im2col + GEMM forward of the images lo..hi-1 (a task range of threads.parallel_for): cl
    (C*KH*KW, Ho*Wo), the thread's column matrix, is built from the padded image xp[n] (C, Hp, Wp),
    multiplied by wm (K, C*KH*KW) (BLAS; keep it to one thread around this call), and the epilogue
    writes y[n] straight from the product. epi 0: store (+bias, ReLU when flag); epi 1: bias + ReLU +
    max pool (route when flag). G groups: wm (K, C/G*KH*KW), one GEMM per group."""
    for n in range(lo, hi):
        if KH * KW * s == 1 and xp.shape[2] * xp.shape[3] == Ho * Wo:
            z = _group_dot(wm, xp[n].reshape(xp.shape[1], Ho * Wo), G)   # 1x1, stride 1: no columns to build
        else:
            _cols_of(xp[n], cl, KH, KW, s, Ho, Wo, dh, dw)
            z = _group_dot(wm, cl, G)                        # (K, Ho*Wo)
        _epilogue(z, 0, y[n], _route_of(route, n), b, Wo, epi, flag, ps, pst)


@njit(cache=True, nogil=True)
def _cols_tasks(xp, cols, KH, KW, s, Ho, Wo, dh, dw, lo, hi):
    """Tasks lo..hi-1 of building every image's column matrix cols[n]: task t is image
    t // (C*KH), band t % (C*KH) (one channel's filter row: KW rows of cols[n])."""
    CK = xp.shape[1] * KH
    for t in range(lo, hi):
        _cols_band(xp[t // CK], cols[t // CK], t % CK, KH, KW, s, Ho, Wo, dh, dw)


@njit(cache=True, nogil=True)
def _gemm_tasks(wm, b, y, route, cols, Wo, epi, flag, ps, pst, nb, lo, hi):
    """Tasks lo..hi-1 of a forward split over filters: task t is image t // nb, filters block t % nb
    (of nb), a (K/nb, C*KH*KW) @ cols[n] (C*KH*KW, Ho*Wo) product and its epilogue."""
    K = wm.shape[0]
    for t in range(lo, hi):
        n, j = t // nb, t % nb
        k0, k1 = K * j // nb, K * (j + 1) // nb
        _epilogue(np.dot(wm[k0:k1], cols[n]), k0, y[n], _route_of(route, n), b, Wo, epi, flag, ps, pst)


@njit(cache=True, nogil=True)
def _i2c_dx(dy, wmt, dxp, KH, KW, s, dh, dw, G, lo, hi):
    """dL/dX by GEMM + col2im, images lo..hi-1 (one per task): dcols = wmt (C*KH*KW, K) @ dy[n] (K, Ho*Wo),
    summed into the padded gradient plane dxp[n] (C, Hp, Wp). G groups: wmt (C*KH*KW, K/G), the
    groups' transposed filters stacked."""
    N, K, Ho, Wo = dy.shape
    C = dxp.shape[1]
    for n in range(lo, hi):
        dcols = _group_dot(wmt, dy[n].reshape(K, Ho * Wo), G)
        plane = dxp[n]
        plane[:, :, :] = 0
        for c in range(C):
            for kh in range(KH):
                for kw in range(KW):
                    row = dcols[(c * KH + kh) * KW + kw]
                    for i in range(Ho):
                        dst = plane[c, i * s + kh * dh]
                        for j in range(Wo):
                            dst[j * s + kw * dw] += row[i * Wo + j]


@njit(cache=True, nogil=True)
def _i2c_dw(xp, dy, part, cl_buf, db_buf, B, KH, KW, s, dh, dw, groups, lo, hi):
    """dL/dW by im2col + GEMM: part[g] (K, C*KH*KW) = sum over the images of task g (g, g + G, ...) of
    dy[n] (K, Ho*Wo) @ cols(xp[n]).T; the caller sums part over its first axis. B images per GEMM, their
    columns side by side in cl_buf and dy rows in db_buf (the running thread's, flat): the inner dimension is
    B*Ho*Wo, not Ho*Wo (49 on 7x7 planes), and part[g] is added to once per B images, not per image.
    With groups, part[g] is (K, C/groups*KH*KW): filters of a group meet only its rows of cols."""
    N, K, Ho, Wo = dy.shape
    G = part.shape[0]
    P = Ho * Wo
    Kg, R = K // groups, part.shape[2]
    RC = R * groups
    for g in range(lo, hi):
        acc = part[g]
        mine = (N - g + G - 1) // G                      # images g, g + G, ...
        for j in range(0, mine, B):
            nb = min(B, mine - j)
            cl = cl_buf[:RC * nb * P].reshape(RC, nb * P)
            db = db_buf[:K * nb * P].reshape(K, nb * P)
            for b in range(nb):
                n = g + (j + b) * G
                _cols_of(xp[n], cl[:, b * P:(b + 1) * P], KH, KW, s, Ho, Wo, dh, dw)
                dn = dy[n].reshape(K, P)
                for k in range(K):         # (loops, not array expressions: those doubled the compile time)
                    for p in range(P):
                        db[k, b * P + p] = dn[k, p]
            for q in range(groups):
                prod = np.dot(db[q * Kg:(q + 1) * Kg], cl[q * R:(q + 1) * R].T)
                for k in range(Kg):
                    ak = acc[q * Kg + k]
                    for r in range(R):
                        ak[r] = prod[k, r] if j == 0 else ak[r] + prod[k, r]


_ONE_BLAS_THREAD = BlasLimit(1)


_READY = set()          # (kernel, _arg_kinds) compiled already


def _arg_kinds(args):
    """What Numba's types of these arguments depend on, cheaply: numba.typeof on every argument of every
    call cost ResNet-18's batch-1 inference 1.2 ms a run (12 im2col calls)."""
    return tuple((a.dtype.str, a.ndim, a.flags.c_contiguous, a.flags.f_contiguous, a.flags.writeable, a.flags.aligned)
                 if isinstance(a, np.ndarray) else type(a) for a in args)


def kernel_ready(fn, args) -> bool:
    """Whether a kernel of im2col's or winograd_gemm's may run on these arguments: on its first call for
    these types it is compiled (a np.dot in it loads SciPy's BLAS), then BLAS libraries are looked for
    again so that the thread limit reaches that one too. False during a kernel discovery on this
    thread, which records it (also when it is compiled already) and runs nothing."""
    key = (fn, _arg_kinds(args))
    if key in _READY and not discovering_here():
        return True
    load_scipy_blas_single_threaded()        # before a cached kernel's first BLAS call would load it
    sig = tuple(numba.typeof(a) for a in args)
    if not compile_for(fn, sig):
        return False
    rescan_blas()
    _READY.add(key)
    return True


def _padded_images(x, pads, tag):
    N, C, H, W = x.shape
    top, bottom, left, right = pads
    if pads == (0, 0, 0, 0):
        return x
    Hp, Wp = H + top + bottom, W + left + right
    xb = scratch(tag, (N, C, Hp * Wp), x.dtype)
    place(x, xb, Hp, Wp, 1, top, left)
    return xb.reshape(N, C, Hp, Wp)


def forward(x, w, b, stride, pads, epi, relu=False, ps=0, pst=0, save_route=False, dil=(1, 1), groups=1, out=None):
    N, C, H, W = x.shape
    K, _, KH, KW = w.shape
    dh, dw = dil
    Ho, Wo = out_hw(H, W, (KH - 1) * dh + 1, (KW - 1) * dw + 1, stride, pads)
    xp = _padded_images(x, pads, "i2c_x")
    wm = w.reshape(K, -1)
    bb = b if b is not None else np.zeros(K, x.dtype)
    if epi == "pool":
        Hq, Wq = pool_hw(Ho, Wo, ps, pst, "conv2d_relu_maxpool")
        y = np.empty((N, K, Hq, Wq), x.dtype)
        route = np.empty(y.shape if save_route else (1, 1, 1, 1), np.int32)
        epi_args = (1, bool(save_route), ps, pst)
    else:
        y = new_or(out, (N, K, Ho, Wo), x.dtype)
        route = None
        epi_args = (0, bool(relu), 0, 0)
    out = (bb, y, np.empty((1, 1, 1, 1), np.int32) if route is None else route)
    geo = (KH, KW, stride, Ho, Wo)
    nt = num_threads()
    with _ONE_BLAS_THREAD:
        if N < nt and groups == 1:
            # fewer images than threads (batch 1): every image's columns first, then each image's
            # GEMM split over blocks of filters, so that every thread works (one image per task,
            # as below, left the second core idle at batch 1)
            nb = max(1, min(nt // N, K // 16))       # blocks of >= 16 filters (whole GEMM tiles)
            if KH * KW * stride == 1 and (H, W) == (Ho, Wo):
                cols = xp.reshape(N, C, H * W)           # 1x1, stride 1, unpadded: the image is its columns
            else:
                cols = scratch("i2c_cols", (N, C * KH * KW, Ho * Wo), x.dtype)
                cargs = (xp, cols) + geo + (dh, dw)
                kernel_ready(_cols_tasks, cargs + (0, 0))
                parallel_for(lambda lo, hi, k: _cols_tasks(*cargs, lo, hi), N * C * KH)
            gargs = (wm,) + out + (cols, Wo) + epi_args + (nb,)
            kernel_ready(_gemm_tasks, gargs + (0, 0))
            parallel_for(lambda lo, hi, k: _gemm_tasks(*gargs, lo, hi), N * nb)
        else:
            cols = scratch("i2c_cols", (numba.config.NUMBA_NUM_THREADS, C * KH * KW, Ho * Wo), x.dtype)
            head, tail = (xp, wm) + out, geo + epi_args + (dh, dw, groups)
            kernel_ready(_i2c_fwd, head + (cols[0],) + tail + (0, 0))
            parallel_for(lambda lo, hi, k: _i2c_fwd(*head, cols[k], *tail, lo, hi), N)
    return y, route


def grad_input(dy, w, stride, pads, in_hw, dil=(1, 1), groups=1, out=None):
    N, K, Ho, Wo = dy.shape
    _, Cg, KH, KW = w.shape
    C = Cg * groups
    H, W = in_hw
    top, bottom, left, right = pads
    shape = (N, C, H + top + bottom, W + left + right)
    # unpadded: col2im sums straight into the result; else into a padded work array, cropped into it
    dxp = new_or(out, shape, dy.dtype) if pads == (0, 0, 0, 0) else scratch("i2c_dx", shape, dy.dtype)
    # per group (Cg*KH*KW, K/G): the group's filters transposed, groups stacked along the rows
    wmt = w.reshape(groups, K // groups, Cg * KH * KW).transpose(0, 2, 1).reshape(C * KH * KW, K // groups)
    args = (dy, np.ascontiguousarray(wmt), dxp, KH, KW, stride, dil[0], dil[1], groups)
    if kernel_ready(_i2c_dx, args + (0, 0)):
        with _ONE_BLAS_THREAD:
            parallel_for(lambda lo, hi, k: _i2c_dx(*args, lo, hi), N)
    if pads == (0, 0, 0, 0):
        return dxp
    dx = new_or(out, (N, C, H, W), dy.dtype)
    dx[...] = dxp[:, :, top:top + H, left:left + W]
    return dx


def grad_weights(x, dy, stride, pads, k_hw, dil=(1, 1), groups=1, out=None):
    N, K, Ho, Wo = dy.shape
    C = x.shape[1]
    KH, KW = k_hw
    xp = _padded_images(x, pads, "i2c_x")
    nt = numba.config.NUMBA_NUM_THREADS
    # partial sums per group of images: as many groups as Numba may run threads (not as it runs now: the
    # sums, so the bits, would depend on the count, which the executor picks by timing)
    G = max(1, min(N, nt))
    P = Ho * Wo
    B = _dw_batch(-(-N // G), C * KH * KW + K, P, x.dtype.itemsize)
    cols = scratch("i2c_cols", (nt, C * KH * KW * B * P), x.dtype)
    dyb = scratch("i2c_dyb", (nt, K * B * P), x.dtype)
    C //= groups
    part = np.empty((G, K, C * KH * KW), x.dtype)
    head, tail = (xp, dy, part), (B, KH, KW, stride, dil[0], dil[1], groups)
    if kernel_ready(_i2c_dw, head + (cols[0], dyb[0]) + tail + (0, 0)):
        with _ONE_BLAS_THREAD:
            parallel_for(lambda lo, hi, k: _i2c_dw(*head, cols[k], dyb[k], *tail, lo, hi), G)
    return sum_partials(part, new_or(out, (K, C, KH, KW), x.dtype))


DW_INNER = 512                 # a dL/dW GEMM's inner dimension (images x output pixels) to aim for ...
DW_WORK_BYTES = 4 << 20        # ... within this much work per thread (the columns and dy of its images)


def _dw_batch(per_group, rows, P, itemsize):
    """Images per GEMM of _i2c_dw: enough for an inner dimension of DW_INNER, at most the images of a
    group and what fits DW_WORK_BYTES (rows: columns' rows + dy's, per output pixel of one image)."""
    want = -(-DW_INNER // P)
    fits = DW_WORK_BYTES // max(1, rows * P * itemsize)
    return int(max(1, min(per_group, want, fits)))
