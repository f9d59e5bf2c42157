"""Data-parallel training in one process: the allreduce ops, the bucketing transform and its schedule,
synchronised batch norm on one rank, data sharding, the collective timeout, the alpha-beta projection, and
that nothing imports mpi4py when no MPI launcher started the process. tests/test_mpi.py runs the real
thing on two ranks under mpiexec."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import graphc as gc
from graphc import data, distributed as dist, models, nn
from graphc.bench_ranks import projected_efficiency, ring_allreduce_seconds
from graphc.errors import DataError, DistributedError, GraphError
from graphc.ops.collective import allreduce
from graphc.passes.transforms.data_parallel import buckets
from graphc.passes.transforms.training import training_graph

COVERED = {"allreduce", "allreduce_wait"}       # (tests/test_ops.py checks every op has a reference test)
LAUNCHER_VARS = dist._SIZE_VARS + ("PMIX_RANK",)    # how an MPI launcher tells a process it launched it


class PeerComm(dist.Communicator):
    """Rank 0 of two, in one process: the other rank contributes `peer` times this rank's values."""
    rank, size = 0, 2

    def __init__(self, peer=3.0, timeout=None):
        super().__init__(timeout)
        self.peer = peer

    def _istart(self, send, recv, op, what):
        recv[...] = send * (1.0 + self.peer)
        return True

    def _ibarrier(self, what):
        return True

    def _test(self, handle, what):
        return handle


class StuckComm(PeerComm):
    """A peer that never answers."""

    def _test(self, handle, what):
        return False


def test_allreduce_ops_reduce_over_the_ranks():
    comm = PeerComm(peer=3.0)
    for op, factor in (("mean", 2.0), ("sum", 4.0)):
        g = gc.Graph("ar", dtype="float64")
        x = g.input("x", (None, 3))
        y = allreduce(g, x, comm.id, op)
        g.output(y)
        assert [g.nx.nodes[n]["rule"] for n in (y.name, g.nx.nodes[y.name]["inputs"][0])] == \
            ["allreduce:wait", f"allreduce:{op}"]
        xv = np.arange(6.0).reshape(2, 3)
        out = gc.compile(g).run({"x": xv})[y.name]
        np.testing.assert_array_equal(out, factor * xv)
    g = gc.Graph("ar1")                                           # one rank: a copy
    x = g.input("x", (4,))
    g.output(allreduce(g, x, dist.LocalComm().id))
    np.testing.assert_array_equal(gc.compile(g).run({"x": np.arange(4.0)})[g.outputs[0]], np.arange(4.0))


def test_allreduce_shape_and_op_errors():
    g = gc.Graph("bad")
    x = g.input("x", (3,))
    with pytest.raises(gc.ShapeError, match="unknown reduction 'max'"):
        allreduce(g, x, 0, "max")
    with pytest.raises(gc.DTypeError, match="averages float values"):
        allreduce(g, g.input("n", (3,), dtype="int64"), 0)
    with pytest.raises(DistributedError, match="no communicator with id 12345"):
        gc.compile(_ar_graph(12345)).run({"x": np.ones(3, np.float32)})


def _ar_graph(gid):
    g = gc.Graph("ar")
    g.output(allreduce(g, g.input("x", (3,)), gid))
    return g


def test_one_rank_step_equals_the_plain_step():
    """With one rank the allreduce nodes are copies: a distributed step is the plain step, bit for bit."""
    g = models.lenet5()
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((4, 1, 28, 28)).astype(np.float32), "labels": rng.integers(0, 10, 4)}
    plain = gc.compile(g, optimizer=gc.optim.Adam(1e-3))
    dp = gc.compile(g, optimizer=gc.optim.Adam(1e-3), distributed=dist.DataParallel(dist.LocalComm()))
    for _ in range(2):
        assert plain.step(feeds) == dp.step(feeds)
    for k in plain.state:
        np.testing.assert_array_equal(plain.state[k], dp.state[k])
    assert dp.distributed.size == 1 and plain.distributed is None


def test_gradients_are_bucketed_and_averaged_before_the_update():
    g = models.lenet5()
    dp = dist.DataParallel(PeerComm(peer=1.0), first_bucket_mb=0.01, bucket_mb=0.1)
    tg = training_graph(g, gc.optim.SGD(0.1), distributed=dp)
    nodes = tg.nx.nodes
    starts = [n for n in tg.topo() if nodes[n]["op"] == "allreduce"]
    assert len(starts) >= 3 and all(nodes[n]["rule"] == "allreduce:mean" for n in starts)
    for p in g.param_names:           # every update reads the averaged gradient
        assert f"grad/{p}.mean" in _ancestors(tg, tg.updates[p])
    source = gc.render(tg)
    assert "allreduce:mean" in source and "allreduce:wait" in source
    # every gradient is in exactly one bucket, in the order the backward pass computes them
    sizes = [int(np.prod(nodes[nodes[s]["inputs"][0]]["shape"])) for s in starts]
    assert sum(sizes) == sum(int(np.prod(g.nx.nodes[p]["shape"])) for p in g.param_names)


