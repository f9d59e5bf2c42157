"""Collectives: a value reduced over the ranks of a data-parallel run (graphc.distributed).

A reduction is two nodes, so that the schedule can put work between them:
- ``allreduce(x)`` (rule ``allreduce:mean`` or ``allreduce:sum``) starts a non-blocking MPI reduction of x
  and yields the pending result;
- ``allreduce_wait(pending, x)`` (rule ``allreduce:wait``) completes it and yields the reduced value. It
  also reads x, because MPI reads x until the reduction completes: the memory plan must not hand x's
  buffer to another value before then.
Attributes: ``op`` ("mean" or "sum"), ``group`` (the id of the graphc.distributed communicator) and
``key`` (the start node's name, pairing the two). Both are host ops (the reduction runs in the MPI
library, on host arrays; no backend needs a kernel) and never folded or merged. With one rank the
reduction is a copy.

Gradient (the rank's share of the gradient of the sum of every rank's loss): the adjoint of a mean over
the ranks is the mean over the ranks of the upstream gradients (and of a sum, the sum), so the rule of
``allreduce`` is another allreduce, of dy; ``allreduce_wait`` passes dy to the pending value.
"""
from graphc import shapes
from graphc.errors import DTypeError, ShapeError
from graphc.ops import OpDef, register

REDUCTIONS = ("mean", "sum")


def allreduce(g, x, group, op="mean", name=None):
    """x reduced over the ranks of communicator `group` (its id): an ``allreduce`` node that starts the
    reduction and the ``allreduce_wait`` that completes it. Returns the wait's value."""
    name = name or g.fresh_name("allreduce")
    with g.rule(f"allreduce:{op}"):
        start = g.add_node("allreduce", (x,), {"op": op, "group": group, "key": name}, name=name)
    with g.rule("allreduce:wait"):
        return g.add_node("allreduce_wait", (start, x), {"op": op, "group": group, "key": name},
                          name=f"{name}.wait")


def _check_attrs(node):
    if node.attrs.get("op") not in REDUCTIONS:
        node.fail(ShapeError, f"unknown reduction {node.attrs.get('op')!r}", f"use one of {REDUCTIONS}")


def _start_infer(node, in_types):
    _check_attrs(node)
    (s, dt), = in_types
    if not dt.startswith("float"):
        node.fail(DTypeError, f"allreduce averages float values, got {dt}", "reduce a float value")
    return s, dt


def _wait_infer(node, in_types):
    _check_attrs(node)
    (sp, dt), (sx, _) = in_types
    if tuple(sp) != tuple(sx):
        node.fail(ShapeError, f"the pending value {shapes.fmt(sp)} and the sent value {shapes.fmt(sx)} differ",
                  "pass the allreduce node and its input")
    return sp, dt


def _start_ref(inputs, attrs, ctx):
    from graphc.distributed import group
    return group(attrs["group"]).start(attrs["key"], inputs[0], attrs["op"])


def _wait_ref(inputs, attrs, ctx):
    from graphc.distributed import group
    return group(attrs["group"]).finish(attrs["key"])


def _start_grad(g, node, dy):
    return [allreduce(g, dy, node.attrs["group"], node.attrs["op"])]


def _wait_grad(g, node, dy):
    return [dy, None]


register(OpDef("allreduce", _start_infer, _start_ref, _start_grad, host=True,
               doc="starts reducing a value over the ranks of a data-parallel run (mean or sum; a copy with "
                   "one rank); its allreduce_wait yields the result",
               attrs={"op": "mean", "group": 0, "key": ""}))
register(OpDef("allreduce_wait", _wait_infer, _wait_ref, _wait_grad, host=True,
               doc="completes the reduction its allreduce node started (inputs: the pending value and the "
                   "value sent, which MPI reads until then)",
               attrs={"op": "mean", "group": 0, "key": ""}))
