"""Shape ops: reshape, flatten, transpose, concat and slice. They move values without arithmetic."""
import numpy as np

from graphc import shapes
from graphc.errors import ShapeError
from graphc.ops import OpDef, register


def _reshape_infer(node, in_types):
    s, dt = in_types[0]
    target = list(node.attrs["shape"])
    known = shapes.numel(s)
    if target.count(-1) > 1:
        node.fail(ShapeError, f"reshape target {tuple(target)} has more than one -1", "give all dims but one")
    sym_in = [d for d in s if isinstance(d, str)]
    sym_out = [d for d in target if isinstance(d, str)]
    if sorted(sym_in) != sorted(sym_out):
        node.fail(ShapeError, f"reshape {shapes.fmt(s)} -> {tuple(target)} must keep the symbolic dims {sym_in}",
                  "keep the batch dim: e.g. (N, -1), or use g.flatten")
    static_in = shapes.numel([d for d in s if isinstance(d, int)])
    static_out = shapes.numel([d for d in target if isinstance(d, int) and d != -1])
    if -1 in target:
        if static_out == 0 or static_in % static_out:
            node.fail(ShapeError, f"cannot reshape {shapes.fmt(s)} to {tuple(target)}", "")
        target[target.index(-1)] = static_in // static_out
    elif static_in != static_out:
        node.fail(ShapeError, f"cannot reshape {shapes.fmt(s)} ({known or static_in} elements) to "
                  f"{tuple(target)}", "the element counts must match")
    return tuple(target), dt


def _reshape_ref(inputs, attrs, ctx):
    return inputs[0].reshape(ctx.out_shape)


def _reshape_grad(g, node, dy):
    with g.rule("reshape:undo"):
        return [g.reshape_like(dy, node.inputs[0])]


register(OpDef("reshape", _reshape_infer, _reshape_ref, _reshape_grad, doc="reshape (symbolic batch dim kept)",
               alias=True, to_shape=True, torch=lambda F, torch, ins, a, ctx: ins[0].reshape(ctx.resolve(a["shape"]))))
register(OpDef("reshape_like", lambda node, t: (t[1][0], t[0][1]),
               lambda ins, a, ctx: ins[0].reshape(ins[1].shape),
               lambda g, n, d: [_rule(g, "reshape:undo", lambda: g.reshape_like(d, n.inputs[0])), None],
               doc="reshape to the shape of `like`", alias=True, to_shape=True))


def _transpose_infer(node, in_types):
    s, dt = in_types[0]
    axes = node.attrs["axes"]
    if sorted(axes) != list(range(len(s))):
        node.fail(ShapeError, f"axes {axes} are not a permutation of {len(s)} dims", "")
    return tuple(s[a] for a in axes), dt


def _transpose_grad(g, node, dy):
    inv = tuple(int(i) for i in np.argsort(node.attrs["axes"]))
    with g.rule("transpose:undo"):
        return [g.transpose(dy, inv)]


register(OpDef("transpose", _transpose_infer, lambda ins, a, ctx: np.ascontiguousarray(np.transpose(ins[0], a["axes"])),
               _transpose_grad, doc="permute axes", torch=lambda F, torch, ins, a, ctx: ins[0].permute(*a["axes"])))


def _concat_infer(node, in_types):
    axis = node.attrs["axis"]
    first = in_types[0][0]
    if not 0 <= axis < len(first):
        node.fail(ShapeError, f"concat axis {axis} is out of range for {shapes.fmt(first)}", "")
    for s, _ in in_types[1:]:
        if len(s) != len(first) or any(a != b for i, (a, b) in enumerate(zip(s, first)) if i != axis):
            node.fail(ShapeError, "concat inputs must agree on every dim but the concat axis: " +
                      ", ".join(shapes.fmt(s) for s, _ in in_types), "")
    if any(isinstance(s[axis], str) for s, _ in in_types):
        node.fail(ShapeError, "cannot concat along the symbolic batch dim", "concat along channels (axis=1)")
    out = list(first)
    out[axis] = sum(s[axis] for s, _ in in_types)
    dts = {dt for _, dt in in_types}
    return tuple(out), "float64" if "float64" in dts else dts.pop()


