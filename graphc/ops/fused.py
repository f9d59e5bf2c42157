"""Fusion as graph nodes: the ``fused`` op, its ``getitem`` companion, and the two route ops that let a
fused forward conv-ReLU-pool hand its max-pool route to the backward pass.

A ``fused`` node holds a small sub-graph (its *body*) that a backend runs as one kernel. Its attrs:

    pattern    the pattern name ("conv_relu_maxpool", "conv_relu", "route_relu", "elementwise", ...)
    body       the fused sub-nodes in order, each a dict {name, op, role, inputs, attrs, shape, dtype}; an
               input is ("in", k) for the fused node's k-th input or ("body", j) for the j-th body node.
               Names are the original node names, so a renderer can draw the group as a cluster of them.
               role is the node's role in the pattern (passes/patterns.py: "conv", "act", "pool", ...;
               "ew<k>" in elementwise groups): lowerings read members by role (`members`), never by
               position.
    results    indices of the body nodes whose values leave the group (at least one)
    in_types   (shape, dtype) of each outer input when the group was made (symbolic dims kept)
    replaces   names of the original nodes the group stands for (the body may use different ops: a
               backward route_relu replaces maxpool_route -> gt -> mul by one route_scatter)

**Several results.** The IR has one value per node. A group with one result *is* that value (the fused
node takes the result's name, so consumers and outputs keep their names). A group with k > 1 results
evaluates to a tuple, and k ``getitem`` nodes — named like the original results — pick its parts; no
other node reads a tuple-valued node. This is how a training graph's fused forward conv-ReLU-pool also
saves its pool *route* for the backward pass (result 1, an int32 ``maxpool_argmax``), so the backward
needs neither the conv output nor the ReLU output; and how an optimizer-update group (momentum: new
velocity and new weight) writes all its results in one pass. We chose this over recomputation in the
backward node because recomputing the route means recomputing the convolution — the most expensive
op of the step — and over "the forward writes every intermediate" because the whole point of the
fused conv-pool kernel is that the full-resolution conv output never reaches memory.

``ref`` interprets the body with the op table's own ``ref`` functions, so the reference backend runs a
fused graph exactly as it runs the unfused one (that is how every pass is tested).
"""
import numpy as np

from graphc import shapes
from graphc.errors import GraphError
from graphc.ops import OPS, OpDef, register
from graphc.ops.pool import argmax_index


class _BodyCtx:
    """A RunContext stand-in for body nodes: same env/training/step, its own out_shape."""
    __slots__ = ("env", "training", "step", "out_shape")

    def __init__(self, ctx):
        self.env = getattr(ctx, "env", {})
        self.training = getattr(ctx, "training", False)
        self.step = getattr(ctx, "step", 0)
        self.out_shape = None


def run_body(attrs, inputs, ctx):
    """Evaluates a fused body with the table's ref functions; returns the list of all body values."""
    fdt = next((a.dtype for a in inputs if isinstance(a, np.ndarray) and a.dtype.kind == "f"), None)
    bctx = _BodyCtx(ctx)
    vals = []
    for b in attrs["body"]:
        ins = [inputs[i] if kind == "in" else vals[i] for kind, i in b["inputs"]]
        bctx.out_shape = shapes.resolve(b["shape"], bctx.env)
        out = np.asarray(OPS[b["op"]].ref(ins, b["attrs"], bctx))
        if fdt is not None and out.dtype.kind == "f" and out.dtype != fdt:
            out = out.astype(fdt)
        vals.append(out)
    return vals


def members(attrs):
    """{role: body node dict} of a fused node's attrs, e.g. members(attrs)["conv"]["attrs"]["stride"]."""
    return {b["role"]: b for b in attrs["body"]}


def _fused_ref(inputs, attrs, ctx):
    vals = run_body(attrs, inputs, ctx)
    res = [vals[i] for i in attrs["results"]]
    return res[0] if len(res) == 1 else tuple(res)


def _fused_infer(node, in_types):
    b = node.attrs["body"][node.attrs["results"][0]]
    return tuple(b["shape"]), b["dtype"]


def body_env(attrs, in_shapes):
    """Binds the symbolic dims of the body from the outer inputs' concrete shapes."""
    env = {}
    for (sym, _), real in zip(attrs.get("in_types", ()), in_shapes):
        for d, r in zip(sym, real):
            if isinstance(d, str):
                env[d] = r
    return env


def _fused_flops(in_shapes, out_shape, attrs):
    env = body_env(attrs, in_shapes)
    total, shp = 0, []
    for b in attrs["body"]:
        ins = [tuple(in_shapes[i]) if kind == "in" else shp[i] for kind, i in b["inputs"]]
        out = shapes.resolve(b["shape"], env)
        shp.append(out)
        f = OPS[b["op"]].flops
        if f is not None:
            total += int(f(ins, out, b["attrs"]))
    return total


