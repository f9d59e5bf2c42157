"""Data-parallel training on two MPI ranks, each test an `mpiexec -n 2` job (skipped where mpi4py or mpiexec is
missing; `pip install -e ".[test]"` installs both): the step equals one process's on the global batch and
keeps every rank's state bit-identical; `graphc train` under mpiexec prints once, checkpoints on rank 0 and
resumes on another number of ranks; a killed or hung rank ends the job with an error, not a hang."""
import glob
import os
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("mpi4py")

from graphc import data, distributed as dist  # noqa: E402
from graphc.bench_ranks import find_mpiexec, run_scaling  # noqa: E402
from graphc.checkpoint import read_checkpoint  # noqa: E402
from graphc.errors import DistributedError  # noqa: E402
from graphc.train import train  # noqa: E402

try:
    MPIEXEC = find_mpiexec()
except DistributedError:
    pytest.skip("mpiexec not found (pip install 'graphc[mpi]')", allow_module_level=True)

HERE = os.path.dirname(os.path.abspath(__file__))
LAUNCHER_VARS = dist._SIZE_VARS + ("PMIX_RANK",)     # a test run inside a launcher must not pass it on
CLI = ["-m", "graphc.cli"]


def mpirun(args, n=2, env=None, timeout=600):
    e = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    e.update(env or {})
    t0 = time.monotonic()
    p = subprocess.run([MPIEXEC, "-n", str(n), sys.executable, *args], capture_output=True, text=True, env=e,
                       timeout=timeout)
    p.seconds = time.monotonic() - t0
    return p


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """256 training and 128 test digits of the embedded subset, as MNIST IDX files (--data mnist:DIR)."""
    full = data.load_mnist5k()
    d = tmp_path_factory.mktemp("digits")
    for name, arr in (("train-images-idx3-ubyte", full.x_train[:256]), ("train-labels-idx1-ubyte", full.y_train[:256]),
                      ("t10k-images-idx3-ubyte", full.x_test[:128]), ("t10k-labels-idx1-ubyte", full.y_test[:128])):
        data.write_idx(d / name, np.asarray(arr, np.uint8))
    return d


def _params(path):
    arrays, meta = read_checkpoint(path)
    keys = sorted(k for k in arrays if not k.startswith("optim/"))
    return np.concatenate([arrays[k].ravel().astype(np.float64) for k in keys]), meta


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("backend,optimizer,dtype", [("numba", "adam", "float32"),
                                                     ("reference", "momentum", "float64")])
def test_two_ranks_equal_one_process_on_the_global_batch(backend, optimizer, dtype):
    """3 steps of lenet5 and of the digit resnet (with sync_bn: per-rank batch-norm statistics are not the
    global batch's) on 2 ranks x batch 8 equal 1 process x batch 16, and every rank's state is identical
    after every step (tests/mpi/equivalence.py)."""
    p = mpirun([os.path.join(HERE, "mpi", "equivalence.py"), backend, optimizer, dtype, "lenet5", "resnet:sync_bn"])
    assert p.returncode == 0 and "EQUIVALENT" in p.stdout, p.stdout + p.stderr
    steps = [line for line in p.stdout.splitlines() if " step " in line]
    assert len(steps) == 6 and all(line.endswith("identical on every rank: True") for line in steps)


