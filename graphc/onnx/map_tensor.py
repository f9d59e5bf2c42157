"""ONNX ops that move data without arithmetic -> graphc's reshape, transpose, concat, slice, dropout.

The batch dim stays symbolic: a reshape may carry it ("N" in a folded shape vector, a 0 that copies it,
or a -1 that stands for exactly it) but never merge it with other dims, since graphc binds it at run time.
"""
import numpy as np

from graphc import shapes
from graphc.onnx.importer import ONNX_DTYPES
from graphc.onnx.map_elementwise import floats
from graphc.onnx.registry import onnx_op

INT_MAX = 2 ** 31 - 1     # exporters write INT64_MAX or INT32_MAX for "to the end"


def reshape_to(ctx, x, target, name):
    """g.reshape to an ONNX target (ints, one -1, "N"), keeping graphc's symbolic batch dim."""
    target = list(target)
    sym = [d for d in x.shape if isinstance(d, str)]
    if sym and not any(isinstance(d, str) for d in target):
        static_in = shapes.numel([d for d in x.shape if isinstance(d, int)])
        known = shapes.numel([d for d in target if d != -1])
        if len(sym) == 1 and -1 in target and known == static_in:
            target[target.index(-1)] = sym[0]
        else:
            ctx.unsupported(f"reshape of {tuple(x.shape)} to {tuple(target)} would merge the batch dim with "
                            "other dims; graphc keeps the batch dim symbolic. Fix: reshape to (batch, -1) or "
                            "export with a fixed batch size")
    return ctx.g.reshape(x, tuple(target), name=name)


@onnx_op("Reshape", const_inputs=(1,))
def reshape(ctx):
    x = ctx.x(0)
    spec = ctx.const(1, symbolic=True).ravel()
    allowzero = int(ctx.attr("allowzero", 0))
    target = []
    for i, d in enumerate(spec):
        if isinstance(d, str):
            target.append(d)
        elif int(d) == 0 and not allowzero:
            target.append(x.shape[i])          # 0 copies the input's dim
        elif int(d) == 0:
            ctx.unsupported("a zero-size dim (allowzero=1): graphc tensors have no empty dims",
                            attribute="allowzero")
        else:
            target.append(int(d))
    return reshape_to(ctx, x, target, ctx.out())


@onnx_op("Flatten")
def flatten(ctx):
    x = ctx.x(0)
    s = x.shape
    axis = int(ctx.attr("axis", 1))
    axis = axis + len(s) if axis < 0 else axis
    head, tail = s[:axis], s[axis:]
    lead = head[0] if len(head) == 1 else shapes.numel(head)
    if lead is None:
        ctx.unsupported(f"flatten of {tuple(s)} at axis {axis} would merge the batch dim with other dims",
                        attribute="axis")
    if any(isinstance(d, str) for d in tail):
        ctx.unsupported(f"flatten of {tuple(s)} at axis {axis} would merge the batch dim with other dims",
                        attribute="axis")
    return ctx.g.reshape(x, (lead, shapes.numel(tail)), name=ctx.out())


@onnx_op("Shape")
def shape(ctx):
    dims = list(ctx.shape(0))[ctx.attr("start", 0):ctx.attr("end")]
    if any(isinstance(d, str) for d in dims):
        return np.array(dims, dtype=object)     # carries the batch dim as "N" (see the importer)
    return np.array(dims, dtype=np.int64)


@onnx_op("Transpose")
def transpose(ctx):
    x = ctx.x(0)
    perm = ctx.attr("perm")
    perm = tuple(reversed(range(len(x.shape)))) if perm is None else tuple(perm)
    return ctx.g.transpose(x, perm, name=ctx.out())


@onnx_op("Concat")
def concat(ctx):
    xs = [ctx.x(i) for i in range(len(ctx.node.input)) if ctx.has(i)]
    axis = int(ctx.attr("axis"))
    if len(xs) == 1:
        return xs[0]
    return ctx.g.concat(xs, axis=axis, name=ctx.out())


def _axes(ctx, attr_until):
    """Axes from the attribute (opset < attr_until) or input 1."""
    a = ctx.attr("axes") if ctx.opset < attr_until else ctx.const(1)
    return None if a is None else [int(v) for v in np.ravel(a)]


@onnx_op("Squeeze", const_inputs=(1,))
def squeeze(ctx):
    x = ctx.x(0)
    s = x.shape
    axes = _axes(ctx, 13)
    axes = [i for i, d in enumerate(s) if d == 1] if axes is None else [a % len(s) for a in axes]
    if any(s[a] != 1 for a in axes):
        ctx.unsupported(f"squeezes axes {axes} of {tuple(s)}, which are not all 1")
    return reshape_to(ctx, x, [d for i, d in enumerate(s) if i not in axes], ctx.out())


@onnx_op("Unsqueeze", const_inputs=(1,))
def unsqueeze(ctx):
    x = ctx.x(0)
    s = list(x.shape)
    rank = len(s) + len(_axes(ctx, 13) or [])
    axes = sorted(a % rank for a in _axes(ctx, 13) or [])
    for a in axes:
        s.insert(a, 1)
    return reshape_to(ctx, x, s, ctx.out())