def _ancestors(g, n):
    import networkx as nx
    return set(nx.ancestors(g.nx, n))


def test_overlap_starts_each_bucket_after_its_gradients():
    g = models.lenet5()
    for overlap in (True, False):
        dp = dist.DataParallel(PeerComm(), first_bucket_mb=0.01, bucket_mb=0.05, overlap=overlap)
        exe = gc.compile(g, "reference", optimizer=gc.optim.SGD(0.1), distributed=dp)
        order = exe.graph.topo()
        pos = {n: i for i, n in enumerate(order)}
        nodes = exe.graph.nx.nodes
        backward = [n for n in order if nodes[n]["role"] == "backward" and "allreduce" not in n
                    and not nodes[n]["rule"].startswith("allreduce")]
        first = min(pos[n] for n in order if nodes[n]["op"] == "allreduce")
        waits = [pos[n] for n in order if nodes[n]["op"] == "allreduce_wait"]
        if overlap:       # the first bucket starts while gradients are still being computed
            assert first < pos[backward[-1]]
        else:             # every bucket after the backward pass, each start right before its wait
            assert first > pos[backward[-1]]
            assert all(nodes[order[w - 1]]["op"] == "allreduce" for w in waits)
        assert min(waits) > pos[backward[-1]]


def test_buckets_respect_the_caps():
    g = gc.Graph("b")
    vals = [g.param(f"p{i}", (n,)) for i, n in enumerate((100, 100, 300, 50, 50, 2000))]
    got = buckets(g, [(v.name, v.name) for v in vals], first_cap=400, cap=1600)
    assert [[k for k, _ in b] for b in got] == [["p0"], ["p1", "p2"], ["p3", "p4"], ["p5"]]


def bn_net(seed=0):
    g = gc.Graph("bn_net", seed=seed)
    x = g.input("x", (None, 2, 5, 5))
    h = nn.conv_bn_relu(g, x, 3, 3, pad=1, name="c")
    logits = nn.dense(g, g.flatten(h), 4, name="logits")
    g.output(g.softmax_cross_entropy(logits, g.input("labels", (None,), dtype="int64"), name="loss"))
    return g


def test_sync_bn_on_one_rank_is_batch_norm():
    """Forward (both modes), gradients and running statistics of the synchronised form equal batch norm's."""
    from graphc.passes.transforms.sync_bn import sync_batchnorm
    g = bn_net()
    s = sync_batchnorm(g, dist.DataParallel(dist.LocalComm()))
    assert not s.op_nodes("batchnorm") and len(s.op_nodes("allreduce")) == 2
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((6, 2, 5, 5)), "labels": rng.integers(0, 4, 6)}
    for training in (True, False):
        a = gc.compile(g, dtype="float64").run(feeds, training=training)
        b = gc.compile(s, dtype="float64").run(feeds, training=training)
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-12)
    ea = gc.compile(g, optimizer=gc.optim.SGD(0.1), dtype="float64")
    eb = gc.compile(g, optimizer=gc.optim.SGD(0.1), dtype="float64",
                    distributed=dist.DataParallel(dist.LocalComm(), sync_bn=True))
    for _ in range(2):
        np.testing.assert_allclose(ea.step(feeds), eb.step(feeds), rtol=1e-12)
    for k in ea.state:
        np.testing.assert_allclose(ea.state[k], eb.state[k], rtol=1e-7, atol=1e-12, err_msg=k)
    report = gc.gradcheck(s, feeds, training=True)
    assert report.ok


def test_shards_are_disjoint_equal_and_make_the_global_batch():
    x = np.arange(11)[:, None]
    y = np.arange(11)
    whole = [b[1] for b in data.batches(x, y, 4, seed=3, epoch=2)]
    parts = [[b[1] for b in data.batches(x, y, 2, seed=3, epoch=2, rank=r, ranks=2)] for r in range(2)]
    assert [len(p) for p in parts] == [3, 3]
    seen = np.concatenate([np.concatenate(p) for p in parts])
    assert len(seen) == 12 and set(seen) == set(range(11))          # padded with one repeat to 2 x 6
    for k in range(2):                                               # k-th global batch = union of shards'
        assert set(parts[0][k]) | set(parts[1][k]) == set(whole[k])
    with pytest.raises(DataError, match="rank must be in"):
        data.batches(x, y, 2, rank=2, ranks=2)


