"""The implicit GEMM: convolutions (forward, dL/dX, dL/dW) and matmul as one tiled kernel.

A 64x64 output tile per block of 16x16 threads, each thread a 4x4 register micro-tile (16x64 / 32x64
tiles with 1x4 / 2x4 micro-tiles when there are at most 16 / 32 output rows, e.g. a first conv layer
with 6 filters), the reduction walked in steps of 8 with the A tile (filters) and the B tile (input
patches gathered on the fly: no im2col buffer) staged in shared memory (padded against bank
conflicts). The grid is 3-D: x over output columns (pixels), y over output rows (channels), z over
*split-K* slices, used when the output alone gives too few blocks to fill the GPU (dW always has a
short output and a long reduction); split slices add with atomics into a zeroed output.

Grouped convolutions are one GEMM per group, the groups a grid dimension: grid z is (group, split-K
slice), M, P and R are a group's sizes and the tile loads and the output index offset channels by the
group's first filter (gK) and input channel (gC). Dilated filters read taps (dh, dw) apart in the
patch index math. The epilogue adds the bias and applies ReLU or a clip to [lo, hi] (ReLU6).
"""
from __future__ import annotations

import textwrap

import numpy as np

from graphc.backends.cuda.kernels.device import (cdiv, check_shape, dummy, empty, factory, fdtype, fill_step, flat,
                                                 kernel, launcher, load_cuda, pads4, pair, seq, sm_count)
from graphc.errors import BackendError

BM, BN, BK = 64, 64, 8          # block tile: rows (out channels) x cols (pixels) x reduction
TM, TN = 4, 4                   # per-thread micro-tile
GDX, GDY = BN // TN, BM // TM   # 16 x 16 threads
GNT = GDX * GDY                 # 256
SPAD = 4                        # shared-memory row padding (bank conflicts on the tile stores)
BNP = BN + SPAD                 # padded shared rows (shared-array shapes must be plain constants)

FWD, DX, DW, MM = 0, 1, 2, 3                                            # modes
F_BIAS, F_RELU, F_ATOMIC, F_TA, F_TB, F_BIAS_COL = 1, 2, 4, 8, 16, 32   # flags
F_CLIP = 64                                                             # clip to [lo, hi] in the epilogue
GEMM_SIGNATURE = "fa, fa, fa, fa, i64*4, i64*16, i64, f, f"
NO_DIMS = (0,) * 15 + (1,)      # the conv dims of a matmul (one group)


# The kernel is generated per mode (and rows per thread) from this template: the tile loads and the
# output index differ by mode, and text per mode keeps each variant free of run-time mode branches.
_TEMPLATE = """
def igemm(asrc, bsrc, bias, out, M, P, R, r_chunk, N, C, H, W, K, KH, KW, Ho, Wo, sh, sw, pt, pl, dh, dw, G, flags,
          lo, hi):
    As = cuda.shared.array((BK, BMP), nbt)
    Bs = cuda.shared.array((BK, BNP), nbt)
    acc = cuda.local.array((TM_ROWS, TN), nbt)
    ra = cuda.local.array(TM_ROWS, nbt)
    rb = cuda.local.array(TN, nbt)
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    t = ty * GDX + tx
    m0 = cuda.blockIdx.y * BM_ROWS
    p0 = cuda.blockIdx.x * BN
    nsplit = cuda.gridDim.z // G                 # grid z: (group, split-K slice)
    grp = cuda.blockIdx.z // nsplit
    zs = cuda.blockIdx.z - grp * nsplit
    Cg = C // G
    gC = grp * Cg
    gK = grp * (K // G)
    r_begin = zs * r_chunk
    r_end = r_begin + r_chunk
    if r_end > R:
        r_end = R
    zero = nbt(0)
    for i in range(TM_ROWS):
        for j in range(TN):
            acc[i, j] = zero
    KHKW = KH * KW
    HoWo = Ho * Wo
    HW = H * W
    trans_a = (flags & F_TA) != 0
    trans_b = (flags & F_TB) != 0
    for r0 in range(r_begin, r_end, BK):
        for l in range(A_LOADS):                   # A tile: As[kk, mm] = A[m0+mm, r0+kk]
            e = t + l * GNT
            if e < A_ELEMS:
{a_order}
                m = m0 + mm
                r = r0 + kk
                v = zero
                if m < M and r < r_end:
{a_load}
                As[kk, mm] = v
        for l in range(B_LOADS):                   # B tile: Bs[kk, pp] = B[r0+kk, p0+pp]
            e = t + l * GNT
{b_order}
            p = p0 + pp
            r = r0 + kk
            v = zero
            if p < P and r < r_end:
{b_load}
            Bs[kk, pp] = v
        cuda.syncthreads()
        for kk in range(BK):
            for i in range(TM_ROWS):
                ra[i] = As[kk, ty + i * GDY]
            for j in range(TN):
                rb[j] = Bs[kk, tx + j * GDX]
            for i in range(TM_ROWS):
                for j in range(TN):
                    acc[i, j] += ra[i] * rb[j]
        cuda.syncthreads()
    has_bias = (flags & F_BIAS) != 0 and zs == 0
    relu = (flags & F_RELU) != 0
    clip = (flags & F_CLIP) != 0
    atomic = (flags & F_ATOMIC) != 0
    bias_col = (flags & F_BIAS_COL) != 0
    for i in range(TM_ROWS):
        m = m0 + ty + i * GDY
        if m < M:
            brow = zero
            if has_bias and not bias_col:
                brow = bias[gK + m]
            for j in range(TN):
                p = p0 + tx + j * GDX
                if p < P:
                    v = acc[i, j] + brow
                    if has_bias and bias_col:
                        v += bias[p]
                    if relu and v < zero:
                        v = zero
                    if clip:
                        if v < lo:
                            v = lo
                        if v > hi:
                            v = hi
{out_index}
                    if atomic:
                        cuda.atomic.add(out, idx, v)
                    else:
                        out[idx] = v
"""

