"""Data-parallel scaling: ``graphc bench MODEL --train --ranks 1,2`` (run_scaling) and the alpha-beta model
of a ring allreduce that projects it to larger runs.

For each number of ranks, `run_scaling` launches ``mpiexec -n R python -m graphc.bench_ranks ...``; every
rank compiles the model's data-parallel training step (batch per rank fixed: weak scaling, as data-parallel
training grows), warms up, then times steps between barriers. Rank 0 reports the median step time (the
slowest rank's), images/s over all ranks, the time the step spent starting and waiting for its allreduces
(its share of the step), the same step with overlap off (every bucket reduced after the backward pass),
and a bare allreduce of the gradient bytes. Scaling efficiency is images/s / (R x images/s of 1 rank
with as many threads as each of the R ranks has: the same share of the machine per rank).

The projection: a ring allreduce of B bytes over p ranks sends 2 (p - 1) messages of B / p bytes from
every rank (reduce-scatter, then all-gather), so it takes

    t(p) = 2 (p - 1) alpha  +  2 (p - 1) / p  x  B / beta          (per bucket for alpha)

with alpha the latency of one message and beta the link's bandwidth; a step takes compute + t(p) when
nothing overlaps (compute / max(compute, t(p)) when everything does), and its efficiency is compute /
that. `projected_efficiency` computes it; `run_scaling` prints it for 8 and 64 ranks on 10 and 100 Gb/s
links from the measured one-rank step.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

from graphc.errors import DistributedError, GraphError

#: (name, link Gb/s, alpha seconds): 10 Gb/s Ethernet through TCP, 100 Gb/s InfiniBand/RoCE through RDMA
NETWORKS = (("10 Gb/s", 10.0, 30e-6), ("100 Gb/s", 100.0, 2e-6))
PROJECT_RANKS = (8, 64)
MARK = "GRAPHC_SCALING "


def ring_allreduce_seconds(nbytes, ranks, gbps, alpha, buckets=1):
    """Seconds a ring allreduce of `nbytes` (in `buckets` messages' worth of latency) takes on `ranks` ranks
    over links of `gbps` gigabits per second with a per-message latency of `alpha` seconds."""
    if ranks <= 1:
        return 0.0
    beta = gbps * 1e9 / 8.0
    return 2 * (ranks - 1) * alpha * max(1, buckets) + 2 * (ranks - 1) / ranks * nbytes / beta


def projected_efficiency(compute_s, nbytes, ranks, gbps, alpha, buckets=1, overlap=False):
    """Data-parallel efficiency of a step of `compute_s` seconds whose gradients (`nbytes`) are ring-
    allreduced: compute / (compute + comm), or with full overlap compute / max(compute, comm)."""
    comm = ring_allreduce_seconds(nbytes, ranks, gbps, alpha, buckets)
    return compute_s / (max(compute_s, comm) if overlap else compute_s + comm)


def gradient_bytes(graph, itemsize=4):
    """Bytes of gradients one data-parallel step reduces: every trainable parameter."""
    return int(sum(int(np.prod(graph.nx.nodes[p]["shape"], dtype=np.int64)) for p in graph.param_names)) * itemsize


def find_mpiexec():
    """mpiexec beside this Python (the mpich wheel installs it there), else on PATH."""
    for path in (os.path.dirname(sys.executable), None):
        found = shutil.which("mpiexec", path=path)
        if found:
            return found
    raise DistributedError("mpiexec not found. Fix: pip install 'graphc[mpi]' (the mpich wheel ships mpiexec)")


def parse_ranks(spec):
    try:
        ranks = [int(r) for r in str(spec).split(",") if r.strip()]
    except ValueError:
        ranks = []
    if not ranks or min(ranks) < 1:
        raise GraphError(f"--ranks takes a comma-separated list of rank counts such as 1,2; got {spec!r}")
    return ranks


# ------------------------------------------------------------------------------ one launch (every rank)

def _time_steps(exe, feeds, comm, repeats):
    """Median seconds of a step (the slowest rank's) and the share of it spent in the allreduce nodes."""
    for _ in range(3):
        exe.step(feeds)
    times = []
    comm.stats.reset()
    for _ in range(repeats):
        comm.barrier("the benchmark's barrier")
        t0 = time.perf_counter()
        exe.step(feeds)
        times.append(time.perf_counter() - t0)
    step = float(comm.allreduce([np.median(times)], "max")[0])
    share = (comm.stats.start_s + comm.stats.wait_s) / max(sum(times), 1e-12)
    return step, float(comm.allreduce([share], "mean")[0])


def _bare_allreduce(comm, nbytes, repeats):
    buf = np.ones(max(1, nbytes // 4), np.float32)
    ts = []
    for _ in range(repeats):
        comm.barrier("the benchmark's barrier")
        t0 = time.perf_counter()
        comm.start("bench", buf)
        comm.finish("bench")
        ts.append(time.perf_counter() - t0)
    return float(comm.allreduce([np.median(ts)], "max")[0])


def _child_main(argv):
    """Runs on every rank of one launch; rank 0 prints MARK + JSON."""
    import graphc as gc
    from graphc import distributed as dist
    from graphc.bench import LR, _load, make_feeds
    model, backend, batch, repeats = argv[0], argv[1], int(argv[2]), int(argv[3])
    buckets = {"first_bucket_mb": float(argv[4]), "bucket_mb": float(argv[4])} if len(argv) > 4 else {}
    comm = dist.world()
    g = _load(model)
    feeds = make_feeds(g, batch, seed=comm.rank)
    row = {"ranks": comm.size, "batch": batch, "global_batch": batch * comm.size}
    for overlap in (True, False):
        dp = dist.DataParallel(comm, overlap=overlap, **buckets)
        exe = gc.compile(g, backend, optimizer=gc.optim.SGD(LR), distributed=dp)
        with comm.local():
            if hasattr(exe, "precompile"):
                exe.precompile(batch, feeds=feeds)
        comm.barrier("compiling kernels", timeout=dist.COMPILE_TIMEOUT)
        step, share = _time_steps(exe, feeds, comm, repeats)
        key = "" if overlap else "_no_overlap"
        row[f"step_ms{key}"], row[f"allreduce_share{key}"] = 1e3 * step, share
        if overlap:
            row["buckets"] = sum(1 for n, d in exe.graph.nx.nodes(data=True)
                                 if d["op"] == "allreduce" and n.startswith("allreduce/bucket"))
            row["threads"] = getattr(next(iter(getattr(exe, "_bindings", {}).values()), None), "threads", 1)
    if comm.size == 1:       # the per-core baseline: one rank on one thread
        exe = gc.compile(g, backend, optimizer=gc.optim.SGD(LR), distributed=dist.DataParallel(comm), threads=1)
        row["step_ms_1thread"] = 1e3 * _time_steps(exe, feeds, comm, repeats)[0]
    row["grad_bytes"] = gradient_bytes(g)
    row["allreduce_ms"] = 1e3 * _bare_allreduce(comm, row["grad_bytes"], repeats)
    row["images_per_s"] = row["global_batch"] / (row["step_ms"] / 1e3)
    if comm.rank == 0:
        print(MARK + json.dumps(row), flush=True)


# ------------------------------------------------------------------------------ the launcher

def _launch(mpiexec, n, model, backend, batch, repeats, timeout, bucket_mb=None):
    cmd = [mpiexec, "-n", str(n), sys.executable, "-m", "graphc.bench_ranks", model, backend, str(batch),
           str(repeats)] + ([str(bucket_mb)] if bucket_mb else [])
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise DistributedError(f"{' '.join(cmd)} did not finish within {timeout} s") from None
    for line in p.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    tail = (p.stderr.strip() or p.stdout.strip() or "no output").splitlines()[-1]
    raise DistributedError(f"{' '.join(cmd)} failed (exit {p.returncode}): {tail}")


def run_scaling(model, ranks, backend="numba", batch=None, train=True, repeats=20, json_path=None, out=None,
                timeout=1800, bucket_mb=None):
    """Launches the data-parallel training step of `model` on each number of `ranks` (a list or "1,2"),
    prints the scaling table and the projection, and returns the results dict. bucket_mb: every bucket's
    size (default: DataParallel's)."""
    from graphc.bench import DEFAULT_BATCH, _load
    if not train:
        raise GraphError("--ranks times data-parallel training steps: add --train")
    out = out or sys.stdout
    ranks = parse_ranks(",".join(map(str, ranks)) if isinstance(ranks, (list, tuple)) else ranks)
    batch = int(batch or DEFAULT_BATCH)
    mpiexec = find_mpiexec()
    rows = [_launch(mpiexec, n, model, backend, batch, repeats, timeout, bucket_mb) for n in ranks]
    base = next((r for r in rows if r["ranks"] == 1), None)
    for r in rows:       # against one rank with the same threads per rank (the same share of the machine)
        one = base and (base["batch"] / base["step_ms_1thread"] * 1e3 if r["ranks"] > 1 and r.get("threads") == 1
                        and "step_ms_1thread" in base else base["images_per_s"])
        r["efficiency"] = r["images_per_s"] / (r["ranks"] * one) if base else None
    result = {"model": model, "backend": backend, "batch": batch, "rows": rows,
              "grad_bytes": gradient_bytes(_load(model)),
              "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None}
    if base:
        result["projection"] = projection(base["step_ms"] / 1e3, result["grad_bytes"], base.get("buckets", 1))
    print(report(result), file=out)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
    return result


def projection(compute_s, nbytes, buckets=1, ranks=PROJECT_RANKS, networks=NETWORKS):
    """[{ranks, network, efficiency, overlapped}] from the alpha-beta ring model."""
    return [{"ranks": p, "network": name,
             "efficiency": projected_efficiency(compute_s, nbytes, p, gbps, alpha, buckets),
             "overlapped": projected_efficiency(compute_s, nbytes, p, gbps, alpha, buckets, overlap=True)}
            for p in ranks for name, gbps, alpha in networks]


def report(r):
    lines = [f"graphc bench {r['model']} --train --ranks  backend={r['backend']}  batch {r['batch']} per rank",
             f"{'ranks':>5} {'threads':>7} {'global batch':>12} {'step ms':>9} {'images/s':>9} {'efficiency':>10} "
             f"{'allreduce':>9} {'no overlap':>10}"]
    for row in r["rows"]:
        eff = f"{100 * row['efficiency']:.0f}%" if row.get("efficiency") is not None else "n/a"
        lines.append(f"{row['ranks']:>5} {row.get('threads', '?'):>7} {row['global_batch']:>12} "
                     f"{row['step_ms']:>9.2f} {row['images_per_s']:>9.0f} {eff:>10} "
                     f"{100 * row['allreduce_share']:>8.1f}% {row['step_ms_no_overlap']:>8.2f}ms")
    one = next((row for row in r["rows"] if "step_ms_1thread" in row), None)
    if one:
        lines.append(f"1 rank on 1 thread: {one['step_ms_1thread']:.2f} ms, "
                     f"{one['global_batch'] / one['step_ms_1thread'] * 1e3:.0f} images/s")
    last = r["rows"][-1]
    lines.append("efficiency: images/s over (ranks x images/s of 1 rank with as many threads as each rank has)")
    lines.append(f"gradients: {r['grad_bytes'] / 1e6:.2f} MB per step in {last.get('buckets', '?')} bucket(s); a "
                 f"bare allreduce of them on {last['ranks']} rank(s): {last['allreduce_ms']:.2f} ms")
    if r.get("projection"):
        lines.append("projected efficiency, ring allreduce (alpha-beta model, compute = the 1-rank step; "
                     "no overlap / full overlap):")
        for p in r["projection"]:
            lines.append(f"  {p['ranks']:>3} ranks, {p['network']:>8}: {100 * p['efficiency']:5.1f}% / "
                         f"{100 * p['overlapped']:5.1f}%")
    if r.get("loadavg"):
        lines.append(f"load average {tuple(round(v, 2) for v in r['loadavg'])}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ the zoo's table

def measure_step_s(model, batch, backend="numba", repeats=10):
    """Median seconds of one process's training step (compile and warm-up excluded)."""
    import graphc as gc
    from graphc.bench import LR, _load, _median_ms, make_feeds
    g = _load(model)
    feeds = make_feeds(g, batch)
    exe = gc.compile(g, backend, optimizer=gc.optim.SGD(LR))
    return _median_ms(lambda: exe.step(feeds), repeats, 2) / 1e3


def zoo_table(names, batch=64, measure=(), out=None):
    """For each zoo model: its gradient bytes per step, the ring allreduce time of them at 8 and 64 ranks on
    10 and 100 Gb/s, the projected efficiency for the one-process step time measured here (models in
    `measure`), and the step time a model needs for 90% efficiency at 64 ranks on 10 Gb/s."""
    from graphc.bench import _load
    out = out or sys.stdout
    nets = [(label, gbps, alpha) for label, gbps, alpha in NETWORKS]
    head = "  ".join(f"{p}r {label}" for p in PROJECT_RANKS for label, _, _ in nets)
    print(f"{'model':16s} {'grad MB':>8s} {'step ms':>8s}  allreduce ms ({head})  efficiency (same)  "
          f"90% at 64r/10G needs", file=out)
    rows = []
    for name in names:
        nbytes = gradient_bytes(_load(name))
        step = measure_step_s(name, batch) if name in measure else None
        comm = [ring_allreduce_seconds(nbytes, p, gbps, alpha) for p in PROJECT_RANKS for _, gbps, alpha in nets]
        eff = [step / (step + c) for c in comm] if step else []
        rows.append({"model": name, "grad_bytes": nbytes, "step_s": step, "allreduce_s": comm, "efficiency": eff})
        print(f"{name:16s} {nbytes / 1e6:8.2f} {1e3 * step if step else float('nan'):8.1f}  "
              + " ".join(f"{1e3 * c:8.2f}" for c in comm) + "  "
              + (" ".join(f"{100 * e:5.1f}%" for e in eff) if eff else "   (not measured)        ")
              + f"  step >= {9e3 * comm[2]:.0f} ms", file=out)
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["--zoo"]:          # python -m graphc.bench_ranks --zoo BATCH MEASURED,.. MODEL...
        zoo_table(sys.argv[4:], int(sys.argv[2]), sys.argv[3].split(","))
    else:
        _child_main(sys.argv[1:])
