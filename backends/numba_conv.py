"""Fast convolution and pooling kernels of the numba backend.

Plain functions on numpy arrays: NCHW activations, KCHW filters, float32 (float64 works too).
``pads = (top, bottom, left, right)`` is zero padding already normalised by the caller; output sizes
use floor division like PyTorch.  API::

    conv2d(x, w, b, stride, pads, relu=False, strategy=None) -> y
    conv2d_relu_maxpool(x, w, b, stride, pads, pool_size, pool_stride, save_route=False,
                        strategy=None) -> y or (y, route)
    maxpool_route_backward(dy, route, conv_out_hw) -> dz
    conv2d_dx(dy, w, stride, pads, in_hw, strategy=None) -> dx
    conv2d_dw(x, dy, stride, pads, k_hw, strategy=None) -> dw
    conv2d_db(dy) -> db
    maxpool2d(x, size, stride, save_route=False) -> y or (y, route); maxpool2d_backward(dy, route, in_hw)
    avgpool2d(x, size, stride) -> y; avgpool2d_backward(dy, size, stride, in_hw) -> dx
    choose_conv_strategy(x_shape, w_shape, stride, pads, dtype, op="conv2d", pool=None) -> str
    kernel_cache_dir() -> str; clear_scratch()

Semantics follow PyTorch: ReLU gradient 0 at 0 (route -1 where a window's max is <= 0), max-pool
ties go to the first element in row-major order, NaN propagates through max pooling and ReLU.

Two strategies compute the convolutions:

``"direct"``
    Kernels generated per shape as Python source (:mod:`graphc.backends.numba_conv_gen`): exact
    shape constants, the filter taps unrolled with the weights held in scalars, each zero-padded
    input plane read as one flat vector of "wide rows", each prange task computing a block of
    output channels of one image, bias/ReLU/max-pool (and the route) fused into the epilogue.
    dL/dX is the same forward kernel on the (dilated, padded) output gradient with rotated
    filters; dL/dW is its own generated reduction (partial sums per group of images, then summed;
    for one input channel it reads dy in place).  Strides > 1 become stride-1 convolutions by
    space-to-depth (input phases become channels).
``"im2col"``
    One Numba parallel loop over images: im2col of the image into a per-thread buffer, a BLAS
    GEMM (numpy's dot, BLAS held to one thread meanwhile: two thread pools on two cores fight),
    the epilogue straight from the product (col2im for dL/dX, per-thread partial sums for dL/dW).

:func:`choose_conv_strategy` times both once per shape and op and remembers the winner in
``conv_strategy.json`` in :func:`kernel_cache_dir`; ``strategy=None`` uses it.  Generated kernels
are written there as ``.py`` files named by a hash of their source (and of the LLVM options they
are compiled with) and compiled with ``@njit(cache=True)``, so a second process loads machine code
from Numba's on-disk cache instead of generating and compiling.

Environment: ``GRAPHC_CACHE_DIR`` (kernel cache, default ``~/.cache/graphc/kernels``),
``GRAPHC_CONV_STRATEGY`` (``direct``/``im2col``: skip the timing), ``GRAPHC_NUMBA_VECTOR_WIDTH``
(loop-vectoriser width forced on generated kernels; default 16 floats on AVX-512 hosts, 0 = LLVM's
own choice, which is 8 floats on Intel cores).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import sys
import tempfile
import threading
import time

import numpy as np
import numba
from numba import njit, prange

try:
    from graphc.errors import BackendError
except ImportError:  # pragma: no cover - only when this file is used outside the graphc package
    class BackendError(Exception):
        """A backend that cannot run here or an op it has no kernel for."""

try:
    from . import numba_conv_gen as _gen
except ImportError:  # pragma: no cover - loaded as a top-level module (by path)
    _spec = importlib.util.spec_from_file_location(
        "numba_conv_gen", os.path.join(os.path.dirname(os.path.abspath(__file__)), "numba_conv_gen.py"))
    _gen = importlib.util.module_from_spec(_spec)
    sys.modules.setdefault("numba_conv_gen", _gen)
    _spec.loader.exec_module(_gen)

__all__ = [
    "conv2d", "conv2d_relu_maxpool", "maxpool_route_backward", "conv2d_dx", "conv2d_dw", "conv2d_db",
    "maxpool2d", "maxpool2d_backward", "avgpool2d", "avgpool2d_backward",
    "choose_conv_strategy", "kernel_cache_dir", "clear_scratch", "STRATEGIES", "bind_direct_fwd",
]

STRATEGIES = ("direct", "im2col")

_LOCK = threading.RLock()


# ==================================================================================================
# kernel cache directory, generated-source loading, compilation options
# ==================================================================================================

def kernel_cache_dir() -> str:
    """Directory of generated kernels, their Numba cache and the strategy choices.

    ``$GRAPHC_CACHE_DIR`` when set, else ``~/.cache/graphc/kernels``; created on demand.
    """
    d = os.environ.get("GRAPHC_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "graphc", "kernels")
    try:
        os.makedirs(d, exist_ok=True)
    except OSError as e:
        raise BackendError(f"cannot create the kernel cache directory {d!r}: {e} "
                           "(set GRAPHC_CACHE_DIR to a writable directory)") from e
    return d


def _write_once(path: str, text: str) -> None:
    """Make ``path`` hold ``text``, atomically: a reader never sees a half-written file, and a file
    with the right content is never rewritten (its mtime keys Numba's cache index)."""
    try:
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return
        stale = True
    except FileNotFoundError:
        stale = False
    d = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".py")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        if stale:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)        # fails if another process got there first: keep theirs
            except FileExistsError:
                pass
            except OSError:               # file systems without hard links
                os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


_KERNELS: dict = {}


def _codegen_tag(predicate: bool) -> str:
    return (f"# codegen: force-vector-width f32={_forced_vector_width(np.float32)} "
            f"f64={_forced_vector_width(np.float64)}, predicate-tail={int(bool(predicate))}\n")


def _load_kernel(src: str, predicate: bool = True):
    """Import (writing it first if needed) the generated module whose text is ``src``; return its
    ``kernel`` dispatcher.  The LLVM options it will be compiled with are written into the text
    (so into the file name): Numba's cache cannot see them, and machine code compiled under other
    options must not be picked up."""
    src = _codegen_tag(predicate) + src
    name = "graphc_kernel_" + hashlib.sha256(src.encode()).hexdigest()[:24]
    k = _KERNELS.get(name)
    if k is not None:
        return k
    with _LOCK:
        k = _KERNELS.get(name)
        if k is not None:
            return k
        path = os.path.join(kernel_cache_dir(), name + ".py")
        try:
            _write_once(path, src)
        except OSError as e:
            raise BackendError(f"cannot write generated kernel {path!r}: {e}") from e
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        # registered before running it: Numba finds the module by name when it reloads a cached
        # function's environment (an unregistered module cannot be cached)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        k = mod.kernel
        k._graphc_predicate = bool(predicate)
        k._graphc_ready = set()
        _KERNELS[name] = k
        return k


def _host_has_avx512() -> bool:
    if numba.config.CPU_NAME or numba.config.CPU_FEATURES:
        return False              # compiling for another CPU: leave LLVM's choices alone
    try:
        import llvmlite.binding as llvm
        feats = llvm.get_host_cpu_features()
        return bool(feats.get("avx512f", False))
    except Exception:  # pragma: no cover
        return False


_AVX512 = _host_has_avx512()


def _forced_vector_width(dtype) -> int:
    """Vector width forced on the generated kernels' loops.

    LLVM prefers 256-bit vectors on AVX-512 Intel cores; the generated kernels are FMA-bound and
    gain 8-15 % from 512-bit ones.  ``$GRAPHC_NUMBA_VECTOR_WIDTH`` overrides (0 = LLVM's choice).
    """
    env = os.environ.get("GRAPHC_NUMBA_VECTOR_WIDTH")
    if env is not None:
        try:
            return max(0, int(env))
        except ValueError:
            return 0
    return 64 // np.dtype(dtype).itemsize if _AVX512 else 0