# per mode: which index runs fastest across consecutive threads on the tile loads (coalescing), the
# element of A (filters; their per-tap transpose; dy; a or a^T), of B (input patches gathered on the fly;
# dy at the taps reaching an input pixel, stride holes zero; patches transposed; b or b^T) and the flat
# index of out[m, p] (y (N, K, Ho, Wo); dx (N, C, H, W); (M, P))
_K_FAST = "kk = e % BK\nmm = e // BK"
_A_ORDER = {FWD: _K_FAST, DX: _K_FAST, DW: _K_FAST,
            MM: "if not trans_a:\n    kk = e % BK\n    mm = e // BK\nelse:\n    mm = e % BM_ROWS\n    kk = e // BM_ROWS"}
_B_ORDER = {FWD: "pp = e % BN\nkk = e // BN", DX: "pp = e % BN\nkk = e // BN", DW: "kk = e % BK\npp = e // BK",
            MM: "if trans_b:\n    kk = e % BK\n    pp = e // BK\nelse:\n    pp = e % BN\n    kk = e // BN"}
_A_LOAD = {FWD: "v = asrc[(gK + m) * R + r]",
           DX: "k = r // KHKW\nv = asrc[((gK + k) * Cg + m) * KHKW + (r - k * KHKW)]",
           DW: "n = r // HoWo\nv = asrc[(n * K + gK + m) * HoWo + (r - n * HoWo)]",
           MM: "if trans_a:\n    v = asrc[r * M + m]\nelse:\n    v = asrc[m * R + r]"}
_PATCH = """c = {tap} // KHKW
q = {tap} - c * KHKW
kh = q // KW
kw = q - kh * KW
n = {pix} // HoWo
q2 = {pix} - n * HoWo
oh = q2 // Wo
ow = q2 - oh * Wo
ih = oh * sh - pt + kh * dh
iw = ow * sw - pl + kw * dw
if ih >= 0 and ih < H and iw >= 0 and iw < W:
    v = bsrc[((n * C + gC + c) * H + ih) * W + iw]"""
_B_LOAD = {FWD: _PATCH.format(tap="r", pix="p"), DW: _PATCH.format(tap="p", pix="r"),
           DX: """k = r // KHKW
q = r - k * KHKW
kh = q // KW
kw = q - kh * KW
n = p // HW
q2 = p - n * HW
ih = q2 // W
iw = q2 - ih * W
th = ih + pt - kh * dh
tw = iw + pl - kw * dw
if th >= 0 and tw >= 0:
    oh = th // sh
    ow = tw // sw
    if oh * sh == th and ow * sw == tw and oh < Ho and ow < Wo:
        v = bsrc[((n * K + gK + k) * Ho + oh) * Wo + ow]""",
           MM: "if trans_b:\n    v = bsrc[p * R + r]\nelse:\n    v = bsrc[r * P + p]"}
