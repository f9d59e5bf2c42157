"""One ONNX export per graphc forward op: ``fn(ex, name, nd)`` emits nodes whose last output is `name`.

graphc pads are (top, bottom, left, right); ONNX's (x1_begin, x2_begin, x1_end, x2_end). A pad2d that
only feeds pools (graphc's padded max pool: -inf; an average pool that counts its padding: 0) becomes the
pools' pads attribute. The issue-12 ops read their node attributes under the names of their public
parameters (eps, momentum, alpha, ...) and fail with a graphc error naming the op if those are missing.
"""
import numpy as np

from graphc.errors import GraphError

EXPORTS = {}
SAME = {"add": "Add", "sub": "Sub", "div": "Div", "max": "Max", "neg": "Neg", "exp": "Exp", "log": "Log",
        "sqrt": "Sqrt", "sigmoid": "Sigmoid", "tanh": "Tanh", "relu": "Relu", "identity": "Identity",
        "copy": "Identity"}


def exports(*ops):
    def deco(fn):
        for op in ops:
            EXPORTS[op] = fn
        return fn
    return deco


def onnx_pads(p):
    t, b, l, r = p
    return [int(t), int(l), int(b), int(r)]


def pair(v):
    return [int(v), int(v)] if isinstance(v, (int, np.integer)) else [int(i) for i in v]


def attr(nd, *names, default=KeyError):
    """A node attribute under the first of `names` present (the issue-12 ops' names are their public
    parameters' names)."""
    for n in names:
        if n in nd["attrs"]:
            return nd["attrs"][n]
    if default is KeyError:
        raise GraphError(f"cannot export graphc op {nd['op']!r}: its node has none of the attributes {names}")
    return default


def _four(p):
    if isinstance(p, (int, np.integer)):
        return (int(p),) * 4
    p = tuple(int(i) for i in p)
    return (p[0], p[0], p[1], p[1]) if len(p) == 2 else p


# --- elementwise ----------------------------------------------------------------------------------

@exports(*SAME)
def same(ex, name, nd):
    ex.emit(SAME[nd["op"]], nd["inputs"], name)


@exports("mul")
def mul(ex, name, nd):
    """x * dropout_mask(x) is dropout: the identity at inference."""
    a, b = nd["inputs"]
    masks = [i for i in (a, b) if ex.nd(i)["op"] == "dropout_mask"]
    if masks:
        ex.emit("Identity", [b if masks[0] == a else a], name)
    else:
        ex.emit("Mul", [a, b], name)


@exports("dropout_mask")
def dropout_mask(ex, name, nd):
    users = [u for u in ex.g.nx.successors(name) if ex.nd(u)["op"] != "mul"]
    if users:
        raise GraphError(f"dropout mask {name!r} feeds {users[0]!r}, not only its dropout mul; no ONNX export")


@exports("gt")
def gt(ex, name, nd):
    ex.emit("Cast", [ex.emit("Greater", nd["inputs"], ex.tmp(name + "/gt"))], name, to=_elem(ex))


def _elem(ex):
    from graphc.onnx.exporter import ELEM_TYPES
    return ELEM_TYPES[ex.dtype]


# --- linear algebra, conv, pooling -----------------------------------------------------------------

@exports("matmul")
def matmul(ex, name, nd):
    a, b = nd["inputs"]
    ta, tb = nd["attrs"].get("trans_a", False), nd["attrs"].get("trans_b", False)
    ra, rb = len(ex.nd(a)["shape"]), len(ex.nd(b)["shape"])
    if ra == rb == 2:
        ex.emit("Gemm", [a, b], name, transA=int(ta), transB=int(tb))
        return
    for flag, v, r in ((ta, a, ra), (tb, b, rb)):
        if flag:
            perm = list(range(r - 2)) + [r - 1, r - 2]
            t = ex.emit("Transpose", [v], ex.tmp(f"{name}/{v}T"), perm=perm)
            a, b = (t, b) if v == a else (a, t)
    ex.emit("MatMul", [a, b], name)


@exports("conv")
def conv(ex, name, nd):
    a = nd["attrs"]
    w_shape = ex.nd(nd["inputs"][1])["shape"]
    ex.emit("Conv", nd["inputs"], name, strides=pair(a["stride"]), pads=onnx_pads(a["pads"]),
            dilations=pair(attr(nd, "dilation", "dilations", default=1)),
            group=int(attr(nd, "groups", "group", default=1)), kernel_shape=list(w_shape[2:]))


