"""Convolutions and the fused conv patterns, on the numba conv kernels (backends/numba/conv/).

The strategy (direct, im2col or winograd) is looked up once per Numba thread count and passed explicitly, so a
call skips the conv module's per-call strategy lookup (~0.1-0.5 ms: it asks LLVM for the host CPU name
each time). Where the strategy is direct and the stride 1 (or the conv one of conv/channels.py's, outside
training steps), the forward runs the prebound direct kernel (bind_direct_fwd) writing straight into the
planned buffers; otherwise the conv functions write into them too (out=: a result outside the plan lived on
beside it, ResNet-18's conv gradients alone ~200 MB at batch 16), but for the fused conv + ReLU + max pool,
whose conv function returns new arrays.
Non-square strides fall back to the reference (the kernels take one stride for both axes).

Grouped and dilated convs take the same strategies (groups and dilation passed through); depthwise convs
(groups == C: one input channel per filter) run their own stencil kernels (conv/depthwise.py, any
stride), with a ReLU or a clip (ReLU6) in the epilogue when fused (conv_relu, conv_clip).
"""
import numpy as np

from graphc.backends.kernel_cache import load_generated
from graphc.backends.numba import conv as nconv
from graphc.backends.numba.conv import depthwise as ndw
from graphc.backends.numba.conv.layout import clip_inplace
from graphc.backends.numba.threads import num_threads
from graphc.backends.numba.kernels.pool import maxpool_source
from graphc.backends.registry import lowerings
from graphc.errors import BackendError
from graphc.ops.conv import geometry

lowering, pattern_lowering = lowerings("numba")

_NO_ROUTE = np.empty((1, 1, 1, 1), np.int32)
_STRATEGY = ("direct, im2col+GEMM or Winograd F(4x4, 3x3) with GEMMs, chosen per shape (a static rule, or timed in "
             "a tuning run and remembered)")
_DEPTHWISE = "depthwise (groups == C): conv/depthwise.py per-channel stencil kernels"
_CHANNELS = ("direct at batch 1-2 outside training steps, for strided convs with deep patches or large filters and "
             "3x3 convs on small planes: conv/channels.py (lanes across output channels)")


def _square_stride(attrs):
    st = tuple(attrs["stride"])
    return int(st[0]) if st[0] == st[1] else None


def _geo(attrs):
    """(dilation, groups) of a conv-family node."""
    return geometry(attrs)[2:]


def _chooser(op, x_shape, w_shape, stride, pads, dtype, pool=None, geo=((1, 1), 1), static_filters=True):
    """strategy(): the conv strategy for the current Numba thread count (chosen once per count)."""
    chosen = {}

    def strategy():
        t = num_threads()
        got = chosen.get(t)
        if got is None:
            got = chosen[t] = nconv.choose_conv_strategy(x_shape, w_shape, stride, pads, dtype, op=op, pool=pool,
                                                         dilation=geo[0], groups=geo[1], static_filters=static_filters)
        return got
    return strategy


def _prebound(ctx, stride, pads, epi, pool=None, geo=((1, 1), 1), clip=None, static_filters=True):
    """bind_direct_fwd for this node's geometry, or None (a geometry it refuses: most strided convs). Filters
    that are state (or made from it ahead of the run) change only with the executable's state version: kernels
    may keep what they derive from them (winograd.py's transformed filters, channels.py's laid-out ones)."""
    exe = ctx.exe
    version = (lambda: exe.state_version) if ctx.static([ctx.inputs[1]]) is not None else None
    try:
        return nconv.bind_direct_fwd(ctx.shape_of(ctx.inputs[0]), ctx.shape_of(ctx.inputs[1]), len(ctx.inputs) == 3,
                                     stride, pads, ctx.dtype, epi, pool or (0, 0), *geo, clip=clip,
                                     weights_version=version, channels_ok=static_filters)
    except BackendError:        # a geometry it refuses: the general path says why, or copes
        return None


def _depthwise_forward(ctx, conv_attrs, act):
    """The depthwise stencil into the planned buffer (act: (lo, hi) clip bounds, None: none), or None
    when the conv is not depthwise."""
    stride, pads, dil, groups = geometry(conv_attrs)
    xs, ws = ctx.shape_of(ctx.inputs[0]), ctx.shape_of(ctx.inputs[1])
    if groups == 1 or not ndw.is_depthwise(xs, ws, groups):
        return None
    run = ndw.bind_forward(xs, ws, stride, pads, dil, ctx.dtype, act)
    if len(ctx.inputs) == 3:
        return ctx.call(run, ctx.inputs, (ctx.out(0),))
    return ctx.call(lambda x, w, y: run(x, w, None, y), ctx.inputs, (ctx.out(0),))


