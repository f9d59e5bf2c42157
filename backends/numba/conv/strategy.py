"""Which conv strategy (direct, im2col or winograd) runs a convolution of a given geometry.

A cold start never times: a geometry with no remembered choice takes the static rule (`static_rule`,
from timings of both strategies on MNIST- to small-ImageNet-sized layers), because timing both means
compiling both (the im2col kernels alone took 7.7 s of CPU on a cold mnist_convnet training step, and
the direct forward was compiled twice, once for the timing). Timing is deferred to an explicit
tuning run (``$GRAPHC_CONV_TUNE=1``, ``graphc bench --tune``, or ``tuning()``), which times what was
never timed, per shape, op and thread count, and remembers it in ``conv_strategy.json`` in the kernel
cache directory; every later process reuses it. ``$GRAPHC_CONV_STRATEGY`` (``direct``/``im2col``)
forces a strategy everywhere.
"""
from __future__ import annotations

import contextlib
import json
import os
import time

import numba
import numpy as np

from graphc.backends.kernel_cache import LOCK, kernel_cache_dir, write_atomic
from graphc.backends.numba.compile_stats import add_tuning
from graphc.backends.numba.conv import channels, direct, im2col, winograd_gemm
from graphc.backends.numba.conv.layout import check_geometry, out_hw
from graphc.errors import BackendError

STRATEGIES = ("direct", "im2col", "winograd")
_MODULES = {"direct": direct, "im2col": im2col, "winograd": winograd_gemm}

_CHOICES: dict = {}
_CHOICE_FILE = "conv_strategy.json"


def _choice_key(op, x_shape, w_shape, stride, pads, dtype, pool, dil=(1, 1), groups=1):
    import llvmlite.binding as llvm
    cpu = numba.config.CPU_NAME or llvm.get_host_cpu_name()
    parts = [op, "x" + "x".join(map(str, x_shape)), "w" + "x".join(map(str, w_shape)), f"s{stride}",
             "p" + "_".join(map(str, pads)), np.dtype(dtype).name, f"t{numba.get_num_threads()}", cpu]
    if pool is not None:
        parts.append(f"pool{pool[0]}_{pool[1]}")
    if tuple(dil) != (1, 1):
        parts.append(f"d{dil[0]}_{dil[1]}")
    if groups != 1:
        parts.append(f"g{groups}")
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
    with LOCK:
        data = _read_choices(path)
        data[key] = value
        with contextlib.suppress(OSError):
            write_atomic(path, json.dumps(data, indent=1, sort_keys=True))


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
IM2COL_MARGIN = 1.15        # another strategy must be this much faster than direct to be chosen


def _pick(times: dict) -> str:
    """The strategy to keep from {strategy: seconds (or ms)}: direct unless the fastest other beats it
    by more than IM2COL_MARGIN (timings on a shared machine differ by tens of per cent; direct has no
    BLAS thread pool to fight, no per-image serialisation and no Winograd rounding)."""
    best = min(times, key=times.get)
    if "direct" in times and best != "direct":
        return best if times[best] * IM2COL_MARGIN < times["direct"] else "direct"
    return best


_TUNING = []          # tuning(True/False) contexts in force (innermost last)


@contextlib.contextmanager
def tuning(on=True):
    """Within the block, choose_conv_strategy times geometries it has no timing for (on) or never
    times (off), whatever $GRAPHC_CONV_TUNE says."""
    _TUNING.append(bool(on))
    _CHOICES.clear()                     # answers given under the other setting are not kept
    try:
        yield
    finally:
        _TUNING.pop()


def tuning_on() -> bool:
    if _TUNING:
        return _TUNING[-1]
    return os.environ.get("GRAPHC_CONV_TUNE", "") not in ("", "0")


