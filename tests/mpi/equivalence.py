"""Run by tests/test_mpi.py under `mpiexec -n 2`: 3 training steps on 2 ranks x batch B give the loss and the
parameters of 1 process x batch 2B (float32 reduction tolerance), and every rank holds bit-identical state
(parameters, optimizer state, batch-norm running statistics) after every step.

    mpiexec -n 2 python tests/mpi/equivalence.py BACKEND OPTIMIZER DTYPE MODEL[:sync_bn] ...

Each rank also computes the one-process run itself, on the same global batches. The digit resnet has batch
norm: per-rank statistics differ from the global batch's, so it is compared with sync_bn. Several small
buckets (a few KiB) make the reductions overlap with the backward pass. Prints one line per step and model
on rank 0; exits non-zero (MPI_Abort) on the first failure."""
import hashlib
import sys
import traceback

import numpy as np

import graphc as gc
from graphc import data, distributed as dist, models

B, STEPS, RTOL = 8, 3, 1e-5


def digest(exe):
    """The first 48 bits of the SHA-256 of every state array (a float64 holds them exactly)."""
    h = hashlib.sha256()
    for k in sorted(exe.state):
        h.update(k.encode())
        h.update(np.ascontiguousarray(exe.state[k]).tobytes())
    return float(int(h.hexdigest()[:12], 16))


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def flat(exe, names):
    return np.concatenate([np.ravel(exe.state[k]) for k in names])


OPTIMIZERS = {"sgd": lambda: gc.optim.SGD(0.05), "momentum": lambda: gc.optim.SGD(0.05, momentum=0.9),
              "adam": lambda: gc.optim.Adam(1e-3)}


def compare(comm, backend, name, sync_bn, optimizer, dtype):
    g = models.load(name)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2 * B * STEPS, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, 2 * B * STEPS)
    dp = dist.DataParallel(comm, sync_bn=sync_bn, first_bucket_mb=0.004, bucket_mb=0.03)
    par = gc.compile(g, backend, optimizer=optimizer(), distributed=dp, dtype=dtype)
    one = gc.compile(g, backend, optimizer=optimizer(), dtype=dtype)
    ours = data.batches(x, y, B, seed=1, rank=comm.rank, ranks=comm.size)
    whole = data.batches(x, y, B * comm.size, seed=1)
    for step, ((xb, yb), (xw, yw)) in enumerate(zip(ours, whole)):
        loss = float(comm.allreduce([par.step({"x": xb, "labels": yb})], "mean")[0])
        ref = one.step({"x": xw, "labels": yw})
        d = digest(par)
        same = comm.allreduce([d], "max")[0] == comm.allreduce([d], "min")[0]
        params = one.graph.param_names
        stats = [k for k in one.state if k.endswith(("running_mean", "running_var"))]
        p_rel = rel(flat(par, params), flat(one, params))
        s_rel = rel(flat(par, stats), flat(one, stats)) if stats else 0.0
        worst = max(params, key=lambda k: rel(par.state[k], one.state[k]))
        loss_rel = abs(loss - ref) / abs(ref)
        if comm.rank == 0:
            print(f"{backend} {dtype} {name}{' sync_bn' if sync_bn else ''} step {step + 1}: "
                  f"loss {loss:.7f} vs {ref:.7f} "
                  f"(rel {loss_rel:.1e}), parameters rel {p_rel:.1e} (worst tensor {worst} "
                  f"{rel(par.state[worst], one.state[worst]):.1e}), running stats rel {s_rel:.1e}, "
                  f"identical on every rank: {same}", flush=True)
        assert same, "the ranks' states differ"
        assert loss_rel <= RTOL and p_rel <= RTOL and s_rel <= RTOL, (loss_rel, p_rel, s_rel)
    buckets = [n for n in par.graph.nx if par.graph.nx.nodes[n]["op"] == "allreduce" and "bucket" in n]
    assert len(buckets) >= 2, buckets


def main(argv):
    comm = dist.world()
    assert comm.size == 2 and isinstance(comm, dist.MPIComm), comm
    backend, optimizer, dtype = argv[:3]
    for spec in argv[3:]:
        name, _, flag = spec.partition(":")
        compare(comm, backend, name, flag == "sync_bn", OPTIMIZERS[optimizer], dtype)
    if comm.rank == 0:
        print("EQUIVALENT", flush=True)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        dist.world().abort(1)
