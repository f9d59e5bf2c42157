"""Algebraic simplification: rewrites that leave every value unchanged but remove work. Which op a rule
applies to is a property in the op table (graphc.ops.OpDef), not a list of names here:

    alias op to its input's own shape (identity, copy, reshape, ...)   -> x      (alias)
    sum_to / expand_like / reshape_like to x's own shape               -> x      (to_shape)
    x * 1, 1 * x, x / 1, x + 0, 0 + x, x - 0                           -> x      (unit, commutative)
        (when the constant does not broadcast x up)
    neg(neg(x))                                                        -> x      (involution)
    reshape(reshape(x)), reshape_like(reshape(x), l), ...  -> one reshape of x   (alias and to_shape)
    transpose(transpose(x)) -> one transpose (or x when the permutations cancel)

Names in graph.outputs, graph.updates (keys and values), graph.loss and graph.keep are never removed or
renamed: when such a node would be replaced by its input, the input's computation moves into the
protected node instead (if nothing else reads it), or the node stays.
"""
from graphc import ops as optable
from graphc.passes.helpers.rewrite import (consumers, data, is_const_fill, protected, remove_if_dead,
                                           replace_value, set_inputs)


def _opdef(g, n):
    return optable.OPS[data(g, n)["op"]]


def _is_reshape(g, n):
    """A view of its input with another shape (reshape, reshape_like)."""
    d = _opdef(g, n)
    return d.alias and d.to_shape


def _same_type(g, a, b):
    da, db = data(g, a), data(g, b)
    return tuple(da["shape"]) == tuple(db["shape"]) and da["dtype"] == db["dtype"]


def _rule_passthrough(g, n):
    """The value n equals (returns that name) or None."""
    d = data(g, n)
    opd, ins = optable.OPS[d["op"]], d["inputs"]
    if (opd.alias or opd.to_shape) and _same_type(g, ins[0], n):
        return ins[0]
    if opd.unit is not None and len(ins) == 2:
        a, b = ins
        if is_const_fill(g, b, opd.unit) and _same_type(g, a, n):
            return a
        if opd.commutative and is_const_fill(g, a, opd.unit) and _same_type(g, b, n):
            return b
    if opd.involution and data(g, ins[0])["op"] == d["op"]:
        inner = data(g, ins[0])["inputs"][0]
        return inner if _same_type(g, inner, n) else None
    if d["op"] == "transpose" and tuple(d["attrs"]["axes"]) == tuple(range(len(d["attrs"]["axes"]))):
        return ins[0]
    return None


def _rule_collapse(g, n, prot):
    """Chains of reshapes / transposes become one node reading the chain's source. Returns True if changed."""
    d = data(g, n)
    op, ins = d["op"], d["inputs"]
    if _is_reshape(g, n) and _is_reshape(g, ins[0]):
        src = data(g, ins[0])["inputs"][0]
        set_inputs(g, n, (src,) + tuple(ins[1:]))
        remove_if_dead(g, ins[0], prot)
        return True
    if op == "transpose" and data(g, ins[0])["op"] == "transpose":
        inner = data(g, ins[0])
        a, b = inner["attrs"]["axes"], d["attrs"]["axes"]
        d["attrs"] = dict(d["attrs"], axes=tuple(int(a[i]) for i in b))
        set_inputs(g, n, (inner["inputs"][0],))
        remove_if_dead(g, ins[0], prot)
        return True
    return False


def simplify(graph, max_rounds=20):
    g = graph.clone()
    prot = protected(g)
    for _ in range(max_rounds):
        changed = False
        for n in g.topo():
            if n not in g.nx:
                continue
            if _opdef(g, n).source:
                continue
            if _rule_collapse(g, n, prot):
                changed = True
            src = _rule_passthrough(g, n)
            if src is not None and src in g.nx and replace_value(g, n, src, prot):
                changed = True
        if not changed:
            break
    return g


__all__ = ["simplify", "consumers"]
