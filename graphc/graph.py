"""The graph IR and the define API.

A `Graph` is a networkx.DiGraph whose vertices are op nodes; each node produces one typed value
(shape, dtype) of the same name, so "node" and "value" are the same key. Node attributes:

    op       the op-table name ("conv", "add", "param", ...)
    inputs   ordered tuple of input value names (an edge u -> v exists for each)
    attrs    op attributes (stride, pads, axes, ...)
    shape    output shape; a str dim is symbolic (the batch dim, bound when the graph runs)
    dtype    "float32", "float64" or "int64"
    role     "forward", "backward" (made by the autodiff pass) or "update" (optimizer; batch norm's
             running statistics, see graph.stat_updates)
    rule     for backward/update nodes: the gate rule that made it ("mul:swap", "conv:dW", ...)

Edges into backward nodes carry the same ``rule`` attribute, so renderers can label gradient edges.
"""
from __future__ import annotations

import contextlib
import numbers

import networkx as nx
import numpy as np

from graphc import ops as optable
from graphc import shapes
from graphc.errors import DTypeError, GraphError, ShapeError
from graphc.init import INITS, initial_value

DTYPES = ("float32", "float64", "int64", "int32")
#: Names the step counter and checkpoint metadata use in state dicts and checkpoint files.
RESERVED_NAMES = ("__step__", "__meta__")


def _what(op, name):
    """How a definition error names the node being made: "conv 'c1'", or "conv" when unnamed."""
    return f"{op} {name!r}" if name else op


def _check_name(kind, name):
    if not isinstance(name, str) or not name:
        raise GraphError(f"{kind} names must be non-empty strings, got {name!r}")


class _Lazy:
    """An initialiser not yet run: big models (VGG16: 138M weights) can be checked and summarised
    without allocating their parameters."""
    __slots__ = ("fn",)

    def __init__(self, fn):
        self.fn = fn


class ParamStore(dict):
    """name -> initial value; values are materialised on first access."""

    def __getitem__(self, k):
        v = dict.__getitem__(self, k)
        if isinstance(v, _Lazy):
            v = v.fn()
            dict.__setitem__(self, k, v)
        return v

    def get(self, k, default=None):
        return self[k] if k in self else default

    def values(self):
        return [self[k] for k in self]

    def items(self):
        return [(k, self[k]) for k in self]

    def copy(self):
        c = ParamStore()
        for k in self:
            v = dict.__getitem__(self, k)
            dict.__setitem__(c, k, v if isinstance(v, _Lazy) else v.copy())
        return c

    def shape(self, k):
        v = dict.__getitem__(self, k)
        return None if isinstance(v, _Lazy) else v.shape


class Value:
    """A handle on a node's output value: knows its graph, name, shape and dtype."""
    __slots__ = ("graph", "name")

    def __init__(self, graph, name):
        self.graph = graph
        self.name = name

    @property
    def shape(self):
        return self.graph.nx.nodes[self.name]["shape"]

    @property
    def dtype(self):
        return self.graph.nx.nodes[self.name]["dtype"]

    @property
    def op(self):
        return self.graph.nx.nodes[self.name]["op"]

    def __repr__(self):
        return f"<Value {self.name}: {self.op} {shapes.fmt(self.shape)} {self.dtype}>"

    # arithmetic sugar: x + y, x * y, x - y, -x, x / y, x @ y
    def __add__(self, o): return self.graph.add(self, o)
    def __radd__(self, o): return self.graph.add(o, self)
    def __mul__(self, o): return self.graph.mul(self, o)
    def __rmul__(self, o): return self.graph.mul(o, self)
    def __sub__(self, o): return self.graph.sub(self, o)
    def __rsub__(self, o): return self.graph.sub(o, self)
    def __truediv__(self, o): return self.graph.div(self, o)
    def __rtruediv__(self, o): return self.graph.div(o, self)
    def __neg__(self): return self.graph.neg(self)
    def __matmul__(self, o): return self.graph.matmul(self, o)


class Node:
    """Read-only view of a node, handed to shape and gradient rules."""

    def __init__(self, graph, name, op=None, inputs=None, attrs=None):
        self.graph, self.name = graph, name
        data = graph.nx.nodes[name] if name in graph.nx else {}
        self.op = op if op is not None else data["op"]
        self.attrs = attrs if attrs is not None else data["attrs"]
        names = inputs if inputs is not None else data["inputs"]
        self.inputs = [Value(graph, n) for n in names]

    @property
    def out(self):
        return Value(self.graph, self.name)

    def fail(self, cls, message, fix=""):
        ins = ", ".join(f"{v.name}{shapes.fmt(v.shape)}" for v in self.inputs)
        text = f"node {self.name!r} ({self.op}"
        text += f" of {ins})" if ins else ")"
        text += f": {message}"
        if fix:
            text += f". Fix: {fix}"
        raise cls(text)


