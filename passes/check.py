"""Structural check: a graph a backend can run. Refuses cycles, dangling inputs and unknown ops."""
import networkx as nx

from graphc import ops as optable
from graphc.errors import GraphError


def check(graph):
    """Raises GraphError naming the problem; returns the graph unchanged."""
    nodes = graph.nx.nodes
    for name, d in nodes(data=True):
        if d.get("op") not in optable.OPS:
            raise GraphError(f"node {name!r} has unknown op {d.get('op')!r}; known ops: {', '.join(sorted(optable.OPS))}")
        for i in d["inputs"]:
            if i not in graph.nx:
                raise GraphError(f"node {name!r} ({d['op']}) reads {i!r}, which is not in the graph (dangling input)")
        if d["op"] == "param" and name not in graph.params:
            raise GraphError(f"param {name!r} has no value")
    if not nx.is_directed_acyclic_graph(graph.nx):
        cycle = nx.find_cycle(graph.nx)
        raise GraphError("graph has a cycle: " + " -> ".join(u for u, _ in cycle) + f" -> {cycle[0][0]}")
    if not graph.outputs:
        raise GraphError(f"graph {graph.name!r} has no outputs: call g.output(value)")
    for o in graph.outputs:
        if o not in graph.nx:
            raise GraphError(f"output {o!r} is not a value of the graph")
    return graph