def _clip_bounds(lo, hi):
    return (-np.inf if lo is None else float(lo)), (np.inf if hi is None else float(hi))


def _forward(ctx, conv_attrs, relu, pool=None, clip=None):
    """The step of conv(x, w[, b]) (+ReLU, or + a clip to clip = (lo, hi), + a square max pool with its
    route when the node has a second result): the prebound direct kernel into the planned buffers when
    the strategy is direct (the clip in its epilogue), else the conv functions (a plain conv into its
    planned buffer, then the clip in place; a pooled one returning new arrays); grouped / dilated convs
    pass their geometry through."""
    stride, pads = _square_stride(conv_attrs), tuple(conv_attrs["pads"])
    if stride is None:
        return None
    geo = _geo(conv_attrs)
    odd = {} if geo == ((1, 1), 1) else {"dilation": geo[0], "groups": geo[1]}
    values = ctx.values
    xi, wi = ctx.index(ctx.inputs[0]), ctx.index(ctx.inputs[1])
    bi = ctx.index(ctx.inputs[2]) if len(ctx.inputs) == 3 else None
    save = pool is not None and len(ctx.result_index) > 1
    res = [None if r is None else ctx.index(r) for r in ctx.results]     # None: a result nothing reads
    op = "conv2d" if pool is None else "conv2d_relu_maxpool"
    static = not ctx.binding.inplace          # (a training step's filters change every step)
    strategy = _chooser(op, ctx.shape_of(ctx.inputs[0]), ctx.shape_of(ctx.inputs[1]), stride, pads, ctx.dtype, pool,
                        geo, static)
    y, route = ctx.out(0), (ctx.out(1) if save else _NO_ROUTE)
    if pool is None:
        def general():
            nconv.conv2d(values[xi], values[wi], values[bi] if bi is not None else None, stride, pads, relu=relu,
                         strategy=strategy(), out=y, **odd)
            if clip is not None:
                clip_inplace(y.reshape(-1), *clip)
    else:
        ctx.dynamic_outputs()

        def general():
            out = nconv.conv2d_relu_maxpool(values[xi], values[wi], values[bi] if bi is not None else None, stride,
                                            pads, pool[0], pool[1], save_route=save, strategy=strategy(), **odd)
            for i, v in zip(res, out if save else (out,)):
                if i is not None:
                    values[i] = v
    fast = _prebound(ctx, stride, pads, "store" if pool is None else "pool", pool, geo, clip, static)
    if fast is None or route.dtype != np.int32 or not route.flags.c_contiguous:
        return general
    flag = save if pool is not None else (relu or clip is not None)
    oy, oroute = res[0], (res[1] if save else None)

    def step():
        s = strategy()
        if s == "direct" or (s == "winograd" and oroute is not None):     # (winograd saves no route)
            fast(values[xi], values[wi], values[bi] if bi is not None else None, y, route, flag)
            values[oy] = y
            if oroute is not None:
                values[oroute] = route
        else:
            general()
    return step


@lowering("conv", kernel=f"numba conv.conv2d ({_STRATEGY}; groups and dilation too; {_CHANNELS}); {_DEPTHWISE}; "
                         "non-square strides (not depthwise): fallback")
def conv(ctx):
    return _depthwise_forward(ctx, ctx.attrs, None) or _forward(ctx, ctx.attrs, relu=False)


@pattern_lowering("conv_relu", kernel=f"numba conv.conv2d with the ReLU in the epilogue ({_STRATEGY}; {_CHANNELS}); "
                                      f"{_DEPTHWISE}, the ReLU in their epilogue")
def conv_relu(ctx):
    attrs = ctx.members["conv"]["attrs"]
    return _depthwise_forward(ctx, attrs, (0.0, None)) or _forward(ctx, attrs, relu=True)


@pattern_lowering("conv_clip", kernel=f"{_DEPTHWISE}, the clip (ReLU6) in their epilogue; other convs: "
                                      f"numba conv.conv2d ({_STRATEGY}; {_CHANNELS}), the clip in the direct kernel's "
                                      "epilogue, after im2col in place")
def conv_clip(ctx):
    attrs, act = ctx.members["conv"]["attrs"], ctx.members["act"]["attrs"]
    lo, hi = act.get("lo"), act.get("hi")
    return _depthwise_forward(ctx, attrs, (lo, hi)) or _forward(ctx, attrs, relu=False, clip=_clip_bounds(lo, hi))


