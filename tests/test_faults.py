"""Fault injection on graphc's output files: a read-only or full file system under a checkpoint, a
rendering and a benchmark's JSON, and a kill -9 in the middle of a checkpoint save.

Every failure must be one graphc error line (OutputError), found before the work where it can be (a
read-only or missing directory), and must leave the previous file byte-identical and no temp file.
Real faults come from a tiny tmpfs (full) and a read-only bind mount; mounting needs root and
CAP_SYS_ADMIN, so those tests skip cleanly elsewhere, and the same faults are also injected by making
the OS calls raise OSError(EROFS / ENOSPC), which runs everywhere. (The truncated/garbage kernel cache
fault: test_hardening.py's test_03 and test_corrupted_numba_and_python_caches_are_rewritten here.)"""
import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

import graphc as gc
from graphc import checkpoint, cli
from graphc.bench import run_bench
from graphc.checkpoint import load_checkpoint, save_checkpoint


def small_exe(value=1.0, n=20000):
    """A reference executable whose checkpoint is about 80 KB (larger than the full tmpfs's room)."""
    g = gc.Graph("faults")
    x = g.input("x", (None, n))
    g.output(g.mul(x, g.param("w", value=np.full(n, value))))
    return gc.compile(g)


def one_line(e):
    """The message of an OutputError (raised as gc.GraphError, so that a bare OSError fails the test)."""
    msg = str(e.value)
    assert type(e.value).__name__ == "OutputError" and msg and "\n" not in msg, (type(e.value), msg)
    return msg


def temps(d):
    return sorted(p.name for p in Path(d).iterdir() if p.name.endswith(".tmp"))


# ------------------------------------------------------------------ real mounts (root only)

