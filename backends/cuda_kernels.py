"""CUDA kernels of graphc's ``cuda`` backend, written with ``numba.cuda``.

Every public function takes and returns numba.cuda *device* arrays (C-contiguous), NCHW activations,
KCHW filters, float32 (float64 works too: every kernel is built per dtype so that float32 kernels do
float32 arithmetic only).  ``host`` wraps each function for numpy in / numpy out (tests, debugging)::

    from graphc.backends import cuda_kernels as ck
    y = ck.host.conv2d(x, w, b, stride=1, pads=1)        # numpy arrays in and out

Semantics match the CPU kernels and PyTorch: ReLU's gradient is 0 at 0, max-pool ties go to the first
maximum in row-major window order, output sizes are floored, ``pads = (top, bottom, left, right)``
(an int or a (ph, pw) pair is accepted too), ``stride``/``size`` are an int or an (h, w) pair.

Nothing here imports numba.cuda at module import time: the module imports on a machine with neither a
GPU nor the simulator; ``cuda_status()`` says whether CUDA can be used and why not, ``require_cuda()``
raises ``BackendError`` with the fix.

Launch configuration (chosen for a real GPU such as an H100 with 132 SMs; the simulator only needs the
same results):

* Convolutions (forward, dx, dw) and matmul are one *implicit-GEMM* kernel: a 64x64 output tile per
  block of 16x16 threads, each thread a 4x4 register micro-tile (16x64 / 32x64 tiles with 1x4 / 2x4
  micro-tiles when there are at most 16 / 32 output rows, e.g. a first conv layer with 6 filters),
  the reduction walked in steps of 8 with
  the A tile (filters) and the B tile (input patches gathered on the fly: no im2col buffer) staged in
  shared memory (padded against bank conflicts).  The grid is 3-D: x over output columns (pixels),
  y over output rows (channels), z over *split-K* slices, used when the output alone gives too few blocks
  to fill the GPU (dW always has a short output and a long reduction); split slices add with atomics.
* The fused conv+ReLU+max-pool kernel gives each thread one pooled output; blocks are up to 16x16
  pooled pixels times up to 4 output channels (block z), the filter slices of those channels staged in
  shared memory chunk by chunk; the grid is (pooled-width tiles, pooled-height tiles, N*K / block-z).
  The full-resolution conv output never reaches global memory.
* Pooling, fills and elementwise kernels are 1-D grid-stride loops (256 threads, at most 32 blocks per
  SM): consecutive threads touch consecutive addresses.
* Softmax / cross-entropy: one 32-thread row of the block per matrix row, 8 rows a block.
* Sums: one block per kept element (with split over the reduced range when there are few kept
  elements, finished by a second deterministic pass), or a (32 columns x 8) block tree when the
  reduced axes are the leading ones.
"""
from __future__ import annotations

import ast
import math
import os

import numpy as np

from graphc.errors import BackendError

__all__ = [
    "cuda_status", "require_cuda", "is_simulator", "to_device", "to_host", "device_zeros", "host",
    "conv2d", "conv2d_relu_maxpool", "maxpool_route_backward", "conv2d_dx", "conv2d_dw", "conv2d_db",
    "maxpool2d", "maxpool2d_backward", "avgpool2d", "avgpool2d_backward", "matmul",
    "reduce_sum", "softmax", "softmax_xent", "softmax_xent_grad", "elementwise_kernel", "ElementwiseKernel",
    "compile_ptx_all",
]

INSTALL_HINT = ("backend='cuda' needs an NVIDIA GPU with a CUDA driver, or NUMBA_ENABLE_CUDASIM=1 for the "
                "simulator; install the GPU extra with pip install 'graphc[cuda]'")

# numba.cuda, bound lazily by _load_cuda().  Kernels refer to it as the module global ``cuda`` (never a
# closure variable): the simulator swaps that global for its fake module while a kernel runs.
cuda = None

# ---- tile sizes (compile-time constants of the kernels) ------------------------------------------------
BM, BN, BK = 64, 64, 8          # implicit-GEMM block tile: rows (out channels) x cols (pixels) x reduction
TM, TN = 4, 4                   # per-thread micro-tile
GDX, GDY = BN // TN, BM // TM   # 16 x 16 threads
GNT = GDX * GDY                 # 256
SPAD = 4                        # shared-memory row padding (bank conflicts on the tile stores)
BMP, BNP = BM + SPAD, BN + SPAD  # padded shared rows (shared-array shapes must be plain constants)
FUSE_FSM = 1024                 # fused conv-pool: filter elements per channel slot in shared memory
FUSE_KZ = 4                     # fused conv-pool: output channels per block (block z) at most
FUSE_MAXWIN = 16                # fused conv-pool: pool-window positions kept per thread at most
EW_BLOCK = 256                  # 1-D kernels
RED_BLOCK = 256                 # keep-middle reductions
SM_ROWS = 8                     # softmax: rows per block (one 32-thread row each)

# implicit-GEMM modes
_FWD, _DX, _DW, _MM = 0, 1, 2, 3
# implicit-GEMM flags
_F_BIAS, _F_RELU, _F_ATOMIC, _F_TA, _F_TB, _F_BIAS_COL = 1, 2, 4, 8, 16, 32


# =======================================================================================================
# availability
# =======================================================================================================

def _import_cuda():
    from numba import cuda as c   # noqa: WPS433 (lazy on purpose)
    return c


def _is_sim_module(c) -> bool:
    return str(getattr(getattr(c, "jit", None), "__module__", "")).startswith("numba.cuda.simulator")


def is_simulator() -> bool:
    """True when numba.cuda in this process is the CUDA simulator."""
    try:
        return _is_sim_module(_import_cuda())
    except Exception:  # pragma: no cover - numba missing
        return False


def cuda_status():
    """``(ok, reason)``: whether the cuda backend can run in this process, and why (not)."""
    env_sim = os.environ.get("NUMBA_ENABLE_CUDASIM", "") not in ("", "0")
    try:
        c = _import_cuda()
    except Exception as e:  # numba missing, or numba-cuda without its CUDA bindings
        return False, f"numba.cuda cannot be imported ({type(e).__name__}: {e}); {INSTALL_HINT}"
    if _is_sim_module(c):
        return True, ("CUDA simulator is on (NUMBA_ENABLE_CUDASIM=1): kernels run as Python threads on the "
                      "CPU - correct but very slow; no real GPU is used")
    late = (" (NUMBA_ENABLE_CUDASIM=1 was set only after numba.cuda had been imported, so the simulator "
            "is not active in this process)") if env_sim else ""
    try:
        ok = bool(c.is_available())
    except Exception as e:  # pragma: no cover
        return False, f"CUDA check failed ({type(e).__name__}: {e}){late}; {INSTALL_HINT}"
    if ok:
        try:
            dev = c.get_current_device()
            name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
            return True, f"NVIDIA GPU {name} (compute capability {dev.compute_capability[0]}.{dev.compute_capability[1]})"
        except Exception as e:  # pragma: no cover
            return False, f"a CUDA GPU is listed but cannot be opened ({e}){late}; {INSTALL_HINT}"
    err = None
    try:
        err = c.cuda_error()
    except Exception as e:  # pragma: no cover
        err = e
    msg = " ".join(str(err).split()) if err is not None else ""
    low = msg.lower()
    if "driver" in low and ("not be found" in low or "cannot be found" in low or "not found" in low):
        why = "no CUDA driver found (libcuda is not installed: no NVIDIA GPU driver on this machine)"
    elif "no cuda-capable device" in low or "no device" in low or "cuda_error_no_device" in low:
        why = "the CUDA driver is installed but no GPU is visible (CUDA_VISIBLE_DEVICES? containers?)"
    elif msg:
        why = f"CUDA is not usable: {msg}"
    else:
        why = "no CUDA GPU is available"
    return False, f"{why}{late}; {INSTALL_HINT}"


def require_cuda():
    """Raise ``BackendError`` unless CUDA (a GPU or the simulator) can run here; returns numba.cuda."""
    return _load_cuda(check=True)


_USABLE = False


def _load_cuda(check=True):
    """numba.cuda, bound to the module global ``cuda``; with ``check`` (every launch path) a BackendError
    with the fix when neither a GPU nor the simulator can run (checked once per process).  PTX
    compilation passes check=False: it needs no GPU."""
    global cuda, _USABLE
    if cuda is None:
        try:
            cuda = _import_cuda()
        except Exception as e:
            raise BackendError(f"{INSTALL_HINT}. Here: numba.cuda cannot be imported ({e})") from e
    if check and not _USABLE:
        ok, reason = cuda_status()
        if not ok:
            raise BackendError(f"{INSTALL_HINT}. Here: {reason.split(';')[0]}")
        _USABLE = True
    return cuda


# =======================================================================================================
# small host helpers
# =======================================================================================================

_SM_COUNT = None