@pattern_lowering("conv_relu_maxpool",
                  kernel=f"numba conv.conv2d_relu_maxpool ({_STRATEGY}; saves the route in training); "
                         "non-square pools: conv2d + a generated max pool")
def conv_relu_maxpool(ctx):
    conv_attrs, pool = ctx.members["conv"]["attrs"], ctx.members["pool"]["attrs"]
    (kh, kw), (sh, sw) = pool["size"], pool["stride"]
    if kh == kw and sh == sw:
        return _forward(ctx, conv_attrs, relu=True, pool=(int(kh), int(sh)))
    stride, pads = _square_stride(conv_attrs), tuple(conv_attrs["pads"])
    if stride is None:
        return None
    save = len(ctx.result_index) > 1
    y, route = ctx.out(0), (ctx.out(1) if save else _NO_ROUTE)
    kern = ctx.split_batch(load_generated(maxpool_source(kh, kw, sh, sw, save, True, False), "graphc_pool_"),
                           y.shape[0], y.size * kh * kw)
    geo = _geo(conv_attrs)
    strategy = _chooser("conv2d", ctx.shape_of(ctx.inputs[0]), ctx.shape_of(ctx.inputs[1]), stride, pads, ctx.dtype,
                        geo=geo)
    values, ins = ctx.values, [ctx.index(i) for i in ctx.inputs]

    def step():
        z = nconv.conv2d(values[ins[0]], values[ins[1]], values[ins[2]] if len(ins) == 3 else None, stride, pads,
                         relu=True, strategy=strategy(), dilation=geo[0], groups=geo[1])
        kern(z, y, route)
    return step


def _backward(ctx, op, fn, geometry, tail):
    stride = _square_stride(ctx.attrs)
    if stride is None:
        return None
    geo = _geo(ctx.attrs)
    strategy = _chooser(op, *geometry(stride), geo=geo)
    odd = {} if geo == ((1, 1), 1) else {"dilation": geo[0], "groups": geo[1]}
    values, (ai, bi), out = ctx.values, [ctx.index(i) for i in ctx.inputs], ctx.out(0)
    pads = tuple(ctx.attrs["pads"])

    def step():                     # into the planned buffer
        fn(values[ai], values[bi], stride, pads, tail, strategy=strategy(), out=out, **odd)
    return step


def _depthwise_backward(ctx, bind, x_shape, w_shape):
    """The depthwise dL/dX or dL/dW kernel into the planned buffer, or None when not depthwise."""
    stride, pads, dil, groups = geometry(ctx.attrs)
    if groups == 1 or not ndw.is_depthwise(x_shape, w_shape, groups):
        return None
    return ctx.call(bind(x_shape, w_shape, stride, pads, dil, ctx.dtype), ctx.inputs, (ctx.out(0),))


@lowering("conv_dx", kernel=f"numba conv.conv2d_dx ({_STRATEGY}; groups and dilation too); {_DEPTHWISE} "
                            "(the transposed stencil); non-square strides (not depthwise): fallback")
def conv_dx(ctx):
    hw = tuple(ctx.attrs["in_hw"])
    dys, ws = ctx.shape_of(ctx.inputs[0]), ctx.shape_of(ctx.inputs[1])
    xs = (dys[0], ws[1] * _geo(ctx.attrs)[1]) + hw
    return _depthwise_backward(ctx, ndw.bind_grad_input, xs, ws) or _backward(
        ctx, "conv2d_dx", nconv.conv2d_dx, lambda s: (xs, ws, s, tuple(ctx.attrs["pads"]), ctx.dtype), hw)


@lowering("conv_dw", kernel=f"numba conv.conv2d_dw ({_STRATEGY}; groups and dilation too); {_DEPTHWISE} "
                            "(per-channel reductions); non-square strides (not depthwise): fallback")
def conv_dw(ctx):
    khw = tuple(ctx.attrs["k_hw"])
    xs, dys = ctx.shape_of(ctx.inputs[0]), ctx.shape_of(ctx.inputs[1])
    ws = (dys[1], xs[1] // _geo(ctx.attrs)[1]) + khw
    return _depthwise_backward(ctx, ndw.bind_grad_weights, xs, ws) or _backward(
        ctx, "conv2d_dw", nconv.conv2d_dw, lambda s: (xs, ws, s, tuple(ctx.attrs["pads"]), ctx.dtype), khw)
