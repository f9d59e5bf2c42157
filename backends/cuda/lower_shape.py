"""Data movement (transpose, concat, slice, unslice, pad2d, crop2d): fill + strided-copy kernels (up to
6-D; arrays of more dims fall back to the reference); reflect/edge padding and its crop: index-map
kernels (kernels/plane.py)."""
from graphc.backends.cuda.kernels.copy import copy_step, cstrides
from graphc.backends.cuda.kernels.device import fill_step, seq
from graphc.backends.cuda.kernels.plane import fold_step, pad_step
from graphc.backends.registry import lowerings
from graphc.ops.shape import _source_index

lowering, pattern_lowering = lowerings("cuda")

_COPY = "kernels/copy.py strided copy (up to 6-D; more: fallback)"


def _copy(ctx, space, src_strides, dst_strides, sbase=0, dbase=0, fill=None):
    """Input 0 copied into the output (after a fill); None (fallback) when the copy's rank is too high."""
    out = ctx.out()
    cp = copy_step(ctx.array(ctx.inputs[0]), out, space, src_strides, dst_strides, sbase=sbase, dbase=dbase)
    if cp is None or fill is None:
        return cp
    return seq([fill_step(out, fill), cp])


@lowering("transpose", kernel=_COPY)
def transpose(ctx):
    xst = cstrides(ctx.shape_of(ctx.inputs[0]))
    out_shape = ctx.shape_of(ctx.name)
    return _copy(ctx, out_shape, [xst[a] for a in ctx.attrs["axes"]], cstrides(out_shape))


@lowering("slice", kernel=_COPY)
def slice_(ctx):
    a = ctx.attrs
    xst = cstrides(ctx.shape_of(ctx.inputs[0]))
    out_shape = ctx.shape_of(ctx.name)
    return _copy(ctx, out_shape, xst, cstrides(out_shape), sbase=a["start"] * xst[a["axis"]])


@lowering("unslice", kernel="fill + " + _COPY)
def unslice(ctx):
    a = ctx.attrs
    gs = ctx.shape_of(ctx.inputs[0])
    ost = cstrides(ctx.shape_of(ctx.name))
    return _copy(ctx, gs, cstrides(gs), ost, dbase=a["start"] * ost[a["axis"]], fill=0)


def _index_maps(ctx, hw):
    """(rows, cols): the source row / column of each padded one (reflect/edge), for an hw-sized plane."""
    t, b, l, r = ctx.attrs["pads"]
    return _source_index(hw[0], t, b, ctx.attrs["mode"]), _source_index(hw[1], l, r, ctx.attrs["mode"])


@lowering("pad2d", kernel="fill + " + _COPY + "; reflect/edge: kernels/plane.py gather2d")
def pad2d(ctx):
    if ctx.attrs.get("mode", "constant") != "constant":
        xs = ctx.shape_of(ctx.inputs[0])
        return pad_step(ctx.array(ctx.inputs[0]), ctx.out(), xs, *_index_maps(ctx, xs[2:]))
    t, _, l, _ = ctx.attrs["pads"]
    xs, out_shape = ctx.shape_of(ctx.inputs[0]), ctx.shape_of(ctx.name)
    return _copy(ctx, xs, cstrides(xs), cstrides(out_shape), dbase=t * out_shape[3] + l, fill=ctx.attrs["value"])


@lowering("crop2d", kernel=_COPY + "; reflect/edge: kernels/plane.py fold2d")
def crop2d(ctx):
    if ctx.attrs.get("mode", "constant") != "constant":
        out_shape = ctx.shape_of(ctx.name)
        return fold_step(ctx.array(ctx.inputs[0]), ctx.out(), out_shape, *_index_maps(ctx, out_shape[2:]))
    t, _, l, _ = ctx.attrs["pads"]
    xs, out_shape = ctx.shape_of(ctx.inputs[0]), ctx.shape_of(ctx.name)
    return _copy(ctx, out_shape, cstrides(xs), cstrides(out_shape), sbase=t * xs[3] + l)


@lowering("concat", kernel=_COPY)
def concat(ctx):
    axis = ctx.attrs["axis"]
    out = ctx.out()
    ost = cstrides(ctx.shape_of(ctx.name))
    steps, start = [], 0
    for name in ctx.inputs:
        s = ctx.shape_of(name)
        step = copy_step(ctx.array(name), out, s, cstrides(s), ost, dbase=start * ost[axis])
        if step is None:
            return None
        steps.append(step)
        start += s[axis]
    return seq(steps)
