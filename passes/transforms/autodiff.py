"""Reverse-mode differentiation as a graph pass: the backward graph is built from the op table's gate
rules as explicit nodes of the same ops (no tape, no closures), so it can be printed, rendered,
simplified, fused and compiled like any graph.

    gc.grad(graph, wrt=None)  ->  Graph whose outputs are "grad/<name>" for each value in wrt
"""
import networkx as nx
import numpy as np

from graphc import ops as optable
from graphc.errors import GradError, GraphError
from graphc.graph import Value
from graphc.passes.transforms.copies import insert_copies, relevant_nodes


def _pick_loss(graph, loss):
    if loss is None:
        if graph.loss is not None:
            loss = graph.loss
        else:
            scalars = [o for o in graph.outputs if graph.nx.nodes[o]["shape"] == ()]
            if len(scalars) != 1:
                raise GradError(f"graph {graph.name!r} has {len(scalars)} scalar outputs {scalars}; "
                                "say which is the loss: grad(graph, loss='name')")
            loss = scalars[0]
    loss = loss.name if isinstance(loss, Value) else loss
    if loss not in graph.nx:
        raise GradError(f"loss {loss!r} is not a value of graph {graph.name!r}")
    if graph.nx.nodes[loss]["shape"] != ():
        raise GradError(f"the loss must be a scalar; {loss!r} has shape {graph.nx.nodes[loss]['shape']}. "
                        "Reduce it first (g.sum or g.mean)")
    return loss


def _pick_wrt(graph, wrt):
    if wrt is None:
        wrt = graph.param_names
        if not wrt:
            raise GradError(f"graph {graph.name!r} has no trainable params; pass wrt=[...] (e.g. input names)")
    names = []
    for w in wrt:
        w = w.name if isinstance(w, Value) else w
        if w not in graph.nx:
            raise GradError(f"cannot differentiate with respect to {w!r}: no such value in graph {graph.name!r}")
        names.append(w)
    return names


def grad(graph, wrt=None, loss=None, keep_outputs=False):
    """The backward graph of `graph`'s scalar loss with respect to `wrt` (default: all trainable params).

    The result holds the forward nodes (with a copy gate at every fan-out) plus the backward nodes;
    its outputs are "grad/<name>" (after the original outputs when keep_outputs=True)."""
    loss = _pick_loss(graph, loss)
    wrt = _pick_wrt(graph, wrt)
    relevant = relevant_nodes(graph, wrt, loss)
    g = insert_copies(graph, relevant)
    g.name = f"grad({graph.name})"
    g.loss = loss
    forward = g.topo()
    relevant = relevant_nodes(g, wrt, loss)
    existing = set(g.nx.nodes)   # a graph made by gc.grad already holds backward nodes other values read

    contributions = {}
    with g.role("backward"), g.rule("seed"):
        contributions[loss] = [g.add_node("const", (), {"shape": (), "dtype": g.nx.nodes[loss]["dtype"],
                                                        "value": np.asarray(1.0)},
                                          name=g.fresh_name(f"d{loss}/d{loss}_"))]
    final = {}
    with g.role("backward"):
        for name in reversed(forward):
            parts = contributions.pop(name, None)
            if not parts or name not in relevant:
                continue
            dy = parts[0]
            if len(parts) > 1:
                with g.rule("copy:add"):   # the gradient adder: a value used k times sums its k gradients
                    for p in parts[1:]:
                        dy = g.add(dy, p)
            final[name] = dy
            node = g.node(name)
            opdef = optable.OPS[node.op]
            if opdef.source or not opdef.differentiable:
                continue
            if opdef.grad is None:
                raise GradError(f"op {node.op!r} (node {name!r}) has no gradient rule, so the loss cannot be "
                                "differentiated through it")
            in_grads = opdef.grad(g, node, dy)
            if len(in_grads) != len(node.inputs):
                raise GraphError(f"gradient rule of {node.op!r} returned {len(in_grads)} gradients "
                                 f"for {len(node.inputs)} inputs")
            for x, gx in zip(node.inputs, in_grads):
                if gx is None or x.name not in relevant:
                    continue
                if tuple(gx.shape) != tuple(x.shape):
                    raise GraphError(f"gradient rule of {node.op!r} gave shape {gx.shape} for input "
                                     f"{x.name!r} of shape {x.shape}")
                g.nx.nodes[gx.name].setdefault("grad_of", x.name)
                contributions.setdefault(x.name, []).append(gx)

        outs = list(graph.outputs) if keep_outputs else []
        for w in wrt:
            if f"grad/{w}" in g.nx:   # differentiating a graph gc.grad made: its own "grad/w" is now an inner value
                old = _rename(g, f"grad/{w}", g.fresh_name(f"grad/{w}."))
                outs = [old if o == f"grad/{w}" else o for o in outs]
            with g.rule("grad"):
                if w in final:
                    gw = g.identity(final[w], name=f"grad/{w}")
                else:   # the loss does not depend on w
                    gw = g.expand_like(g.scalar(0.0), g[w], name=f"grad/{w}")
            g.nx.nodes[gw.name]["grad_of"] = w
            outs.append(gw.name)
    g.outputs = outs
    # gate rules build gradients for every input; drop those nothing asked for (e.g. dL/dX of the
    # first conv when only parameters are wanted), so the printed/rendered graph shows only what's used
    live = set(outs)
    for o in outs:
        live |= nx.ancestors(g.nx, o)
    g.nx.remove_nodes_from([n for n, d in list(g.nx.nodes(data=True))
                            if d["role"] == "backward" and n not in live and n not in existing])
    return g


def _rename(g, old, new):
    """Renames value `old` to `new` in g (edges, users' input lists, outputs, loss); returns new."""
    import networkx as nx
    nx.relabel_nodes(g.nx, {old: new}, copy=False)
    for u in g.nx.successors(new):
        d = g.nx.nodes[u]
        d["inputs"] = tuple(new if i == old else i for i in d["inputs"])
    g.outputs = [new if o == old else o for o in g.outputs]
    if g.loss == old:
        g.loss = new
    for n, d in g.nx.nodes(data=True):
        if d.get("grad_of") == old:
            d["grad_of"] = new
    return new
