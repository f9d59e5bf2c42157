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


def out_hw(in_hw, k_hw, stride, pads):
    return (shapes.window_out(in_hw[0], k_hw[0], stride[0], pads[0] + pads[1]),
            shapes.window_out(in_hw[1], k_hw[1], stride[1], pads[2] + pads[3]))


def im2col(x, kh, kw, stride, pads):
    """(N, C, H, W) -> (N, C*kh*kw, Ho*Wo): each column is one receptive field (seeds/000)."""
    n, c, h, w = x.shape
    t, b, l, r = pads
    xp = np.pad(x, ((0, 0), (0, 0), (t, b), (l, r))) if any(pads) else x
    xp = np.ascontiguousarray(xp)
    ho, wo = out_hw((h, w), (kh, kw), stride, pads)
    sn, sc, sh, sw = xp.strides
    cols = as_strided(xp, (n, c, kh, kw, ho, wo), (sn, sc, sh, sw, sh * stride[0], sw * stride[1]))
    return cols.reshape(n, c * kh * kw, ho * wo)


def conv_ref(x, w, b, stride, pads):
    k, c, kh, kw = w.shape
    ho, wo = out_hw(x.shape[2:], (kh, kw), stride, pads)
    out = np.matmul(w.reshape(k, -1), im2col(x, kh, kw, stride, pads)).reshape(x.shape[0], k, ho, wo)
    if b is not None:
        out += b.reshape(1, k, 1, 1)
    return out


def conv_dw_ref(x, dy, stride, pads, k_hw):
    """dL/dW = conv(X, dL/dO): every filter tap sums input x gradient over all output positions."""
    n, k = dy.shape[:2]
    cols = im2col(x, k_hw[0], k_hw[1], stride, pads)                 # (N, C*kh*kw, P)
    dw = np.einsum("nkp,nqp->kq", dy.reshape(n, k, -1), cols)
    return dw.reshape(k, x.shape[1], *k_hw)


def conv_dx_ref(dy, w, stride, pads, in_hw):
    """dL/dX = full conv(rot180(W), dL/dO): dilate dL/dO by the stride, pad by F-1, convolve, crop."""
    n, k, ho, wo = dy.shape
    _, c, kh, kw = w.shape
    sh, sw = stride
    dil = np.zeros((n, k, (ho - 1) * sh + 1, (wo - 1) * sw + 1), dy.dtype)
    dil[:, :, ::sh, ::sw] = dy
    w_rot = np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))   # (C, K, kh, kw)
    full = conv_ref(dil, w_rot, None, (1, 1), (kh - 1, kh - 1, kw - 1, kw - 1))
    t, b, l, r = pads
    hp, wp = in_hw[0] + t + b, in_hw[1] + l + r
    dxp = np.zeros((n, c, hp, wp), dy.dtype)
    dxp[:, :, :full.shape[2], :full.shape[3]] = full   # rows past the last window get no gradient
    return dxp[:, :, t:t + in_hw[0], l:l + in_hw[1]]


# --- shape rules -------------------------------------------------------------------------------

def _check_4d(node, name, s):
    if len(s) != 4:
        node.fail(ShapeError, f"{name} must be 4-D NCHW/KCHW, got {shapes.fmt(s)}",
                  "reshape images to (batch, channels, height, width)")