@contextlib.contextmanager
def _codegen_options(width: int, predicate: bool = True):
    """Force LLVM's loop-vectoriser width while a generated kernel compiles (process-wide LLVM
    options, restored afterwards).  With ``predicate`` the remainder of a vector loop runs as one
    masked iteration instead of a scalar loop (the pooling epilogues have rows of 5 to 14
    elements); the long reductions of dL/dW are faster without.  LLVM prints 'loop not vectorized'
    remarks for every loop it cannot vectorise when a width is forced; they are dropped by
    pointing fd 2 at /dev/null."""
    if not width:
        yield
        return
    import llvmlite.binding as llvm
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    saved = None
    try:
        saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
    except OSError:  # pragma: no cover
        saved = None
    llvm.set_option("", f"-force-vector-width={int(width)}")
    if predicate:
        llvm.set_option("", "-prefer-predicate-over-epilogue=predicate-else-scalar-epilogue")
    try:
        yield
    finally:
        llvm.set_option("", "-force-vector-width=0")
        if predicate:
            llvm.set_option("", "-prefer-predicate-over-epilogue=scalar-epilogue")
        if saved is not None:
            os.dup2(saved, 2)
            os.close(saved)


def _run_generated(kern, args, dtype):
    """Call a generated kernel, compiling it first (under the wide-vector options) when no machine
    code for these argument types is loaded yet; Numba's disk cache answers when it can.

    The arguments are this module's own C-contiguous work arrays (plus flags), so their types
    follow from the dtype; after the first call the type check is skipped (a caller's read-only
    or unaligned array would make Numba compile one more specialisation, without the options)."""
    key = np.dtype(dtype).char
    ready = kern._graphc_ready
    if key not in ready:
        sig = tuple(numba.typeof(a) for a in args)
        if sig not in kern.overloads:
            with _LOCK:
                if sig not in kern.overloads:
                    with _codegen_options(_forced_vector_width(dtype), kern._graphc_predicate):
                        kern.compile(sig)
        ready.add(key)
    return kern(*args)


_TLS = threading.local()


def _scratch(tag, shape, dtype):
    """A work array private to this module, kept per thread and reused from call to call.

    Fresh large numpy arrays come from mmap (glibc hands every allocation above its threshold
    straight back to the kernel on free), so each call would pay a page fault per 4 KiB touched --
    about 1.4 us each on this VM, milliseconds per layer.  Never returned to callers."""
    bufs = getattr(_TLS, "bufs", None)
    if bufs is None:
        bufs = _TLS.bufs = {}
    key = (tag, tuple(shape), np.dtype(dtype).str)
    a = bufs.get(key)
    if a is None:
        if len(bufs) > 64:
            bufs.clear()
        a = bufs[key] = _aligned_empty(shape, dtype)
    return a