_OUT_INDEX = {FWD: "n = p // HoWo\nidx = (n * K + gK + m) * HoWo + (p - n * HoWo)",
              DX: "n = p // HW\nidx = (n * C + gC + m) * HW + (p - n * HW)",
              DW: "idx = (gK + m) * P + p", MM: "idx = m * P + p"}


def igemm_source(mode, tm):
    """The Python source of the implicit-GEMM kernel for a mode."""
    def ind(text, n):
        return textwrap.indent(text, " " * n)
    return _TEMPLATE.format(a_order=ind(_A_ORDER[mode], 16), a_load=ind(_A_LOAD[mode], 20),
                            b_order=ind(_B_ORDER[mode], 12), b_load=ind(_B_LOAD[mode], 16),
                            out_index=ind(_OUT_INDEX[mode], 20))


def _mk_igemm(mode, tm):
    """out[m, p] = sum_r A[m, r] * B[r, p] (+ bias, ReLU) for a mode; ``tm`` (1, 2 or 4) rows per thread:
    block tiles of 16*tm rows, so that layers with few output channels do not waste a 64-row tile."""
    src = igemm_source(mode, tm)
    bm = GDY * tm

    def make(nbt):
        ns = {"cuda": load_cuda(check=False), "nbt": nbt, "BK": BK, "BN": BN, "BNP": BNP, "BMP": bm + SPAD,
              "BM_ROWS": bm, "TM_ROWS": tm, "TN": TN, "GDX": GDX, "GDY": GDY, "GNT": GNT, "A_ELEMS": bm * BK,
              "A_LOADS": (bm * BK + GNT - 1) // GNT, "B_LOADS": (BK * BN) // GNT, "F_TA": F_TA, "F_TB": F_TB,
              "F_BIAS": F_BIAS, "F_RELU": F_RELU, "F_ATOMIC": F_ATOMIC, "F_BIAS_COL": F_BIAS_COL, "F_CLIP": F_CLIP}
        exec(compile(src, f"<graphc igemm mode {mode} tm {tm}>", "exec"), ns)  # noqa: S102
        return ns["igemm"]
    return make


for _name, _mode in (("fwd", FWD), ("dx", DX), ("dw", DW), ("mm", MM)):
    for _tm in (4, 2, 1):
        factory(f"igemm_{_name}{'' if _tm == TM else f'_t{_tm}'}", GEMM_SIGNATURE)(_mk_igemm(_mode, _tm))


