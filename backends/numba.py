"""The numba CPU backend: lowers a scheduled, fused, memory-planned graph to @njit kernels.

    exe = gc.compile(graph, backend="numba")                      # inference: exe.run(feeds)
    tr = gc.compile(graph, backend="numba", optimizer=gc.optim.SGD(0.1))
    tr.step(feeds)     # forward + backward + update in one call; parameters updated in place

How a run works. For each batch size (and each set of wanted values) the executable *binds* the graph
once: it allocates the memory plan's slots (passes/memory.py), makes every value a view of its slot (or
of the state it updates in place, or of its input for reshapes), resolves every kernel and its argument
arrays, and keeps the list of kernel calls. A run is then a loop over prebound calls; the only
per-run work is feeding the inputs. OpenBLAS is held to one thread during a run (threadpoolctl's
controller, set directly) because its spinning threads beside Numba's workers cost 2.4-2.9x
(PERF_NOTES.md).

Kernels, by op and fused pattern (``KERNELS`` below prints as this table; "fallback" = the op table's
reference implementation, run on the host):

    conv, conv_relu                   numba_conv.conv2d (generated per shape, direct or im2col+GEMM,
                                      chosen by measurement and remembered; relu in the epilogue)
    conv_relu_maxpool                 numba_conv.conv2d_relu_maxpool (save_route in training)
    conv_dx / conv_dw                 numba_conv.conv2d_dx / conv2d_dw
    route_relu                        route + ReLU mask (+ bias gradient) in one pass, generated per
                                      pool geometry (numba_kernels.route_scatter_source)
    elementwise groups and every      one generated @njit loop nest per group, written from the ops'
      elementwise op                  ``scalar`` expressions into a .py file in the kernel cache dir
    maxpool / maxpool_route /         generated per pool geometry (window loops unrolled, argmax as
      maxpool_argmax / route_scatter  branch-free selects; 10x faster than a generic-window kernel)
    avgpool / avgpool_spread /        numba_kernels
      global_avgpool(_spread)
    sum / mean / sum_to               numba_kernels.sum4 (any axes, float64 accumulation)
    softmax (last axis), softmax_cross_entropy(+grad),
      cross_entropy(+grad)            numba_kernels
    mse(+grad), bce_with_sigmoid      generated from the op table's loss_term / grad_term (each formula
      (+grad)                         written once, in graphc.ops.loss)
    matmul                            numpy.matmul into the planned buffer (OpenBLAS sgemm/dgemm;
                                      Numba's own np.dot would call the same BLAS through SciPy)
    reshape, reshape_like,            no kernel: views of their input's buffer
      identity, copy
    transpose, concat, slice,         numpy copies into the planned buffer (data movement, no
      unslice, pad2d, crop2d,         arithmetic: numpy's copy loops are as fast as a kernel)
      expand_like, broadcast_like
    dropout_mask                      numpy's seeded generator on the host (the same draws as the
                                      reference, so the same mask in every backend), thresholded
                                      by numba_kernels.dropout_mask_k
    maxpool_gather, softmax on a      fallback
      non-last axis, any other op
    (the CNN op set, until their      batchnorm, bn_running_stat, is_training, lrn, global_maxpool;
      kernels are written)            conv / conv_dx / conv_dw with groups > 1 or dilation > 1;
                                      pad2d / crop2d in reflect or edge mode; maxpool_route with a
                                      window over 64 taps (global max pool's gradient)

Compile times: ``exe.compile_times`` holds ``lower_s`` (building the executable) and, per binding
(batch size and wanted values), ``bind_s`` (memory, kernel sources generated or found on disk) and
``first_run_s`` (the first call compiles — or loads from Numba's disk cache — every kernel it meets),
and the thread count chosen (``threads="auto"``: measured, see _choose_threads). ``exe.precompile(batch)``
binds and runs once on zero feeds without changing any state, so compile time can be measured apart
from running.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import math
import os
import re
import sys
import tempfile
import threading
import time

import numba
import numpy as np

from graphc import ops as optable
from graphc import shapes
from graphc.errors import BackendError, GraphError
from graphc.executable import Executable, RunContext
from graphc.ops.conv import is_plain as is_plain_conv

from graphc.backends import numba_kernels as K

try:                                   # the fast conv kernels (another file, another engineer)
    from graphc.backends import numba_conv as _conv
    _CONV_ERROR = None
except Exception as _e:                # pragma: no cover - only while numba_conv.py is missing/broken
    _conv = None
    _CONV_ERROR = f"{type(_e).__name__}: {_e}"

_PLACEHOLDERS = {
    "conv2d": K.conv2d_fallback, "conv2d_relu_maxpool": K.conv2d_relu_maxpool_fallback,
    "maxpool_route_backward": K.maxpool_route_backward_fallback,
    "conv2d_dx": K.conv2d_dx_fallback, "conv2d_dw": K.conv2d_dw_fallback,
}


_RAW_NUM_THREADS = []


def _num_threads():
    """numba.get_num_threads() without its Python wrapper (0.7 us -> 0.15 us; called by every conv
    step) once Numba's thread pool is up."""
    if _RAW_NUM_THREADS:
        return _RAW_NUM_THREADS[0]()
    t = numba.get_num_threads()          # launches the pool
    raw = getattr(getattr(numba.np.ufunc, "parallel", None), "_get_num_threads", None)
    if callable(raw):
        try:
            if raw() == t:
                _RAW_NUM_THREADS.append(raw)
        except Exception:                # pragma: no cover - another Numba: keep the public call
            pass
    return t


def conv_fn(name, stride=(1, 1), geometry=None):
    """numba_conv's function `name` for this stride, or the slow placeholder when that module is not
    available (or takes no such stride: numba_conv takes one int stride for both axes). The returned
    callable takes the stride as graphc's (sh, sw) pair, in numba_conv's argument order.

    geometry = (x_shape, w_shape, pads, dtype, pool): the strategy (direct / im2col) is then looked up
    once per Numba thread count with numba_conv.choose_conv_strategy and passed explicitly, so a call
    skips numba_conv's per-call strategy lookup (~0.1-0.5 ms measured here: it asks LLVM for the host
    CPU name each time)."""
    f = getattr(_conv, name, None) if _conv is not None else None
    if f is None or stride[0] != stride[1]:
        return _PLACEHOLDERS[name]
    s = int(stride[0])
    choose = getattr(_conv, "choose_conv_strategy", None)
    if geometry is not None and choose is not None:
        x_shape, w_shape, pads, dtype, pool = geometry
        chosen = {}

        def strat():
            t = _num_threads()
            got = chosen.get(t)
            if got is None:
                got = chosen[t] = choose(x_shape, w_shape, s, pads, dtype, op=name, pool=pool)
            return got
    else:
        def strat():
            return None
    if name in ("conv2d", "conv2d_relu_maxpool"):
        g = lambda x, w, b, st, *a, **k: f(x, w, b, s, *a, strategy=strat(), **k)   # noqa: E731
    elif name == "conv2d_dx":
        g = lambda dy, w, st, *a: f(dy, w, s, *a, strategy=strat())                 # noqa: E731
    elif name == "conv2d_dw":
        g = lambda x, dy, st, *a: f(x, dy, s, *a, strategy=strat())                 # noqa: E731
    else:
        return f
    g.strategy = strat
    return g


