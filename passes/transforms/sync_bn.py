"""Synchronised batch norm (``DataParallel(sync_bn=True)``, ``graphc train --sync-bn``): every batch norm
normalises with the statistics of the global batch, all ranks' shards together, instead of its rank's.

compile() runs this on the forward graph, before autodiff. Each ``batchnorm`` node becomes table ops and
two allreduce means (the batch mean, then the biased variance around it: two passes, as numerically safe
as one process's BN):

    mu  = allreduce(mean(x))              var = allreduce(mean((x - mu)^2))
    y   = (x - m) / sqrt(v + eps) * gamma + beta,   (m, v) = (mu, var) in training, the running ones else

Autodiff then differentiates through the allreduces (their gradient rule is an allreduce of the upstream
gradient), so the backward pass also reduces the two batch-norm sums over the ranks: each rank's
gradients are its share of the gradient of the global batch's loss, and after the gradient average the
update equals one process's on the global batch. The running statistics are updated from the global
mean and the unbiased global variance (count = ranks x the rank's count: every rank's batch has the same
size, as graphc.data.batches(rank=, ranks=) makes them). With one rank this is batch norm, computed by
other ops.
"""
from graphc.ops.collective import allreduce
from graphc.ops.norm import bn_axes
from graphc.passes.helpers.rewrite import replace_uses
from graphc.passes.transforms.autodiff import _rename


def sync_batchnorm(graph, dp):
    """A copy of forward graph `graph` whose batch norms use the global batch's statistics over dp.comm."""
    g = graph.clone()
    for n in list(g.op_nodes("batchnorm")):
        _sync_one(g, n, dp.comm.id, dp.size)
    return g


def _sync_one(g, n, gid, ranks):
    d = g.nx.nodes[n]
    x, gamma, beta, rm, rv = (g[i] for i in d["inputs"])
    eps, momentum = d["attrs"]["eps"], d["attrs"]["momentum"]
    rank = len(x.shape)
    axes = bn_axes(rank)
    first = g._order

    def col(v):          # (C,) -> broadcastable against x
        return v if rank == 2 else g.reshape(v, (x.shape[1], 1, 1))

    with g.role(d["role"]), g.rule("sync-bn:stats"):
        f = g.is_training()
        nf = g.sub(g.scalar(1.0), f)
        mu = allreduce(g, g.mean(x, axes), gid, name=f"{n}.mean")
        xc = g.sub(x, col(mu))
        var = allreduce(g, g.mean(g.mul(xc, xc), axes), gid, name=f"{n}.var")
        m = g.add(g.mul(f, mu), g.mul(nf, rm))
        v = g.add(g.mul(f, var), g.mul(nf, rv))
        scale = g.mul(gamma, g.div(g.scalar(1.0), g.sqrt(g.add(v, g.scalar(eps)))))
        y = g.add(g.mul(g.sub(x, col(m)), col(scale)), col(beta))
    with g.role("update"), g.rule("sync-bn:running-stats"):
        count = g.sum(g.expand_like(g.scalar(1.0), g.slice(x, 1, 0, 1)))       # this rank's values per channel
        total = g.mul(count, g.scalar(float(ranks)))
        unbiased = g.div(total, g.sub(total, g.scalar(1.0)))
        keep, take = g.scalar(1.0 - momentum), g.scalar(momentum)
        new = {rm.name: g.add(g.mul(keep, rm), g.mul(take, mu)),
               rv.name: g.add(g.mul(keep, rv), g.mul(take, g.mul(var, unbiased)))}
    # the new nodes take batch norm's place in the schedule's order
    made = sorted((k for k, e in g.nx.nodes(data=True) if e["order"] >= first), key=lambda k: g.nx.nodes[k]["order"])
    for i, k in enumerate(made):
        g.nx.nodes[k]["order"] = d["order"] + 1e-4 * (i + 1)
    old_stats = {s: g.stat_updates[s] for s in new}
    replace_uses(g, n, y.name)
    g.nx.remove_node(n)
    _rename(g, y.name, n)
    for s, v in new.items():
        g.nx.remove_node(old_stats[s])
        g.stat_updates[s] = _rename(g, v.name, old_stats[s])
