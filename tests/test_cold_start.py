"""Time to first step (issue 14): parallel loops on Python threads, kernel discovery and parallel
compilation, the static conv strategy of a cold start, the compile breakdown, the progress line, and
results that do not depend on the thread count (which the executor picks by timing)."""
import json
import os
import subprocess
import sys
import threading
import time
import uuid

import numba
import numpy as np
from numba.core import types
import pytest

import graphc as gc
from graphc.backends import kernel_cache
from graphc.backends.numba import precompile
from graphc.backends.numba import threads as nthreads
from graphc.backends.numba.compile_stats import CompileRecorder, format_breakdown
from graphc.backends.numba.conv import strategy as conv_strategy


def _fresh_kernel(tag="t"):
    """A generated kernel no cache has seen (a unique id in its text): kernel(x, y): y = 2x + c."""
    c = float(uuid.uuid4().int % 1000)
    src = (f"# graphc test kernel {uuid.uuid4().hex}\nfrom numba import njit\n\n\n@njit(cache=True, nogil=True)\n"
           f"def kernel(x, y):\n    for i in range(x.shape[0]):\n        y[i] = 2.0 * x[i] + {c!r}\n")
    return kernel_cache.load_generated(src, f"graphc_test{tag}_"), c


@pytest.fixture
def own_cache(monkeypatch, tmp_path):
    """Generated test kernels (and their Numba cache, beside them) go to a temporary directory."""
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path / "kernels"))


# ------------------------------------------------------------------------------- parallel loops

def test_parallel_for_covers_every_task_once_on_each_thread():
    seen, lock = [], threading.Lock()

    def fn(lo, hi, k):
        with lock:
            seen.append((lo, hi, k, threading.get_ident()))
    nthreads.parallel_for(fn, 10, 3)
    assert sorted(t for lo, hi, _, _ in seen for t in range(lo, hi)) == list(range(10))
    assert sorted(k for _, _, k, _ in seen) == [0, 1, 2] and len({t for *_, t in seen}) == 3
    seen.clear()
    nthreads.parallel_for(fn, 7, 1)
    assert [s[:3] for s in seen] == [(0, 7, 0)]


def test_spin_wait_sees_another_threads_store_and_gives_up_after_its_reads():
    flags = np.zeros(4, np.int64)
    assert not nthreads._spin_until(flags, 1, 0, 1000)              # nothing changes: False after 1000 reads

    def store():
        time.sleep(0.02)
        flags[1] = 5
    t = threading.Thread(target=store)
    t.start()
    t0 = time.perf_counter()
    assert nthreads._spin_until(flags, 1, 0, 10 ** 12)              # would spin for hours unless it re-reads
    assert time.perf_counter() - t0 < 5
    t.join()
    assert nthreads._spin_reads() > 0


def test_parallel_for_raises_a_workers_error_and_stays_usable():
    def fn(lo, hi, k):
        if k == 1:
            raise ValueError("chunk 1 failed")
    with pytest.raises(ValueError, match="chunk 1"):
        nthreads.parallel_for(fn, 4, 2)
    out = np.zeros(4)
    nthreads.parallel_for(lambda lo, hi, k: out.__setitem__(slice(lo, hi), k + 1), 4, 2)
    assert out.tolist() == [1, 1, 2, 2]


@pytest.mark.parametrize("user_env, expect", [({}, "3000"), ({"GOMP_SPINCOUNT": "7"}, "7"),
                                               ({"OMP_WAIT_POLICY": "ACTIVE"}, None)])