register(OpDef("fused", _fused_infer, _fused_ref, flops=_fused_flops, differentiable=False,
               doc="a fused group of ops run as one kernel; attrs pattern, body, results (see graphc.ops.fused)",
               attrs={"pattern": "", "body": (), "results": (0,), "in_types": (), "replaces": ()}))


def _getitem_infer(node, in_types):
    src = node.graph.nx.nodes[node.inputs[0].name]
    b = src["attrs"]["body"][src["attrs"]["results"][node.attrs["index"]]]
    return tuple(b["shape"]), b["dtype"]


register(OpDef("getitem", _getitem_infer, lambda ins, a, ctx: ins[0][a["index"]], differentiable=False,
               flops=lambda i, o, a: 0,
               doc="result `index` of a fused node with several results", attrs={"index": 0}))


# --- the saved max-pool route ----------------------------------------------------------------------

def maxpool_argmax_ref(x, size, stride, relu):
    """int32 flat index (i*W + j in x's plane) of each window's first maximum (its first NaN if it holds
    one: np.argmax); with relu, ~index (= -1 - index) where that maximum is not > 0: x is a ReLU output
    there, the window all zeros (index: its first element) or NaN, and the ReLU mask multiplies its
    gradient by 0 (so dy * 0: 0, or NaN where dy is not finite, as the unfused maxpool_route * gt)."""
    idx = argmax_index(x, size, stride).astype(np.int32)
    if relu:
        win_max = np.take_along_axis(x.reshape(*x.shape[:2], -1), idx.reshape(*idx.shape[:2], -1).astype(np.intp),
                                     axis=2).reshape(idx.shape)
        idx = np.where(win_max > 0, idx, ~idx).astype(np.int32)
    return idx


def _argmax_infer(node, in_types):
    from graphc.ops.pool import _pool_infer
    shape, _ = _pool_infer(node, in_types)
    return shape, "int32"


register(OpDef("maxpool_argmax", _argmax_infer,
               lambda ins, a, ctx: maxpool_argmax_ref(ins[0], a["size"], a["stride"], a.get("relu", False)),
               differentiable=False, flops=lambda i, o, a: 0,
               doc="the max-pool route: int32 flat index of each window's first max (-1 where a ReLU'd window "
                   "is all zero, relu=True)", attrs={"size": (2, 2), "stride": (2, 2), "relu": False}))


def route_scatter_ref(dy, route, in_hw):
    """dx: each dy added at its route r (r >= 0), dy * 0 at ~r (r < 0: a window the ReLU masked)."""
    n, c = dy.shape[:2]
    h, w = in_hw
    dx = np.zeros((n * c, h * w), dy.dtype)
    r = route.reshape(-1).astype(np.intp)
    masked = r < 0
    r = np.where(masked, ~r, r)
    if r.size and r.max() >= h * w:       # (routes are maxpool_argmax values: never, see _scatter_infer)
        raise GraphError(f"route_scatter: route {int(r.max())} is outside the {h}x{w} plane")
    with np.errstate(invalid="ignore"):
        v = np.where(masked, dy.reshape(-1) * 0, dy.reshape(-1))
    np.add.at(dx, (np.repeat(np.arange(n * c), r.size // max(n * c, 1)), r), v)
    return dx.reshape(n, c, h, w)


def _computed_route(graph, name):
    """Whether value `name` is a route graphc computes: a maxpool_argmax, or a fused group's result that is
    one."""
    d = graph.nx.nodes[name]
    if d["op"] in ("getitem", "fused"):
        f = graph.nx.nodes[d["inputs"][0]]["attrs"] if d["op"] == "getitem" else d["attrs"]
        d = f["body"][f["results"][d["attrs"]["index"] if d["op"] == "getitem" else 0]]
    return d["op"] == "maxpool_argmax"


def _scatter_infer(node, in_types):
    """Only a route graphc computed can be scattered: a route is an index the kernels write through, so
    user data (an input, a const) never becomes one."""
    (s, _), (rs, rdt) = in_types[:2]
    if not _computed_route(node.graph, node.inputs[1].name) or rdt != "int32" or tuple(rs) != tuple(s):
        node.fail(GraphError, "the route must be a maxpool_argmax of the pooled input, int32 and shaped like dy",
                  "use g.maxpool (its gradient makes the route)")
    return (s[0], s[1], *node.attrs["in_hw"]), in_types[0][1]


register(OpDef("route_scatter", _scatter_infer,
               lambda ins, a, ctx: route_scatter_ref(ins[0], ins[1], a["in_hw"]), differentiable=False,
               flops=lambda i, o, a: int(np.prod(i[0])),
               doc="max-pool backward from a saved route: dy added at each window's max (-1: dropped); "
                   "size/stride (optional) describe the pool, so kernels can write non-overlapping windows "
                   "without a zeroing pass",
               attrs={"in_hw": (0, 0), "size": None, "stride": None}))
