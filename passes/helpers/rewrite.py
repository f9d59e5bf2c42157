"""Small graph-rewriting helpers shared by the simplify, fold, cse and fuse passes (not a pass itself).

The invariant every rewrite keeps: the names a user or the executable relies on — graph.outputs, the
state names and new-value names of graph.updates (and graph.stat_updates), graph.loss and graph.keep — are never removed or
renamed (see `protected`)."""
import numpy as np

from graphc import ops as optable


def protected(g):
    """Names that must survive every pass with their names."""
    stat = getattr(g, "stat_updates", {}) or {}
    p = set(g.outputs) | set(g.updates) | set(g.updates.values()) | set(getattr(g, "keep", ()) or ())
    p |= set(stat) | set(stat.values())
    if g.loss:
        p.add(g.loss)
    return p


def data(g, n):
    return g.nx.nodes[n]


def op(g, n):
    return g.nx.nodes[n]["op"]


def fed(g, n):
    """An input or a param: a source whose value comes from outside the graph, so its identity matters
    (it is never removed, merged or absorbed); constants are sources too but carry their value."""
    d = g.nx.nodes[n]
    return optable.OPS[d["op"]].source and d["op"] != "const"


def consumers(g, n):
    """Nodes that read n (each once, in a deterministic order)."""
    return sorted(g.nx.successors(n), key=lambda u: g.nx.nodes[u]["order"])


def set_inputs(g, n, new_inputs):
    """Rewires node n to read new_inputs (keeps edge attributes where the edge survives)."""
    d = g.nx.nodes[n]
    old = d["inputs"]
    keep_attrs = {u: dict(g.nx.edges[u, n]) for u in set(old) if g.nx.has_edge(u, n)}
    for u in set(old):
        if g.nx.has_edge(u, n):
            g.nx.remove_edge(u, n)
    d["inputs"] = tuple(new_inputs)
    for u in d["inputs"]:
        g.nx.add_edge(u, n, **keep_attrs.get(u, {"rule": None}))


def replace_uses(g, old, new):
    """Every reader of `old` reads `new` instead (old itself stays; dce or the caller removes it)."""
    for u in consumers(g, old):
        set_inputs(g, u, tuple(new if i == old else i for i in g.nx.nodes[u]["inputs"]))


def remove_if_dead(g, n, prot):
    """Removes n (and, transitively, inputs that die with it) when nothing reads it and it is not
    protected. Source nodes (inputs, params) are never removed here."""
    stack = [n]
    while stack:
        m = stack.pop()
        if m not in g.nx or m in prot or g.nx.out_degree(m) > 0:
            continue
        if fed(g, m):
            continue
        d = g.nx.nodes[m]
        ins = list(d["inputs"])
        g.nx.remove_node(m)
        stack.extend(ins)


def replace_value(g, old, new, prot):
    """Replaces value `old` by the equal value `new` everywhere. When `old` is protected its name must
    survive: if `new` is an unprotected, non-source node read only by `old`, `new`'s computation moves
    into the node named `old` (absorbed); otherwise nothing changes. Returns True if the graph changed."""
    if old == new:
        return False
    if old not in prot:
        replace_uses(g, old, new)
        remove_if_dead(g, old, prot)
        return True
    nd = g.nx.nodes[new]
    if new in prot or optable.OPS[nd["op"]].source or consumers(g, new) != [old]:
        return False
    od = g.nx.nodes[old]
    if tuple(nd["shape"]) != tuple(od["shape"]) or nd["dtype"] != od["dtype"]:
        return False
    od["op"], od["attrs"] = nd["op"], dict(nd["attrs"])
    set_inputs(g, old, nd["inputs"])
    g.nx.remove_node(new)
    return True


def const_value(g, n):
    """The array of a const node, or None."""
    d = g.nx.nodes[n]
    return np.asarray(d["attrs"]["value"]) if d["op"] == "const" else None


def is_const_fill(g, n, value):
    """True when n is a const whose every element equals `value`."""
    v = const_value(g, n)
    return v is not None and v.size > 0 and bool(np.all(v == value))


def freeze(x):
    """A hashable, exact key for attribute values (arrays by dtype, shape and bytes)."""
    if isinstance(x, dict):
        return tuple(sorted((k, freeze(v)) for k, v in x.items()))
    if isinstance(x, (list, tuple)):
        return tuple(freeze(v) for v in x)
    if isinstance(x, np.ndarray):
        return ("ndarray", str(x.dtype), x.shape, x.tobytes())
    if isinstance(x, np.generic):
        return ("scalar", str(x.dtype), x.item())
    if isinstance(x, float) and x != x:
        return ("nan",)
    return x