def test_openmp_workers_spin_briefly_unless_the_user_says(user_env, expect):
    """The numba backend sets libgomp's spin count on import (a spinning OpenMP worker took the core the
    next kernel's Python worker needs), keeps what the user set, and keeps its own default away from
    bench peers (torch's OpenMP threads)."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    code = ("import os, graphc.backends.numba\n"
            "from graphc.bench_peers import peer_environment\n"
            "print(os.environ.get('GOMP_SPINCOUNT'), peer_environment().get('GOMP_SPINCOUNT'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**env, **user_env})
    assert out.returncode == 0, out.stderr
    own, peer = out.stdout.split()
    assert own == str(expect)
    assert peer == (str(expect) if user_env else "None")


def test_scipy_blas_is_loaded_single_threaded_and_the_environment_restored():
    """Numba's np.dot calls SciPy's OpenBLAS: load_scipy_blas_single_threaded loads it set up for one
    thread (a two-thread OpenBLAS kept a thread spinning on the other core during runs), without changing
    the environment; one loaded before is held to one thread."""
    pytest.importorskip("scipy")
    pytest.importorskip("threadpoolctl")
    _blas_threads_after_load("")
    _blas_threads_after_load("import scipy.linalg\n")          # loaded before, with two: held to one


def _blas_threads_after_load(first):
    import os
    import subprocess
    import sys
    code = (first + "import os, numpy, threadpoolctl\n"
            "from graphc.backends import kernel_cache\n"
            "kernel_cache.load_scipy_blas_single_threaded()\n"
            "libs = [d for d in threadpoolctl.threadpool_info() if 'scipy.libs' in d['filepath']]\n"
            "print(len(libs), libs[0]['num_threads'] if libs else -1, os.environ.get('OPENBLAS_NUM_THREADS'))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    n, threads, envvar = out.stdout.split()
    if n == "0":
        pytest.skip("SciPy's BLAS is not a separate scipy.libs OpenBLAS here")
    assert threads == "1" and envvar == "None", out.stdout


def test_scipy_blas_waits_for_numba_to_need_it_and_comes_single_threaded():
    """The numba backend does not import scipy.linalg; Numba's first compile (its refresh imports it) and
    a BLAS kernel of im2col (kernel_ready, before it is compiled, loaded or run) get it single-threaded
    first, the environment left as it was."""
    pytest.importorskip("scipy")
    pytest.importorskip("threadpoolctl")
    compile_first = ("import numba\n@numba.njit\ndef f(x):\n    return x + 1\n"
                     "assert f(1) == 2\n")
    kernel_first = ("import numpy as np\nfrom graphc.backends.numba import precompile\n"
                    "from graphc.backends.numba.conv import im2col\n"
                    "a = np.ones((2, 3), np.float32)\n"
                    "with precompile.discovering() as found:\n"
                    "    assert not im2col.kernel_ready(im2col._gemm_tasks, (a, a.T.copy(), a, 1, 0, 0))\n"
                    "assert len(found) == 1\n")
    for trigger in (compile_first, kernel_first):
        code = ("import os, sys, threadpoolctl\nimport graphc.backends.numba\n"
                "assert 'scipy.linalg' not in sys.modules\n" + trigger +
                "assert 'scipy.linalg' in sys.modules\n"
                "libs = [d for d in threadpoolctl.threadpool_info() if 'scipy.libs' in d['filepath']]\n"
                "print(len(libs), libs[0]['num_threads'] if libs else -1, os.environ.get('OPENBLAS_NUM_THREADS'))\n")
        env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
        n, threads, envvar = out.stdout.split()
        if n == "0":
            pytest.skip("SciPy's BLAS is not a separate scipy.libs OpenBLAS here")
        assert threads == "1" and envvar == "None", (trigger, out.stdout)


def test_without_scipy_numba_compiles_and_scipy_is_looked_for_once():
    code = ("import sys\nsys.modules['scipy'] = None\n"           # an import of scipy raises ImportError
            "import graphc.backends.numba\nfrom graphc.backends import kernel_cache\nimport numba\n"
            "@numba.njit\ndef f(x):\n    return x + 1\n"
            "assert f(1) == 2 and kernel_cache._SCIPY_HELD[0] is None\n"
            "import builtins\nreal = builtins.__import__\n"
            "def no_scipy(name, *a, **k):\n    assert not name.startswith('scipy'), name\n    return real(name, *a, **k)\n"
            "builtins.__import__ = no_scipy\n"
            "kernel_cache.load_scipy_blas_single_threaded()\nprint('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_blas_limit_holds_every_blas_and_restores_it():
    """BlasLimit(1) (around every numba run): each loaded BLAS at one thread inside, as threadpoolctl sees
    it (the OpenBLAS calls are made directly, not through threadpoolctl), its own count after; nested."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from graphc.backends import kernel_cache

    def counts():
        return {d["filepath"]: d["num_threads"] for d in threadpoolctl.threadpool_info() if d["user_api"] == "blas"}
    before = counts()
    if not before:
        pytest.skip("no BLAS that threadpoolctl sees")
    lim = kernel_cache.BlasLimit(1)
    with lim:
        assert set(counts().values()) == {1}
        with kernel_cache.BlasLimit(2):
            assert set(counts().values()) == {2}
        assert set(counts().values()) == {1}
    assert counts() == before
    with kernel_cache.BlasLimit(None):
        assert counts() == before