class Graph:
    """A computational graph of gate ops. Build it with the methods below, then `graphc.compile` it."""

    def __init__(self, name="graph", seed=0, dtype="float32"):
        if dtype not in ("float32", "float64"):
            raise DTypeError(f"graph dtype must be float32 or float64, got {dtype!r}")
        if not shapes.is_int(seed) or seed < 0:
            raise GraphError(f"graph seed must be a non-negative integer, got {seed!r}")
        self.name = name
        self.seed = seed
        self.dtype = dtype
        self.nx = nx.DiGraph(name=name)
        self.outputs: list[str] = []
        self.params = ParamStore()                    # initial values of param/state nodes
        self.updates: dict[str, str] = {}             # state name -> name of its new value (training graphs)
        self.stat_updates: dict[str, str] = {}        # batch-norm running statistic -> its value after a
                                                      # training batch (stored by training runs and steps)
        self.loss: str | None = None                  # the loss output of a training graph
        self.keep: set[str] = set()                   # values passes must keep fetchable (compile(keep=...))
        self._counts: dict[str, int] = {}
        self._role = "forward"
        self._rule = None
        self._scalars: dict = {}
        self._order = 0                               # creation counter: a deterministic topological order

    # ------------------------------------------------------------------ bookkeeping
    def __contains__(self, name):
        return name in self.nx

    def __getitem__(self, name) -> Value:
        if name not in self.nx:
            raise GraphError(f"graph {self.name!r} has no value named {name!r}")
        return Value(self, name)

    def __len__(self):
        return self.nx.number_of_nodes()

    def __repr__(self):
        return f"<Graph {self.name}: {len(self)} nodes, outputs {self.outputs}>"

    def node(self, name) -> Node:
        return Node(self, name)

    def values(self):
        return [Value(self, n) for n in self.nx.nodes]

    def topo(self) -> list[str]:
        """Node names in a deterministic topological order (inputs before users)."""
        return list(nx.lexicographical_topological_sort(self.nx, key=lambda n: self.nx.nodes[n]["order"]))

    def op_nodes(self, op):
        return [n for n, d in self.nx.nodes(data=True) if d["op"] == op]

    @property
    def inputs(self):
        return [n for n, d in self.nx.nodes(data=True) if d["op"] == "input"]

    @property
    def param_names(self):
        return [n for n, d in self.nx.nodes(data=True) if d["op"] == "param" and d["attrs"].get("trainable", True)]

    @property
    def state_names(self):
        return [n for n, d in self.nx.nodes(data=True) if d["op"] == "param"]

    def fresh_name(self, base):
        k = self._counts.get(base, 0)
        while True:
            k += 1
            name = f"{base}{k}"
            if name not in self.nx:
                self._counts[base] = k
                return name

    @contextlib.contextmanager
    def rule(self, rule):
        """Tag every node made inside with the gate rule that made it (for rendering)."""
        old = self._rule
        self._rule = rule
        try:
            yield
        finally:
            self._rule = old

    @contextlib.contextmanager
    def role(self, role):
        old = self._role
        self._role = role
        try:
            yield
        finally:
            self._role = old

    def _value(self, v, like=None) -> Value:
        if isinstance(v, Value):
            if v.graph is not self:
                raise GraphError(f"value {v.name!r} belongs to graph {v.graph.name!r}, not {self.name!r}")
            return v
        if isinstance(v, str):
            return self[v]
        if isinstance(v, (numbers.Number, np.ndarray, list, tuple)):
            arr = np.asarray(v)
            if arr.ndim == 0:
                return self.scalar(float(arr))
            return self.const(arr)
        raise GraphError(f"cannot use {type(v).__name__} {v!r} as a graph value")

    def add_node(self, op, inputs=(), attrs=None, name=None, shape=None, dtype=None) -> Value:
        """Adds one op node after checking it against the op's shape and dtype rule."""
        opdef = optable.get(op)
        attrs = dict(attrs or {})
        in_vals = [self._value(v) for v in inputs]
        if name is None:
            name = self.fresh_name(op)
        else:
            _check_name("node", name)
        if name in RESERVED_NAMES:
            raise GraphError(f"name {name!r} is reserved (state dicts and checkpoints use it); choose another name")
        if name in self.nx:
            raise GraphError(f"name {name!r} is already used in graph {self.name!r} "
                             f"(by a {self.nx.nodes[name]['op']} node); names must be unique")
        view = Node(self, name, op, [v.name for v in in_vals], attrs)
        if shape is None:
            shape, dtype = opdef.infer(view, [(v.shape, v.dtype) for v in in_vals])
        self.nx.add_node(name, op=op, inputs=tuple(v.name for v in in_vals), attrs=attrs,
                         shape=tuple(shape), dtype=dtype, role=self._role, rule=self._rule,
                         order=self._order)
        self._order += 1
        for v in in_vals:
            self.nx.add_edge(v.name, name, rule=self._rule if self._role != "forward" else None)
        return Value(self, name)

    # ------------------------------------------------------------------ sources
    def _declared_dtype(self, what, dtype, allowed=DTYPES):
        """The dtype a source declares. Every float value of a graph has the graph's float dtype (a
        backend computes in one precision, and compile(dtype=...) switches all of them together), so a
        float dtype other than the graph's is refused here rather than silently cast."""
        try:
            name = self.dtype if dtype is None else str(np.dtype(dtype))
        except TypeError:
            name = None
        ok = name in ("float32", "float64") or (name in allowed if allowed else
                                                  name is not None and np.dtype(name).kind in "iub")
        if not ok:
            raise DTypeError(f"{what}: dtype must be one of {allowed or DTYPES}, got {dtype!r}")
        dtype = name
        if dtype.startswith("float") and dtype != self.dtype:
            raise DTypeError(f"{what} is declared {dtype} in a {self.dtype} graph; every float value of a graph has "
                             f"the graph's dtype. Fix: gc.Graph(dtype={dtype!r}) or compile(..., dtype={dtype!r}), "
                             "or drop dtype= (fed data is cast)")
        return dtype

    @staticmethod
    def _shape_arg(what, shape, symbolic=False):
        """A declared shape: a tuple/list of positive ints (and, for inputs, None/str batch dims)."""
        if not isinstance(shape, (tuple, list)):
            got = f"an array of shape {shape.shape}" if isinstance(shape, np.ndarray) else repr(shape)[:80]
            fix = ". Fix: to give the values, pass value=..." if isinstance(shape, np.ndarray) and what.startswith("param") \
                else ""
            raise ShapeError(f"{what}: shape must be a tuple of dims, e.g. (None, 1, 28, 28), got {got}{fix}")
        out = tuple("N" if (d is None and symbolic) else d for d in shape)
        for d in out:
            if not ((symbolic and isinstance(d, str) and d) or (shapes.is_int(d) and d > 0)):
                kind = "positive ints or None (the batch dim)" if symbolic else "positive ints"
                raise ShapeError(f"{what}: dims must be {kind}, got {tuple(shape)!r}")
        return tuple(d if isinstance(d, str) else int(d) for d in out)

    def input(self, name, shape, dtype=None) -> Value:
        """A fed value. A None dim (or a str) is the symbolic batch dim, bound when the graph runs.
        dtype: the graph's float dtype (default) or an integer dtype (class labels)."""
        _check_name("input", name)
        dtype = self._declared_dtype(f"input {name!r}", dtype)
        shape = self._shape_arg(f"input {name!r}", shape, symbolic=True)
        return self.add_node("input", (), {"shape": shape, "dtype": dtype}, name=name)

    def param(self, name, shape=None, init="he", value=None, trainable=True, scale=None, dtype=None) -> Value:
        """A parameter with an initialiser (zeros, ones, constant, uniform, normal, he, glorot, torch)
        or a given value. trainable=False makes it graph state (optimizer moments, step count)."""
        _check_name("param", name)
        dtype = self._declared_dtype(f"param {name!r}", dtype)
        if value is not None:
            try:
                arr = np.array(value, dtype=dtype)
            except (TypeError, ValueError) as e:
                raise DTypeError(f"param {name!r}: value is not {dtype} numbers ({e})") from None
            if shape is not None and tuple(self._shape_arg(f"param {name!r}", shape)) != arr.shape:
                raise ShapeError(f"param {name!r}: value has shape {arr.shape} but shape={tuple(shape)} was given")
        else:
            if shape is None:
                raise ShapeError(f"param {name!r} needs a shape or a value")
            shape = self._shape_arg(f"param {name!r}", shape)
            seed = self.seed
            arr = _Lazy(lambda: initial_value(name, shape, dtype, init, seed, scale))
            if init not in INITS:
                arr.fn()          # raises the unknown-init error now, at definition
        v = self.add_node("param", (), {"shape": tuple(shape if value is None else arr.shape), "dtype": dtype,
                                        "trainable": trainable, "init": "value" if value is not None else init},
                          name=name)
        self.params[name] = arr
        return v

    def const(self, value, name=None, dtype=None) -> Value:
        arr = np.asarray(value)
        if dtype is None:
            dtype = str(arr.dtype) if arr.dtype.kind in "iu" else self.dtype
        dtype = self._declared_dtype(_what("const", name), dtype, allowed=None)
        try:
            arr = arr.astype(dtype)
        except (TypeError, ValueError) as e:
            raise DTypeError(f"{_what('const', name)}: value is not {dtype} numbers ({e})") from None
        return self.add_node("const", (), {"shape": arr.shape, "dtype": dtype, "value": arr}, name=name)

    def scalar(self, x, dtype=None) -> Value:
        """A float scalar constant, shared within the graph."""
        key = (float(x), dtype or self.dtype, self._role)
        if key not in self._scalars or self._scalars[key] not in self.nx or key[0] != key[0]:
            base = f"c{float(x):g}".replace("-", "m")
            self._scalars[key] = self.const(np.asarray(float(x), dtype=key[1]), name=self.fresh_name(base + "_")).name
        return Value(self, self._scalars[key])

    def output(self, *values) -> None:
        """Marks values as outputs; `exe.run` returns them by value name."""
        for v in values:
            v = self._value(v)
            if v.name not in self.outputs:
                self.outputs.append(v.name)

    # ------------------------------------------------------------------ the gates
    def add(self, a, b, name=None): return self.add_node("add", (a, b), name=name)
    def mul(self, a, b, name=None): return self.add_node("mul", (a, b), name=name)
    def copy(self, x, name=None): return self.add_node("copy", (x,), name=name)
    def max(self, a, b, name=None): return self.add_node("max", (a, b), name=name)
    def relu(self, x, name=None): return self.add_node("relu", (x,), name=name)
    def sub(self, a, b, name=None): return self.add_node("sub", (a, b), name=name)
    def neg(self, x, name=None): return self.add_node("neg", (x,), name=name)
    def div(self, a, b, name=None): return self.add_node("div", (a, b), name=name)
    def exp(self, x, name=None): return self.add_node("exp", (x,), name=name)
    def log(self, x, name=None): return self.add_node("log", (x,), name=name)
    def sqrt(self, x, name=None): return self.add_node("sqrt", (x,), name=name)
    def sigmoid(self, x, name=None): return self.add_node("sigmoid", (x,), name=name)
    def tanh(self, x, name=None): return self.add_node("tanh", (x,), name=name)
    def cos(self, x, name=None): return self.add_node("cos", (x,), name=name)
    def floor(self, x, name=None): return self.add_node("floor", (x,), name=name)
    def identity(self, x, name=None): return self.add_node("identity", (x,), name=name)
    def gt(self, a, b, name=None): return self.add_node("gt", (a, b), name=name)
    def silu(self, x, name=None): return self.add_node("silu", (x,), name=name)
    def hardswish(self, x, name=None): return self.add_node("hardswish", (x,), name=name)

    def leaky_relu(self, x, alpha=0.01, name=None):
        return self.add_node("leaky_relu", (x,), {"alpha": float(alpha)}, name=name)

    def clip(self, x, lo, hi, name=None):
        """x clamped to [lo, hi] (None: unbounded on that side); relu6 = clip(x, 0, 6). min(max(x, lo), hi)
        as torch.clamp, numpy and ONNX: with lo > hi every element becomes hi."""
        lo = float("-inf") if lo is None else float(lo)
        hi = float("inf") if hi is None else float(hi)
        if lo != lo or hi != hi:
            raise GraphError(f"clip {name or ''}: bounds must be numbers or None, got lo={lo}, hi={hi}")
        return self.add_node("clip", (x,), {"lo": lo, "hi": hi}, name=name)

    def prelu(self, x, slope, name=None):
        """x where x > 0, else slope * x; slope (C,) (one per channel, axis 1) or (1,), as torch's PReLU."""
        x, slope = self._value(x), self._value(slope)
        c = x.shape[1] if len(x.shape) >= 2 else None
        if tuple(slope.shape) not in ((1,), (c,)):
            Node(self, name or "prelu?", "prelu", [x.name, slope.name], {}).fail(
                ShapeError, f"slope has shape {shapes.fmt(slope.shape)}; it must be (C,) = ({c},) or (1,)",
                f"declare the slope as g.param(..., ({c},), init='constant', scale=0.25)")
        if tuple(slope.shape) == (c,) and len(x.shape) > 2:
            slope = self.reshape(slope, (c,) + (1,) * (len(x.shape) - 2),
                                 name=None if name is None else f"{name}.slope")
        return self.add_node("prelu", (x, slope), name=name)

    def is_training(self, name=None):
        """1.0 in a training run (exe.step, exe.run(training=True)), 0.0 in inference."""
        return self.add_node("is_training", (), {"dtype": self.dtype}, name=name)

    def apply(self, op, *inputs, name=None, **attrs):
        """Any op of the table by name, with attributes; the ones not given take the op's declared
        defaults. This is how a graph uses an op declared in user code with gc.ops.elementwise_op:
        g.apply("my_leaky_relu", x, alpha=0.2)."""
        opdef = optable.get(op)
        if opdef.scalar is not None:          # elementwise: declared attributes only, plain numbers
            unknown = sorted(set(attrs) - set(opdef.attrs))
            if unknown:
                raise GraphError(f"op {op!r} has no attribute {unknown[0]!r}; its attributes: "
                                 f"{', '.join(sorted(opdef.attrs)) or 'none'}")
            bad = [k for k, v in attrs.items() if not isinstance(v, numbers.Real) or isinstance(v, bool)]
            if bad:
                raise GraphError(f"op {op!r}: attribute {bad[0]}={attrs[bad[0]]!r} must be a plain number")
        return self.add_node(op, inputs, {**opdef.attrs, **attrs}, name=name)

    # ------------------------------------------------------------------ linear algebra, conv, pool
    def matmul(self, a, b, trans_a=False, trans_b=False, name=None):
        return self.add_node("matmul", (a, b), {"trans_a": trans_a, "trans_b": trans_b}, name=name)

    def dense(self, x, w, b=None, name=None):
        """x @ w.T + b with w shaped (out, in), like torch.nn.Linear."""
        y = self.matmul(x, w, trans_b=True, name=(f"{name}.matmul" if name else None) if b is not None else name)
        return self.add(y, b, name=name) if b is not None else y

    def conv(self, x, w, b=None, stride=1, pad=0, dilation=1, groups=1, name=None, pads=None):
        """2-D convolution, torch's Conv2d: w is (K, C // groups, KH, KW); groups split the channels
        (groups == C: depthwise), dilation spaces the filter taps. pad: int, (ph, pw), (top, bottom,
        left, right), 'valid' or 'same'."""
        x, w = self._value(x), self._value(w)
        st = shapes.pair(stride, f"{_what('conv', name)} stride", minimum=1)
        dil = shapes.pair(dilation, f"{_what('conv', name)} dilation", minimum=1)
        if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
            raise ShapeError(f"{_what('conv', name)}: groups must be a positive int, got {groups!r}. Fix: groups=1, "
                             "or a common divisor of the input channels and the filters")
        if pads is None:
            if len(x.shape) != 4 or len(w.shape) != 4:
                raise ShapeError(f"{_what('conv', name)}: input {shapes.fmt(x.shape)} and filters "
                                 f"{shapes.fmt(w.shape)} must both be 4-D (NCHW input, KCHW filters)")
            extent = tuple((k - 1) * d + 1 for k, d in zip(w.shape[2:], dil))
            pads = shapes.conv_pads(pad, x.shape[2:], extent, st)
        pads = shapes.pads4(pads, f"{_what('conv', name)} padding")
        ins = (x, w) if b is None else (x, w, b)
        return self.add_node("conv", ins, {"stride": st, "pads": tuple(pads), "dilation": dil,
                                           "groups": groups}, name=name)

    def conv_dx(self, dy, w, stride, pads, in_hw, dilation=(1, 1), groups=1, name=None):
        return self.add_node("conv_dx", (dy, w), {"stride": tuple(stride), "pads": tuple(pads),
                                                  "in_hw": tuple(in_hw), "dilation": tuple(dilation),
                                                  "groups": int(groups)}, name=name)

    def conv_dw(self, x, dy, stride, pads, k_hw, dilation=(1, 1), groups=1, name=None):
        return self.add_node("conv_dw", (x, dy), {"stride": tuple(stride), "pads": tuple(pads),
                                                  "k_hw": tuple(k_hw), "dilation": tuple(dilation),
                                                  "groups": int(groups)}, name=name)

    def _pool_attrs(self, size, stride):
        size = shapes.pair(size, "pool size", minimum=1)
        return {"size": size, "stride": shapes.pair(stride, "pool stride", minimum=1) if stride is not None else size}

    def _padded_pool(self, op, x, size, stride, pad, ceil_mode, name, fill):
        """The pool's input padded by `fill` for torch's padding and ceil mode; returns it with the
        window geometry (size, stride, (ph, pw), out_hw)."""
        from graphc.ops.pool import POOL_RULE, pool_geometry
        x = self._value(x)
        attrs = self._pool_attrs(size, stride)
        size, stride = attrs["size"], attrs["stride"]
        pad = shapes.pair(pad, "pool padding")
        view = Node(self, name or f"{op}?", op, [x.name], dict(attrs, pad=pad, ceil_mode=ceil_mode))
        if len(x.shape) != 4 or not shapes.is_static(x.shape[2:]):
            view.fail(ShapeError, f"pooling takes NCHW input with fixed H and W, got {shapes.fmt(x.shape)}",
                      "pool after a conv layer")
        if min(pad) < 0 or pad[0] > size[0] // 2 or pad[1] > size[1] // 2:
            view.fail(ShapeError, f"padding {pad} must be between 0 and half the window {size} "
                      f"(at most {(size[0] // 2, size[1] // 2)}, torch's limit)",
                      "use a smaller pad, or pad explicitly first with g.pad2d")
        out, extra = pool_geometry(x.shape[2:], size, stride, pad, ceil_mode)
        if min(out) < 1:
            view.fail(ShapeError, f"{POOL_RULE}: input {x.shape[2]}x{x.shape[3]}, window {size}, stride "
                      f"{stride}, padding {pad} gives {out[0]}x{out[1]}", "use a smaller window, or pool earlier")
        pads = (pad[0], pad[0] + extra[0], pad[1], pad[1] + extra[1])
        if any(pads):
            x = self.pad2d(x, pads, value=fill, name=None if name is None else f"{name}.pad")
        return x, size, stride, pad, out

    def maxpool(self, x, size=2, stride=None, pad=0, ceil_mode=False, name=None):
        """Max pooling, torch's MaxPool2d: pad (at most size // 2) pads with -inf, so padding never
        wins; ceil_mode keeps a last partial window (one that starts inside the input or its left/top
        padding). Made as pad2d(-inf) + maxpool over whole windows."""
        xp, size, stride, _, _ = self._padded_pool("maxpool", x, size, stride, pad, ceil_mode, name, -np.inf)
        return self.add_node("maxpool", (xp,), {"size": size, "stride": stride}, name=name)

    def avgpool(self, x, size=2, stride=None, pad=0, ceil_mode=False, count_include_pad=True, name=None):
        """Average pooling, torch's AvgPool2d: zero padding (at most size // 2), ceil mode as maxpool,
        and each window divided by its size clipped to the padded input (count_include_pad) or to the
        input. Made as pad2d(0) + avgpool (+ a constant rescale where a window's divisor is not kh*kw)."""
        from graphc.ops.pool import avg_divisors
        in_hw = tuple(self._value(x).shape[2:])
        xp, size, stride, pad, out = self._padded_pool("avgpool", x, size, stride, pad, ceil_mode, name, 0.0)
        div = avg_divisors(in_hw, size, stride, pad, out, count_include_pad)
        area = size[0] * size[1]
        if np.all(div == area):
            return self.add_node("avgpool", (xp,), {"size": size, "stride": stride}, name=name)
        mean = self.add_node("avgpool", (xp,), {"size": size, "stride": stride},
                             name=None if name is None else f"{name}.windows")
        return self.mul(mean, self.const(area / div), name=name)

    def global_maxpool(self, x, name=None):
        return self.add_node("global_maxpool", (x,), name=name)

    def global_avgpool(self, x, name=None):
        return self.add_node("global_avgpool", (x,), name=name)

    def maxpool_route(self, x, dy, size, stride, name=None):
        return self.add_node("maxpool_route", (x, dy), self._pool_attrs(size, stride), name=name)

    def maxpool_gather(self, x, g, size, stride, name=None):
        return self.add_node("maxpool_gather", (x, g), self._pool_attrs(size, stride), name=name)

    def avgpool_spread(self, dy, size, stride, in_hw, name=None):
        attrs = self._pool_attrs(size, stride)
        attrs["in_hw"] = tuple(in_hw)
        return self.add_node("avgpool_spread", (dy,), attrs, name=name)

    def global_avgpool_spread(self, dy, like, name=None):
        return self.add_node("global_avgpool_spread", (dy, like), name=name)

    # ------------------------------------------------------------------ normalisation
    def batchnorm(self, x, gamma, beta, running_mean, running_var, eps=1e-5, momentum=0.1, name=None):
        """Batch norm of x (N, C, H, W) or (N, C), torch's BatchNorm: batch statistics in training runs
        and steps (which also update the running statistics, momentum and unbiased variance as torch),
        running statistics in inference. running_mean/var must be g.param(..., trainable=False)."""
        x = self._value(x)
        stats = [self._value(running_mean), self._value(running_var)]
        for what, r in zip(("running_mean", "running_var"), stats):
            d = self.nx.nodes[r.name]
            if d["op"] != "param" or d["attrs"].get("trainable", True):
                raise GraphError(f"batchnorm {name or ''}: {what} {r.name!r} must be graph state: "
                                 f"g.param({r.name!r}, shape, init=..., trainable=False)")
            if r.name in self.stat_updates:
                raise GraphError(f"batchnorm {name or ''}: {what} {r.name!r} already belongs to another batch "
                                 "norm; give each its own running statistics")
        if not 0.0 <= float(momentum) <= 1.0:
            raise GraphError(f"batchnorm {name or ''}: momentum must be in [0, 1], got {momentum}")
        y = self.add_node("batchnorm", (x, gamma, beta, *stats), {"eps": float(eps), "momentum": float(momentum)},
                          name=name)
        with self.role("update"), self.rule("bn:running-stats"):
            for stat, r in zip(("mean", "var"), stats):
                un = f"update/{r.name}"
                u = self.add_node("bn_running_stat", (x, r), {"stat": stat, "momentum": float(momentum)},
                                  name=un if un not in self.nx else None)
                self.stat_updates[r.name] = u.name
        return y

    def lrn(self, x, size, alpha=1e-4, beta=0.75, k=1.0, name=None):
        """Local response normalisation across channels, torch's LocalResponseNorm."""
        return self.add_node("lrn", (x,), {"size": size, "alpha": float(alpha), "beta": float(beta),
                                           "k": float(k)}, name=name)

    # ------------------------------------------------------------------ reductions and shapes
    def _axes(self, x, axes):
        from graphc.ops.reduce import norm_axes
        return norm_axes(axes, len(self._value(x).shape))

    def sum(self, x, axes=None, keepdims=False, name=None):
        return self.add_node("sum", (x,), {"axes": self._axes(x, axes), "keepdims": keepdims}, name=name)

    def mean(self, x, axes=None, keepdims=False, name=None):
        return self.add_node("mean", (x,), {"axes": self._axes(x, axes), "keepdims": keepdims}, name=name)

    def broadcast_like(self, dy, like, axes, keepdims, mean=False, name=None):
        return self.add_node("broadcast_like", (dy, like), {"axes": tuple(axes), "keepdims": keepdims,
                                                            "mean": mean}, name=name)

    def sum_to(self, x, like, name=None): return self.add_node("sum_to", (x, like), name=name)
    def expand_like(self, x, like, name=None): return self.add_node("expand_like", (x, like), name=name)

    def reshape(self, x, shape, name=None):
        """Reshape; dims are positive ints, one -1 (inferred) and the symbolic batch dim (None)."""
        if not isinstance(shape, (tuple, list)):
            raise ShapeError(f"{_what('reshape', name)}: the target shape must be a tuple, got {shape!r}")
        shape = tuple("N" if d is None else d for d in shape)
        if not all((isinstance(d, str) and d) or (shapes.is_int(d) and (d > 0 or d == -1)) for d in shape):
            raise ShapeError(f"{_what('reshape', name)}: target dims must be positive ints, one -1 (inferred) or None "
                             f"(the batch dim), got {shape}")
        shape = tuple(d if isinstance(d, str) else int(d) for d in shape)
        return self.add_node("reshape", (x,), {"shape": shape}, name=name)

    def reshape_like(self, x, like, name=None): return self.add_node("reshape_like", (x, like), name=name)

    def flatten(self, x, name=None):
        """(N, ...) -> (N, prod(...)), keeping the batch dim."""
        s = self._value(x).shape
        return self.reshape(x, (s[0], -1), name=name)

    def transpose(self, x, axes=None, name=None):
        nd = len(self._value(x).shape)
        if axes is not None and not isinstance(axes, (tuple, list)):
            raise ShapeError(f"{_what('transpose', name)}: axes must be a permutation tuple, got {axes!r}")
        axes = tuple(reversed(range(nd))) if axes is None else \
            tuple(shapes.norm_axis(a, nd, "transpose axis") for a in axes)
        return self.add_node("transpose", (x,), {"axes": axes}, name=name)

    def concat(self, values, axis=1, name=None):
        values = list(values)
        if not values:
            raise GraphError("concat needs at least one value")
        axis = shapes.norm_axis(axis, len(self._value(values[0]).shape), "concat axis")
        return self.add_node("concat", values, {"axis": axis}, name=name)

    def slice(self, x, axis, start, stop, name=None):
        """x[start:stop] along one (non-batch) axis; 0 <= start < stop <= that dim."""
        axis = shapes.norm_axis(axis, len(self._value(x).shape), "slice axis")
        return self.add_node("slice", (x,), {"axis": axis, "start": start, "stop": stop}, name=name)

    def unslice(self, g, like, axis, start, name=None):
        return self.add_node("unslice", (g, like), {"axis": axis, "start": start}, name=name)

    def pad2d(self, x, pads, value=0.0, mode="constant", name=None):
        """Pads H and W by (top, bottom, left, right) (an int pads all four): mode "constant" (with
        value), "reflect" (mirrored without repeating the edge, torch's reflect; pads < the dim) or
        "edge" (the border repeated, torch's replicate)."""
        pads = shapes.pads4(pads, "pad2d pads")
        return self.add_node("pad2d", (x,), {"pads": pads, "value": float(value), "mode": mode}, name=name)

    def crop2d(self, x, pads, mode="constant", name=None):
        """Removes a border (pad2d's gradient). mode "reflect"/"edge": the border is added back onto
        the pixels it was copied from (the gradient of a reflect/edge pad)."""
        pads = shapes.pads4(pads, "crop2d pads")
        return self.add_node("crop2d", (x,), {"pads": pads, "mode": mode}, name=name)

    # ------------------------------------------------------------------ softmax and losses
    def softmax(self, x, axis=-1, name=None):
        axis = shapes.norm_axis(axis, len(self._value(x).shape), "softmax axis")
        return self.add_node("softmax", (x,), {"axis": axis}, name=name)

    def softmax_cross_entropy(self, logits, labels, name=None):
        """Mean over the batch of -sum(y log softmax(logits)); labels int (N,) or one-hot (N, K)."""
        return self.add_node("softmax_cross_entropy", (logits, labels), name=name)

    def softmax_ce_grad(self, logits, labels, dy, name=None):
        return self.add_node("softmax_ce_grad", (logits, labels, dy), name=name)

    def cross_entropy(self, probs, labels, name=None):
        return self.add_node("cross_entropy", (probs, labels), name=name)

    def cross_entropy_grad(self, probs, labels, dy, name=None):
        return self.add_node("cross_entropy_grad", (probs, labels, dy), name=name)

    def mse(self, pred, target, name=None): return self.add_node("mse", (pred, target), name=name)
    def mse_grad(self, a, b, dy, name=None): return self.add_node("mse_grad", (a, b, dy), name=name)

    def bce_with_sigmoid(self, logits, targets, name=None):
        return self.add_node("bce_with_sigmoid", (logits, targets), name=name)

    def bce_grad(self, z, t, dy, name=None): return self.add_node("bce_grad", (z, t, dy), name=name)

    def dropout(self, x, rate=0.5, seed=None, name=None):
        """Inverted dropout: identity at inference; in training a seeded mask (a node of its own)."""
        if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0.0 <= rate < 1.0:
            raise GraphError(f"dropout rate must be in [0, 1), got {rate}")
        seed = self.seed if seed is None else seed
        if not shapes.is_int(seed) or seed < 0:
            raise GraphError(f"dropout seed must be a non-negative integer, got {seed!r}")
        mask = self.add_node("dropout_mask", (x,), {"rate": float(rate), "seed": int(seed)},
                             name=None if name is None else name + ".mask")
        return self.mul(x, mask, name=name)

    def l2_penalty(self, weights, lam, name=None):
        """lam / 2 * sum of squared weights (seeds/004's regulariser); add it to a loss."""
        terms = [self.sum(self.mul(w, w)) for w in weights]
        total = terms[0]
        for t in terms[1:]:
            total = self.add(total, t)
        return self.mul(self.scalar(lam / 2.0), total, name=name)

    # ------------------------------------------------------------------ copying
    def clone(self, name=None) -> "Graph":
        """A structural copy (shares nothing mutable with the original)."""
        g = Graph.__new__(Graph)
        g.__dict__.update(self.__dict__)
        g.name = name or self.name
        g.nx = self.nx.copy()
        for n in g.nx.nodes:
            g.nx.nodes[n]["attrs"] = dict(g.nx.nodes[n]["attrs"])
        g.outputs = list(self.outputs)
        g.params = self.params.copy()
        g.updates = dict(self.updates)
        g.stat_updates = dict(self.stat_updates)
        g.keep = set(self.keep)
        g._counts = dict(self._counts)
        g._scalars = dict(self._scalars)
        g.__dict__.pop("schedule", None)
        return g
