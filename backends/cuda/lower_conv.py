"""Convolutions and the fused conv patterns: the implicit GEMM (kernels/gemm.py; groups a grid dimension,
dilation in the patch index math), the depthwise stencils (kernels/depthwise.py: groups == C, one input
channel per filter) and the fused conv-ReLU-pool kernel (kernels/conv_pool.py)."""
from graphc.backends.cuda.kernels.conv_pool import conv_pool_step
from graphc.backends.cuda.kernels.depthwise import DW_MAXT, dw_dw_step, dw_dx_step, dw_forward_step
from graphc.backends.cuda.kernels.gemm import conv_dw_step, conv_dx_step, conv_geometry, conv_step
from graphc.backends.registry import lowerings
from graphc.ops.conv import geometry

lowering, pattern_lowering = lowerings("cuda")

_DEPTHWISE = "depthwise (groups == C): kernels/depthwise.py"


def _geom(x_shape, w_shape, attrs):
    """gemm.conv_geometry of a conv-family node's attributes."""
    stride, pads, dil, groups = geometry(attrs)
    return conv_geometry(x_shape, w_shape, stride, pads, dil, groups)


def _depthwise(geom, w_shape):
    """The depthwise kernels' geometry (M filters per channel in place of K, no groups), or None when the
    conv is not depthwise."""
    groups = geom[-1]
    if groups == 1 or groups != geom[1] or w_shape[1] != 1:
        return None
    return geom[:4] + (geom[4] // geom[1],) + geom[5:15]


def _forward(ctx, attrs, relu=False, clip=None):
    x, w, *b = ctx.arrays()
    ws = ctx.shape_of(ctx.inputs[1])
    geom = _geom(ctx.shape_of(ctx.inputs[0]), ws, attrs)
    dw = _depthwise(geom, ws)
    if dw is not None:
        return dw_forward_step(x, w, b[0] if b else None, ctx.out(), dw, (0.0, None) if relu else clip)
    return conv_step(x, w, b[0] if b else None, ctx.out(), geom, relu=relu, clip=clip)


@lowering("conv", kernel=f"kernels/gemm.py implicit GEMM igemm_fwd (bias in the epilogue; groups, dilation); "
                         f"{_DEPTHWISE} dw_conv_fwd (one thread per output)")
def conv(ctx):
    return _forward(ctx, ctx.attrs)


@pattern_lowering("conv_relu", kernel=f"kernels/gemm.py implicit GEMM igemm_fwd (bias + ReLU epilogue); "
                                      f"{_DEPTHWISE} dw_conv_fwd (ReLU epilogue)")
def conv_relu(ctx):
    return _forward(ctx, ctx.members["conv"]["attrs"], relu=True)


@pattern_lowering("conv_clip", kernel=f"kernels/gemm.py implicit GEMM igemm_fwd (bias + clip epilogue, ReLU6); "
                                      f"{_DEPTHWISE} dw_conv_fwd (clip epilogue)")
def conv_clip(ctx):
    act = ctx.members["act"]["attrs"]
    return _forward(ctx, ctx.members["conv"]["attrs"], clip=(act.get("lo"), act.get("hi")))


@pattern_lowering("conv_relu_maxpool",
                  kernel="kernels/conv_pool.py conv_relu_pool (one thread per pooled output; saves the route in "
                         "training); windows > 16, filters > 1024 taps, groups or dilation: igemm + maxpool + "
                         "ReLU/route fix-ups")
def conv_relu_maxpool(ctx):
    conv_attrs, pool = ctx.members["conv"]["attrs"], ctx.members["pool"]["attrs"]
    x, w, *b = ctx.arrays()
    geom = _geom(ctx.shape_of(ctx.inputs[0]), ctx.shape_of(ctx.inputs[1]), conv_attrs)
    route = ctx.out(1) if len(ctx.result_index) > 1 else None
    return conv_pool_step(x, w, b[0] if b else None, ctx.out(0), route, geom, tuple(pool["size"]),
                          tuple(pool["stride"]), ctx.alloc)


@lowering("conv_dx", kernel=f"kernels/gemm.py implicit GEMM igemm_dx; {_DEPTHWISE} dw_conv_dx (the transposed "
                            "stencil, one thread per input element)")
def conv_dx(ctx):
    dy, w = ctx.arrays()
    n = ctx.shape_of(ctx.inputs[0])[0]
    ws = ctx.shape_of(ctx.inputs[1])
    geom = _geom((n, ws[1] * geometry(ctx.attrs)[3]) + tuple(ctx.attrs["in_hw"]), ws, ctx.attrs)
    dw = _depthwise(geom, ws)
    if dw is not None:
        return dw_dx_step(dy, w, ctx.out(), dw)
    return conv_dx_step(dy, w, ctx.out(), geom)


@lowering("conv_dw", kernel=f"kernels/gemm.py implicit GEMM igemm_dw (split-K); {_DEPTHWISE} dw_conv_dw "
                            "(per-channel reductions, per-thread partial sums per tap)")
def conv_dw(ctx):
    x, dy = ctx.arrays()
    xs = ctx.shape_of(ctx.inputs[0])
    k = ctx.shape_of(ctx.inputs[1])[1]
    ws = (k, xs[1] // geometry(ctx.attrs)[3]) + tuple(ctx.attrs["k_hw"])
    geom = _geom(xs, ws, ctx.attrs)
    dw = _depthwise(geom, ws)
    if dw is not None and ws[2] * ws[3] <= DW_MAXT:
        return dw_dw_step(x, dy, ctx.out(), dw, ctx.alloc)
    return conv_dw_step(x, dy, ctx.out(), geom)