def _conv_step(f, fast, R, xi, wi, bi, outs, flag, post=None):
    """A forward conv step: the prebound direct kernel (numba_conv.bind_direct_fwd) writing into the
    planned buffers `outs` = (y, route) when the strategy for the current thread count is direct,
    else f (which returns new arrays). outs: [(value index, array)] (route: a dummy when unsaved)."""
    strat = getattr(f, "strategy", None)
    (oy, y), (orr, route) = outs
    if fast is None or strat is None:
        return None
    if bi is None:
        def step():
            if strat() == "direct":
                fast(R[xi], R[wi], None, y, route, flag)
                R[oy] = y
                if orr is not None:
                    R[orr] = route
            else:
                post(f)
    else:
        def step():
            if strat() == "direct":
                fast(R[xi], R[wi], R[bi], y, route, flag)
                R[oy] = y
                if orr is not None:
                    R[orr] = route
            else:
                post(f)
    return step


_NO_ROUTE = np.empty((1, 1, 1, 1), np.int32)


def _bind_direct(dtype, x_shape, w_shape, has_b, st, pads, epi, pool=None):
    binder = getattr(_conv, "bind_direct_fwd", None) if _conv is not None else None
    if binder is None or st[0] != st[1]:
        return None
    try:
        return binder(x_shape, w_shape, has_b, st[0], pads, dtype, epi, pool or (0, 0))
    except Exception:          # pragma: no cover - the generic path reports the real problem
        return None


KERNELS = {
    "conv": "numba_conv.conv2d", "conv_dx": "numba_conv.conv2d_dx", "conv_dw": "numba_conv.conv2d_dw",
    "fused:conv_relu": "numba_conv.conv2d(relu=True)",
    "fused:conv_relu_maxpool": "numba_conv.conv2d_relu_maxpool",
    "fused:route_relu": "generated per window (numba_kernels.route_scatter_source, with db)",
    "fused:elementwise": "generated elementwise",
    "maxpool": "generated per window (numba_kernels.maxpool_source)",
    "maxpool_argmax": "generated per window (numba_kernels.maxpool_source)",
    "maxpool_route": "generated per window (numba_kernels.maxpool_route_source)",
    "route_scatter": "generated per window (numba_kernels.route_scatter_source)",
    "avgpool": "numba_kernels.avgpool_k", "avgpool_spread": "numba_kernels.avgpool_spread_k",
    "global_avgpool": "numba_kernels.gap_k", "global_avgpool_spread": "numba_kernels.gap_spread_k",
    "sum": "numba_kernels.sum4", "mean": "numba_kernels.sum4", "sum_to": "numba_kernels.sum4",
    "softmax": "numba_kernels.softmax_rows_k (last axis; other axes: fallback)",
    "softmax_cross_entropy": "numba_kernels.sce_*_k", "softmax_ce_grad": "numba_kernels.sce_grad_*_k",
    "cross_entropy": "numba_kernels.ce_*_k", "cross_entropy_grad": "numba_kernels.ce_grad_*_k",
    "mse": "generated from the op's loss_term", "mse_grad": "generated from the op's grad_term",
    "bce_with_sigmoid": "generated from the op's loss_term", "bce_grad": "generated from the op's grad_term",
    "matmul": "numpy.matmul (BLAS)",
    "reshape": "view", "reshape_like": "view", "identity": "view", "copy": "view", "getitem": "view",
    "transpose": "numpy copy", "concat": "numpy copy", "slice": "numpy copy", "unslice": "numpy copy",
    "pad2d": "numpy copy", "crop2d": "numpy copy", "expand_like": "numpy copy",
    "broadcast_like": "numpy copy",
    "dropout_mask": "host RNG (numpy, as the reference) + numba_kernels.dropout_mask_k",
    "maxpool_gather": "fallback",
}


def kernel_table():
    """[(op or fused pattern, kernel)] for every op of the table and every fused pattern."""
    rows = []
    for op in sorted(optable.OPS):
        d = optable.OPS[op]
        if d.source or op == "fused":
            continue
        if KERNELS.get(op) == "view":
            rows.append((op, "view"))
        elif d.scalar is not None:
            rows.append((op, "generated elementwise"))
        else:
            rows.append((op, KERNELS.get(op, "fallback")))
    for p in ("conv_relu", "conv_relu_maxpool", "route_relu", "elementwise"):
        rows.append((f"fused:{p}", KERNELS[f"fused:{p}"]))
    return rows


# ================================================================================ kernel cache dir

def kernel_cache_dir() -> str:
    """Where generated kernels (and, through Numba, their machine code) live: $GRAPHC_CACHE_DIR or
    ~/.cache/graphc/kernels (shared with numba_conv)."""
    if _conv is not None and hasattr(_conv, "kernel_cache_dir"):
        return _conv.kernel_cache_dir()
    d = os.environ.get("GRAPHC_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "graphc", "kernels")
    os.makedirs(d, exist_ok=True)
    return d


_LOCK = threading.RLock()
_MODULES: dict = {}


def _write_once(path, text):
    """Atomic write; a file already holding `text` is left alone (its mtime keys Numba's cache)."""
    try:
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return
    except FileNotFoundError:
        pass
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".py")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def load_generated(src, prefix="graphc_ew_"):
    """Writes `src` (a module defining `kernel`) into the kernel cache dir under a name hashed from
    its text, imports it and returns its `kernel` dispatcher. Exec'd strings cannot be cached by
    Numba; a real file can, so a second process loads machine code instead of compiling."""
    name = prefix + hashlib.sha256(src.encode()).hexdigest()[:24]
    k = _MODULES.get(name)
    if k is not None:
        return k
    with _LOCK:
        if name in _MODULES:
            return _MODULES[name]
        path = os.path.join(kernel_cache_dir(), name + ".py")
        try:
            _write_once(path, src)
        except OSError as e:
            raise BackendError(f"cannot write generated kernel {path!r}: {e}; set GRAPHC_CACHE_DIR "
                               "to a writable directory") from e
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod          # Numba finds the module by name when loading cached code
        spec.loader.exec_module(mod)
        _MODULES[name] = mod.kernel
        return mod.kernel


# ============================================================================ elementwise codegen

_FASTMATH = "{'nsz', 'arcp', 'contract', 'afn', 'reassoc'}"
_LIT = re.compile(r"(?<![\w.])(\d+\.\d*(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+)(?![\w.])")
_ARG = re.compile(r"\ba(\d+)\b")


def _literal(v):
    v = float(v)
    if math.isnan(v):
        return "np.nan"
    if math.isinf(v):
        return "np.inf" if v > 0 else "-np.inf"
    return repr(v)


