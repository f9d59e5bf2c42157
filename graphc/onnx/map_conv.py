"""ONNX convolution, pooling, normalisation and padding -> graphc's conv, pool, batchnorm, lrn and pad2d.

ONNX lists pads as (x1_begin, x2_begin, x1_end, x2_end); graphc as (top, bottom, left, right).
Pools follow torch's (and ONNX's) ceil_mode rule: the last window must start inside the input or its
begin padding. Max pooling with any padding or ceil_mode is exact today as a -inf pad2d in front of
graphc's maxpool (padding never wins a max); average pooling is exact with zero padding in front when the
padding counts (count_include_pad=1), and needs the issue-12 avgpool(pad, ceil_mode, count_include_pad)
otherwise.
"""
import math

import numpy as np

from graphc.onnx.map_elementwise import floats
from graphc.onnx.registry import graph_has, onnx_op


def int_or_pair(p):
    return p[0] if p[0] == p[1] else tuple(p)


def as_2d(ctx, x, what):
    """x as NCHW: a 1-D (N, C, L) input is lifted to (N, C, 1, L), exact for convs and pools (`finish`
    drops the dim again); sattr() lifts the node's window attributes alike."""
    ctx.lifted = len(x.shape) == 3
    if ctx.lifted:
        return ctx.g.reshape(x, (x.shape[0], x.shape[1], 1, x.shape[2]), name=ctx.tmp("2d"))
    if len(x.shape) != 4:
        ctx.unsupported(f"{len(x.shape) - 2}-D {what}: graphc's {what} is 2-D (NCHW input; 1-D is lifted)")
    return x


def sattr(ctx, name, default=None):
    """A window attribute for the 2-D op: 1-D values gain a leading 1 (pads (b, e) -> (0, b, 0, e))."""
    v = ctx.attr(name)
    if v is None:
        return default
    v = tuple(v)
    if ctx.lifted:
        v = (0, v[0], 0, v[1]) if name == "pads" else (1, *v)
    return v


def out_name(ctx):
    return ctx.tmp("y2d") if ctx.lifted else ctx.out()


def finish(ctx, y):
    if not ctx.lifted:
        return y
    return ctx.g.reshape(y, (y.shape[0], y.shape[1], y.shape[3]), name=ctx.out())


def spatial_pads(ctx, in_hw, k_eff, strides):
    """(top, bottom, left, right) from the pads and auto_pad attributes."""
    auto = ctx.attr("auto_pad", "NOTSET") or "NOTSET"
    pads = sattr(ctx, "pads")
    if auto == "NOTSET":
        p = tuple(pads) if pads is not None else (0, 0, 0, 0)
        if len(p) != 4:
            ctx.unsupported(f"pads {p} do not fit a 2-D window", attribute="pads")
        return (p[0], p[2], p[1], p[3])
    if pads is not None and any(pads):
        ctx.unsupported("both auto_pad and explicit pads are set", attribute="pads")
    if auto == "VALID":
        return (0, 0, 0, 0)
    if auto not in ("SAME_UPPER", "SAME_LOWER"):
        ctx.unsupported(f"auto_pad={auto!r} is not an ONNX padding mode", attribute="auto_pad")
    out = []
    for n, k, s in zip(in_hw, k_eff, strides):
        total = max((math.ceil(n / s) - 1) * s + k - n, 0)
        small, big = total // 2, total - total // 2
        out += [small, big] if auto == "SAME_UPPER" else [big, small]
    return tuple(out)


# --- convolution ------------------------------------------------------------------------------------

def _kernel(ctx, w):
    k_hw = tuple(w.shape[2:])
    ks = sattr(ctx, "kernel_shape")
    if ks is not None and tuple(ks) != k_hw:
        ctx.unsupported(f"kernel_shape {tuple(ks)} differs from the weights' {k_hw}", attribute="kernel_shape")
    return k_hw


@onnx_op("Conv")
def conv(ctx):
    x, w = floats(ctx, 0, 1)
    x, w = as_2d(ctx, x, "conv"), _lift_w(ctx, w)
    k_hw = _kernel(ctx, w)
    strides = sattr(ctx, "strides", (1, 1))
    dil = sattr(ctx, "dilations", (1, 1))
    group = int(ctx.attr("group", 1))
    pads = spatial_pads(ctx, x.shape[2:], [(k - 1) * d + 1 for k, d in zip(k_hw, dil)], strides)
    kw = {}
    if dil != (1, 1):
        ctx.need("conv", "dilation", attribute="dilations")
        kw["dilation"] = int_or_pair(dil)
    if group != 1:
        ctx.need("conv", "groups", attribute="group")
        kw["groups"] = group
    b = floats(ctx, 2)[0] if ctx.has(2) else None
    return finish(ctx, ctx.g.conv(x, w, b, stride=strides, pad=pads, name=out_name(ctx), **kw))


