"""The data-parallel training step: explicit allreduce nodes average the gradients over the ranks between
the backward pass and the optimizer update (``compile(..., distributed=DataParallel(...))``; training.py
calls `data_parallel_step` after autodiff, before the optimizer builds its update).

- Buckets: the gradients, in the order the backward pass computes them (the last layer's first), are
  packed (reshape + concat, rule ``allreduce:bucket``) into flat buffers of about ``bucket_mb`` MiB, the
  first of ``first_bucket_mb``, as PyTorch DDP and Horovod's tensor fusion do: a few large messages
  instead of one per parameter.
- Each bucket: ``allreduce`` (mean) -> ``allreduce_wait`` -> slice + reshape back into every gradient
  (``allreduce:unbucket``); the optimizer reads these, so every rank applies the same update to the same
  parameters, and they stay bit-identical.
- Overlap: a bucket's pack and allreduce get schedule keys right after the last of its gradients, so its
  reduction starts while the backward pass goes on; its wait keeps its late key, after the backward pass
  and before the update. ``overlap=False`` leaves every key late: each bucket is reduced after the whole
  backward pass, start and wait back to back.
- Batch norm's running statistics (each rank's own, without sync_bn) are averaged in one more bucket, so
  the ranks' states stay identical too; dropout masks are seeded per rank (the same mask on every rank
  would drop the same units of every shard).
"""
import numpy as np

from graphc.ops.collective import allreduce

MIB = 1 << 20
RANK_SEED_STRIDE = 1_000_003          # dropout seed of rank r: the graph's seed + r * this


def data_parallel_step(g, grads, dp):
    """Adds the reductions to training graph `g` (in place). grads: {param: its gradient's value}.
    Returns ({param: its averaged gradient}, {running statistic: its new value, averaged unless sync_bn})."""
    gid = dp.comm.id
    ready = sorted(((p, _producer(g, gn)) for p, gn in grads.items()), key=lambda t: _order(g, t[1]))
    reduced = {}
    with g.role("backward"):
        for k, bucket in enumerate(buckets(g, ready, dp.first_bucket_mb * MIB, dp.bucket_mb * MIB)):
            reduced.update(_reduce_bucket(g, f"allreduce/bucket{k}", bucket, gid, dp.overlap, "grad/"))
    stats = dict(g.stat_updates)
    if stats and not dp.sync_bn:       # with sync_bn they come from the global batch: the same everywhere
        with g.role("update"):
            stats = _reduce_bucket(g, "allreduce/bn_stats", sorted(stats.items(), key=lambda t: _order(g, t[1])),
                                   gid, dp.overlap, "update/")
    for n in g.op_nodes("dropout_mask"):
        g.nx.nodes[n]["attrs"]["seed"] = int(g.nx.nodes[n]["attrs"]["seed"]) + RANK_SEED_STRIDE * dp.rank
    return {p: reduced[p] for p in grads}, stats


def buckets(g, ready, first_cap, cap):
    """Consecutive runs of (name, value) pairs whose values add up to at most `cap` bytes (the first run
    `first_cap`); a value larger than the cap gets a bucket of its own."""
    out, cur, size, limit = [], [], 0, first_cap
    for name, v in ready:
        nbytes = _numel(g, v) * (8 if g.nx.nodes[v]["dtype"] == "float64" else 4)
        if cur and size + nbytes > limit:
            out.append(cur)
            cur, size, limit = [], 0, cap
        cur.append((name, v))
        size += nbytes
    if cur:
        out.append(cur)
    return out


def _reduce_bucket(g, name, bucket, gid, overlap, prefix):
    """Packs the bucket's (key, value) pairs, averages them over the ranks, unpacks; returns {key: the
    averaged value, named prefix + key + ".mean"}."""
    first = g._order
    with g.rule("allreduce:bucket"):
        flats = [g.reshape(v, (_numel(g, v),)) for _, v in bucket]
        flat = flats[0] if len(flats) == 1 else g.concat(flats, axis=0, name=f"{name}.flat")
    mean = allreduce(g, flat, gid, "mean", name=name)
    if overlap:      # pack and start right after the bucket's last value (the wait keeps its late key)
        at = max(_order(g, v) for _, v in bucket)
        early = [n for n, d in g.nx.nodes(data=True) if d["order"] >= first and n != mean.name]
        for i, n in enumerate(sorted(early, key=lambda n: g.nx.nodes[n]["order"])):
            g.nx.nodes[n]["order"] = at + 0.6 + 1e-4 * i
    out, off = {}, 0
    with g.rule("allreduce:unbucket"):
        for key, v in bucket:
            n = _numel(g, v)
            piece = mean if len(bucket) == 1 else g.slice(mean, 0, off, off + n)
            out[key] = g.reshape(piece, g.nx.nodes[v]["shape"], name=f"{prefix}{key}.mean").name
            off += n
    return out


def _producer(g, v):
    """The node that computes gradient v (autodiff names it through an identity, "grad/<param>")."""
    d = g.nx.nodes[v]
    return d["inputs"][0] if d["op"] == "identity" else v


def _order(g, v):
    return g.nx.nodes[v]["order"]


def _numel(g, v):
    return int(np.prod(g.nx.nodes[v]["shape"], dtype=np.int64))