def _conv_infer(node, in_types):
    sx, sw = in_types[0][0], in_types[1][0]
    _check_4d(node, "input", sx)
    _check_4d(node, "filters", sw)
    if sx[1] != sw[1]:
        node.fail(ShapeError, f"input has {sx[1]} channels but filters {shapes.fmt(sw)} expect {sw[1]}",
                  f"make the filter shape (K, {sx[1]}, KH, KW)")
    if len(in_types) == 3 and tuple(in_types[2][0]) != (sw[0],):
        node.fail(ShapeError, f"bias shape {shapes.fmt(in_types[2][0])} must be ({sw[0]},), one per filter",
                  f"declare the bias as ({sw[0]},)")
    stride, pads = node.attrs["stride"], node.attrs["pads"]
    if min(stride) < 1 or min(pads) < 0:
        node.fail(ShapeError, f"stride {stride} must be positive and padding {pads} non-negative", "")
    ho, wo = out_hw(sx[2:], sw[2:], stride, pads)
    if ho < 1 or wo < 1:
        node.fail(ShapeError, f"{CONV_RULE}: input {sx[2]}x{sx[3]}, filter {sw[2]}x{sw[3]}, "
                  f"padding {pads}, stride {stride} gives {ho}x{wo}",
                  "use a smaller filter or stride, or pad the input (pad='same')")
    return (sx[0], sw[0], ho, wo), _float_dtype(node, in_types)


def _conv_ref(inputs, attrs, ctx):
    x, w = inputs[:2]
    return conv_ref(x, w, inputs[2] if len(inputs) == 3 else None, attrs["stride"], attrs["pads"])


def _conv_grad(g, node, dy):
    x, w = node.inputs[:2]
    st, pads = node.attrs["stride"], node.attrs["pads"]
    with g.rule("conv:dX-fullconv"):
        dx = g.conv_dx(dy, w, stride=st, pads=pads, in_hw=tuple(x.shape[2:]))
    with g.rule("conv:dW"):
        dw = g.conv_dw(x, dy, stride=st, pads=pads, k_hw=tuple(w.shape[2:]))
    out = [dx, dw]
    if len(node.inputs) == 3:
        with g.rule("conv:db"):
            out.append(g.sum(dy, axes=(0, 2, 3)))
    return out


def _conv_flops(in_shapes, out_shape, attrs):
    k, c, kh, kw = in_shapes[1]
    n, _, ho, wo = out_shape
    return 2 * n * k * c * kh * kw * ho * wo


register(OpDef("conv", _conv_infer, _conv_ref, _conv_grad, flops=_conv_flops,
               doc="2-D convolution (cross-correlation) NCHW x KCHW (+ bias)", attrs={"stride": (1, 1), "pads": (0,) * 4}))


def _conv_dx_infer(node, in_types):
    sdy, sw = in_types[0][0], in_types[1][0]
    return (sdy[0], sw[1], *node.attrs["in_hw"]), _float_dtype(node, in_types)


def _conv_dx_grad(g, node, dgrad):
    dy, w = node.inputs
    a = node.attrs
    with g.rule("conv_dx:transpose"):
        return [g.conv(dgrad, w, stride=a["stride"], pads=a["pads"]),
                g.conv_dw(dgrad, dy, stride=a["stride"], pads=a["pads"], k_hw=tuple(w.shape[2:]))]


register(OpDef("conv_dx", _conv_dx_infer,
               lambda ins, a, ctx: conv_dx_ref(ins[0], ins[1], a["stride"], a["pads"], a["in_hw"]),
               _conv_dx_grad, flops=lambda i, o, a: _conv_flops([None, i[1]], i[0], a),
               doc="dL/dX of conv: full convolution of dL/dO with the rotated filter"))


def _conv_dw_infer(node, in_types):
    sx, sdy = in_types[0][0], in_types[1][0]
    return (sdy[1], sx[1], *node.attrs["k_hw"]), _float_dtype(node, in_types)


def _conv_dw_grad(g, node, dgrad):
    x, dy = node.inputs
    a = node.attrs
    with g.rule("conv_dw:transpose"):
        return [g.conv_dx(dy, dgrad, stride=a["stride"], pads=a["pads"], in_hw=tuple(x.shape[2:])),
                g.conv(x, dgrad, stride=a["stride"], pads=a["pads"])]


register(OpDef("conv_dw", _conv_dw_infer,
               lambda ins, a, ctx: conv_dw_ref(ins[0], ins[1], a["stride"], a["pads"], a["k_hw"]),
               _conv_dw_grad, flops=lambda i, o, a: _conv_flops([None, o], i[1], a),
               doc="dL/dW of conv: conv(X, dL/dO)"))