def _mount(*args):
    if os.name != "posix" or os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs or a read-only bind mount needs root")
    r = subprocess.run(["mount", *args], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount here ({r.stderr.strip() or r.returncode})")


@contextlib.contextmanager
def _mounted(*args):
    d = tempfile.mkdtemp(prefix="graphc-fault-")
    _mount(*args, d)
    try:
        yield Path(d)
    finally:
        subprocess.run(["umount", "-l", d], capture_output=True)
        os.rmdir(d)


@pytest.fixture
def readonly_dir():
    """A read-only bind mount of an empty directory (writes fail with EROFS)."""
    src = tempfile.mkdtemp(prefix="graphc-src-")
    try:
        with _mounted("--bind", "-o", "ro", src) as d:
            if os.access(d, os.W_OK) and _can_create(d):
                pytest.skip("the bind mount is not read-only here")
            yield d
    finally:
        os.rmdir(src)


def _can_create(d):
    try:
        fd, p = tempfile.mkstemp(dir=d)
    except OSError:
        return False
    os.close(fd)
    os.unlink(p)
    return True


@pytest.fixture
def full_dir():
    """A 64 KiB tmpfs (the test fills it to the last byte once its first checkpoint is written)."""
    with _mounted("-t", "tmpfs", "-o", "size=64k", "tmpfs") as d:
        yield d


def _fill(d):
    fd = os.open(d / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        for size in (4096, 1):              # pages, then the last bytes
            while True:
                try:
                    os.write(fd, b"\0" * size)
                except OSError as e:
                    assert e.errno == errno.ENOSPC
                    break
    finally:
        os.close(fd)


def test_checkpoint_train_render_bench_on_a_readonly_mount(readonly_dir, capsys, monkeypatch):
    with pytest.raises(gc.GraphError, match="read-only") as e:
        save_checkpoint(readonly_dir / "ck.npz", small_exe())
    one_line(e)
    monkeypatch.setattr(gc.train, "_compile", lambda *a: pytest.fail("trained before checking --save"))
    for argv in (["train", "mlp", "--save", str(readonly_dir / "run.npz"), "--backend", "reference"],
                 ["render", "mlp", "-o", str(readonly_dir / "mlp.svg")],
                 ["bench", "mlp", "--backend", "reference", "--json", str(readonly_dir / "b.json")]):
        assert cli.main(argv) == 1
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(lines) == 1 and "read-only" in lines[0] and "EROFS" in lines[0], (argv, lines)
    assert list(readonly_dir.iterdir()) == []


def test_checkpoint_render_bench_on_a_full_tmpfs(full_dir):
    ck = full_dir / "ck.npz"
    save_checkpoint(ck, small_exe(1.0, n=2000))                 # 8 KB: fits
    before = ck.read_bytes()
    _fill(full_dir)
    with pytest.raises(gc.GraphError, match="no space left") as e:
        save_checkpoint(ck, small_exe(2.0, n=2000))
    assert "ENOSPC" in one_line(e)
    assert ck.read_bytes() == before and temps(full_dir) == []
    with pytest.raises(gc.GraphError, match="no space left") as e:
        gc.render(gc.models.mlp(), full_dir / "mlp.svg")
    one_line(e)
    with pytest.raises(gc.GraphError, match="no space left") as e:
        run_bench("mlp", backend="reference", batch=2, json_path=full_dir / "b.json", repeats=1, warmup=0,
                  measure_compile=False, roofline=False, quiet=True)
    one_line(e)
    assert sorted(p.name for p in full_dir.iterdir()) == ["ck.npz", "filler"]


# ------------------------------------------------------------------ the same faults, injected (runs everywhere)

def _raise(code):
    def fail(*a, **k):
        raise OSError(code, os.strerror(code))
    return fail


@pytest.mark.parametrize("code, words", [(errno.EROFS, "read-only"), (errno.EACCES, "permission denied"),
                                         (errno.EDQUOT, "quota")])
def test_injected_unwritable_directory_is_found_before_the_work(tmp_path, monkeypatch, capsys, code, words):
    monkeypatch.setattr(tempfile, "mkstemp", _raise(code))
    monkeypatch.setattr(gc.train, "_compile", lambda *a: pytest.fail("trained before checking --save"))
    from graphc import bench, rendering
    monkeypatch.setattr(rendering, "prepare", lambda *a, **k: pytest.fail("rendered before checking -o"))
    monkeypatch.setattr(bench, "_load", lambda *a, **k: pytest.fail("benchmarked before checking --json"))
    for argv in (["train", "mlp", "--save", str(tmp_path / "run.npz"), "--backend", "reference"],
                 ["render", "mlp", "-o", str(tmp_path / "mlp.svg")],
                 ["bench", "mlp", "--backend", "reference", "--json", str(tmp_path / "b.json")]):
        assert cli.main(argv) == 1
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(lines) == 1 and words in lines[0] and lines[0].startswith("graphc: error: cannot write"), lines


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "no space left"), (errno.EIO, "input/output error")])
def test_injected_write_failure_keeps_the_previous_files(tmp_path, monkeypatch, code, words):
    ck, svg, js = tmp_path / "ck.npz", tmp_path / "g.dot", tmp_path / "b.json"
    save_checkpoint(ck, small_exe(1.0))
    gc.render(gc.models.mlp(), svg)
    js.write_text('{"old": 1}')
    before = {p: p.read_bytes() for p in (ck, svg, js)}
    monkeypatch.setattr(os, "fsync", _raise(code))        # the data did not reach the disk
    for write in (lambda: save_checkpoint(ck, small_exe(2.0)), lambda: gc.render(gc.models.lenet5(), svg),
                  lambda: run_bench("mlp", backend="reference", batch=2, json_path=js, repeats=1, warmup=0,
                                    measure_compile=False, roofline=False, quiet=True)):
        with pytest.raises(gc.GraphError, match=words) as e:
            write()
        one_line(e)
    assert {p: p.read_bytes() for p in before} == before
    assert temps(tmp_path) == []
    monkeypatch.undo()
    assert json.loads(js.read_text()) == {"old": 1}


def test_a_full_disk_mid_training_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    """The --save directory passes the check, the disk fills during the run: the end-of-epoch save fails
    with one line, the previous checkpoint intact."""
    rng = np.random.default_rng(0)
    ds = gc.data.Dataset(rng.integers(0, 256, (32, 28, 28), np.uint8), rng.integers(0, 10, 32),
                         rng.integers(0, 256, (16, 28, 28), np.uint8), rng.integers(0, 10, 16), "digits")
    ck = tmp_path / "run.npz"
    gc.train.train("mlp", data=ds, epochs=1, batch=16, backend="reference", save=ck, progress=False, log=None)
    before = ck.read_bytes()
    monkeypatch.setattr(os, "fsync", _raise(errno.ENOSPC))
    with pytest.raises(gc.GraphError, match="no space left") as e:
        gc.train.train("mlp", data=ds, epochs=2, batch=16, backend="reference", save=ck, resume=ck, progress=False,
                       log=None)
    one_line(e)
    assert ck.read_bytes() == before and temps(tmp_path) == []


