"""Batch norm folded into the conv before it, in inference graphs (compile(..., fold_bn=False) turns it off).

At inference batch norm is an affine map per channel, so conv -> batchnorm is one conv:

    s  = gamma / sqrt(running_var + eps)
    w' = w * s (per output channel)            b' = (b - running_mean) * s + beta      (b = 0 without a bias)
    batchnorm(conv(x, w, b)) == conv(x, w', b')

w' and b' are graph nodes computed from the parameters (a small elementwise prologue that runs with the
graph), never numbers frozen at compile time: a changed parameter, running statistic or loaded state
dict is read by the next run. The batchnorm node becomes the folded conv and keeps its name, so the
conv_relu / conv_relu_maxpool patterns then fuse conv(+BN)+ReLU(+pool) into one kernel.

Only inference graphs fold (a training graph's forward normalises with batch statistics), and only a BN
whose input is a conv read by nothing else. The folded graph records the BNs it folded in
``graph.bn_folded``; a training-mode run of its executable (``exe.run(feeds, training=True)``, which
needs batch statistics and updates the running ones) runs on an unfolded twin sharing its state
(graphc/executable.py ``Executable._training_twin``).
"""
from graphc.passes.helpers.rewrite import consumers, data, protected, remove_if_dead, set_inputs


def _foldable(g, bn, prot):
    """(conv node, running-stat update nodes to drop) when batchnorm `bn` can fold into its conv."""
    x = data(g, bn)["inputs"][0]
    if data(g, x)["op"] != "conv" or x in prot:
        return None
    stats = {g.stat_updates.get(r) for r in data(g, bn)["inputs"][3:]}
    updates = [u for u in consumers(g, x) if u in stats and data(g, u)["op"] == "bn_running_stat"]
    if set(consumers(g, x)) != {bn, *updates} or any(u in g.outputs or u in g.keep for u in updates):
        return None
    return x, updates


def _fold(g, bn, conv):
    """Rewrites batchnorm `bn` (reading conv `conv`) into the folded conv, under the BN's name."""
    cd = data(g, conv)
    x, w, b = (list(cd["inputs"]) + [None])[:3]
    _, gamma, beta, rm, rv = data(g, bn)["inputs"]
    before = set(g.nx)
    with g.role("forward"), g.rule("fold_bn"):
        s = g.div(gamma, g.sqrt(g.add(rv, g.scalar(data(g, bn)["attrs"]["eps"]))))
        w2 = g.mul(w, g.reshape(s, (data(g, w)["shape"][0], 1, 1, 1)))
        shift = g.neg(rm) if b is None else g.sub(b, rm)
        b2 = g.add(g.mul(shift, s), beta)
    d = data(g, bn)
    new = sorted((n for n in g.nx if n not in before), key=lambda n: data(g, n)["order"])
    for k, n in enumerate(new):         # just before the BN in the deterministic order
        data(g, n)["order"] = d["order"] - 1 + (k + 1) / (len(new) + 1)
    d["op"], d["attrs"], d["rule"] = "conv", dict(cd["attrs"]), "fold_bn"
    set_inputs(g, bn, (x, w2.name, b2.name))


def fold_bn(graph):
    """The graph with every foldable conv -> batchnorm of an inference graph folded (see the module)."""
    if graph.updates:
        return graph                    # a training graph: its forward uses batch statistics
    g = graph.clone()
    folded = []
    for bn in [n for n in g.topo() if data(g, n)["op"] == "batchnorm"]:
        found = _foldable(g, bn, protected(g))
        if found is None:
            continue
        conv, updates = found
        for r in data(g, bn)["inputs"][3:]:
            if g.stat_updates.get(r) in updates:
                del g.stat_updates[r]
        g.nx.remove_nodes_from(updates)
        _fold(g, bn, conv)
        remove_if_dead(g, conv, protected(g))
        folded.append(bn)
    if not folded:
        return graph
    g.bn_folded = tuple(getattr(graph, "bn_folded", ())) + tuple(folded)
    return g
