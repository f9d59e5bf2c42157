"""The numba backend's convolutions: plain functions on numpy arrays (NCHW activations, KCHW filters,
float32 or float64; ``pads = (top, bottom, left, right)``; floor output sizes like PyTorch)::

    conv2d(x, w, b, stride, pads, relu=False, strategy=None, dilation=1, groups=1, out=None) -> y
    conv2d_relu_maxpool(x, w, b, stride, pads, pool_size, pool_stride, save_route=False,
                        strategy=None, dilation=1, groups=1) -> y or (y, route)
    conv2d_dx(dy, w, stride, pads, in_hw, strategy=None, dilation=1, groups=1, out=None) -> dx
    conv2d_dw(x, dy, stride, pads, k_hw, strategy=None, dilation=1, groups=1, out=None) -> dw
    bind_direct_fwd(x_shape, w_shape, has_bias, stride, pads, dtype, epi, pool, dil, groups)
        -> run(x, w, b, y, route, flag)
    choose_conv_strategy(x_shape, w_shape, stride, pads, dtype, op="conv2d", pool=None, dilation=(1, 1),
                         groups=1) -> str

``out``: the array to write the result into (C-contiguous, of the result's shape and dtype; returned),
so that the executor's memory plan holds conv results like any other value; else a new array.

Grouped convs (w: (K, C / groups, KH, KW), as torch) and dilated filters (taps ``dilation`` apart) run
on both strategies; depthwise convs (groups == C) have their own memory-bound stencil kernels in
depthwise.py.

Semantics follow PyTorch: ReLU gradient 0 at 0 (route < 0 where a window's max is <= 0), max-pool ties go
to the first element in row-major order, NaN propagates through max pooling and ReLU (numpy's rules). Three strategies
compute them: ``direct`` (kernels generated per shape, direct.py + gen.py), ``im2col`` (im2col +
BLAS GEMM, im2col.py) and ``winograd`` (F(4x4, 3x3) with BLAS products, winograd_gemm.py: 3x3 stride-1
forward convs, dL/dX and dL/dW; it hands the rest, and the route of a training pool, to direct);
``strategy=None`` uses the remembered choice of strategy.py.
"""
from __future__ import annotations

import numpy as np

from graphc.backends.numba.conv import direct, im2col, winograd_gemm
from graphc.backends.numba.conv.direct import bind_direct_fwd
from graphc.backends.numba.conv.layout import (check_conv, check_geometry, check_groups, check_out, clear_scratch,
                                              dilation_pair, float_array, out_hw, pool_hw)
from graphc.backends.numba.conv.strategy import STRATEGIES, choose_conv_strategy
from graphc.backends.numba.conv.strategy import resolve as resolve_strategy
from graphc.errors import BackendError

__all__ = ["conv2d", "conv2d_relu_maxpool", "conv2d_dx", "conv2d_dw", "bind_direct_fwd", "choose_conv_strategy",
           "clear_scratch", "STRATEGIES"]

_IMPL = {"direct": direct, "im2col": im2col, "winograd": winograd_gemm}


def _geo(dilation, groups):
    """The keyword arguments of the strategies for this dilation and groups (none for a plain conv)."""
    dil = dilation_pair(dilation)
    return {} if (dil, int(groups)) == ((1, 1), 1) else {"dil": dil, "groups": int(groups)}


def _extent(k, d):
    return (k - 1) * d + 1


def conv2d(x, w, b, stride, pads, relu=False, strategy=None, dilation=1, groups=1, out=None):
    """Cross-correlation y (N, K, Ho, Wo) = x (N, C, H, W) * w (K, C / groups, KH, KW) + b, zero padding
    ``pads = (top, bottom, left, right)``, filter taps ``dilation`` apart; ``relu`` applies max(., 0)
    in the epilogue."""
    x, w, b, stride, pads = check_conv(x, w, b, stride, pads, dilation, groups)
    geo = _geo(dilation, groups)
    dil = dilation_pair(dilation)
    out = check_out(out, (x.shape[0], w.shape[0]) + out_hw(x.shape[2], x.shape[3], _extent(w.shape[2], dil[0]),
                                                            _extent(w.shape[3], dil[1]), stride, pads),
                    x.dtype, "conv2d", (x, w, b))
    s = resolve_strategy(strategy, "conv2d", x.shape, w.shape, stride, pads, x.dtype, dilation=dil,
                         groups=int(groups))
    return _IMPL[s].forward(x, w, b, stride, pads, "store", relu=bool(relu), out=out, **geo)[0]


