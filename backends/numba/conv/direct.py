"""The direct conv strategy: kernels generated per shape (gen.py) over zero-padded flat planes.

Exact shape constants, the filter taps unrolled with the weights held in scalars, each zero-padded
input plane read as one flat vector of "wide rows", each task (threads.parallel_for) computing a block of
output channels of one image, bias/ReLU/max-pool (and the route) fused into the epilogue. dL/dX is the same
forward kernel on the (dilated, padded) output gradient with rotated filters; dL/dW is its own
generated reduction (partial sums per group of images, then summed; for one input channel it reads
dy in place). Strides > 1 become stride-1 convolutions by space-to-depth (input phases become
channels). ``$GRAPHC_NUMBA_VECTOR_WIDTH``: the loop-vectoriser width forced on these kernels (default
16 floats on AVX-512 hosts, 0 = LLVM's own choice, which is 8 floats on Intel cores).
"""
from __future__ import annotations

import contextlib
import os
import sys

import numba
import numpy as np

from graphc.backends.kernel_cache import aligned_empty, load_generated
from graphc.backends.numba.conv import channels, gen, winograd
from graphc.backends.numba.conv.layout import (new_or, out_hw, place, place_rows, place_t, pool_hw, scratch,
                                              shift_copies, sum_partials)
from graphc.backends.numba.precompile import compile_for
from graphc.backends.numba.threads import num_threads, parallel_for


def _codegen_tag(predicate: bool) -> str:
    return (f"# codegen: force-vector-width f32={forced_vector_width(np.float32)} "
            f"f64={forced_vector_width(np.float64)}, predicate-tail={int(bool(predicate))}\n")


def load_kernel(src: str, predicate: bool = True):
    """The ``kernel`` of a generated conv module (kernel_cache.load_generated).  The LLVM options it
    will be compiled with are written into the text (so into the file name): Numba's cache cannot
    see them, and machine code compiled under other options must not be picked up."""
    k = load_generated(_codegen_tag(predicate) + src, "graphc_kernel_")
    if not hasattr(k, "_graphc_ready"):
        k._graphc_predicate = bool(predicate)
        k._graphc_ready = set()
    return k


def host_has_avx512() -> bool:
    if numba.config.CPU_NAME or numba.config.CPU_FEATURES:
        return False              # compiling for another CPU: leave LLVM's choices alone
    try:
        import llvmlite.binding as llvm
        feats = llvm.get_host_cpu_features()
        return bool(feats.get("avx512f", False))
    except Exception:  # pragma: no cover
        return False


_AVX512 = host_has_avx512()


def forced_vector_width(dtype) -> int:
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


def ensure_compiled(kern, args, dtype) -> bool:
    """Makes sure a generated kernel has machine code for these argument types, compiled under the
    wide-vector options when none is loaded yet (Numba's disk cache answers when it can); False
    while a kernel discovery records it instead (backends/numba/precompile.py).

    The arguments are this module's own C-contiguous work arrays (plus flags and task bounds), so
    their types follow from the dtype; after the first call the type check is skipped (a caller's
    read-only or unaligned array would make Numba compile one more specialisation, without the
    options)."""
    key = np.dtype(dtype).char
    ready = kern._graphc_ready
    if key in ready:
        return True
    sig = tuple(numba.typeof(a) for a in args)
    if not compile_for(kern, sig, ("vector", forced_vector_width(dtype), kern._graphc_predicate)):
        return False
    ready.add(key)
    return True


def run_generated(kern, args, dtype, ntasks, acc=None, threads=None):
    """Tasks 0..ntasks-1 of a generated kernel ``kern(*args[, acc[k]...], lo, hi)`` on Numba's thread
    count, or ``threads`` (threads.parallel_for; acc: a work array per thread, acc[k] for thread k, or a
    tuple of such arrays)."""
    work = () if acc is None else (acc if isinstance(acc, tuple) else (acc,))
    ensure_compiled(kern, tuple(args) + tuple(a[0] for a in work) + (0, 0), dtype)
    if not work:
        parallel_for(lambda lo, hi, k: kern(*args, lo, hi), ntasks, threads)
    else:
        parallel_for(lambda lo, hi, k: kern(*args, *(a[k] for a in work), lo, hi), ntasks, threads)


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


