"""gc.onnx.load: an ONNX model becomes a graphc Graph built with the public Graph API.

How values travel through the import:
- a graph input becomes ``g.input`` (a dynamic first dim becomes graphc's symbolic batch dim "N");
- an initializer stays a `Const` until an op uses it: as a tensor operand a float initializer becomes a
  trainable ``g.param`` (its value kept), as an attribute-like input (a shape, axes, pads, clip bounds) its
  value is read directly;
- a node whose inputs are all known at import time is folded (evaluated with onnx's reference
  implementation), so the Shape -> Gather -> Unsqueeze -> Concat -> Reshape chains that exporters write
  disappear. The batch size is not known at import time: shape vectors carry it as the symbol "N"
  through data-movement ops (Gather, Concat, Slice, ...), and a Reshape to such a vector keeps graphc's
  symbolic batch dim;
- every other node goes through the mapping table (the ``map_*`` modules). An op, attribute or input
  the table cannot express raises `UnsupportedOnnx`, naming the node, the op and the attribute; an
  attribute a mapping did not read is never ignored silently.
"""
from __future__ import annotations

import os

import numpy as np

from graphc.errors import GraphError, ShapeError
from graphc.graph import Graph, Value
from graphc.onnx.registry import ISSUE_12_NOTE, OPS, OnnxError, UnsupportedOnnx, graph_has

MIN_OPSET = 7              # older models are upgraded with onnx.version_converter first
UPGRADE_TO = 9
ONNX_DTYPES = {1: "float32", 11: "float64", 7: "int64", 6: "int32"}
SYMBOL = 1_000_003         # stands for the batch size while shape vectors are folded numerically
# ops that only move shape-vector elements around: safe to fold with the batch size as a symbol
SHAPE_MOVERS = {"Gather", "Unsqueeze", "Squeeze", "Concat", "Slice", "Cast", "Identity", "Reshape", "Flatten"}
LOSSES = ("softmax_cross_entropy", "mse")


def onnx_module():
    try:
        import onnx
    except ImportError as e:
        raise GraphError("ONNX support needs the onnx package: pip install 'graphc[onnx]'") from e
    return onnx


class Const:
    """A value known at import time. ``param``: a float initializer, which becomes a trainable graphc
    param when an op uses it as a tensor. An object-dtype value is a shape vector holding "N"."""
    __slots__ = ("value", "param")

    def __init__(self, value, param=False):
        self.value, self.param = value, param

    @property
    def symbolic(self):
        return self.value.dtype == object


# ------------------------------------------------------------------------------------------ reading

def load_file(path):
    """The ModelProto in an .onnx file, as it is (a missing or unreadable file is one error line)."""
    onnx = onnx_module()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(2, "No such ONNX model file", path)
    try:
        return onnx.load(path)
    except Exception as e:   # noqa: BLE001 - protobuf's DecodeError and friends
        raise OnnxError(f"{path} is not a readable ONNX model ({type(e).__name__}: {e})") from e


def read_model(model):
    """(ModelProto, its original opset) from a path, bytes or a ModelProto; opsets below 7 upgraded,
    local functions inlined."""
    onnx = onnx_module()
    if isinstance(model, (str, os.PathLike)):
        model = load_file(model)
    elif isinstance(model, bytes):
        model = onnx.load_from_string(model)
    elif not isinstance(model, onnx.ModelProto):
        raise OnnxError(f"gc.onnx.load takes a path, bytes or an onnx.ModelProto, got {type(model).__name__}")
    if model.functions:
        from onnx import inliner
        model = inliner.inline_local_functions(model)
    version = model_opset(model)
    newest = onnx.defs.onnx_opset_version()
    if version > newest:
        raise OnnxError(f"the model uses opset {version}, newer than the newest this onnx package knows "
                        f"({newest}); upgrade onnx")
    if version < MIN_OPSET:
        from onnx import version_converter
        try:
            model = version_converter.convert_version(model, UPGRADE_TO)
        except Exception as e:   # noqa: BLE001 - the converter raises bare RuntimeErrors
            raise OnnxError(f"the model uses opset {version}; graphc reads opsets {MIN_OPSET}..{newest} and "
                            f"onnx.version_converter could not upgrade it: {e}") from e
    return model, version