def elementwise_source(body, n_in, results, rank, in_modes, inline, dtype, parallel):
    """Python source of one elementwise kernel.

    body: [(op, [("in", k) | ("body", j), ...], attrs)] (attrs optional: the values of the op's {attr}
    placeholders); results: body indices written to outputs o0, o1...;
    rank: loop depth after merging dims; in_modes[k]: None (inlined constant), "s" (one value,
    loaded once) or a tuple of bools per loop dim (True = the input runs along that dim);
    inline[k]: the inlined constant's value. dtype: "float32"/"float64"."""
    lines = ["# Generated by graphc.backends.numba (elementwise group) -- do not edit;",
             "# the file name is a hash of this text.", "import math", "import numpy as np",
             "from numba import njit, prange", "", f"_T = np.{dtype}", "",
             f"@njit(parallel={parallel}, fastmath={_FASTMATH}, cache=True, nogil=True, error_model='numpy')",
             "def kernel(" + ", ".join([f"o{r}" for r in range(len(results))] +
                                      [f"i{k}" for k in range(n_in) if in_modes[k] is not None]) + "):"]
    consts = {}

    def const(text):
        if text not in consts:
            consts[text] = f"c{len(consts)}"
        return consts[text]

    pre = []
    for k in range(n_in):
        if in_modes[k] is None:
            pre.append(f"    a{k}_ = {const(_literal(inline[k]))}")
        elif in_modes[k] == "s":
            pre.append(f"    a{k}_ = i{k}[0]")
    idx_all = [f"d{r}" for r in range(rank)]
    loads = []
    for k in range(n_in):
        m = in_modes[k]
        if m is not None and m != "s":
            idx = ", ".join(idx_all[r] if m[r] else "0" for r in range(rank))
            loads.append(f"a{k}_ = i{k}[{idx}]")
    exprs = []
    for j, (op, refs, *attrs) in enumerate(body):
        expr = optable.scalar_expression(op, attrs[0] if attrs else {}, _literal)
        names = [f"a{i}_" if kind == "in" else f"t{i}" for kind, i in refs]
        expr = _ARG.sub(lambda m: "(" + names[int(m.group(1))] + ")", expr)
        expr = _LIT.sub(lambda m: const(m.group(1)), expr)
        exprs.append(f"t{j} = {expr}")
    idx = ", ".join(idx_all)
    stores = [f"o{r}[{idx}] = t{j}" for r, j in enumerate(results)]
    head = [f"    {name} = _T({text})" for text, name in consts.items()] + pre
    lines += head
    lines += [f"    n{r} = o0.shape[{r}]" for r in range(rank)]
    inner = loads + exprs + stores
    if parallel and rank == 1:
        lines += ["    nch = (n0 + 4095) // 4096", "    for ch in prange(nch):",
                  "        for d0 in range(ch * 4096, min(n0, ch * 4096 + 4096)):"]
        lines += ["            " + s for s in inner]
    else:
        ind = "    "
        for r in range(rank):
            rng = "prange" if (parallel and r == 0) else "range"
            lines.append(f"{ind}for d{r} in {rng}(n{r}):")
            ind += "    "
        lines += [ind + s for s in inner]
    return "\n".join(lines) + "\n"


def collapse(out_shape, in_shapes):
    """Merges the loop dims of an elementwise group. Returns (loop shape, [per input: "s" or a tuple of
    bools (runs along each loop dim)]) with inputs' own shapes for the loop ((1 where broadcast)."""
    dims, flags = shapes.merge_loop_dims(out_shape, in_shapes)
    modes = []
    for k in range(len(in_shapes)):
        runs = tuple(fl[k] for fl in flags)
        modes.append("s" if not any(runs) else runs)
    return tuple(dims), modes


# ============================================================================== the executable

class _Bound:
    """One binding: value arrays (R), the kernel calls in order, and what to return."""

    def __init__(self):
        self.R = []
        self.ix = {}
        self.steps = []          # (node name, callable)
        self.feed_ix = []        # (input name, index)
        self.want_ix = []
        self.copy_back = []      # (state name, value index) for updates not done in place
        self.bind_s = 0.0
        self.first_run_s = None
        self.threads = None
        self.thread_times = {}


def _aligned_empty(nbytes, align=64):
    raw = np.empty(nbytes + align, np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off:off + nbytes]


class _Blas:
    """OpenBLAS (or another BLAS) held to n threads around a run; restored afterwards."""

    def __init__(self, threads):
        self.threads = threads
        self.libs = []
        if threads is None:
            return
        try:
            from threadpoolctl import ThreadpoolController
            self.libs = [lc for lc in ThreadpoolController().lib_controllers if lc.user_api == "blas"]
        except Exception:      # pragma: no cover - threadpoolctl missing: nothing to limit
            self.libs = []

    def __enter__(self):
        self.saved = [lc.get_num_threads() for lc in self.libs]
        for lc in self.libs:
            lc.set_num_threads(self.threads)

    def __exit__(self, *a):
        for lc, n in zip(self.libs, self.saved):
            lc.set_num_threads(n)


