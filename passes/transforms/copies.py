"""Copy-gate insertion: every value used more than once (on the way to the loss) is routed through an
explicit copy (fan-out) node, whose backward rule is the gradient adder (copy:add)."""
import networkx as nx


def insert_copies(graph, relevant=None):
    """Returns a clone of `graph` with a copy node after each multi-use value in `relevant` (default all).

    Sources that are constants never need one (no gradient flows into them)."""
    g = graph.clone()
    for name in graph.topo():
        if relevant is not None and name not in relevant:
            continue
        d = g.nx.nodes[name]
        if d["op"] == "const":
            continue
        users = [u for u in g.nx.successors(name) if relevant is None or u in relevant]
        uses = sum(g.nx.nodes[u]["inputs"].count(name) for u in users)
        if uses < 2:
            continue
        # a graph made by gc.grad already holds "<name>.copy" nodes; differentiating it again needs fresh ones
        cp_name = f"{name}.copy" if f"{name}.copy" not in g.nx else g.fresh_name(f"{name}.copy")
        cp = g.copy(g[name], name=cp_name)
        for u in users:
            ud = g.nx.nodes[u]
            ud["inputs"] = tuple(cp.name if i == name else i for i in ud["inputs"])
            rule = g.nx.edges[name, u].get("rule")     # an edge into a backward node keeps its rule
            g.nx.remove_edge(name, u)
            g.nx.add_edge(cp.name, u, rule=rule)
        # keep the copy right after its source in the deterministic order
        g.nx.nodes[cp.name]["order"] = d["order"] + 0.5
    return g


def relevant_nodes(graph, sources, target):
    """Nodes on some path from any of `sources` to `target` (inclusive)."""
    down = set(sources)
    for s in sources:
        down |= nx.descendants(graph.nx, s)
    up = nx.ancestors(graph.nx, target) | {target}
    return down & up
