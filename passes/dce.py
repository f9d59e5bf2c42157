"""Dead-code elimination: drop nodes no output (or state update, or batch-norm statistic update) depends on."""
import networkx as nx


def dce(graph):
    stat = getattr(graph, "stat_updates", {}) or {}
    keep = set(graph.outputs) | set(graph.updates.values()) | set(graph.updates) | set(graph.keep)
    keep |= set(stat.values()) | set(stat)
    if graph.loss:
        keep.add(graph.loss)
    live = set(keep)
    for k in keep:
        live |= nx.ancestors(graph.nx, k)
    dead = [n for n in graph.nx.nodes if n not in live and graph.nx.nodes[n]["op"] != "input"]
    if not dead:
        return graph
    g = graph.clone()
    g.nx.remove_nodes_from(dead)
    for n in dead:
        g.params.pop(n, None)
    return g