def _group_block(KB, Kg):
    """The largest block size <= KB dividing the Kg filters of a group (blocks never straddle groups)."""
    while Kg % KB:
        KB -= 1
    return KB


class FwdPlan:
    """Geometry of one direct stride-1 forward call over flat padded planes (C: input channels per group;
    taps dil = (dh, dw) apart)."""

    def __init__(self, K, C, KH, KW, Hp, Wp, Ho, Wo, dtype, epi, ps=0, pst=0, wlayout="blocked", groups=1,
                 dil=(1, 1), clip=None):
        self.K, self.C, self.KH, self.KW, self.Hp, self.Wp, self.Ho, self.Wo = K, C, KH, KW, Hp, Wp, Ho, Wo
        self.epi, self.ps, self.pst, self.wlayout, self.clip = epi, ps, pst, wlayout, clip
        self.groups, self.dil = groups, tuple(dil)
        self.kerns = {}
        T = KH * KW
        self.KB, self.CB = _pick_blocks(K, C, T)
        if groups > 1:
            self.KB = _group_block(self.KB, K // groups)
        if epi == "pool":
            self.Hq, self.Wq = pool_hw(Ho, Wo, ps, pst, "conv2d_relu_maxpool")
            rows = (self.Hq - 1) * pst + ps
            cols = (self.Wq - 1) * pst + ps
        else:
            self.Hq = self.Wq = 0
            rows, cols = Ho, Wo
        VL = _vec_len(dtype)
        self.PL = gen.round_up((rows - 1) * Wp + cols, VL)
        self.maxoff = (KH - 1) * self.dil[0] * Wp + (KW - 1) * self.dil[1]
        self.Lx = gen.round_up(max(Hp * Wp, self.PL + self.maxoff), VL)
        self.NKB = -(-K // self.KB)
        # an accumulator row as long as the inference pool loop reads (whole vectors: past PL)
        self.acc_len = self.PL if epi != "pool" else gen.pool_acc_len(self.PL, ps, pst, self.Hq, self.Wq, Wp)

    def acc_shape(self, dtype):
        """One accumulator block per thread (threads.parallel_for's k is below NUMBA_NUM_THREADS); rows
        padded by 128 bytes and each block cache-line aligned: two threads writing the two ends of one
        cache line made the kernel slower on 2 threads than on 1 (false sharing)."""
        return numba.config.NUMBA_NUM_THREADS, self.KB, self.acc_len + 128 // np.dtype(dtype).itemsize

    def work(self, dtype, alloc):
        """The per-thread work arrays the kernel takes after ``flag``, each made by ``alloc(name, shape)``:
        (acc,), and for epi "pool" (acc, pw): pw (threads, pooled wide rows), the inference pool's."""
        acc = alloc("fwd_acc", self.acc_shape(dtype))
        if self.epi != "pool":
            return (acc,)
        n = gen.pool_loop_len(self.Hq, self.Wq, self.Wp)
        return acc, alloc("fwd_pw", (numba.config.NUMBA_NUM_THREADS, n + 128 // np.dtype(dtype).itemsize))

    def source(self, route=True):
        return gen.gen_conv_fwd(C=self.C, KB=self.KB, NKB=self.NKB, K=self.K, KH=self.KH, KW=self.KW,
                                 Wp=self.Wp, PL=self.PL, CB=self.CB, epi=self.epi, Ho=self.Ho, Wo=self.Wo,
                                 ps=self.ps, pst=self.pst, Hq=self.Hq, Wq=self.Wq,
                                 **({} if self.wlayout == "blocked" else {"wlayout": self.wlayout}),
                                 **({} if (self.groups, self.dil) == (1, (1, 1)) else
                                    {"groups": self.groups, "dil": self.dil}),
                                 **({} if self.clip is None else {"clip": self.clip}),
                                 **({} if route or self.epi != "pool" else {"route": False}))

    def kernel(self, flag):
        """The generated kernel of a call with this flag: for epi "pool" one saving the route (flag) and
        one not, each loaded on first use; for epi "store" one (flag: ReLU, at run time)."""
        key = bool(flag) or self.epi != "pool"
        k = self.kerns.get(key)
        if k is None:
            k = self.kerns[key] = load_kernel(self.source(route=key))
        return k

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
OWN_PLANES_MAX = 1 << 20      # bytes: a prebound forward's padded input planes up to this size are its own
TINY_CALL_FLOPS = 5e6         # a forward call below this runs on the calling thread (MNIST's batch-1 layers,
                              # 10-30 us: no faster on two threads than on one)


def fwd_plan(K, C, KH, KW, Hp, Wp, Ho, Wo, dtype, epi, ps=0, pst=0, wlayout="blocked", groups=1,
             dil=(1, 1), clip=None) -> FwdPlan:
    """The (memoised) plan of a direct forward call (its kernels: plan.kernel(flag))."""
    key = (K, C, KH, KW, Hp, Wp, Ho, Wo, np.dtype(dtype).str, epi, ps, pst, wlayout, groups, tuple(dil), clip)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = FwdPlan(K, C, KH, KW, Hp, Wp, Ho, Wo, dtype, epi, ps, pst, wlayout, groups, dil,
                                     clip)
    return plan


def _run_planes(xb, plan: FwdPlan, w1, b, relu=False, save_route=False, out=None):
    """Run the generated forward kernel on padded flat planes xb (N, C, plan.Lx), into out (y) when given."""
    N = xb.shape[0]
    dtype = xb.dtype
    if plan.epi == "pool":
        y = new_or(out, (N, plan.K, plan.Hq, plan.Wq), dtype)
        route = np.empty(y.shape if save_route else (1, 1, 1, 1), np.int32)
    else:
        y = new_or(out, (N, plan.K, plan.Ho, plan.Wo), dtype)
        route = np.empty((1, 1, 1, 1), np.int32)
    flag = bool(save_route) if plan.epi == "pool" else bool(relu)
    work = plan.work(dtype, lambda name, shape: scratch(name, shape, dtype))
    run_generated(plan.kernel(flag), (xb, plan.weights(w1), plan.bias(b, dtype), y, route, flag), dtype,
                  N * plan.NKB, work)
    return y, route


def _space_to_depth(x, w, stride, pads):
    """Stride-s correlation -> stride-1 correlation: returns padded phases xs (N, C*s*s, Hq, Wq) and
    weights ws (K, C*s*s, ceil(KH/s), ceil(KW/s)) with phase (a, b) of channel c at c*s*s + a*s + b."""
    s = stride
    N, C, H, W = x.shape
    K, Cw, KH, KW = w.shape
    top, bottom, left, right = pads
    Ho, Wo = out_hw(H, W, KH, KW, s, pads)
    KHq, KWq = -(-KH // s), -(-KW // s)
    Hq, Wq = Ho + KHq - 1, Wo + KWq - 1
    xp = np.zeros((N, C, Hq * s, Wq * s), x.dtype)
    h = min(H, Hq * s - top)
    ww = min(W, Wq * s - left)
    xp[:, :, top:top + h, left:left + ww] = x[:, :, :h, :ww]
    xs = xp.reshape(N, C, Hq, s, Wq, s).transpose(0, 1, 3, 5, 2, 4).reshape(N, C * s * s, Hq, Wq)
    wpad = np.zeros((K, Cw, KHq * s, KWq * s), w.dtype)
    wpad[:, :, :KH, :KW] = w
    ws = wpad.reshape(K, Cw, KHq, s, KWq, s).transpose(0, 1, 3, 5, 2, 4).reshape(K, Cw * s * s, KHq, KWq)
    return np.ascontiguousarray(xs), np.ascontiguousarray(ws), (Ho, Wo)


def _row_split(xs, ws, Ho, epi, ps, pst, groups):
    """(flat planes, plan, weights) of a stride-1 conv with KH x KW taps run as one with 1 x KW taps over
    KH times the channels: channel c*KH + kh is input channel c moved up kh rows, copied once straight
    into the kernel's flat planes. The kernel holds KB*CB*KH*KW weights in registers; over 9 taps it
    takes one output channel per pass, each loaded input vector feeding one FMA: ResNet's 7x7/2 first
    layer (4x4 taps after space-to-depth) ran 1.59 ms at batch 1 and 25.3 at 16, as 12 x 4 channels of
    1x4 taps 1.08 and 17.5 (the forward alone, the two alternating in one process)."""
    N, C, _, Wq = xs.shape
    K, _, KH, KW = ws.shape
    Wo = Wq - KW + 1
    plan = fwd_plan(K, C * KH, 1, KW, Ho, Wq, Ho, Wo, xs.dtype, epi, ps, pst, groups=groups)
    xb = scratch("fwd_x", (N, C * KH, plan.Lx), xs.dtype)
    # numpy copies of whole shifted planes (xs is padded already): with place_rows, 20.2 ms instead of 17.2 at 16
    for kh in range(KH):
        xb[:, kh::KH, :Ho * Wq] = xs[:, :, kh:kh + Ho].reshape(N, C, Ho * Wq)
    xb[:, :, Ho * Wq:] = 0
    return xb, plan, ws.reshape(K, C * KH, 1, KW)


ROW_SPLIT_TAPS = 9          # a strided conv with more taps than this after space-to-depth is row-split
ROW_SPLIT_CHANNELS = 16     # ... and a stride-1 one of at least this many input and output channels (LeNet-5's
                            # 6 -> 16 channel 5x5 conv was slower split: its training step 2.4 -> 2.9 ms)


def _splits_rows(K, C, KH, KW, groups, dil):
    """Whether a stride-1 direct conv (K filters over C channels per group) runs with its filter rows as
    channels: the kernel would take one output channel per pass, and there are enough channels."""
    return (groups == 1 and tuple(dil) == (1, 1) and KH > 1 and min(K, C) >= ROW_SPLIT_CHANNELS
            and _pick_blocks(K, C, KH * KW)[0] == 1)


def dense_filter(w, dil):
    """A dilated filter bank as an undilated one of its extent, zeros between the taps."""
    if tuple(dil) == (1, 1):
        return w
    K, C, KH, KW = w.shape
    wd = np.zeros((K, C, (KH - 1) * dil[0] + 1, (KW - 1) * dil[1] + 1), w.dtype)
    wd[:, :, ::dil[0], ::dil[1]] = w
    return wd


def forward(x, w, b, stride, pads, epi, relu=False, ps=0, pst=0, save_route=False, dil=(1, 1), groups=1,
            out=None):
    N, C, H, W = x.shape
    K = w.shape[0]
    if epi == "store" and channels.applies(x.shape, w.shape, stride, pads, dil, groups, x.dtype):
        return channels.forward(x, w, b, stride, pads, relu, dil, out), np.empty((1, 1, 1, 1), np.int32)
    if stride > 1:           # a dilated filter becomes a sparse dense one: its phases are not dilated
        xs, ws, (Ho, Wo) = _space_to_depth(x, dense_filter(w, dil), stride, pads)
        if groups == 1 and ws.shape[2] > 1 and ws.shape[2] * ws.shape[3] > ROW_SPLIT_TAPS:
            xb, plan, w1 = _row_split(xs, ws, Ho, epi, ps, pst, groups)
            return _run_planes(xb, plan, w1, b, relu=relu, save_route=save_route, out=out)
        x1, w1, p1, d1 = xs, ws, (0, 0, 0, 0), (1, 1)
    else:
        Ho, Wo = out_hw(H, W, (w.shape[2] - 1) * dil[0] + 1, (w.shape[3] - 1) * dil[1] + 1, 1, pads)
        x1, w1, p1, d1 = x, w, pads, tuple(dil)
    top, bottom, left, right = p1
    Hp, Wp = x1.shape[2] + top + bottom, x1.shape[3] + left + right
    plan = fwd_plan(K, w1.shape[1], w1.shape[2], w1.shape[3], Hp, Wp, Ho, Wo, x.dtype, epi, ps, pst,
                    groups=groups, dil=d1)
    maxoff = plan.maxoff
    if p1 == (0, 0, 0, 0) and plan.PL + maxoff <= Hp * Wp and x1.flags.writeable and x1.flags.aligned:
        # the kernel's reads stay inside each image plane: read x where it lies
        xb = x1.reshape(N, x1.shape[1], Hp * Wp)
    else:
        xb = scratch("fwd_x", (N, x1.shape[1], plan.Lx), x.dtype)
        place(x1, xb, Hp, Wp, 1, top, left)
    return _run_planes(xb, plan, w1, b, relu=relu, save_route=save_route, out=out)


def _filters_and_bias(w, b, memo, dtype, w3shape, nob):
    """(w as (K, C, T), b) for a prebound call: views of the same arrays as last call are reused (params
    and planned buffers are the same objects every run; a view follows in-place updates); copies are
    never remembered (memo[0:2]: w and its view, memo[4]: b)."""
    if w is memo[0]:
        w3 = memo[1]
    elif w.dtype == dtype and w.flags.c_contiguous:
        w3 = w.reshape(w3shape)
        memo[0], memo[1] = w, w3
    else:
        w3 = np.ascontiguousarray(w, dtype).reshape(w3shape)
    if b is None:
        return w3, nob
    if b is not memo[4]:
        if b.dtype == dtype and b.ndim == 1 and b.flags.c_contiguous:
            memo[4] = b
        else:
            b = np.ascontiguousarray(b, dtype).reshape(-1)
    return w3, b


def _as_planes(x, memo, shape, dtype):
    """x as its (N, C, L) planes without a copy (memo[2:4]: the last such x and its view), or None where
    the kernels cannot read it as it is (not C-contiguous, aligned and writeable of dtype: a read-only or
    unaligned array would make Numba compile another specialisation, without the codegen options)."""
    if x is memo[2]:
        return memo[3]
    fl = x.flags
    if fl.c_contiguous and fl.aligned and fl.writeable and x.dtype == dtype:
        memo[2], memo[3] = x, x.reshape(shape)
        return memo[3]
    return None


def _bound_plan(K, Cg, KH, KW, Hp, Wp, Ho, Wo, dtype, epi, ps, pst, groups, dil, clip):
    """(plan, rows) of a prebound forward: rows = KH where a filter the kernel would take one output channel
    per pass (over 9 taps) runs with its rows as channels (AlexNet's 5x5 conv2 at batch 8, 29.8 -> 22.2 ms;
    its inference step 98 -> 90 ms), else 1."""
    if _splits_rows(K, Cg, KH, KW, groups, dil):
        return fwd_plan(K, Cg * KH, 1, KW, Ho, Wp, Ho, Wo, dtype, epi, ps, pst, wlayout="kct", clip=clip), KH
    return fwd_plan(K, Cg, KH, KW, Hp, Wp, Ho, Wo, dtype, epi, ps, pst, wlayout="kct", groups=groups, dil=dil,
                    clip=clip), 1


def bind_direct_fwd(x_shape, w_shape, has_bias, stride, pads, dtype, epi, pool=(0, 0), dil=(1, 1), groups=1,
                    clip=None, weights_version=None, channels_ok=True):
    """A prebound direct forward for one shape: ``run(x, w, b, y, route, flag)`` writes into the
    caller's ``y`` (N, K, Ho, Wo) or, for epi "pool", ``y`` (N, K, Hq, Wq) and (when flag) the int32
    ``route`` (shaped like y; any (1,1,1,1) int32 array otherwise); flag = ReLU for "store" (with
    ``clip`` = (lo, hi): the clip instead, MobileNet's ReLU6), save the route for "pool". Everything
    shape-dependent (plan, kernel, work arrays) is made here, once, so a call is the kernel and a few
    attribute checks (the per-call Python of conv2d -- checks, plan look-up, weight re-layout,
    allocations -- costs 20-35 us, more than a batch-1 MNIST layer).
    The kernel reads the filter bank where it lies (generated with ``wlayout="kct"``). y and route
    must be C-contiguous, aligned, writeable, of ``dtype``/int32; x, w, b of another dtype or
    layout are copied first. The geometries channels.py serves (store epilogue) run its kernel
    (channels.Binding) unless not ``channels_ok``; None where another needs more than a stride-1 kernel.

    ``weights_version``: a callable whose value changes whenever the filters' values may have changed
    (the executor's state version, for filters that are state); with it, calls without a route (on the
    calling thread) of the geometries winograd.py serves run its kernel (3x3 conv + ReLU + 2x2/2 pool,
    >= 8 input channels), the filters transformed again only when the version or the array changes."""
    dtype = np.dtype(dtype)
    N, C, H, W = (int(v) for v in x_shape)
    K, Cg, KH, KW = (int(v) for v in w_shape)
    pads, dil = tuple(int(p) for p in pads), tuple(int(d) for d in dil)
    clip = None if clip is None or epi != "store" else (float(clip[0]), float(clip[1]))
    xshape, ws = (N, C, H, W), (K, Cg, KH, KW)
    if channels_ok and epi == "store" and channels.applies(xshape, ws, int(stride), pads, dil, int(groups), dtype):
        return channels.Binding(xshape, ws, int(stride), pads, dil, dtype, clip, weights_version)
    if int(stride) != 1:
        return None
    top, bottom, left, right = pads
    Ho, Wo = out_hw(H, W, (KH - 1) * dil[0] + 1, (KW - 1) * dil[1] + 1, 1, pads)
    Hp, Wp = H + top + bottom, W + left + right
    ps, pst = (int(pool[0]), int(pool[1])) if epi == "pool" else (0, 0)
    plan, rows = _bound_plan(K, Cg, KH, KW, Hp, Wp, Ho, Wo, dtype, epi, ps, pst, int(groups), dil, clip)
    maxoff = plan.maxoff
    inplace = rows == 1 and pads == (0, 0, 0, 0) and plan.PL + maxoff <= Hp * Wp
    CP = C * rows                               # channels of the kernel's planes
    # the padded planes: small ones its own (no look-up per call), large ones in the shared work array
    # (one per conv held ~100 MB in ResNet-18 training at batch 16)
    own = not inplace and N * CP * plan.Lx * dtype.itemsize <= OWN_PLANES_MAX
    xb = aligned_empty((N, CP, plan.Lx), dtype) if own else None
    # work[k]: thread k's work arrays
    work = list(zip(*(list(a) for a in plan.work(dtype, lambda name, shape: aligned_empty(shape, dtype)))))
    ntasks = N * plan.NKB
    # the calling thread alone for a tiny call, else threads.parallel_for (a Numba-parallel variant's spinning
    # OpenMP workers stalled the next kernel's Python worker by up to 0.8 ms: MobileNetV2 b1 10.0 ms, not 7.8)
    flops = 2 * N * K * Cg * KH * KW * Ho * Wo
    tiny = flops < TINY_CALL_FLOPS
    nob = np.zeros(K, dtype)
    wino = None                 # [its WinogradPool, made at the first call that runs it] where it applies
    if weights_version is not None and rows == 1 and winograd.applies(Cg, KH, KW, dil, groups, epi, ps, pst, plan.Hq,
                                                                      plan.Wq, Wp, dtype.itemsize, K):
        wino = []
    w3shape = (K, Cg * rows, KH * KW // rows)

    memo = [None, None, None, None, None, None]     # w, its (K, C, T) view, x, its flat view, b, b
    ready = {}                                       # flag -> its kernel, compiled

    def placed(x):
        """x in the kernel's padded planes."""
        if x.dtype != dtype or not x.flags.writeable or not x.flags.aligned:
            x = np.array(x, dtype)
        xin = xb if xb is not None else scratch("fwd_x", (N, CP, plan.Lx), dtype)
        if rows == 1:
            place(x.reshape(xshape), xin, Hp, Wp, 1, top, left)
        else:                                   # plane c*KH + kh: the padded image moved up kh rows
            place_rows(x.reshape(xshape), xin, rows, Ho, Wp, 1, top, left)
        return xin

    def run(x, w, b, y, route, flag):
        w3, b = _filters_and_bias(w, b, memo, dtype, w3shape, nob)
        xin = None
        if inplace:
            xin = _as_planes(x, memo, (N, C, Hp * Wp), dtype)
            if xin is None:
                xin = np.ascontiguousarray(x, dtype).reshape(N, C, Hp * Wp).copy()
        flag = bool(flag)
        serial = tiny or num_threads() == 1       # (batch-1 inference: no parallel call in the way)
        if wino is not None and not flag and serial:
            if not wino:     # (its reads stay inside Hp x Wp planes: an unpadded image will do as it is)
                wino.append(winograd.WinogradPool(N, C, K, Hp, Wp, plan.Hq, plan.Wq, Hp * Wp, dtype))
            xw = xin if xin is not None or pads != (0, 0, 0, 0) else _as_planes(x, memo, (N, C, Hp * Wp), dtype)
            if xw is None:
                xw = xin = placed(x)
            if wino[0](xw, w3, b, y, weights_version):
                return
        if xin is None:
            xin = placed(x)
        kern = ready.get(flag)
        if kern is None:
            kern = plan.kernel(flag)
            if ensure_compiled(kern, (xin, w3, b, y, route, flag) + work[0] + (0, 0), dtype):
                ready[flag] = kern
        if serial:
            kern(xin, w3, b, y, route, flag, *work[0], 0, ntasks)
        else:
            parallel_for(lambda lo, hi, k: kern(xin, w3, b, y, route, flag, *work[k], lo, hi), ntasks)

    run.plan = plan
    run.winograd = wino
    return run


def grad_input(dy, w, stride, pads, in_hw, dil=(1, 1), groups=1, out=None):
    """dL/dX: stride-1 correlation of the (stride-dilated) output gradient, placed in planes of
    (H+EH-1) x (W+EW-1) (EH, EW: the dilated filter's extent), with the filters rotated by 180 degrees
    and in/out channels swapped within each group."""
    N, K, Ho, Wo = dy.shape
    _, Cg, KH, KW = w.shape
    H, W = in_hw
    top, _, left, _ = pads
    EH, EW = (KH - 1) * dil[0] + 1, (KW - 1) * dil[1] + 1
    Hb, Wb = H + EH - 1, W + EW - 1
    G, Kg = groups, K // groups
    wf = w[:, :, ::-1, ::-1].reshape(G, Kg, Cg, KH, KW).transpose(0, 2, 1, 3, 4)
    wf = np.ascontiguousarray(wf).reshape(G * Cg, Kg, KH, KW)
    if _splits_rows(G * Cg, Kg, KH, KW, G, dil):
        # the filter rows as channels, as the forward's (AlexNet's 5x5 conv2 at batch 8: 32.4 -> 27.7 ms)
        plan = fwd_plan(G * Cg, Kg * KH, 1, KW, H, Wb, H, W, dy.dtype, "store")
        buf = scratch("dx_dy", (N, K * KH, plan.Lx), dy.dtype)
        place_rows(dy, buf, KH, H, Wb, stride, EH - 1 - top, EW - 1 - left)
        return _run_planes(buf, plan, wf.reshape(G * Cg, Kg * KH, 1, KW), None, out=out)[0]
    plan = fwd_plan(G * Cg, Kg, KH, KW, Hb, Wb, H, W, dy.dtype, "store", groups=G, dil=dil)
    buf = scratch("dx_dy", (N, K, plan.Lx), dy.dtype)
    place(dy, buf, Hb, Wb, stride, EH - 1 - top, EW - 1 - left)
    return _run_planes(buf, plan, wf, None, out=out)[0]


def _dw_groups(N, Lx, NKB):
    """Images per partial sum of the wide dL/dW kernel: enough tasks for 4 per thread of the most
    Numba may run (not of the current count: the sums, so the bits, would depend on it)."""
    G = max(1, min(N, -(-2048 // Lx)))
    want = 4 * numba.config.NUMBA_NUM_THREADS
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
        make = gen.gen_conv_dw_narrow if kind == "narrow" else gen.gen_conv_dw_wide
        # long reductions: a masked remainder iteration is slower than a scalar one here
        k = _DW_KERNELS[key] = load_kernel(make(**geom), predicate=False)
    return k


def _dw_stride1(x, dy, pads, KH, KW, dil=(1, 1), groups=1, out=None):
    """dL/dW of a stride-1 correlation (x unpadded, pads applied here; taps dil apart; groups of
    channels: dw is (K, C / groups, KH, KW)), into out when given."""
    N, C, H, W = x.shape
    _, K, Ho, Wo = dy.shape
    top, bottom, left, right = pads
    Hp, Wp = H + top + bottom, W + left + right
    T = KH * KW
    Cg, dil = C // groups, tuple(dil)
    dtype = x.dtype
    zero = dtype.type(0)
    KB = _dw_blocks(K, T)
    if groups > 1:
        KB = _group_block(KB, K // groups)
    NKB = -(-K // KB)
    odd = {} if (groups, dil) == (1, (1, 1)) else {"cgroups": groups, "dil": dil}
    if C == 1 or (C * KW * Hp * Wo < K * Ho * Wp and Ho * Wo >= 256):
        # narrow: dy read where it lies; KW shifted copies of the (small) input
        xs = scratch("dw_xs", (N, C, KW, Hp * Wo), dtype)
        shift_copies(x, xs, Hp, Wo, top, left, dil[1])
        kern = _dw_kernel("narrow", C=Cg, KB=KB, NKB=NKB, K=K, KH=KH, KW=KW, Ho=Ho, Wo=Wo, **odd)
        part = np.empty((N, NKB * KB, Cg, T), dtype)
        run_generated(kern, (xs, dy.reshape(N, K, Ho * Wo), part, zero), dtype, N * NKB)
    else:
        VL = _vec_len(dtype)
        Lx = gen.round_up(Hp * Wp, VL)
        tail = gen.round_up((KH - 1) * dil[0] * Wp + (KW - 1) * dil[1], VL)
        G = _dw_groups(N, Lx, NKB)
        xf = scratch("dw_x", (C, N * Lx + tail), dtype)
        place_t(x, xf, Hp, Wp, Lx, top, left)
        dyf = scratch("dw_dy", (NKB * KB, N * Lx), dtype)
        place_t(dy, dyf, Hp, Wp, Lx, 0, 0)
        if odd:
            odd["Kg"] = K // groups
        kern = _dw_kernel("wide", C=Cg, KB=KB, NKB=NKB, KH=KH, KW=KW, Wp=Wp, Lx=Lx, **odd)
        part = np.empty((-(-N // G), NKB * KB, Cg, T), dtype)
        run_generated(kern, (xf, dyf, part, N, G, zero), dtype, part.shape[0] * NKB)
    return sum_partials(part, new_or(out, (K, Cg, KH, KW), dtype))


def grad_weights(x, dy, stride, pads, k_hw, dil=(1, 1), groups=1, out=None):
    KH, KW = k_hw
    if stride == 1:
        return _dw_stride1(x, dy, pads, KH, KW, dil, groups, out)
    s = stride
    N, C, H, W = x.shape
    K, Cg = dy.shape[1], C // groups
    EH, EW = (KH - 1) * dil[0] + 1, (KW - 1) * dil[1] + 1       # a dilated filter as a sparse dense one
    xs, _, (Ho, Wo) = _space_to_depth(x, np.zeros((1, Cg, EH, EW), x.dtype), s, pads)
    KHq, KWq = xs.shape[2] - Ho + 1, xs.shape[3] - Wo + 1
    dws = _dw_stride1(xs, dy, (0, 0, 0, 0), KHq, KWq, groups=groups)        # (K, Cg*s*s, KHq, KWq)
    dws = dws.reshape(K, Cg, s, s, KHq, KWq).transpose(0, 1, 4, 2, 5, 3).reshape(K, Cg, KHq * s, KWq * s)
    dw = new_or(out, (K, Cg, KH, KW), x.dtype)
    dw[...] = dws[:, :, :EH:dil[0], :EW:dil[1]]
    return dw