def model_opset(model):
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return 1


def attr_value(a):
    """An AttributeProto as a Python value: ints, floats, str, tuples of them, or a numpy array."""
    from onnx import AttributeProto, helper, numpy_helper
    if a.type == AttributeProto.TENSOR:
        return numpy_helper.to_array(a.t)
    if a.type not in (AttributeProto.INT, AttributeProto.FLOAT, AttributeProto.STRING, AttributeProto.INTS,
                      AttributeProto.FLOATS, AttributeProto.STRINGS):
        return a           # graphs, sparse tensors, type protos: no mapping reads them
    v = helper.get_attribute_value(a)
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, list):
        return tuple(x.decode() if isinstance(x, bytes) else x for x in v)
    return v


# ------------------------------------------------------------------------------------------ per node

class Ctx:
    """What a mapping function sees of its node: attributes (each read is recorded; an attribute no
    mapping read is an error), inputs as graphc values or import-time constants, output names."""

    def __init__(self, imp, node):
        self.imp, self.node, self.g, self.opset = imp, node, imp.g, imp.opset
        self.op = node.op_type
        self.name = node.name or node.output[0]
        self.attrs = {a.name: a for a in node.attribute}
        self.read = set()
        self.lifted = False        # a 1-D conv or pool lifted to 2-D (map_conv.as_2d)

    # attributes
    def attr(self, name, default=None):
        self.read.add(name)
        return attr_value(self.attrs[name]) if name in self.attrs else default

    def unread_attrs(self):
        return [a for a in self.attrs if a not in self.read]

    # errors
    def unsupported(self, reason, attribute=None, waits_for=None):
        raise UnsupportedOnnx(reason, node=self.name, op=self.op, attribute=attribute, waits_for=waits_for)

    def need(self, method, param=None, attribute=None):
        """Fails unless this build's Graph has `method` (and its parameter `param`): the issue-12 ops."""
        if not graph_has(method, param):
            what = f"g.{method}(..., {param}=...)" if param else f"g.{method}"
            self.unsupported(f"needs {what}, {ISSUE_12_NOTE}",
                             attribute=attribute, waits_for=method if param is None else f"{method}({param})")

    # inputs
    def has(self, i):
        return i < len(self.node.input) and self.node.input[i] != ""

    def entry(self, i):
        return self.imp.env[self.node.input[i]]

    def x(self, i):
        """Input i as a graphc Value (an initializer becomes a param, a constant a const)."""
        return self.imp.value_of(self.node.input[i])

    def state(self, i):
        """Input i as non-trainable graph state (batch norm's running statistics)."""
        return self.imp.value_of(self.node.input[i], trainable=False)

    def const(self, i, default=None, symbolic=False):
        """Input i's value, which must be known at import time (absent input: default)."""
        if not self.has(i):
            return default
        e = self.entry(i)
        if not isinstance(e, Const):
            self.unsupported(f"input {i} ({self.node.input[i]!r}) must be a constant (an initializer or "
                             "computed from constants); here it is computed at run time")
        if e.symbolic and not symbolic:
            self.unsupported(f"input {i} ({self.node.input[i]!r}) depends on the batch size, which is only "
                             "known at run time")
        return e.value

    def shape(self, i):
        e = self.entry(i)
        return tuple(e.value.shape) if isinstance(e, Const) else tuple(e.shape)

    def dtype(self, i):
        e = self.entry(i)
        return str(e.value.dtype) if isinstance(e, Const) else e.dtype

    # outputs and helper nodes
    def out(self, k=0):
        return self.node.output[k]

    def tmp(self, suffix):
        """A name for a helper node that no ONNX value uses."""
        return self.imp.fresh(f"{self.out(0)}:{suffix}")

    def scalar(self, v):
        return self.g.const(np.asarray(v, dtype=self.g.dtype), name=self.tmp(f"c{v:g}"))


