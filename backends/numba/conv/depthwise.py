"""Depthwise convolution (groups == C, K = M * C filters, M per input channel): a per-channel stencil.

A depthwise layer does 2 * KH * KW flops per output element, so it is bound by memory, not arithmetic:
no GEMM, no im2col. Each kernel is generated per filter size, stride, dilation and channel multiplier
(the taps unrolled with the weights in scalars; plane sizes and padding are run-time arguments, so one
kernel serves every layer of that kind: MobileNetV2 needs two forward kernels, 3x3 with stride 1 and
2) and runs one task per (image, channel) plane (tasks lo..hi-1 per call, split between threads by
threads.parallel_for), so the input is read once and the output written once:

- the task copies its input plane, zero-padded, into a per-thread buffer (L1/L2-resident) as
  ``sh * sw`` *phase planes* (phase (a, b) holds the padded rows a, a + sh, ... and columns b, b + sw,
  ...), so every tap of a strided, dilated filter reads a contiguous run of one phase plane: tap
  (kh, kw) reads phase ((kh*dh) % sh, (kw*dw) % sw) at row offset (kh*dh) // sh, column offset
  (kw*dw) // sw, and output row i, column j at i * Wq + j of it;
- forward: the taps summed over "wide rows" (one vector loop over the Ho x Wq phase-plane positions,
  the Wq - Wo extra columns discarded), then y = clip(sum + bias, lo, hi) row by row: ReLU, ReLU6 or
  any clip in the epilogue, NaN passing through like torch's clamp;
- dL/dX: the transposed stencil: each dy plane scattered (stride holes zero) into a plane padded by
  the filter's extent, then a stride-1 stencil with the 180-degree rotated filter (summed over the M
  filters of the channel);
- dL/dW: per-channel reductions: tap t of filter k sums dy[n, k] * (phase plane at t's offset) over
  the output plane, dy placed in "wide rows" (Wq long, zeros past Wo) so each tap is one long dot
  product; tasks over (group of images, channel) write partial sums, summed in float64 afterwards.
"""
from __future__ import annotations

import numba
import numpy as np

from graphc.backends.codegen import FASTMATH_SRC as FASTMATH
from graphc.backends.numba.conv import direct
from graphc.backends.numba.conv.direct import load_kernel, run_generated
from graphc.backends.numba.conv.gen import HEADER
from graphc.backends.numba.conv.layout import scratch
from graphc.errors import BackendError


def is_depthwise(x_shape, w_shape, groups):
    """groups == C and each filter sees one channel (K a multiple of C)."""
    c, k = int(x_shape[1]), int(w_shape[0])
    return int(groups) == c and int(w_shape[1]) == 1 and k % c == 0


class Geometry:
    """One depthwise conv: x (N, C, H, W), w (C*M, 1, KH, KW), y (N, C*M, Ho, Wo), stride (sh, sw),
    dilation (dh, dw), pads (top, bottom, left, right)."""

    def __init__(self, x_shape, w_shape, stride, pads, dilation):
        self.N, self.C, self.H, self.W = (int(v) for v in x_shape)
        K, cg, self.KH, self.KW = (int(v) for v in w_shape)
        if cg != 1 or K % self.C:
            raise BackendError(f"depthwise conv: filters {tuple(w_shape)} do not fit {self.C} channels "
                               "(want (M * C, 1, KH, KW))")
        self.K, self.M = K, K // self.C
        self.sh, self.sw = (int(v) for v in stride)
        self.dh, self.dw = (int(v) for v in dilation)
        self.pt, self.pb, self.pl, self.pr = (int(v) for v in pads)
        eh, ew = (self.KH - 1) * self.dh, (self.KW - 1) * self.dw
        self.Ho = (self.H + self.pt + self.pb - eh - 1) // self.sh + 1
        self.Wo = (self.W + self.pl + self.pr - ew - 1) // self.sw + 1
        if min(self.sh, self.sw, self.dh, self.dw) < 1 or min(pads) < 0 or self.Ho < 1 or self.Wo < 1:
            raise BackendError(f"depthwise conv: empty or invalid geometry: input {self.H}x{self.W}, filter "
                               f"{self.KH}x{self.KW}, stride {stride}, dilation {dilation}, pads {pads}")
        self.T = self.KH * self.KW


# --------------------------------------------------------------------------------------------------
# phase planes: where each tap reads
# --------------------------------------------------------------------------------------------------