@exports("conv_dx")
def conv_dx(ex, name, nd):
    """conv's input gradient is ONNX's ConvTranspose: the same begin padding, and an end padding plus
    output_padding that give graphc's output size."""
    dy, w = nd["inputs"]
    a = nd["attrs"]
    k_hw = ex.nd(w)["shape"][2:]
    n_hw = ex.nd(dy)["shape"][2:]
    begin, end, extra = [], [], []
    for i, (n, k, s, out) in enumerate(zip(n_hw, k_hw, a["stride"], a["in_hw"])):
        t = a["pads"][2 * i]
        full = (n - 1) * s + k
        e = max(full - t - out, 0)
        begin.append(t)
        end.append(e)
        extra.append(out - (full - t - e))
    ex.emit("ConvTranspose", [dy, w], name, strides=pair(a["stride"]), pads=begin + end,
            output_padding=extra if any(extra) else None, kernel_shape=list(k_hw))


def absorbed_pads(g):
    """pad2d nodes whose every user is a pool that can take the padding as its pads attribute."""
    out = set()
    for n in g.op_nodes("pad2d"):
        nd = g.nx.nodes[n]
        value, mode = nd["attrs"].get("value", 0.0), nd["attrs"].get("mode", "constant")
        users = list(g.nx.successors(n))
        if mode != "constant" or not users or n in g.outputs:
            continue
        want = "maxpool" if value == -np.inf else "avgpool" if value == 0.0 else None
        ok = all(g.nx.nodes[u]["op"] == want and not _own_pads(g.nx.nodes[u])
                 and max(nd["attrs"]["pads"]) < min(g.nx.nodes[u]["attrs"]["size"]) for u in users)
        if ok:
            out.add(n)
    return out


def _own_pads(nd):
    p = attr(nd, "pads", "pad", default=0)
    return _four(p) if p else None


@exports("maxpool", "avgpool")
def pool(ex, name, nd):
    a = nd["attrs"]
    x = nd["inputs"][0]
    extra = {}
    pads = _own_pads(nd) or (0, 0, 0, 0)
    if x in ex.absorbed:
        pads = ex.nd(x)["attrs"]["pads"]
        x = ex.nd(x)["inputs"][0]
        extra["count_include_pad"] = 1 if nd["op"] == "avgpool" else None
    elif nd["op"] == "avgpool" and any(pads):
        extra["count_include_pad"] = int(attr(nd, "count_include_pad", default=True))
    if attr(nd, "ceil_mode", default=False):
        extra["ceil_mode"] = 1
    ex.emit("MaxPool" if nd["op"] == "maxpool" else "AveragePool", [x], name, kernel_shape=pair(a["size"]),
            strides=pair(a["stride"]), pads=onnx_pads(pads), **extra)


@exports("global_avgpool", "global_maxpool")
def global_pool(ex, name, nd):
    op = "GlobalAveragePool" if nd["op"] == "global_avgpool" else "GlobalMaxPool"
    y = ex.emit(op, nd["inputs"][:1], ex.tmp(name + "/pool"))
    ex.emit("Flatten", [y], name, axis=1)


# --- reductions, shapes ------------------------------------------------------------------------------

@exports("sum", "mean")
def reduce(ex, name, nd):
    x = nd["inputs"][0]
    axes, keep = [int(a) for a in nd["attrs"]["axes"]], int(nd["attrs"]["keepdims"])
    op = "ReduceSum" if nd["op"] == "sum" else "ReduceMean"
    if ex.opset >= (13 if op == "ReduceSum" else 18):           # axes became an input
        ex.emit(op, [x, ex.const(axes, name + "/axes", np.int64)], name, keepdims=keep)
    else:
        ex.emit(op, [x], name, axes=axes, keepdims=keep)


@exports("reshape")
def reshape(ex, name, nd):
    """The batch dim "N" becomes 0 (copy the input's dim) where the input has it, else the one -1."""
    x = nd["inputs"][0]
    in_shape = ex.nd(x)["shape"]
    target = [(0 if i < len(in_shape) and in_shape[i] == d else -1) if isinstance(d, str) else int(d)
              for i, d in enumerate(nd["shape"])]
    if target.count(-1) > 1:
        raise GraphError(f"cannot export reshape {name!r} to {nd['shape']}: two symbolic dims move")
    ex.emit("Reshape", [x, ex.const(target, name + "/shape", np.int64)], name)