def _concat_grad(g, node, dy):
    axis, start, out = node.attrs["axis"], 0, []
    with g.rule("concat:split"):
        for x in node.inputs:
            out.append(g.slice(dy, axis=axis, start=start, stop=start + x.shape[axis]))
            start += x.shape[axis]
    return out


register(OpDef("concat", _concat_infer, lambda ins, a, ctx: np.concatenate(ins, axis=a["axis"]), _concat_grad,
               doc="concatenate along an axis (channels for Inception blocks)",
               torch=lambda F, torch, ins, a, ctx: torch.cat(ins, dim=a["axis"])))


def _slice_infer(node, in_types):
    s, dt = in_types[0]
    a = node.attrs
    axis, start, stop = a["axis"], a["start"], a["stop"]
    if not (shapes.is_int(axis) and 0 <= axis < len(s)):
        node.fail(ShapeError, f"slice axis {axis!r} is out of range for {shapes.fmt(s)}", "")
    if isinstance(s[axis], str):
        node.fail(ShapeError, f"cannot slice along the symbolic batch dim {s[axis]}", "slice another axis")
    if not (shapes.is_int(start) and shapes.is_int(stop) and 0 <= start < stop <= s[axis]):
        node.fail(ShapeError, f"slice [{start!r}:{stop!r}] along axis {axis} of size {s[axis]} must have "
                  f"0 <= start < stop <= {s[axis]}", "")
    out = list(s)
    out[axis] = stop - start
    return tuple(out), dt


def _slice_ref(inputs, attrs, ctx):
    idx = [slice(None)] * inputs[0].ndim
    idx[attrs["axis"]] = slice(attrs["start"], attrs["stop"])
    return np.ascontiguousarray(inputs[0][tuple(idx)])


def _unslice_ref(inputs, attrs, ctx):
    g, like = inputs
    out = np.zeros(like.shape, g.dtype)
    idx = [slice(None)] * g.ndim
    idx[attrs["axis"]] = slice(attrs["start"], attrs["start"] + g.shape[attrs["axis"]])
    out[tuple(idx)] = g
    return out


register(OpDef("slice", _slice_infer, _slice_ref,
               lambda g, n, d: [_rule(g, "slice:unslice",
                                      lambda: g.unslice(d, n.inputs[0], axis=n.attrs["axis"], start=n.attrs["start"]))],
               doc="x[start:stop] along one axis",
               torch=lambda F, torch, ins, a, ctx: ins[0].narrow(a["axis"], a["start"], a["stop"] - a["start"])))
register(OpDef("unslice", lambda node, t: (t[1][0], t[0][1]), _unslice_ref,
               lambda g, n, d: [_rule(g, "unslice:slice", lambda: g.slice(
                   d, axis=n.attrs["axis"], start=n.attrs["start"],
                   stop=n.attrs["start"] + n.inputs[0].shape[n.attrs["axis"]])), None],
               doc="places g into zeros shaped like `like` (slice's gradient)"))


PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "edge"}    # graphc -> numpy np.pad mode


def _pad_mode(node):
    mode = node.attrs.get("mode", "constant")
    if mode not in PAD_MODES:
        node.fail(ShapeError, f"unknown padding mode {mode!r}", f"use one of {', '.join(PAD_MODES)}")
    return mode


def _pad_infer(node, in_types):
    s, dt = in_types[0]
    t, b, l, r = node.attrs["pads"]
    if len(s) != 4:
        node.fail(ShapeError, f"pad2d takes NCHW input, got {shapes.fmt(s)}", "")
    if min(t, b, l, r) < 0:
        node.fail(ShapeError, f"pads {node.attrs['pads']} must be >= 0", "crop with g.crop2d instead")
    if _pad_mode(node) == "reflect" and (max(t, b) >= s[2] or max(l, r) >= s[3]):
        node.fail(ShapeError, f"reflect padding {node.attrs['pads']} must be smaller than the input's "
                  f"{s[2]}x{s[3]} plane (torch's limit)", "pad less, or use mode='edge'")
    return (s[0], s[1], s[2] + t + b, s[3] + l + r), dt