# ------------------------------------------------------------------ kill -9 during a save

KILLED_CHILD = textwrap.dedent("""
    import io, sys, time
    import numpy as np
    import graphc as gc
    from graphc import checkpoint
    g = gc.Graph("faults"); x = g.input("x", (None, 20000))
    g.output(g.mul(x, g.param("w", value=np.full(20000, 2.0))))
    exe = gc.compile(g)
    real = checkpoint._write_npz
    def half_then_hang(f, arrays):       # half the archive is on disk when the kill comes
        buf = io.BytesIO(); real(buf, arrays); raw = buf.getvalue()
        f.write(raw[: len(raw) // 2]); f.flush()
        print("HALF", flush=True); time.sleep(120)
    checkpoint._write_npz = half_then_hang
    checkpoint.save_checkpoint(sys.argv[1], exe)
""")


def test_kill_9_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    if not hasattr(signal, "SIGKILL"):
        pytest.skip("no SIGKILL here")
    ck = tmp_path / "ck.npz"
    exe = small_exe(1.0)
    save_checkpoint(ck, exe)
    before = ck.read_bytes()
    child = subprocess.Popen([sys.executable, "-c", KILLED_CHILD, str(ck)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "HALF"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert ck.read_bytes() == before                             # byte-identical
    left = temps(tmp_path)
    assert len(left) == 1 and left[0].startswith(f".ck.npz.{child.pid}."), left   # the killed writer's
    exe.state["w"][...] = 0
    load_checkpoint(ck, exe)                                     # the next run: load ...
    assert temps(tmp_path) == [] and float(exe.state["w"][0]) == 1.0
    (tmp_path / left[0]).write_bytes(b"half")
    save_checkpoint(ck, exe)                                     # ... or save cleans it
    assert temps(tmp_path) == []
    assert checkpoint.read_checkpoint(ck)[0]["w"][0] == 1.0


# ------------------------------------------------------------------ corrupted kernel caches

CACHE_CHILD = textwrap.dedent("""
    import numpy as np, graphc as gc
    g = gc.Graph("cachefault2")
    x, y = g.input("x", (None, 1, 4, 4)), g.input("y", (None,), dtype="int64")
    z = g.flatten(g.maxpool(g.relu(g.mul(x, x)), 2))
    g.output(g.softmax_cross_entropy(z, y, name="loss"), g.sum(z, axes=1, name="s"))
    exe = gc.compile(g, backend="numba", progress=None)        # (no "compiling N kernels" line on stderr)
    out = exe.run({"x": np.arange(32.0).reshape(2, 1, 4, 4) / 8, "y": np.array([1, 3])})
    print("out", repr(float(out["loss"])), out["s"].tolist())
""")


def test_garbage_that_upsets_pickle_itself_gives_one_warning_line(tmp_path):
    """Some garbage makes CPython's unpickler print "SystemError: deallocated bytearray object has exported
    buffers" on stderr while it raises MemoryError (these 200 bytes do, on CPython 3.11; os.urandom's did
    now and then): the run still prints graphc's one warning line and nothing else."""
    import random
    env = {**os.environ, "GRAPHC_CACHE_DIR": str(tmp_path / "cache"), "NUMBA_CACHE_DIR": str(tmp_path / "numba")}

    def child():
        r = subprocess.run([sys.executable, "-c", CACHE_CHILD], env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        return [ln for ln in r.stdout.splitlines() if ln.startswith("out")], \
            [ln for ln in r.stderr.splitlines() if ln.strip()]
    want, err = child()
    assert len(want) == 1 and not err, err
    data = list((tmp_path / "numba").rglob("*.nbc"))
    assert data
    for p in data:
        p.write_bytes(random.Random(454).randbytes(200))
    got, err = child()
    assert got == want and len(err) == 1 and "discarded a corrupted kernel cache entry" in err[0], err


def test_corrupted_numba_and_python_caches_are_rewritten(tmp_path):
    """Beyond test_hardening's test_03 (truncated indexes of generated kernels): garbage data files
    behind intact indexes, of the generated kernels and of the backend's own @njit kernels (loss,
    reductions; under NUMBA_CACHE_DIR here), garbage and truncated generated sources and a truncated
    .pyc: the run gives the same values with one warning line, and the next run none (rewritten)."""
    pytest.importorskip("numba")
    env = {**os.environ, "GRAPHC_CACHE_DIR": str(tmp_path / "cache"), "NUMBA_CACHE_DIR": str(tmp_path / "numba"),
           "PYTHONWARNINGS": "default"}
    env.pop("PYTHONDONTWRITEBYTECODE", None)                          # the .pyc files are part of the test

    def child():
        r = subprocess.run([sys.executable, "-c", CACHE_CHILD], env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        return [ln for ln in r.stdout.splitlines() if ln.startswith("out")], \
            [ln for ln in r.stderr.splitlines() if ln.strip()]
    want, err = child()
    assert len(want) == 1 and not err, err
    data = list((tmp_path / "numba").rglob("*.nbc"))
    assert any("sce_int_k" in p.name for p in data) and any("graphc_ew_" in p.name for p in data), data
    for p in data:
        p.write_bytes(os.urandom(200))
    sources = sorted((tmp_path / "cache").glob("graphc_*.py"))
    assert len(sources) >= 2
    sources[0].write_bytes(b"\xff\xfe" + os.urandom(50))           # not even UTF-8
    sources[1].write_text(sources[1].read_text()[:40])               # truncated mid-line
    pycs = list((tmp_path / "cache" / "__pycache__").glob("*.pyc"))
    assert pycs
    pycs[-1].write_bytes(pycs[-1].read_bytes()[:24])                # header intact, code cut
    got, err = child()
    assert got == want and len(err) == 1 and "discarded a corrupted kernel cache entry" in err[0], err
    got, err = child()
    assert got == want and not err, err


def test_every_cached_numba_kernel_of_the_backend_is_guarded():
    """Every @njit(cache=True) kernel of graphc.backends.numba's modules loads and saves through the
    checked cache (kernel_cache.guard_numba_cache): a kernel module the backend's __init__ does not
    import before it guards them would fail like before on a corrupted entry."""
    pytest.importorskip("numba")
    import graphc.backends.numba  # noqa: F401
    from numba.core.caching import FunctionCache
    mods = {n: m for n, m in list(sys.modules.items()) if n.startswith("graphc.backends.numba.") and m is not None}
    cached = [(n, k, type(v._cache)) for n, m in mods.items() for k, v in vars(m).items()
              if isinstance(getattr(v, "_cache", None), FunctionCache)]
    assert len(cached) > 20 and all(t is not FunctionCache for _, _, t in cached), \
        [f"{n}.{k}" for n, k, t in cached if t is FunctionCache]


def test_a_kernel_cache_entry_that_cannot_be_saved_warns_once_and_the_kernel_runs(tmp_path, monkeypatch):
    """A full disk under the kernel cache (Numba's save raises ENOSPC): one warning, the compiled kernel
    still runs (it used to raise out of the run)."""
    pytest.importorskip("numba")
    import uuid
    from numba.core import caching
    from graphc.backends import kernel_cache

    def full(self, key, data):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(caching.IndexDataCacheFile, "save", full)
    monkeypatch.setattr(kernel_cache, "_WARNED", [False])
    c = 1.0 + uuid.uuid4().int % 1000 / 1e4            # a kernel this process has not loaded yet
    g = gc.Graph("nosave")
    a = g.input("a", (None, 3))
    g.output(g.relu(g.mul(a, c), name="r"))
    with pytest.warns(RuntimeWarning, match="could not be saved") as w:
        out = gc.compile(g, backend="numba").run({"a": np.ones((2, 3), np.float32)})
    assert len(w) == 1 and "\n" not in str(w[0].message)
    np.testing.assert_allclose(out["r"], np.full((2, 3), c, np.float32))
