"""Convolution (NCHW input, KCHW filters, optional bias, stride, zero padding) and its gradient ops.

Reference semantics follow the seeds: the forward pass is im2col + one matrix product;
dL/dW = conv(X, dL/dO); dL/dX = full convolution of the (stride-dilated) dL/dO with the 180-degree
rotated filter, cropped by the padding; dL/db = sum of dL/dO.
"""
import numpy as np
from numpy.lib.stride_tricks import as_strided

from graphc import shapes
from graphc.errors import DTypeError, ShapeError
from graphc.ops import OpDef, register
from graphc.ops.elementwise import _float_dtype

CONV_RULE = "output size = (W - F + 2P) / S + 1"


def effective(k, d):
    """Extent of a k-tap filter dilated by d: (k - 1) * d + 1."""
    return (k - 1) * d + 1


def out_hw(in_hw, k_hw, stride, pads, dilation=(1, 1)):
    return (shapes.window_out(in_hw[0], effective(k_hw[0], dilation[0]), stride[0], pads[0] + pads[1]),
            shapes.window_out(in_hw[1], effective(k_hw[1], dilation[1]), stride[1], pads[2] + pads[3]))


def im2col(x, kh, kw, stride, pads, dilation=(1, 1)):
    """(N, C, H, W) -> (N, C*kh*kw, Ho*Wo): each column is one receptive field (seeds/000); taps of a
    dilated filter are `dilation` apart."""
    n, c, h, w = x.shape
    t, b, l, r = pads
    xp = np.pad(x, ((0, 0), (0, 0), (t, b), (l, r))) if any(pads) else x
    xp = np.ascontiguousarray(xp)
    ho, wo = out_hw((h, w), (kh, kw), stride, pads, dilation)
    sn, sc, sh, sw = xp.strides
    cols = as_strided(xp, (n, c, kh, kw, ho, wo),
                      (sn, sc, sh * dilation[0], sw * dilation[1], sh * stride[0], sw * stride[1]))
    return cols.reshape(n, c * kh * kw, ho * wo)