def _pad_ref(inputs, attrs, ctx):
    t, b, l, r = attrs["pads"]
    mode = attrs.get("mode", "constant")
    widths = ((0, 0), (0, 0), (t, b), (l, r))
    if mode == "constant":
        return np.pad(inputs[0], widths, constant_values=attrs["value"])
    return np.pad(inputs[0], widths, mode=PAD_MODES[mode])


def _crop_infer(node, in_types):
    s, dt = in_types[0]
    t, b, l, r = node.attrs["pads"]
    if len(s) != 4 or min(t, b, l, r) < 0 or \
            any(isinstance(d, int) and d - p < 1 for d, p in ((s[2], t + b), (s[3], l + r))):
        node.fail(ShapeError, f"cannot crop {(t, b, l, r)} (top, bottom, left, right) from {shapes.fmt(s)}",
                  "crop less than the height and width of an NCHW value")
    if _pad_mode(node) == "reflect" and (max(t, b) >= s[2] - t - b or max(l, r) >= s[3] - l - r):
        node.fail(ShapeError, f"a reflect border {node.attrs['pads']} must be smaller than the "
                  f"{s[2] - t - b}x{s[3] - l - r} plane it came from", "crop less, or use mode='edge'")
    return (s[0], s[1], s[2] - t - b, s[3] - l - r), dt


def _source_index(n, before, after, mode):
    """For each row of a padded axis, the input row it copies (reflect/edge padding)."""
    return np.pad(np.arange(n), (before, after), mode=PAD_MODES[mode])


def _crop_ref(inputs, attrs, ctx):
    t, b, l, r = attrs["pads"]
    x = inputs[0]
    h, w = x.shape[2] - t - b, x.shape[3] - l - r
    mode = attrs.get("mode", "constant")
    if mode == "constant":
        return np.ascontiguousarray(x[:, :, t:t + h, l:l + w])
    # the transpose of a reflect/edge pad: every padded pixel's value goes back to its source pixel
    rows = np.zeros(x.shape[:2] + (h, x.shape[3]), x.dtype)
    np.add.at(rows, (slice(None), slice(None), _source_index(h, t, b, mode)), x)
    out = np.zeros(x.shape[:2] + (h, w), x.dtype)
    np.add.at(out, (slice(None), slice(None), slice(None), _source_index(w, l, r, mode)), rows)
    return out


def _torch_pads(pads):
    """(top, bottom, left, right) -> F.pad's order (left, right, top, bottom)."""
    t, b, l, r = pads
    return (l, r, t, b)


def _pad_torch(F, torch, ins, a, ctx):
    mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}[a.get("mode", "constant")]
    if mode == "constant":
        return F.pad(ins[0], _torch_pads(a["pads"]), value=a["value"])
    return F.pad(ins[0], _torch_pads(a["pads"]), mode=mode)


register(OpDef("pad2d", _pad_infer, _pad_ref,
               lambda g, n, d: [_rule(g, "pad:crop", lambda: g.crop2d(d, n.attrs["pads"], n.attrs.get("mode", "constant")))],
               doc="pads H and W: a constant (-inf before a padded max pool), reflection or the edge",
               torch=_pad_torch))
register(OpDef("crop2d", _crop_infer, _crop_ref,
               lambda g, n, d: [_rule(g, "crop:pad", lambda: g.pad2d(d, n.attrs["pads"], 0.0,
                                                                     n.attrs.get("mode", "constant")))],
               doc="removes a border from H and W (pad2d's gradient; reflect/edge: folds it back)"))


def _rule(g, rule, fn):
    with g.rule(rule):
        return fn()
