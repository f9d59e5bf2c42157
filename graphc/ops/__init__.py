"""The op table: every op (gate) declared once, with its shape rule, numpy semantics and gradient rule.

An entry is an `OpDef`. Its pieces:
- ``infer(node, in_types) -> (shape, dtype)``: the shape and dtype rule; raises a graphc error that names
  the node, the shapes and the rule (use ``node.fail(...)``);
- ``ref(inputs, attrs, ctx) -> ndarray``: the reference semantics in plain numpy (the oracle);
- ``grad(b, node, dy) -> [grad per input or None]``: the gradient rule, written with the gradient
  builder ``b`` as a small graph of table ops (never a closure), each new node tagged with a rule name;
- ``scalar``: for elementwise ops, the scalar expression over ``a0, a1, ...`` that code generators
  (Numba, CUDA) fuse into one loop;
- ``flops(in_shapes, out_shape, attrs)``: floating-point operations, for benchmarks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

OPS: dict[str, "OpDef"] = {}


@dataclass
class OpDef:
    name: str
    infer: Callable
    ref: Callable
    grad: Optional[Callable] = None
    scalar: Optional[str] = None          # elementwise: scalar expression over a0, a1, ...
    flops: Optional[Callable] = None
    doc: str = ""
    source: bool = False                  # input/param/const/state: no inputs, value given from outside
    host: bool = False                    # runs on the host in every backend (e.g. random masks)
    differentiable: bool = True
    attrs: dict = field(default_factory=dict)   # attribute names -> defaults (documentation)


def register(opdef: OpDef) -> OpDef:
    if opdef.name in OPS:
        raise ValueError(f"op {opdef.name!r} registered twice")
    OPS[opdef.name] = opdef
    return opdef


def get(name: str) -> OpDef:
    from graphc.errors import GraphError
    try:
        return OPS[name]
    except KeyError:
        raise GraphError(f"unknown op {name!r}; known ops: {', '.join(sorted(OPS))}") from None


def is_elementwise(name: str) -> bool:
    return OPS[name].scalar is not None


# Importing the families fills the table.
from graphc.ops import sources, elementwise, linalg, conv, pool, reduce, shape, loss, norm, fused  # noqa: E402,F401