def test_collectives_time_out_with_an_error_naming_the_rank():
    comm = StuckComm(timeout=0.05)
    with pytest.raises(DistributedError, match=r"rank 0 of 2: allreduce 'k' \(24 bytes\) did not complete "
                                               r"within 0.05 s: another rank died"):
        comm.start("k", np.ones(3))
        comm.finish("k")
    with pytest.raises(DistributedError, match="barrier did not complete"):
        comm.barrier()
    with comm.local():                       # while compiling: no communication, no wait
        np.testing.assert_array_equal(comm.allreduce([1.0, 2.0]), [1.0, 2.0])
    with pytest.raises(DistributedError, match="GRAPHC_MPI_TIMEOUT"):
        os.environ["GRAPHC_MPI_TIMEOUT"] = "soon"
        try:
            dist.LocalComm()
        finally:
            del os.environ["GRAPHC_MPI_TIMEOUT"]


def test_launched_size_reads_the_launchers_environment(monkeypatch):
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    assert dist.launched_size() is None
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert dist.launched_size() == 4
    monkeypatch.delenv("OMPI_COMM_WORLD_SIZE")
    monkeypatch.setenv("PMIX_RANK", "0")
    assert dist.launched_size() == 0


def test_compile_distributed_needs_an_optimizer():
    with pytest.raises(GraphError, match="give an optimizer too"):
        gc.compile(models.lenet5(), distributed=True)
    with pytest.raises(GraphError, match="distributed must be"):
        gc.compile(models.lenet5(), optimizer=gc.optim.SGD(0.1), distributed="yes")


def test_ring_allreduce_model():
    # 2 (p-1) alpha + 2 (p-1)/p B/beta: 8 ranks, 100 MB, 10 Gb/s (1.25 GB/s), alpha 30 us
    t = ring_allreduce_seconds(100e6, 8, 10.0, 30e-6)
    assert t == pytest.approx(2 * 7 * 30e-6 + 2 * 7 / 8 * 100e6 / 1.25e9)
    assert ring_allreduce_seconds(1e9, 1, 10.0, 1e-3) == 0.0
    assert projected_efficiency(0.1, 100e6, 8, 10.0, 30e-6) == pytest.approx(0.1 / (0.1 + t))
    assert projected_efficiency(1.0, 100e6, 8, 10.0, 30e-6, overlap=True) == 1.0
    effs = [projected_efficiency(0.05, 40e6, p, 10.0, 30e-6) for p in (2, 8, 64)]
    assert effs == sorted(effs, reverse=True) and 0 < effs[-1] < effs[0] < 1


_NO_MPI = textwrap.dedent("""
    import sys
    class _Block:                       # mpi4py cannot be imported in this process
        def find_spec(self, name, path=None, target=None):
            if name == "mpi4py" or name.startswith("mpi4py."):
                raise ImportError("mpi4py blocked for this test")
    sys.meta_path.insert(0, _Block())
""")


def _run(code, env=None, timeout=300):
    e = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    e.update(env or {})
    return subprocess.run([sys.executable, "-c", _NO_MPI + textwrap.dedent(code)], capture_output=True, text=True,
                          env=e, timeout=timeout)


def test_training_without_mpi_imports_no_mpi4py():
    p = _run("""
        import numpy as np
        import graphc as gc
        from graphc import data
        rng = np.random.default_rng(0)
        ds = data.Dataset(rng.integers(0, 255, (64, 28, 28), dtype=np.uint8), rng.integers(0, 10, 64),
                          rng.integers(0, 255, (32, 28, 28), dtype=np.uint8), rng.integers(0, 10, 32), "tiny")
        r = gc.train.train("lenet5", data=ds, batch=16, backend="reference", progress=False, log=None)
        r1 = gc.train.train("lenet5", data=ds, batch=16, backend="reference", progress=False, log=None,
                            distributed=True)     # no launcher: one rank, the allreduces are copies
        assert r.step_losses == r1.step_losses, (r.step_losses, r1.step_losses)
        assert "mpi4py" not in sys.modules and "mpi4py.MPI" not in sys.modules
        print("OK", r.config["ranks"], r1.config["ranks"])
    """)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["OK", "1", "1"]


def test_launched_without_mpi4py_is_a_one_line_error():
    p = _run("""
        from graphc.cli import main
        sys.exit(main(["train", "lenet5", "--backend", "reference"]))
    """, env={"PMI_SIZE": "2"})
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "started by an MPI launcher with 2 ranks, but mpi4py cannot be imported" in lines[0]
    assert "pip install 'graphc[mpi]'" in lines[0]


def test_bench_ranks_arguments_are_checked(capsys):
    from graphc.cli import main
    assert main(["bench", "lenet5", "--ranks", "1,2"]) == 1
    assert "--ranks times data-parallel training steps: add --train" in capsys.readouterr().err
    assert main(["bench", "lenet5", "--train", "--ranks", "two"]) == 1
    assert "comma-separated list of rank counts" in capsys.readouterr().err