def static_rule(op, stride, w_shape, dil=(1, 1), groups=1, x_shape=None, dtype=None, pads=None) -> str:
    """The strategy a geometry runs before it was ever timed. One-thread timings (best of 5, float32)
    over the zoo's MNIST and small-ImageNet layers: direct won every stride-1 forward and dL/dX
    (im2col/direct median 2.6-3.1x) and stride-1 dL/dW but 1x1 (0.75x); im2col won 1x1 filters at
    stride 2 (0.3-0.8x) and stride-2 dL/dX (0.5-0.8x). Grouped and dilated convs (batch 16-32, 28x28
    and 56x56 planes): the same at stride 1 (direct 1.8-4x; 1x1 dL/dW im2col 0.5x); at stride 2 a
    dilated filter goes to im2col (0.55-0.8x: direct runs it as a dense filter of its extent, mostly zero
    taps) and so does dL/dX unless each group's GEMM is tiny (C/groups * K/groups < 128: direct 1.2-2x,
    e.g. a depthwise conv taken as a grouped one). A strided forward with a deep patch (channels per group
    x taps >= 512) goes to im2col too: ResNet-18's stride-2 3x3 convs at batch 1, 224x224 (2 threads),
    64->128 1.64 / 1.51 ms, 128->256 3.00 / 1.33 ms, 256->512 8.12 / 1.36 ms (direct / im2col), while
    its 7x7 first layer (3 x 49 taps) stays direct (1.72 / 3.76 ms). A strided dL/dW (ungrouped) with a
    patch that deep goes to im2col too, whose GEMMs take several images at once (ResNet-18 b16's stride-2
    3x3 convs 64->128, 128->256, 256->512, CPU ms on one thread: 27.8 / 24.8, 23.2 / 19.5, 26.5 / 19.6;
    best of 2 x 11 on 2 threads at load 1.2: 17.8 / 14.9, 14.2 / 12.0, 16.8 / 11.4 (direct / im2col);
    direct runs them as 2x2 filters over 4 phases); shallower patches stay direct (32 x 9: 9.3 / 9.4;
    ResNet's first layer 3 x 49: 35.1 / 58.6; AlexNet's 3 x 121: 16.7 / 20.3). A 1x1 forward conv with at
    least DEEP_1X1 input channels is a plain GEMM on im2col (the image is its column matrix): MobileNetV2 at
    batch 1 (its 1x1 convs on 14x14 and 7x7 planes), best of 8 x 10 runs side by side in one process,
    6.21 against 6.71 ms with SciPy's OpenBLAS on its AVX-512 kernels, 9.81 against 10.45 on its AVX2
    ones; from 1 input channel up it was slower (7.41). A forward conv of one or two images that the
    channel-vectorised direct kernel serves (strided with a deep patch, or on a small plane; conv/channels.py's
    doc has the timings) is direct, ahead of these rules. These timings were taken on AVX-512 hosts; without
    AVX-512 a stride-1 dL/dW or dL/dX with a deep patch goes to im2col (_avx2_gradient_gemm)."""
    if _winograd_pays(op, stride, w_shape, dil, groups, x_shape, dtype):
        return "winograd"
    if op == "conv2d" and x_shape is not None and pads is not None \
            and channels.applies(x_shape, w_shape, stride, pads, dil, groups, np.dtype(dtype or np.float32)):
        return "direct"
    one = tuple(w_shape[2:]) == (1, 1)
    if stride > 1 and (one or tuple(dil) != (1, 1)):
        return "im2col"
    if op == "conv2d" and one and groups == 1 and w_shape[1] >= DEEP_1X1:
        return "im2col"
    if _deep_strided_forward(op, stride, w_shape) or _avx2_gradient_gemm(op, stride, w_shape, dil, groups):
        return "im2col"
    if stride > 1 and op == "conv2d_dw" and groups == 1 and w_shape[1] * w_shape[2] * w_shape[3] >= 512:
        return "im2col"
    if stride > 1 and op == "conv2d_dx":
        return "direct" if groups > 1 and w_shape[1] * (w_shape[0] // groups) < 128 else "im2col"
    if op == "conv2d_dw" and one:
        return "im2col"
    return "direct"


WINOGRAD_MIN_CHANNELS = 64   # ... input and output channels, and
WINOGRAD_MIN_TILES = 64      # ... 4x4 output tiles over the batch, for Winograd (and at least 2 images)


def _winograd_pays(op, stride, w_shape, dil, groups, x_shape, dtype):
    """Winograd F(4x4, 3x3) (winograd_gemm.py) for a float32 3x3 stride-1 forward, dL/dX or dL/dW with
    many channels and tiles. Best of 5 on 2 threads (examples/conv_strategies.py times a geometry so),
    direct / winograd ms (forward; dL/dX alike): VGG16 b2's
    64 ch on 224x224 + pool 29.9 / 16.3, 128 on 112 + pool 23.5 / 13.8, 256 on 56 20.2 / 13.2, 512 on 28
    22.7 / 19.6 (13.5 with the whole batch in one pass); ResNet-18 b16's 64 on 56 11.4 / 8.7, 128 on 28
    10.5 / 6.9, 256 on 14 9.7 / 8.6, 512 on 7 17.0 / 11.6. Slower: 512 on 14x14 at b2 (32 tiles: 7.4 /
    7.9, the filter transform's 36 x 512 x 512 values outweigh), every batch-1 ResNet layer (64 on 56:
    0.83 / 0.92). dL/dW, ResNet-18 b16: 64 on 56 15.1 / 12.4 (8.4 in chunks, with layout.fill_plane's
    faster copy), 128 on 28 14.0 / 8.5, 256 on 14 12.5 / 7.3,
    512 on 7 17.2 / 9.5; AlexNet b8's 192 -> 384 on 13 6.0 / 4.3. float64 keeps the direct kernel (its
    exact sums; Winograd's rounding is larger)."""
    if x_shape is None or np.dtype(dtype or np.float64) != np.float32:
        return False
    if not winograd_gemm.applies(x_shape, w_shape, stride, dil, groups):
        return False
    K, C = w_shape[0], w_shape[1]
    N, H, W = x_shape[0], x_shape[2], x_shape[3]
    tiles = N * -(-H // 4) * -(-W // 4)
    return N >= 2 and min(C, K) >= WINOGRAD_MIN_CHANNELS and tiles >= WINOGRAD_MIN_TILES


AVX512 = direct.host_has_avx512()
AVX2_DEEP_PATCH = 128   # without AVX-512, a stride-1 gradient conv with a patch this deep runs on im2col


def _avx2_gradient_gemm(op, stride, w_shape, dil, groups):
    """On a host without AVX-512 (8-float vectors, 16 vector registers) the direct kernels' dL/dW and dL/dX
    fall behind im2col's BLAS GEMMs once the patch (channels x taps) is deep. AMD EPYC Zen 3 (znver3), 2
    threads, best of 7-11, direct / im2col ms (examples/conv_strategies.py): mnist_convnet b128's 32 -> 64
    3x3 on 13x13 dL/dW 20.6 / 9.95, dL/dX 14.5 / 10.5; lenet5 b64's 6 -> 16 5x5 on 14x14 1.61 / 1.48,
    1.71 / 1.44; AlexNet b8's 64 -> 192 5x5 on 27x27 67.4 / 38.0, 48.0 / 35.4. There the forward stays
    direct (mnist's 32 -> 64 + ReLU + pool: 8.1 / 10.3) and so does a first layer's dL/dW (1 x 9 taps:
    1.93 / 2.46). With AVX-512 (Zen 4 and 5) the direct kernels won these (see static_rule)."""
    return not AVX512 and op in ("conv2d_dw", "conv2d_dx") and stride == 1 and groups == 1 \
        and tuple(dil) == (1, 1) and tuple(w_shape[2:]) != (1, 1) \
        and w_shape[1] * w_shape[2] * w_shape[3] >= AVX2_DEEP_PATCH


DEEP_1X1 = 256      # a 1x1 forward conv with this many input channels runs as a GEMM (im2col, no columns to build)


def _deep_strided_forward(op, stride, w_shape):
    """A strided forward conv whose patch (channels per group x taps) is deep enough for im2col's GEMM."""
    return stride > 1 and op in ("conv2d", "conv2d_relu_maxpool") and w_shape[1] * w_shape[2] * w_shape[3] >= 512


def _normalized(x_shape, w_shape, stride, pads, dtype, op, pool, dilation, groups):
    x_shape = tuple(int(v) for v in x_shape)
    w_shape = tuple(int(v) for v in w_shape)
    dil, groups = tuple(int(d) for d in dilation), int(groups)
    stride, pads = check_geometry(x_shape, w_shape, stride, pads, dil)
    if op not in ("conv2d", "conv2d_relu_maxpool", "conv2d_dx", "conv2d_dw"):
        raise BackendError(f"choose_conv_strategy: unknown op {op!r}")
    if op == "conv2d_relu_maxpool":
        if pool is None:
            raise BackendError("choose_conv_strategy: conv2d_relu_maxpool needs pool=(size, stride)")
        pool = (int(pool[0]), int(pool[1]))
    else:
        pool = None
    return x_shape, w_shape, stride, pads, np.dtype(dtype), pool, dil, groups


def _remembered(got, tune, candidates=STRATEGIES):
    """The strategy of a remembered entry, or None when a tuning run should time it (again)."""
    if not (isinstance(got, dict) and got.get("strategy") in STRATEGIES):
        return None
    ms = got.get("ms")
    if isinstance(ms, dict) and any(k not in ms for k in candidates):
        return None                      # timed before a strategy it could take existed (winograd)
    if ms is None:
        # an untimed entry (older versions recorded their rule's answer, e.g. {"rule": "batch <= 2"}):
        # not a measurement, so today's static rule answers (such a stale entry kept ResNet-18's
        # 256->512 stride-2 conv at batch 1 on direct: 8.5 ms against im2col's 1.4)
        return None
    if tune and _retime(got.get("load")):
        return None                      # timed on a busy machine that is quieter now
    if isinstance(ms, dict) and len(ms) > 1 and all(isinstance(v, (int, float)) for v in ms.values()):
        return _pick(ms)                 # entries recorded before the margin rule
    return got["strategy"]


def choose_conv_strategy(x_shape, w_shape, stride, pads, dtype, op="conv2d", pool=None,
                         repeats=5, dilation=(1, 1), groups=1, static_filters=True) -> str:
    """``"direct"`` or ``"im2col"`` for this convolution: the remembered choice (``conv_strategy.json``
    in the kernel cache directory), else the static rule; in a tuning run (``tuning()``,
    ``$GRAPHC_CONV_TUNE=1``) a geometry never timed is timed (best of ``repeats`` interleaved runs
    after a warm-up call each) and remembered.  ``op`` is one of ``"conv2d"``,
    ``"conv2d_relu_maxpool"`` (with ``pool=(size, stride)``), ``"conv2d_dx"``, ``"conv2d_dw"``;
    ``dilation`` (dh, dw) and ``groups`` as conv2d's (w_shape is (K, C / groups, KH, KW)).
    ``static_filters=False``: the filters change every call (a training step), so the static rule leaves
    out the channel kernels (conv/channels.py), whose filter layout would be made again each call (1.8 ms
    for a 512 x 512 x 3 x 3 bank: ResNet-18's training step at batch 2 took 130 ms with them, 122 without).
    ``$GRAPHC_CONV_STRATEGY`` forces a strategy everywhere."""
    forced = os.environ.get("GRAPHC_CONV_STRATEGY")
    if forced:
        if forced not in STRATEGIES:
            raise BackendError(f"GRAPHC_CONV_STRATEGY={forced!r}: expected one of {STRATEGIES}")
        return forced
    x_shape, w_shape, stride, pads, dtype, pool, dil, groups = _normalized(x_shape, w_shape, stride, pads, dtype,
                                                                          op, pool, dilation, groups)
    key = _choice_key(op, x_shape, w_shape, stride, pads, dtype, pool, dil, groups) \
        + ("" if static_filters else "|changing-filters")
    rule_pads = pads if static_filters else None         # (static_rule's channel rule needs them)
    got = _CHOICES.get(key)
    if got is not None:
        return got
    if op in ("conv2d", "conv2d_relu_maxpool") and x_shape[0] <= SMALL_BATCH_DIRECT \
            and static_rule(op, stride, w_shape, dil, groups, x_shape, dtype, rule_pads) == "direct":
        # a timing taken under load picked im2col for MNIST's batch-1 layers, 3x slower than direct:
        # small forward batches keep the static rule's direct (its im2col cases, deep or 1x1 strided
        # filters, may be timed)
        _CHOICES[key] = "direct"
        return "direct"
    path = os.path.join(kernel_cache_dir(), _CHOICE_FILE)
    tune = tuning_on()
    best = _remembered(_read_choices(path).get(key), tune, _strategies_for(op, x_shape, w_shape, stride, pool, dil,
                                                                         groups))
    if best is None and not tune:
        best = static_rule(op, stride, w_shape, dil, groups, x_shape, dtype, rule_pads)
    if best is not None:
        _CHOICES[key] = best
        return best
    t0 = time.perf_counter()
    times = _time_candidates(_candidates(op, x_shape, w_shape, stride, pads, dtype, pool, dil, groups), repeats)
    best = _pick(times)
    _CHOICES[key] = best
    _record_choice(key, {"strategy": best, "ms": {k: round(v * 1e3, 4) for k, v in times.items()},
                         "load": round(_load_per_cpu(), 2)})
    add_tuning("strategy", time.perf_counter() - t0)
    return best


def _candidates(op, x_shape, w_shape, stride, pads, dtype, pool, dil=(1, 1), groups=1):
    """{strategy: a call of it on random data of this geometry}."""
    rng = np.random.default_rng(0)
    N, C, H, W = x_shape
    K, _, KH, KW = w_shape
    Ho, Wo = out_hw(H, W, (KH - 1) * dil[0] + 1, (KW - 1) * dil[1] + 1, stride, pads)
    geo = {} if (dil, groups) == ((1, 1), 1) else {"dil": dil, "groups": groups}
    x = rng.standard_normal(x_shape).astype(dtype)
    w = (rng.standard_normal(w_shape) * 0.1).astype(dtype)
    b = (rng.standard_normal(K) * 0.1).astype(dtype)
    dy = rng.standard_normal((N, K, Ho, Wo)).astype(dtype)
    fns = {}
    for strat in _strategies_for(op, x_shape, w_shape, stride, pool, dil, groups):
        impl = _MODULES[strat]
        if op == "conv2d":
            fns[strat] = lambda m=impl: m.forward(x, w, b, stride, pads, "store", **geo)
        elif op == "conv2d_relu_maxpool":
            fns[strat] = lambda m=impl: m.forward(x, w, b, stride, pads, "pool", ps=pool[0], pst=pool[1],
                                                   save_route=True, **geo)
        elif op == "conv2d_dx":
            fns[strat] = lambda m=impl: m.grad_input(dy, w, stride, pads, (H, W), **geo)
        else:
            fns[strat] = lambda m=impl: m.grad_weights(x, dy, stride, pads, (KH, KW), **geo)
    return fns


def _strategies_for(op, x_shape, w_shape, stride, pool, dil, groups):
    """The strategies that can run this conv (winograd: a 3x3 stride-1 forward, 2x2/2 pool if any, dL/dX
    or dL/dW; else it would run the direct kernel under its name)."""
    if not winograd_gemm.applies(x_shape, w_shape, stride, dil, groups) \
            or (pool is not None and tuple(pool) != (2, 2)):
        return ("direct", "im2col")
    return STRATEGIES


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


def resolve(strategy, op, x_shape, w_shape, stride, pads, dtype, pool=None, dilation=(1, 1), groups=1):
    if strategy is None:
        return choose_conv_strategy(x_shape, w_shape, stride, pads, dtype, op=op, pool=pool, dilation=dilation,
                                    groups=groups)
    if strategy not in STRATEGIES:
        raise BackendError(f"unknown conv strategy {strategy!r}: expected one of {STRATEGIES} or None")
    return strategy

