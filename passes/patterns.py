"""The fusion patterns, each declared once, as data; passes/fuse.py applies them all with one matcher.

A ``Chain`` pattern is a chain of op roles (conv -> act -> pool):

    name      the fused node's ``pattern`` attribute, and the name a backend registers its lowering under
              (a backend without one runs the group's body with the reference ops: slower, still correct)
    roles     the members in order, each a ``Role(name, op, guard)``: a member is the single reader of the
              previous one with that op (and guard). Every member but the last is *interior*: nothing outside
              the group reads it (except the backward chain below) and it is not protected. The last member
              is the group's result. Body nodes carry the role names (CONTRACT: lowerings read members by
              role, ``graphc.ops.fused.members``).
    guard     ``guard(g, match) -> bool``: the whole match may fuse (None: always)
    prepare   a value-preserving rewrite run once before any pattern is matched, that puts the graph in the
              form the pattern looks for
    saves     ``Saved``: an extra result the forward group computes for the backward pass, made only when
              the backward chain is found
    backward  ``Backward``: the chain autodiff built through the interior members, and the fused node it
              becomes (reading the saved value instead of the interior members)

A ``Region`` pattern is a connected group of ``member`` nodes, grown along edges where ``join`` holds
(elementwise chains); its body nodes get the roles ``<role>0``, ``<role>1``, ... and are lowered
generically. Patterns are tried in the order of ``PATTERNS``; the first that matches an anchor
wins. A new pattern is one declaration here plus one lowering per backend.

The backward chain is a small tree of ``Op`` (a node with its op, role and inputs), ``Ref`` (a member
already matched), ``Any`` (any value, bound to a role) and ``Const`` (a constant filled with a value).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from graphc import ops as optable
from graphc.passes.helpers.rewrite import consumers, data, is_const_fill, set_inputs


# --- the vocabulary -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Role:
    name: str
    op: str
    guard: Optional[Callable] = None       # guard(g, node name) -> bool


@dataclass(frozen=True)
class Op:
    """A node of a backward chain: its op, the role it binds and its input patterns (in order, or in any
    order when unordered)."""
    op: str
    role: str
    inputs: tuple = ()
    guard: Optional[Callable] = None       # guard(g, match) -> bool, once this node and its inputs matched
    unordered: bool = False


@dataclass(frozen=True)
class Ref:
    role: str                              # the member matched under this role, and no other node


@dataclass(frozen=True)
class Any:
    role: str                              # any value, bound to this role


@dataclass(frozen=True)
class Const:
    value: float                           # a constant whose every element is value


@dataclass(frozen=True)
class Saved:
    role: str                              # the body node's role (also its name suffix)
    op: str
    input: str                             # the member role it reads
    attrs: Callable                        # attrs(g, match) -> dict
    like: str                              # the member role whose shape it has
    dtype: str


@dataclass(frozen=True)
class Body:
    """A body node of the backward group: it takes over the name (and readers) of the matched node
    `replaces`; inputs are role names (matched, saved, or earlier body roles)."""
    role: str
    op: str
    inputs: tuple
    attrs: Callable                        # attrs(g, match) -> dict
    replaces: str


@dataclass(frozen=True)
class Backward:
    pattern: str                           # the backward fused node's pattern name
    root: Op                               # the chain's last node, read by the rest of the backward pass
    extra: Optional[Op] = None             # an optional reader of the root joining the group
    body: tuple = ()                       # Body nodes, in order; matched roles without one are dropped


@dataclass(frozen=True)
class Chain:
    name: str
    roles: tuple
    guard: Optional[Callable] = None       # guard(g, match) -> bool
    prepare: Optional[Callable] = None     # prepare(g): a value-preserving rewrite
    saves: Optional[Saved] = None
    backward: Optional[Backward] = None


@dataclass(frozen=True)
class Region:
    name: str
    member: Callable                       # member(g, n) -> bool
    join: Callable                         # join(g, a, b) -> bool: b may join the group of its input a
    role: str = "m"                        # body node k gets role f"{role}{k}"


# --- conv -> ReLU -> max pool, and its backward ---------------------------------------------------------

POOL_WINDOW = ("size", "stride")


def relu_masks_on_outputs(g):
    """gt(x, 0) -> gt(relu(x), 0) wherever relu(x) exists (equal values: relu(x) > 0 exactly when x > 0),
    so the backward pass's ReLU masks read the ReLU output and a conv output is read only by its ReLU."""
    for n in list(g.nx.nodes):
        d = data(g, n)
        if d["op"] != "gt":
            continue
        x, z = d["inputs"]
        if not is_const_fill(g, z, 0.0) or data(g, x)["op"] == "relu":
            continue
        relus = [u for u in consumers(g, x) if data(g, u)["op"] == "relu"]
        if relus and tuple(data(g, relus[0])["shape"]) == tuple(d["shape"]):
            set_inputs(g, n, (relus[0], z))


def _window(g, m):
    return {k: m.attrs(g, "pool")[k] for k in POOL_WINDOW}


def _same_window(g, m):
    """The max-pool route goes through the pool's windows."""
    return all(m.attrs(g, "route_grad")[k] == m.attrs(g, "pool")[k] for k in POOL_WINDOW)


