"""The direct forward conv with its vector lanes across output channels, for the convs that the plane kernels
(gen.py: lanes across output positions) serve poorly at batch 1-2: strided convs with deep patches or large
filters, 3x3 first layers, and stride-1 convs on small planes. Training steps do not run it (their filters
change every step, and laying out a 512 x 512 x 3 x 3 bank takes 1.8 ms: strategy.choose_conv_strategy's
static_filters).

A strided conv needs no space-to-depth here (every input value is a scalar read, at any stride), and a 7x7
plane fills 49 of the 64 lanes of the plane kernel's wide rows, but all of them here. One task: image n, a
block of KV output channels (KV = 4 SIMD vectors), a block of R output rows. Its accumulators (R x Wo x KV,
at most 16 KiB: they stay in L1) take the whole reduction over input channels; for each input channel the
block's filter taps (T x KV values, the filters laid out (K / KV, C, T, KV) once per filter version) are
read from L1 for all R rows; output positions go P at a time, the P positions' input values (a few rows of
scalars) loaded once and the loop over the KV channels vectorised. Measured on 2 threads at batch 1, ms
(this / the kernel the conv took before / torch 2.13 eager's oneDNN), float32, best of 30-40, torch in the
same process: ResNet-18's 512 -> 512 3x3 on 7x7 0.53-0.64 / 1.12 (direct) / 0.81; its stride-2 3x3 convs
64 -> 128 on 56x56 0.47 / 0.90-1.26 (im2col) / 0.31-0.43, 128 -> 256 on 28x28 0.45 / 0.67 / 0.33,
256 -> 512 on 14x14 0.46 / 0.95 / 0.45; the 1x1 stride-2 256 -> 512 0.11-0.15 / 0.43 / 0.09; its 7x7
stride-2 first layer (3 -> 64, one filter row a pass) 0.88 / 1.00 (direct, by space-to-depth and rows as
channels) / 0.56; 3x3 on 14x14, 256 -> 256 0.52 / 0.58 (direct), 512 -> 512 at batch 2 (VGG16) 4.15 / 4.53.
Stride-1 3x3 on 28x28 and larger planes: no faster than the plane kernel (0.60 / 0.61 on 28x28, 0.73 / 0.62
on 56x56), so those keep it; 1x1 stride-2 convs of fewer than 256 input channels keep im2col (0.11 / 0.12 at
128, 0.21 / 0.13 at 64), and so do 1x1 stride-1 ones (plain GEMMs).

A filter bank of 1 MB and more (laid out) is read from memory in a network at batch 1 (ResNet-18's 47 MB of
filters do not stay in a 32 MB L3), so each input channel's pass first prefetches the block of the channel
two ahead (conv/prefetch.py). ResNet-18 at batch 1, two executables in one process alternating blocks of
15 runs on 2 threads (`python examples/setting_ab.py resnet18 --batch 1 graphc.backends.numba.conv.channels
PREFETCH_MIN_BYTES 4611686018427387904 1048576`, 2026-12-02, Zen 5), the median per-round ratio with /
without: 0.936 at 21-22 ms a step; the same kind of A/B in scratch scripts: 0.96, 0.97 and 0.98 at 17-18
ms, and (a scratch copy of the change) 0.92 with 2 channels ahead (twice), 0.92 with 4, 0.93 with 8 at
20-24 ms. Outputs bit for bit the same. VGG16 at batch 2 (two such convs): 1.02 and 0.98 (noise).
"""
from __future__ import annotations

import threading

import numba
import numpy as np

from graphc.backends.codegen import FASTMATH_SRC as FASTMATH
from graphc.backends.kernel_cache import aligned_empty
from graphc.backends.numba.conv.gen import HEADER, helper_import, round_up
from graphc.backends.numba.conv.layout import out_hw, place, scratch
from graphc.backends.numba.threads import num_threads, parallel_for

MAX_BATCH = 2            # images: a larger batch fills the plane kernels' lanes, and its strided convs
                         # take im2col's GEMMs over several images
MIN_PATCH = 256          # input channels x taps: a shallower conv keeps its strategy (see the module doc)
SMALL_PLANE_FILL = 0.9   # a stride-1 conv whose plane kernel fills fewer of its lanes than this comes here
                         # (a 3x3 one with padding 1: 7x7 and 14x14 planes, not 28x28 and up)
ACC_BYTES = 16 << 10     # a task's accumulators at most, in L1 beside the filters and input rows (64 -> 128 on 56x56
                         # with 2 rows a task: 0.47 ms, with 4 (28 KiB): 0.65)