# ------------------------------------------------------------------------------------------ the importer

class Importer:
    def __init__(self, model, constants=None, input_shapes=None, source_opset=None):
        self.model, self.graph_proto = model, model.graph
        self.opset = model_opset(model)
        self.source_opset = source_opset or self.opset      # before onnx.version_converter
        self.constants = dict(constants or {})
        self.input_shapes = dict(input_shapes or {})
        self.onnx_names = self._all_names()
        self.g = Graph(self.graph_proto.name or "onnx_model", dtype=self._float_dtype())
        self.env: dict[str, object] = {}
        self.materialized: dict[tuple, Value] = {}
        self.consumed = {i for n in self.graph_proto.node for i in n.input} | \
            {o.name for o in self.graph_proto.output}

    def _all_names(self):
        gp = self.graph_proto
        names = {v.name for v in list(gp.input) + list(gp.output) + list(gp.initializer)}
        for n in gp.node:
            names.update(n.input)
            names.update(n.output)
        names.discard("")
        return names

    def _float_dtype(self):
        types = [v.type.tensor_type.elem_type for v in self.graph_proto.input] + \
                [t.data_type for t in self.graph_proto.initializer]
        floats = {ONNX_DTYPES[t] for t in types if t in (1, 11)}
        if floats == {"float32", "float64"}:
            raise UnsupportedOnnx("the model mixes float32 and float64 tensors; graphc graphs have one float "
                                  "dtype", op="(model)")
        return "float64" if floats == {"float64"} else "float32"

    def fresh(self, base):
        name, k = base, 0
        while name in self.g or name in self.onnx_names:
            k += 1
            name = f"{base}_{k}"
        return name

    # values
    def value_of(self, name, trainable=True):
        e = self.env[name]
        if isinstance(e, Value):
            return e
        key = (name, trainable)
        if key not in self.materialized:
            if e.symbolic:
                raise UnsupportedOnnx(f"value {name!r} is computed from the batch size, which graphc knows only "
                                      "at run time", op="(shape arithmetic)")
            gname = name if name not in self.g else self.fresh(name)
            if e.value.dtype.kind == "f" and (e.param or not trainable):
                self.materialized[key] = self.g.param(gname, value=e.value, trainable=trainable)
            else:
                self.materialized[key] = self.g.const(e.value, name=gname)
        return self.materialized[key]

    def build(self) -> Graph:
        from onnx import numpy_helper
        gp = self.graph_proto
        for t in gp.initializer:
            arr = numpy_helper.to_array(t)
            self.env[t.name] = Const(arr, param=arr.dtype.kind == "f")
        for name, value in self.constants.items():
            self.env[name] = Const(np.asarray(value))
        for v in gp.input:
            if v.name not in self.env:
                self.env[v.name] = self._input(v)
        for node in gp.node:
            self._node(node)
        self._outputs()
        return self.g

    def _input(self, v):
        t = v.type.tensor_type
        if not v.type.HasField("tensor_type") or t.elem_type not in ONNX_DTYPES:
            raise UnsupportedOnnx(f"graph input {v.name!r} has type {_type_name(v)}; graphc takes float32, "
                                  "float64, int64 and int32 tensors", op="(graph input)")
        if not t.HasField("shape"):
            raise UnsupportedOnnx(f"graph input {v.name!r} has no shape; graphc needs each input's rank and "
                                  "non-batch dims", op="(graph input)")
        if v.name in self.input_shapes:
            dims = tuple(self.input_shapes[v.name])
            if len(dims) != len(t.shape.dim):
                raise ShapeError(f"input_shapes[{v.name!r}] = {dims} has rank {len(dims)}; the model's input has "
                                 f"rank {len(t.shape.dim)}")
            return self.g.input(v.name, dims, dtype=self._dtype(t))
        shape = []
        for k, d in enumerate(t.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                shape.append(int(d.dim_value))
            elif d.HasField("dim_value"):
                raise UnsupportedOnnx(f"graph input {v.name!r}: dim {k} is empty (0); graphc tensors have no empty "
                                      "dims", op="(graph input)")
            elif k == 0:
                shape.append("N")
            else:
                raise UnsupportedOnnx(f"graph input {v.name!r}: dim {k} is dynamic ({d.dim_param or '?'}); graphc "
                                      "needs static dims except the batch dim. Fix: export with a fixed size",
                                      op="(graph input)")
        return self.g.input(v.name, tuple(shape), dtype=self._dtype(t))

    def _dtype(self, t):
        dtype = ONNX_DTYPES[t.elem_type]
        return self.g.dtype if dtype.startswith("float") else dtype

    def _node(self, node):
        if node.domain not in ("", "ai.onnx"):
            raise UnsupportedOnnx(f"op {node.op_type} of domain {node.domain!r}: graphc maps the standard ONNX "
                                  "domain only",
                                  node=node.name or node.output[0], op=node.op_type)
        for i in node.input:
            if i and i not in self.env:
                raise OnnxError(f"ONNX node {node.name or node.output[0]!r} ({node.op_type}) reads {i!r}, "
                                "which no earlier node, input or initializer produces")
        ins = [self.env[i] for i in node.input if i]
        spec = OPS.get(node.op_type)
        if all(isinstance(e, Const) and not e.param for e in ins) and (ins or spec is None):
            return self._fold(node, ins)
        if spec is None:
            if ins and all(isinstance(e, Const) for e in ins):
                return self._fold(node, ins)    # weights computed from initializers: constants
            raise UnsupportedOnnx(f"graphc has no mapping for ONNX op {node.op_type}",
                                  node=node.name or node.output[0], op=node.op_type)
        ctx = Ctx(self, node)
        try:
            results = spec.fn(ctx)
        except UnsupportedOnnx:
            raise
        except GraphError as e:
            raise type(e)(f"ONNX node {ctx.name!r} ({node.op_type}): {e}") from e
        except Exception as e:   # noqa: BLE001 - a malformed node (a missing or mistyped attribute)
            raise OnnxError(f"ONNX node {ctx.name!r} ({node.op_type}) cannot be read: {type(e).__name__}: {e}") from e
        unread = ctx.unread_attrs()
        if unread:
            ctx.unsupported("graphc's mapping does not honour this attribute", attribute=unread[0])
        self._bind(ctx, results if isinstance(results, (list, tuple)) else [results])

    def _bind(self, ctx, results):
        for k, out in enumerate(ctx.node.output):
            if not out:
                continue
            r = results[k] if k < len(results) else None
            if r is None:
                if out in self.consumed:
                    ctx.unsupported(f"output {k} ({out!r}) is not supported")
                continue
            self.env[out] = Const(r) if isinstance(r, np.ndarray) else r

    def _fold(self, node, ins):
        """Evaluates a node on import-time constants with onnx's reference implementation."""
        from onnx.reference import ReferenceEvaluator
        symbolic = any(e.symbolic for e in ins)
        if symbolic and node.op_type not in SHAPE_MOVERS:
            raise UnsupportedOnnx("computes with the batch size, which graphc knows only at run time (only "
                                  f"{', '.join(sorted(SHAPE_MOVERS))} may move it around)",
                                  node=node.name or node.output[0], op=node.op_type)
        feeds = {i: _numeric(self.env[i].value) for i in node.input if i}
        try:
            outs = ReferenceEvaluator(node, opsets={"": self.opset}).run(None, feeds)
        except Exception as e:   # noqa: BLE001 - the reference implementation's own errors
            raise UnsupportedOnnx(f"cannot be evaluated at import time ({type(e).__name__}: {e})",
                                  node=node.name or node.output[0], op=node.op_type) from e
        for name, v in zip(node.output, outs):
            if name:
                v = np.asarray(v)
                self.env[name] = Const(_symbolic(v) if symbolic else v)

    def _outputs(self):
        for o in self.graph_proto.output:
            e = self.env.get(o.name)
            if e is None:
                raise OnnxError(f"graph output {o.name!r} is produced by no node")
            v = self.value_of(o.name)
            if v.name != o.name:
                v = self.g.identity(v, name=o.name if o.name not in self.g else self.fresh(o.name))
            _check_declared(o, v)
            self.g.output(v)


def _numeric(v):
    if v.dtype != object:
        return v
    return np.array([SYMBOL if d == "N" else d for d in v.ravel()], dtype=np.int64).reshape(v.shape)


def _symbolic(v):
    if v.dtype.kind not in "iu" or not (v == SYMBOL).any():
        return v
    return np.array(["N" if d == SYMBOL else int(d) for d in v.ravel()], dtype=object).reshape(v.shape)


def _type_name(v):
    from onnx import TensorProto
    if not v.type.HasField("tensor_type"):
        return v.type.WhichOneof("value")
    return TensorProto.DataType.Name(v.type.tensor_type.elem_type)


def _check_declared(o, v):
    """A declared static output shape must be the one graphc infers (catches mapping mistakes early)."""
    t = o.type.tensor_type
    if not o.type.HasField("tensor_type") or not t.HasField("shape"):
        return
    declared = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    got = v.shape
    if len(declared) != len(got) or any(d is not None and isinstance(s, int) and d != s
                                        for d, s in zip(declared, got)):
        raise ShapeError(f"graph output {o.name!r}: graphc infers shape {tuple(got)} but the model declares "
                         f"{tuple(d if d is not None else '?' for d in declared)}")


# ------------------------------------------------------------------------------------------ the entry

def load(model, loss=None, constants=None, input_shapes=None) -> Graph:
    """An ONNX model (a path, bytes or an onnx.ModelProto) as a graphc Graph.

    loss: None (the model as it is: its inputs, its outputs), "softmax_cross_entropy" (adds an int64
    input "labels" (N,) and a scalar output "loss" over the model's (N, K) output; a final Softmax is
    skipped, the loss works on the logits) or "mse" (adds a float input "targets" shaped like the
    output). The model's own outputs stay outputs; `gc.compile(g, optimizer=...)` then trains it.
    constants: {input name: array} binds graph inputs to fixed values at import time (e.g. a shape
    input), as if they were initializers.
    input_shapes: {input name: shape} replaces declared input shapes (None: the symbolic batch dim), e.g.
    to fix the image size of a model exported with dynamic height and width.
    """
    import graphc.onnx.map_elementwise  # noqa: F401  (importing the families fills the table)
    import graphc.onnx.map_conv  # noqa: F401
    import graphc.onnx.map_tensor  # noqa: F401
    import graphc.onnx.map_linalg  # noqa: F401
    proto, source_opset = read_model(model)
    g = Importer(proto, constants, input_shapes, source_opset).build()
    if loss is not None:
        add_loss(g, loss)
    return g


def add_loss(g, loss):
    """Adds a training loss over the graph's single output (see load)."""
    if loss not in LOSSES:
        raise GraphError(f"loss must be one of {LOSSES} or None, got {loss!r}")
    if len(g.outputs) != 1:
        raise GraphError(f"loss={loss!r} needs a model with one output; this one has {g.outputs}. "
                         "Add the loss by hand: g.softmax_cross_entropy(g[name], g.input('labels', ...))")
    y = g[g.outputs[0]]
    if loss == "softmax_cross_entropy":
        if len(y.shape) != 2:
            raise ShapeError(f"loss='softmax_cross_entropy' needs a (batch, classes) output; {y.name!r} is "
                             f"{tuple(y.shape)}")
        nd = g.nx.nodes[y.name]
        if nd["op"] == "softmax" and nd["attrs"]["axis"] == 1:
            y = g[nd["inputs"][0]]          # the loss takes logits: softmax + log in one stable op
        labels = g.input(_free(g, "labels"), (y.shape[0],), dtype="int64")
        out = g.softmax_cross_entropy(y, labels, name=_free(g, "loss"))
    else:
        out = g.mse(y, g.input(_free(g, "targets"), y.shape), name=_free(g, "loss"))
    g.output(out)
    g.loss = out.name
    return g


def _free(g, name):
    if name not in g:
        return name
    return g.fresh_name(name + "_")
