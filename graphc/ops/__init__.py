"""The op table: every op (gate) declared once, with its shape rule, numpy semantics and gradient rule.

An entry is an `OpDef`. Its pieces:
- ``infer(node, in_types) -> (shape, dtype)``: the shape and dtype rule; raises a graphc error that names
  the node, the shapes and the rule (use ``node.fail(...)``);
- ``ref(inputs, attrs, ctx) -> ndarray``: the reference semantics in plain numpy (the oracle);
- ``grad(b, node, dy) -> [grad per input or None]``: the gradient rule, written with the gradient
  builder ``b`` as a small graph of table ops (never a closure), each new node tagged with a rule name;
- ``scalar``: for elementwise ops, the scalar expression over ``a0, a1, ...`` that code generators
  (Numba, CUDA) fuse into one loop; it may name the op's attributes in braces (``{alpha} * a0``), which
  each node's values replace (``scalar_expression``);
- ``flops(in_shapes, out_shape, attrs)``: floating-point operations, for benchmarks;
- properties the passes and tools read, so that no pass keeps a list of op names: ``alias``,
  ``to_shape``, ``commutative``, ``unit``, ``involution`` (simplify, cse, the memory plan), ``loss_term``
  and ``grad_term`` (the mean losses' formulas, written once for every backend), and ``torch`` (the op in
  PyTorch, for ``graphc bench --compare torch``).
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
    run_dependent: bool = False           # its value depends on the run's mode or step, not only on its inputs
                                          # (so it is never computed ahead of a run from the state alone)
    attrs: dict = field(default_factory=dict)   # attribute names -> defaults (documentation)
    # --- properties read by passes and tools
    alias: bool = False                   # the value is a view of input 0's elements (the memory plan shares
                                          # its buffer): reshape, reshape_like, identity, copy
    to_shape: bool = False                # input 0 brought to the output's shape (reshaped, broadcast or
                                          # summed): to input 0's own shape it is input 0 (simplify drops it)
    commutative: bool = False             # op(a, b) == op(b, a) (cse compares the inputs as a set)
    unit: Optional[float] = None          # x op unit == x, on the right (on both sides when commutative)
    involution: bool = False              # op(op(x)) == x (simplify drops both)
    loss_term: Optional[str] = None       # a mean loss: the value is the mean over all elements of this
                                          # scalar expression of a0 (prediction) and a1 (target)
    grad_term: Optional[str] = None       # its gradient: this expression of a0, a1 times dy / (element count)
    torch: Optional[Callable] = None      # torch(F, torch, inputs, attrs, ctx) -> tensor: the op in PyTorch
                                          # (ctx.training, ctx.resolve(shape)), for the bench's torch peer


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


def scalar_expression(name: str, attrs: dict, literal=repr) -> str:
    """The scalar expression of elementwise op `name` for one node: its ``{attr}`` placeholders replaced
    by the node's attribute values (the op's defaults where the node has none), each written as
    ``(literal(float(value)))``. Every code generator calls this before translating the expression."""
    expr = OPS[name].scalar
    if "{" not in expr:
        return expr
    values = {**OPS[name].attrs, **(attrs or {})}
    return expr.format(**{k: f"({literal(float(v))})" for k, v in values.items()})


# Importing the families fills the table.
from graphc.ops import (sources, elementwise, linalg, conv, pool, reduce, shape, loss, norm, norm_grad,  # noqa: E402,F401
                        fused, collective)
from graphc.ops.elementwise import elementwise_op  # noqa: E402,F401  (user-declared ops: gc.ops.elementwise_op)