@exports("transpose")
def transpose(ex, name, nd):
    ex.emit("Transpose", nd["inputs"], name, perm=[int(a) for a in nd["attrs"]["axes"]])


@exports("concat")
def concat(ex, name, nd):
    ex.emit("Concat", nd["inputs"], name, axis=int(nd["attrs"]["axis"]))


def _slice(ex, name, x, starts, ends, axes):
    ex.emit("Slice", [x, ex.const(starts, name + "/starts", np.int64), ex.const(ends, name + "/ends", np.int64),
                      ex.const(axes, name + "/axes", np.int64)], name)


@exports("slice")
def slice_(ex, name, nd):
    a = nd["attrs"]
    _slice(ex, name, nd["inputs"][0], [a["start"]], [a["stop"]], [a["axis"]])


@exports("crop2d")
def crop2d(ex, name, nd):
    t, b, l, r = nd["attrs"]["pads"]
    h, w = ex.nd(nd["inputs"][0])["shape"][2:]
    _slice(ex, name, nd["inputs"][0], [t, l], [h - b, w - r], [2, 3])


@exports("pad2d")
def pad2d(ex, name, nd):
    a = nd["attrs"]
    t, b, l, r = a["pads"]
    mode = a.get("mode", "constant")
    ins = [nd["inputs"][0], ex.const([0, 0, t, l, 0, 0, b, r], name + "/pads", np.int64)]
    if mode == "constant":
        ins.append(ex.const(a.get("value", 0.0), name + "/value", ex.dtype))
    ex.emit("Pad", ins, name, mode=mode)


@exports("softmax")
def softmax(ex, name, nd):
    """Before opset 13 Softmax flattens the dims from `axis` on: the same only for the last axis."""
    axis = int(nd["attrs"]["axis"])
    if ex.opset < 13 and axis != len(nd["shape"]) - 1:
        raise GraphError(f"softmax {name!r} over axis {axis} of {len(nd['shape'])} needs opset >= 13")
    ex.emit("Softmax", nd["inputs"], name, axis=axis)


# --- the CNN op set of issue 12 ------------------------------------------------------------------------

@exports("batchnorm")
def batchnorm(ex, name, nd):
    """ONNX's momentum weighs the running value (0.9), graphc's (torch's) the batch value (0.1)."""
    ex.emit("BatchNormalization", nd["inputs"][:5], name, epsilon=float(attr(nd, "eps", "epsilon")),
            momentum=1.0 - float(attr(nd, "momentum", default=0.1)))


@exports("lrn")
def lrn(ex, name, nd):
    ex.emit("LRN", nd["inputs"][:1], name, size=int(attr(nd, "size")), alpha=float(attr(nd, "alpha")),
            beta=float(attr(nd, "beta")), bias=float(attr(nd, "k", "bias")))


@exports("leaky_relu")
def leaky_relu(ex, name, nd):
    ex.emit("LeakyRelu", nd["inputs"][:1], name, alpha=float(attr(nd, "alpha")))


@exports("prelu")
def prelu(ex, name, nd):
    """graphc's slope runs along dim 1; ONNX broadcasts from the right: (C,) becomes (C, 1, ...)."""
    x, slope = nd["inputs"][:2]
    rank = len(ex.nd(x)["shape"])
    c = ex.nd(slope)["shape"][0]
    shape = [c] + [1] * (rank - 2) if c != 1 else [1]
    s = ex.emit("Reshape", [slope, ex.const(shape, name + "/slope_shape", np.int64)], ex.tmp(name + "/slope"))
    ex.emit("PRelu", [x, s], name)


@exports("clip")
def clip(ex, name, nd):
    lo, hi = float(attr(nd, "lo", "min")), float(attr(nd, "hi", "max"))
    ex.emit("Clip", [nd["inputs"][0], ex.const(lo, name + "/min", ex.dtype), ex.const(hi, name + "/max", ex.dtype)],
            name)


@exports("silu")
def silu(ex, name, nd):
    x = nd["inputs"][0]
    ex.emit("Mul", [x, ex.emit("Sigmoid", [x], ex.tmp(name + "/sigmoid"))], name)


@exports("hardswish")
def hardswish(ex, name, nd):
    ex.emit("HardSwish", nd["inputs"][:1], name)
