"""Schedule: a deterministic topological order, stored on the graph for the backends."""


def schedule(graph):
    graph.schedule = graph.topo()
    return graph
