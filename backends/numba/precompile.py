"""Compiling a binding's kernels before its first run: all of them found first, those in the disk cache
loaded, the others compiled at once by this process and worker processes sharing the disk cache,
with a "compiling N kernels" progress line.

1. Discovery: the binding's steps are run once with every Numba dispatcher call (and every explicit
   compile through `compile_for`) on this thread recorded instead of executed: the kernels and their
   argument types, in program order, without computing anything (so garbage in the buffers is
   harmless: no kernel reads it). Parallel calls run on this one thread meanwhile.
2. Each (kernel, types) found is loaded from Numba's disk cache when it is there.
3. The rest is compiled: a queue, largest first (by bytecode), shared by this process and `workers`
   processes, each compiling under the same LLVM options and writing Numba's disk cache (kernels that
   share a big @njit callee go to one process, which compiles it once; kernels sharing a small one are
   not started at once, so the later finds it in the disk cache); this process loads what they
   compiled between its own compilations. A kernel of a failed worker is compiled here. On Linux a worker is forked from
   this process (it has every module loaded and Numba's compiler set up, and finds a kernel by its
   place in the queue); elsewhere, or with ``GRAPHC_COMPILE_FORK=0``, it is a new Python process
   (``python -m graphc.backends.numba.compile_worker``) that rebuilds each kernel from its module or
   its generated file. Compiled machine code does not depend on which process compiled it: results
   are the same either way.

Whatever discovery misses (a step that raised on garbage) is compiled when the real run calls it.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import pickle
import subprocess
import sys
import threading
import time
import warnings
from collections import deque

import numpy as np

from graphc.backends.kernel_cache import LOCK, kernel_cache_dir

MAX_WORKERS = 3
_DISCOVERY = {"thread": None, "found": None}
_DISCOVERY_LOCK = threading.Lock()


# ------------------------------------------------------------------------------------------ options

def options_context(options):
    """The context an options spec compiles under: None, or ("vector", width, predicate) for the
    conv kernels' LLVM loop-vectoriser options (conv/direct.py)."""
    if not options:
        return contextlib.nullcontext()
    from graphc.backends.numba.conv.direct import _codegen_options
    _, width, predicate = options
    return _codegen_options(width, predicate)


def discovering_here() -> bool:
    """Whether a kernel discovery runs on this thread (its dispatcher calls are recorded, not run)."""
    return _DISCOVERY["thread"] == threading.get_ident()


def compile_for(disp, sig, options=None) -> bool:
    """Compiles `disp` for the argument types `sig` (under `options`) unless it has them; during a
    discovery on this thread, records it instead and returns False."""
    sig = tuple(sig)
    if discovering_here():
        _DISCOVERY["found"].setdefault((id(disp), sig), (disp, sig, options))
        return False
    if sig not in disp.overloads:
        with LOCK:
            if sig not in disp.overloads:
                with options_context(options):
                    disp.compile(sig)
    return True


# ------------------------------------------------------------------------------- garbage collector