def conv2d_relu_maxpool(x, w, b, stride, pads, pool_size, pool_stride, save_route=False, strategy=None,
                        dilation=1, groups=1):
    """Fused conv (+bias) -> ReLU -> max pool (floor output size, like PyTorch).

    With ``save_route`` also returns ``route`` (int32, shaped like y): the flat index ``i*Wo + j``
    in the conv-output plane of each window's (first) maximum, or ~index (< 0) where that maximum is
    not > 0 so the ReLU masked it (the route_scatter kernel turns it into dL/d(pre-activation));
    graphc.ops.fused.maxpool_argmax_ref (relu=True) is the rule."""
    x, w, b, stride, pads = check_conv(x, w, b, stride, pads, dilation, groups)
    ps, pst = int(pool_size), int(pool_stride)
    N, C, H, W = x.shape
    K, _, KH, KW = w.shape
    dil = dilation_pair(dilation)
    Ho, Wo = out_hw(H, W, _extent(KH, dil[0]), _extent(KW, dil[1]), stride, pads)
    pool_hw(Ho, Wo, ps, pst, "conv2d_relu_maxpool")
    s = resolve_strategy(strategy, "conv2d_relu_maxpool", x.shape, w.shape, stride, pads, x.dtype, (ps, pst),
                         dil, int(groups))
    y, route = _IMPL[s].forward(x, w, b, stride, pads, "pool", ps=ps, pst=pst, save_route=bool(save_route),
                                **_geo(dilation, groups))
    return (y, route) if save_route else y


def conv2d_dx(dy, w, stride, pads, in_hw, strategy=None, dilation=1, groups=1, out=None):
    """dL/dX (N, C, H, W): full convolution of the stride-dilated dy with the 180-degree rotated
    filters (per group), cropped by the padding (input rows/columns no output reads get zero)."""
    dy = float_array(dy, "dy")
    w = np.ascontiguousarray(np.asarray(w, dtype=dy.dtype))
    H, W = (int(v) for v in in_hw)
    N, K, Ho, Wo = dy.shape
    dil = dilation_pair(dilation)
    x_shape = (N, w.shape[1] * int(groups), H, W)
    check_groups(x_shape[1], w.shape, groups)
    stride, pads = check_geometry(x_shape, w.shape, stride, pads, dil)
    if (Ho, Wo) != out_hw(H, W, _extent(w.shape[2], dil[0]), _extent(w.shape[3], dil[1]), stride, pads) \
            or K != w.shape[0]:
        raise BackendError(f"conv2d_dx: dy {dy.shape} does not fit w {w.shape}, input {H}x{W}")
    out = check_out(out, x_shape, dy.dtype, "conv2d_dx", (dy, w))
    s = resolve_strategy(strategy, "conv2d_dx", x_shape, w.shape, stride, pads, dy.dtype, dilation=dil,
                         groups=int(groups))
    return _IMPL[s].grad_input(dy, w, stride, pads, (H, W), out=out, **_geo(dilation, groups))


def conv2d_dw(x, dy, stride, pads, k_hw, strategy=None, dilation=1, groups=1, out=None):
    """dL/dW (K, C / groups, KH, KW) = correlation of the padded input with dy (per-task partial sums
    over groups of images, then a reduction)."""
    x = float_array(x, "x")
    dy = np.ascontiguousarray(np.asarray(dy, dtype=x.dtype))
    KH, KW = (int(v) for v in k_hw)
    N, C, H, W = x.shape
    K = dy.shape[1]
    dil = dilation_pair(dilation)
    if int(groups) < 1 or C % int(groups):
        raise BackendError(f"conv2d_dw: groups={groups} must divide the {C} input channels")
    w_shape = (K, C // int(groups), KH, KW)
    check_groups(C, w_shape, groups)
    stride, pads = check_geometry(x.shape, w_shape, stride, pads, dil)
    if dy.shape != (N, K) + out_hw(H, W, _extent(KH, dil[0]), _extent(KW, dil[1]), stride, pads):
        raise BackendError(f"conv2d_dw: dy {dy.shape} does not fit x {x.shape} and a {KH}x{KW} filter")
    out = check_out(out, w_shape, x.dtype, "conv2d_dw", (x, dy))
    s = resolve_strategy(strategy, "conv2d_dw", x.shape, w_shape, stride, pads, x.dtype, dilation=dil,
                         groups=int(groups))
    return _IMPL[s].grad_weights(x, dy, stride, pads, (KH, KW), out=out, **_geo(dilation, groups))