POSITIONS = 7            # output positions per pass of the vector loop (ResNet's planes are 7 x 2^k wide)
VECTORS = 4              # SIMD vectors of output channels per task
ROW_PASS_TAPS = 9        # a filter of more taps is taken one filter row per pass
IMAGE_CHANNELS = 4       # at most this many input channels: an image (a first layer)
PREFETCH_MIN_BYTES = 1 << 20   # laid-out filters of at least this size (a core's L2 here) are prefetched,
PREFETCH_AHEAD = 2       # ... this many input channels' blocks ahead (conv/prefetch.py; 2 and 4 alike)


def _lanes(dtype) -> int:
    return 64 // np.dtype(dtype).itemsize


def plane_fill(Ho, Wo, Wp, dtype) -> float:
    """The share of the plane kernel's lanes holding output positions (its wide rows are Wp wide and
    rounded up to whole vectors)."""
    return Ho * Wo / round_up((Ho - 1) * Wp + Wo, _lanes(dtype))


def applies(x_shape, w_shape, stride, pads, dil=(1, 1), groups=1, dtype=np.float32) -> bool:
    """Whether a forward conv (store epilogue) of this geometry runs here (see the module doc)."""
    N, C, H, W = x_shape
    K, Cg, KH, KW = w_shape
    if groups != 1 or N > MAX_BATCH or K < 2 * _lanes(dtype):
        return False
    top, bottom, left, right = pads
    Ho, Wo = out_hw(H, W, (KH - 1) * dil[0] + 1, (KW - 1) * dil[1] + 1, stride, pads)
    if Ho < 1 or Wo < 1:
        return False
    if stride > 1:
        # (and a 3x3 first layer: MobileNetV2's 3 -> 32 on 224x224, 0.27 ms against direct's 0.26 by
        # space-to-depth, but with its clip in the epilogue instead of a pass of its own)
        return Cg * KH * KW >= MIN_PATCH or KH * KW > ROW_PASS_TAPS or (Cg <= IMAGE_CHANNELS and KH * KW >= 9)
    # (a 1x1 conv is a plain GEMM to im2col, faster on a 7x7 plane: MobileNetV2's 320 -> 1280 0.21 against 0.25)
    return KH * KW > 1 and Cg * KH * KW >= MIN_PATCH and plane_fill(Ho, Wo, W + left + right, dtype) < SMALL_PLANE_FILL


