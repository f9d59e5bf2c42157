"""Training graph: forward + backward (gate rules) + optimizer update, one graph."""
from graphc.passes.transforms.autodiff import grad


def training_graph(graph, optimizer, loss=None, distributed=None):
    """The graph of one training step. Its output is the loss; `updates` maps each parameter and
    optimizer state to its new value, which the executable stores after each step; batch-norm
    running statistics (graph.stat_updates) are updates too. distributed (a graphc.distributed.DataParallel):
    the gradients (and running statistics) are averaged over the ranks before the update
    (passes/transforms/data_parallel.py)."""
    g = grad(graph, wrt=None, loss=loss)
    grads = {g.nx.nodes[o]["grad_of"]: o for o in g.outputs}
    stats = dict(g.stat_updates)
    if distributed is not None:
        from graphc.passes.transforms.data_parallel import data_parallel_step
        grads, stats = data_parallel_step(g, grads, distributed)
    g.name = f"train({graph.name})"
    optimizer.build(g, grads)
    g.updates.update(stats)
    g.outputs = [g.loss]
    return g