def test_a_lazy_blas_limit_holds_blas_from_its_first_use_to_its_end():
    """BlasLimit(1, lazy=True) (around every numba run) leaves BLAS alone until blas_in_use() (a BLAS call
    coming) or an eager limit inside; from then on to its own end every BLAS is at one thread."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from graphc.backends import kernel_cache

    def counts():
        return {d["filepath"]: d["num_threads"] for d in threadpoolctl.threadpool_info() if d["user_api"] == "blas"}
    before = counts()
    if not before or set(before.values()) == {1}:
        pytest.skip("no multi-threaded BLAS that threadpoolctl sees")
    lazy = kernel_cache.BlasLimit(1, lazy=True)
    with lazy:
        assert counts() == before
        kernel_cache.blas_in_use()
        assert set(counts().values()) == {1}
    assert counts() == before
    with lazy:
        with kernel_cache.BlasLimit(1):
            assert set(counts().values()) == {1}
        assert set(counts().values()) == {1}          # (the lazy one restores, at its end)
    assert counts() == before
    kernel_cache.blas_in_use()                        # outside any: nothing
    assert counts() == before


def test_batch_split_slices_only_batch_arrays():
    got = []
    fn = nthreads.batch_split(lambda *a: got.append([np.shape(v) for v in a]), (np.zeros((6, 2)), np.zeros((1, 1)), 3), 6)
    fn(2, 5, 0)
    assert got == [[(3, 2), (1, 1), ()]]


# --------------------------------------------------------------- thread count does not change results

def _small_cnn():
    g = gc.Graph("cold_cnn", seed=3)
    x = g.input("x", (None, 2, 10, 10))
    y = g.input("labels", (None,), dtype="int64")
    h = g.maxpool(g.relu(g.conv(x, g.param("c1.w", (4, 2, 3, 3), init="he"), g.param("c1.b", (4,), init="zeros"))), 2)
    h = g.relu(g.conv(h, g.param("c2.w", (6, 4, 3, 3), init="he"), g.param("c2.b", (6,), init="zeros")))
    h = g.flatten(h)
    logits = g.dense(h, g.param("fc.w", (3, 6 * 2 * 2), init="glorot"), g.param("fc.b", (3,), init="zeros"),
                     name="logits")
    g.output(g.softmax_cross_entropy(logits, y, name="loss"))
    return g


def test_thread_count_does_not_change_training():
    """Every parallel kernel splits work whose sums do not depend on the split (the executor picks the
    count by timing, so results must not depend on it): one and two threads train bit-identically,
    with every kernel on its parallel path (parallel_min=1); both agree with the reference."""
    g = _small_cnn()
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((6, 2, 10, 10)).astype(np.float32), "labels": rng.integers(0, 3, 6)}
    runs = {}
    for t in (1, 2):
        exe = gc.compile(g, backend="numba", optimizer=gc.optim.SGD(0.1), threads=t, parallel_min=1, progress=None)
        losses = [exe.step(feeds) for _ in range(3)]
        runs[t] = (losses, {k: np.array(v) for k, v in exe.params.items()})
    assert runs[1][0] == runs[2][0]
    for k in runs[1][1]:
        np.testing.assert_array_equal(runs[1][1][k], runs[2][1][k])
    ref = gc.compile(g, backend="reference", optimizer=gc.optim.SGD(0.1))
    ref_losses = [ref.step(feeds) for _ in range(3)]
    np.testing.assert_allclose(runs[2][0], ref_losses, rtol=1e-4, atol=1e-5)


def test_thread_count_is_chosen_online_without_extra_runs():
    g = _small_cnn()
    feeds = {"x": np.ones((2, 2, 10, 10), np.float32), "labels": np.array([0, 1])}
    exe = gc.compile(g, backend="numba", optimizer=gc.optim.SGD(0.1), progress=None)
    calls = []
    orig = exe._run_steps
    exe._run_steps = lambda b, threads=None: calls.append(threads) or orig(b, threads)
    exe.step(feeds)
    assert len(calls) == 1                   # the first step runs the program once
    b = exe._last_binding[3]
    if numba.config.NUMBA_NUM_THREADS > 1:
        exe.step(feeds)                      # the first run on each count: a warm-up round, not timed
        maxt = numba.config.NUMBA_NUM_THREADS
        assert calls == [maxt, 1] and b.thread_times == {} and b.trial_warmups == 0 and len(b.thread_trials) == 6
    for _ in range(7):                       # then up to three timed rounds
        exe.step(feeds)
    b = exe._last_binding[3]
    assert not b.thread_trials and b.threads in (1, numba.config.NUMBA_NUM_THREADS)
    assert set(b.thread_times) <= {1, numba.config.NUMBA_NUM_THREADS}


# ------------------------------------------------------------------- discovery and parallel compile

def test_discovery_records_calls_without_running_them(own_cache):
    kern, c = _fresh_kernel("d")
    x, y = np.ones(4), np.zeros(4)
    other = []
    with precompile.discovering() as found:
        assert kern(x, y) is None
        th = threading.Thread(target=lambda: other.append(nthreads.num_threads()))
        th.start()
        th.join()
    assert (y == 0).all(), "a discovered kernel must not run"
    ((disp, sig, options),) = found.values()
    assert disp is kern and sig == (numba.typeof(x), numba.typeof(y)) and options is None
    assert other                                      # other threads are not intercepted
    kern(x, y)
    np.testing.assert_array_equal(y, 2 * x + c)


def test_kernels_compile_without_a_c_wrapper(own_cache):
    """Every CPU kernel of the backend, generated ones too, compiles without Numba's C-callable wrapper
    (kernel_cache.skip_cfunc_wrappers: compile time nobody uses); it keeps the CPython wrapper it is
    called through and runs. A user's own @njit function is left alone."""
    mods = [m for n, m in list(sys.modules.items()) if n.startswith("graphc.backends.numba.") and m is not None]
    kernels = [v for m in mods for v in vars(m).values() if isinstance(v, numba.core.registry.CPUDispatcher)]
    assert len(kernels) > 20 and all(k.targetoptions.get("no_cfunc_wrapper") for k in kernels)

    def wrappers(disp):
        cres = disp.overloads[disp.signatures[0]]
        names = {f.name for f in cres.library.get_defined_functions()}
        return cres.fndesc.llvm_cpython_wrapper_name in names, cres.fndesc.llvm_cfunc_wrapper_name in names

    kern, c = _fresh_kernel("c")
    x, y = np.ones(3), np.zeros(3)
    kern(x, y)
    np.testing.assert_array_equal(y, 2 * x + c)
    assert wrappers(kern) == (True, False)
    users = numba.njit(lambda a: a + 1)
    assert users(1.0) == 2.0 and wrappers(users) == (True, True)


