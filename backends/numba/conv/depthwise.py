"""Depthwise convolution (groups == C, K = M * C filters, M per input channel): a per-channel stencil.

A depthwise layer does 2 * KH * KW flops per output element, so it is bound by memory, not arithmetic:
no GEMM, no im2col. Each kernel is generated per shape (every size, stride, dilation and padding a
literal; the taps unrolled with the weights in scalars) and runs one prange task per (image, channel)
plane, so the input is read once and the output written once:

- the task copies its input plane, zero-padded, into a per-thread buffer (L1/L2-resident) as
  ``sh * sw`` *phase planes* (phase (a, b) holds the padded rows a, a + sh, ... and columns b, b + sw,
  ...), so every tap of a strided, dilated filter reads a contiguous run of one phase plane: tap
  (kh, kw) reads phase ((kh*dh) % sh, (kw*dw) % sw) at row offset (kh*dh) // sh, column offset
  (kw*dw) // sw, and output row i, column j at i * Wq + j of it;
- forward: y = act(sum of taps + bias), vectorised along output rows, the activation (ReLU, ReLU6 or
  any clip to [lo, hi], NaN passing through like torch's clamp) in the epilogue;
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

    def key(self):
        return (self.N, self.C, self.M, self.H, self.W, self.KH, self.KW, self.sh, self.sw, self.dh, self.dw,
                self.pt, self.pb, self.pl, self.pr)


# --------------------------------------------------------------------------------------------------
# phase planes: where each tap reads
# --------------------------------------------------------------------------------------------------

class Phases:
    """Phase planes of a source plane (h, w) placed at row ot, column ol of a zero plane, possibly
    upsampled by (uh, uw) (dL/dX: stride holes), read with stride (sh, sw) and dilation (dh, dw) by a
    KH x KW filter producing Ho x Wo outputs. Each phase plane is Hq x Wq plus a zero tail of ``tail``
    elements (the wide-row reads of dL/dW run past the last row)."""

    def __init__(self, h, w, ot, ol, uh, uw, sh, sw, dh, dw, KH, KW, Ho, Wo):
        self.h, self.w, self.ot, self.ol, self.uh, self.uw = h, w, ot, ol, uh, uw
        self.sh, self.sw = sh, sw
        self.Hq = -(-((Ho - 1) * sh + (KH - 1) * dh + 1) // sh)
        self.Wq = -(-((Wo - 1) * sw + (KW - 1) * dw + 1) // sw)
        self.tail = (KW - 1) * dw // sw
        self.Lq = self.Hq * self.Wq + self.tail
        self.L = sh * sw * self.Lq
        self.offsets = [((kh * dh) % sh * sw + (kw * dw) % sw) * self.Lq + (kh * dh) // sh * self.Wq + (kw * dw) // sw
                        for kh in range(KH) for kw in range(KW)]

    def fill(self, src, base, ind):
        """Source lines placing plane `src` (a 2-D array expression) at bp[base:]."""
        if self.uh == 1 and self.uw == 1:
            return self._fill_phases(src, base, ind)
        return self._fill_upsampled(src, base, ind)

    def _valid(self, n_out, n_src, stride, phase, off, up):
        """Range [lo, hi) of phase-plane indices q whose padded coordinate q*stride + phase - off is a
        source index (up == 1)."""
        lo = max(0, -(-(off - phase) // stride))
        hi = min(n_out, (n_src - 1 + off - phase) // stride + 1)
        return lo, max(lo, hi)

    def _fill_phases(self, src, base, ind):
        L, Wq = [], self.Wq
        a = L.append
        for pa in range(self.sh):
            r0, r1 = self._valid(self.Hq, self.h, self.sh, pa, self.ot, 1)
            for pb in range(self.sw):
                c0, c1 = self._valid(Wq, self.w, self.sw, pb, self.ol, 1)
                o = base + (pa * self.sw + pb) * self.Lq
                a(f"{ind}ph = bp[{o}:{o + self.Lq}]")
                a(f"{ind}for q in range({r0 * Wq}):")
                a(f"{ind}    ph[q] = 0")
                if c1 > c0:
                    a(f"{ind}for ii in range({r0}, {r1}):")
                    a(f"{ind}    pr = ph[ii * {Wq}:]")
                    a(f"{ind}    sr = {src}[ii * {self.sh} + {pa - self.ot}]")
                    if c0:
                        a(f"{ind}    for jj in range({c0}):")
                        a(f"{ind}        pr[jj] = 0")
                    col = f"jj * {self.sw} + {pb - self.ol}" if self.sw > 1 else f"jj + {pb - self.ol}"
                    a(f"{ind}    for jj in range({c0}, {c1}):")
                    a(f"{ind}        pr[jj] = sr[{col}]")
                    if c1 < Wq:
                        a(f"{ind}    for jj in range({c1}, {Wq}):")
                        a(f"{ind}        pr[jj] = 0")
                    a(f"{ind}for q in range({r1 * Wq}, {self.Lq}):")
                else:
                    a(f"{ind}for q in range({r0 * Wq}, {self.Lq}):")
                a(f"{ind}    ph[q] = 0")
        return L

    def _fill_upsampled(self, src, base, ind):
        # one phase plane (stride 1): zeros, then every source element at (i*uh + ot, j*uw + ol)
        L, Wq = [], self.Wq
        a = L.append
        i0 = max(0, -(-(-self.ot) // self.uh))
        i1 = min(self.h, (self.Hq - 1 - self.ot) // self.uh + 1)
        j0 = max(0, -(-(-self.ol) // self.uw))
        j1 = min(self.w, (Wq - 1 - self.ol) // self.uw + 1)
        a(f"{ind}ph = bp[{base}:{base + self.Lq}]")
        a(f"{ind}for q in range({self.Lq}):")
        a(f"{ind}    ph[q] = 0")
        if i1 > i0 and j1 > j0:
            a(f"{ind}for i in range({i0}, {i1}):")
            a(f"{ind}    pr = ph[(i * {self.uh} + {self.ot}) * {Wq} + {self.ol}:]")
            a(f"{ind}    sr = {src}[i]")
            a(f"{ind}    for j in range({j0}, {j1}):")
            a(f"{ind}        pr[j * {self.uw}] = sr[j]")
        return L


def fwd_phases(g: Geometry) -> Phases:
    return Phases(g.H, g.W, g.pt, g.pl, 1, 1, g.sh, g.sw, g.dh, g.dw, g.KH, g.KW, g.Ho, g.Wo)


def dx_phases(g: Geometry) -> Phases:
    eh, ew = (g.KH - 1) * g.dh, (g.KW - 1) * g.dw
    return Phases(g.Ho, g.Wo, eh - g.pt, ew - g.pl, g.sh, g.sw, 1, 1, g.dh, g.dw, g.KH, g.KW, g.H, g.W)


# --------------------------------------------------------------------------------------------------
# generated kernels
# --------------------------------------------------------------------------------------------------

def _stencil(ph: Phases, planes, Ho, Wo, out, ind, epilogue):
    """Lines of a stencil over `planes` [(buffer base, weight prefix)] into the 2-D array `out` (with
    the epilogue: plus bias bq, clipped to [lo, hi]); a row view per row keeps the indices provably
    non-negative."""
    L = []
    a = L.append
    a(f"{ind}for i in range({Ho}):")
    a(f"{ind}    rw = bp[i * {ph.Wq}:]")
    a(f"{ind}    yr = {out}[i]")
    a(f"{ind}    for j in range({Wo}):")
    terms = [f"{wp}{t} * rw[j + {base + o}]" for base, wp in planes for t, o in enumerate(ph.offsets)]
    if epilogue:
        a(f"{ind}        v = bq + " + " + ".join(terms))
        a(f"{ind}        v = lo if v < lo else v")
        a(f"{ind}        yr[j] = hi if v > hi else v")
    else:
        a(f"{ind}        yr[j] = " + " + ".join(terms))
    return L


def _weights(wk, prefix, T, ind):
    return [f"{ind}{prefix}{t} = {wk}[{t}]" for t in range(T)]


def gen_forward(g: Geometry) -> str:
    """``kernel(x, w, b, y, buf, act)``: y (N, K, Ho, Wo) = clip(depthwise(x, w) + b, act[0], act[1]);
    w (K, KH*KW), b (K,), buf (threads, L) scratch, act (2,) the clip bounds (+-inf: none)."""
    ph = fwd_phases(g)
    L = [HEADER, f"@njit(parallel=True, fastmath={FASTMATH}, cache=True, nogil=True)",
         "def kernel(x, w, b, y, buf, act):", "    lo = act[0]", "    hi = act[1]",
         f"    for t in prange(x.shape[0] * {g.C}):",
         f"        n = t // {g.C}", f"        c = t - n * {g.C}", "        bp = buf[numba.get_thread_id()]"]
    L += ph.fill("x[n, c]", 0, "        ")
    L += [f"        for q in range({g.M}):", f"            k = c * {g.M} + q", "            wk = w[k]",
          "            bq = b[k]"]
    L += _weights("wk", "w", g.T, "            ")
    L += _stencil(ph, [(0, "w")], g.Ho, g.Wo, "y[n, k]", "            ", True)
    return "\n".join(L) + "\n"


def gen_grad_input(g: Geometry) -> str:
    """``kernel(dy, wr, dx, buf)``: dx (N, C, H, W) of the depthwise conv; wr (K, KH*KW) the filters
    rotated by 180 degrees; the M dy planes of a channel are placed side by side in buf."""
    ph = dx_phases(g)
    L = [HEADER, f"@njit(parallel=True, fastmath={FASTMATH}, cache=True, nogil=True)",
         "def kernel(dy, wr, dx, buf):",
         f"    for t in prange(dy.shape[0] * {g.C}):",
         f"        n = t // {g.C}", f"        c = t - n * {g.C}", "        bp = buf[numba.get_thread_id()]"]
    for q in range(g.M):
        L += ph.fill(f"dy[n, c * {g.M} + {q}]", q * ph.L, "        ")
        L += _weights(f"wr[c * {g.M} + {q}]", f"w{q}_", g.T, "        ")
    L += _stencil(ph, [(q * ph.L, f"w{q}_") for q in range(g.M)], g.H, g.W, "dx[n, c]", "        ", False)
    return "\n".join(L) + "\n"


def gen_grad_weights(g: Geometry) -> str:
    """``kernel(x, dy, part, buf, per)``: part (NG, K, KH*KW) gets, per group of `per` images, the sums
    of dy x input over the output planes (the caller sums over groups); buf (threads, L + Ho*Wq)."""
    ph = fwd_phases(g)
    Wq, T, M = ph.Wq, g.T, g.M
    wide = g.Ho * Wq
    L = [HEADER, f"@njit(parallel=True, fastmath={FASTMATH}, cache=True, nogil=True)",
         "def kernel(x, dy, part, buf, per):", "    N = x.shape[0]", "    zero = part.dtype.type(0)",
         f"    for t in prange(part.shape[0] * {g.C}):",
         f"        grp = t // {g.C}", f"        c = t - grp * {g.C}", "        bp = buf[numba.get_thread_id()]",
         f"        dyw = bp[{ph.L}:{ph.L + wide}]"]
    L += [f"        s{q}_{k} = zero" for q in range(M) for k in range(T)]
    L += ["        for n in range(grp * per, min(N, grp * per + per)):"]
    L += ph.fill("x[n, c]", 0, "            ")
    for q in range(M):
        L += [f"            dq = dy[n, c * {M} + {q}]", f"            for i in range({g.Ho}):",
              f"                dr = dyw[i * {Wq}:]", "                sr = dq[i]",
              f"                for j in range({g.Wo}):", "                    dr[j] = sr[j]"]
        if Wq > g.Wo:
            L += [f"                for j in range({g.Wo}, {Wq}):", "                    dr[j] = 0"]
        # views starting at each tap's offset: the loop index alone indexes them (vectorises)
        L += [f"            xt{k} = bp[{o}:{o + wide}]" for k, o in enumerate(ph.offsets)]
        L += [f"            for p in range({wide}):", "                e = dyw[p]"]
        L += [f"                s{q}_{k} += e * xt{k}[p]" for k in range(T)]
    for q in range(M):
        L += [f"        pk = part[grp, c * {M} + {q}]"] + [f"        pk[{k}] = s{q}_{k}" for k in range(T)]
    return "\n".join(L) + "\n"


# --------------------------------------------------------------------------------------------------
# running them
# --------------------------------------------------------------------------------------------------

_KERNELS: dict = {}


def kernel_for(kind, g: Geometry):
    """The generated kernel of `kind` ("fwd", "dx", "dw") for this geometry (batch size aside)."""
    key = (kind,) + g.key()[1:]
    k = _KERNELS.get(key)
    if k is None:
        make = {"fwd": gen_forward, "dx": gen_grad_input, "dw": gen_grad_weights}[kind]
        # long dot products (dW) are faster without a masked remainder iteration
        k = _KERNELS[key] = load_kernel(make(g), predicate=kind != "dw")
    return k


def _bounds(act, dtype):
    lo, hi = act if act is not None else (None, None)
    return np.array([-np.inf if lo is None else lo, np.inf if hi is None else hi], dtype)


def _buffer(tag, length, dtype):
    return scratch(tag, (numba.config.NUMBA_NUM_THREADS, max(1, length)), dtype)


def bind_forward(x_shape, w_shape, stride, pads, dilation, dtype, act=None):
    """``run(x, w, b, y)``: y = clip(depthwise conv(x, w) + b) into the caller's C-contiguous y (b may be
    None); act = (lo, hi) clip bounds (None on a side: unbounded; (0, None) is ReLU)."""
    g = Geometry(x_shape, w_shape, stride, pads, dilation)
    dtype = np.dtype(dtype)
    kern = kernel_for("fwd", g)
    buf = _buffer("dw_fwd", fwd_phases(g).L, dtype)
    bounds = _bounds(act, dtype)
    nob = np.zeros(g.K, dtype)

    def run(x, w, b, y):
        args = (np.ascontiguousarray(x, dtype), np.ascontiguousarray(w, dtype).reshape(g.K, g.T),
                nob if b is None else np.ascontiguousarray(b, dtype), y, buf, bounds)
        run_generated(kern, args, dtype)
    run.geometry = g
    return run


def bind_grad_input(x_shape, w_shape, stride, pads, dilation, dtype):
    """``run(dy, w, dx)``: dL/dX (N, C, H, W) of the depthwise conv of an x_shape input, into the
    caller's C-contiguous dx."""
    g = Geometry(x_shape, w_shape, stride, pads, dilation)
    dtype = np.dtype(dtype)
    kern = kernel_for("dx", g)
    buf = _buffer("dw_dx", g.M * dx_phases(g).L, dtype)

    def run(dy, w, dx):
        wr = np.ascontiguousarray(np.asarray(w, dtype)[:, :, ::-1, ::-1]).reshape(g.K, g.T)
        run_generated(kern, (np.ascontiguousarray(dy, dtype), wr, dx, buf), dtype)
    run.geometry = g
    return run


def bind_grad_weights(x_shape, w_shape, stride, pads, dilation, dtype):
    """``run(x, dy, dw)``: dL/dW (K, 1, KH, KW) of the depthwise conv into the caller's C-contiguous dw."""
    g = Geometry(x_shape, w_shape, stride, pads, dilation)
    dtype = np.dtype(dtype)
    kern = kernel_for("dw", g)
    ph = fwd_phases(g)
    buf = _buffer("dw_dw", ph.L + g.Ho * ph.Wq, dtype)
    nt = numba.config.NUMBA_NUM_THREADS
    groups = max(1, min(g.N, -(-4 * nt // g.C)))          # enough tasks for every thread
    per = -(-g.N // groups)
    groups = -(-g.N // per)
    part = np.empty((groups, g.K, g.T), dtype) if groups > 1 else None

    def run(x, dy, dw):
        args = (np.ascontiguousarray(x, dtype), np.ascontiguousarray(dy, dtype),
                dw.reshape(1, g.K, g.T) if part is None else part, buf, per)
        run_generated(kern, args, dtype)
        if part is not None:
            dw.reshape(g.K, g.T)[...] = part.sum(axis=0, dtype=np.float64)
    run.geometry = g
    return run
