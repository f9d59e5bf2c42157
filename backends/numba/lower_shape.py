"""Data movement (transpose, concat, slice, unslice, pad2d, crop2d): numpy copies into the planned
buffer (no arithmetic: numpy's copy loops are as fast as a kernel); reflect/edge padding and its crop:
index-map kernels (kernels/plane.py)."""
import numpy as np

from graphc.backends.numba.kernels import plane as plane_kernels
from graphc.backends.registry import lowerings
from graphc.ops.shape import _source_index

lowering, pattern_lowering = lowerings("numba")

_COPY = "numpy copy into the planned buffer"


def _copy_in(ctx, src_index=lambda a: a, dst=None, fill=None):
    """A step copying input 0 (indexed by src_index) into dst (default: the output), after filling the
    output with `fill` when given."""
    out = ctx.out()
    dst = out if dst is None else dst
    values, xi = ctx.values, ctx.index(ctx.inputs[0])
    if fill is None:
        def step():
            np.copyto(dst, src_index(values[xi]))
    else:
        def step():
            out.fill(fill)
            np.copyto(dst, values[xi])
    return step


def _along(ndim, axis, start, stop):
    idx = [slice(None)] * ndim
    idx[axis] = slice(start, stop)
    return tuple(idx)


@lowering("transpose", kernel=_COPY)
def transpose(ctx):
    axes = tuple(ctx.attrs["axes"])
    return _copy_in(ctx, lambda a: np.transpose(a, axes))


@lowering("slice", kernel=_COPY)
def slice_(ctx):
    a = ctx.attrs
    idx = _along(len(ctx.shape_of(ctx.name)), a["axis"], a["start"], a["stop"])
    return _copy_in(ctx, lambda x: x[idx])


@lowering("unslice", kernel="fill + " + _COPY)
def unslice(ctx):
    a, out = ctx.attrs, ctx.out()
    width = ctx.shape_of(ctx.inputs[0])[a["axis"]]
    return _copy_in(ctx, dst=out[_along(out.ndim, a["axis"], a["start"], a["start"] + width)], fill=0)


def _index_maps(ctx, hw):
    """(rows, cols): the source row / column of each padded one (reflect/edge), for an hw-sized plane."""
    t, b, l, r = ctx.attrs["pads"]
    mode = ctx.attrs["mode"]
    return _source_index(hw[0], t, b, mode).astype(np.int64), _source_index(hw[1], l, r, mode).astype(np.int64)


@lowering("pad2d", kernel="fill + " + _COPY + "; reflect/edge: kernels/plane.py gather2d_k")
def pad2d(ctx):
    if ctx.attrs.get("mode", "constant") != "constant":
        maps = _index_maps(ctx, ctx.shape_of(ctx.inputs[0])[2:])
        return ctx.call(plane_kernels.gather2d_k, ctx.inputs, (*maps, ctx.out()))
    out = ctx.out()
    t, bt, l, r = ctx.attrs["pads"]
    H, W = out.shape[2:]
    inner = out[:, :, t:H - bt, l:W - r]
    # only the border is filled (the copy writes the rest): filling the whole plane first made ResNet-18's
    # padded max-pool input (64 x 114 x 114) take 0.125 ms instead of 0.08
    border = [b for b in (out[:, :, :t], out[:, :, H - bt:], out[:, :, t:H - bt, :l], out[:, :, t:H - bt, W - r:])
              if b.size]
    value, values, xi = ctx.attrs["value"], ctx.values, ctx.index(ctx.inputs[0])

    def step():
        for b in border:
            b.fill(value)
        np.copyto(inner, values[xi])
    return step


@lowering("crop2d", kernel=_COPY + "; reflect/edge: kernels/plane.py scatter2d_k")
def crop2d(ctx):
    if ctx.attrs.get("mode", "constant") != "constant":
        maps = _index_maps(ctx, ctx.shape_of(ctx.name)[2:])
        return ctx.call(plane_kernels.scatter2d_k, ctx.inputs, (*maps, ctx.out()))
    t, _, l, _ = ctx.attrs["pads"]
    h, w = ctx.shape_of(ctx.name)[2:]
    return _copy_in(ctx, lambda x: x[:, :, t:t + h, l:l + w])


@lowering("concat", kernel=_COPY)
def concat(ctx):
    out = ctx.out()
    axis = ctx.attrs["axis"]
    parts, start = [], 0
    for name in ctx.inputs:
        width = ctx.shape_of(name)[axis]
        parts.append((ctx.index(name), out[_along(out.ndim, axis, start, start + width)]))
        start += width
    values = ctx.values

    def step():
        for i, dst in parts:
            np.copyto(dst, values[i])
    return step