class NumbaExecutable(Executable):
    backend = "numba"

    def __init__(self, graph, dtype=None, pipeline=None, blas_threads=1, parallel_min=K.PARALLEL_MIN,
                 threads="auto", verbose=False, **options):
        t0 = time.perf_counter()
        super().__init__(graph, dtype, pipeline)
        if self.dtype not in (np.float32, np.float64):
            raise BackendError(f"the numba backend runs float32 or float64, not {self.dtype}")
        self.schedule = getattr(graph, "schedule", None) or graph.topo()
        self.consts = {n: np.ascontiguousarray(self._cast(np.asarray(graph.nx.nodes[n]["attrs"]["value"]),
                                                         graph.nx.nodes[n]["dtype"]))
                       for n in self.schedule if graph.nx.nodes[n]["op"] == "const"}
        self.parallel_min = parallel_min
        self.threads = threads
        self.verbose = verbose
        self.options = options
        self._blas = _Blas(blas_threads)
        self._bindings = {}
        self._last_binding = None
        self._ctx = RunContext({}, False, 0)
        self._bound_state = {}
        self._fused_away = {b["name"] for n, d in graph.nx.nodes(data=True) if d["op"] == "fused"
                            for b in d["attrs"]["body"] if b["name"] not in graph.nx} | \
                           {r for n, d in graph.nx.nodes(data=True) if d["op"] == "fused"
                            for r in d["attrs"].get("replaces", ()) if r not in graph.nx}
        self._lower_s = 0.0
        self.conv_module = "numba_conv" if _conv is not None else f"placeholders ({_CONV_ERROR})"
        self._lower_s = time.perf_counter() - t0

    @property
    def compile_times(self):
        """{"lower_s": building the executable, "bindings": [{batch env, want, bind_s, first_run_s
        (compiling or loading every kernel), threads, thread_ms}]} for every binding made so far."""
        rows = []
        for (env, want, inplace), b in self._bindings.items():
            rows.append({"env": dict(env), "step": inplace, "outputs": list(want), "bind_s": b.bind_s,
                         "first_run_s": b.first_run_s, "threads": b.threads, "thread_ms": dict(b.thread_times)})
        return {"lower_s": self._lower_s, "bindings": rows}

    # ------------------------------------------------------------------ state identity
    def _sync_state(self):
        """Bindings hold the state arrays themselves (updates are written in place); if a user replaced
        an entry of exe.state, its values are copied into the bound array."""
        for n, arr in self._bound_state.items():
            cur = self.state[n]
            if cur is not arr:
                np.copyto(arr, np.asarray(cur, dtype=arr.dtype).reshape(arr.shape))
                self.state[n] = arr

    def load_state_dict(self, d):
        super().load_state_dict(d)
        self._sync_state()

    # ------------------------------------------------------------------ binding
    def _plan(self, want, inplace):
        from graphc.passes.memory import plan_for
        return plan_for(self.graph, want, inplace, self.schedule)

    def _binding(self, env, want, inplace):
        last = self._last_binding
        if last is not None and last[0] == env and last[1] == want and last[2] == inplace:
            return last[3]                  # the common case: the same call as last time
        key = (tuple(sorted(env.items())), tuple(want), inplace)
        b = self._bindings.get(key)
        if b is None:
            t0 = time.perf_counter()
            b = self._bind(env, want, inplace)
            b.bind_s = time.perf_counter() - t0
            self._bindings[key] = b
        self._last_binding = (dict(env), list(want), inplace, b)
        return b

    def _bind(self, env, want, inplace):
        g = self.graph
        nodes = g.nx.nodes
        plan = self._plan(want, inplace)
        b = _Bound()
        b.plan, b.env = plan, dict(env)
        itemsize = self.dtype.itemsize
        slot_sizes = plan.slot_nbytes(env, itemsize)
        slot_bufs = {}
        dynamic = set()

        def index(name):
            if name not in b.ix:
                b.ix[name] = len(b.R)
                b.R.append(None)
            return b.ix[name]

        def shape_of(name):
            return shapes.resolve(nodes[name]["shape"], env)

        def np_dtype(name):
            dt = nodes[name]["dtype"]
            return self.dtype if dt.startswith("float") else np.dtype(dt)

        def out_array(name):
            """The array a kernel writes `name` into (planned slot view, or the updated state)."""
            kind = plan.kind.get(name)
            shp, dt = shape_of(name), np_dtype(name)
            if kind is None or name not in plan.slot_of and kind != "state":
                # a value the plan does not hold (an unused output of a multi-output kernel)
                nbytes = int(np.prod(shp, dtype=np.int64)) * dt.itemsize
                arr = _aligned_empty(max(nbytes, 1))[:nbytes].view(dt).reshape(shp)
            elif kind == "state":
                arr = self.state[plan.inplace[name]]
            else:
                k = plan.slot_of[name]
                if k not in slot_bufs:
                    slot_bufs[k] = _aligned_empty(max(slot_sizes[k], 1))
                nbytes = int(np.prod(shp, dtype=np.int64)) * dt.itemsize
                arr = slot_bufs[k][:nbytes].view(dt).reshape(shp)
            b.R[index(name)] = arr
            return arr

        # sources
        for n in [n for n in self.schedule if n in plan.kind and plan.kind[n] in ("input", "param", "const")]:
            i = index(n)
            op = nodes[n]["op"]
            if op == "input":
                b.feed_ix.append((n, i))
                dynamic.add(n)
            elif op == "param":
                b.R[i] = self.state[n]
                self._bound_state[n] = self.state[n]
            else:
                b.R[i] = self.consts[n]
        self._current = b
        for n in plan.program:
            nd = nodes[n]
            op = nd["op"]
            kind = plan.kind[n]
            if op == "getitem":
                continue                    # written by its fused node
            if kind == "alias":
                src = nd["inputs"][0]
                i, si, shp = index(n), index(src), shape_of(n)
                if src in dynamic:
                    dynamic.add(n)
                    b.steps.append((n, _alias_step(b.R, i, si, shp)))
                else:
                    b.R[i] = b.R[si].reshape(shp)
                continue
            step, outs_dynamic = self._lower(n, nd, b, index, shape_of, np_dtype, out_array, dynamic)
            if outs_dynamic:
                dynamic.update(outs_dynamic)
            b.steps.append((n, step))
        for w in want:
            b.want_ix.append((w, index(w)))
        for s, u in self.graph.updates.items():
            if u in b.ix and u in set(want) and plan.kind.get(u) != "state":
                b.copy_back.append((s, b.ix[u]))
        b.dynamic = dynamic
        return b

    # ------------------------------------------------------------------ lowering of one node
    def _lower(self, n, nd, b, index, shape_of, np_dtype, out_array, dynamic):
        """Returns (callable, names of values it produces dynamically or None)."""
        op, attrs, ins = nd["op"], nd["attrs"], nd["inputs"]
        R = b.R
        ii = [index(i) for i in ins]
        if op == "fused":
            return self._lower_fused(n, nd, b, index, shape_of, np_dtype, out_array, dynamic)
        if optable.OPS[op].scalar is not None:
            body = [(op, [("in", k) for k in range(len(ins))], attrs)]
            return self._lower_elementwise(n, [n], body, list(ins), [0], b, index, shape_of, out_array, dynamic), None
        lw = _LOWER.get(op)
        if lw is not None:
            r = lw(self, n, nd, R, ii, index, shape_of, np_dtype, out_array, dynamic)
            if r is not None:
                return r
        return self._fallback(n, nd, R, ii, index, np_dtype), {n}

    def _fallback(self, n, nd, R, ii, index, np_dtype):
        opdef = optable.OPS[nd["op"]]
        attrs = nd["attrs"]
        o = index(n)
        shape = nd["shape"]
        ctx = self._ctx
        fdt = self.dtype
        results = None
        if nd["op"] == "fused" and len(attrs["results"]) > 1:
            results = [index(c) for c in sorted(self.graph.nx.successors(n),
                                               key=lambda c: self.graph.nx.nodes[c]["attrs"]["index"])]

        def step():
            ctx.out_shape = shapes.resolve(shape, ctx.env)
            out = opdef.ref([R[i] for i in ii], attrs, ctx)
            if results is None:
                out = np.asarray(out)
                R[o] = np.ascontiguousarray(out.astype(fdt) if out.dtype.kind == "f" and out.dtype != fdt else out)
            else:
                for j, v in zip(results, out):
                    R[j] = np.ascontiguousarray(v.astype(fdt) if v.dtype.kind == "f" and v.dtype != fdt else v)
        step.fallback = True
        return step

    def _lower_fused(self, n, nd, b, index, shape_of, np_dtype, out_array, dynamic):
        attrs = nd["attrs"]
        pattern = attrs["pattern"]
        ins = list(nd["inputs"])
        body = attrs["body"]
        res = list(attrs["results"])
        if len(res) > 1:
            outs = sorted(self.graph.nx.successors(n), key=lambda c: self.graph.nx.nodes[c]["attrs"]["index"])
        else:
            outs = [n]
        R = b.R
        ii = [index(i) for i in ins]
        if pattern == "elementwise":
            ebody = [(bn["op"], list(bn["inputs"]), bn["attrs"]) for bn in body]
            return self._lower_elementwise(n, outs, ebody, ins, res, b, index, shape_of, out_array, dynamic), None
        if pattern in ("conv_relu", "conv_relu_maxpool"):
            conv = body[0]
            st, pads = tuple(conv["attrs"]["stride"]), tuple(conv["attrs"]["pads"])
            has_b = len(conv["inputs"]) == 3
            oi = [index(o) for o in outs]
            geo = (shape_of(ins[0]), shape_of(ins[1]), pads, self.dtype)
            if pattern == "conv_relu":
                f = conv_fn("conv2d", st, geo + (None,))
                xi, wi = ii[0], ii[1]
                bi = ii[2] if has_b else None
                o = oi[0]

                def post(f):
                    R[o] = f(R[xi], R[wi], R[bi] if bi is not None else None, st, pads, relu=True)
                fast = _bind_direct(self.dtype, geo[0], geo[1], has_b, st, pads, "store")
                step = None
                if fast is not None:
                    step = _conv_step(f, fast, R, xi, wi, bi, [(o, out_array(outs[0])), (None, _NO_ROUTE)],
                                      True, post)
                if step is None:
                    def step():
                        post(f)
                return step, set(outs)
            pool = body[2]["attrs"]
            save = len(res) > 1
            size, pst = pool["size"], pool["stride"]
            xi, wi = ii[0], ii[1]
            bi = ii[2] if has_b else None
            if size[0] == size[1] and pst[0] == pst[1]:
                ps, pss = size[0], pst[0]
                f = conv_fn("conv2d_relu_maxpool", st, geo + ((ps, pss),))
                if save:
                    oy, orr = oi

                    def post(f):
                        y, r = f(R[xi], R[wi], R[bi] if bi is not None else None, st, pads, ps, pss,
                                 save_route=True)
                        R[oy] = y
                        R[orr] = r
                else:
                    oy = oi[0]

                    def post(f):
                        R[oy] = f(R[xi], R[wi], R[bi] if bi is not None else None, st, pads, ps, pss)
                fast = _bind_direct(self.dtype, geo[0], geo[1], has_b, st, pads, "pool", (ps, pss))
                step = None
                if fast is not None:
                    ya = out_array(outs[0])
                    ra = out_array(outs[1]) if save else _NO_ROUTE
                    if ra.dtype == np.int32 and ra.flags.c_contiguous:
                        step = _conv_step(f, fast, R, xi, wi, bi, [(oy, ya), (orr if save else None, ra)],
                                          save, post)
                if step is None:
                    def step():
                        post(f)
                return step, set(outs)
            # non-square pools: conv with ReLU epilogue, then the pool kernel
            f = conv_fn("conv2d", st, geo + (None,))
            kh, kw = size
            sh, sw = pst

            def step():
                z = f(R[xi], R[wi], R[bi] if bi is not None else None, st, pads, relu=True)
                y = np.empty(shapes.resolve(nd["shape"], b.env), z.dtype)
                route = np.empty(y.shape, np.int32)
                K.maxpool_k(z, y, route, kh, kw, sh, sw, save, True)
                R[oi[0]] = y
                if save:
                    R[oi[1]] = route
            return step, set(outs)
        if pattern == "route_relu":
            sa = body[0]["attrs"]
            return self._route_scatter_step(ii, ins, out_array(outs[0]),
                                            out_array(outs[1]) if len(res) > 1 else None,
                                            sa.get("size"), sa.get("stride"), R, dynamic), None
        return self._fallback(n, nd, R, ii, index, np_dtype), set(outs)

    def _parallel(self, elements):
        return elements >= self.parallel_min

    def _route_scatter_step(self, ii, ins, dz, db, size, stride, R, dynamic):
        """dz = route scatter of dy (+ db = its per-channel sum): one generated pass (route_relu)."""
        kh, kw = size or (0, 0)
        sh, sw = stride or (0, 0)
        par = self._parallel(dz.size)
        kern = load_generated(K.route_scatter_source(kh, kw, sh, sw, db is not None, par), "graphc_pool_")
        N, C = dz.shape[:2]
        dbp = np.empty((N, C) if db is not None else (1, 1), np.float64)
        rows = K.sum_rows_k
        dyi, ri = ii
        stat = _static_or_dyn(R, ii, ins, dynamic)
        if db is None:
            if stat is not None:
                dyv, rv = stat
                return lambda: kern(dyv, rv, dz, dbp)
            return lambda: kern(R[dyi], R[ri], dz, dbp)

        def step():
            kern(R[dyi], R[ri], dz, dbp)
            rows(dbp, db)
        return step

    def _lower_elementwise(self, n, outs, body, ins, res, b, index, shape_of, out_array, dynamic):
        nodes = self.graph.nx.nodes
        R = b.R
        out_shape = shape_of(outs[0])
        in_shapes = [shape_of(i) for i in ins]
        inline = {}
        for k, i in enumerate(ins):
            if nodes[i]["op"] == "const" and np.asarray(nodes[i]["attrs"]["value"]).size == 1:
                inline[k] = float(np.asarray(nodes[i]["attrs"]["value"]).reshape(-1)[0])
        loop, modes = collapse(out_shape, in_shapes)
        modes = [None if k in inline else m for k, m in enumerate(modes)]
        total = int(np.prod(out_shape, dtype=np.int64)) if out_shape else 1
        parallel = total >= self.parallel_min
        src = elementwise_source(body, len(ins), res, len(loop), modes, inline, self.dtype.name, parallel)
        kern = load_generated(src)
        outs_arr = [out_array(o).reshape(loop) for o in outs]
        args, dyn = list(outs_arr), []
        for k, i in enumerate(ins):
            m = modes[k]
            if m is None:
                continue
            cs = (1,) if m == "s" else tuple(loop[r] if m[r] else 1 for r in range(len(loop)))
            if i in dynamic:
                dyn.append((len(args), index(i), cs))
                args.append(None)
            else:
                args.append(np.ascontiguousarray(R[index(i)]).reshape(cs))
        if not dyn:
            def step():
                kern(*args)
        else:
            def step():
                a = list(args)
                for pos, ix, cs in dyn:
                    a[pos] = R[ix].reshape(cs)
                kern(*a)
        step.source = src
        return step

    # ------------------------------------------------------------------ running
    def _run_steps(self, b, threads):
        prev = _num_threads()
        if threads != prev:
            numba.set_num_threads(threads)
        try:
            with self._blas:
                for _, f in b.steps:
                    f()
        finally:
            if threads != prev:
                numba.set_num_threads(prev)

    def _choose_threads(self, b):
        """(Called on a state snapshot.) threads="auto": time the bound program with all Numba threads and with one, keep the faster.
        On a quiet 2-core machine two threads win on big batches; on a loaded, shared one an OpenMP
        region waiting for a descheduled worker made a batch-128 training step 2.6x slower than one
        thread (176 ms vs 68 ms measured), and batch-1 kernels 50x slower. Programs slower than
        0.5 s a run keep all threads (timing them would cost too much)."""
        maxt = numba.config.NUMBA_NUM_THREADS
        if self.threads != "auto":
            return max(1, min(int(self.threads), maxt))
        if maxt == 1:
            return 1
        self._run_steps(b, 1)                # compiles what a one-thread run needs (conv strategies)
        t0 = time.perf_counter()
        self._run_steps(b, 1)
        if time.perf_counter() - t0 > 0.5:
            return maxt
        times = {maxt: [], 1: []}
        for rnd in range(3):
            for n in (maxt, 1):
                t0 = time.perf_counter()
                self._run_steps(b, n)
                times[n].append(time.perf_counter() - t0)
            if rnd >= 1:
                a, c = min(times[maxt]), min(times[1])
                if max(a, c) > 1.3 * min(a, c):
                    break                    # clear winner: stop early (tuning is part of compile time)
        b.thread_times = {n: 1e3 * float(min(v)) for n, v in times.items()}
        return min(b.thread_times, key=b.thread_times.get)

    def _execute(self, feeds, env, training, want, inplace=False):
        b = self._binding(env, want, inplace)
        self._sync_state()
        R = b.R
        for name, i in b.feed_ix:
            R[i] = np.ascontiguousarray(feeds[name])
        ctx = self._ctx
        ctx.env, ctx.training, ctx.step = env, training, self.step_count
        if b.first_run_s is None:
            # the first run compiles (or loads from the disk cache) every kernel; then the thread count
            # is chosen; both on a snapshot of the state, so the real run below starts from it
            with self._state_saved():
                t0 = time.perf_counter()
                self._run_steps(b, numba.get_num_threads())
                b.first_run_s = time.perf_counter() - t0
                b.threads = self._choose_threads(b) if b.steps else 1
        self._run_steps(b, b.threads)
        return b

    def run(self, feeds, outputs=None, training=False, check_finite=False):
        feeds, env = self.check_feeds(feeds, check_finite)
        want = list(self.outputs if outputs is None else outputs)
        for o in want:
            if o not in self.graph:
                raise GraphError(f"no value named {o!r} to fetch; outputs are {self.outputs}"
                                 + ("" if o not in getattr(self, "_fused_away", ()) else
                                    " (it was fused away: compile with keep=[...] or fuse=False)"))
        stats = self.stat_updates(training)
        b = self._execute(feeds, env, training, want + [u for u in stats.values() if u not in want])
        R = b.R
        out = {w: np.array(R[i]) for w, i in b.want_ix if w in want}
        for s, u in stats.items():          # batch norm's running statistics, into the bound state arrays
            np.copyto(self.state[s], R[b.ix[u]])
        return out

    def step(self, feeds, check_finite=False) -> float:
        if not self.graph.updates:
            raise GraphError("this executable has no optimizer: compile(graph, optimizer=gc.optim.SGD(...))")
        feeds, env = self.check_feeds(feeds, check_finite)
        want = [self.graph.loss] + [u for u in self.graph.updates.values() if u != self.graph.loss]
        b = self._execute(feeds, env, True, want, inplace=True)
        R = b.R
        for s, i in b.copy_back:
            np.copyto(self.state[s], R[i])
        self.step_count += 1
        return float(R[b.ix[self.graph.loss]])

    # ------------------------------------------------------------------ compile time and profiling
    def _dummy_feeds(self, batch):
        f = {}
        for n, (shape, dt) in self.input_types.items():
            s = tuple(batch if isinstance(d, str) else d for d in shape)
            f[n] = np.zeros(s, dtype=self.dtype if dt.startswith("float") else dt)
        return f

    @contextlib.contextmanager
    def _state_saved(self):
        saved = {n: np.array(v) for n, v in self.state.items()}
        step = self.step_count
        try:
            yield
        finally:
            self._sync_state()
            for n, v in saved.items():
                np.copyto(self.state[n], v)
            self.step_count = step

    def precompile(self, batch=1, train=None, feeds=None):
        """Binds for `batch` and runs once (on zero feeds unless given) so every kernel is compiled
        or loaded from the disk cache; parameters and optimizer state are left unchanged. Returns the
        seconds it took (bind + first run)."""
        train = bool(self.graph.updates) if train is None else train
        feeds = feeds or self._dummy_feeds(batch)
        t0 = time.perf_counter()
        with self._state_saved():
            if train:
                self.step(feeds)
            else:
                self.run(feeds)
        return time.perf_counter() - t0

    def profile(self, feeds, train=None, repeats=10, warmup=2):
        """Times every kernel call of a run (or a training step): a list of dicts {name, kind, ops,
        shapes, ms (median), flops}, in program order. Parameters are left unchanged."""
        train = bool(self.graph.updates) if train is None else train
        feeds_c, env = self.check_feeds(feeds)
        if train:
            want = [self.graph.loss] + [u for u in self.graph.updates.values() if u != self.graph.loss]
        else:
            want = list(self.outputs)
        times = {}
        with self._state_saved():
            b = self._execute(feeds_c, env, train, want, inplace=train)     # binds, feeds, compiles
            prev = numba.get_num_threads()
            numba.set_num_threads(b.threads)
            try:
                for r in range(warmup + repeats):
                    with self._blas:
                        for name, f in b.steps:
                            t0 = time.perf_counter()
                            f()
                            dt = time.perf_counter() - t0
                            if r >= warmup:
                                times.setdefault(name, []).append(dt)
            finally:
                numba.set_num_threads(prev)
        rows = []
        for name, f in b.steps:
            rows.append(dict(self.describe_kernel(name, env), ms=1e3 * float(np.median(times[name])),
                             fallback=bool(getattr(f, "fallback", False))))
        return rows