def igemm_step(name, asrc, bsrc, bias, out, M, P, R, dims=NO_DIMS, flags=0, allow_split=True, clip=None):
    """A step launching the implicit GEMM `name` ("igemm_fwd", ...) into the flat `out` (zeroed first
    when split-K is used), its launch configuration chosen now; M, P, R are one group's sizes (dims[-1]
    groups); clip = (lo, hi) bounds applied in the epilogue."""
    if M * P == 0:
        return seq([])
    groups = dims[-1]
    tm = 1 if M <= GDY else (2 if M <= 2 * GDY else TM)   # rows per thread: block tile of 16, 32 or 64 rows
    if tm != TM:
        name = f"{name}_t{tm}"
    gx, gy = cdiv(P, BN), cdiv(M, GDY * tm)
    if gy > 65535:
        raise BackendError(f"implicit GEMM: {M} output rows exceed the grid limit")
    splits = 1
    if clip is not None:
        flags |= F_CLIP
    if allow_split and not (flags & (F_RELU | F_CLIP)):
        target = 2 * sm_count()
        if gx * gy * groups < target:
            splits = max(1, min(cdiv(target, gx * gy * groups), cdiv(R, BK * 8), 65535 // groups))
    r_chunk = max(BK, cdiv(cdiv(R, splits), BK) * BK)
    splits = max(1, cdiv(R, r_chunk))
    if splits * groups > 65535:
        raise BackendError(f"implicit GEMM: {groups} groups x {splits} split-K slices exceed the grid limit")
    if splits > 1:
        flags |= F_ATOMIC
    bias = dummy(out.dtype) if bias is None else bias
    lo, hi = clip if clip is not None else (None, None)          # None: unbounded on that side
    lo, hi = float("-inf") if lo is None else lo, float("inf") if hi is None else hi
    dt = np.dtype(out.dtype).type
    launch = launcher(kernel(name, out.dtype), (gx, gy, splits * groups), (GDX, GDY, 1),
                      asrc, bsrc, bias, out, M, P, R, r_chunk, *dims, flags, dt(lo), dt(hi))
    return seq([fill_step(out, 0), launch]) if splits > 1 else launch


def conv_geometry(x_shape, w_shape, stride, pads, dilation=1, groups=1):
    """(N, C, H, W, K, KH, KW, Ho, Wo, sh, sw, pt, pl, dh, dw, G) of a convolution (w: (K, C / G, KH,
    KW)), checked."""
    N, C, H, W = (int(s) for s in x_shape)
    K, Cw, KH, KW = (int(s) for s in w_shape)
    G = int(groups)
    if G < 1 or Cw * G != C or K % G:
        raise BackendError(f"conv2d: input has {C} channels, filters expect {Cw} x groups={G} (x {tuple(x_shape)}, "
                           f"w {tuple(w_shape)}; groups must divide the {K} filters)")
    sh, sw = pair(stride, "stride")
    dh, dw = pair(dilation, "dilation")
    pt, pb, pl, pr = pads4(pads)
    Ho = (H + pt + pb - (KH - 1) * dh - 1) // sh + 1
    Wo = (W + pl + pr - (KW - 1) * dw - 1) // sw + 1
    if Ho < 1 or Wo < 1 or sh < 1 or sw < 1 or dh < 1 or dw < 1:
        raise BackendError(f"conv2d: empty output for input {H}x{W}, kernel {KH}x{KW}, stride {(sh, sw)}, "
                           f"dilation {(dh, dw)}, pads {(pt, pb, pl, pr)}")
    return N, C, H, W, K, KH, KW, Ho, Wo, sh, sw, pt, pl, dh, dw, G


def conv_step(x, w, bias, y, geom, relu=False, clip=None):
    """y = conv(x, w) (+ bias, ReLU or a clip to clip = (lo, hi)) on flat arrays; one GEMM per group."""
    N, C, H, W, K, KH, KW, Ho, Wo = geom[:9]
    G = geom[-1]
    flags = (F_BIAS if bias is not None else 0) | (F_RELU if relu else 0)
    return igemm_step("igemm_fwd", w, x, bias, y, K // G, N * Ho * Wo, C // G * KH * KW, dims=geom, flags=flags,
                      clip=clip)


def conv_dx_step(dy, w, dx, geom):
    """dx = dL/dX of y = conv(x, w) on flat arrays: implicit GEMM of w^T with dy (per group)."""
    N, C, H, W, K, KH, KW = geom[:7]
    G = geom[-1]
    return igemm_step("igemm_dx", w, dy, None, dx, C // G, N * H * W, K // G * KH * KW, dims=geom)


def conv_dw_step(x, dy, dw, geom):
    """dw = dL/dW on flat arrays: implicit GEMM of dy with input patches (per group; split-K over N*Ho*Wo)."""
    N, C, H, W, K, KH, KW, Ho, Wo = geom[:9]
    G = geom[-1]
    return igemm_step("igemm_dw", dy, x, None, dw, K // G, C // G * KH * KW, N * Ho * Wo, dims=geom)


def matmul_step(a, b, out, a_shape, b_shape, trans_a=False, trans_b=False, bias=None):
    """out = op(a) @ op(b) (+ bias per column) on flat arrays."""
    M, R = (a_shape[1], a_shape[0]) if trans_a else tuple(a_shape)
    R2, P = (b_shape[1], b_shape[0]) if trans_b else tuple(b_shape)
    if R != R2:
        raise BackendError(f"matmul: inner sizes differ: a {tuple(a_shape)} (trans_a={trans_a}), "
                           f"b {tuple(b_shape)} (trans_b={trans_b})")
    flags = (F_TA if trans_a else 0) | (F_TB if trans_b else 0) | ((F_BIAS | F_BIAS_COL) if bias is not None else 0)
    return igemm_step("igemm_mm", a, b, bias, out, int(M), int(P), int(R), flags=flags)


# ============================================================================================== public API

def conv2d(x, w, b=None, stride=1, pads=0, relu=False, out=None, dilation=1, groups=1):
    """y = conv2d(x, w) + b (optionally ReLU'd): implicit GEMM, shared-memory tiles; y (N, K, Ho, Wo);
    w (K, C / groups, KH, KW), taps `dilation` apart."""
    check_shape(x, 4, "conv2d x")
    check_shape(w, 4, "conv2d w")
    dt = fdtype(x, w, b)
    g = conv_geometry(x.shape, w.shape, stride, pads, dilation, groups)
    N, C, H, W, K, KH, KW, Ho, Wo = g[:9]
    if b is not None and b.size != K:
        raise BackendError(f"conv2d: bias has {b.size} elements, expected {K}")
    y = out if out is not None else empty((N, K, Ho, Wo), dt)
    conv_step(flat(x), flat(w), None if b is None else flat(b), flat(y), g, relu)()
    return y


def conv2d_dx(dy, w, stride, pads, in_hw, dilation=1, groups=1):
    """dL/dx (N, C, H, W) of y = conv2d(x, w): implicit GEMM of w^T with dy (transposed convolution)."""
    check_shape(dy, 4, "conv2d_dx dy")
    check_shape(w, 4, "conv2d_dx w")
    dt = fdtype(dy, w)
    N, K, Ho_, Wo_ = (int(s) for s in dy.shape)
    H, W = (int(v) for v in in_hw)
    g = conv_geometry((N, int(w.shape[1]) * int(groups), H, W), w.shape, stride, pads, dilation, groups)
    C, K2, Ho, Wo = g[1], g[4], g[7], g[8]
    if (K2, Ho, Wo) != (K, Ho_, Wo_):
        raise BackendError(f"conv2d_dx: dy {tuple(dy.shape)} does not fit w {tuple(w.shape)}, input {H}x{W}, "
                           f"stride {stride}, pads {pads} (expected {K2}x{Ho}x{Wo})")
    dx = empty((N, C, H, W), dt)
    conv_dx_step(flat(dy), flat(w), flat(dx), g)()
    return dx


def conv2d_dw(x, dy, stride, pads, k_hw, dilation=1, groups=1):
    """dL/dw (K, C / groups, KH, KW): implicit GEMM of dy with input patches, split-K over N*Ho*Wo."""
    check_shape(x, 4, "conv2d_dw x")
    check_shape(dy, 4, "conv2d_dw dy")
    dt = fdtype(x, dy)
    N, K, Ho_, Wo_ = (int(s) for s in dy.shape)
    KH, KW = (int(v) for v in k_hw)
    g = conv_geometry(x.shape, (K, int(x.shape[1]) // int(groups), KH, KW), stride, pads, dilation, groups)
    C, Ho, Wo = g[1], g[7], g[8]
    if (Ho, Wo) != (Ho_, Wo_) or int(x.shape[0]) != N:
        raise BackendError(f"conv2d_dw: dy {tuple(dy.shape)} does not fit x {tuple(x.shape)}, kernel {KH}x{KW}, "
                           f"stride {stride}, pads {pads}")
    dw = empty((K, C // g[-1], KH, KW), dt)
    conv_dw_step(flat(x), flat(dy), flat(dw), g)()
    return dw


def matmul(a, b, trans_a=False, trans_b=False, bias=None):
    """op(a) @ op(b) (+ bias per column): the shared-memory tiled GEMM (64x64 tiles, 4x4 per thread;
    narrower tiles when op(a) has at most 32 rows); split-K over the inner size when the output is small."""
    check_shape(a, 2, "matmul a")
    check_shape(b, 2, "matmul b")
    dt = fdtype(a, b, bias)
    M = int(a.shape[1] if trans_a else a.shape[0])
    P = int(b.shape[0] if trans_b else b.shape[1])
    if bias is not None and bias.size != P:
        raise BackendError(f"matmul: bias has {bias.size} elements, expected {P}")
    out = empty((M, P), dt)
    step = matmul_step(flat(a), flat(b), flat(out), tuple(a.shape), tuple(b.shape), trans_a, trans_b,
                       None if bias is None else flat(bias))
    step()
    return out

