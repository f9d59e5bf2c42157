"""Run by tests/test_mpi.py under `mpiexec -n 2`: the `graphc` command line (argv after MODE N) in which rank 1
fails at the N-th reduction of its training steps: MODE "kill" (SIGKILL: mpiexec ends the job) or "hang" (it
stops taking part, alive: rank 0's collective times out, and its error ends the job through MPI_Abort)."""
import os
import signal
import sys
import time

from graphc import distributed as dist
from graphc.cli import main

MODE, N = sys.argv[1], int(sys.argv[2])
_finish = dist.Communicator.finish
calls = 0


def failing_finish(self, key):
    global calls
    if not self._suspended:
        calls += 1
        if self.rank == 1 and calls == N:
            if MODE == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(600)
    return _finish(self, key)


dist.Communicator.finish = failing_finish
sys.exit(main(sys.argv[3:]))
