"""Training graph: forward + backward (gate rules) + optimizer update, one graph."""
from graphc.passes.transforms.autodiff import grad


def training_graph(graph, optimizer, loss=None):
    """The graph of one training step. Its output is the loss; `updates` maps each parameter and
    optimizer state to its new value, which the executable stores after each step; batch-norm
    running statistics (graph.stat_updates) are updates too."""
    g = grad(graph, wrt=None, loss=loss)
    grads = {g.nx.nodes[o]["grad_of"]: o for o in g.outputs}
    g.name = f"train({graph.name})"
    optimizer.build(g, grads)
    g.updates.update(g.stat_updates)
    g.outputs = [g.loss]
    return g