def _per_channel_sum(g, m):
    """sum(dz, (0, 2, 3)): the conv bias gradient."""
    a = m.attrs(g, "bias_grad")
    return tuple(a["axes"]) == (0, 2, 3) and not a["keepdims"]


CONV_RELU_MAXPOOL = Chain(
    "conv_relu_maxpool",
    roles=(Role("conv", "conv"), Role("act", "relu"), Role("pool", "maxpool")),
    prepare=relu_masks_on_outputs,
    # in a training graph the group also returns its pool route (int32 flat index of each window's max,
    # -1 where the ReLU zeroed the window), so the backward needs no full-resolution forward value
    saves=Saved("route", "maxpool_argmax", input="act", attrs=lambda g, m: dict(_window(g, m), relu=True),
                like="pool", dtype="int32"),
    # the chain autodiff builds through relu and pool: maxpool_route(act, dy) * gt(act, 0), and its
    # per-channel sum when the conv has a bias -> one pass over the pooled gradient: route_scatter(dy,
    # route) (+ the bias gradient as a second result)
    backward=Backward(
        "route_relu",
        root=Op("mul", "mask_mul", (Op("maxpool_route", "route_grad", (Ref("act"), Any("dy")), guard=_same_window),
                                    Op("gt", "mask", (Ref("act"), Const(0.0)))), unordered=True),
        extra=Op("sum", "bias_grad", (Ref("mask_mul"),), guard=_per_channel_sum),
        body=(Body("scatter", "route_scatter", ("dy", "route"), replaces="mask_mul",
                   attrs=lambda g, m: dict(_window(g, m), in_hw=tuple(m.shape(g, "conv")[2:]))),
              Body("bias_grad", "sum", ("scatter",), replaces="bias_grad",
                   attrs=lambda g, m: dict(m.attrs(g, "bias_grad")))),
    ),
)

# every conv kind fuses (grouped, dilated, depthwise: the backends' conv kernels take them all)
CONV_RELU = Chain("conv_relu", roles=(Role("conv", "conv"), Role("act", "relu")),
                  prepare=relu_masks_on_outputs)

# conv -> clip (ReLU6 = clip(x, 0, 6), MobileNet's activation after a folded batch norm): the clip in the
# depthwise kernels' epilogue (a memory-bound layer saves a pass over its output). Inference only in
# practice: clip's gradient reads the conv output (lo <= x <= hi), so in a training graph the conv
# output is read outside the group and the chain does not match.
CONV_CLIP = Chain("conv_clip", roles=(Role("conv", "conv"), Role("act", "clip")))


# --- dropout: x * dropout_mask(x) -----------------------------------------------------------------------
# One step, which at inference is a copy of x (the mask would be all ones) instead of a mask fill and a
# product: a batch-1 mnist_convnet inference spent 1.4 us of its ~28 there. Where the backward pass
# reads the mask too (training graphs) the mask is interior to nothing: the two nodes stay.

def _of_its_own_input(g, m):
    """The product is x * dropout_mask(x), in either order."""
    return sorted(data(g, m["apply"])["inputs"]) == sorted((data(g, m["mask"])["inputs"][0], m["mask"]))


DROPOUT = Chain("dropout", roles=(Role("mask", "dropout_mask"), Role("apply", "mul")), guard=_of_its_own_input)


# --- padded max pool: pad2d(-inf) -> maxpool ----------------------------------------------------------
# graph.maxpool(pad=...) and ONNX's padded MaxPool make a -inf pad2d in front of a max pool over whole
# windows; one kernel reading the unpadded input (windows clipped at its edges: a -inf pad never wins)
# saves the padded copy (ResNet's stem pad, 64 x 114 x 114 at batch 1: 0.28 ms of a 0.58 ms pair on a
# Zen 4 core). Inference only in practice: the training graph's maxpool_route reads the padded value, so
# the pad is read outside the group and the chain does not match.

def _minus_inf_pad(g, n):
    a = data(g, n)["attrs"]
    return a.get("mode", "constant") == "constant" and a["value"] == float("-inf")


PAD_MAXPOOL = Chain("pad_maxpool", roles=(Role("pad", "pad2d", guard=_minus_inf_pad), Role("pool", "maxpool")))


# --- elementwise chains ---------------------------------------------------------------------------------

def _elementwise(g, n):
    d = data(g, n)
    return d["op"] != "fused" and optable.OPS[d["op"]].scalar is not None


def _same_loop(g, a, b):
    """One loop: same shape and dtype, and both forward or both not (a forward group that also computed
    a backward value would keep it alive)."""
    da, db = data(g, a), data(g, b)
    return (tuple(da["shape"]) == tuple(db["shape"]) and da["dtype"] == db["dtype"]
            and (da["role"] == "forward") == (db["role"] == "forward"))


# inputs of other shapes broadcast in (biases, scalars, the learning rate): e.g. bias + ReLU after a
# matmul, the backward ReLU mask, a whole optimizer update (momentum's new velocity and weight)
ELEMENTWISE = Region("elementwise", member=_elementwise, join=_same_loop, role="ew")


PATTERNS = [CONV_RELU_MAXPOOL, CONV_RELU, CONV_CLIP, DROPOUT, PAD_MAXPOOL, ELEMENTWISE]