def _alias_step(R, i, si, shp):
    def step():
        R[i] = R[si].reshape(shp)
    return step


# ================================================================================ per-op lowering

def _static_or_dyn(R, ii, ins, dynamic, fix=None):
    """Argument getters: a tuple of arrays when all are static, else None (read R at call time)."""
    if any(i in dynamic for i in ins):
        return None
    arrs = [R[i] for i in ii]
    return [fix(a) if fix else a for a in arrs]


def _low_matmul(self, n, nd, R, ii, index, shape_of, np_dtype, out_array, dynamic):
    out = out_array(n)
    ta, tb = nd["attrs"].get("trans_a", False), nd["attrs"].get("trans_b", False)
    a, bb = ii
    mm = np.matmul

    def op(x, t):                       # transpose of the last two dims (batched operands too)
        return x.swapaxes(-1, -2) if t else x
    if not (nd["inputs"][0] in dynamic or nd["inputs"][1] in dynamic):
        A, B = op(R[a], ta), op(R[bb], tb)

        def step():
            mm(A, B, out=out)
    else:
        def step():
            mm(op(R[a], ta), op(R[bb], tb), out=out)
    return step, None


def _low_conv(self, n, nd, R, ii, index, shape_of, np_dtype, out_array, dynamic):
    if not is_plain_conv(nd["attrs"]):
        return None                     # grouped / dilated: the reference until they have kernels
    st, pads = tuple(nd["attrs"]["stride"]), tuple(nd["attrs"]["pads"])
    xs, ws = shape_of(nd["inputs"][0]), shape_of(nd["inputs"][1])
    f = conv_fn("conv2d", st, (xs, ws, pads, self.dtype, None))
    xi, wi = ii[0], ii[1]
    bi = ii[2] if len(ii) == 3 else None
    o = index(n)

    def post(f):
        R[o] = f(R[xi], R[wi], R[bi] if bi is not None else None, st, pads)
    fast = _bind_direct(self.dtype, xs, ws, bi is not None, st, pads, "store")
    step = None
    if fast is not None:
        step = _conv_step(f, fast, R, xi, wi, bi, [(o, out_array(n)), (None, _NO_ROUTE)], False, post)
    if step is None:
        def step():
            post(f)
    return step, {n}


