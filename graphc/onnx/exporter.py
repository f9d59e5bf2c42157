"""gc.onnx.save: a graphc inference graph, with its current weights, as an ONNX model.

What is exported: the forward graph the user built (for an executable, the graph it was compiled from,
so fused kernels, the backward graph and the optimizer are not part of it) with the executable's current
state (trained weights, batch norm's running statistics). Outputs: the graph's outputs that are not
losses; a graph whose outputs are all losses (the zoo's) exports the predictions the losses take (the
logits), and its label inputs drop out. Dropout is the identity, as at inference.

The symbolic batch dim is the dynamic dim "N" of the ONNX model. The model passes
onnx.checker.check_model(full_check=True) before it is written (atomically).
"""
from __future__ import annotations

import os
import tempfile

import networkx as nx
import numpy as np

from graphc.errors import GraphError
from graphc.onnx.importer import onnx_module

DEFAULT_OPSET = 17
MIN_OPSET = 11                 # Pad, Clip and Slice take their pads, bounds and ranges as inputs from 11
LOSS_OPS = ("softmax_cross_entropy", "cross_entropy", "mse", "bce_with_sigmoid")
ELEM_TYPES = {"float32": 1, "float64": 11, "int64": 7, "int32": 6}


def _source(graph_or_exe):
    """(forward graph, {state name: current value}, float dtype)."""
    from graphc.executable import Executable
    from graphc.graph import Graph
    if isinstance(graph_or_exe, Graph):
        g = graph_or_exe
        return g, {n: g.params[n] for n in g.state_names}, g.dtype
    if isinstance(graph_or_exe, Executable):
        g = getattr(graph_or_exe, "source", None)
        if g is None:
            raise GraphError("this executable does not know the graph it was compiled from; "
                             "save the graph with gc.onnx.save(graph, ...) instead")
        return g, dict(graph_or_exe.state), str(graph_or_exe.dtype)
    raise GraphError(f"gc.onnx.save takes a graphc Graph or an executable, got {type(graph_or_exe).__name__}")


def export_outputs(g, outputs=None):
    """The values the ONNX model outputs (see the module doc)."""
    if outputs is not None:
        for o in outputs:
            if o not in g:
                raise GraphError(f"outputs: graph {g.name!r} has no value {o!r}")
        return list(outputs)
    plain = [o for o in g.outputs if g.nx.nodes[o]["op"] not in LOSS_OPS]
    if plain:
        return plain
    preds = []
    for o in g.outputs:
        p = g.nx.nodes[o]["inputs"][0]
        if p not in preds:
            preds.append(p)
    return preds


class Exporter:
    """Builds the ONNX graph node by node; export_ops holds one function per graphc op."""

    def __init__(self, graph, values, dtype, opset):
        from graphc.onnx import export_ops
        self.g, self.values, self.dtype, self.opset = graph, values, dtype, opset
        self.ops = export_ops.EXPORTS
        self.absorbed = export_ops.absorbed_pads(graph)
        self.nodes, self.inits, self.inputs = [], [], []
        self.used = set(graph.nx.nodes)

    def tmp(self, base):
        name, k = base, 0
        while name in self.used:
            k += 1
            name = f"{base}_{k}"
        self.used.add(name)
        return name

    def emit(self, op, inputs, output, **attrs):
        from onnx import helper
        self.nodes.append(helper.make_node(op, list(inputs), [output], name=output,
                                           **{k: v for k, v in attrs.items() if v is not None}))
        return output

    def const(self, value, base, dtype=None):
        from onnx import numpy_helper
        name = self.tmp(base)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def nd(self, name):
        return self.g.nx.nodes[name]

    def value_info(self, name):
        from onnx import helper
        nd = self.nd(name)
        dtype = self.dtype if nd["dtype"].startswith("float") else nd["dtype"]
        return helper.make_tensor_value_info(name, ELEM_TYPES[dtype], list(nd["shape"]))

    def build(self, outputs):
        from onnx import helper, numpy_helper
        need = set(outputs)
        for o in outputs:
            need |= nx.ancestors(self.g.nx, o)
        for name in self.g.topo():
            if name not in need or name in self.absorbed:
                continue
            nd = self.nd(name)
            op = nd["op"]
            if op == "input":
                self.inputs.append(self.value_info(name))
            elif op in ("param", "const"):
                v = self.values[name] if op == "param" else nd["attrs"]["value"]
                v = np.asarray(v)
                if v.dtype.kind == "f":
                    v = v.astype(self.dtype)
                self.inits.append(numpy_helper.from_array(v, name))
            elif op in self.ops:
                self.ops[op](self, name, nd)
            else:
                raise GraphError(f"graphc op {op!r} (node {name!r}) has no ONNX export")
        graph = helper.make_graph(self.nodes, self.g.name, self.inputs, [self.value_info(o) for o in outputs],
                                  self.inits, doc_string="exported by graphc")
        opset = [helper.make_opsetid("", self.opset)]
        return helper.make_model(graph, opset_imports=opset, producer_name="graphc",
                                 ir_version=helper.find_min_ir_version_for(opset))


def to_model(graph_or_exe, opset=None, outputs=None):
    """The ONNX ModelProto of a graph or an executable (checked with full_check)."""
    onnx = onnx_module()
    g, values, dtype = _source(graph_or_exe)
    newest = onnx.defs.onnx_opset_version()
    opset = DEFAULT_OPSET if opset is None else int(opset)
    if not MIN_OPSET <= opset <= newest:
        raise GraphError(f"opset must be between {MIN_OPSET} and {newest} (this onnx package's newest), got {opset}")
    model = Exporter(g, values, dtype, opset).build(export_outputs(g, outputs))
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:   # noqa: BLE001 - onnx's ValidationError / InferenceError
        raise GraphError(f"the exported model fails onnx.checker ({type(e).__name__}: {e})") from e
    return model


def save(graph_or_exe, path, opset=None, outputs=None):
    """Writes the inference graph of a Graph or an executable (its current weights) to `path` as ONNX.

    opset: the ONNX opset (11 to the newest the onnx package knows; default 17). outputs: value names to output (default: the non-loss outputs, or the
    predictions the loss outputs take). Returns the ModelProto. The file is written atomically."""
    model = to_model(graph_or_exe, opset, outputs)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".graphc-", suffix=".onnx")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model.SerializeToString())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return model