_HIGHLIGHT = """
import os, sys
import graphc.backends.numba
from numba.core import errors
print(type(errors.termcolor()).__name__, os.environ.get("NUMBA_DISABLE_ERROR_MESSAGE_HIGHLIGHTING"))
"""


@pytest.mark.parametrize("user, scheme", [(None, "NOPColorScheme None"), ("", "HighlightColorScheme ")])
def test_numba_is_imported_without_error_highlighting_unless_the_user_says(user, scheme):
    """The backend imports Numba with its error highlighting off (kernel_cache.import_numba_unhighlighted:
    typing marks up thousands of messages); the environment is left as it was, and a user's own
    setting of the variable wins."""
    pytest.importorskip("colorama")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_DISABLE_ERROR_MESSAGE_HIGHLIGHTING"}
    if user is not None:
        env["NUMBA_DISABLE_ERROR_MESSAGE_HIGHLIGHTING"] = user
    out = subprocess.run([sys.executable, "-c", _HIGHLIGHT], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == scheme.strip(), out.stderr[-2000:]


def _memo_entries():
    """(function type, context, args, remembered signature) of every call the typing memo holds."""
    import gc as pygc
    from numba.core.types.functions import BaseFunction
    return [(f, ctx, args, sig) for f in pygc.get_objects() if issubclass(type(f), BaseFunction)
            for (ctx, _target, args), sig in list(f.__dict__.get("_graphc_call_types", {}).items())]


def test_compile_memo_answers_what_numba_would(own_cache):
    """The typing memo (backends/numba/compile_memo.py) is installed with the backend and remembers the
    calls a compile resolved (here the float32 store y[i] = ...); a second kernel making the same calls
    adds nothing to it; and every remembered signature, of every kernel this test process compiled so
    far, is the one Numba's own resolution gives now."""
    from graphc.backends.numba import compile_memo
    original = compile_memo.original_get_call_type()
    assert original is not None
    kern, c = _fresh_kernel("memo")
    x, y = np.ones(5, np.float32), np.zeros(5, np.float32)
    kern(x, y)
    np.testing.assert_array_equal(y, 2 * x + np.float32(c))
    entries = _memo_entries()
    store = (types.Array(types.float32, 1, "C"), types.intp, types.float64)     # y[i] = 2.0 * x[i] + c
    assert any(args == store for _, _, args, _ in entries)
    again, _ = _fresh_kernel("memo")                 # the same calls on the same types: all remembered
    again(x, y)
    assert len(_memo_entries()) == len(entries)
    wrong = [(f, args, sig) for f, ctx, args, sig in entries if original(f, ctx, args, {}) != sig]
    assert not wrong, wrong[:3]


def test_compile_memo_gives_llvm_type_sizes_as_llvm_does():
    """The ABI-size memo answers, for plain and nested types, a pointer and a named struct (never
    remembered: its text does not show its body), what llvmlite computes from the type itself, asked
    once or again."""
    from llvmlite import ir
    from numba.core.base import BaseContext
    from numba.core.registry import cpu_target
    assert hasattr(BaseContext.get_abi_sizeof, "__wrapped__")
    ctx = cpu_target.target_context
    named = ir.global_context.get_identified_type("graphc_test_memo_struct")
    if named.is_opaque:
        named.set_body(ir.IntType(8), ir.DoubleType(), ir.IntType(16))
    kinds = [ir.IntType(8), ir.FloatType(), ir.ArrayType(ir.DoubleType(), 7), ir.IntType(8).as_pointer(),
             ir.LiteralStructType([ir.IntType(32), ir.ArrayType(ir.IntType(64), 3), ir.FloatType()]), named]
    for ty in kinds + kinds:
        assert ctx.get_abi_sizeof(ty) == ty.get_abi_size(ctx.target_data)
    assert ctx.get_abi_sizeof(kinds[4]) == 40 and ctx.get_abi_sizeof(named) == 24


def test_compile_memo_can_be_turned_off():
    code = ("import graphc.backends.numba; from graphc.backends.numba import compile_memo; "
            "print(compile_memo.original_get_call_type() is None)")
    env = dict(os.environ, GRAPHC_NUMBA_COMPILE_MEMO="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "True", out.stderr[-2000:]


def test_a_worker_process_compiles_into_the_shared_disk_cache(own_cache):
    kern, c = _fresh_kernel("w")
    x, y = np.ones(3), np.zeros(3)
    sig = (numba.typeof(x), numba.typeof(y))
    spec = precompile.job_spec(kern)
    assert spec is not None and spec[0] == "file"
    results = []
    prog = precompile._Progress(1, None, "")
    worker = precompile._WorkerProc(precompile._Queue([[(kern, sig, None, spec)]]), prog, results)
    tail = worker.join()
    assert results and results[0][1], tail
    assert not kern.overloads
    assert precompile.load_cached(kern, sig)           # machine code from the worker, no compile here
    assert sum(kern.stats.cache_misses.values()) == 0
    kern(x, y)
    np.testing.assert_array_equal(y, 2 * x + c)
    assert "stats" in tail


def test_a_forked_worker_compiles_into_the_shared_disk_cache(own_cache):
    """A worker forked from this process finds each kernel by its place in the queue and compiles it
    into the disk cache; this process then loads the machine code without compiling."""
    if not precompile.can_fork():
        pytest.skip("compile workers are forked on Linux only")
    kernels = [_fresh_kernel("f") for _ in range(2)]
    x, y = np.ones(3), np.zeros(3)
    sig = (numba.typeof(x), numba.typeof(y))
    queue = precompile._Queue([[(k, sig, None, None)] for k, _ in kernels])      # no spec: no new process could find them
    results = []
    (worker,) = precompile._start_workers(1, queue, precompile._Progress(2, None, ""), results)
    assert isinstance(worker.proc, precompile._Forked)
    tail = worker.join()
    assert [ok for _, ok in results] == [True, True], tail
    assert worker.proc.returncode == 0 and "stats" in tail
    for kern, c in kernels:
        assert not kern.overloads
        assert precompile.load_cached(kern, sig)
        assert sum(kern.stats.cache_misses.values()) == 0
        kern(x, y)
        np.testing.assert_array_equal(y, 2 * x + c)


def test_a_refused_fork_starts_a_new_process_instead(own_cache, monkeypatch):
    if not precompile.can_fork():
        pytest.skip("compile workers are forked on Linux only")

    def no_fork():
        raise OSError(12, "Cannot allocate memory")
    monkeypatch.setattr(precompile.os, "fork", no_fork)
    kern, c = _fresh_kernel("n")
    x, y = np.ones(3), np.zeros(3)
    sig = (numba.typeof(x), numba.typeof(y))
    results = []
    queue = precompile._Queue([[(kern, sig, None, precompile.job_spec(kern))]])
    (worker,) = precompile._start_workers(1, queue, precompile._Progress(1, None, ""), results)
    assert not isinstance(worker.proc, precompile._Forked)
    tail = worker.join()
    assert results and results[0][1], tail
    assert precompile.load_cached(kern, sig)
    kern(x, y)
    np.testing.assert_array_equal(y, 2 * x + c)


_TRAIN_COLD = """
import hashlib, json, sys
import numpy as np
import graphc as gc
g = gc.Graph("fork_cnn", seed=5)
x = g.input("x", (None, 2, 9, 9))
y = g.input("labels", (None,), dtype="int64")
h = g.maxpool(g.relu(g.conv(x, g.param("c1.w", (5, 2, 3, 3), init="he"), g.param("c1.b", (5,), init="zeros"))), 2)
h = g.flatten(h)
logits = g.dense(h, g.param("fc.w", (3, 5 * 3 * 3), init="glorot"), g.param("fc.b", (3,), init="zeros"), name="logits")
g.output(g.softmax_cross_entropy(logits, y, name="loss"))
rng = np.random.default_rng(1)
feeds = {"x": rng.standard_normal((5, 2, 9, 9)).astype(np.float32), "labels": rng.integers(0, 3, 5)}
exe = gc.compile(g, backend="numba", optimizer=gc.optim.Adam(0.01), progress=None)
import graphc.backends.numba.executor as nexec
from graphc.backends.numba.compile_stats import CompileRecorder
late, run = [], nexec.NumbaExecutable._run_binding
def counted(self, b):                      # compilations during real runs: kernels discovery missed
    rec = CompileRecorder().start()
    try:
        run(self, b)
    finally:
        late.extend(r["kernel"] for r in rec.stop().kernel_rows())
nexec.NumbaExecutable._run_binding = counted
from numba.core import event
compiled = []                              # every compilation of this process, callees included
class Seen(event.Listener):
    def on_start(self, ev):
        f = ev.data["dispatcher"].py_func
        compiled.append(f.__module__ + "." + f.__qualname__)
    def on_end(self, ev):
        pass
event.register("numba:compile", Seen())
losses = [exe.step(feeds) for _ in range(2)]
h = hashlib.sha256()
for k in sorted(exe.params):
    h.update(np.ascontiguousarray(exe.params[k]).tobytes())
k = exe.compile_times["bindings"][0]["kernels"]
print("RESULT " + json.dumps({"losses": [repr(v) for v in losses], "params": h.hexdigest(), "kernels": k, "late": late,
                              "compiled": compiled, "numba_impls_loaded": "numba.np.arraymath" in sys.modules}))
"""


def _train_cold(tmp_path, runs, caches=None):
    """For each {name: environment}, two training steps in a fresh process (all at once) on new, empty
    kernel caches (or on the caches of the earlier runs named in `caches` {name: earlier name}):
    {name: {losses, params (a hash), kernels (the precompile stats), ...}}."""
    procs = {}
    for name, extra in runs.items():
        where = tmp_path / (caches or {}).get(name, name)
        env = dict(os.environ, GRAPHC_CACHE_DIR=str(where / "kernels"), NUMBA_CACHE_DIR=str(where / "numba"), **extra)
        procs[name] = subprocess.Popen([sys.executable, "-c", _TRAIN_COLD], env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=600)
        lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
        assert lines, stderr[-2000:]
        out[name] = json.loads(lines[0][7:])
    return out


def test_forked_workers_train_bit_identically_to_one_process(tmp_path):
    """From empty caches, a training step whose kernels were compiled by forked workers gives the very
    same losses and parameters as one whose kernels this process compiled alone."""
    if not precompile.can_fork():
        pytest.skip("compile workers are forked on Linux only")
    r = _train_cold(tmp_path, {"alone": {"GRAPHC_COMPILE_WORKERS": "0"}, "forked": {"GRAPHC_COMPILE_WORKERS": "1"}})
    alone, forked = r["alone"], r["forked"]
    assert alone["kernels"]["workers"] == 0 and forked["kernels"]["workers"] == 1
    assert forked["kernels"]["compiled"] == alone["kernels"]["compiled"] > 3
    assert forked["kernels"]["redone_here"] == 0
    assert forked["losses"] == alone["losses"] and forked["params"] == alone["params"]
    # every kernel the runs call was compiled with the others: the parallel loops' spin-wait kernel too
    # (discovery runs the steps on one thread, so no parallel call waits there)
    assert alone["late"] == [] and forked["late"] == []
    # no function of graphc compiled twice in one process (one float32 program), and the loss kernels'
    # small helpers (_label, _row_max, ...) not at all: Numba inlines them (inline="always")
    twice = {f for f in alone["compiled"] if f.startswith("graphc") and alone["compiled"].count(f) > 1}
    assert not twice and any(f.endswith(".sce_int_k") for f in alone["compiled"]), alone["compiled"]
    assert not [f for f in alone["compiled"] if f.startswith("graphc.backends.numba.kernels.loss._")]
    # warm: every kernel loaded from the disk cache, the same bits, and none of Numba's implementation
    # registries loaded (only a compile needs them: kernel_cache._runtime_symbols_ready)
    warm = _train_cold(tmp_path, {"warm": {}}, caches={"warm": "alone"})["warm"]
    assert warm["kernels"]["cached"] == warm["kernels"]["kernels"] and warm["compiled"] == []
    assert warm["losses"] == alone["losses"] and warm["params"] == alone["params"]
    assert alone["numba_impls_loaded"] and not warm["numba_impls_loaded"]


def test_queue_groups_kernels_by_a_big_shared_callee_largest_first(own_cache):
    """One group per kernel, and one for kernels sharing a callee bigger than the smaller of them
    (compiled once, in one process: conv/layout.py's place_k and place_t_k share fill_plane); callees
    Numba inlines (the loss kernels' _label, _row_max, ...) keep their callers apart and count in each
    caller's cost; the queue runs largest first."""
    from graphc.backends.numba.conv import layout
    from graphc.backends.numba.kernels import loss
    small, _ = _fresh_kernel("q")
    f32 = numba.float32
    arr = lambda nd, dt=f32: numba.types.Array(dt, nd, "C")       # noqa: E731
    place = (arr(4), arr(3)) + (numba.int64,) * 7
    jobs = [(small, (arr(1, numba.float64),) * 2, None, None),
            (layout.place_k, place, None, None),
            (layout.place_t_k, (arr(4), arr(2)) + (numba.int64,) * 7, None, None),
            (loss.sce_int_k, (arr(2), arr(1, numba.int64), arr(1)), None, None),
            (loss.sce_grad_int_k, (arr(2), arr(1, numba.int64), arr(1), arr(2)), None, None),
            (layout.place_k, (arr(4, numba.float64), arr(3, numba.float64)) + place[2:], None, None)]
    groups = precompile._groups(jobs)
    kernels = [[j[0] for j in g] for g in groups]
    assert kernels[0] == [layout.place_k, layout.place_t_k, layout.place_k]
    rest = kernels[1:]
    assert all(len(g) == 1 for g in rest) and {g[0] for g in rest} == {small, loss.sce_int_k, loss.sce_grad_int_k}
    costs = [precompile._cost(g) for g in groups]
    assert costs == sorted(costs, reverse=True) and groups[-1][0][0] is small
    own = len(loss.sce_int_k.py_func.__code__.co_code)
    inlined = sum(len(f.py_func.__code__.co_code) for f in (loss._label, loss._row_max, loss._log_sum_exp))
    assert not precompile._callees(loss.sce_int_k.py_func) and precompile._size(loss.sce_int_k.py_func) == own + inlined


def test_queue_keeps_kernels_sharing_a_callee_from_compiling_at_once():
    """A process takes the first group whose callees compiled apart no other process is compiling at
    that moment (it then finds the callee in the disk cache), else the first group."""
    from graphc.backends.numba.conv import layout
    from graphc.backends.numba.kernels import loss, reduce
    grad, rows, other = ([(k, (), None, None)] for k in (loss.sce_grad_int_k, reduce.softmax_rows_k, layout.shift_copies_k))
    q = precompile._Queue([grad, rows, other])                # the first two share softmax_row
    assert q.take("a") is grad
    assert q.take("b") is other                                # not rows while "a" compiles softmax_row
    assert q.take("b") is rows                                 # nothing else left: no waiting
    assert q.take("a") is None and q.take("b") is None
    q = precompile._Queue([grad, rows, other])
    assert q.take("a") is grad and q.take("a") is rows        # "a" is done with grad: no conflict


def test_fused_pool_kernels_share_one_nan_fixup(own_cache):
    """The direct conv+ReLU+maxpool kernels of different shapes call one compiled NaN fix-up (its ints
    are made at run time: literal arguments would compile it once per kernel)."""
    from graphc.backends.numba import conv as nconv
    from graphc.backends.numba.conv.pool_nan import fix_nan_row
    rng = np.random.default_rng(0)
    for H, ps in ((8, 2), (11, 3)):
        x = rng.standard_normal((2, 2, H, H)).astype(np.float32)
        x[0, 0, 1, 1] = np.nan
        w = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
        y, _ = nconv.conv2d_relu_maxpool(x, w, np.zeros(3, np.float32), 1, (1, 1, 1, 1), ps, 2, save_route=True,
                                         strategy="direct")
        assert np.isnan(y).any()
    sigs = [s for s in fix_nan_row.signatures if s[0].dtype == numba.float32]
    assert len(sigs) == 1 and not any(isinstance(t, numba.types.Literal) for t in sigs[0]), sigs


def test_precompile_reports_progress_and_compiles_what_steps_call(capsys, monkeypatch, own_cache):
    monkeypatch.setenv("GRAPHC_COMPILE_WORKERS", "0")
    kernels = [_fresh_kernel("p") for _ in range(2)]
    x, y = np.ones(2), np.zeros(2)
    steps = [lambda k=k: k(x, y) for k, _ in kernels]
    seen = []
    stats = precompile.precompile_steps(steps, progress=lambda d, n: seen.append((d, n)))
    assert stats["kernels"] == 2 and stats["compiled"] == 2 and stats["cached"] == 0
    assert seen == [(0, 2), (1, 2), (2, 2)]
    assert all(k.overloads for k, _ in kernels) and (y == 0).all()
    stats = precompile.precompile_steps(steps, progress="auto")      # all there: nothing said
    assert stats["compiled"] == 0 and capsys.readouterr().err == ""
    kern3, _ = _fresh_kernel("p")
    precompile.precompile_steps([lambda: kern3(x, y)] + steps, progress="auto")
    err = capsys.readouterr().err
    assert "graphc: compiling 1 kernels" in err and "compiled 1 kernels" in err


def test_precompile_compiles_with_the_heap_frozen_and_unfreezes_it(monkeypatch, own_cache):
    """The heap as it was stays out of the collector's scans during a compile (precompile.heap_frozen);
    what the compile makes is still collected, and the heap is unfrozen after."""
    import gc as pygc
    import weakref
    monkeypatch.setenv("GRAPHC_COMPILE_WORKERS", "0")
    (kern, _), x, y = _fresh_kernel("g"), np.ones(2), np.zeros(2)
    real, seen = precompile.compile_for, []

    class Node:
        pass

    def spy(disp, sig, options=None):
        a, b = Node(), Node()
        a.other, b.other = b, a                 # a cycle made during the compile, then dropped
        ref = weakref.ref(a)
        del a, b
        pygc.collect()
        seen.append((pygc.get_freeze_count(), ref() is None))
        return real(disp, sig, options)
    monkeypatch.setattr(precompile, "compile_for", spy)
    assert pygc.get_freeze_count() == 0
    precompile.precompile_steps([lambda: kern(x, y)], progress=False)
    assert len(seen) == 1 and seen[0][0] > 0 and seen[0][1]
    assert pygc.get_freeze_count() == 0 and kern.overloads


def test_a_heap_frozen_by_the_user_stays_frozen(monkeypatch, own_cache):
    import gc as pygc
    monkeypatch.setenv("GRAPHC_COMPILE_WORKERS", "0")
    (kern, _), x, y = _fresh_kernel("u"), np.ones(2), np.zeros(2)
    pygc.freeze()
    try:
        frozen = pygc.get_freeze_count()
        precompile.precompile_steps([lambda: kern(x, y)], progress=False)
        assert pygc.get_freeze_count() > frozen // 2 and kern.overloads      # (frozen objects that died left)
    finally:
        pygc.unfreeze()


def test_a_new_worker_process_freezes_the_heap_of_its_imports():
    import gc as pygc
    import io
    import pickle
    from graphc.backends.numba import compile_worker
    seen, out = [], io.StringIO()
    jobs = io.BytesIO(pickle.dumps("job") + pickle.dumps(None))
    compile_worker.serve(jobs, out, lambda job: seen.append(pygc.get_freeze_count()) or [])
    assert seen and seen[0] > 0 and pygc.get_freeze_count() == 0
    assert out.getvalue().startswith("ok\nstats ")


def test_workers_follow_idle_cpus(monkeypatch):
    monkeypatch.delenv("GRAPHC_COMPILE_WORKERS", raising=False)
    monkeypatch.setattr(precompile.os, "cpu_count", lambda: 4)
    assert precompile.workers_for(10, idle=0.1) == 0          # the other CPUs are busy
    assert precompile.workers_for(10, idle=2.9) == 3
    assert precompile.workers_for(2, idle=3.0) == 0           # too few jobs to pay a start-up
    assert precompile.workers_for(2, idle=3.0, forked=True) == 1      # a fork costs milliseconds
    assert precompile.workers_for(10, idle=0.1, forked=True) == 0     # busy: a worker only splits our share
    assert precompile.workers_for(10, idle=0.5, forked=True) == 1 and precompile.workers_for(10, idle=0.5) == 0
    monkeypatch.setenv("GRAPHC_COMPILE_WORKERS", "1")
    assert precompile.workers_for(10, idle=0.0) == 1


# ------------------------------------------------------------------------------ conv strategy, stats

def test_cold_start_takes_the_static_rule_and_times_only_when_tuning(monkeypatch, tmp_path, own_cache):
    monkeypatch.delenv("GRAPHC_CONV_STRATEGY", raising=False)
    monkeypatch.delenv("GRAPHC_CONV_TUNE", raising=False)
    conv_strategy._CHOICES.clear()

    def no_timing(fns, r):
        raise AssertionError("a cold start must not time conv strategies")
    monkeypatch.setattr(conv_strategy, "_time_candidates", no_timing)
    args = ((8, 3, 9, 9), (4, 3, 3, 3), 1, (0, 0, 0, 0), np.float32)
    assert conv_strategy.choose_conv_strategy(*args, op="conv2d_dw") == "direct"
    assert conv_strategy.choose_conv_strategy((8, 3, 9, 9), (4, 3, 1, 1), 2, (0, 0, 0, 0), np.float32,
                                              op="conv2d_dw") == "im2col"
    assert not (tmp_path / "kernels" / "conv_strategy.json").exists()
    monkeypatch.setattr(conv_strategy, "_time_candidates", lambda fns, r: {"direct": 2.0, "im2col": 1.0})
    with conv_strategy.tuning():
        assert conv_strategy.choose_conv_strategy(*args, op="conv2d_dw") == "im2col"
    assert "im2col" in (tmp_path / "kernels" / "conv_strategy.json").read_text()
    assert conv_strategy.choose_conv_strategy(*args, op="conv2d_dw") == "im2col"     # remembered
    conv_strategy._CHOICES.clear()


def test_compile_recorder_breaks_a_compile_down(own_cache):
    """Wall, CPU, LLVM, typing and the collector's pauses of each compile (a full collection forced at
    the compile's start is counted in it)."""
    import gc as pygc
    from numba.core import event
    kern, _ = _fresh_kernel("r")

    class Collect(event.Listener):
        def on_start(self, ev):
            pygc.collect()

        def on_end(self, ev):
            pass
    rec = CompileRecorder().start()
    with event.install_listener("numba:compile", Collect()):
        kern(np.ones(2), np.zeros(2))
    bd = rec.stop().breakdown()
    assert bd["totals"]["kernels"] == 1 and bd["totals"]["cpu_s"] > 0
    assert bd["kernels"][0]["kernel"] == kern.py_func.__module__ + ".kernel"
    assert 0 < bd["kernels"][0]["gc_s"] < bd["kernels"][0]["wall_s"] and bd["totals"]["gc_s"] == bd["kernels"][0]["gc_s"]
    assert rec._on_gc not in pygc.callbacks
    lines = format_breakdown(bd)
    assert "1 kernels compiled" in lines[0] and "garbage collection" in lines[0] and "conv strategy timing" in lines[1]


def test_thread_count_is_chosen_again_later(monkeypatch):
    """threads="auto": RECHECK_RUNS[0] runs after the first choice the counts are tried again (a busy moment
    during the first runs must not decide for good), and so on for each of RECHECK_RUNS, then never
    again; results stay the reference's."""
    from graphc.backends.numba import executor
    assert executor.RECHECK_RUNS == (20, 200)
    monkeypatch.setattr(executor, "RECHECK_RUNS", (4,))
    g = _small_cnn()
    feeds = {"x": np.ones((2, 2, 10, 10), np.float32), "labels": np.array([0, 1])}
    exe = gc.compile(g, backend="numba", progress=None)
    tried = []
    orig = exe._run_steps
    exe._run_steps = lambda b, threads=None: tried.append(threads) or orig(b, threads)
    outs = [exe.run(feeds)["loss"] for _ in range(30)]
    b = exe._last_binding[3]
    maxt = numba.config.NUMBA_NUM_THREADS
    if maxt > 1:
        settled = next(i for i in range(4, len(tried)) if len(set(tried[i - 4:i])) == 1)   # 4 runs on the choice
        assert {1, maxt} <= set(tried[settled:]), tried                      # then both counts again
        assert len(set(tried[-10:])) == 1 and not b.recheck and not b.thread_trials, tried   # and never again
    ref = gc.compile(g).run(feeds)["loss"]
    np.testing.assert_allclose(outs, [ref] * 30, rtol=1e-5)