def _low_conv_dx(self, n, nd, R, ii, index, shape_of, np_dtype, out_array, dynamic):
    a = nd["attrs"]
    if not is_plain_conv(a):
        return None
    st, pads, hw = tuple(a["stride"]), tuple(a["pads"]), tuple(a["in_hw"])
    dys, ws = shape_of(nd["inputs"][0]), shape_of(nd["inputs"][1])
    f = conv_fn("conv2d_dx", st, ((dys[0], ws[1]) + hw, ws, pads, self.dtype, None))
    dyi, wi = ii
    o = index(n)

    def step():
        R[o] = f(R[dyi], R[wi], st, pads, hw)
    return step, {n}


def _low_conv_dw(self, n, nd, R, ii, index, shape_of, np_dtype, out_array, dynamic):
    a = nd["attrs"]
    if not is_plain_conv(a):
        return None
    st, pads, khw = tuple(a["stride"]), tuple(a["pads"]), tuple(a["k_hw"])
    xs, dys = shape_of(nd["inputs"][0]), shape_of(nd["inputs"][1])
    f = conv_fn("conv2d_dw", st, (xs, (dys[1], xs[1]) + khw, pads, self.dtype, None))
    xi, dyi = ii
    o = index(n)

    def step():
        R[o] = f(R[xi], R[dyi], st, pads, khw)
    return step, {n}


def _kernel_step(kern, R, ii, ins, dynamic, tail, fix=None):
    """A call kern(*inputs, *tail) with inputs read at call time only when they are dynamic."""
    stat = _static_or_dyn(R, ii, ins, dynamic, fix)
    if stat is not None:
        args = tuple(stat) + tuple(tail)

        def step():
            kern(*args)
    else:
        tail = tuple(tail)
        if fix is None:
            def step():
                kern(*[R[i] for i in ii], *tail)
        else:
            def step():
                kern(*[fix(R[i]) for i in ii], *tail)
    return step


def _pool_kernel(self, source_fn, *geometry, elements):
    return load_generated(source_fn(*geometry, self._parallel(elements)), "graphc_pool_")


def _low_maxpool(self, n, nd, R, ii, index, shape_of, np_dtype, out_array, dynamic):
    y = out_array(n)
    (kh, kw), (sh, sw) = nd["attrs"]["size"], nd["attrs"]["stride"]
    kern = _pool_kernel(self, K.maxpool_source, kh, kw, sh, sw, False, False, elements=y.size * kh * kw)
    route = np.empty((1, 1, 1, 1), np.int32)
    return _kernel_step(kern, R, ii, nd["inputs"], dynamic, (y, route)), None