@contextlib.contextmanager
def heap_frozen():
    """Within the block, the objects that exist on entry are left out of the garbage collector's scans
    (gc.freeze; gc.unfreeze on exit), unless something froze objects already (then nothing changes).
    A compile makes and drops millions of objects; about one young collection in a hundred sets off a
    full one, which walks the whole heap: Numba's modules and registries, the caller's data. In a cold
    mnist_convnet training step each of the two compiling processes made three, 0.35-0.50 s of its
    2.3-3.4 s of CPU; 0.08-0.10 s with the heap frozen (scratch gc.callbacks timers), and the first
    step came 0.19 s sooner (median of 40 alternating pairs' differences; examples/first_step_time.py).
    Young and full collections still run over what the compile made, so its garbage is freed as before
    (the same RSS after a cold resnet18 training step). A worker forked within the block inherits the
    frozen heap (and its collections do not copy the parent's pages)."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


# ---------------------------------------------------------------------------------------- discovery

@contextlib.contextmanager
def discovering():
    """Within the block, dispatcher calls on this thread are recorded (see the module doc); yields the
    {(id, types): (dispatcher, types, options)} found, in call order."""
    from numba import _dispatcher
    from numba.core.dispatcher import Dispatcher
    base_call = _dispatcher.Dispatcher.__call__
    me = threading.get_ident()
    found = {}

    def call(self, *args, **kws):
        if threading.get_ident() != me:
            return base_call(self, *args, **kws)
        sig = tuple(self.typeof_pyval(a) for a in args)
        found.setdefault((id(self), sig), (self, sig, None))
        return None

    with _DISCOVERY_LOCK:                # one discovery at a time (another thread's waits)
        _DISCOVERY.update(thread=me, found=found)
        Dispatcher.__call__ = call
        try:
            with np.errstate(all="ignore"):
                yield found
        finally:
            del Dispatcher.__call__
            _DISCOVERY.update(thread=None, found=None)


def load_cached(disp, sig) -> bool:
    """Whether `disp` has machine code for `sig`, loading it from Numba's disk cache if it is there
    (Dispatcher.compile's cache branch without its compile fallback)."""
    if sig in disp.overloads:
        return True
    try:
        from numba.core.compiler_lock import global_compiler_lock
        with global_compiler_lock:
            cres = disp._cache.load_overload(sig, disp.targetctx)
            if cres is None:
                return False
            disp._cache_hits[sig] += 1
            if not cres.objectmode:
                disp.targetctx.insert_user_function(cres.entry_point, cres.fndesc, [cres.library])
            disp.add_overload(cres)
        return True
    except Exception:          # another Numba's internals: let the caller compile (it loads from cache)
        return False


# ------------------------------------------------------------------------------------------ jobs

def job_spec(disp):
    """How a worker finds this kernel: ("file", path, prefix) for a generated module in the kernel
    cache directory, ("module", module, name) for a kernel of a package module; None: neither."""
    fn = disp.py_func
    module = fn.__module__
    path = getattr(sys.modules.get(module), "__file__", None) or ""
    if os.path.dirname(os.path.abspath(path)) == os.path.abspath(kernel_cache_dir()) and len(module) > 24:
        return ("file", path, module[:-24], fn.__name__)
    if module in sys.modules and getattr(sys.modules[module], fn.__name__, None) is disp:
        return ("module", module, fn.__name__)
    return None


_SIG_COST = 200          # a compilation's fixed cost, in bytes of bytecode (about 0.05 s, as a 200-byte kernel)


def _called(fn):
    """The @njit functions `fn` names as globals."""
    from numba.core.dispatcher import Dispatcher
    g = getattr(fn, "__globals__", {})
    return [g[n] for n in getattr(getattr(fn, "__code__", None), "co_names", ()) if isinstance(g.get(n), Dispatcher)]


def _inlined(disp) -> bool:
    """Whether Numba inlines this @njit function into its callers (inline="always"): compiled within
    each of them, never apart."""
    return disp.targetoptions.get("inline") == "always"


def _callees(fn, found=None):
    """The @njit functions `fn` calls by a global name, and theirs, that are compiled apart: the nested
    compilations a kernel brings (such a callee is compiled once per process, before its caller). An
    inlined one is compiled within its caller (_size counts it) and only looked into."""
    found = {} if found is None else found
    for f in _called(fn):
        if _inlined(f):
            _callees(f.py_func, found)
        elif id(f) not in found:
            found[id(f)] = f
            _callees(f.py_func, found)
    return found


def _size(fn) -> int:
    """The bytecode Numba compiles for `fn`: its own and its inlined callees'."""
    own = len(getattr(getattr(fn, "__code__", None), "co_code", b""))
    return own + sum(_size(f.py_func) for f in _called(fn) if _inlined(f))


def _cost(group):
    """A compile cost for ordering the queue, largest first: the bytecode of the group's kernels (per
    signature, plus a fixed cost each) and of their @njit callees (once). Numba's typing and lowering
    grow with the code; over mnist_convnet's training kernels the seconds follow the bytes, from 0.06 s
    (a 150-byte elementwise kernel) to 1.0 s (a 3,300-byte conv). (A generated file's size, as before,
    put the 0.47 s pool kernel behind library kernels guessed at 2,000 bytes: last in the queue, the
    other process idle meanwhile.)"""
    kernels, callees = set(), {}
    for disp, *_ in group:
        kernels.add(id(disp))
        _callees(disp.py_func, callees)
    return (sum(_size(job[0].py_func) + _SIG_COST for job in group)
            + sum(_size(f.py_func) for k, f in callees.items() if k not in kernels))


def _groups(jobs):
    """Jobs grouped, largest first: all the signatures of a kernel in one group (two processes saving
    entries of one Numba cache index at once could lose one), and two kernels calling one @njit callee
    in one group when compiling that callee twice (once in each process) would cost more than the
    smaller of them: conv/layout.py's place_k and place_t_k share fill_plane, 0.36 s; the fused conv
    kernels, which share a small NaN fix-up, stay apart (the _Queue does not start them at once)."""
    parent = list(range(len(jobs)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i
    own = [_size(job[0].py_func) + _SIG_COST for job in jobs]
    first, users = {}, {}
    for i, job in enumerate(jobs):
        parent[i] = root(first.setdefault(id(job[0]), i))
        for key, f in _callees(job[0].py_func).items():
            users.setdefault(key, (f, []))[1].append(i)
    for f, idx in sorted(users.values(), key=lambda u: -_size(u[0].py_func)):
        for i in idx[1:]:
            ra, rb = root(idx[0]), root(i)
            if ra != rb:
                cost = {r: sum(c for j, c in enumerate(own) if root(j) == r) for r in (ra, rb)}
                if _size(f.py_func) >= min(cost.values()):
                    parent[rb] = ra
    by = {}
    for i, job in enumerate(jobs):
        by.setdefault(root(i), []).append(job)
    return sorted(by.values(), key=lambda g: -_cost(g))


def _cpu_times():
    """(idle, total) jiffies of all CPUs from /proc/stat, or None (not Linux)."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], sum(v[:8])
    except (OSError, ValueError, IndexError):
        return None


def idle_cpus(since, window=0.05):
    """CPUs idle since `since` (a _cpu_times() sample), waiting until `window` seconds have passed;
    None when unknown."""
    if since is None:
        return None
    t_end = since[2] + window
    while True:
        now = _cpu_times()
        if now is None or time.perf_counter() >= t_end:
            break
        time.sleep(max(0.0, t_end - time.perf_counter()))
    if now is None or now[1] <= since[1]:
        return None
    return (os.cpu_count() or 1) * (now[0] - since[0]) / (now[1] - since[1])


def workers_for(n_jobs, idle=None, forked=False) -> int:
    """Worker processes for n_jobs compilations: one per idle CPU (this process keeps one busy), at most
    MAX_WORKERS; ``$GRAPHC_COMPILE_WORKERS`` overrides. None on a machine whose other CPUs are taken: the
    scheduler shares the CPUs between sessions (Linux's autogroups), not processes, so a worker only
    splits this session's share and repeats per-process work (10-12 s against 7-10 s alone under a load
    of 4 on 2 CPUs; with a forked worker, under a load of 3.4-4.2: 4.3-20.8 s against 5.9-9.1 s alone).
    A new Python process costs about 0.7 s CPU of imports and Numba set-up before its first compile:
    none for fewer than 3 jobs or under 0.65 idle CPUs. A `forked` one costs milliseconds: one from 2
    jobs and 0.4 idle CPUs on (a machine whose other CPU is half taken still gives a second process
    about half a CPU more: mnist_convnet's training step with 0.5-0.6 idle CPUs seen, 3.3-3.4 s to the
    first step with a forked worker, 3.8-3.9 s with a new process, 5.6-5.8 s alone)."""
    env = os.environ.get("GRAPHC_COMPILE_WORKERS")
    cpus = os.cpu_count() or 1
    if env not in (None, ""):
        try:
            want = max(0, int(env))
        except ValueError:
            want = 0
    elif n_jobs < (2 if forked else 3):
        want = 0
    else:
        free = cpus - 1 if idle is None else int(idle + (0.6 if forked else 0.35))
        want = min(MAX_WORKERS, free, cpus - 1)
    return max(0, min(want, n_jobs - 1))


class _Progress:
    """Counts finished compilations and reports them: callback(done, total), or a line on stderr."""

    def __init__(self, total, callback, label):
        self.total, self.done, self.callback, self.label = total, 0, callback, label
        self.lock = threading.Lock()
        self.t0 = time.perf_counter()
        callback = None if callback is False else callback
        self.callback = callback
        self.tty = callback == "auto" and _isatty()
        if callback == "auto":
            self._write(f"graphc: compiling {total} kernels{label}...", end="\n" if not self.tty else "")
        elif callable(callback):
            callback(0, total)

    def step(self):
        with self.lock:
            self.done += 1
            if callable(self.callback):
                self.callback(self.done, self.total)
            elif self.tty:
                self._write(f"\rgraphc: compiling {self.total} kernels{self.label}... {self.done}/{self.total}", end="")

    def close(self):
        if self.callback == "auto":
            self._write(f"{chr(13) if self.tty else ''}graphc: compiled {self.total} kernels{self.label} in "
                        f"{time.perf_counter() - self.t0:.1f} s" + (" " * 12 if self.tty else ""))

    @staticmethod
    def _write(text, end="\n"):
        with contextlib.suppress(Exception):
            sys.stderr.write(text + end)
            sys.stderr.flush()


def _isatty():
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


# ------------------------------------------------------------------------------------- compiling

def can_fork() -> bool:
    """Whether compile workers are forked from this process (Linux, unless ``$GRAPHC_COMPILE_FORK`` is
    0, and not under MPI, whose libraries do not survive a fork); else they are started as new Python
    processes."""
    return (sys.platform.startswith("linux") and hasattr(os, "fork") and "mpi4py.MPI" not in sys.modules
            and os.environ.get("GRAPHC_COMPILE_FORK", "1") != "0")


class _Forked:
    """A compile worker forked from this process: it inherits the loaded modules and Numba's
    initialised compiler (a new process spends about 0.7 s CPU on imports and Numba's set-up before its
    first compile; a fork, milliseconds), and finds each kernel by its group's position in `groups`,
    the queue it was forked with, so kernels no other process could rebuild are fine too. It has the
    stdin, stdout, wait and kill of a Popen; `others` are pipe ends of earlier workers, closed in it."""

    def __init__(self, groups, others=()):
        from numba.core.compiler_lock import global_compiler_lock
        jobs_r, jobs_w = os.pipe()
        replies_r, replies_w = os.pipe()
        try:
            # no other thread of this process is inside a compile; Python 3.12+ warns of forking with
            # threads (BLAS's, a thread pool's): the child only compiles, it takes none of their locks
            with LOCK, global_compiler_lock, warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
                if pid == 0:                    # the child: never returns
                    _forked_main(groups, jobs_r, replies_w, [jobs_w, replies_r, *others])
        except OSError:                         # (no memory for the fork): the caller starts new processes
            for fd in (jobs_r, jobs_w, replies_r, replies_w):
                os.close(fd)
            raise
        os.close(jobs_r)
        os.close(replies_w)
        self.pid, self.returncode = pid, None
        self.stdin, self.stdout = os.fdopen(jobs_w, "wb"), os.fdopen(replies_r, "rb")

    def fds(self):
        return [self.stdin.fileno(), self.stdout.fileno()]

    def wait(self, timeout=None):
        t_end = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            pid, status = os.waitpid(self.pid, 0 if t_end is None else os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
            elif time.monotonic() > t_end:
                raise TimeoutError(f"compile worker {self.pid} did not exit")
            else:
                time.sleep(0.01)
        return self.returncode

    def kill(self):
        with contextlib.suppress(OSError):
            os.kill(self.pid, 9)
        with contextlib.suppress(Exception):
            self.wait(5)


def _forked_main(groups, jobs_fd, replies_fd, close):
    """A forked worker's life: the protocol of compile_worker.py, with group positions for jobs. It
    writes nothing to this process's stdout or stderr and leaves by os._exit (no atexit handlers, no
    second flush of buffers inherited from the parent)."""
    code = 1
    try:
        for fd in close:
            with contextlib.suppress(OSError):
                os.close(fd)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        sys.stdout = sys.stderr = open(os.devnull, "w", encoding="utf-8")
        from graphc.backends.numba.compile_worker import serve
        with os.fdopen(jobs_fd, "rb") as jobs, os.fdopen(replies_fd, "w", encoding="utf-8") as out:
            serve(jobs, out, lambda k: [job[:3] for job in groups[k]])
        code = 0
    finally:
        os._exit(code)


class _Queue:
    """The groups to compile, largest first, shared by this process and the workers' feeding threads.
    Each takes the first group that calls no @njit callee (compiled apart) of the group another process
    is compiling at that moment, else the first group: a callee compiled meanwhile comes from the disk
    cache (10 ms) instead of being compiled again (mnist_convnet's two fused conv+pool kernels share
    the 0.15 s NaN fix-up, conv/pool_nan.py: started together, each process compiled it)."""

    def __init__(self, groups):
        self.groups = deque(groups)
        self.callees = {id(g): {k for job in g for k in _callees(job[0].py_func)} for g in self.groups}
        self.lock = threading.Lock()
        self.busy = {}                      # taker -> the callees of the group it is compiling

    def __iter__(self):
        return iter(list(self.groups))

    def take(self, who):
        """The next group for `who` (None: none left); `who` is done with its previous one."""
        with self.lock:
            self.busy.pop(who, None)
            if not self.groups:
                return None
            others = set().union(*self.busy.values())
            group = next((g for g in self.groups if not self.callees[id(g)] & others), self.groups[0])
            self.groups.remove(group)
            self.busy[who] = self.callees[id(group)]
            return group


class _WorkerProc:
    """A compile worker process fed one job at a time from the shared _Queue by a thread here: a new
    Python process (compile_worker.py), or `proc`, a _Forked one, which is sent the position of each
    group in `positions` instead of where its kernels are."""

    def __init__(self, queue, progress, results, proc=None, positions=None):
        self.queue, self.progress, self.results = queue, progress, results
        self.positions = positions
        self.proc = proc or subprocess.Popen([sys.executable, "-m", "graphc.backends.numba.compile_worker"],
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                             stderr=subprocess.DEVNULL, env=dict(os.environ))
        self.thread = threading.Thread(target=self._feed, daemon=True)
        self.thread.start()

    def _message(self, group):
        if group is None:
            return None
        if self.positions is not None:
            return self.positions[id(group)]
        return [(j[1], j[3], j[2]) for j in group]

    def _feed(self):
        try:
            while True:
                group = self.queue.take(self)
                pickle.dump(self._message(group), self.proc.stdin)
                self.proc.stdin.flush()
                if group is None:
                    break
                reply = self.proc.stdout.readline().decode(errors="replace").split(maxsplit=1)
                ok = bool(reply) and reply[0] == "ok"
                self.results.extend((job, ok) for job in group)
                if not ok:
                    break                          # a failed worker takes no more jobs
                for _ in group:
                    self.progress.step()
        except (OSError, ValueError, EOFError):
            pass
        finally:
            with contextlib.suppress(Exception):
                self.proc.stdin.close()

    def join(self):
        self.thread.join()
        try:
            rest = self.proc.stdout.read().decode(errors="replace")
            self.proc.wait(timeout=60)
        except Exception:
            self.proc.kill()
            rest = ""
        finally:
            with contextlib.suppress(Exception):
                self.proc.stdout.close()
        return rest


def _start_workers(n, queue, prog, results):
    """n workers on the queue: forked from this process where it can (all forked before any feeding
    thread starts), else new Python processes."""
    if not n:
        return []
    if can_fork():
        # Numba's implementations (and with them SciPy's BLAS, kernel_cache.load_scipy_blas_before_numba)
        # loaded here once, inherited by every fork (a cache load no longer loads them:
        # kernel_cache._runtime_symbols_ready); else each process would, 0.3-0.4 s apiece
        from numba.core.registry import cpu_target
        cpu_target.target_context.refresh()
        groups = list(queue)
        positions = {id(g): k for k, g in enumerate(groups)}
        forked = []
        with contextlib.suppress(OSError):          # a fork refused: new processes for the rest
            while len(forked) < n:
                forked.append(_Forked(groups, [fd for f in forked for fd in f.fds()]))
        return [_WorkerProc(queue, prog, results, proc=f, positions=positions) for f in forked] + \
            [_WorkerProc(queue, prog, results) for _ in range(n - len(forked))]
    return [_WorkerProc(queue, prog, results) for _ in range(n)]


def compile_jobs(jobs, progress="auto", label="", idle=None):
    """Compiles [(disp, sig, options, spec)] here and in worker processes (one per idle CPU), largest
    kernels first from one queue; returns stats. What a worker compiled is loaded here between this
    process's own compilations (about 10 ms a kernel), not all after the last one."""
    from graphc.backends.numba.compile_stats import add_remote
    groups = _groups(jobs)
    local_only = [g for g in groups if any(job[3] is None for job in g)]     # no worker can find these
    queue = _Queue(g for g in groups if all(job[3] is not None for job in g))
    nworkers = workers_for(len(jobs), idle, forked=can_fork())
    prog = _Progress(len(jobs), progress, label + (f" in {nworkers + 1} processes" if nworkers else ""))
    results, failed, taken = [], [], [0]      # results: (job, ok), appended by the workers' threads
    procs = _start_workers(nworkers, queue, prog, results)

    def load_results():
        while taken[0] < len(results):
            job, ok = results[taken[0]]
            taken[0] += 1
            if not (ok and load_cached(job[0], job[1])):
                failed.append(job)
    while True:
        group = local_only.pop(0) if local_only else queue.take(None)
        if group is None:
            break
        for job in group:
            compile_for(job[0], job[1], job[2])
            prog.step()
        load_results()
    for p in procs:
        for line in p.join().splitlines():
            if line.startswith("stats "):
                with contextlib.suppress(ValueError):
                    add_remote(json.loads(line[6:]))
    load_results()
    for job in failed:                  # a worker failed it (or its cache entry did not load): here
        compile_for(job[0], job[1], job[2])
        prog.step()
    prog.close()
    return {"compiled": len(jobs), "workers": nworkers, "redone_here": len(failed)}


def precompile_steps(steps, progress="auto", label=""):
    """Discovers the kernels `steps` call (callables run once in discovery, fallbacks skipped), loads
    those in the disk cache and compiles the rest in parallel, with the heap as it was frozen
    (heap_frozen). Returns {"kernels", "cached", "compiled", "workers", "seconds", ...}."""
    with heap_frozen():
        return _precompile_steps(steps, progress, label)


def _precompile_steps(steps, progress, label):
    t0 = time.perf_counter()
    cpu0 = _cpu_times()
    cpu0 = None if cpu0 is None else cpu0 + (t0,)
    with discovering() as found:
        for f in steps:
            if getattr(f, "fallback", False):
                continue
            try:
                f()
            except Exception:           # garbage in a buffer upset a host-side step: the rest of it
                pass                    # compiles when the real run gets there
    t1 = time.perf_counter()
    jobs, cached = [], 0
    for disp, sig, options in found.values():
        if load_cached(disp, sig):
            cached += 1
        else:
            jobs.append((disp, sig, options, job_spec(disp)))
    t2 = time.perf_counter()
    stats = {"kernels": len(found), "cached": cached, "compiled": 0, "workers": 0,
             "discovery_s": round(t1 - t0, 4), "cache_s": round(t2 - t1, 4)}
    if jobs:
        idle = idle_cpus(cpu0) if len(jobs) >= 2 else None
        stats.update(compile_jobs(jobs, progress, label, idle))
        stats["idle_cpus"] = None if idle is None else round(idle, 2)
    stats["seconds"] = time.perf_counter() - t0
    return stats