def _slice_spec(ctx):
    if ctx.opset < 10:
        starts, ends = ctx.attr("starts"), ctx.attr("ends")
        axes, steps = ctx.attr("axes"), None
    else:
        starts, ends = ctx.const(1).ravel(), ctx.const(2).ravel()
        axes, steps = ctx.const(3), ctx.const(4)
    axes = range(len(starts)) if axes is None else np.ravel(axes)
    steps = [1] * len(starts) if steps is None else np.ravel(steps)
    return [(int(a), int(b), int(c), int(d)) for a, b, c, d in zip(starts, ends, axes, steps)]


def _clamp(i, n):
    return min(max(i + n if i < 0 else i, 0), n)


@onnx_op("Slice", const_inputs=(1, 2, 3, 4))
def slice_(ctx):
    x = ctx.x(0)
    cuts = []
    for start, end, axis, step in _slice_spec(ctx):
        axis %= len(x.shape)
        n = x.shape[axis]
        if step != 1:
            ctx.unsupported(f"step {step}: graphc's slice takes contiguous ranges")
        if isinstance(n, str):
            if start == 0 and end >= INT_MAX:
                continue
            ctx.unsupported("slices the batch dim, whose size graphc knows only at run time")
        start, end = _clamp(start, n), _clamp(end, n)
        if end <= start:
            ctx.unsupported("an empty slice: graphc tensors have no empty dims")
        if (start, end) != (0, n):
            cuts.append((axis, start, end))
    y = x
    for k, (axis, start, end) in enumerate(cuts):
        y = ctx.g.slice(y, axis, start, end, name=ctx.out() if k == len(cuts) - 1 else ctx.tmp(f"slice{k}"))
    return y


@onnx_op("Split", const_inputs=(1,))
def split(ctx):
    x = ctx.x(0)
    axis = int(ctx.attr("axis", 0)) % len(x.shape)
    n = x.shape[axis]
    if isinstance(n, str):
        ctx.unsupported("splits the batch dim, whose size graphc knows only at run time", attribute="axis")
    parts = len(ctx.node.output)
    sizes = ctx.attr("split") if ctx.opset < 13 else ctx.const(1)
    num = ctx.attr("num_outputs")
    if ctx.opset >= 18 and sizes is None and num is None:
        ctx.unsupported("neither the split input nor num_outputs is given (required from opset 18)")
    if num is not None and int(num) != parts:
        ctx.unsupported(f"num_outputs={num} but the node lists {parts} outputs", attribute="num_outputs")
    if sizes is None:
        chunk = -(-n // parts)
        sizes = [chunk] * (parts - 1) + [n - chunk * (parts - 1)]
    sizes = [int(v) for v in np.ravel(sizes)]
    if sum(sizes) != n or len(sizes) != parts or min(sizes) < 1:
        ctx.unsupported(f"split sizes {sizes} do not cut dim {axis} ({n}) into {parts} non-empty parts")
    outs, start = [], 0
    for k, size in enumerate(sizes):
        outs.append(ctx.g.slice(x, axis, start, start + size, name=ctx.out(k) or ctx.tmp(f"part{k}")))
        start += size
    return outs


@onnx_op("Gather", const_inputs=(1,))
def gather(ctx):
    """Only contiguous index runs (x[:, 2], x[1:4]), which are slices; graphc has no general gather."""
    x = ctx.x(0)
    idx = ctx.const(1)
    axis = int(ctx.attr("axis", 0)) % len(x.shape)
    n = x.shape[axis]
    flat = [int(i) % n for i in idx.ravel()] if isinstance(n, int) else []
    if not flat or idx.ndim > 1 or flat != list(range(flat[0], flat[0] + len(flat))):
        ctx.unsupported("gathers arbitrary indices from run-time data: graphc has no gather op")
    if idx.ndim == 1:
        return ctx.g.slice(x, axis, flat[0], flat[-1] + 1, name=ctx.out())
    y = ctx.g.slice(x, axis, flat[0], flat[0] + 1, name=ctx.tmp("slice"))
    return reshape_to(ctx, y, [d for i, d in enumerate(x.shape) if i != axis], ctx.out())


@onnx_op("Identity")
def identity(ctx):
    return ctx.x(0)


@onnx_op("Dropout", const_inputs=(1, 2))
def dropout(ctx):
    """Identity at inference, graphc's seeded inverted dropout in training."""
    x, = floats(ctx, 0)
    ctx.attr("seed")                           # graphc seeds its masks itself, per step
    if ctx.opset < 12:
        ratio, training = float(ctx.attr("ratio", 0.5)), False
    else:
        ratio = float(np.ravel(ctx.const(1, np.array(0.5)))[0])
        training = bool(np.ravel(ctx.const(2, np.array(False)))[0])
    if training:
        ctx.unsupported("training_mode=True drops values at inference too; graphc's dropout is the identity "
                        "at inference")
    if ratio == 0.0:
        return [x, None]
    return [ctx.g.dropout(x, ratio, name=ctx.out()), None]


@onnx_op("Cast")
def cast(ctx):
    """Only casts that change nothing in graphc (float to float: a graph has one float dtype)."""
    to = ONNX_DTYPES.get(int(ctx.attr("to")))
    ctx.attr("saturate")                       # float8 targets only
    src = ctx.dtype(0)
    if to is not None and (to == src or (to.startswith("float") and src.startswith("float"))):
        return ctx.x(0)
    from onnx import TensorProto
    ctx.unsupported(f"cast from {src} to {TensorProto.DataType.Name(int(ctx.attr('to')))}: graphc has no cast op",
                    attribute="to")
