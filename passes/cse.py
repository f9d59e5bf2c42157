"""Common-subexpression elimination: two nodes with the same op, the same inputs and the same attributes
compute the same value, so the later one is replaced by the earlier one. Equal constants merge too.
Commutative ops (the op table's ``commutative``: add, mul, max) compare their inputs as a sorted pair.
Sources with identity (inputs, params) and host ops (random masks) never merge. When the duplicate is a protected name (an output, an update,
the loss, a kept value) it is the one kept; two protected duplicates both stay."""
from graphc import ops as optable
from graphc.passes.helpers.rewrite import data, fed, freeze, protected, replace_value


def _key(g, n):
    d = data(g, n)
    op = d["op"]
    if fed(g, n) or optable.OPS[op].host:
        return None
    ins = d["inputs"]
    if optable.OPS[op].commutative:
        ins = tuple(sorted(ins))
    return (op, ins, freeze(d["attrs"]), tuple(d["shape"]), d["dtype"])


def cse(graph):
    g = graph.clone()
    prot = protected(g)
    changed = True
    while changed:            # merging inputs can make their users equal: repeat to a fixpoint
        changed = False
        seen = {}
        for n in g.topo():
            if n not in g.nx:
                continue
            k = _key(g, n)
            if k is None:
                continue
            rep = seen.get(k)
            if rep is None or rep not in g.nx:
                seen[k] = n
                continue
            if n in prot and rep not in prot:
                # keep the protected name: the earlier duplicate's readers move to it
                if replace_value(g, rep, n, prot):
                    seen[k] = n
                    changed = True
            elif n not in prot:
                if replace_value(g, n, rep, prot):
                    changed = True
    return g