def _aligned_empty(shape, dtype, align=64):
    """C-contiguous empty array whose data starts on a cache-line boundary."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape))
    buf = np.empty(n + align // dtype.itemsize, dtype)
    off = (-buf.ctypes.data % align) // dtype.itemsize
    return buf[off:off + n].reshape(shape)


def clear_scratch() -> None:
    """Free the work arrays this thread keeps between calls."""
    _TLS.bufs = {}


# ==================================================================================================
# generic (not generated) kernels
# ==================================================================================================

_SERIAL_BELOW = 1 << 16       # elements: smaller placements run on the calling thread


@njit(cache=True, nogil=True)
def _fill_plane(out, off, end, img, Hd, Wd, s, pt, pl):
    """out[off:end] = zeros with the (Hd x Wd, rows Wd wide, flat) plane at its start holding
    img[i, j] at row i*s+pt, column j*s+pl (entries falling outside are dropped).  Every element is
    written once, each row as zeros + one contiguous copy + zeros when s == 1."""
    h, w = img.shape
    if s == 1:
        j0 = max(0, -pl)
        j1 = min(w, Wd - pl)
        for r in range(Hd):
            base = off + r * Wd
            i = r - pt
            if 0 <= i < h and j1 > j0:
                for q in range(base, base + j0 + pl):
                    out[q] = 0
                src = img[i]
                for j in range(j0, j1):
                    out[base + pl + j] = src[j]
                for q in range(base + j1 + pl, base + Wd):
                    out[q] = 0
            else:
                for q in range(base, base + Wd):
                    out[q] = 0
    else:
        for q in range(off, off + Hd * Wd):
            out[q] = 0
        for i in range(h):
            r = i * s + pt
            if 0 <= r < Hd:
                for j in range(w):
                    col = j * s + pl
                    if 0 <= col < Wd:
                        out[off + r * Wd + col] = img[i, j]
    for q in range(off + Hd * Wd, end):
        out[q] = 0


@njit(parallel=True, cache=True, nogil=True)
def _place(src, dst, Hd, Wd, s, pt, pl):
    """dst (N, C', L): plane (n, c) becomes a zero (Hd x Wd, rows Wd wide, flat) plane followed by
    zeros up to L, with src[n, c, i, j] at row i*s+pt, column j*s+pl (entries falling outside are
    dropped).  Channels c >= src.shape[1] stay all zero."""
    N, C = src.shape[0], src.shape[1]
    Cd = dst.shape[1]
    L = dst.shape[2]
    if N * Cd * L < _SERIAL_BELOW:            # a parallel launch costs more than the copy
        for t in range(N * Cd):
            _place_one(src, dst, t, Hd, Wd, s, pt, pl)
    else:
        for t in prange(N * Cd):
            _place_one(src, dst, t, Hd, Wd, s, pt, pl)


@njit(cache=True, nogil=True)
def _place_one(src, dst, t, Hd, Wd, s, pt, pl):
    C = src.shape[1]
    Cd = dst.shape[1]
    L = dst.shape[2]
    n = t // Cd
    c = t - n * Cd
    plane = dst[n, c]
    if c < C:
        _fill_plane(plane, 0, L, src[n, c], Hd, Wd, s, pt, pl)
    else:
        for q in range(L):
            plane[q] = 0


@njit(parallel=True, cache=True, nogil=True)
def _place_t(src, dst, Hd, Wd, L, pt, pl):
    """Channel-major placement for the dL/dW kernels: dst (C', N*L + tail); the (Hd x Wd) plane of
    image n, channel c starts at dst[c, n*L] and holds src[n, c, i, j] at row i+pt, column j+pl;
    everything else (borders, the rest of L, the tail, channels c >= src.shape[1]) is zero."""
    N, C = src.shape[0], src.shape[1]
    Cd = dst.shape[0]
    tot = dst.shape[1]
    for t in prange(Cd * N):
        c = t // N
        n = t - c * N
        row = dst[c]
        end = (n + 1) * L if n < N - 1 else tot
        if c < C:
            _fill_plane(row, n * L, end, src[n, c], Hd, Wd, 1, pt, pl)
        else:
            for q in range(n * L, end):
                row[q] = 0


@njit(parallel=True, cache=True, nogil=True)
def _shift_copies(src, dst, Hp, Wo, pt, pl):
    """dst (N, C, KW, Hp*Wo): dst[n, c, kw, r*Wo + j] = xpad[n, c, r, j + kw] where xpad is src
    zero-padded by pt rows on top and pl columns on the left (and zeros beyond its end)."""
    N, C, h, w = src.shape
    KW = dst.shape[2]
    for t in prange(N * C):
        n = t // C
        c = t - n * C
        for kw in range(KW):
            plane = dst[n, c, kw]
            for r in range(Hp):
                i = r - pt
                for j in range(Wo):
                    jj = j + kw - pl
                    if 0 <= i < h and 0 <= jj < w:
                        plane[r * Wo + j] = src[n, c, i, jj]
                    else:
                        plane[r * Wo + j] = 0


@njit(cache=True, nogil=True)
def _cols_of(xp, cols, KH, KW, s, Ho, Wo):
    """cols (C*KH*KW, Ho*Wo) of one padded image xp (C, Hp, Wp)."""
    C = xp.shape[0]
    for c in range(C):
        for kh in range(KH):
            for kw in range(KW):
                row = cols[(c * KH + kh) * KW + kw]
                for i in range(Ho):
                    src = xp[c, i * s + kh]
                    if s == 1:
                        for j in range(Wo):
                            row[i * Wo + j] = src[j + kw]
                    else:
                        for j in range(Wo):
                            row[i * Wo + j] = src[j * s + kw]


@njit(cache=True, nogil=True)
def _pool_epilogue(z, bk, yk, rk, Wo, ps, pst, save):
    """bias + ReLU + max pool of one conv-output plane z (Ho*Wo,) into yk (Hq, Wq); route as in
    conv2d_relu_maxpool (flat index of the window's first max, -1 when it is <= 0)."""
    Hq, Wq = yk.shape
    for i in range(Hq):
        for j in range(Wq):
            r0 = i * pst
            c0 = j * pst
            m = z[r0 * Wo + c0] + bk
            mi = r0 * Wo + c0
            for di in range(ps):
                for dj in range(ps):
                    v = z[(r0 + di) * Wo + c0 + dj] + bk
                    if v > m:
                        m = v
                        mi = (r0 + di) * Wo + c0 + dj
            yk[i, j] = 0.0 if m <= 0 else m
            if save:
                rk[i, j] = mi if m > 0 else -1


@njit(parallel=True, cache=True, nogil=True)
def _i2c_fwd(xp, wm, b, y, route, cols, KH, KW, s, Ho, Wo, epi, flag, ps, pst):
    """im2col + GEMM forward, one image per task: cols[thread] (C*KH*KW, Ho*Wo) is built from the
    padded image xp[n] (C, Hp, Wp), multiplied by wm (K, C*KH*KW) (BLAS; keep it to one thread
    around this call), and the epilogue writes y[n] straight from the product.
    epi 0: store (+bias, ReLU when flag); epi 1: bias + ReLU + max pool (route when flag)."""
    N = xp.shape[0]
    K = wm.shape[0]
    P = Ho * Wo
    for n in prange(N):
        cl = cols[numba.get_thread_id()]
        _cols_of(xp[n], cl, KH, KW, s, Ho, Wo)
        z = np.dot(wm, cl)                                   # (K, Ho*Wo)
        for k in range(K):
            bk = b[k]
            zk = z[k]
            if epi == 0:
                yk = y[n, k].reshape(P)
                if flag:
                    for q in range(P):
                        v = zk[q] + bk
                        yk[q] = 0.0 if v < 0 else v
                else:
                    for q in range(P):
                        yk[q] = zk[q] + bk
            else:
                _pool_epilogue(zk, bk, y[n, k], route[n, k], Wo, ps, pst, flag)


@njit(parallel=True, cache=True, nogil=True)
def _i2c_dx(dy, wmt, dxp, KH, KW, s):
    """dL/dX by GEMM + col2im, one image per task: dcols = wmt (C*KH*KW, K) @ dy[n] (K, Ho*Wo),
    summed into the padded gradient plane dxp[n] (C, Hp, Wp)."""
    N, K, Ho, Wo = dy.shape
    C = dxp.shape[1]
    for n in prange(N):
        dcols = np.dot(wmt, dy[n].reshape(K, Ho * Wo))
        plane = dxp[n]
        plane[:, :, :] = 0
        for c in range(C):
            for kh in range(KH):
                for kw in range(KW):
                    row = dcols[(c * KH + kh) * KW + kw]
                    for i in range(Ho):
                        dst = plane[c, i * s + kh]
                        for j in range(Wo):
                            dst[j * s + kw] += row[i * Wo + j]


@njit(parallel=True, cache=True, nogil=True)
def _i2c_dw(xp, dy, part, cols, KH, KW, s):
    """dL/dW by im2col + GEMM: part[g] (K, C*KH*KW) = sum over the images of task g of
    dy[n] (K, Ho*Wo) @ cols(xp[n]).T; the caller sums part over its first axis."""
    N, K, Ho, Wo = dy.shape
    G = part.shape[0]
    for g in prange(G):
        cl = cols[numba.get_thread_id()]
        acc = part[g]
        acc[:, :] = 0
        for n in range(g, N, G):
            _cols_of(xp[n], cl, KH, KW, s, Ho, Wo)
            acc += np.dot(dy[n].reshape(K, Ho * Wo), cl.T)


@njit(parallel=True, cache=True, nogil=True)
def _maxpool_k(x, y, route, size, stride, save):
    N, C, H, W = x.shape
    Hq, Wq = y.shape[2], y.shape[3]
    for t in prange(N * C):
        n = t // C
        c = t - n * C
        for i in range(Hq):
            for j in range(Wq):
                r0 = i * stride
                c0 = j * stride
                m = x[n, c, r0, c0]
                idx = r0 * W + c0
                for di in range(size):
                    for dj in range(size):
                        v = x[n, c, r0 + di, c0 + dj]
                        if v > m or v != v:      # NaN propagates, like PyTorch
                            m = v
                            idx = (r0 + di) * W + c0 + dj
                y[n, c, i, j] = m
                if save:
                    route[n, c, i, j] = idx


@njit(parallel=True, cache=True, nogil=True)
def _route_scatter(dy, route, dx):
    """dx (N, C, H, W) = 0, then dx.flat-in-plane[route] += dy for every route >= 0."""
    N, C, Hq, Wq = dy.shape
    H, W = dx.shape[2], dx.shape[3]
    for t in prange(N * C):
        n = t // C
        c = t - n * C
        plane = dx[n, c]
        plane[:, :] = 0
        for i in range(Hq):
            for j in range(Wq):
                r = route[n, c, i, j]
                if r >= 0:
                    ri = r // W
                    plane[ri, r - ri * W] += dy[n, c, i, j]


@njit(parallel=True, cache=True, nogil=True)
def _avgpool_k(x, y, size, stride):
    N, C, H, W = x.shape
    Hq, Wq = y.shape[2], y.shape[3]
    inv = 1.0 / (size * size)
    for t in prange(N * C):
        n = t // C
        c = t - n * C
        for i in range(Hq):
            for j in range(Wq):
                s = x[n, c, i * stride, j * stride] * 0
                for di in range(size):
                    for dj in range(size):
                        s += x[n, c, i * stride + di, j * stride + dj]
                y[n, c, i, j] = s * inv


@njit(parallel=True, cache=True, nogil=True)
def _avgpool_bwd_k(dy, dx, size, stride):
    N, C, Hq, Wq = dy.shape
    inv = 1.0 / (size * size)
    for t in prange(N * C):
        n = t // C
        c = t - n * C
        plane = dx[n, c]
        plane[:, :] = 0
        for i in range(Hq):
            for j in range(Wq):
                g = dy[n, c, i, j] * inv
                for di in range(size):
                    for dj in range(size):
                        plane[i * stride + di, j * stride + dj] += g


@njit(parallel=True, cache=True, nogil=True, fastmath={"contract", "reassoc", "nsz"})
def _db_k(dy, out):
    N, K, Ho, Wo = dy.shape
    for k in prange(K):
        tot = 0.0
        for n in range(N):
            plane = dy[n, k]
            s = plane[0, 0] * 0
            for i in range(Ho):
                for j in range(Wo):
                    s += plane[i, j]
            tot += s
        out[k] = tot


# ==================================================================================================
# argument checking
# ==================================================================================================

def _float_array(a, name):
    a = np.asarray(a)
    if a.dtype not in (np.float32, np.float64):
        raise BackendError(f"{name}: numba conv kernels take float32 or float64, got {a.dtype}")
    return np.ascontiguousarray(a)


def _check_conv(x, w, b, stride, pads):
    x = _float_array(x, "x")
    w = np.ascontiguousarray(np.asarray(w, dtype=x.dtype))
    if x.ndim != 4 or w.ndim != 4:
        raise BackendError(f"conv2d wants x (N,C,H,W) and w (K,C,KH,KW), got {x.shape} and {w.shape}")
    if x.shape[1] != w.shape[1]:
        raise BackendError(f"conv2d: x has {x.shape[1]} channels but w expects {w.shape[1]}")
    if b is not None:
        b = np.ascontiguousarray(np.asarray(b, dtype=x.dtype).reshape(-1))
        if b.shape[0] != w.shape[0]:
            raise BackendError(f"conv2d: bias has {b.shape[0]} entries for {w.shape[0]} filters")
    stride, pads = _check_geometry(x.shape, w.shape, stride, pads)
    return x, w, b, stride, pads


def _check_geometry(x_shape, w_shape, stride, pads):
    stride = int(stride)
    if stride < 1:
        raise BackendError(f"conv2d: stride must be >= 1, got {stride}")
    pads = tuple(int(p) for p in pads)
    if len(pads) != 4 or min(pads) < 0:
        raise BackendError(f"conv2d: pads must be (top, bottom, left, right) >= 0, got {pads}")
    _, _, H, W = x_shape
    _, _, KH, KW = w_shape
    if H + pads[0] + pads[1] < KH or W + pads[2] + pads[3] < KW:
        raise BackendError(f"conv2d: filter {KH}x{KW} larger than the padded input "
                           f"{H + pads[0] + pads[1]}x{W + pads[2] + pads[3]}")
    return stride, pads


def _out_hw(H, W, KH, KW, stride, pads):
    top, bottom, left, right = pads
    return (H + top + bottom - KH) // stride + 1, (W + left + right - KW) // stride + 1


def _pool_hw(H, W, size, stride, what="pool"):
    size, stride = int(size), int(stride)
    if size < 1 or stride < 1:
        raise BackendError(f"{what}: size and stride must be >= 1, got {size}, {stride}")
    if H < size or W < size:
        raise BackendError(f"{what}: window {size} larger than the {H}x{W} input")
    return (H - size) // stride + 1, (W - size) // stride + 1


# ==================================================================================================
# direct strategy: stride-1 correlation over padded flat planes (generated kernels)
# ==================================================================================================

def _vec_len(dtype) -> int:
    return 16 if np.dtype(dtype).itemsize == 4 else 8


def _pick_blocks(K: int, C: int, T: int):
    """(KB, CB): output channels per task and input channels per pass of the vector loop, so that
    the KB*CB*T weights stay in registers and each loaded input vector feeds several FMAs."""
    if K == 1:
        return 1, max(1, min(C, 18 // T if T <= 9 else 1))
    if T == 1:
        return min(K, 4), min(C, 4)
    if T <= 4:
        return min(K, 4), 1
    if T <= 9:
        return min(K, 2), 1            # 18 weights in registers: measured best for 3x3
    return (min(K, 2) if C == 1 else 1), 1   # 5x5: 25 weights per output channel already


class _FwdPlan:
    """Geometry of one direct stride-1 forward call over flat padded planes."""

    def __init__(self, K, C, KH, KW, Hp, Wp, Ho, Wo, dtype, epi, ps=0, pst=0, wlayout="blocked"):
        self.K, self.C, self.KH, self.KW, self.Hp, self.Wp, self.Ho, self.Wo = K, C, KH, KW, Hp, Wp, Ho, Wo
        self.epi, self.ps, self.pst, self.wlayout = epi, ps, pst, wlayout
        T = KH * KW
        self.KB, self.CB = _pick_blocks(K, C, T)
        if epi == "pool":
            self.Hq, self.Wq = _pool_hw(Ho, Wo, ps, pst, "conv2d_relu_maxpool")
            rows = (self.Hq - 1) * pst + ps
            cols = (self.Wq - 1) * pst + ps
        else:
            self.Hq = self.Wq = 0
            rows, cols = Ho, Wo
        VL = _vec_len(dtype)
        self.PL = _gen.round_up((rows - 1) * Wp + cols, VL)
        maxoff = (KH - 1) * Wp + KW - 1
        self.Lx = _gen.round_up(max(Hp * Wp, self.PL + maxoff), VL)
        self.NKB = -(-K // self.KB)

    def source(self):
        return _gen.gen_conv_fwd(C=self.C, KB=self.KB, NKB=self.NKB, K=self.K, KH=self.KH, KW=self.KW,
                                 Wp=self.Wp, PL=self.PL, CB=self.CB, epi=self.epi, Ho=self.Ho, Wo=self.Wo,
                                 ps=self.ps, pst=self.pst, Hq=self.Hq, Wq=self.Wq,
                                 **({} if self.wlayout == "blocked" else {"wlayout": self.wlayout}))

    def weights(self, w):
        """(K, C, KH, KW) -> (NKB, C, KB*KH*KW), zero filters padding the last blocks."""
        K, C, KH, KW = w.shape
        Kp = self.NKB * self.KB
        wp = w if Kp == K else np.concatenate([w, np.zeros((Kp - K, C, KH, KW), w.dtype)])
        return np.ascontiguousarray(
            wp.reshape(self.NKB, self.KB, C, KH * KW).transpose(0, 2, 1, 3).reshape(self.NKB, C, -1))

    def bias(self, b, dtype):
        bb = np.zeros(self.NKB * self.KB, dtype)
        if b is not None:
            bb[:self.K] = b
        return bb


_PLANS: dict = {}


def _fwd_plan(K, C, KH, KW, Hp, Wp, Ho, Wo, dtype, epi, ps=0, pst=0, wlayout="blocked") -> _FwdPlan:
    """The (memoised) plan of a direct forward call, its kernel loaded."""
    key = (K, C, KH, KW, Hp, Wp, Ho, Wo, np.dtype(dtype).str, epi, ps, pst, wlayout)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _FwdPlan(K, C, KH, KW, Hp, Wp, Ho, Wo, dtype, epi, ps, pst, wlayout)
        plan.kern = _load_kernel(plan.source())
        _PLANS[key] = plan
    return plan


def _direct_planes(xb, plan: _FwdPlan, w1, b, relu=False, save_route=False):
    """Run the generated forward kernel on padded flat planes xb (N, C, plan.Lx)."""
    N = xb.shape[0]
    dtype = xb.dtype
    kern = plan.kern
    if plan.epi == "pool":
        y = np.empty((N, plan.K, plan.Hq, plan.Wq), dtype)
        route = np.empty(y.shape if save_route else (1, 1, 1, 1), np.int32)
    else:
        y = np.empty((N, plan.K, plan.Ho, plan.Wo), dtype)
        route = np.empty((1, 1, 1, 1), np.int32)
    flag = bool(save_route) if plan.epi == "pool" else bool(relu)
    # one accumulator block per worker thread (numba.get_thread_id() is below NUMBA_NUM_THREADS);
    # rows padded by 128 bytes and the block cache-line aligned: two threads writing the two ends
    # of one cache line made the kernel slower on 2 threads than on 1 (false sharing)
    nt = numba.config.NUMBA_NUM_THREADS
    acc = _scratch("fwd_acc", (nt, plan.KB, plan.PL + 128 // np.dtype(dtype).itemsize), dtype)
    _run_generated(kern, (xb, plan.weights(w1), plan.bias(b, dtype), y, route, flag, acc), dtype)
    return y, route


def _space_to_depth(x, w, stride, pads):
    """Stride-s correlation -> stride-1 correlation: returns padded phases xs (N, C*s*s, Hq, Wq) and
    weights ws (K, C*s*s, ceil(KH/s), ceil(KW/s)) with phase (a, b) of channel c at c*s*s + a*s + b."""
    s = stride
    N, C, H, W = x.shape
    K, _, KH, KW = w.shape
    top, bottom, left, right = pads
    Ho, Wo = _out_hw(H, W, KH, KW, s, pads)
    KHq, KWq = -(-KH // s), -(-KW // s)
    Hq, Wq = Ho + KHq - 1, Wo + KWq - 1
    xp = np.zeros((N, C, Hq * s, Wq * s), x.dtype)
    h = min(H, Hq * s - top)
    ww = min(W, Wq * s - left)
    xp[:, :, top:top + h, left:left + ww] = x[:, :, :h, :ww]
    xs = xp.reshape(N, C, Hq, s, Wq, s).transpose(0, 1, 3, 5, 2, 4).reshape(N, C * s * s, Hq, Wq)
    wpad = np.zeros((K, C, KHq * s, KWq * s), w.dtype)
    wpad[:, :, :KH, :KW] = w
    ws = wpad.reshape(K, C, KHq, s, KWq, s).transpose(0, 1, 3, 5, 2, 4).reshape(K, C * s * s, KHq, KWq)
    return np.ascontiguousarray(xs), np.ascontiguousarray(ws), (Ho, Wo)


def _direct_fwd(x, w, b, stride, pads, epi, relu=False, ps=0, pst=0, save_route=False):
    N, C, H, W = x.shape
    K, _, KH, KW = w.shape
    if stride > 1:
        xs, ws, (Ho, Wo) = _space_to_depth(x, w, stride, pads)
        x1, w1, p1 = xs, ws, (0, 0, 0, 0)
    else:
        Ho, Wo = _out_hw(H, W, KH, KW, 1, pads)
        x1, w1, p1 = x, w, pads
    top, bottom, left, right = p1
    Hp, Wp = x1.shape[2] + top + bottom, x1.shape[3] + left + right
    plan = _fwd_plan(K, x1.shape[1], w1.shape[2], w1.shape[3], Hp, Wp, Ho, Wo, x.dtype, epi, ps, pst)
    maxoff = (plan.KH - 1) * Wp + plan.KW - 1
    if p1 == (0, 0, 0, 0) and plan.PL + maxoff <= Hp * Wp and x1.flags.writeable and x1.flags.aligned:
        # the kernel's reads stay inside each image plane: read x where it lies
        xb = x1.reshape(N, x1.shape[1], Hp * Wp)
    else:
        xb = _scratch("fwd_x", (N, x1.shape[1], plan.Lx), x.dtype)
        _place(x1, xb, Hp, Wp, 1, top, left)
    return _direct_planes(xb, plan, w1, b, relu=relu, save_route=save_route)


def bind_direct_fwd(x_shape, w_shape, has_bias, stride, pads, dtype, epi, pool=(0, 0)):
    """A prebound direct forward for one shape: ``run(x, w, b, y, route, flag)`` writes into the
    caller's ``y`` (N, K, Ho, Wo) or, for epi "pool", ``y`` (N, K, Hq, Wq) and (when flag) the int32
    ``route`` (shaped like y; any (1,1,1,1) int32 array otherwise); flag = ReLU for "store", save the
    route for "pool". Everything shape-dependent (plan, kernel, work arrays) is made here, once, so
    a call is the kernel and a few attribute checks (the per-call Python of conv2d -- checks,
    plan look-up, weight re-layout, allocations -- costs 20-35 us, more than a batch-1 MNIST layer).
    The kernel reads the filter bank where it lies (generated with ``wlayout="kct"``). y and route
    must be C-contiguous, aligned, writeable, of ``dtype``/int32; x, w, b of another dtype or
    layout are copied first. Returns None where the direct strategy needs more than a stride-1
    kernel (stride > 1: space-to-depth per call)."""
    if int(stride) != 1:
        return None
    dtype = np.dtype(dtype)
    N, C, H, W = (int(v) for v in x_shape)
    K, _, KH, KW = (int(v) for v in w_shape)
    pads = tuple(int(p) for p in pads)
    top, bottom, left, right = pads
    Ho, Wo = _out_hw(H, W, KH, KW, 1, pads)
    Hp, Wp = H + top + bottom, W + left + right
    ps, pst = (int(pool[0]), int(pool[1])) if epi == "pool" else (0, 0)
    plan = _fwd_plan(K, C, KH, KW, Hp, Wp, Ho, Wo, dtype, epi, ps, pst, wlayout="kct")
    maxoff = (plan.KH - 1) * Wp + plan.KW - 1
    inplace = pads == (0, 0, 0, 0) and plan.PL + maxoff <= Hp * Wp
    xb = None if inplace else _aligned_empty((N, C, plan.Lx), dtype)
    nt = numba.config.NUMBA_NUM_THREADS
    acc = _aligned_empty((nt, plan.KB, plan.PL + 128 // dtype.itemsize), dtype)
    nob = np.zeros(K, dtype)
    kern = plan.kern
    w3shape = (K, C, KH * KW)
    xshape = (N, C, H, W)
    ok = (True, True, True)

    memo = [None, None, None, None, None, None]     # w, its (K, C, T) view, x, its flat view, b, b
    compiled = []

    def run(x, w, b, y, route, flag):
        # views of the same arrays as last call are reused (params and planned buffers are the same
        # objects every run; a view follows in-place updates); copies are never remembered
        if w is memo[0]:
            w3 = memo[1]
        elif w.dtype == dtype and w.flags.c_contiguous:
            w3 = w.reshape(w3shape)
            memo[0], memo[1] = w, w3
        else:
            w3 = np.ascontiguousarray(w, dtype).reshape(w3shape)
        if b is None:
            b = nob
        elif b is not memo[4]:
            if b.dtype == dtype and b.ndim == 1 and b.flags.c_contiguous:
                memo[4] = b
            else:
                b = np.ascontiguousarray(b, dtype).reshape(-1)
        if inplace:
            if x is memo[2]:
                xin = memo[3]
            else:
                fl = x.flags
                if (fl.c_contiguous, fl.aligned, fl.writeable) == ok and x.dtype == dtype:
                    xin = x.reshape(N, C, Hp * Wp)
                    memo[2], memo[3] = x, xin
                else:
                    xin = np.ascontiguousarray(x, dtype).reshape(N, C, Hp * Wp).copy()
        else:
            if x.dtype != dtype or not x.flags.writeable or not x.flags.aligned:
                x = np.array(x, dtype)
            _place(x.reshape(xshape), xb, Hp, Wp, 1, top, left)
            xin = xb
        if compiled:
            kern(xin, w3, b, y, route, bool(flag), acc)
        else:
            _run_generated(kern, (xin, w3, b, y, route, bool(flag), acc), dtype)
            compiled.append(True)

    run.plan = plan
    return run


def _direct_dx(dy, w, stride, pads, in_hw):
    """dL/dX: stride-1 correlation of the (stride-dilated) output gradient, placed in planes of
    (H+KH-1) x (W+KW-1), with the filters rotated by 180 degrees and in/out channels swapped."""
    N, K, Ho, Wo = dy.shape
    _, C, KH, KW = w.shape
    H, W = in_hw
    top, _, left, _ = pads
    Hb, Wb = H + KH - 1, W + KW - 1
    wf = np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
    plan = _fwd_plan(C, K, KH, KW, Hb, Wb, H, W, dy.dtype, "store")
    buf = _scratch("dx_dy", (N, K, plan.Lx), dy.dtype)
    _place(dy, buf, Hb, Wb, stride, KH - 1 - top, KW - 1 - left)
    dx, _ = _direct_planes(buf, plan, wf, None)
    return dx


def _dw_groups(N, Lx, NKB):
    G = max(1, min(N, -(-2048 // Lx)))
    want = 4 * numba.get_num_threads()
    while G > 1 and -(-N // G) * NKB < want:
        G = (G + 1) // 2
    return G


def _dw_blocks(K, T):
    if T == 1:
        return min(K, 8)
    if T <= 4:
        return min(K, 4)
    if T <= 9:
        return min(K, 2)
    return min(K, 4)


_DW_KERNELS: dict = {}


def _dw_kernel(kind, **geom):
    key = (kind,) + tuple(sorted(geom.items()))
    k = _DW_KERNELS.get(key)
    if k is None:
        gen = _gen.gen_conv_dw_narrow if kind == "narrow" else _gen.gen_conv_dw_wide
        # long reductions: a masked remainder iteration is slower than a scalar one here
        k = _DW_KERNELS[key] = _load_kernel(gen(**geom), predicate=False)
    return k


def _direct_dw_s1(x, dy, pads, KH, KW):
    """dL/dW of a stride-1 correlation (x unpadded, pads applied here)."""
    N, C, H, W = x.shape
    _, K, Ho, Wo = dy.shape
    top, bottom, left, right = pads
    Hp, Wp = H + top + bottom, W + left + right
    T = KH * KW
    dtype = x.dtype
    zero = dtype.type(0)
    KB = _dw_blocks(K, T)
    NKB = -(-K // KB)
    if C == 1 or (C * KW * Hp * Wo < K * Ho * Wp and Ho * Wo >= 256):
        # narrow: dy read where it lies; KW shifted copies of the (small) input
        xs = _scratch("dw_xs", (N, C, KW, Hp * Wo), dtype)
        _shift_copies(x, xs, Hp, Wo, top, left)
        kern = _dw_kernel("narrow", C=C, KB=KB, NKB=NKB, K=K, KH=KH, KW=KW, Ho=Ho, Wo=Wo)
        part = np.empty((N, NKB * KB, C, T), dtype)
        _run_generated(kern, (xs, dy.reshape(N, K, Ho * Wo), part, zero), dtype)
    else:
        VL = _vec_len(dtype)
        Lx = _gen.round_up(Hp * Wp, VL)
        tail = _gen.round_up((KH - 1) * Wp + KW - 1, VL)
        G = _dw_groups(N, Lx, NKB)
        xf = _scratch("dw_x", (C, N * Lx + tail), dtype)
        _place_t(x, xf, Hp, Wp, Lx, top, left)
        dyf = _scratch("dw_dy", (NKB * KB, N * Lx), dtype)
        _place_t(dy, dyf, Hp, Wp, Lx, 0, 0)
        kern = _dw_kernel("wide", C=C, KB=KB, NKB=NKB, KH=KH, KW=KW, Wp=Wp, Lx=Lx, G=G)
        part = np.empty((-(-N // G), NKB * KB, C, T), dtype)
        _run_generated(kern, (xf, dyf, part, N, zero), dtype)
    dw = part.sum(axis=0, dtype=np.float64)[:K] if part.shape[0] > 1 else part[0, :K]
    return np.ascontiguousarray(dw.reshape(K, C, KH, KW), dtype=dtype)


def _direct_dw(x, dy, stride, pads, k_hw):
    KH, KW = k_hw
    if stride == 1:
        return _direct_dw_s1(x, dy, pads, KH, KW)
    s = stride
    N, C, H, W = x.shape
    K = dy.shape[1]
    xs, _, (Ho, Wo) = _space_to_depth(x, np.zeros((1, C, KH, KW), x.dtype), s, pads)
    KHq, KWq = xs.shape[2] - Ho + 1, xs.shape[3] - Wo + 1
    dws = _direct_dw_s1(xs, dy, (0, 0, 0, 0), KHq, KWq)        # (K, C*s*s, KHq, KWq)
    dws = dws.reshape(K, C, s, s, KHq, KWq).transpose(0, 1, 4, 2, 5, 3).reshape(K, C, KHq * s, KWq * s)
    return np.ascontiguousarray(dws[:, :, :KH, :KW])


# ==================================================================================================
# im2col strategy
# ==================================================================================================

_TPC = None


@contextlib.contextmanager
def _blas_single_thread():
    """OpenBLAS limited to one thread while Numba's workers call it (two thread pools on two cores
    fight: PERF_NOTES measured 2.4-2.9x slower steps)."""
    global _TPC
    try:
        if _TPC is None:
            from threadpoolctl import ThreadpoolController
            _TPC = ThreadpoolController()
        ctx = _TPC.limit(limits=1, user_api="blas")
    except Exception:  # pragma: no cover - threadpoolctl missing or failing: run as is
        ctx = contextlib.nullcontext()
    with ctx:
        yield


def _i2c_compiled(fn, args):
    """First call of an im2col kernel for these types: compile it (it loads scipy's BLAS), then
    forget the controller so that it sees that BLAS too."""
    global _TPC
    sig = tuple(numba.typeof(a) for a in args)
    if sig not in fn.overloads:
        with _LOCK:
            fn.compile(sig)
        _TPC = None


def _padded_images(x, pads, tag):
    N, C, H, W = x.shape
    top, bottom, left, right = pads
    if pads == (0, 0, 0, 0):
        return x
    Hp, Wp = H + top + bottom, W + left + right
    xb = _scratch(tag, (N, C, Hp * Wp), x.dtype)
    _place(x, xb, Hp, Wp, 1, top, left)
    return xb.reshape(N, C, Hp, Wp)


def _im2col_fwd(x, w, b, stride, pads, epi, relu=False, ps=0, pst=0, save_route=False):
    N, C, H, W = x.shape
    K, _, KH, KW = w.shape
    Ho, Wo = _out_hw(H, W, KH, KW, stride, pads)
    xp = _padded_images(x, pads, "i2c_x")
    cols = _scratch("i2c_cols", (numba.config.NUMBA_NUM_THREADS, C * KH * KW, Ho * Wo), x.dtype)
    bb = b if b is not None else np.zeros(K, x.dtype)
    if epi == "pool":
        Hq, Wq = _pool_hw(Ho, Wo, ps, pst, "conv2d_relu_maxpool")
        y = np.empty((N, K, Hq, Wq), x.dtype)
        route = np.empty(y.shape if save_route else (1, 1, 1, 1), np.int32)
        args = (xp, w.reshape(K, -1), bb, y, route, cols, KH, KW, stride, Ho, Wo, 1, bool(save_route),
                ps, pst)
    else:
        y = np.empty((N, K, Ho, Wo), x.dtype)
        route = None
        args = (xp, w.reshape(K, -1), bb, y, np.empty((1, 1, 1, 1), np.int32), cols, KH, KW, stride,
                Ho, Wo, 0, bool(relu), 0, 0)
    _i2c_compiled(_i2c_fwd, args)
    with _blas_single_thread():
        _i2c_fwd(*args)
    return y, route


def _im2col_dx(dy, w, stride, pads, in_hw):
    N, K, Ho, Wo = dy.shape
    _, C, KH, KW = w.shape
    H, W = in_hw
    top, bottom, left, right = pads
    shape = (N, C, H + top + bottom, W + left + right)
    dxp = np.empty(shape, dy.dtype) if pads == (0, 0, 0, 0) else _scratch("i2c_dx", shape, dy.dtype)
    args = (dy, np.ascontiguousarray(w.reshape(K, -1).T), dxp, KH, KW, stride)
    _i2c_compiled(_i2c_dx, args)
    with _blas_single_thread():
        _i2c_dx(*args)
    if pads == (0, 0, 0, 0):
        return dxp
    return np.ascontiguousarray(dxp[:, :, top:top + H, left:left + W])


def _im2col_dw(x, dy, stride, pads, k_hw):
    N, K, Ho, Wo = dy.shape
    C = x.shape[1]
    KH, KW = k_hw
    xp = _padded_images(x, pads, "i2c_x")
    nt = numba.config.NUMBA_NUM_THREADS
    cols = _scratch("i2c_cols", (nt, C * KH * KW, Ho * Wo), x.dtype)
    part = np.empty((max(1, min(N, numba.get_num_threads())), K, C * KH * KW), x.dtype)
    args = (xp, dy, part, cols, KH, KW, stride)
    _i2c_compiled(_i2c_dw, args)
    with _blas_single_thread():
        _i2c_dw(*args)
    dw = part.sum(axis=0, dtype=np.float64) if part.shape[0] > 1 else part[0]
    return np.ascontiguousarray(dw.reshape(K, C, KH, KW), dtype=x.dtype)


# ==================================================================================================
# strategy choice
# ==================================================================================================

_CHOICES: dict = {}
_CHOICE_FILE = "conv_strategy.json"


def _choice_key(op, x_shape, w_shape, stride, pads, dtype, pool):
    import llvmlite.binding as llvm
    cpu = numba.config.CPU_NAME or llvm.get_host_cpu_name()
    parts = [op, "x" + "x".join(map(str, x_shape)), "w" + "x".join(map(str, w_shape)), f"s{stride}",
             "p" + "_".join(map(str, pads)), np.dtype(dtype).name, f"t{numba.get_num_threads()}", cpu]
    if pool is not None:
        parts.append(f"pool{pool[0]}_{pool[1]}")
    return "|".join(parts)


def _read_choices(path):
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _record_choice(key, value):
    path = os.path.join(kernel_cache_dir(), _CHOICE_FILE)
    with _LOCK:
        data = _read_choices(path)
        data[key] = value
        try:
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".json")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except OSError:
            pass


def _time_candidates(fns: dict, repeats: int) -> dict:
    """Best-of-``repeats`` seconds of each candidate, runs interleaved (a, b, a, b, ...) after one
    warm-up call each (which compiles).  The minimum, not the median: on a shared machine other
    load only ever adds time, and interleaving spreads slow phases over both candidates."""
    for k in list(fns):
        try:
            fns[k]()
        except Exception:      # e.g. im2col without scipy (Numba's np.dot needs its BLAS)
            if len(fns) == 1:
                raise
            del fns[k]
    best = {k: float("inf") for k in fns}
    budget = time.perf_counter() + 2.0
    for r in range(max(1, repeats)):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
        if r >= 1 and time.perf_counter() > budget:
            break
    return best


SMALL_BATCH_DIRECT = 2      # forward convs of at most this many images take "direct" untimed
IM2COL_MARGIN = 1.15        # im2col must be this much faster than direct to be chosen


def _pick(times: dict) -> str:
    """The strategy to keep from {strategy: seconds (or ms)}: direct unless im2col beats it by more
    than IM2COL_MARGIN (timings on a shared machine differ by tens of per cent; direct has no BLAS
    thread pool to fight and no per-image serialisation)."""
    if "direct" in times and "im2col" in times:
        return "im2col" if times["im2col"] * IM2COL_MARGIN < times["direct"] else "direct"
    return min(times, key=times.get)


def choose_conv_strategy(x_shape, w_shape, stride, pads, dtype, op="conv2d", pool=None,
                         repeats=5) -> str:
    """``"direct"`` or ``"im2col"`` for this convolution, timed once per shape (best of ``repeats``
    interleaved runs after a warm-up call each) and remembered in ``conv_strategy.json`` in
    :func:`kernel_cache_dir`, so later processes reuse the choice.  ``op`` is one of ``"conv2d"``, ``"conv2d_relu_maxpool"``
    (with ``pool=(size, stride)``), ``"conv2d_dx"``, ``"conv2d_dw"``.  ``$GRAPHC_CONV_STRATEGY``
    forces a strategy everywhere."""
    forced = os.environ.get("GRAPHC_CONV_STRATEGY")
    if forced:
        if forced not in STRATEGIES:
            raise BackendError(f"GRAPHC_CONV_STRATEGY={forced!r}: expected one of {STRATEGIES}")
        return forced
    x_shape = tuple(int(v) for v in x_shape)
    w_shape = tuple(int(v) for v in w_shape)
    stride, pads = _check_geometry(x_shape, w_shape, stride, pads)
    dtype = np.dtype(dtype)
    if op not in ("conv2d", "conv2d_relu_maxpool", "conv2d_dx", "conv2d_dw"):
        raise BackendError(f"choose_conv_strategy: unknown op {op!r}")
    if op == "conv2d_relu_maxpool":
        if pool is None:
            raise BackendError("choose_conv_strategy: conv2d_relu_maxpool needs pool=(size, stride)")
        pool = (int(pool[0]), int(pool[1]))
    else:
        pool = None
    key = _choice_key(op, x_shape, w_shape, stride, pads, dtype, pool)
    got = _CHOICES.get(key)
    if got is not None:
        return got
    path = os.path.join(kernel_cache_dir(), _CHOICE_FILE)
    if op in ("conv2d", "conv2d_relu_maxpool") and x_shape[0] <= SMALL_BATCH_DIRECT:
        # im2col runs one image per prange task (one thread at batch 1) and its GEMMs are tiny;
        # a timing taken under load picked it for MNIST's batch-1 layers, 3x slower than direct
        _CHOICES[key] = "direct"
        entry = {"strategy": "direct", "rule": f"batch <= {SMALL_BATCH_DIRECT}"}
        if _read_choices(path).get(key) != entry:
            _record_choice(key, entry)
        return "direct"
    got = _read_choices(path).get(key)
    if isinstance(got, dict) and got.get("ms") is not None and _retime(got.get("load")):
        got = None                       # timed on a busy machine and it is quieter now: time again
    if isinstance(got, dict) and got.get("strategy") in STRATEGIES:
        best = got["strategy"]
        ms = got.get("ms")
        if isinstance(ms, dict) and all(isinstance(ms.get(k), (int, float)) for k in STRATEGIES):
            best = _pick(ms)             # entries recorded before the margin rule
        _CHOICES[key] = best
        return best

    rng = np.random.default_rng(0)
    N, C, H, W = x_shape
    K, _, KH, KW = w_shape
    Ho, Wo = _out_hw(H, W, KH, KW, stride, pads)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = (rng.standard_normal(w_shape) * 0.1).astype(dtype)
    b = (rng.standard_normal(K) * 0.1).astype(dtype)
    dy = rng.standard_normal((N, K, Ho, Wo)).astype(dtype)
    fns = {}
    for strat in STRATEGIES:
        if op == "conv2d":
            fn = lambda s=strat: conv2d(x, w, b, stride, pads, strategy=s)          # noqa: E731
        elif op == "conv2d_relu_maxpool":
            fn = lambda s=strat: conv2d_relu_maxpool(x, w, b, stride, pads, pool[0], pool[1],  # noqa: E731
                                                     save_route=True, strategy=s)
        elif op == "conv2d_dx":
            fn = lambda s=strat: conv2d_dx(dy, w, stride, pads, (H, W), strategy=s)  # noqa: E731
        else:
            fn = lambda s=strat: conv2d_dw(x, dy, stride, pads, (KH, KW), strategy=s)  # noqa: E731
        fns[strat] = fn
    times = _time_candidates(fns, repeats)
    best = _pick(times)
    _CHOICES[key] = best
    _record_choice(key, {"strategy": best, "ms": {k: round(v * 1e3, 4) for k, v in times.items()},
                         "load": round(_load_per_cpu(), 2)})
    return best


def _load_per_cpu():
    """1-minute load average per CPU: above ~0.75 other processes take time slices from our threads."""
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:
        return 0.0


def _retime(recorded_load):
    """A remembered choice is re-timed when it was measured under load (or the load is unknown, as in
    files written before it was recorded) and the machine is now clearly quieter: on these shared
    machines a timing under load once made the direct kernel look 13x slower than it is."""
    now = _load_per_cpu()
    if now > 0.75:
        return False
    return recorded_load is None or (recorded_load > 0.75 and now < recorded_load / 2)


def _strategy(strategy, op, x_shape, w_shape, stride, pads, dtype, pool=None):
    if strategy is None:
        return choose_conv_strategy(x_shape, w_shape, stride, pads, dtype, op=op, pool=pool)
    if strategy not in STRATEGIES:
        raise BackendError(f"unknown conv strategy {strategy!r}: expected one of {STRATEGIES} or None")
    return strategy


# ==================================================================================================
# public API
# ==================================================================================================

def conv2d(x, w, b, stride, pads, relu=False, strategy=None):
    """Cross-correlation y (N, K, Ho, Wo) = x (N, C, H, W) * w (K, C, KH, KW) + b, zero padding
    ``pads = (top, bottom, left, right)``; ``relu`` applies max(., 0) in the epilogue."""
    x, w, b, stride, pads = _check_conv(x, w, b, stride, pads)
    s = _strategy(strategy, "conv2d", x.shape, w.shape, stride, pads, x.dtype)
    if s == "direct":
        y, _ = _direct_fwd(x, w, b, stride, pads, "store", relu=bool(relu))
    else:
        y, _ = _im2col_fwd(x, w, b, stride, pads, "store", relu=bool(relu))
    return y


def conv2d_relu_maxpool(x, w, b, stride, pads, pool_size, pool_stride, save_route=False, strategy=None):
    """Fused conv (+bias) -> ReLU -> max pool (floor output size, like PyTorch).

    With ``save_route`` also returns ``route`` (int32, shaped like y): the flat index ``i*Wo + j``
    in the conv-output plane of each window's (first) maximum, or -1 where that maximum is <= 0 so
    the ReLU killed it; :func:`maxpool_route_backward` turns it into dL/d(pre-activation)."""
    x, w, b, stride, pads = _check_conv(x, w, b, stride, pads)
    ps, pst = int(pool_size), int(pool_stride)
    N, C, H, W = x.shape
    K, _, KH, KW = w.shape
    Ho, Wo = _out_hw(H, W, KH, KW, stride, pads)
    _pool_hw(Ho, Wo, ps, pst, "conv2d_relu_maxpool")
    s = _strategy(strategy, "conv2d_relu_maxpool", x.shape, w.shape, stride, pads, x.dtype, (ps, pst))
    fwd = _direct_fwd if s == "direct" else _im2col_fwd
    y, route = fwd(x, w, b, stride, pads, "pool", ps=ps, pst=pst, save_route=bool(save_route))
    return (y, route) if save_route else y


def maxpool_route_backward(dy, route, conv_out_hw):
    """dL/d(conv pre-activation) (N, K, Ho, Wo) of :func:`conv2d_relu_maxpool`: dy scattered
    (added, overlapping windows accumulate) to the routed positions; route -1 sends nothing."""
    dy = _float_array(dy, "dy")
    route = np.ascontiguousarray(route, dtype=np.int32)
    if route.shape != dy.shape or dy.ndim != 4:
        raise BackendError(f"maxpool backward: route {route.shape} does not match dy {dy.shape}")
    Ho, Wo = (int(v) for v in conv_out_hw)
    dz = np.empty(dy.shape[:2] + (Ho, Wo), dy.dtype)
    _route_scatter(dy, route, dz)
    return dz


def conv2d_dx(dy, w, stride, pads, in_hw, strategy=None):
    """dL/dX (N, C, H, W): full convolution of the stride-dilated dy with the 180-degree rotated
    filters, cropped by the padding (input rows/columns no output reads get zero)."""
    dy = _float_array(dy, "dy")
    w = np.ascontiguousarray(np.asarray(w, dtype=dy.dtype))
    H, W = (int(v) for v in in_hw)
    N, K, Ho, Wo = dy.shape
    x_shape = (N, w.shape[1], H, W)
    stride, pads = _check_geometry(x_shape, w.shape, stride, pads)
    if (Ho, Wo) != _out_hw(H, W, w.shape[2], w.shape[3], stride, pads) or K != w.shape[0]:
        raise BackendError(f"conv2d_dx: dy {dy.shape} does not fit w {w.shape}, input {H}x{W}")
    s = _strategy(strategy, "conv2d_dx", x_shape, w.shape, stride, pads, dy.dtype)
    if s == "direct":
        return _direct_dx(dy, w, stride, pads, (H, W))
    return _im2col_dx(dy, w, stride, pads, (H, W))


def conv2d_dw(x, dy, stride, pads, k_hw, strategy=None):
    """dL/dW (K, C, KH, KW) = correlation of the padded input with dy (per-task partial sums over
    groups of images, then a reduction)."""
    x = _float_array(x, "x")
    dy = np.ascontiguousarray(np.asarray(dy, dtype=x.dtype))
    KH, KW = (int(v) for v in k_hw)
    N, C, H, W = x.shape
    K = dy.shape[1]
    w_shape = (K, C, KH, KW)
    stride, pads = _check_geometry(x.shape, w_shape, stride, pads)
    if dy.shape != (N, K) + _out_hw(H, W, KH, KW, stride, pads):
        raise BackendError(f"conv2d_dw: dy {dy.shape} does not fit x {x.shape} and a {KH}x{KW} filter")
    s = _strategy(strategy, "conv2d_dw", x.shape, w_shape, stride, pads, x.dtype)
    if s == "direct":
        return _direct_dw(x, dy, stride, pads, (KH, KW))
    return _im2col_dw(x, dy, stride, pads, (KH, KW))


def conv2d_db(dy):
    """dL/db (K,): dy summed over N, Ho, Wo (float64 accumulation across images)."""
    dy = _float_array(dy, "dy")
    out = np.empty(dy.shape[1], np.float64)
    _db_k(dy, out)
    return out.astype(dy.dtype)


def maxpool2d(x, size, stride, save_route=False):
    """Max pool (no padding, floor output size).  route: flat in-plane index ``i*W + j`` of each
    window's maximum, the first in row-major order on ties (NaN propagates), like PyTorch."""
    x = _float_array(x, "x")
    N, C, H, W = x.shape
    Hq, Wq = _pool_hw(H, W, size, stride, "maxpool2d")
    y = np.empty((N, C, Hq, Wq), x.dtype)
    route = np.empty(y.shape if save_route else (1, 1, 1, 1), np.int32)
    _maxpool_k(x, y, route, int(size), int(stride), bool(save_route))
    return (y, route) if save_route else y


def maxpool2d_backward(dy, route, in_hw):
    """dL/dX (N, C, H, W) of :func:`maxpool2d`: dy added at the routed positions."""
    return maxpool_route_backward(dy, route, in_hw)


def avgpool2d(x, size, stride):
    """Average pool (no padding, floor output size)."""
    x = _float_array(x, "x")
    N, C, H, W = x.shape
    Hq, Wq = _pool_hw(H, W, size, stride, "avgpool2d")
    y = np.empty((N, C, Hq, Wq), x.dtype)
    _avgpool_k(x, y, int(size), int(stride))
    return y


def avgpool2d_backward(dy, size, stride, in_hw):
    """dL/dX (N, C, H, W) of :func:`avgpool2d`: each dy spread evenly over its window."""
    dy = _float_array(dy, "dy")
    H, W = (int(v) for v in in_hw)
    if (dy.shape[2], dy.shape[3]) != _pool_hw(H, W, size, stride, "avgpool2d_backward"):
        raise BackendError(f"avgpool2d_backward: dy {dy.shape} does not fit a {H}x{W} input")
    dx = np.empty(dy.shape[:2] + (H, W), dy.dtype)
    _avgpool_bwd_k(dy, dx, int(size), int(stride))
    return dx
