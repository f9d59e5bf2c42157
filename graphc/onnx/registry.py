"""The ONNX -> graphc mapping table and the errors of the ONNX bridge.

Each ONNX op graphc can express has one entry: a function ``fn(ctx)`` that builds the op with the public
`Graph` API and returns its results (one per ONNX output), and the positions of the inputs that must be
known at import time (shapes, axes, pads, clip bounds). The entries live in the ``map_*`` modules, one per
op family; importing this package's importer fills the table.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

from graphc.errors import GraphError

OPS: dict[str, "OnnxOp"] = {}

ISSUE_12_NOTE = "a graphc op of the CNN op set (issue 12) that this build does not have yet"


class OnnxError(GraphError):
    """An ONNX model graphc cannot read: not a model, a bad opset, a malformed node."""


class UnsupportedOnnx(OnnxError):
    """An ONNX op, attribute or input graphc cannot express. Names the node, the op and the attribute;
    ``reason`` is the bare explanation (the conformance table groups cases by it) and ``waits_for`` the
    graphc Graph method it needs when that method does not exist in this build."""

    def __init__(self, reason, node=None, op=None, attribute=None, waits_for=None):
        self.reason, self.node, self.op, self.attribute, self.waits_for = reason, node, op, attribute, waits_for
        where = f"ONNX node {node!r} ({op})" if node is not None else f"ONNX op {op}"
        attr = f", attribute {attribute!r}" if attribute else ""
        super().__init__(f"{where}{attr}: {reason}")


@dataclass
class OnnxOp:
    name: str
    fn: Callable
    const_inputs: tuple = ()     # input positions that must be constants at import time


def onnx_op(*names, const_inputs=()):
    """Registers a mapping function for one or more ONNX op types."""
    def deco(fn):
        for n in names:
            if n in OPS:
                raise ValueError(f"ONNX op {n!r} mapped twice")
            OPS[n] = OnnxOp(n, fn, tuple(const_inputs))
        return fn
    return deco


def graph_has(method, param=None) -> bool:
    """Whether this build's gc.Graph has `method` (and, if given, a parameter `param` of it): the
    issue-12 ops are mapped against their fixed public names and used as soon as they exist."""
    from graphc.graph import Graph
    fn = getattr(Graph, method, None)
    if fn is None:
        return False
    return param is None or param in inspect.signature(fn).parameters


_BATCHED_MATMUL = []


def batched_matmul() -> bool:
    """Whether g.matmul takes rank > 2 operands (numpy batching, issue 12); its signature does not
    change, so ask the op's shape rule once."""
    if not _BATCHED_MATMUL:
        from graphc.graph import Graph
        g = Graph("probe")
        try:
            g.matmul(g.input("a", (2, 3, 4)), g.input("b", (2, 4, 5)))
            _BATCHED_MATMUL.append(True)
        except GraphError:
            _BATCHED_MATMUL.append(False)
    return _BATCHED_MATMUL[0]