class Plan:
    """The geometry of one call: KV channels and R rows per task, P positions per pass."""

    def __init__(self, N, C, K, KH, KW, Hp, Wp, Ho, Wo, stride, dil, dtype, clip=None):
        self.N, self.C, self.K, self.KH, self.KW = N, C, K, KH, KW
        self.Hp, self.Wp, self.Ho, self.Wo, self.s, self.dil = Hp, Wp, Ho, Wo, stride, tuple(dil)
        self.dtype, self.clip = np.dtype(dtype), clip
        self.KV = min(VECTORS * _lanes(dtype), round_up(K, _lanes(dtype)))
        self.NKV = -(-K // self.KV)
        # one filter row a pass for many taps, or few channels (first layers), with twice the positions, to read
        # each weight vector for more of them: ResNet's first layer 0.88 ms with 14, 1.18 with 7
        self.row_pass = KH * KW > ROW_PASS_TAPS or C * KH * KW < MIN_PATCH
        self.P = min(POSITIONS * (2 if self.row_pass else 1), Wo)
        self.NRB = -(-Wo // self.P)
        row = self.NRB * self.P * self.KV * self.dtype.itemsize
        nr = -(-Ho // max(1, ACC_BYTES // row))
        self.R = -(-Ho // nr)
        self.NR = -(-Ho // self.R)
        self.ntasks = N * self.NKV * self.NR
        self.acc_len = self.R * self.NRB * self.P * self.KV
        big = self.NKV * C * KH * KW * self.KV * self.dtype.itemsize >= PREFETCH_MIN_BYTES
        self.ahead = PREFETCH_AHEAD if big and C > 1 else 0

    def source(self) -> str:
        return gen_kernel(C=self.C, K=self.K, KH=self.KH, KW=self.KW, Wp=self.Wp, Ho=self.Ho, Wo=self.Wo, s=self.s,
                          dil=self.dil, KV=self.KV, P=self.P, R=self.R, row_pass=self.row_pass,
                          clip=self.clip is not None, ahead=self.ahead, line=64 // self.dtype.itemsize)

    def weights(self, w, out):
        """The filters w (K, C, KH, KW) laid out into out (NKV, C * T * KV): block kb, channel c, tap t holds
        filters kb*KV .. kb*KV + KV - 1 (zeros past K)."""
        K, C, KH, KW = w.shape
        o = out.reshape(self.NKV, C, KH * KW, self.KV)
        full = K // self.KV
        if full:
            o[:full] = w[:full * self.KV].reshape(full, self.KV, C, KH * KW).transpose(0, 2, 3, 1)
        if full < self.NKV:
            o[full:] = 0
            o[full, :, :, :K - full * self.KV] = w[full * self.KV:].reshape(-1, C, KH * KW).transpose(1, 2, 0)


def gen_kernel(*, C, K, KH, KW, Wp, Ho, Wo, s, dil, KV, P, R, row_pass=False, clip=False, ahead=0, line=16) -> str:
    """``kernel(x, wt, b, y, flag, clo, chi, acc, lo, hi)``: tasks lo..hi-1 (image, block of KV output
    channels, block of R rows) of ``y (N, K, Ho, Wo)`` = the correlation of the padded flat planes ``x (N, C,
    >= Hp*Wp)`` (rows Wp wide) with ``wt (NKV, C*KH*KW*KV)`` (Plan.weights) + ``b (NKV*KV,)``, at stride s,
    taps dil apart; ``flag``: then the ReLU, or with ``clip`` the clip to [clo, chi] (NaN passes through
    both, as in gen.py's store epilogue); ``acc``: the
    calling thread's (R*NRB*P*KV,) scratch. A last block of positions that would pass the row's end starts
    earlier instead, overlapping the one before (the same sums, the same bits). ``ahead``: each input
    channel's pass first prefetches the filter block of the channel that many ahead (``line`` values a
    cache line; the same sums, the same bits)."""
    T = KH * KW
    NKV, NRB, NR = -(-K // KV), -(-Wo // P), -(-Ho // R)
    span = (P - 1) * s + (KW - 1) * dil[1] + 1        # input columns the P positions read, per filter row
    L = [HEADER + (helper_import("prefetch", "prefetch") if ahead else ""),
         f"@njit(fastmath={FASTMATH}, cache=True, nogil=True)", "def kernel(x, wt, b, y, flag, clo, chi, acc, lo, hi):"]
    a = L.append
    a("    for t in range(lo, hi):")
    a(f"        n = t // {NKV * NR}")
    a(f"        r = t - n * {NKV * NR}")
    a(f"        kb = r // {NR}")
    a(f"        i0 = (r - kb * {NR}) * {R}")
    a(f"        i1 = i0 + {R} if i0 + {R} < {Ho} else {Ho}")
    a("        xn = x[n]")
    a("        wk = wt[kb]")
    a(f"        for q in range((i1 - i0) * {NRB * P * KV}):")
    a("            acc[q] = 0.0")
    # filters of many taps (ResNet's 7x7 first layer) take one filter row per pass: the whole filter's
    # weights and input values in registers at once spilled most of them (2.6 ms instead of 1.0)
    rows = 1 if row_pass else KH
    a(f"        for c in range({C}):")
    a("            xc = xn[c]")
    if ahead:       # the filter block of channel c + ahead (the last channels: their own, in cache by then)
        a(f"            ca = c + {ahead} if c + {ahead} < {C} else c")
        a(f"            for q in range(0, {T * KV}, {line}):")
        a(f"                prefetch(wk, ca * {T * KV} + q)")
    ind = "            "
    if rows == 1:
        a(f"            for kh in range({KH}):")
        a(f"                wc = wk[(c * {KH} + kh) * {KW * KV}:]")
        a(f"                o = kh * {dil[0] * Wp}")
        ind += "    "
    else:
        a(f"            wc = wk[c * {T * KV}:]")
        a("            o = 0")
    a(f"{ind}for i in range(i0, i1):")
    a(f"{ind}    for rb in range({NRB}):")
    ind += "        "
    a(f"{ind}j0 = rb * {P} if rb * {P} + {P} <= {Wo} else {Wo - P}")
    a(f"{ind}ac = acc[((i - i0) * {NRB} + rb) * {P * KV}:]")
    a(f"{ind}e = i * {s * Wp} + j0 * {s} + o")
    for kh in range(rows):
        for m in range(span):
            a(f"{ind}s{kh}_{m} = xc[e + {kh * dil[0] * Wp + m}]")
    a(f"{ind}for kk in range({KV}):")
    for t in range(rows * KW):
        a(f"{ind}    v{t} = wc[{t * KV} + kk]")
    for j in range(P):
        terms = " + ".join(f"s{kh}_{j * s + kw * dil[1]} * v{kh * KW + kw}" for kh in range(rows) for kw in range(KW))
        a(f"{ind}    ac[{j * KV} + kk] += {terms}")
    # the epilogue: bias, the clip under the flag, the store (P x KV values a task per row; small beside the sums)
    a("        for i in range(i0, i1):")
    a(f"            for rb in range({NRB}):")
    a(f"                j0 = rb * {P} if rb * {P} + {P} <= {Wo} else {Wo - P}")
    a(f"                ac = acc[((i - i0) * {NRB} + rb) * {P * KV}:]")
    a(f"                for kk in range({KV}):")
    a(f"                    k = kb * {KV} + kk")
    a(f"                    if k < {K}:")
    a("                        bk = b[k]")
    a("                        yk = y[n, k, i]")
    a(f"                        for j in range({P}):")
    a(f"                            v = ac[j * {KV} + kk] + bk")
    act = "min(max(v, clo), chi)" if clip else "(0.0 if v < 0 else v)"
    a(f"                            yk[j0 + j] = {act} if flag else v")
    return "\n".join(L) + "\n"


class Binding:
    """A prebound forward of one geometry: ``run(x, w, b, y, route, flag)`` as direct.bind_direct_fwd's (flag:
    ReLU, or the clip when bound with one; route unused). ``weights_version``: a callable whose value changes
    whenever the filters' values may have changed: the laid-out filters are kept until then (made again for
    another filter array); without it they are made every call."""

    def __init__(self, x_shape, w_shape, stride, pads, dil, dtype, clip=None, weights_version=None):
        from graphc.backends.numba.conv.direct import TINY_CALL_FLOPS, load_kernel
        N, C, H, W = x_shape
        K, _, KH, KW = w_shape
        top, bottom, left, right = pads
        Ho, Wo = out_hw(H, W, (KH - 1) * dil[0] + 1, (KW - 1) * dil[1] + 1, stride, pads)
        self.dtype = np.dtype(dtype)
        self.plan = p = Plan(N, C, K, KH, KW, H + top + bottom, W + left + right, Ho, Wo, stride, dil, dtype, clip)
        self.pads, self.x_shape = tuple(pads), tuple(x_shape)
        self.kern = load_kernel(p.source(), predicate=False)
        self.wt = aligned_empty((p.NKV, C * KH * KW * p.KV), dtype)
        self.bias = np.zeros(p.NKV * p.KV, dtype)
        self.acc = [aligned_empty(p.acc_len + 16, dtype) for _ in range(numba.config.NUMBA_NUM_THREADS)]
        lo, hi = clip if clip is not None else (0.0, np.inf)
        self.clo, self.chi = self.dtype.type(lo), self.dtype.type(hi)
        self.version = weights_version
        self.memo = (None, None)
        self.serial = 2 * N * K * C * KH * KW * Ho * Wo < TINY_CALL_FLOPS      # (on the calling thread)

    def planes(self, x):
        """x as the kernel's (N, C, >= Hp*Wp) flat padded planes: itself where unpadded and readable so."""
        p = self.plan
        if x.dtype != self.dtype or not (x.flags.writeable and x.flags.aligned):
            x = np.array(x, self.dtype)
        if self.pads == (0, 0, 0, 0) and x.flags.c_contiguous:
            return x.reshape(p.N, p.C, p.Hp * p.Wp)
        xb = scratch("fwd_x", (p.N, p.C, p.Hp * p.Wp), self.dtype)
        place(x.reshape(self.x_shape), xb, p.Hp, p.Wp, 1, self.pads[0], self.pads[2])
        return xb

    def __call__(self, x, w, b, y, route, flag):
        from graphc.backends.numba.conv.direct import ensure_compiled
        p = self.plan
        v = self.version() if self.version is not None else None
        if self.memo[0] is not w or v is None or self.memo[1] != v:
            p.weights(np.asarray(w, self.dtype), self.wt)
            self.memo = (w, v)
        self.bias[:p.K] = 0 if b is None else b
        args = (self.planes(x), self.wt, self.bias, y, bool(flag), self.clo, self.chi)
        ensure_compiled(self.kern, args + (self.acc[0], 0, 0), self.dtype)
        if self.serial or num_threads() == 1:
            self.kern(*args, self.acc[0], 0, p.ntasks)
        else:
            parallel_for(lambda lo, hi, k: self.kern(*args, self.acc[k], lo, hi), p.ntasks)


_TLS = threading.local()


def forward(x, w, b, stride, pads, relu=False, dil=(1, 1), out=None):
    """y = conv(x, w) + b (then ReLU when relu) into out (or a new array), for the geometries of applies():
    direct.forward's path for them. The filters are laid out again every call; each thread keeps its own
    bindings (their work arrays)."""
    bindings = _TLS.__dict__.setdefault("bindings", {})
    key = (x.shape, w.shape, int(stride), tuple(pads), tuple(dil), x.dtype.str)
    run = bindings.get(key)
    if run is None:
        run = bindings[key] = Binding(x.shape, w.shape, int(stride), tuple(pads), tuple(dil), x.dtype)
    p = run.plan
    y = out if out is not None else np.empty((p.N, p.K, p.Ho, p.Wo), x.dtype)
    run(x, w, b, y, None, relu)
    return y