def _low_maxpool_argmax(self, n, nd, R, ii, index, shape_of, np_dtype, out_array, dynamic):
    route = out_array(n)
    (kh, kw), (sh, sw) = nd["attrs"]["size"], nd["attrs"]["stride"]
    relu = bool(nd["attrs"].get("relu", False))
    kern = _pool_kernel(self, K.maxpool_source, kh, kw, sh, sw, True, relu, elements=route.size * kh * kw)
    scratch = np.empty(route.shape, self.dtype)
    return _kernel_step(kern, R, ii, nd["inputs"], dynamic, (scratch, route)), None


def _low_maxpool_route(self, n, nd, R, ii, index, shape_of, np_dtype, out_array, dynamic):
    (kh, kw), (sh, sw) = nd["attrs"]["size"], nd["attrs"]["stride"]
    if kh * kw > 64:
        return None                     # (global max pool's plane-sized window: the kernel is unrolled)
    dx = out_array(n)
    kern = _pool_kernel(self, K.maxpool_route_source, kh, kw, sh, sw, elements=dx.size)
    return _kernel_step(kern, R, ii, nd["inputs"], dynamic, (dx,)), None


def _low_route_scatter(self, n, nd, R, ii, index, shape_of, np_dtype, out_array, dynamic):
    a = nd["attrs"]
    return self._route_scatter_step(ii, nd["inputs"], out_array(n), None, a.get("size"), a.get("stride"),
                                    R, dynamic), None


def _low_avgpool(self, n, nd, R, ii, index, shape_of, np_dtype, out_array, dynamic):
    y = out_array(n)
    (kh, kw), (sh, sw) = nd["attrs"]["size"], nd["attrs"]["stride"]
    return _kernel_step(K.avgpool_k, R, ii, nd["inputs"], dynamic, (y, kh, kw, sh, sw)), None


def _low_avgpool_spread(self, n, nd, R, ii, index, shape_of, np_dtype, out_array, dynamic):
    dx = out_array(n)
    (kh, kw), (sh, sw) = nd["attrs"]["size"], nd["attrs"]["stride"]
    return _kernel_step(K.avgpool_spread_k, R, ii, nd["inputs"], dynamic, (dx, kh, kw, sh, sw)), None


def _low_gap(self, n, nd, R, ii, index, shape_of, np_dtype, out_array, dynamic):
    y = out_array(n)
    s = shape_of(nd["inputs"][0])
    x3 = (s[0], s[1], s[2] * s[3])
    return _kernel_step(K.gap_k, R, ii, nd["inputs"], dynamic, (y,), fix=lambda a: a.reshape(x3)), None


def _low_gap_spread(self, n, nd, R, ii, index, shape_of, np_dtype, out_array, dynamic):
    s = shape_of(n)
    dx3 = out_array(n).reshape(s[0], s[1], s[2] * s[3])
    return _kernel_step(K.gap_spread_k, R, ii[:1], nd["inputs"][:1], dynamic, (dx3,)), None


def reduce_form(shape, axes):
    """(R0, K0, R1, K1) with x.reshape(...) summed over R0 and R1 giving the kept (K0, K1), or None."""
    blocks = []
    for d, s in enumerate(shape):
        kind = "R" if d in axes else "K"
        if s == 1:
            continue
        if blocks and blocks[-1][0] == kind:
            blocks[-1][1] *= s
        else:
            blocks.append([kind, s])
    if blocks and blocks[0][0] == "K":
        blocks.insert(0, ["R", 1])
    if len(blocks) > 4:
        return None
    while len(blocks) < 4:
        blocks.append(["R" if len(blocks) % 2 == 0 else "K", 1])
    return tuple(s for _, s in blocks)


def _sum_like(self, n, nd, R, ii, ins, shape_of, out_array, dynamic, axes, scale):
    xs = shape_of(ins[0])
    form = reduce_form(xs, set(axes))
    if form is None:
        return None
    out = out_array(n).reshape(form[1], form[3])
    total = int(np.prod(xs, dtype=np.int64)) if xs else 1
    kern = K.sum4_par if (total >= self.parallel_min and form[1] >= 2) else K.sum4_ser
    return _kernel_step(kern, R, ii[:1], ins[:1], dynamic, (out, scale), fix=lambda a: a.reshape(form)), None


def _low_sum(self, n, nd, R, ii, index, shape_of, np_dtype, out_array, dynamic):
    axes = tuple(nd["attrs"]["axes"])
    return _sum_like(self, n, nd, R, ii, nd["inputs"], shape_of, out_array, dynamic, axes, 1.0)


def _low_mean(self, n, nd, R, ii, index, shape_of, np_dtype, out_array, dynamic):
    axes = tuple(nd["attrs"]["axes"])
    xs = shape_of(nd["inputs"][0])
    cnt = 1
    for a in axes:
        cnt *= xs[a]
    return _sum_like(self, n, nd, R, ii, nd["inputs"], shape_of, out_array, dynamic, axes, 1.0 / max(cnt, 1))


def _low_sum_to(self, n, nd, R, ii, index, shape_of, np_dtype, out_array, dynamic):
    xs, ls = shape_of(nd["inputs"][0]), shape_of(nd["inputs"][1])
    lead = len(xs) - len(ls)
    axes = tuple(range(lead)) + tuple(lead + i for i, d in enumerate(ls) if d == 1 and xs[lead + i] != 1)
    return _sum_like(self, n, nd, R, ii, nd["inputs"], shape_of, out_array, dynamic, axes, 1.0)


def _low_broadcast_like(self, n, nd, R, ii, index, shape_of, np_dtype, out_array, dynamic):
    a = nd["attrs"]
    out = out_array(n)
    shp = out.shape
    keep = tuple(1 if d in a["axes"] else s for d, s in enumerate(shp))
    cnt = 1
    for d in a["axes"]:
        cnt *= shp[d]
    scale = (1.0 / cnt) if a["mean"] else 1.0
    di = ii[0]

    def step():
        np.multiply(np.broadcast_to(R[di].reshape(keep), shp), scale, out=out)
    return step, None


def _low_expand_like(self, n, nd, R, ii, index, shape_of, np_dtype, out_array, dynamic):
    out = out_array(n)
    xi = ii[0]

    def step():
        np.copyto(out, np.broadcast_to(R[xi], out.shape))
    return step, None


def _low_transpose(self, n, nd, R, ii, index, shape_of, np_dtype, out_array, dynamic):
    out = out_array(n)
    axes = tuple(nd["attrs"]["axes"])
    xi = ii[0]

    def step():
        np.copyto(out, np.transpose(R[xi], axes))
    return step, None


def _low_concat(self, n, nd, R, ii, index, shape_of, np_dtype, out_array, dynamic):
    out = out_array(n)
    axis = nd["attrs"]["axis"]
    parts, start = [], 0
    for i, name in zip(ii, nd["inputs"]):
        w = shape_of(name)[axis]
        idx = [slice(None)] * out.ndim
        idx[axis] = slice(start, start + w)
        parts.append((i, out[tuple(idx)]))
        start += w

    def step():
        for i, dst in parts:
            np.copyto(dst, R[i])
    return step, None


def _low_slice(self, n, nd, R, ii, index, shape_of, np_dtype, out_array, dynamic):
    out = out_array(n)
    a = nd["attrs"]
    idx = [slice(None)] * out.ndim
    idx[a["axis"]] = slice(a["start"], a["stop"])
    idx = tuple(idx)
    xi = ii[0]

    def step():
        np.copyto(out, R[xi][idx])
    return step, None


