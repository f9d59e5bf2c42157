"""Convolutions and the fused conv patterns: the implicit GEMM (kernels/gemm.py) and the fused
conv-ReLU-pool kernel (kernels/conv_pool.py)."""
from graphc.backends.cuda.kernels.conv_pool import conv_pool_step
from graphc.backends.cuda.kernels.gemm import conv_dw_step, conv_dx_step, conv_geometry, conv_step
from graphc.backends.registry import lowerings
from graphc.ops.conv import is_plain as is_plain_conv

lowering, pattern_lowering = lowerings("cuda")


def _forward(ctx, attrs, relu):
    x, w, *b = ctx.arrays()
    geom = conv_geometry(ctx.shape_of(ctx.inputs[0]), ctx.shape_of(ctx.inputs[1]), tuple(attrs["stride"]),
                         tuple(attrs["pads"]))
    return conv_step(x, w, b[0] if b else None, ctx.out(), geom, relu=relu)


@lowering("conv", kernel="kernels/gemm.py implicit GEMM igemm_fwd (bias in the epilogue)")
def conv(ctx):
    if not is_plain_conv(ctx.attrs):
        return None                     # grouped / dilated: host fallback until they have kernels
    return _forward(ctx, ctx.attrs, relu=False)


@pattern_lowering("conv_relu", kernel="kernels/gemm.py implicit GEMM igemm_fwd (bias + ReLU epilogue)")
def conv_relu(ctx):
    return _forward(ctx, ctx.members["conv"]["attrs"], relu=True)


@pattern_lowering("conv_relu_maxpool",
                  kernel="kernels/conv_pool.py conv_relu_pool (one thread per pooled output; saves the route in "
                         "training); windows > 16 or filters > 1024 taps: igemm + maxpool + ReLU/route fix-ups")
def conv_relu_maxpool(ctx):
    conv_attrs, pool = ctx.members["conv"]["attrs"], ctx.members["pool"]["attrs"]
    x, w, *b = ctx.arrays()
    geom = conv_geometry(ctx.shape_of(ctx.inputs[0]), ctx.shape_of(ctx.inputs[1]), tuple(conv_attrs["stride"]),
                         tuple(conv_attrs["pads"]))
    route = ctx.out(1) if len(ctx.result_index) > 1 else None
    return conv_pool_step(x, w, b[0] if b else None, ctx.out(0), route, geom, tuple(pool["size"]),
                          tuple(pool["stride"]), ctx.alloc)


@lowering("conv_dx", kernel="kernels/gemm.py implicit GEMM igemm_dx")
def conv_dx(ctx):
    a = ctx.attrs
    if not is_plain_conv(a):
        return None
    dy, w = ctx.arrays()
    n = ctx.shape_of(ctx.inputs[0])[0]
    ws = ctx.shape_of(ctx.inputs[1])
    geom = conv_geometry((n, ws[1]) + tuple(a["in_hw"]), ws, tuple(a["stride"]), tuple(a["pads"]))
    return conv_dx_step(dy, w, ctx.out(), geom)


@lowering("conv_dw", kernel="kernels/gemm.py implicit GEMM igemm_dw (split-K)")
def conv_dw(ctx):
    a = ctx.attrs
    if not is_plain_conv(a):
        return None
    x, dy = ctx.arrays()
    xs = ctx.shape_of(ctx.inputs[0])
    k = ctx.shape_of(ctx.inputs[1])[1]
    geom = conv_geometry(xs, (k, xs[1]) + tuple(a["k_hw"]), tuple(a["stride"]), tuple(a["pads"]))
    return conv_dw_step(x, dy, ctx.out(), geom)