def test_train_under_mpiexec_and_resume_on_another_number_of_ranks(digits, tmp_path):
    """Epoch 1 on 2 ranks x 32 then epoch 2 on 1 process, and epoch 1 on 1 process x 64 then epoch 2 on 2
    ranks, both equal 2 epochs of 1 process x 64 (the same global batches)."""
    common = ["train", "lenet5", "--data", f"mnist:{digits}", "--backend", "reference", "--no-progress"]
    two = mpirun(CLI + common + ["--epochs", "1", "--batch", "32", "--save", str(tmp_path / "two.npz")])
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("data-parallel on 2 ranks: batch 32 per rank, global batch 64") == 1
    assert two.stdout.count("test accuracy:") == 1                    # rank 0 prints, the other is silent
    _, meta = _params(tmp_path / "two.npz")
    assert (meta["ranks"], meta["batch"], meta["global_batch"], meta["epoch"]) == (2, 32, 64, 1)
    lines = []
    train("lenet5", data=f"mnist:{digits}", epochs=2, backend="reference", progress=False, log=lines.append,
          resume=tmp_path / "two.npz", save=tmp_path / "two_then_one.npz")
    assert any("continuing on 1 x 64" in line for line in lines), lines
    train("lenet5", data=f"mnist:{digits}", epochs=1, batch=64, backend="reference", progress=False, log=None,
          save=tmp_path / "one.npz")
    again = mpirun(CLI + common + ["--epochs", "2", "--resume", str(tmp_path / "one.npz"),
                                  "--save", str(tmp_path / "one_then_two.npz")])
    assert again.returncode == 0, again.stderr
    assert "batch 32 per rank, global batch 64" in again.stdout
    train("lenet5", data=f"mnist:{digits}", epochs=2, backend="reference", progress=False, log=None,
          resume=tmp_path / "one.npz", save=tmp_path / "one.npz")
    want, _ = _params(tmp_path / "one.npz")
    for name in ("two_then_one.npz", "one_then_two.npz"):
        got, meta = _params(tmp_path / name)
        assert meta["epoch"] == 2 and _rel(got, want) <= 1e-5, (name, _rel(got, want))


@pytest.mark.parametrize("mode", ["kill", "hang"])
def test_a_failing_rank_ends_the_job_with_an_error(digits, tmp_path, mode):
    """Rank 1 dies (SIGKILL) or hangs in epoch 2: the job ends with an error within 60 s, and the checkpoint
    rank 0 wrote after epoch 1 is whole (no temporary file left behind)."""
    ckpt = tmp_path / "run.npz"
    p = mpirun([os.path.join(HERE, "mpi", "failing_rank.py"), mode, "6", "train", "lenet5",
                "--data", f"mnist:{digits}", "--backend", "reference", "--no-progress", "--epochs", "3",
                "--batch", "32", "--save", str(ckpt)], env={"GRAPHC_MPI_TIMEOUT": "10"}, timeout=120)
    assert p.returncode != 0 and p.seconds < 60, (p.returncode, p.seconds, p.stderr)
    if mode == "hang":
        assert "rank 0 of 2: allreduce" in p.stderr and "did not complete within 10 s" in p.stderr, p.stderr
    else:
        assert "Killed" in p.stdout + p.stderr or "signal 9" in p.stdout + p.stderr, p.stdout + p.stderr
    _, meta = _params(ckpt)
    assert meta["epoch"] == 1
    assert not glob.glob(str(tmp_path / ".run.npz.*"))


def test_bench_ranks_reports_scaling_and_the_projection():
    lines = []

    class Out:
        def write(self, s):
            lines.append(s)

        def flush(self):
            pass

    r = run_scaling("lenet5", "1,2", backend="reference", batch=8, repeats=3, out=Out())
    assert [row["ranks"] for row in r["rows"]] == [1, 2]
    assert r["rows"][0]["efficiency"] == pytest.approx(1.0) and r["rows"][1]["efficiency"] > 0
    assert all(0 <= row["allreduce_share"] <= 1 for row in r["rows"])
    assert {(p["ranks"], p["network"]) for p in r["projection"]} == {(8, "10 Gb/s"), (8, "100 Gb/s"),
                                                                      (64, "10 Gb/s"), (64, "100 Gb/s")}
    text = "".join(lines)
    assert "efficiency" in text and "projected efficiency" in text and "64 ranks" in text


def test_a_script_that_met_a_timeout_ends_the_job_when_it_exits():
    """From Python (no command line to call MPI_Abort): rank 0's collective times out, its script ends, and
    the job ends with it although rank 1 is still busy for 60 s."""
    code = ("import time, numpy as np\n"
            "from graphc import distributed as dist\n"
            "c = dist.world(timeout=2)\n"
            "if c.rank == 1:\n"
            "    time.sleep(60)\n"
            "c.start('k', np.ones(4))\n"
            "c.finish('k')\n")
    p = mpirun(["-c", code], timeout=120)
    assert p.returncode != 0 and p.seconds < 30, (p.returncode, p.seconds)
    assert "rank 0 of 2: allreduce 'k' (32 bytes) did not complete within 2 s" in p.stderr, p.stderr
