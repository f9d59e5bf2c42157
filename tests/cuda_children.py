"""The child processes of the CUDA tests (tests/test_cuda_backend.py, tests/test_cuda_kernels.py), in one
registry: each test file registers its children when imported (the simulator re-runs of the file, the PTX
checks), and the first driver test to run starts every registered child whose driver test the session
runs, so that they all run side by side. A simulator child runs every CUDA thread as a Python thread and
keeps about three quarters of a core busy: one after another, the CUDA tests took ~7.6 of the suite's 12
minutes on a 2-core Zen 4, side by side 3.2 (`python -m pytest tests/test_cuda_backend.py
tests/test_cuda_kernels.py --durations=8`).

A child writes into temporary files, not pipes: a child nobody reads yet (its driver test runs later)
would stop at a full pipe."""
from __future__ import annotations

import atexit
import os
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_REGISTERED: dict = {}      # name -> (command, simulator on?, driver test's name)
_RUNNING: dict = {}         # name -> (Popen, stdout file, stderr file)


def child_env(sim):
    """The environment of a child: NUMBA_ENABLE_CUDASIM=1 when `sim` (else unset), this checkout first on
    the path."""
    env = dict(os.environ)
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    if sim:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def register(name, command, sim, driver):
    """A child `name` running `command`, started for the driver test named `driver`."""
    _REGISTERED[name] = (command, sim, driver)


def pytest_child(path, keyword):
    """The command re-running the test file `path` with pytest's -k `keyword`."""
    return [sys.executable, "-m", "pytest", path, "-o", "addopts=", "-q", "-p", "no:cacheprovider", "-k", keyword]


def start(name):
    """Starts child `name` unless it runs (or ran) already."""
    if name not in _RUNNING:
        command, sim, _ = _REGISTERED[name]
        out = tempfile.TemporaryFile("w+")
        err = tempfile.TemporaryFile("w+")
        _RUNNING[name] = (subprocess.Popen(command, cwd=ROOT, env=child_env(sim), stdout=out, stderr=err, text=True),
                          out, err)


def start_for_session(session):
    """Starts every registered child whose driver test is among the session's tests."""
    wanted = {getattr(it, "originalname", None) or getattr(it, "name", "") for it in session.items}
    for name, (_, _, driver) in list(_REGISTERED.items()):
        if driver in wanted:
            start(name)


def wait(name, timeout):
    """(return code, stdout, stderr) of child `name` (started if it was not), which must end within
    `timeout` seconds from now."""
    start(name)
    proc, out, err = _RUNNING[name]
    try:
        proc.wait(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        timed_out = True
    texts = []
    for f in (out, err):
        f.seek(0)
        texts.append(f.read())
    if timed_out:
        pytest.fail(f"child {name} timed out after {timeout} s:\n{(texts[0] + texts[1])[-4000:]}")
    return proc.returncode, texts[0], texts[1]


@atexit.register
def _reap():
    for proc, _, _ in _RUNNING.values():
        if proc.poll() is None:
            proc.kill()
