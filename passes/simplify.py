"""Algebraic simplification: rewrites that leave every value unchanged but remove work.

    identity(x), copy(x)                       -> x     (the backward graph is full of them)
    x * 1, 1 * x, x / 1, x + 0, 0 + x, x - 0   -> x     (when the constant does not broadcast x up)
    neg(neg(x))                                -> x
    reshape(reshape(x)), reshape_like(reshape(x), l), ...  -> one reshape of x
    reshape / reshape_like / sum_to / expand_like to x's own shape -> x
    transpose(transpose(x)) -> one transpose (or x when the permutations cancel)

Names in graph.outputs, graph.updates (keys and values), graph.loss and graph.keep are never removed or
renamed: when such a node would be replaced by its input, the input's computation moves into the
protected node instead (if nothing else reads it), or the node stays.
"""
from graphc.passes.helpers.rewrite import (consumers, data, is_const_fill, protected, remove_if_dead,
                                           replace_value, set_inputs)

_RESHAPES = ("reshape", "reshape_like")


def _same_type(g, a, b):
    da, db = data(g, a), data(g, b)
    return tuple(da["shape"]) == tuple(db["shape"]) and da["dtype"] == db["dtype"]


def _rule_passthrough(g, n):
    """The value n equals (returns that name) or None."""
    d = data(g, n)
    op, ins = d["op"], d["inputs"]
    if op in ("identity", "copy"):
        return ins[0]
    if op in ("mul", "add", "div", "sub"):
        unit = 1.0 if op in ("mul", "div") else 0.0
        a, b = ins
        if is_const_fill(g, b, unit) and _same_type(g, a, n):
            return a
        if op in ("mul", "add") and is_const_fill(g, a, unit) and _same_type(g, b, n):
            return b
    if op == "neg" and data(g, ins[0])["op"] == "neg":
        inner = data(g, ins[0])["inputs"][0]
        return inner if _same_type(g, inner, n) else None
    if op in _RESHAPES + ("sum_to", "expand_like") and _same_type(g, ins[0], n):
        return ins[0]
    if op == "transpose" and tuple(d["attrs"]["axes"]) == tuple(range(len(d["attrs"]["axes"]))):
        return ins[0]
    return None


def _rule_collapse(g, n, prot):
    """Chains of reshapes / transposes become one node reading the chain's source. Returns True if changed."""
    d = data(g, n)
    op, ins = d["op"], d["inputs"]
    if op in _RESHAPES and data(g, ins[0])["op"] in _RESHAPES:
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
            if data(g, n)["op"] in ("input", "param", "const"):
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