def _lift_w(ctx, w):
    if not ctx.lifted:
        return w
    return ctx.g.reshape(w, (w.shape[0], w.shape[1], 1, w.shape[2]), name=ctx.tmp("w2d"))


def _transposed_geometry(ctx, in_hw, k_hw, strides, out_pad):
    """Output size and begin padding (top, left) of a transposed conv, as onnxruntime and onnx's
    reference: SAME_* split the total padding; otherwise the given pads and, with output_shape, an
    output that ends where output_shape says."""
    shape = sattr(ctx, "output_shape")
    auto = ctx.attr("auto_pad", "NOTSET") or "NOTSET"
    pads = sattr(ctx, "pads")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        if pads is not None and any(pads):
            ctx.unsupported("explicit pads together with auto_pad", attribute="pads")
        out = tuple(shape)[-2:] if shape is not None else tuple(n * s for n, s in zip(in_hw, strides))
        begin = []
        for n, k, s, op, o in zip(in_hw, k_hw, strides, out_pad, out):
            total = s * (n - 1) + op + k - o
            begin.append(total // 2 if auto == "SAME_UPPER" else total - total // 2)
        return out, tuple(begin)
    p = (0, 0, 0, 0) if auto == "VALID" or pads is None else tuple(pads)
    if shape is not None:
        return tuple(shape)[-2:], (p[0], p[1])
    return tuple(s * (n - 1) + op + k - p[i] - p[i + 2]
                 for i, (n, k, s, op) in enumerate(zip(in_hw, k_hw, strides, out_pad))), (p[0], p[1])


@onnx_op("ConvTranspose")
def conv_transpose(ctx):
    """A transposed conv is conv's input gradient: graphc's conv_dx (full conv with the rotated filter).
    Output rows no window reaches (a negative pad, an output_shape past the last window) are zeros."""
    x, w = floats(ctx, 0, 1)
    x, w = as_2d(ctx, x, "transposed conv"), _lift_w(ctx, w)
    k_hw = _kernel(ctx, w)
    strides = sattr(ctx, "strides", (1, 1))
    if sattr(ctx, "dilations", (1, 1)) != (1, 1):
        ctx.unsupported("dilations: graphc's transposed conv (conv_dx) has none", attribute="dilations")
    if int(ctx.attr("group", 1)) != 1:
        ctx.unsupported("group > 1: graphc's transposed conv (conv_dx) has no groups", attribute="group")
    out_hw, begin = _transposed_geometry(ctx, x.shape[2:], k_hw, strides, sattr(ctx, "output_padding", (0, 0)))
    pads, zeros, inner = [], [], []
    for n, k, s, o, b in zip(x.shape[2:], k_hw, strides, out_hw, begin):
        full = (n - 1) * s + k                   # rows the full convolution produces
        lead, b = max(-b, 0), max(b, 0)
        size = min(o - lead, full - b)
        if size < 1:
            ctx.unsupported(f"output {tuple(out_hw)} with padding {tuple(begin)} holds no computed value")
        pads += [b, full - b - size]
        zeros += [lead, o - lead - size]
        inner.append(size)
    g = ctx.g
    last = not any(zeros) and not ctx.has(2)
    y = g.conv_dx(x, w, stride=strides, pads=tuple(pads), in_hw=tuple(inner),
                  name=out_name(ctx) if last else ctx.tmp("convT"))
    if any(zeros):
        y = g.pad2d(y, tuple(zeros), value=0.0, name=out_name(ctx) if not ctx.has(2) else ctx.tmp("pad"))
    if ctx.has(2):
        b = g.reshape(floats(ctx, 2)[0], (w.shape[1], 1, 1), name=ctx.tmp("bias"))
        y = g.add(y, b, name=out_name(ctx))
    return finish(ctx, y)


# --- pooling ----------------------------------------------------------------------------------------

def pool_geometry(ctx, x):
    """Window, stride, (top, bottom, left, right) padding and the extra (bottom, right) padding that
    ceil_mode adds."""
    size = sattr(ctx, "kernel_shape")
    strides = sattr(ctx, "strides", (1, 1))
    if sattr(ctx, "dilations", (1, 1)) != (1, 1):
        ctx.unsupported("pool dilations: graphc's pools have none", attribute="dilations")
    ceil = int(ctx.attr("ceil_mode", 0))
    pads = spatial_pads(ctx, x.shape[2:], size, strides)
    extra = []
    for i, (n, k, s) in enumerate(zip(x.shape[2:], size, strides)):
        pb, pe = pads[2 * i], pads[2 * i + 1]
        span = n + pb + pe - k
        out = span // s + 1
        if ceil and span % s:
            out = -(-span // s) + 1
            if (out - 1) * s >= n + pb:          # the last window must start inside the input
                out -= 1
        extra.append(max((out - 1) * s + k - (n + pb + pe), 0))
    return size, strides, pads, tuple(extra)


@onnx_op("MaxPool")
def maxpool(ctx):
    x = as_2d(ctx, floats(ctx, 0)[0], "pooling")
    ctx.attr("storage_order")      # only orders the Indices output, which graphc does not produce
    size, strides, (t, b, l, r), (eh, ew) = pool_geometry(ctx, x)
    g = ctx.g
    if t == b == l == r and not (eh or ew) and t <= min(size) // 2:
        return [finish(ctx, g.maxpool(x, size, strides, pad=t, name=out_name(ctx))), None]
    xp = g.pad2d(x, (t, b + eh, l, r + ew), value=-np.inf, name=ctx.tmp("pad"))
    return [finish(ctx, g.maxpool(xp, size, strides, name=out_name(ctx))), None]


def _divisors(n, k, s, pb, pe, extra, include):
    """How many elements each output position of an average pool divides by, along one dim: the
    window's overlap with the input (count_include_pad=0) or with the padded input (=1); the extra
    padding of ceil_mode never counts."""
    lo, hi = (-pb, n + pe) if include else (0, n)
    out = (n + pb + pe + extra - k) // s + 1
    return np.array([min(i * s - pb + k, hi) - max(i * s - pb, lo) for i in range(out)], dtype=np.float64)


@onnx_op("AveragePool")
def avgpool(ctx):
    """Exact for every padding and ceil_mode: issue 12's avgpool(pad, ceil_mode, count_include_pad) where
    it exists and fits (symmetric pads of at most half the window), else a zero pad2d, graphc's avgpool
    and a constant per-position factor window size / divisor."""
    x = as_2d(ctx, floats(ctx, 0)[0], "pooling")
    include = int(ctx.attr("count_include_pad", 0))
    size, strides, (t, b, l, r), (eh, ew) = pool_geometry(ctx, x)
    g = ctx.g
    if not (eh or ew) and (include or not any((t, b, l, r))):
        if any((t, b, l, r)):
            x = g.pad2d(x, (t, b, l, r), value=0.0, name=ctx.tmp("pad"))
        return finish(ctx, g.avgpool(x, size, strides, name=out_name(ctx)))
    if t == b and l == r and max(t, l) <= min(size) // 2 and graph_has("avgpool", "count_include_pad") \
            and graph_has("avgpool", "ceil_mode"):
        return finish(ctx, g.avgpool(x, size, strides, pad=int_or_pair((t, l)), ceil_mode=bool(eh or ew),
                                     count_include_pad=bool(include), name=out_name(ctx)))
    (n_h, n_w), (k_h, k_w) = x.shape[2:], size
    d_h = _divisors(n_h, k_h, strides[0], t, b, eh, include)
    d_w = _divisors(n_w, k_w, strides[1], l, r, ew, include)
    factor = (k_h * k_w) / (d_h[:, None] * d_w[None, :])
    y = g.avgpool(g.pad2d(x, (t, b + eh, l, r + ew), value=0.0, name=ctx.tmp("pad")), size, strides,
                  name=ctx.tmp("avgpool"))
    return finish(ctx, g.mul(y, g.const(factor[None, None], name=ctx.tmp("divisors")), name=out_name(ctx)))


@onnx_op("GlobalAveragePool")
def global_avgpool(ctx):
    x, = floats(ctx, 0)
    g = ctx.g
    if len(x.shape) != 4:
        return g.mean(x, axes=tuple(range(2, len(x.shape))), keepdims=True, name=ctx.out())
    y = g.global_avgpool(x, name=ctx.tmp("gap"))
    return g.reshape(y, (*x.shape[:2], 1, 1), name=ctx.out())


@onnx_op("GlobalMaxPool")
def global_maxpool(ctx):
    """A max pool whose window is the whole plane: (N, C, 1, 1), exact with graphc's maxpool."""
    x = as_2d(ctx, floats(ctx, 0)[0], "pooling")
    return finish(ctx, ctx.g.maxpool(x, tuple(x.shape[2:]), (1, 1), name=out_name(ctx)))


# --- normalisation and padding ----------------------------------------------------------------------

@onnx_op("BatchNormalization", const_inputs=(1, 2, 3, 4))
def batchnorm(ctx):
    """Inference-mode BN. ONNX's momentum weighs the old running value (0.9), torch's the new one (0.1)."""
    x, = floats(ctx, 0)
    eps = float(ctx.attr("epsilon", 1e-5))
    momentum = float(ctx.attr("momentum", 0.9))
    if int(ctx.attr("spatial", 1)) != 1:
        ctx.unsupported("spatial=0 (statistics per activation): graphc's batchnorm keeps one per channel",
                        attribute="spatial")
    if int(ctx.attr("training_mode", 0)):
        ctx.unsupported("training_mode=1 normalises with batch statistics even at inference; graphc's "
                        "batchnorm uses them only while training", attribute="training_mode")
    if len(x.shape) not in (2, 3, 4):
        ctx.unsupported(f"input of rank {len(x.shape)}: graphc's batchnorm takes (N, C), (N, C, L) (lifted "
                        "to 2-D) or (N, C, H, W)")
    ctx.need("batchnorm")
    x = as_2d(ctx, x, "batchnorm") if len(x.shape) == 3 else x
    gamma, beta = floats(ctx, 1, 2)
    y = ctx.g.batchnorm(x, gamma, beta, ctx.state(3), ctx.state(4), eps=eps, momentum=1.0 - momentum,
                        name=out_name(ctx))
    return [finish(ctx, y)]


@onnx_op("LRN")
def lrn(ctx):
    """torch.nn.LocalResponseNorm semantics; its window agrees with ONNX's for odd sizes only (for even
    sizes torch puts the extra channel before, ONNX after)."""
    x, = floats(ctx, 0)
    size = int(ctx.attr("size"))
    alpha, beta, bias = float(ctx.attr("alpha", 1e-4)), float(ctx.attr("beta", 0.75)), float(ctx.attr("bias", 1.0))
    if size % 2 == 0:
        ctx.unsupported(f"even size {size}: ONNX's window has the extra channel after the centre, torch's "
                        "(graphc's) before", attribute="size")
    if len(x.shape) != 4:
        ctx.unsupported(f"input of rank {len(x.shape)}: graphc's lrn takes NCHW input")
    ctx.need("lrn")
    return ctx.g.lrn(x, size, alpha=alpha, beta=beta, k=bias, name=ctx.out())


def _pad_spec(ctx, rank):
    if ctx.opset < 11:
        return list(ctx.attr("pads")), float(ctx.attr("value", 0.0))
    pads = [int(p) for p in ctx.const(1).ravel()]
    value = ctx.const(2, np.array(0.0))
    value = float(value.ravel()[0]) if value.size else 0.0
    axes = ctx.const(3)
    if axes is not None:
        full = [0] * (2 * rank)
        for j, a in enumerate(int(a) % rank for a in axes.ravel()):
            full[a], full[rank + a] = pads[j], pads[len(pads) // 2 + j]
        pads = full
    return pads, value


@onnx_op("Pad", const_inputs=(1, 2, 3))
def pad(ctx):
    x, = floats(ctx, 0)
    mode = ctx.attr("mode", "constant")
    rank = len(x.shape)
    pads, value = _pad_spec(ctx, rank)
    begin, end = pads[:rank], pads[rank:]
    if rank != 4 or any(begin[:2]) or any(end[:2]):
        ctx.unsupported(f"pads {tuple(pads)}: graphc pads only H and W of NCHW tensors (pad2d)", attribute="pads")
    spec = (begin[2], end[2], begin[3], end[3])
    if any(p < 0 for p in spec):
        ctx.unsupported(f"negative pads {tuple(pads)} (cropping)", attribute="pads")
    if mode == "constant":
        return ctx.g.pad2d(x, spec, value=value, name=ctx.out())
    if mode not in ("reflect", "edge"):
        ctx.unsupported(f"mode {mode!r}: graphc's pad2d has constant, reflect and edge", attribute="mode")
    ctx.need("pad2d", "mode", attribute="mode")
    return ctx.g.pad2d(x, spec, mode=mode, name=ctx.out())