def conv_ref(x, w, b, stride, pads, dilation=(1, 1), groups=1):
    """im2col + one matrix product; with groups, one product per group (filters of group j see only
    input channels j*C/G .. (j+1)*C/G - 1, as torch's Conv2d(groups=G))."""
    k, cg, kh, kw = w.shape
    n = x.shape[0]
    ho, wo = out_hw(x.shape[2:], (kh, kw), stride, pads, dilation)
    cols = im2col(x, kh, kw, stride, pads, dilation)
    if groups == 1:
        out = np.matmul(w.reshape(k, -1), cols)
    else:
        out = np.matmul(w.reshape(groups, k // groups, -1), cols.reshape(n, groups, cg * kh * kw, -1))
    out = out.reshape(n, k, ho, wo)
    if b is not None:
        out += b.reshape(1, k, 1, 1)
    return out


def conv_dw_ref(x, dy, stride, pads, k_hw, dilation=(1, 1), groups=1):
    """dL/dW = conv(X, dL/dO): every filter tap sums input x gradient over all output positions."""
    n, k = dy.shape[:2]
    cols = im2col(x, k_hw[0], k_hw[1], stride, pads, dilation)            # (N, C*kh*kw, P)
    cg = x.shape[1] // groups
    dw = np.einsum("ngkp,ngqp->gkq", dy.reshape(n, groups, k // groups, -1),
                   cols.reshape(n, groups, cg * k_hw[0] * k_hw[1], -1))
    return dw.reshape(k, cg, *k_hw)


def conv_dx_ref(dy, w, stride, pads, in_hw, dilation=(1, 1), groups=1):
    """dL/dX = full conv(rot180(W), dL/dO): dilate dL/dO by the stride, pad by the filter's extent - 1,
    convolve (with the filter's dilation, group by group), crop."""
    n, k, ho, wo = dy.shape
    _, cg, kh, kw = w.shape
    c = cg * groups
    sh, sw = stride
    dil = np.zeros((n, k, (ho - 1) * sh + 1, (wo - 1) * sw + 1), dy.dtype)
    dil[:, :, ::sh, ::sw] = dy
    # per group: (K/G, C/G, kh, kw) -> rotated and transposed (C/G, K/G, kh, kw); groups stay in order
    w_rot = w[:, :, ::-1, ::-1].reshape(groups, k // groups, cg, kh, kw).transpose(0, 2, 1, 3, 4)
    w_rot = np.ascontiguousarray(w_rot).reshape(c, k // groups, kh, kw)
    eh, ew = effective(kh, dilation[0]) - 1, effective(kw, dilation[1]) - 1
    full = conv_ref(dil, w_rot, None, (1, 1), (eh, eh, ew, ew), dilation, groups)
    t, b, l, r = pads
    hp, wp = in_hw[0] + t + b, in_hw[1] + l + r
    dxp = np.zeros((n, c, hp, wp), dy.dtype)
    hh, ww = min(hp, full.shape[2]), min(wp, full.shape[3])
    dxp[:, :, :hh, :ww] = full[:, :, :hh, :ww]   # rows past the last window get no gradient
    return dxp[:, :, t:t + in_hw[0], l:l + in_hw[1]]


# --- shape rules -------------------------------------------------------------------------------

def _check_4d(node, name, s):
    if len(s) != 4:
        node.fail(ShapeError, f"{name} must be 4-D NCHW/KCHW, got {shapes.fmt(s)}",
                  "reshape images to (batch, channels, height, width)")


def geometry(attrs):
    """(stride, pads, dilation, groups) of a conv, conv_dx or conv_dw node (graphs made before dilation
    and groups existed lack the last two)."""
    return (tuple(attrs["stride"]), tuple(attrs["pads"]), tuple(attrs.get("dilation", (1, 1))),
            int(attrs.get("groups", 1)))


def is_plain(attrs):
    """True for an ungrouped, undilated conv: the only kind the fast conv kernels and fused patterns take."""
    return tuple(attrs.get("dilation", (1, 1))) == (1, 1) and int(attrs.get("groups", 1)) == 1


def _check_groups(node, c, k, groups, sw):
    if groups < 1 or c % groups or k % groups:
        node.fail(ShapeError, f"groups={groups} must divide both the {c} input channels and the {k} filters",
                  "pick groups among the common divisors (groups=C with K a multiple of C is depthwise)")
    if sw[1] * groups != c:
        node.fail(ShapeError, f"input has {c} channels, so with groups={groups} each filter sees {c // groups}, "
                  f"but filters {shapes.fmt(sw)} expect {sw[1]}",
                  f"make the filter shape (K, C // groups, KH, KW) = ({k}, {c // groups}, {sw[2]}, {sw[3]})")


def _conv_infer(node, in_types):
    sx, sw = in_types[0][0], in_types[1][0]
    _check_4d(node, "input", sx)
    _check_4d(node, "filters", sw)
    stride, pads, dil, groups = geometry(node.attrs)
    if groups == 1 and sx[1] != sw[1]:
        node.fail(ShapeError, f"input has {sx[1]} channels but filters {shapes.fmt(sw)} expect {sw[1]}",
                  f"make the filter shape (K, {sx[1]}, KH, KW)")
    _check_groups(node, sx[1], sw[0], groups, sw)
    if len(in_types) == 3 and tuple(in_types[2][0]) != (sw[0],):
        node.fail(ShapeError, f"bias shape {shapes.fmt(in_types[2][0])} must be ({sw[0]},), one per filter",
                  f"declare the bias as ({sw[0]},)")
    if min(stride) < 1 or min(pads) < 0:
        node.fail(ShapeError, f"stride {stride} must be positive and padding {pads} non-negative", "")
    ho, wo = out_hw(sx[2:], sw[2:], stride, pads, dil)
    if ho < 1 or wo < 1:
        what = f"filter {sw[2]}x{sw[3]}" + (f" dilated by {dil} (extent {effective(sw[2], dil[0])}x"
                                            f"{effective(sw[3], dil[1])})" if dil != (1, 1) else "")
        node.fail(ShapeError, f"{CONV_RULE}: input {sx[2]}x{sx[3]}, {what}, "
                  f"padding {pads}, stride {stride} gives {ho}x{wo}",
                  "use a smaller filter, stride or dilation, or pad the input (pad='same')")
    return (sx[0], sw[0], ho, wo), _float_dtype(node, in_types)


def _conv_ref(inputs, attrs, ctx):
    x, w = inputs[:2]
    return conv_ref(x, w, inputs[2] if len(inputs) == 3 else None, *geometry(attrs))


def _tag(attrs):
    """Rule-name suffix: the grouped / dilated variants of the conv gradient rules."""
    _, _, dil, groups = geometry(attrs)
    return ("-grouped" if groups != 1 else "") + ("-dilated" if dil != (1, 1) else "")


def _geo_kwargs(attrs):
    st, pads, dil, groups = geometry(attrs)
    return dict(stride=st, pads=pads, dilation=dil, groups=groups)


def _conv_grad(g, node, dy):
    x, w = node.inputs[:2]
    geo, tag = _geo_kwargs(node.attrs), _tag(node.attrs)
    with g.rule("conv:dX" + (tag or "-fullconv")):
        dx = g.conv_dx(dy, w, in_hw=tuple(x.shape[2:]), **geo)
    with g.rule("conv:dW" + tag):
        dw = g.conv_dw(x, dy, k_hw=tuple(w.shape[2:]), **geo)
    out = [dx, dw]
    if len(node.inputs) == 3:
        with g.rule("conv:db"):
            out.append(g.sum(dy, axes=(0, 2, 3)))
    return out


def _conv_flops(in_shapes, out_shape, attrs):
    k, c, kh, kw = in_shapes[1]
    n, _, ho, wo = out_shape
    return 2 * n * k * c * kh * kw * ho * wo


def _conv_torch(F, torch, ins, attrs, ctx):
    t, b, l, r = attrs["pads"]
    symmetric = t == b and l == r
    x = ins[0] if symmetric else F.pad(ins[0], (l, r, t, b))
    return F.conv2d(x, ins[1], ins[2] if len(ins) == 3 else None, stride=tuple(attrs["stride"]),
                    padding=(t, l) if symmetric else 0, dilation=tuple(attrs.get("dilation", (1, 1))),
                    groups=attrs.get("groups", 1))


register(OpDef("conv", _conv_infer, _conv_ref, _conv_grad, flops=_conv_flops,
               doc="2-D convolution (cross-correlation) NCHW x KCHW (+ bias); groups split the channels "
                   "(w: (K, C // groups, kh, kw), as torch), dilation spaces the filter taps",
               attrs={"stride": (1, 1), "pads": (0,) * 4, "dilation": (1, 1), "groups": 1},
               torch=_conv_torch))


def _conv_dx_infer(node, in_types):
    sdy, sw = in_types[0][0], in_types[1][0]
    return (sdy[0], sw[1] * geometry(node.attrs)[3], *node.attrs["in_hw"]), _float_dtype(node, in_types)


def _conv_dx_grad(g, node, dgrad):
    dy, w = node.inputs
    geo = _geo_kwargs(node.attrs)
    with g.rule("conv_dx:transpose"):
        return [g.conv(dgrad, w, **geo),
                g.conv_dw(dgrad, dy, k_hw=tuple(w.shape[2:]), **geo)]


register(OpDef("conv_dx", _conv_dx_infer,
               lambda ins, a, ctx: conv_dx_ref(ins[0], ins[1], a["stride"], a["pads"], a["in_hw"],
                                               *geometry(a)[2:]),
               _conv_dx_grad, flops=lambda i, o, a: _conv_flops([None, i[1]], i[0], a),
               doc="dL/dX of conv: full convolution of dL/dO with the rotated filter"))


def _conv_dw_infer(node, in_types):
    sx, sdy = in_types[0][0], in_types[1][0]
    return (sdy[1], sx[1] // geometry(node.attrs)[3], *node.attrs["k_hw"]), _float_dtype(node, in_types)


def _conv_dw_grad(g, node, dgrad):
    x, dy = node.inputs
    geo = _geo_kwargs(node.attrs)
    with g.rule("conv_dw:transpose"):
        return [g.conv_dx(dy, dgrad, in_hw=tuple(x.shape[2:]), **geo),
                g.conv(x, dgrad, **geo)]


register(OpDef("conv_dw", _conv_dw_infer,
               lambda ins, a, ctx: conv_dw_ref(ins[0], ins[1], a["stride"], a["pads"], a["k_hw"],
                                               *geometry(a)[2:]),
               _conv_dw_grad, flops=lambda i, o, a: _conv_flops([None, o], i[1], a),
               doc="dL/dW of conv: conv(X, dL/dO)"))