def _sm_count() -> int:
    global _SM_COUNT
    if _SM_COUNT is None:
        c = _load_cuda()
        n = 132  # H100 SXM
        if _is_sim_module(c):
            n = 4  # keeps simulated grids tiny while still exercising the split/multi-block paths
        else:
            try:
                n = int(c.get_current_device().MULTIPROCESSOR_COUNT)
            except Exception:  # pragma: no cover
                pass
        _SM_COUNT = max(1, n)
    return _SM_COUNT


def _cdiv(a, b):
    return -(-a // b)


def _p2(n, cap):
    """Smallest power of two >= n, at most cap."""
    p = 1
    while p < n and p < cap:
        p *= 2
    return p


def _pair(v, name):
    if isinstance(v, (int, np.integer)):
        return int(v), int(v)
    try:
        a, b = v
        return int(a), int(b)
    except Exception as e:
        raise BackendError(f"{name} must be an int or an (h, w) pair, got {v!r}") from e


def _pads4(p):
    if isinstance(p, (int, np.integer)):
        return (int(p),) * 4
    p = tuple(int(v) for v in p)
    if len(p) == 2:
        return p[0], p[0], p[1], p[1]
    if len(p) == 4:
        return p
    raise BackendError(f"pads must be an int, (ph, pw) or (top, bottom, left, right), got {p!r}")


_NB = {}


def _nbtype(dtype):
    dt = np.dtype(dtype)
    if dt not in _NB:
        from numba import from_dtype
        _NB[dt] = from_dtype(dt)
    return _NB[dt]


def _fdtype(*arrays):
    dt = np.dtype(arrays[0].dtype)
    if dt not in (np.float32, np.float64):
        raise BackendError(f"cuda kernels take float32 or float64 arrays, got {dt}")
    for a in arrays[1:]:
        if a is not None and np.dtype(a.dtype) != dt:
            raise BackendError(f"cuda kernel arguments mix dtypes: {dt} and {np.dtype(a.dtype)}")
    return dt


def _flat(a):
    """1-D view of a C-contiguous device array."""
    if not a.is_c_contiguous():
        raise BackendError(f"cuda kernels need C-contiguous device arrays (got shape {a.shape}, strides "
                           f"{getattr(a, 'strides', '?')})")
    return a.reshape(a.size)


def _check_shape(a, ndim, what):
    if len(a.shape) != ndim:
        raise BackendError(f"{what} must be {ndim}-D, got shape {tuple(a.shape)}")


def to_device(a, dtype=None):
    """numpy -> device (C-contiguous); device arrays pass through."""
    c = _load_cuda()
    if isinstance(a, np.ndarray) or np.isscalar(a):
        arr = np.ascontiguousarray(a, dtype=dtype)
        return c.to_device(arr)
    return a


def to_host(a):
    if a is None or isinstance(a, (np.ndarray, int, float)):
        return a
    if isinstance(a, tuple):
        return tuple(to_host(v) for v in a)
    if isinstance(a, list):
        return [to_host(v) for v in a]
    return a.copy_to_host()


def _empty(shape, dtype):
    return _load_cuda().device_array(tuple(int(s) for s in shape), dtype=np.dtype(dtype))


def _grid1d(n, block=EW_BLOCK):
    return max(1, min(_cdiv(n, block), 32 * _sm_count()))


def device_zeros(shape, dtype=np.float32):
    out = _empty(shape, dtype)
    _fill(out, 0)
    return out


def _fill(out, value):
    n = out.size
    if n == 0:
        return out
    k = _kernel("fill", out.dtype)
    k[_grid1d(n), EW_BLOCK](_flat(out), np.dtype(out.dtype).type(value), n)
    return out


class _Host:
    """``host.NAME(...)``: NAME with numpy arrays in (copied to the device) and numpy arrays out."""

    def __getattr__(self, name):
        fn = globals().get(name)
        if fn is None or name.startswith("_") or not callable(fn):
            raise AttributeError(name)

        def call(*args, **kwargs):
            _load_cuda()
            args = [to_device(a) if isinstance(a, np.ndarray) else a for a in args]
            kwargs = {k: (to_device(v) if isinstance(v, np.ndarray) else v) for k, v in kwargs.items()}
            return to_host(fn(*args, **kwargs))

        call.__name__ = name
        call.__doc__ = fn.__doc__
        return call


host = _Host()


# =======================================================================================================
# kernel factories (per dtype; cached).  Each returns a plain Python function; _kernel() jits it.
# =======================================================================================================

_KCACHE = {}


def _kernel(name, dtype):
    key = (name, np.dtype(dtype))
    k = _KCACHE.get(key)
    if k is None:
        c = _load_cuda()
        k = c.jit(_FACTORIES[name](_nbtype(dtype)))
        _KCACHE[key] = k
    return k


def _mk_fill(nbt):
    def fill_k(out, value, n):
        start = cuda.grid(1)
        step = cuda.gridsize(1)
        for i in range(start, n, step):
            out[i] = value
    return fill_k


def _mk_igemm(mode, tm):
    """Implicit GEMM  out[m, p] = sum_r A[m, r] * B[r, p]  for the conv forward / dx / dw and matmul.

    FWD: A = w (K x CRS), B = input patches gathered from x, out = y (N, K, Ho, Wo)    [m=k, p=(n,oh,ow)]
    DX : A = w^T (C x KRS), B = dy gathered (stride holes are zero), out = dx (N,C,H,W) [m=c, p=(n,ih,iw)]
    DW : A = dy (K x NHoWo), B = input patches^T, out = dw (K, C, KH, KW)              [m=k, p=(c,kh,kw)]
    MM : A = a or a^T, B = b or b^T, out = c (M x P)
    All arrays are passed flat; split-K slices (grid z) accumulate with atomics into a zeroed out.
    ``tm`` (1, 2 or 4) rows per thread: block tiles of 16*tm rows, so that layers with few output
    channels (K <= 16 or 32) do not waste three quarters of a 64-row tile.
    """
    bm = GDY * tm                 # block rows
    bmp = bm + SPAD
    a_elems = bm * BK
    def factory(nbt):
        A_LOADS = (a_elems + GNT - 1) // GNT
        B_LOADS = (BK * BN) // GNT

        def igemm(asrc, bsrc, bias, out, M, P, R, r_chunk,
                  N, C, H, W, K, KH, KW, Ho, Wo, sh, sw, pt, pl, flags):
            As = cuda.shared.array((BK, bmp), nbt)
            Bs = cuda.shared.array((BK, BNP), nbt)
            acc = cuda.local.array((tm, TN), nbt)
            ra = cuda.local.array(tm, nbt)
            rb = cuda.local.array(TN, nbt)
            tx = cuda.threadIdx.x
            ty = cuda.threadIdx.y
            t = ty * GDX + tx
            m0 = cuda.blockIdx.y * bm
            p0 = cuda.blockIdx.x * BN
            r_begin = cuda.blockIdx.z * r_chunk
            r_end = r_begin + r_chunk
            if r_end > R:
                r_end = R
            zero = nbt(0)
            for i in range(tm):
                for j in range(TN):
                    acc[i, j] = zero
            KHKW = KH * KW
            HoWo = Ho * Wo
            HW = H * W
            trans_a = (flags & 8) != 0
            trans_b = (flags & 16) != 0
            # which index runs fastest across consecutive threads on the tile loads (coalescing)
            if mode == 3:
                a_kfast = not trans_a
                b_kfast = trans_b
            elif mode == 2:
                a_kfast = True
                b_kfast = True
            else:
                a_kfast = True
                b_kfast = False
            for r0 in range(r_begin, r_end, BK):
                # ---- A tile: As[kk, mm] = A[m0+mm, r0+kk]
                for l in range(A_LOADS):
                    e = t + l * GNT
                    if e >= a_elems:
                        continue
                    if a_kfast:
                        kk = e % BK
                        mm = e // BK
                    else:
                        mm = e % bm
                        kk = e // bm
                    m = m0 + mm
                    r = r0 + kk
                    v = zero
                    if m < M and r < r_end:
                        if mode == 0:
                            v = asrc[m * R + r]
                        elif mode == 1:
                            k = r // KHKW
                            v = asrc[(k * C + m) * KHKW + (r - k * KHKW)]
                        elif mode == 2:
                            n = r // HoWo
                            v = asrc[(n * K + m) * HoWo + (r - n * HoWo)]
                        else:
                            if trans_a:
                                v = asrc[r * M + m]
                            else:
                                v = asrc[m * R + r]
                    As[kk, mm] = v
                # ---- B tile: Bs[kk, pp] = B[r0+kk, p0+pp]
                for l in range(B_LOADS):
                    e = t + l * GNT
                    if b_kfast:
                        kk = e % BK
                        pp = e // BK
                    else:
                        pp = e % BN
                        kk = e // BN
                    p = p0 + pp
                    r = r0 + kk
                    v = zero
                    if p < P and r < r_end:
                        if mode == 0:
                            c = r // KHKW
                            q = r - c * KHKW
                            kh = q // KW
                            kw = q - kh * KW
                            n = p // HoWo
                            q2 = p - n * HoWo
                            oh = q2 // Wo
                            ow = q2 - oh * Wo
                            ih = oh * sh - pt + kh
                            iw = ow * sw - pl + kw
                            if ih >= 0 and ih < H and iw >= 0 and iw < W:
                                v = bsrc[((n * C + c) * H + ih) * W + iw]
                        elif mode == 1:
                            k = r // KHKW
                            q = r - k * KHKW
                            kh = q // KW
                            kw = q - kh * KW
                            n = p // HW
                            q2 = p - n * HW
                            ih = q2 // W
                            iw = q2 - ih * W
                            th = ih + pt - kh
                            tw = iw + pl - kw
                            if th >= 0 and tw >= 0:
                                oh = th // sh
                                ow = tw // sw
                                if oh * sh == th and ow * sw == tw and oh < Ho and ow < Wo:
                                    v = bsrc[((n * K + k) * Ho + oh) * Wo + ow]
                        elif mode == 2:
                            n = r // HoWo
                            q2 = r - n * HoWo
                            oh = q2 // Wo
                            ow = q2 - oh * Wo
                            c = p // KHKW
                            q = p - c * KHKW
                            kh = q // KW
                            kw = q - kh * KW
                            ih = oh * sh - pt + kh
                            iw = ow * sw - pl + kw
                            if ih >= 0 and ih < H and iw >= 0 and iw < W:
                                v = bsrc[((n * C + c) * H + ih) * W + iw]
                        else:
                            if trans_b:
                                v = bsrc[p * R + r]
                            else:
                                v = bsrc[r * P + p]
                    Bs[kk, pp] = v
                cuda.syncthreads()
                for kk in range(BK):
                    for i in range(tm):
                        ra[i] = As[kk, ty + i * GDY]
                    for j in range(TN):
                        rb[j] = Bs[kk, tx + j * GDX]
                    for i in range(tm):
                        for j in range(TN):
                            acc[i, j] += ra[i] * rb[j]
                cuda.syncthreads()
            # ---- epilogue
            has_bias = (flags & 1) != 0 and cuda.blockIdx.z == 0
            relu = (flags & 2) != 0
            atomic = (flags & 4) != 0
            bias_col = (flags & 32) != 0
            for i in range(tm):
                m = m0 + ty + i * GDY
                if m < M:
                    bm_ = zero
                    if has_bias and not bias_col:
                        bm_ = bias[m]
                    for j in range(TN):
                        p = p0 + tx + j * GDX
                        if p < P:
                            v = acc[i, j] + bm_
                            if has_bias and bias_col:
                                v += bias[p]
                            if relu and v < zero:
                                v = zero
                            if mode == 0:
                                n = p // HoWo
                                idx = (n * K + m) * HoWo + (p - n * HoWo)
                            elif mode == 1:
                                n = p // HW
                                idx = (n * C + m) * HW + (p - n * HW)
                            else:
                                idx = m * P + p
                            if atomic:
                                cuda.atomic.add(out, idx, v)
                            else:
                                out[idx] = v
        return igemm
    return factory


def _mk_conv_relu_pool(nbt):
    def conv_relu_pool(x, w, b, y, route, N, C, H, W, K, KH, KW, Ho, Wo, sh, sw, pt, pl,
                       PH, PW, psh, psw, Hp, Wp, cc, flags):
        sf = cuda.shared.array((FUSE_KZ, FUSE_FSM), nbt)
        acc = cuda.local.array(FUSE_MAXWIN, nbt)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        tz = cuda.threadIdx.z
        bdx = cuda.blockDim.x
        bdy = cuda.blockDim.y
        bdz = cuda.blockDim.z
        nt = bdx * bdy * bdz
        t = (tz * bdy + ty) * bdx + tx
        pw = cuda.blockIdx.x * bdx + tx
        ph = cuda.blockIdx.y * bdy + ty
        KHKW = KH * KW
        NK = N * K
        NWIN = PH * PW
        has_bias = (flags & 1) != 0
        save_route = (flags & 2) != 0
        zero = nbt(0)
        for nk0 in range(cuda.blockIdx.z * bdz, NK, cuda.gridDim.z * bdz):
            nk = nk0 + tz
            n = nk // K
            k = nk - n * K
            active = nk < NK and ph < Hp and pw < Wp
            for wi in range(NWIN):
                acc[wi] = zero
            for c0 in range(0, C, cc):
                cn = C - c0
                if cn > cc:
                    cn = cc
                chunk = cn * KHKW
                # all threads stage the filter slices [k, c0:c0+cn] of the block's channels
                for e in range(t, bdz * chunk, nt):
                    z = e // chunk
                    q = e - z * chunk
                    nkz = nk0 + z
                    if nkz < NK:
                        kz = nkz % K
                        sf[z, q] = w[(kz * C + c0) * KHKW + q]
                cuda.syncthreads()
                if active:
                    for wi in range(PH):
                        oh = ph * psh + wi
                        for wj in range(PW):
                            ow = pw * psw + wj
                            s = acc[wi * PW + wj]
                            for ci in range(cn):
                                xb = (n * C + c0 + ci) * H
                                fb = ci * KHKW
                                for kh in range(KH):
                                    ih = oh * sh - pt + kh
                                    if ih >= 0 and ih < H:
                                        xr = (xb + ih) * W
                                        fr = fb + kh * KW
                                        for kw in range(KW):
                                            iw = ow * sw - pl + kw
                                            if iw >= 0 and iw < W:
                                                s += x[xr + iw] * sf[tz, fr + kw]
                            acc[wi * PW + wj] = s
                cuda.syncthreads()
            if active:
                bv = zero
                if has_bias:
                    bv = b[k]
                best = acc[0] + bv
                bidx = (ph * psh) * Wo + pw * psw
                for wi in range(PH):
                    for wj in range(PW):
                        v = acc[wi * PW + wj] + bv
                        if v > best:
                            best = v
                            bidx = (ph * psh + wi) * Wo + pw * psw + wj
                o = (nk * Hp + ph) * Wp + pw
                if best > zero:
                    y[o] = best
                    if save_route:
                        route[o] = bidx
                else:
                    y[o] = zero
                    if save_route:
                        route[o] = -1
    return conv_relu_pool


def _mk_route_scatter(nbt):
    """dz[nc, route[o]] += dy[o] for every pooled output o whose route is >= 0 (atomic: windows overlap)."""
    def route_scatter(dy, route, dz, NC, HpWp, HW):
        start = cuda.grid(1)
        step = cuda.gridsize(1)
        for o in range(start, NC * HpWp, step):
            r = route[o]
            if r >= 0:
                nc = o // HpWp
                cuda.atomic.add(dz, nc * HW + r, dy[o])
    return route_scatter


def _mk_maxpool(nbt):
    def maxpool(x, y, route, NC, H, W, Ho, Wo, PH, PW, sh, sw, save_route):
        start = cuda.grid(1)
        step = cuda.gridsize(1)
        for o in range(start, NC * Ho * Wo, step):
            ow = o % Wo
            q = o // Wo
            oh = q % Ho
            nc = q // Ho
            base = nc * H * W
            h0 = oh * sh
            w0 = ow * sw
            bi = h0 * W + w0
            best = x[base + bi]
            for i in range(PH):
                for j in range(PW):
                    idx = (h0 + i) * W + w0 + j
                    v = x[base + idx]
                    if v > best:
                        best = v
                        bi = idx
            y[o] = best
            if save_route != 0:
                route[o] = bi
    return maxpool


def _mk_avgpool(nbt):
    def avgpool(x, y, NC, H, W, Ho, Wo, PH, PW, sh, sw, inv):
        start = cuda.grid(1)
        step = cuda.gridsize(1)
        for o in range(start, NC * Ho * Wo, step):
            ow = o % Wo
            q = o // Wo
            oh = q % Ho
            nc = q // Ho
            base = nc * H * W
            s = nbt(0)
            for i in range(PH):
                rb = base + (oh * sh + i) * W + ow * sw
                for j in range(PW):
                    s += x[rb + j]
            y[o] = s * inv
    return avgpool


def _mk_avgpool_bwd(nbt):
    """Gather form: each input pixel sums dy over the windows that cover it (no atomics, deterministic)."""
    def avgpool_bwd(dy, dx, NC, H, W, Ho, Wo, PH, PW, sh, sw, inv):
        start = cuda.grid(1)
        step = cuda.gridsize(1)
        for i in range(start, NC * H * W, step):
            iw = i % W
            q = i // W
            ih = q % H
            nc = q // H
            # windows covering ih: oh*sh <= ih < oh*sh + PH  (builtin min/max avoided: see _EwRewrite)
            oh_lo = (ih - PH + sh) // sh
            if oh_lo < 0:
                oh_lo = 0
            oh_hi = ih // sh
            if oh_hi > Ho - 1:
                oh_hi = Ho - 1
            ow_lo = (iw - PW + sw) // sw
            if ow_lo < 0:
                ow_lo = 0
            ow_hi = iw // sw
            if ow_hi > Wo - 1:
                ow_hi = Wo - 1
            s = nbt(0)
            for oh in range(oh_lo, oh_hi + 1):
                rb = (nc * Ho + oh) * Wo
                for ow in range(ow_lo, ow_hi + 1):
                    s += dy[rb + ow]
            dx[i] = s * inv
    return avgpool_bwd


def _mk_reduce_keep_mid(nbt):
    """x viewed as (A, B, C): out[s, b] = scale * sum over (a, c) in slice s of x[a, b, c].

    1-D blocks of a power-of-two size <= RED_BLOCK (sized to the work by the launcher)."""
    def reduce_keep_mid(x, out, A, B, C, S, scale):
        sm = cuda.shared.array(RED_BLOCK, nbt)
        t = cuda.threadIdx.x
        nt = cuda.blockDim.x
        s = cuda.blockIdx.y
        AC = A * C
        chunk = (AC + S - 1) // S
        lo = s * chunk
        hi = lo + chunk
        if hi > AC:
            hi = AC
        for b in range(cuda.blockIdx.x, B, cuda.gridDim.x):
            acc = nbt(0)
            for e in range(lo + t, hi, nt):
                a = e // C
                acc += x[(a * B + b) * C + (e - a * C)]
            sm[t] = acc
            cuda.syncthreads()
            h = nt // 2
            while h > 0:
                if t < h:
                    sm[t] += sm[t + h]
                cuda.syncthreads()
                h //= 2
            if t == 0:
                out[s * B + b] = sm[0] * scale
            cuda.syncthreads()
    return reduce_keep_mid


def _mk_reduce_mid(nbt):
    """x viewed as (A, B, C): out[a, c] = scale * sum_b x[a, b, c]; block = (<=32 columns) x (<=8 b-lanes)."""
    def reduce_mid(x, out, A, B, C, scale):
        sm = cuda.shared.array((8, 33), nbt)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        bdy = cuda.blockDim.y
        c = cuda.blockIdx.x * cuda.blockDim.x + tx
        for a in range(cuda.blockIdx.y, A, cuda.gridDim.y):
            acc = nbt(0)
            if c < C:
                for b in range(ty, B, bdy):
                    acc += x[(a * B + b) * C + c]
            sm[ty, tx] = acc
            cuda.syncthreads()
            if ty == 0 and c < C:
                s = sm[0, tx]
                for j in range(1, bdy):
                    s += sm[j, tx]
                out[a * C + c] = s * scale
            cuda.syncthreads()
    return reduce_mid


def _mk_softmax_family(which):
    """which: 0 softmax rows, 1 per-row cross-entropy loss, 2 cross-entropy gradient."""
    def factory(nbt):
        def softmax_rows(x, labels, dy, dyscale, out, M, Ncol):
            sm = cuda.shared.array((SM_ROWS, 32), nbt)
            tx = cuda.threadIdx.x
            ty = cuda.threadIdx.y
            neg_inf = nbt(-math.inf)
            zero = nbt(0)
            for r0 in range(cuda.blockIdx.x * SM_ROWS, M, cuda.gridDim.x * SM_ROWS):
                row = r0 + ty
                active = row < M
                base = row * Ncol
                mx = neg_inf
                if active:
                    for j in range(tx, Ncol, 32):
                        v = x[base + j]
                        if v > mx:
                            mx = v
                sm[ty, tx] = mx
                cuda.syncthreads()
                h = 16
                while h > 0:
                    if tx < h:
                        if sm[ty, tx + h] > sm[ty, tx]:
                            sm[ty, tx] = sm[ty, tx + h]
                    cuda.syncthreads()
                    h //= 2
                mx = sm[ty, 0]
                cuda.syncthreads()
                s = zero
                if active:
                    for j in range(tx, Ncol, 32):
                        s += math.exp(x[base + j] - mx)
                sm[ty, tx] = s
                cuda.syncthreads()
                h = 16
                while h > 0:
                    if tx < h:
                        sm[ty, tx] += sm[ty, tx + h]
                    cuda.syncthreads()
                    h //= 2
                tot = sm[ty, 0]
                cuda.syncthreads()
                if active:
                    if which == 0:
                        inv = nbt(1) / tot
                        for j in range(tx, Ncol, 32):
                            out[base + j] = math.exp(x[base + j] - mx) * inv
                    elif which == 1:
                        if tx == 0:
                            lab = labels[row]
                            if lab >= 0 and lab < Ncol:
                                out[row] = mx + math.log(tot) - x[base + lab]
                            else:
                                out[row] = nbt(math.nan)
                    else:
                        lab = labels[row]
                        g = dy[0] * dyscale / nbt(M)
                        inv = nbt(1) / tot
                        bad = lab < 0 or lab >= Ncol
                        for j in range(tx, Ncol, 32):
                            p = math.exp(x[base + j] - mx) * inv
                            if j == lab:
                                p -= nbt(1)
                            if bad:
                                p = nbt(math.nan)
                            out[base + j] = p * g
        return softmax_rows
    return factory


_FACTORIES = {
    "fill": _mk_fill,
    **{f"igemm_{nm}{'' if tm == 4 else f'_t{tm}'}": _mk_igemm(md, tm)
       for nm, md in (("fwd", _FWD), ("dx", _DX), ("dw", _DW), ("mm", _MM)) for tm in (4, 2, 1)},
    "conv_relu_pool": _mk_conv_relu_pool,
    "route_scatter": _mk_route_scatter,
    "maxpool": _mk_maxpool,
    "avgpool": _mk_avgpool,
    "avgpool_bwd": _mk_avgpool_bwd,
    "reduce_keep_mid": _mk_reduce_keep_mid,
    "reduce_mid": _mk_reduce_mid,
    "softmax": _mk_softmax_family(0),
    "xent_rows": _mk_softmax_family(1),
    "xent_grad": _mk_softmax_family(2),
}


# =======================================================================================================
# implicit GEMM launcher
# =======================================================================================================

def _igemm(name, asrc, bsrc, bias, out, M, P, R, dims=(0,) * 13, flags=0, allow_split=True):
    """Launch the implicit-GEMM kernel; out (flat) must be allocated; zeroed here when split-K is used."""
    if M * P == 0:
        return out
    tm = 1 if M <= GDY else (2 if M <= 2 * GDY else TM)   # rows per thread: block tile of 16, 32 or 64 rows
    if tm != TM:
        name = f"{name}_t{tm}"
    gx, gy = _cdiv(P, BN), _cdiv(M, GDY * tm)
    if gy > 65535:
        raise BackendError(f"implicit GEMM: {M} output rows exceed the grid limit")
    splits = 1
    if allow_split and not (flags & _F_RELU):
        target = 2 * _sm_count()
        blocks = gx * gy
        if blocks < target:
            splits = max(1, min(_cdiv(target, blocks), _cdiv(R, BK * 8), 65535))
    r_chunk = max(BK, _cdiv(_cdiv(R, splits), BK) * BK)
    splits = max(1, _cdiv(R, r_chunk))
    if splits > 1:
        flags |= _F_ATOMIC
        _fill(out, 0)
    if bias is None:
        bias = _dummy(out.dtype)
    k = _kernel(name, out.dtype)
    k[(gx, gy, splits), (GDX, GDY, 1)](asrc, bsrc, bias, out, M, P, R, r_chunk, *dims, flags)
    return out


_DUMMY = {}


def _dummy(dtype):
    dt = np.dtype(dtype)
    if dt not in _DUMMY:
        _DUMMY[dt] = _load_cuda().to_device(np.zeros(1, dt))
    return _DUMMY[dt]


def _conv_geom(x_shape, w_shape, stride, pads):
    N, C, H, W = (int(s) for s in x_shape)
    K, Cw, KH, KW = (int(s) for s in w_shape)
    if Cw != C:
        raise BackendError(f"conv2d: input has {C} channels, filters expect {Cw} (x {tuple(x_shape)}, "
                           f"w {tuple(w_shape)})")
    sh, sw = _pair(stride, "stride")
    pt, pb, pl, pr = _pads4(pads)
    Ho = (H + pt + pb - KH) // sh + 1
    Wo = (W + pl + pr - KW) // sw + 1
    if Ho < 1 or Wo < 1 or sh < 1 or sw < 1:
        raise BackendError(f"conv2d: empty output for input {H}x{W}, kernel {KH}x{KW}, stride {(sh, sw)}, "
                           f"pads {(pt, pb, pl, pr)}")
    return N, C, H, W, K, KH, KW, Ho, Wo, sh, sw, pt, pl


# =======================================================================================================
# public kernels
# =======================================================================================================

def conv2d(x, w, b=None, stride=1, pads=0, relu=False, out=None):
    """y = conv2d(x, w) + b (optionally ReLU'd): implicit GEMM, shared-memory tiles; y (N, K, Ho, Wo)."""
    _check_shape(x, 4, "conv2d x")
    _check_shape(w, 4, "conv2d w")
    dt = _fdtype(x, w, b)
    N, C, H, W, K, KH, KW, Ho, Wo, sh, sw, pt, pl = g = _conv_geom(x.shape, w.shape, stride, pads)
    if b is not None and b.size != K:
        raise BackendError(f"conv2d: bias has {b.size} elements, expected {K}")
    y = out if out is not None else _empty((N, K, Ho, Wo), dt)
    flags = (_F_BIAS if b is not None else 0) | (_F_RELU if relu else 0)
    _igemm("igemm_fwd", _flat(w), _flat(x), None if b is None else _flat(b), _flat(y),
           K, N * Ho * Wo, C * KH * KW, dims=g, flags=flags)
    return y


def conv2d_relu_maxpool(x, w, b=None, stride=1, pads=0, pool_size=2, pool_stride=None, save_route=False):
    """maxpool(relu(conv2d(x, w) + b)) in one kernel; the conv output never reaches global memory.

    ``route`` (int32, shaped like y) holds the flat index ``i*Wo + j`` of each window's max in the
    conv-output plane, or -1 where that max was <= 0 (then y is 0 and the gradient is 0).
    """
    _check_shape(x, 4, "conv2d_relu_maxpool x")
    _check_shape(w, 4, "conv2d_relu_maxpool w")
    dt = _fdtype(x, w, b)
    N, C, H, W, K, KH, KW, Ho, Wo, sh, sw, pt, pl = _conv_geom(x.shape, w.shape, stride, pads)
    PH, PW = _pair(pool_size, "pool_size")
    psh, psw = _pair(pool_stride if pool_stride is not None else pool_size, "pool_stride")
    Hp, Wp = (Ho - PH) // psh + 1, (Wo - PW) // psw + 1
    if Hp < 1 or Wp < 1:
        raise BackendError(f"conv2d_relu_maxpool: pool {PH}x{PW} larger than the conv output {Ho}x{Wo}")
    if b is not None and b.size != K:
        raise BackendError(f"conv2d_relu_maxpool: bias has {b.size} elements, expected {K}")
    KHKW = KH * KW
    if PH * PW > FUSE_MAXWIN or KHKW > FUSE_FSM:
        # unusual geometry: unfused conv, then max-pool of the raw conv output, then the ReLU/route fix-up
        z = conv2d(x, w, b, stride, pads)
        yr, rt = maxpool2d(z, (PH, PW), (psh, psw), save_route=True)
        y = elementwise_kernel("max(a0, 0)", 1)(yr)
        if not save_route:
            return y
        route = elementwise_kernel("a1 if a0 > 0 else -1", 2)(yr, rt, dtype=np.int32)
        return y, route
    y = _empty((N, K, Hp, Wp), dt)
    route = _empty((N, K, Hp, Wp), np.int32) if save_route else _dummy(np.int32)
    if y.size == 0:
        return (y, route) if save_route else y
    cc = max(1, min(C, FUSE_FSM // KHKW))
    bx = _p2(Wp, 16)
    by = _p2(Hp, 16)
    bz = max(1, min(FUSE_KZ, 256 // (bx * by), _p2(N * K, FUSE_KZ)))
    grid = (_cdiv(Wp, bx), _cdiv(Hp, by), max(1, min(_cdiv(N * K, bz), 65535)))
    flags = (1 if b is not None else 0) | (2 if save_route else 0)
    k = _kernel("conv_relu_pool", dt)
    k[grid, (bx, by, bz)](_flat(x), _flat(w), _flat(b) if b is not None else _dummy(dt), _flat(y),
                          _flat(route), N, C, H, W, K, KH, KW, Ho, Wo, sh, sw, pt, pl,
                          PH, PW, psh, psw, Hp, Wp, cc, flags)
    return (y, route) if save_route else y


def maxpool_route_backward(dy, route, conv_out_hw, out=None):
    """dz (N, K, Ho, Wo): each dy lands on its route (flat index in the conv plane); -1 routes drop.

    Scatter with atomic adds (pool windows may overlap); dz is zeroed first.
    """
    _check_shape(dy, 4, "maxpool_route_backward dy")
    dt = _fdtype(dy)
    if tuple(route.shape) != tuple(dy.shape):
        raise BackendError(f"route shape {tuple(route.shape)} differs from dy shape {tuple(dy.shape)}")
    N, K, Hp, Wp = (int(s) for s in dy.shape)
    Ho, Wo = (int(v) for v in conv_out_hw)
    dz = out if out is not None else _empty((N, K, Ho, Wo), dt)
    _fill(dz, 0)
    n = N * K * Hp * Wp
    if n:
        _kernel("route_scatter", dt)[_grid1d(n), EW_BLOCK](_flat(dy), _flat(route), _flat(dz),
                                                         N * K, Hp * Wp, Ho * Wo)
    return dz


def maxpool2d(x, size=2, stride=None, save_route=False):
    """Max pool (no padding, floor sizes, ties to the first max); route = flat index i*W+j in the input
    plane (int32)."""
    _check_shape(x, 4, "maxpool2d x")
    dt = _fdtype(x)
    N, C, H, W = (int(s) for s in x.shape)
    PH, PW = _pair(size, "size")
    sh, sw = _pair(stride if stride is not None else size, "stride")
    Ho, Wo = (H - PH) // sh + 1, (W - PW) // sw + 1
    if Ho < 1 or Wo < 1:
        raise BackendError(f"maxpool2d: window {PH}x{PW} larger than the input {H}x{W}")
    y = _empty((N, C, Ho, Wo), dt)
    route = _empty((N, C, Ho, Wo), np.int32) if save_route else _dummy(np.int32)
    n = y.size
    if n == 0:
        return (y, route) if save_route else y
    _kernel("maxpool", dt)[_grid1d(n), EW_BLOCK](_flat(x), _flat(y), _flat(route), N * C, H, W, Ho, Wo,
                                                PH, PW, sh, sw, 1 if save_route else 0)
    return (y, route) if save_route else y


def maxpool2d_backward(dy, route, in_hw, out=None):
    """dx (N, C, H, W) from a maxpool2d route (atomic scatter, as maxpool_route_backward)."""
    return maxpool_route_backward(dy, route, in_hw, out=out)


def avgpool2d(x, size=2, stride=None):
    """Average pool (no padding, floor sizes): mean over each size window."""
    _check_shape(x, 4, "avgpool2d x")
    dt = _fdtype(x)
    N, C, H, W = (int(s) for s in x.shape)
    PH, PW = _pair(size, "size")
    sh, sw = _pair(stride if stride is not None else size, "stride")
    Ho, Wo = (H - PH) // sh + 1, (W - PW) // sw + 1
    if Ho < 1 or Wo < 1:
        raise BackendError(f"avgpool2d: window {PH}x{PW} larger than the input {H}x{W}")
    y = _empty((N, C, Ho, Wo), dt)
    if y.size == 0:
        return y
    _kernel("avgpool", dt)[_grid1d(y.size), EW_BLOCK](_flat(x), _flat(y), N * C, H, W, Ho, Wo, PH, PW, sh, sw,
                                                     dt.type(1.0 / (PH * PW)))
    return y


def avgpool2d_backward(dy, size, stride, in_hw):
    """dx (N, C, H, W): each input pixel gathers dy/(PH*PW) from the windows covering it."""
    _check_shape(dy, 4, "avgpool2d_backward dy")
    dt = _fdtype(dy)
    N, C, Ho, Wo = (int(s) for s in dy.shape)
    H, W = (int(v) for v in in_hw)
    PH, PW = _pair(size, "size")
    sh, sw = _pair(stride if stride is not None else size, "stride")
    if (H - PH) // sh + 1 != Ho or (W - PW) // sw + 1 != Wo:
        raise BackendError(f"avgpool2d_backward: dy {Ho}x{Wo} does not fit input {H}x{W}, window {PH}x{PW}, "
                           f"stride {(sh, sw)}")
    dx = _empty((N, C, H, W), dt)
    if dx.size == 0:
        return dx
    _kernel("avgpool_bwd", dt)[_grid1d(dx.size), EW_BLOCK](_flat(dy), _flat(dx), N * C, H, W, Ho, Wo, PH, PW,
                                                          sh, sw, dt.type(1.0 / (PH * PW)))
    return dx


def conv2d_dx(dy, w, stride, pads, in_hw):
    """dL/dx (N, C, H, W) of y = conv2d(x, w): implicit GEMM of w^T with dy (transposed convolution)."""
    _check_shape(dy, 4, "conv2d_dx dy")
    _check_shape(w, 4, "conv2d_dx w")
    dt = _fdtype(dy, w)
    N, K, Ho_, Wo_ = (int(s) for s in dy.shape)
    H, W = (int(v) for v in in_hw)
    g = _conv_geom((N, int(w.shape[1]), H, W), w.shape, stride, pads)
    _, C, _, _, K2, KH, KW, Ho, Wo, *_ = g
    if (K2, Ho, Wo) != (K, Ho_, Wo_):
        raise BackendError(f"conv2d_dx: dy {tuple(dy.shape)} does not fit w {tuple(w.shape)}, input {H}x{W}, "
                           f"stride {stride}, pads {pads} (expected {K2}x{Ho}x{Wo})")
    dx = _empty((N, C, H, W), dt)
    _igemm("igemm_dx", _flat(w), _flat(dy), None, _flat(dx), C, N * H * W, K * KH * KW, dims=g)
    return dx


def conv2d_dw(x, dy, stride, pads, k_hw):
    """dL/dw (K, C, KH, KW): implicit GEMM of dy with input patches, split-K over N*Ho*Wo."""
    _check_shape(x, 4, "conv2d_dw x")
    _check_shape(dy, 4, "conv2d_dw dy")
    dt = _fdtype(x, dy)
    N, K, Ho_, Wo_ = (int(s) for s in dy.shape)
    KH, KW = (int(v) for v in k_hw)
    g = _conv_geom(x.shape, (K, int(x.shape[1]), KH, KW), stride, pads)
    _, C, _, _, _, _, _, Ho, Wo, *_ = g
    if (Ho, Wo) != (Ho_, Wo_) or int(x.shape[0]) != N:
        raise BackendError(f"conv2d_dw: dy {tuple(dy.shape)} does not fit x {tuple(x.shape)}, kernel {KH}x{KW}, "
                           f"stride {stride}, pads {pads}")
    dw = _empty((K, C, KH, KW), dt)
    _igemm("igemm_dw", _flat(dy), _flat(x), None, _flat(dw), K, C * KH * KW, N * Ho * Wo, dims=g)
    return dw


def conv2d_db(dy):
    """dL/db (K,) = sum of dy over (N, H, W)."""
    return reduce_sum(dy, axes=(0, 2, 3))


def matmul(a, b, trans_a=False, trans_b=False, bias=None):
    """op(a) @ op(b) (+ bias per column): the shared-memory tiled GEMM (64x64 tiles, 4x4 per thread;
    narrower tiles when op(a) has at most 32 rows); split-K over the inner size when the output is small."""
    _check_shape(a, 2, "matmul a")
    _check_shape(b, 2, "matmul b")
    dt = _fdtype(a, b, bias)
    M, R = (int(a.shape[1]), int(a.shape[0])) if trans_a else (int(a.shape[0]), int(a.shape[1]))
    R2, P = (int(b.shape[1]), int(b.shape[0])) if trans_b else (int(b.shape[0]), int(b.shape[1]))
    if R != R2:
        raise BackendError(f"matmul: inner sizes differ: a {tuple(a.shape)} (trans_a={trans_a}), "
                           f"b {tuple(b.shape)} (trans_b={trans_b})")
    if bias is not None and bias.size != P:
        raise BackendError(f"matmul: bias has {bias.size} elements, expected {P}")
    out = _empty((M, P), dt)
    if M * P == 0:
        return out
    flags = (_F_TA if trans_a else 0) | (_F_TB if trans_b else 0) | (
        (_F_BIAS | _F_BIAS_COL) if bias is not None else 0)
    _igemm("igemm_mm", _flat(a), _flat(b), None if bias is None else _flat(bias), _flat(out), M, P, R, flags=flags)
    return out


# ---- reductions -----------------------------------------------------------------------------------------

def _reduce_keep_mid(xf, A, B, C, dt, scale=1.0):
    """(A, B, C) flat -> (B,) summing over A and C."""
    if C == 1:  # reducing the leading axes only: column sums are coalesced
        return _reduce_mid(xf, 1, A, B, dt, scale)
    AC = A * C
    S = 1
    target = 4 * _sm_count()
    if B < target:
        S = max(1, min(_cdiv(target, B), _cdiv(AC, 8 * RED_BLOCK), 65535))
    out = _empty((S * B,), dt)
    k = _kernel("reduce_keep_mid", dt)
    block = max(32, _p2(_cdiv(AC, S), RED_BLOCK))
    k[(max(1, min(B, 1 << 20)), S), block](xf, out, A, B, C, S, dt.type(scale if S == 1 else 1.0))
    if S == 1:
        return out
    return _reduce_mid(out, 1, S, B, dt, scale)


def _reduce_mid(xf, A, B, C, dt, scale=1.0):
    """(A, B, C) flat -> (A, C) summing over B."""
    out = _empty((A * C,), dt)
    if B == 0:
        return _fill(out, 0)
    k = _kernel("reduce_mid", dt)
    bx = _p2(C, 32)
    by = _p2(B, 8)
    k[(_cdiv(C, bx), max(1, min(A, 65535))), (bx, by)](xf, out, A, B, C, dt.type(scale))
    return out


def reduce_sum(x, axes=None, keepdims=False, scale=1.0):
    """Sum over ``axes`` (None: all); any axis set works, e.g. all, (0,) of 2-D, (0, 2, 3) of 4-D.
    Also available as ``sum`` (left out of ``__all__`` so that ``import *`` does not shadow the builtin).

    ``scale`` multiplies the result (``scale=1/n`` gives a mean).  All axes give a 0-d device array.
    Deterministic (no atomics): per-block tree reductions, then a second pass when the work was split.
    """
    dt = _fdtype(x)
    shape = tuple(int(s) for s in x.shape)
    nd = len(shape)
    if axes is None:
        axes = tuple(range(nd))
    elif isinstance(axes, (int, np.integer)):
        axes = (int(axes),)
    red = sorted({a % nd if nd else 0 for a in axes}) if nd else []
    for a in axes:
        if not -nd <= a < nd:
            raise BackendError(f"sum: axis {a} out of range for shape {shape}")
    kept_shape = tuple(s for i, s in enumerate(shape) if i not in red)
    final_shape = tuple(1 if i in red else s for i, s in enumerate(shape)) if keepdims else kept_shape
    xf = _flat(x)
    if not red:
        out = elementwise_kernel("a0 * s0", 1)(xf, scalars=(scale,))
        return out.reshape(final_shape) if final_shape else out.reshape(())
    res = _sum_flat(xf, shape, red, dt, scale)
    return res.reshape(final_shape) if final_shape else res.reshape(())


sum = reduce_sum  # noqa: A001


def _sum_flat(xf, shape, red, dt, scale):
    nd = len(shape)
    kept = [i for i in range(nd) if i not in red]
    prod = lambda seq: int(np.prod([shape[i] for i in seq], dtype=np.int64)) if seq else 1  # noqa: E731
    if not kept:
        return _reduce_keep_mid(xf, 1, 1, prod(range(nd)), dt, scale)
    if kept == list(range(kept[0], kept[-1] + 1)):   # kept axes contiguous: (A, B=kept, C)
        return _reduce_keep_mid(xf, prod(range(kept[0])), prod(kept), prod(range(kept[-1] + 1, nd)), dt, scale)
    if red == list(range(red[0], red[-1] + 1)):      # reduced axes contiguous: (A, B=reduced, C)
        return _reduce_mid(xf, prod(range(red[0])), prod(red), prod(range(red[-1] + 1, nd)), dt, scale)
    # general: reduce the last run of reduced axes first, then the rest
    last = [red[-1]]
    while last[0] - 1 in red:
        last.insert(0, last[0] - 1)
    part = _reduce_mid(xf, prod(range(last[0])), prod(last), prod(range(last[-1] + 1, nd)), dt, 1.0)
    new_shape = tuple(s for i, s in enumerate(shape) if i not in last)
    new_red = [a for a in red if a < last[0]]
    return _sum_flat(part, new_shape, new_red, dt, scale)


def _softmax_launch(name, logits, labels, dy, dyscale, out):
    dt = np.dtype(logits.dtype)
    M, Ncol = (int(s) for s in logits.shape)
    if M == 0:
        return out
    grid = max(1, min(_cdiv(M, SM_ROWS), 32 * _sm_count()))
    _kernel(name, dt)[grid, (32, SM_ROWS)](_flat(logits), labels, dy, dt.type(dyscale), out, M, Ncol)
    return out


def softmax(x):
    """Row-wise softmax of a 2-D array (max-subtracted)."""
    _check_shape(x, 2, "softmax x")
    dt = _fdtype(x)
    out = _empty(x.shape, dt)
    _softmax_launch("softmax", x, _dummy(np.int32), _dummy(dt), 1.0, _flat(out))
    return out


def _check_labels(logits, labels):
    _check_shape(logits, 2, "softmax_xent logits")
    if len(labels.shape) != 1 or int(labels.shape[0]) != int(logits.shape[0]):
        raise BackendError(f"softmax_xent: labels {tuple(labels.shape)} must be 1-D with one label per row of "
                           f"logits {tuple(logits.shape)}")
    if np.dtype(labels.dtype).kind not in "iu":
        raise BackendError(f"softmax_xent: labels must be integers, got {labels.dtype}")


def softmax_xent(logits, labels):
    """Mean over the batch of -log softmax(logits)[label]; a 0-d device array.  Out-of-range labels
    give NaN."""
    _check_labels(logits, labels)
    dt = _fdtype(logits)
    M = int(logits.shape[0])
    rows = _empty((M,), dt)
    _softmax_launch("xent_rows", logits, labels, _dummy(dt), 1.0, rows)
    return _reduce_keep_mid(rows, 1, 1, M, dt, 1.0 / max(M, 1)).reshape(())


def softmax_xent_grad(logits, labels, dy=1.0):
    """d loss / d logits = (softmax - onehot) / N * dy; dy a number or a 1-element device array."""
    _check_labels(logits, labels)
    dt = _fdtype(logits)
    out = _empty(logits.shape, dt)
    if isinstance(dy, (int, float, np.number)):
        dyarr, scale = _ones1(dt), float(dy)
    else:
        if dy.size != 1:
            raise BackendError(f"softmax_xent_grad: dy must be a scalar, got shape {tuple(dy.shape)}")
        dyarr, scale = _flat(dy), 1.0
        if np.dtype(dy.dtype) != dt:
            raise BackendError(f"softmax_xent_grad: dy dtype {dy.dtype} differs from logits {dt}")
    _softmax_launch("xent_grad", logits, labels, dyarr, scale, _flat(out))
    return out


_ONES = {}


def _ones1(dtype):
    dt = np.dtype(dtype)
    if dt not in _ONES:
        _ONES[dt] = _load_cuda().to_device(np.ones(1, dt))
    return _ONES[dt]


# =======================================================================================================
# elementwise kernel generator
# =======================================================================================================

_EW_FUNCS = {
    "exp": "math.exp", "log": "math.log", "log1p": "math.log1p", "expm1": "math.expm1", "sqrt": "math.sqrt",
    "tanh": "math.tanh", "sin": "math.sin", "cos": "math.cos", "floor": "math.floor", "ceil": "math.ceil",
    "fabs": "math.fabs", "pow": "math.pow", "abs": "abs", "min": "min", "max": "max", "where": None,
}
_EW_CACHE: dict = {}


class _EwRewrite(ast.NodeTransformer):
    """Checks the names of an elementwise expression and keeps its arithmetic in the kernel's dtype:
    numeric literals become _T(literal), comparisons used as values become 1/0 of the dtype,
    where(c, x, y) becomes (x if c else y).  With cast=False (kernels of an integer dtype) literals and
    function results are left as they are (int32(0.5) would be 0)."""

    def __init__(self, n_inputs, n_scalars, n_prev_outputs, src, cast=True):
        self.n_inputs, self.n_scalars, self.n_prev, self.src = n_inputs, n_scalars, n_prev_outputs, src
        self.cast = cast

    def _fail(self, msg):
        raise BackendError(f"elementwise expression {self.src!r}: {msg}")

    def _T(self, node):
        if not self.cast:
            return node
        return ast.Call(func=ast.Name(id="_T", ctx=ast.Load()), args=[node], keywords=[])

    def _as_value(self, test):
        return ast.IfExp(test=test, body=self._T(ast.Constant(1)), orelse=self._T(ast.Constant(0)))

    def _test(self, node):
        """Visit node used as a condition (no 1/0 conversion at its top)."""
        if isinstance(node, ast.Compare):
            node.left = self.visit(node.left)
            node.comparators = [self.visit(c) for c in node.comparators]
            return node
        if isinstance(node, ast.BoolOp):
            node.values = [self._test(v) for v in node.values]
            return node
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            node.operand = self._test(node.operand)
            return node
        return ast.Compare(left=self.visit(node), ops=[ast.NotEq()], comparators=[self._T(ast.Constant(0))])

    def visit_Expression(self, node):
        node.body = self.visit(node.body)
        return node

    def visit_Constant(self, node):
        if isinstance(node.value, bool):
            return self._T(ast.Constant(int(node.value)))
        if isinstance(node.value, (int, float)):
            return self._T(node)
        self._fail(f"constant {node.value!r} is not a number")

    def visit_Name(self, node):
        nm = node.id
        for prefix, limit, what in (("a", self.n_inputs, "inputs"), ("s", self.n_scalars, "scalars"),
                                    ("o", self.n_prev, "earlier outputs")):
            if nm.startswith(prefix) and nm[1:].isdigit():
                if int(nm[1:]) >= limit:
                    self._fail(f"{nm} is out of range: {limit} {what}")
                return ast.Name(id="_v" + nm, ctx=ast.Load())
        if nm in ("inf", "nan", "pi", "e"):
            return self._T(ast.Attribute(value=ast.Name(id="math", ctx=ast.Load()), attr=nm, ctx=ast.Load()))
        self._fail(f"unknown name {nm!r} (use a0..a{self.n_inputs - 1}, s0.., o0.. and "
                   f"{', '.join(sorted(_EW_FUNCS))})")

    def visit_Call(self, node):
        if not isinstance(node.func, ast.Name) or node.func.id not in _EW_FUNCS or node.keywords:
            self._fail(f"only calls of {', '.join(sorted(_EW_FUNCS))} are allowed")
        fn = node.func.id
        if fn == "where":
            if len(node.args) != 3:
                self._fail("where takes (cond, x, y)")
            c, a, b = node.args
            return ast.IfExp(test=self._test(c), body=self.visit(a), orelse=self.visit(b))
        args = [self.visit(a) for a in node.args]
        if fn in ("min", "max"):
            # Python's min/max as conditionals: numba's builtin min/max are overloads that the built-in
            # numba.cuda can only compile with a GPU present (no compile_ptx without a driver)
            if len(args) < 2:
                self._fail(f"{fn} takes at least 2 arguments")
            res = args[0]
            for nxt in args[1:]:
                op = ast.Gt() if fn == "max" else ast.Lt()
                res = ast.IfExp(test=ast.Compare(left=nxt, ops=[op], comparators=[res]), body=nxt, orelse=res)
            return self._T(res)
        target = _EW_FUNCS[fn]
        if "." in target:
            mod, attr = target.split(".")
            func = ast.Attribute(value=ast.Name(id=mod, ctx=ast.Load()), attr=attr, ctx=ast.Load())
        else:
            func = ast.Name(id=target, ctx=ast.Load())
        return self._T(ast.Call(func=func, args=args, keywords=[]))

    def visit_Compare(self, node):
        return self._as_value(self._test(node))

    def visit_BoolOp(self, node):
        return self._as_value(self._test(node))

    def visit_IfExp(self, node):
        return ast.IfExp(test=self._test(node.test), body=self.visit(node.body), orelse=self.visit(node.orelse))

    def visit_UnaryOp(self, node):
        if isinstance(node.op, ast.Not):
            return self._as_value(self._test(node))
        if isinstance(node.op, (ast.USub, ast.UAdd)):
            node.operand = self.visit(node.operand)
            return node
        self._fail(f"operator {type(node.op).__name__} is not allowed")

    def visit_BinOp(self, node):
        if not isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow, ast.Mod, ast.FloorDiv)):
            self._fail(f"operator {type(node.op).__name__} is not allowed")
        node.left = self.visit(node.left)
        node.right = self.visit(node.right)
        return node

    def generic_visit(self, node):
        if isinstance(node, (ast.expr_context, ast.operator, ast.cmpop, ast.boolop, ast.unaryop)):
            return node
        self._fail(f"{type(node).__name__} is not allowed in an elementwise expression")


def _ew_source(exprs, n_inputs, n_scalars, cast=True):
    lines = []
    for k, src in enumerate(exprs):
        try:
            tree = ast.parse(src.strip(), mode="eval")
        except SyntaxError as e:
            raise BackendError(f"elementwise expression {src!r} does not parse: {e}") from e
        tree = _EwRewrite(n_inputs, n_scalars, k, src, cast).visit(tree)
        lines.append(f"        _vo{k} = _T({ast.unparse(tree.body)})")
    ins = ", ".join(f"_in{i}" for i in range(n_inputs))
    outs = ", ".join(f"_out{k}" for k in range(len(exprs)))
    scal = "".join(f", _vs{j}" for j in range(n_scalars))
    body = [f"def _ew_kernel(_n, {outs}, {ins}{scal}):",
            "    _start = cuda.grid(1)",
            "    _step = cuda.gridsize(1)",
            "    for _i in range(_start, _n, _step):"]
    body += [f"        _va{i} = _in{i}[_i]" for i in range(n_inputs)]
    body += lines
    body += [f"        _out{k}[_i] = _vo{k}" for k in range(len(exprs))]
    return "\n".join(body) + "\n"


class ElementwiseKernel:
    """A generated 1-D grid-stride kernel computing one or more outputs from same-size inputs.

    ``k(*inputs, scalars=(), out=None, dtype=None)``: inputs are device arrays of one size (shapes may
    differ: they are read flat); scalars are Python numbers (cast to the kernel dtype); ``out`` is an
    array or a tuple of arrays (may alias inputs: every input is read before any output is written at an
    index, so in-place optimizer updates are safe); the outputs get the first input's shape and dtype
    unless ``out`` or ``dtype`` says otherwise.  Returns the output, or a tuple for several.
    """

    def __init__(self, exprs, n_inputs, n_scalars):
        self.exprs, self.n_inputs, self.n_scalars = exprs, n_inputs, n_scalars
        self.source = _ew_source(exprs, n_inputs, n_scalars)               # float kernels
        self._int_source = None                                          # integer kernels, on demand
        self._jitted = {}

    def pyfunc(self, dtype):
        """The plain Python kernel function for outputs of ``dtype`` (what gets jitted / compiled to PTX)."""
        ns = {"cuda": _load_cuda(check=False), "math": math, "_T": _nbtype(dtype)}
        src = self.source
        if np.dtype(dtype).kind != "f":
            if self._int_source is None:
                self._int_source = _ew_source(self.exprs, self.n_inputs, self.n_scalars, cast=False)
            src = self._int_source
        exec(compile(src, f"<graphc elementwise {self.exprs!r}>", "exec"), ns)  # noqa: S102
        return ns["_ew_kernel"]

    def _get(self, dtype):
        dt = np.dtype(dtype)
        k = self._jitted.get(dt)
        if k is None:
            k = _load_cuda().jit(self.pyfunc(dt))
            self._jitted[dt] = k
        return k

    def __call__(self, *inputs, scalars=(), out=None, dtype=None):
        if len(inputs) != self.n_inputs:
            raise BackendError(f"elementwise kernel {self.exprs!r} takes {self.n_inputs} inputs, got {len(inputs)}")
        scalars = tuple(scalars) if isinstance(scalars, (tuple, list)) else (scalars,)
        if len(scalars) != self.n_scalars:
            raise BackendError(f"elementwise kernel {self.exprs!r} takes {self.n_scalars} scalars, "
                               f"got {len(scalars)}")
        n_out = len(self.exprs)
        n = int(inputs[0].size) if inputs else (int(out[0].size) if isinstance(out, tuple) else int(out.size))
        for a in inputs:
            if int(a.size) != n:
                raise BackendError(f"elementwise kernel {self.exprs!r}: inputs differ in size "
                                   f"({[tuple(v.shape) for v in inputs]}); no broadcasting here")
        if out is None:
            if dtype is None:
                dtype = inputs[0].dtype
                for a in inputs:
                    if np.dtype(a.dtype).kind == "f":
                        dtype = a.dtype
                        break
            shape = tuple(inputs[0].shape)
            outs = tuple(_empty(shape, dtype) for _ in range(n_out))
        else:
            outs = out if isinstance(out, tuple) else (out,)
            if len(outs) != n_out:
                raise BackendError(f"elementwise kernel {self.exprs!r} has {n_out} outputs, got {len(outs)}")
            for o in outs:
                if int(o.size) != n:
                    raise BackendError(f"elementwise kernel output of size {o.size}, expected {n}")
        dt = np.dtype(outs[0].dtype)
        if n:
            k = self._get(dt)
            sc = tuple(dt.type(s) for s in scalars)
            k[_grid1d(n), EW_BLOCK](n, *(_flat(o) for o in outs), *(_flat(a) for a in inputs), *sc)
        return outs if n_out > 1 else outs[0]


def elementwise_kernel(expr_source, n_inputs, n_scalars=None):
    """Compile (once; cached) a CUDA kernel for a scalar expression over inputs a0..a{n-1}.

    ``expr_source``: a string such as ``"a0 * (a1 > 0)"`` or ``"a0 - s0 * a1"`` (``s0, s1, ...`` are
    scalar constants passed at call time), or a tuple of strings for several outputs, where expression k
    may use the earlier outputs ``o0..o{k-1}``.  Functions: exp, log, log1p, expm1, sqrt, tanh, sin, cos,
    floor, ceil, fabs, abs, pow, min, max, where(c, x, y); ``x if c else y``; constants inf, nan, pi, e.
    Example, Adam in one kernel (inputs g, m, v, p; scalars b1, b2, lr_t, eps)::

        adam = elementwise_kernel(("s0*a1 + (1-s0)*a0", "s1*a2 + (1-s1)*a0*a0",
                                   "a3 - s2*o0/(sqrt(o1) + s3)"), 4)
        adam(g, m, v, p, scalars=(b1, b2, lr_t, eps), out=(m, v, p))
    """
    exprs = (expr_source,) if isinstance(expr_source, str) else tuple(expr_source)
    if not exprs or not all(isinstance(e, str) for e in exprs):
        raise BackendError(f"elementwise_kernel takes an expression string or a tuple of them, got {expr_source!r}")
    if n_scalars is None:
        n_scalars = 0
        for e in exprs:
            try:
                for node in ast.walk(ast.parse(e.strip(), mode="eval")):
                    if isinstance(node, ast.Name) and node.id.startswith("s") and node.id[1:].isdigit():
                        n_scalars = max(n_scalars, int(node.id[1:]) + 1)
            except SyntaxError as err:
                raise BackendError(f"elementwise expression {e!r} does not parse: {err}") from err
    key = (exprs, int(n_inputs), int(n_scalars))
    k = _EW_CACHE.get(key)
    if k is None:
        k = ElementwiseKernel(exprs, int(n_inputs), int(n_scalars))
        _EW_CACHE[key] = k
    return k


# =======================================================================================================
# PTX compilation of every kernel (needs numba-cuda with NVVM; no GPU)
# =======================================================================================================

def _ptx_signatures(dtype):
    """(name, pyfunc, signature) for every kernel, for cuda.compile_ptx."""
    from numba import types as T
    f = _nbtype(dtype)
    i64 = T.int64
    i32 = T.int32
    A = lambda t: T.Array(t, 1, "C")  # noqa: E731
    fa, ia = A(f), A(i32)
    sigs = [("fill", (fa, f, i64))]
    g = (fa, fa, fa, fa) + (i64,) * 4 + (i64,) * 13 + (i64,)
    sigs += [(nm, g) for nm in _FACTORIES if nm.startswith("igemm_")]
    sigs += [("conv_relu_pool", (fa, fa, fa, fa, ia) + (i64,) * 21)]
    sigs += [("route_scatter", (fa, ia, fa, i64, i64, i64))]
    sigs += [("maxpool", (fa, fa, ia) + (i64,) * 10)]
    sigs += [("avgpool", (fa, fa) + (i64,) * 9 + (f,)), ("avgpool_bwd", (fa, fa) + (i64,) * 9 + (f,))]
    sigs += [("reduce_keep_mid", (fa, fa, i64, i64, i64, i64, f)), ("reduce_mid", (fa, fa, i64, i64, i64, f))]
    sigs += [(nm, (fa, ia, fa, f, fa, i64, i64)) for nm in ("softmax", "xent_rows", "xent_grad")]
    sigs += [("xent_rows_int64", (fa, A(T.int64), fa, f, fa, i64, i64))]
    out = []
    for nm, args in sigs:
        base = "xent_rows" if nm == "xent_rows_int64" else nm
        out.append((nm, _FACTORIES[base](f), T.void(*args)))
    return out


def compile_ptx_all(cc=(9, 0), dtype=np.float32, elementwise=(), names=None):
    """Compile every kernel (or those in ``names``) and the given elementwise kernels
    (``(exprs, n_inputs[, n_scalars])``) to PTX for compute capability ``cc`` with ``cuda.compile_ptx``;
    returns {name: ptx}.  Needs NVVM (numba-cuda's pip CUDA toolkit, pip install 'graphc[cuda]', or a
    CUDA toolkit on the system), not a GPU; raises BackendError under the simulator."""
    c = _load_cuda(check=False)
    if _is_sim_module(c) or not hasattr(c, "compile_ptx"):
        raise BackendError("compile_ptx_all needs the real numba.cuda target, not the simulator")
    from numba import types as T
    res = {}
    for nm, fn, sig in _ptx_signatures(dtype):
        if names is not None and nm not in names:
            continue
        ptx, _ = c.compile_ptx(fn, sig, cc=cc)
        res[nm] = ptx
    f = _nbtype(dtype)
    for spec in elementwise:
        k = elementwise_kernel(*spec)
        arr = T.Array(f, 1, "C")
        sig = T.void(T.int64, *([arr] * len(k.exprs)), *([arr] * k.n_inputs), *([f] * k.n_scalars))
        ptx, _ = c.compile_ptx(k.pyfunc(dtype), sig, cc=cc)
        res[f"elementwise{k.exprs!r}"] = ptx
    return res