class Phases:
    """Phase planes of a source plane (h, w) placed at row ot, column ol of a zero plane, possibly
    upsampled by (uh, uw) (dL/dX: stride holes), read with stride (sh, sw) and dilation (dh, dw) by a
    KH x KW filter producing Ho x Wo outputs. Each phase plane is Hq x Wq plus a zero tail (the wide-row
    reads run past the last row). The generated code takes ``geo`` (run time) and the rest as literals."""

    def __init__(self, h, w, ot, ol, uh, uw, sh, sw, dh, dw, KH, KW, Ho, Wo):
        self.uh, self.uw, self.sh, self.sw = uh, uw, sh, sw
        Hq = -(-((Ho - 1) * sh + (KH - 1) * dh + 1) // sh)
        Wq = -(-((Wo - 1) * sw + (KW - 1) * dw + 1) // sw)
        self.Lq = Hq * Wq + (KW - 1) * dw // sw
        self.planes = sh * sw
        self.L = self.planes * self.Lq
        self.P = Ho * Wq                                    # the wide rows of the outputs
        self.geo = np.array([h, w, Ho, Wo, ot, ol, Hq, Wq, self.Lq], np.int64)
        # per tap: (phase plane, row offset, column offset)
        self.taps = [((kh * dh) % sh * sw + (kw * dw) % sw, (kh * dh) // sh, (kw * dw) // sw)
                     for kh in range(KH) for kw in range(KW)]

    def literal_key(self):
        return (self.uh, self.uw, self.sh, self.sw, tuple(self.taps))

    def prelude(self, ind):
        """The run-time geometry and each tap's offset into the buffer (o0, o1, ...)."""
        names = "h, w_, Ho, Wo, ot, ol, Hq, Wq, Lq"
        L = [f"{ind}{names} = " + ", ".join(f"geo[{i}]" for i in range(9)), f"{ind}P = Ho * Wq",
             f"{ind}zero = bp.dtype.type(0)"]
        if self.uh == 1 and self.uw == 1:
            L += self.column_range(ind)
        L += [f"{ind}o{t} = {ph} * Lq + {r} * Wq + {c}" for t, (ph, r, c) in enumerate(self.taps)]
        return L

    def fill(self, src, base, ind):
        """Lines placing the 2-D plane `src` (a name) at bp[base:]."""
        if self.uh == 1 and self.uw == 1:
            return self._fill_phases(src, base, ind)
        return self._fill_upsampled(src, base, ind)

    def _fill_phases(self, src, base, ind):
        """Every phase row of a source row in one loop (the sw column phases of consecutive source
        elements: LLVM's interleaved loads and shuffles, no gathers); the columns at the edges, where
        some phase falls into the padding, one at a time."""
        SH, SW = self.sh, self.sw
        pbs = range(SW)
        lines = [f"for pa in range({SH}):",
                 f"    r0 = max(0, -((pa - ot) // {SH}))",
                 f"    r1 = max(r0, min(Hq, (h - 1 + ot - pa) // {SH} + 1))"]
        for pb in pbs:
            lines += [f"    p{pb} = bp[{base} + (pa * {SW} + {pb}) * Lq:{base} + (pa * {SW} + {pb} + 1) * Lq]",
                      f"    for q in range(r0 * Wq):", f"        p{pb}[q] = 0",
                      f"    for q in range(r1 * Wq, Lq):", f"        p{pb}[q] = 0"]
        lines += ["    for ii in range(r0, r1):", f"        sr = {src}[ii * {SH} + pa - ot]",
                  "        for e in range(jlo + Wq - jhi):",
                  "            jj = e if e < jlo else jhi + e - jlo"]
        for pb in pbs:
            lines += [f"            col = jj * {SW} + {pb} - ol",
                      f"            p{pb}[ii * Wq + jj] = sr[col] if col >= 0 and col < w_ else zero"]
        lines += [f"        sv = sr[jlo * {SW} - ol:]"]
        lines += [f"        q{pb} = p{pb}[ii * Wq + jlo:]" for pb in pbs]
        lines += ["        for jj in range(jhi - jlo):"]
        lines += [f"            q{pb}[jj] = sv[jj * {SW} + {pb}]" if SW > 1 else f"            q{pb}[jj] = sv[jj]"
                  for pb in pbs]
        return [ind + line for line in lines]

    def column_range(self, ind):
        """Prelude lines: [jlo, jhi), the phase-plane columns where every column phase reads the source."""
        SW = self.sw
        c0 = ", ".join(f"-(({pb} - ol) // {SW})" for pb in range(SW))
        c1 = ", ".join(f"(w_ - 1 + ol - {pb}) // {SW} + 1" for pb in range(SW))
        return [f"{ind}jlo = min(Wq, max(0, {c0}))", f"{ind}jhi = max(jlo, min(Wq, {c1}))"]

    def _fill_upsampled(self, src, base, ind):
        # one phase plane (stride 1): zeros, then every source element at (i*uh + ot, j*uw + ol)
        UH, UW = self.uh, self.uw
        body = f"""\
ph = bp[{base}:{base} + Lq]
for q in range(Lq):
    ph[q] = 0
for i in range(max(0, -(ot // {UH})), min(h, (Hq - 1 - ot) // {UH} + 1)):
    j0 = max(0, -(ol // {UW}))
    pr = ph[(i * {UH} + ot) * Wq + j0 * {UW} + ol:]
    sr = {src}[i, j0:]
    for j in range(min(w_, (Wq - 1 - ol) // {UW} + 1) - j0):
        pr[j * {UW}] = sr[j]"""
        return [ind + line for line in body.split("\n")]


def fwd_phases(g: Geometry) -> Phases:
    return Phases(g.H, g.W, g.pt, g.pl, 1, 1, g.sh, g.sw, g.dh, g.dw, g.KH, g.KW, g.Ho, g.Wo)


def dx_phases(g: Geometry) -> Phases:
    eh, ew = (g.KH - 1) * g.dh, (g.KW - 1) * g.dw
    return Phases(g.Ho, g.Wo, eh - g.pt, ew - g.pl, g.sh, g.sw, 1, 1, g.dh, g.dw, g.KH, g.KW, g.H, g.W)


# --------------------------------------------------------------------------------------------------
# generated kernels
# --------------------------------------------------------------------------------------------------

def _views(ph: Phases, planes, ind):
    """x{u}_{t} = the buffer from tap t's offset in plane u (planes [(u, base)]): indexed by the wide-row
    position alone, a loop index LLVM knows is non-negative (no wrap-around selects: vector loads)."""
    return [f"{ind}x{u}_{t} = bp[{base} + o{t}:]" for u, base in planes for t in range(len(ph.taps))]


def _wide_sum(ph: Phases, planes, acc, ind, epilogue):
    """The taps summed over the wide rows into `acc` (with the epilogue: plus the bias bq, clipped to
    [lo, hi]: in this long vector loop, not the short output rows)."""
    terms = " + ".join(f"w{u}_{t} * x{u}_{t}[p]" for u, _ in planes for t in range(len(ph.taps)))
    if not epilogue:
        return [f"{ind}for p in range(P):", f"{ind}    {acc}[p] = {terms}"]
    return [f"{ind}for p in range(P):", f"{ind}    v = bq + {terms}", f"{ind}    v = lo if v < lo else v",
            f"{ind}    {acc}[p] = hi if v > hi else v"]


def _rows_out(acc, out, ind):
    """The Ho x Wo outputs of the wide rows into the 2-D array `out`."""
    return [f"{ind}for i in range(Ho):", f"{ind}    ar = {acc}[i * Wq:]", f"{ind}    yr = {out}[i]",
            f"{ind}    for j in range(Wo):", f"{ind}        yr[j] = ar[j]"]


def _weights(wk, u, T, ind):
    return [f"{ind}w{u}_{t} = {wk}[{t}]" for t in range(T)]


_HEAD = [HEADER, f"@njit(fastmath={FASTMATH}, cache=True, nogil=True)"]


def gen_forward(ph: Phases, M: int) -> str:
    """``kernel(x, w, b, y, act, geo, bp, t0, t1)``: planes t0..t1-1 (task t: image t // C, channel t % C)
    of y (N, C*M, Ho, Wo) = clip(depthwise(x, w) + b, act[0], act[1]); w (C*M, KH*KW), b (C*M,), bp
    (L + P,) the calling thread's scratch, act (2,) the clip bounds (+-inf: none), geo the run-time
    geometry (Phases.geo)."""
    T = len(ph.taps)
    L = _HEAD + ["def kernel(x, w, b, y, act, geo, bp, t0, t1):", "    lo = act[0]", "    hi = act[1]",
                 "    C = x.shape[1]"] + ph.prelude("    ")
    L += ["    for t in range(t0, t1):", "        n = t // C", "        c = t - n * C",
          f"        acc = bp[{ph.planes} * Lq:{ph.planes} * Lq + P]", "        src = x[n, c]"]
    L += ph.fill("src", 0, "        ") + _views(ph, [(0, 0)], "        ")
    L += [f"        for q in range({M}):", f"            k = c * {M} + q", "            wk = w[k]",
          "            bq = b[k]"] + _weights("wk", 0, T, "            ")
    L += _wide_sum(ph, [(0, 0)], "acc", "            ", True) + _rows_out("acc", "y[n, k]", "            ")
    return "\n".join(L) + "\n"


def gen_grad_input(ph: Phases, M: int) -> str:
    """``kernel(dy, wr, dx, geo, bp, t0, t1)``: planes t0..t1-1 (image, channel) of dx (N, C, H, W) of the
    depthwise conv; wr (C*M, KH*KW) the filters rotated by 180 degrees; the M dy planes of a channel
    placed side by side in the calling thread's scratch bp (M*L + P,)."""
    T = len(ph.taps)
    planes = [(q, f"{q} * Lq") for q in range(M)]          # one phase plane per dy plane (stride 1)
    L = _HEAD + ["def kernel(dy, wr, dx, geo, bp, t0, t1):", "    C = dx.shape[1]"] + ph.prelude("    ")
    L += ["    for t in range(t0, t1):", "        n = t // C", "        c = t - n * C",
          f"        acc = bp[{M} * Lq:{M} * Lq + P]"]
    for q, base in planes:
        L += [f"        src = dy[n, c * {M} + {q}]"] + ph.fill("src", base, "        ")
        L += _weights(f"wr[c * {M} + {q}]", q, T, "        ")
    L += _views(ph, planes, "        ") + _wide_sum(ph, planes, "acc", "        ", False)
    L += _rows_out("acc", "dx[n, c]", "        ")
    return "\n".join(L) + "\n"


def gen_grad_weights(ph: Phases, M: int) -> str:
    """``kernel(x, dy, part, per, geo, bp, t0, t1)``: part (NG, C*M, KH*KW) gets, per group of `per`
    images, the sums of dy x input over the output planes (the caller sums over groups); tasks t0..t1-1
    (task t: group t // C, channel t % C); bp (L + P,) the calling thread's scratch."""
    T = len(ph.taps)
    L = _HEAD + ["def kernel(x, dy, part, per, geo, bp, t0, t1):", "    N = x.shape[0]", "    C = x.shape[1]"]
    L += ph.prelude("    ")
    L += ["    for t in range(t0, t1):", "        grp = t // C", "        c = t - grp * C",
          f"        dyw = bp[{ph.planes} * Lq:{ph.planes} * Lq + P]"]
    L += [f"        s{q}_{k} = zero" for q in range(M) for k in range(T)]
    L += ["        for n in range(grp * per, min(N, grp * per + per)):", "            src = x[n, c]"]
    L += ph.fill("src", 0, "            ") + _views(ph, [(0, 0)], "            ")
    for q in range(M):
        L += [f"            dq = dy[n, c * {M} + {q}]", "            for i in range(Ho):",
              "                dr = dyw[i * Wq:i * Wq + Wq]", "                sr = dq[i]",
              "                for j in range(Wo):", "                    dr[j] = sr[j]",
              "                for j in range(Wo, Wq):", "                    dr[j] = 0",
              "            for p in range(P):", "                e = dyw[p]"]
        L += [f"                s{q}_{k} += e * x0_{k}[p]" for k in range(T)]
    for q in range(M):
        L += [f"        pk = part[grp, c * {M} + {q}]"] + [f"        pk[{k}] = s{q}_{k}" for k in range(T)]
    return "\n".join(L) + "\n"


# --------------------------------------------------------------------------------------------------
# running them
# --------------------------------------------------------------------------------------------------

_KERNELS: dict = {}
_MAKERS = {"fwd": gen_forward, "dx": gen_grad_input, "dw": gen_grad_weights}


def kernel_for(kind, ph: Phases, M: int):
    """The generated kernel of `kind` ("fwd", "dx", "dw") for these literals (taps, strides, M): one
    kernel for every plane size and padding."""
    key = (kind, M) + ph.literal_key()
    k = _KERNELS.get(key)
    if k is None:
        # short rows gain from a masked remainder iteration; strided (interleaved) loads and stores lose
        # (masked, they become gathers) and so do the long dot products of dW
        predicate = kind != "dw" and (ph.sw, ph.uw) == (1, 1)
        k = _KERNELS[key] = load_kernel(_MAKERS[kind](ph, M), predicate=predicate)
    return k


def _bounds(act, dtype):
    lo, hi = act if act is not None else (None, None)
    return np.array([-np.inf if lo is None else lo, np.inf if hi is None else hi], dtype)


def _buffer(tag, length, dtype):
    """One scratch row per thread (acc[k]: thread k's; threads.parallel_for's k)."""
    return list(scratch(tag, (numba.config.NUMBA_NUM_THREADS, max(1, length)), dtype))


def _threads(g: Geometry):
    """1 for a call too small to share between threads (a parallel call on Python threads costs 20-40
    us), else None (Numba's thread count)."""
    return 1 if 2 * g.N * g.K * g.Ho * g.Wo * g.T < direct.TINY_CALL_FLOPS else None


def bind_forward(x_shape, w_shape, stride, pads, dilation, dtype, act=None):
    """``run(x, w, b, y)``: y = clip(depthwise conv(x, w) + b) into the caller's C-contiguous y (b may be
    None); act = (lo, hi) clip bounds (None on a side: unbounded; (0, None) is ReLU)."""
    g = Geometry(x_shape, w_shape, stride, pads, dilation)
    dtype = np.dtype(dtype)
    ph = fwd_phases(g)
    kern = kernel_for("fwd", ph, g.M)
    buf = _buffer("dw_fwd", ph.L + ph.P, dtype)
    bounds = _bounds(act, dtype)
    nob = np.zeros(g.K, dtype)
    threads = _threads(g)

    def run(x, w, b, y):
        args = (np.ascontiguousarray(x, dtype), np.ascontiguousarray(w, dtype).reshape(g.K, g.T),
                nob if b is None else np.ascontiguousarray(b, dtype), y, bounds, ph.geo)
        run_generated(kern, args, dtype, g.N * g.C, buf, threads)
    run.geometry, run.kernel = g, kern
    return run


def bind_grad_input(x_shape, w_shape, stride, pads, dilation, dtype):
    """``run(dy, w, dx)``: dL/dX (N, C, H, W) of the depthwise conv of an x_shape input, into the
    caller's C-contiguous dx."""
    g = Geometry(x_shape, w_shape, stride, pads, dilation)
    dtype = np.dtype(dtype)
    ph = dx_phases(g)
    kern = kernel_for("dx", ph, g.M)
    buf = _buffer("dw_dx", g.M * ph.L + ph.P, dtype)
    threads = _threads(g)

    def run(dy, w, dx):
        wr = np.ascontiguousarray(np.asarray(w, dtype)[:, :, ::-1, ::-1]).reshape(g.K, g.T)
        run_generated(kern, (np.ascontiguousarray(dy, dtype), wr, dx, ph.geo), dtype, g.N * g.C, buf, threads)
    run.geometry, run.kernel = g, kern
    return run


def bind_grad_weights(x_shape, w_shape, stride, pads, dilation, dtype):
    """``run(x, dy, dw)``: dL/dW (K, 1, KH, KW) of the depthwise conv into the caller's C-contiguous dw."""
    g = Geometry(x_shape, w_shape, stride, pads, dilation)
    dtype = np.dtype(dtype)
    ph = fwd_phases(g)
    kern = kernel_for("dw", ph, g.M)
    buf = _buffer("dw_dw", ph.L + ph.P, dtype)
    nt = numba.config.NUMBA_NUM_THREADS
    groups = max(1, min(g.N, -(-4 * nt // g.C)))          # enough tasks for every thread
    per = -(-g.N // groups)
    groups = -(-g.N // per)
    part = np.empty((groups, g.K, g.T), dtype) if groups > 1 else None
    threads = _threads(g)

    def run(x, dy, dw):
        args = (np.ascontiguousarray(x, dtype), np.ascontiguousarray(dy, dtype),
                dw.reshape(1, g.K, g.T) if part is None else part, per, ph.geo)
        run_generated(kern, args, dtype, groups * g.C, buf, threads)
        if part is not None:
            dw.reshape(g.K, g.T)[...] = part.sum(axis=0, dtype=np.float64)
    run.geometry, run.kernel = g, kern
    return run