def _low_unslice(self, n, nd, R, ii, index, shape_of, np_dtype, out_array, dynamic):
    out = out_array(n)
    a = nd["attrs"]
    gshape = shape_of(nd["inputs"][0])
    idx = [slice(None)] * out.ndim
    idx[a["axis"]] = slice(a["start"], a["start"] + gshape[a["axis"]])
    dst = out[tuple(idx)]
    gi = ii[0]

    def step():
        out.fill(0)
        np.copyto(dst, R[gi])
    return step, None


def _low_pad2d(self, n, nd, R, ii, index, shape_of, np_dtype, out_array, dynamic):
    if nd["attrs"].get("mode", "constant") != "constant":
        return None                     # reflect / edge: the reference
    out = out_array(n)
    t, bt, l, r = nd["attrs"]["pads"]
    value = nd["attrs"]["value"]
    H, W = out.shape[2] - t - bt, out.shape[3] - l - r
    inner = out[:, :, t:t + H, l:l + W]
    xi = ii[0]

    def step():
        out.fill(value)
        np.copyto(inner, R[xi])
    return step, None


def _low_crop2d(self, n, nd, R, ii, index, shape_of, np_dtype, out_array, dynamic):
    if nd["attrs"].get("mode", "constant") != "constant":
        return None
    out = out_array(n)
    t, bt, l, r = nd["attrs"]["pads"]
    xi = ii[0]
    H, W = out.shape[2], out.shape[3]

    def step():
        np.copyto(out, R[xi][:, :, t:t + H, l:l + W])
    return step, None


def _low_softmax(self, n, nd, R, ii, index, shape_of, np_dtype, out_array, dynamic):
    shp = shape_of(n)
    if nd["attrs"]["axis"] != len(shp) - 1 or not shp:
        return None
    out = out_array(n).reshape(-1, shp[-1])
    return _kernel_step(K.softmax_rows_k, R, ii, nd["inputs"], dynamic, (out,),
                        fix=lambda a: a.reshape(-1, shp[-1])), None


def _labels_fix(self, lab_name):
    nodes = self.graph.nx.nodes
    dense = len(nodes[lab_name]["shape"]) == 2
    dt = self.dtype
    if dense:
        return True, (lambda a: a if a.dtype == dt else a.astype(dt))
    return False, None


def _low_class_loss(kern_int, kern_dense, grad):
    def lower(self, n, nd, R, ii, index, shape_of, np_dtype, out_array, dynamic):
        dense, fix = _labels_fix(self, nd["inputs"][1])
        kern = kern_dense if dense else kern_int
        out = out_array(n)
        out_k = out.reshape(1) if out.ndim == 0 else out
        zi, li = ii[0], ii[1]
        if grad:
            di = ii[2]

            def step():
                lab = R[li]
                if fix is not None:
                    lab = fix(lab)
                kern(R[zi], lab, R[di].reshape(1), out_k)
        else:
            def step():
                lab = R[li]
                if fix is not None:
                    lab = fix(lab)
                kern(R[zi], lab, out_k)
        return step, None
    return lower


def pair_loss_source(op):
    """Source of the kernel of a mean loss (the op table's loss_term: out[0] = the term's mean) or of its
    gradient (grad_term: out = term * dy / n), from the formula the op table writes once."""
    d = optable.OPS[op]
    term = _ARG.sub(lambda m: "ab"[int(m.group(1))] + "[i]", d.loss_term or d.grad_term)
    lines = ["# Generated by graphc.backends.numba (mean loss) -- do not edit.", "import math",
             "from numba import njit", "", f"@njit(fastmath={_FASTMATH}, cache=True, nogil=True)"]
    if d.loss_term is not None:
        lines += ["def kernel(a, b, out):", "    s = 0.0", "    for i in range(a.size):", f"        s += {term}",
                  "    out[0] = s / a.size"]
    else:
        lines += ["def kernel(a, b, dy, out):", "    scale = dy[0] / a.size", "    for i in range(a.size):",
                  f"        out[i] = ({term}) * scale"]
    return "\n".join(lines) + "\n"


def _low_pair_loss(op, grad):
    def lower(self, n, nd, R, ii, index, shape_of, np_dtype, out_array, dynamic):
        kern = load_generated(pair_loss_source(op), "graphc_loss_")
        out = out_array(n)
        out_k = out.reshape(-1) if out.ndim else out.reshape(1)
        ai, bi = ii[0], ii[1]
        if grad:
            di = ii[2]

            def step():
                kern(R[ai].reshape(-1), R[bi].reshape(-1), R[di].reshape(1), out_k)
        else:
            def step():
                kern(R[ai].reshape(-1), R[bi].reshape(-1), out_k)
        return step, None
    return lower


def _low_dropout_mask(self, n, nd, R, ii, index, shape_of, np_dtype, out_array, dynamic):
    out = out_array(n)
    flat = out.reshape(-1)
    rate, seed = float(nd["attrs"]["rate"]), int(nd["attrs"]["seed"])
    scale = 1.0 / (1.0 - rate)
    ctx = self._ctx
    kern = K.dropout_mask_k

    def step():
        if not ctx.training or rate == 0.0:
            out.fill(1)
            return
        u = np.random.default_rng([seed, ctx.step]).random(out.shape)   # the reference's draws
        kern(u.reshape(-1), rate, scale, flat)
    return step, None


_LOWER = {
    "dropout_mask": _low_dropout_mask,
    "matmul": _low_matmul, "conv": _low_conv, "conv_dx": _low_conv_dx, "conv_dw": _low_conv_dw,
    "maxpool": _low_maxpool, "maxpool_argmax": _low_maxpool_argmax, "maxpool_route": _low_maxpool_route,
    "route_scatter": _low_route_scatter, "avgpool": _low_avgpool, "avgpool_spread": _low_avgpool_spread,
    "global_avgpool": _low_gap, "global_avgpool_spread": _low_gap_spread,
    "sum": _low_sum, "mean": _low_mean, "sum_to": _low_sum_to,
    "broadcast_like": _low_broadcast_like, "expand_like": _low_expand_like,
    "transpose": _low_transpose, "concat": _low_concat, "slice": _low_slice, "unslice": _low_unslice,
    "pad2d": _low_pad2d, "crop2d": _low_crop2d, "softmax": _low_softmax,
    "softmax_cross_entropy": _low_class_loss(K.sce_int_k, K.sce_dense_k, False),
    "softmax_ce_grad": _low_class_loss(K.sce_grad_int_k, K.sce_grad_dense_k, True),
    "cross_entropy": _low_class_loss(K.ce_int_k, K.ce_dense_k, False),
    "cross_entropy_grad": _low_class_loss(K.ce_grad_int_k, K.ce_grad_dense_k, True),
    "mse": _low_pair_loss("mse", False), "mse_grad": _low_pair_loss("mse_grad", True),
    "bce_with_sigmoid": _low_pair_loss("bce_with_sigmoid", False),
    "bce_grad": _low_pair_loss("bce_grad", True),
}


def lower(graph, dtype=None, pipeline=None, **options):
    """graph (after the pipeline) -> NumbaExecutable. options: blas_threads (default 1; None leaves BLAS
    alone), parallel_min (elements above which elementwise/reduction kernels run in parallel),
    verbose."""
    options.pop("strategy", None)
    return NumbaExecutable(graph, dtype=dtype, pipeline=pipeline, **options)
