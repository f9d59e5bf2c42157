"""Data-parallel training across processes on MPI (``pip install 'graphc[mpi]'``: mpi4py and mpich).

    mpiexec -n 4 graphc train resnet --batch 64        # 4 ranks x batch 64 per rank = global batch 256
    gc.train.train("lenet5", distributed=True)          # the same from Python, under mpiexec
    exe = gc.compile(g, "numba", optimizer=gc.optim.Adam(), distributed=gc.distributed.DataParallel())

One process per rank. Every rank holds the whole model and reads its own shard of every global batch
(``graphc.data.batches(..., rank=, ranks=)``); the compiled training step averages the gradients with
explicit ``allreduce`` nodes (``passes/transforms/data_parallel.py``) before the optimizer update, so
every rank applies the same update to the same parameters and they stay bit-identical.

Nothing here imports mpi4py unless the process was started by an MPI launcher (MPICH's or Open MPI's
mpiexec, Slurm's ``srun --mpi=pmi2``) with more than one rank: ``world()`` is then an ``MPIComm`` on
MPI_COMM_WORLD, else a ``LocalComm`` (one rank: every collective is a copy).

No collective waits forever: every wait polls its request with a deadline (``timeout``: the
GRAPHC_MPI_TIMEOUT environment variable, default 60 s) and raises DistributedError naming the rank and
the collective, so a rank that died or hung ends the job with an error, not a hang (mpiexec also ends
the whole job at once when a rank is killed by a signal). After such an error the command line calls
``abort_after_error()``, MPI_Abort, so no rank is left waiting; a Python script that met a timed-out
collective calls MPI_Abort when its process exits.
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import time
from dataclasses import dataclass

import numpy as np

from graphc.errors import DistributedError, GraphError

__all__ = ["Communicator", "LocalComm", "MPIComm", "DataParallel", "world", "launched_size", "resolve",
           "group", "abort_after_error", "DEFAULT_TIMEOUT", "COMPILE_TIMEOUT"]

#: seconds a collective may wait for the other ranks (GRAPHC_MPI_TIMEOUT overrides it)
DEFAULT_TIMEOUT = 60.0
#: seconds the ranks may wait for each other while they compile kernels (ranks finish at different times)
COMPILE_TIMEOUT = 900.0
_INSTALL_HINT = "pip install 'graphc[mpi]' (mpi4py and the mpich wheel, which ships mpiexec)"
# environment variables in which MPI launchers tell a process the number of ranks
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS")

_GROUPS: dict = {}          # communicator id -> communicator (the allreduce ops name theirs by id)
_WORLD = None


def launched_size():
    """The number of ranks an MPI launcher started this process with, read from the environment without
    importing MPI; None when no launcher started it (0 when one did but did not say how many)."""
    for var in _SIZE_VARS:
        v = os.environ.get(var)
        if v:
            try:
                return int(v)
            except ValueError:
                return 0
    return 0 if os.environ.get("PMIX_RANK") else None


def group(gid):
    """The communicator an allreduce node names (attrs["group"])."""
    try:
        return _GROUPS[gid]
    except KeyError:
        raise DistributedError(f"no communicator with id {gid}: this executable was compiled for a data-parallel "
                               "run of another process. Fix: compile it in the process that runs it") from None


@dataclass
class CommStats:
    """What the collectives of the compiled step cost on this rank since the last reset()."""
    calls: int = 0
    bytes: int = 0
    start_s: float = 0.0         # starting reductions (copies into the send buffers included)
    wait_s: float = 0.0          # waiting for them to complete: the communication the step did not hide

    def reset(self):
        self.calls, self.bytes, self.start_s, self.wait_s = 0, 0, 0.0, 0.0


class Communicator:
    """What data-parallel training needs from MPI: non-blocking allreduce of the compiled step's buckets
    (start/finish), blocking reductions of small host arrays (metrics), a barrier, and a local mode in
    which collectives do not communicate (each rank compiling its kernels on its own)."""
    rank = 0
    size = 1
    local_size = 1               # ranks on this machine: they share its cores

    def __init__(self, timeout=None):
        if timeout is None:
            env = os.environ.get("GRAPHC_MPI_TIMEOUT")
            try:
                timeout = float(env) if env else DEFAULT_TIMEOUT
            except ValueError:
                raise DistributedError(f"GRAPHC_MPI_TIMEOUT={env!r} is not a number of seconds") from None
        if not float(timeout) > 0:
            raise DistributedError(f"the collective timeout must be positive seconds, got {timeout!r}")
        self.timeout = float(timeout)
        self.stats = CommStats()
        self.broken = False          # a collective timed out: MPI cannot be used (or finalised) any more
        self._pending = {}
        self._suspended = 0
        self.id = len(_GROUPS)
        _GROUPS[self.id] = self

    def __repr__(self):
        return f"<{type(self).__name__} rank {self.rank} of {self.size}>"

    # ------------------------------------------------------------------ the compiled step's collectives
    def start(self, key, x, op="mean"):
        """Starts reducing x over the ranks; returns the array the result lands in (valid after finish)."""
        if key in self._pending:     # left behind by a step that failed between start and finish
            self.finish(key)
        t0 = time.perf_counter()
        send = np.ascontiguousarray(x)
        if self._suspended or self.size == 1:
            handle, recv = None, np.array(send, copy=True)
        else:
            recv = np.empty_like(send)
            handle = self._istart(send, recv, op, f"allreduce {key!r}")
        self._pending[key] = (handle, recv, send, op)    # MPI reads send until the reduction completes
        self.stats.calls += 1
        self.stats.bytes += recv.nbytes
        self.stats.start_s += time.perf_counter() - t0
        return recv

    def finish(self, key):
        """Waits for the reduction `key` started; returns its result."""
        try:
            handle, recv, _, op = self._pending.pop(key)
        except KeyError:
            raise DistributedError(f"rank {self.rank} of {self.size}: allreduce {key!r} was never started (the "
                                   "graph runs its wait before its start)") from None
        if handle is not None:
            t0 = time.perf_counter()
            self._wait(handle, f"allreduce {key!r} ({recv.nbytes:,} bytes)")
            if op == "mean":
                np.divide(recv, self.size, out=recv)
            self.stats.wait_s += time.perf_counter() - t0
        return recv

    # ------------------------------------------------------------------ host-side collectives
    def allreduce(self, x, op="sum", what="allreduce"):
        """A blocking reduction (sum, mean, max, min) of a small host array over the ranks, e.g. metrics."""
        x = np.ascontiguousarray(np.asarray(x, dtype=np.float64))
        if self._suspended or self.size == 1:
            return np.array(x, copy=True)
        recv = np.empty_like(x)
        self._wait(self._istart(x, recv, op, what), what)
        return recv / self.size if op == "mean" else recv

    def barrier(self, what="barrier", timeout=None):
        """Waits until every rank got here (at most `timeout` seconds, default self.timeout)."""
        if self.size > 1 and not self._suspended:
            self._wait(self._ibarrier(what), what, timeout)

    @contextlib.contextmanager
    def local(self):
        """Inside, collectives do not communicate (they return this rank's values): lets each rank compile
        and warm up its kernels on its own, at its own pace, before the first real step."""
        self._suspended += 1
        try:
            yield self
        finally:
            self._suspended -= 1

    def abort(self, code=1):
        """Ends every rank of the job (MPI_Abort); a no-op with one rank."""

    # ------------------------------------------------------------------ waiting with a deadline
    def _wait(self, handle, what, timeout=None):
        timeout = self.timeout if timeout is None else float(timeout)
        t0 = time.monotonic()
        spins = 0
        while not self._test(handle, what):
            spins += 1
            if spins < 200:
                continue                          # a reduction of a step is usually done within microseconds
            waited = time.monotonic() - t0
            if waited > timeout:
                self.broken = True
                raise DistributedError(
                    f"rank {self.rank} of {self.size}: {what} did not complete within {timeout:g} s: another "
                    "rank died, hung or runs a different program. Fix: look at the other ranks' errors; "
                    "raise GRAPHC_MPI_TIMEOUT if a rank is only slow")
            time.sleep(min(1e-3, 0.05 * waited))

    def _istart(self, send, recv, op, what):
        raise NotImplementedError

    def _ibarrier(self, what):
        raise NotImplementedError

    def _test(self, handle, what):
        raise NotImplementedError


class LocalComm(Communicator):
    """One rank, no MPI: every collective is a copy of this rank's values."""


def _import_mpi(size):
    try:
        from mpi4py import MPI
    except ImportError as e:
        n = f"{size} ranks" if size else "several ranks"
        raise DistributedError(f"this process was started by an MPI launcher with {n}, but mpi4py cannot be "
                               f"imported ({e}). Fix: {_INSTALL_HINT}") from None
    return MPI


class MPIComm(Communicator):
    """MPI_COMM_WORLD (or `comm`, an mpi4py communicator) through mpi4py's non-blocking collectives."""

    def __init__(self, comm=None, timeout=None):
        MPI = _import_mpi(launched_size())
        self._MPI = MPI
        self._comm = comm if comm is not None else MPI.COMM_WORLD
        self._comm.Set_errhandler(MPI.ERRORS_RETURN)      # MPI failures raise, and become DistributedError
        self.rank, self.size = self._comm.Get_rank(), self._comm.Get_size()
        started = launched_size()
        if comm is None and started and started != self.size:
            raise DistributedError(f"the launcher started {started} ranks but MPI sees {self.size}: this MPI library "
                                   "does not speak the launcher's protocol. Fix: launch with the MPI's own mpiexec, "
                                   "or srun --mpi=pmi2 (or pmix) under Slurm")
        node = self._comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_size = node.Get_size()
        node.Free()
        self._ops = {"sum": MPI.SUM, "mean": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}
        super().__init__(timeout)
        atexit.register(self._abort_if_broken)     # (runs before mpi4py's MPI_Finalize, registered earlier)

    def _abort_if_broken(self):
        """A process leaving after a collective timed out ends the job: its peers may never return."""
        if self.broken:
            self.abort(1)

    def _call(self, what, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except self._MPI.Exception as e:
            raise DistributedError(f"rank {self.rank} of {self.size}: {what} failed in MPI: "
                                   f"{' '.join(str(e).split())}") from None

    def _istart(self, send, recv, op, what):
        return self._call(what, self._comm.Iallreduce, send, recv, op=self._ops[op])

    def _ibarrier(self, what):
        return self._call(what, self._comm.Ibarrier)

    def _test(self, handle, what):
        return self._call(what, handle.Test)

    def abort(self, code=1):
        import sys
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        time.sleep(0.5)          # mpiexec forwards the lines just written before MPI_Abort tears the job down
        self._comm.Abort(int(code))


def world(timeout=None):
    """This process's communicator: MPI_COMM_WORLD when an MPI launcher started it with several ranks
    (mpi4py is imported then, and only then), else a one-rank LocalComm. Created once; `timeout` (seconds a
    collective may wait) applies when it is created."""
    global _WORLD
    if _WORLD is None:
        n = launched_size()
        _WORLD = MPIComm(timeout=timeout) if n is not None and n != 1 else LocalComm(timeout)
    return _WORLD


def abort_after_error(code=1):
    """For a command line that just printed an error: in a job of several ranks, ends them all (MPI_Abort)
    so that none is left waiting in a collective for this one."""
    if _WORLD is not None and _WORLD.size > 1:
        _WORLD.abort(code)


@dataclass
class DataParallel:
    """How compile() makes a data-parallel training step (``compile(..., distributed=DataParallel(...))``).

    comm: the ranks (default ``world()``). bucket_mb: the size of the flat buffers the gradients are packed
    into, one allreduce each (PyTorch DDP's default, 25 MB); first_bucket_mb: the first bucket, filled with
    the first gradients the backward pass computes, is smaller so that communication starts early (DDP does
    the same). overlap: start each bucket's reduction as soon as its gradients exist and wait for it just
    before the update (False: reduce every bucket after the whole backward pass). sync_bn: batch norm uses
    the statistics of the global batch (an allreduce of the batch mean and variance, in the forward pass and
    in its gradient) instead of each rank's own."""
    comm: Communicator = None
    bucket_mb: float = 25.0
    first_bucket_mb: float = 1.0
    overlap: bool = True
    sync_bn: bool = False

    def __post_init__(self):
        if self.comm is None:
            self.comm = world()
        if not isinstance(self.comm, Communicator):
            raise GraphError(f"DataParallel(comm=...) takes a graphc.distributed.Communicator, got "
                             f"{type(self.comm).__name__}")
        if not (self.bucket_mb > 0 and self.first_bucket_mb > 0):
            raise GraphError(f"bucket sizes must be positive MB, got bucket_mb={self.bucket_mb}, "
                             f"first_bucket_mb={self.first_bucket_mb}")

    @property
    def rank(self):
        return self.comm.rank

    @property
    def size(self):
        return self.comm.size

    def threads(self, available):
        """Numba threads per rank: the machine's threads shared among the ranks on it."""
        return max(1, int(available) // max(1, self.comm.local_size))


def resolve(distributed):
    """compile()'s and train()'s `distributed` argument -> a DataParallel, or None for one process.
    None/False: none; True: DataParallel() on world(); a Communicator: DataParallel(comm); a DataParallel."""
    if distributed is None or distributed is False:
        return None
    if distributed is True:
        return DataParallel()
    if isinstance(distributed, Communicator):
        return DataParallel(comm=distributed)
    if isinstance(distributed, DataParallel):
        return distributed
    raise GraphError(f"distributed must be True, False, a graphc.distributed.Communicator or a DataParallel, "
                     f"got {type(distributed).__name__}")


# ------------------------------------------------------------------------------ the training loop's helpers

def for_training(distributed, sync_bn=False):
    """graphc.train's `distributed` -> a DataParallel or None. None: data-parallel when an MPI launcher
    started this process with several ranks (read from the environment: nothing imports mpi4py otherwise)."""
    if distributed is None:
        n = launched_size()
        distributed = n is not None and n != 1
    dp = resolve(distributed)
    if dp is not None and sync_bn and not dp.sync_bn:
        dp = dataclasses.replace(dp, sync_bn=True)
    return dp


def resumed_batch(meta, ranks):
    """The batch per rank that keeps a checkpoint's global batch on `ranks` ranks (None when it does not
    divide, or the rank count is the checkpoint's: then the checkpoint's batch)."""
    if int(meta.get("ranks", 1)) == ranks or not meta.get("batch"):
        return None
    old = int(meta.get("global_batch", meta["batch"]))
    return old // ranks if old % ranks == 0 else None


def resumed_position(meta, skip, part, batch, ranks, say):
    """The step of an interrupted epoch to resume at on `ranks` ranks x `batch`; `part` (the epoch's sums
    so far) is shared among the ranks, which add them up again at the epoch's end."""
    old = int(meta.get("global_batch", meta.get("batch", batch)))
    if skip and old != batch * ranks:     # another global batch: (re)train a partial one
        done = skip * old
        skip = done // (batch * ranks)
        say(f"note: the interrupted epoch continues after {skip * batch * ranks} of its {done} samples done "
            "(the global batch changed)")
    if skip and ranks > 1:
        part.update(loss_sum=part["loss_sum"] / ranks, seen=part["seen"] / ranks)
    return skip


def epoch_totals(step_losses, first, loss_sum, seen, seconds, dp):
    """An epoch's (loss sum, images, seconds) over every rank (seconds: the ranks' mean); its step losses
    from index `first` on become the means over the ranks, in place."""
    if dp is None:
        return loss_sum, seen, seconds
    step_losses[first:] = dp.comm.allreduce(step_losses[first:], "mean", what="the epoch's losses").tolist()
    return tuple(dp.comm.allreduce([loss_sum, seen, seconds / dp.size], what="the epoch's sums"))


def describe(dp, batch):
    return (f"data-parallel on {dp.size} ranks: batch {batch} per rank, global batch {batch * dp.size}"
            + (", batch norm synchronised" if dp.sync_bn else ""))


def any_rank(flag, dp):
    """True on every rank when `flag` is true on one (e.g. rank 0's callbacks ask to stop)."""
    return bool(flag) if dp is None else bool(dp.comm.allreduce([bool(flag)], "max", what="a decision")[0])


def share_rank0_state(exe, dp, changed):
    """After rank 0's callbacks ran (one may have restored its best state): every rank takes rank 0's
    state, if `changed` there. Returns whether it changed (the same on every rank)."""
    if not any_rank(changed, dp) or dp is None:
        return bool(changed)
    names = sorted(exe.state)
    mine = [np.ravel(np.asarray(exe.state[n], np.float64)) * (dp.rank == 0) for n in names]
    flat = dp.comm.allreduce(np.concatenate(mine), what="rank 0's state")
    at = 0
    for n in names:
        a = np.asarray(exe.state[n])
        exe.state[n] = flat[at:at + a.size].reshape(a.shape).astype(a.dtype)
        at += a.size
    return True


@contextlib.contextmanager
def compiling(dp):
    """Around the compile phase: each rank compiles its kernels on its own (collectives local), then waits for
    the others, so that no rank's first step waits in a collective for another rank's compiler."""
    if dp is None:
        yield
        return
    with dp.comm.local():
        yield
    dp.comm.barrier("compiling kernels", timeout=max(COMPILE_TIMEOUT, dp.comm.timeout))


def save_on_rank0(save, path, exe, meta, dp):
    """save(path, exe, meta) (an atomic checkpoint write) on rank 0, once every rank has finished the
    epoch's steps; the others wait until it is written."""
    if dp is None:
        save(path, exe, meta)
        return
    dp.comm.barrier("the barrier before the checkpoint")
    if dp.rank == 0:
        save(path, exe, meta)
    dp.comm.barrier("writing the checkpoint")


def evaluate_shards(evaluate, infer, x, y, dp):
    """evaluate(infer, x, y) -> (accuracy, mean loss) over the whole set: with several ranks each evaluates
    every size-th sample from its rank-th on, and the sums are reduced."""
    if dp is None:
        return evaluate(infer, x, y)
    xs, ys = x[dp.rank::dp.size], y[dp.rank::dp.size]
    acc, loss = evaluate(infer, xs, ys)
    correct, loss_sum, n = dp.comm.allreduce([acc * len(xs), loss * len(xs), len(xs)], what="evaluation")
    return correct / max(n, 1), loss_sum / max(n, 1)
