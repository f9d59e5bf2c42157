"""The cuda backend: lowers a scheduled, fused, memory-planned graph to CUDA kernels (numba.cuda).

    exe = gc.compile(graph, backend="cuda")                     # inference: exe.run(feeds)
    tr = gc.compile(graph, backend="cuda", optimizer=gc.optim.Adam(1e-3))
    tr.step(feeds)     # forward + backward + update on the GPU; returns the loss (the one copy back)

It is the numba CPU backend's lowering (backends/numba.py) with the kernels of backends/cuda_kernels.py.
On a machine with neither a GPU nor the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1`` set before numba.cuda
is first imported) ``lower`` raises BackendError with cuda_kernels.require_cuda()'s message.

Where the data lives
--------------------
* Parameters and optimizer state are device arrays for the executable's whole life. A training step
  writes their new values on the device (in place where the memory plan allows, else one
  device-to-device copy); nothing goes back to the host per step except the loss (4 or 8 bytes).
  ``exe.state[name]`` copies a value to the host on access (and, since the caller may change the array it
  got, uploads it again before the next run); ``exe.params`` and ``exe.state_dict()`` are host copies;
  ``exe.load_state_dict`` uploads. ``exe.state["optim/lr"][...] = 0.01`` still changes the learning rate.
* Per batch size (and per set of wanted values) the executable *binds* the graph once, like the numba
  backend: it allocates one device buffer per slot of the memory plan (passes/memory.py), makes every
  value a flat view of its slot (reshape/identity/copy values are their input's array; an in-place
  update is the state array itself), allocates the few private scratch buffers some kernels need, and
  keeps the list of kernel launches with their arguments resolved. A run is then: copy the feeds into
  their device buffers, launch, copy the fetched outputs (or the loss) back.
* Everything runs on one stream (the default stream: cuda_kernels launches on it). More streams would
  help (a) to overlap the next batch's feed upload with this step's compute (pinned host buffers and a
  copy stream; it matters when the input batch is large next to the compute), (b) to run a layer's
  independent conv_dx and conv_dw (and the bias-gradient sum) concurrently when each alone cannot fill
  the GPU (small batches, late layers), and (c) to overlap host-side work (the dropout mask draws) with
  the device. None of these is measured here: no GPU on the machines this was written on.

Kernels, by op and fused pattern (``KERNELS`` / ``kernel_table()``; "host" = the op table's reference
implementation on the host, inputs copied down and the result copied up, per call):

    conv, fused conv_relu           cuda_kernels implicit GEMM (igemm_fwd; bias and ReLU in the epilogue)
    fused conv_relu_maxpool         cuda_kernels conv_relu_pool (one thread per pooled output; saves the
                                    int32 route in training); windows > 16 or filters > 1024 taps:
                                    igemm_fwd + maxpool + ReLU/route fix-up kernels
    conv_dx / conv_dw               cuda_kernels igemm_dx / igemm_dw (split-K with atomics)
    fused route_relu, route_scatter cuda_kernels fill + route_scatter (atomic); bias gradient: reduction
    matmul                          cuda_kernels igemm_mm (transposes read in place)
    elementwise ops and fused       one generated kernel per group from the ops' ``scalar`` expressions:
      elementwise groups            cuda_kernels.elementwise_kernel when every input has the output's
                                    size; else the same expression translation (cuda_kernels' rewriter)
                                    with broadcast indexing and temporaries (group_source below)
    maxpool / maxpool_argmax        cuda_kernels maxpool (+ route; relu=True: route fix-up kernel)
    maxpool_route                   maxpool (route) + fill + route_scatter
    maxpool_gather                  maxpool (route) + gather kernel (here)
    avgpool / avgpool_spread        cuda_kernels avgpool / avgpool_bwd
    global_avgpool                  cuda_kernels reduce_keep_mid
    global_avgpool_spread,          strided-copy kernel (here), with a scale
      broadcast_like, expand_like
    sum / mean / sum_to             cuda_kernels reduce_keep_mid / reduce_mid (deterministic, no atomics)
    softmax                         cuda_kernels softmax (other axis than the last: permute, softmax,
                                    permute back with the copy kernel)
    softmax_cross_entropy(+grad)    int labels: cuda_kernels xent_rows + reduction / xent_grad;
                                    one-hot labels: dense-row kernel (here) / softmax + elementwise
    cross_entropy(+grad), mse(+grad), bce_with_sigmoid(+grad)
                                    generated elementwise kernels + reductions (int labels: one-hot kernel)
    transpose, concat, slice, unslice, pad2d, crop2d
                                    fill + strided-copy kernel (up to 6-D)
    reshape, reshape_like, identity, copy, getitem
                                    no kernel (views)

Host fallbacks (the documented table, ``HOST_FALLBACKS``):

    dropout_mask                    the mask is drawn on the host with the reference's seeded generator
                                    (the same mask as every other backend) and uploaded: one host->device
                                    copy per dropout layer per training step (inference: a device fill)
    data movement of rank > 6       transpose/concat/slice/... on arrays of more than 6 dims
    a fused pattern unknown here    (none today: conv_relu, conv_relu_maxpool, route_relu, elementwise)
    the CNN op set, until its       batchnorm, bn_running_stat, is_training, lrn, global_maxpool; grouped
      kernels are written           or dilated conv / conv_dx / conv_dw; reflect/edge pad2d / crop2d;
                                    batched (rank > 2) matmul
"""
from __future__ import annotations

import ast
import contextlib
import math
import re
import time
from collections.abc import MutableMapping

import numpy as np

from graphc import ops as optable
from graphc import shapes
from graphc.backends import cuda_kernels as ck
from graphc.errors import BackendError, CheckpointError, GraphError
from graphc.executable import Executable, RunContext
from graphc.ops.conv import is_plain as is_plain_conv

# numba.cuda, bound by _cu(). The kernels below refer to it as this module's global ``cuda`` (the
# simulator swaps that global for its per-thread fake while a kernel runs, as in cuda_kernels).
cuda = None

MAX_COPY_RANK = 6

KERNELS = {
    "conv": "cuda_kernels igemm_fwd (implicit GEMM, bias in the epilogue)",
    "conv_dx": "cuda_kernels igemm_dx", "conv_dw": "cuda_kernels igemm_dw (split-K)",
    "matmul": "cuda_kernels igemm_mm",
    "fused:conv_relu": "cuda_kernels igemm_fwd (bias + ReLU epilogue)",
    "fused:conv_relu_maxpool": "cuda_kernels conv_relu_pool (saves the route in training)",
    "fused:route_relu": "cuda_kernels fill + route_scatter (+ reduce for the bias gradient)",
    "fused:elementwise": "generated elementwise (cuda_kernels.elementwise_kernel or broadcast variant)",
    "maxpool": "cuda_kernels maxpool", "maxpool_argmax": "cuda_kernels maxpool (+ route fix-up)",
    "maxpool_route": "cuda_kernels maxpool + route_scatter", "maxpool_gather": "maxpool + gather (cuda.py)",
    "route_scatter": "cuda_kernels fill + route_scatter",
    "avgpool": "cuda_kernels avgpool", "avgpool_spread": "cuda_kernels avgpool_bwd",
    "global_avgpool": "cuda_kernels reduce_keep_mid", "global_avgpool_spread": "strided copy (cuda.py)",
    "sum": "cuda_kernels reduce_keep_mid/reduce_mid", "mean": "cuda_kernels reduce_keep_mid/reduce_mid",
    "sum_to": "cuda_kernels reduce_keep_mid/reduce_mid",
    "broadcast_like": "strided copy (cuda.py)", "expand_like": "strided copy (cuda.py)",
    "softmax": "cuda_kernels softmax (+ permutes for a non-last axis)",
    "softmax_cross_entropy": "cuda_kernels xent_rows + reduce (one-hot labels: dense rows, cuda.py)",
    "softmax_ce_grad": "cuda_kernels xent_grad (one-hot labels: softmax + elementwise)",
    "cross_entropy": "elementwise + reduce (int labels: one-hot kernel)",
    "cross_entropy_grad": "elementwise (int labels: one-hot kernel)",
    "mse": "elementwise + reduce", "mse_grad": "elementwise",
    "bce_with_sigmoid": "elementwise + reduce", "bce_grad": "elementwise",
    "transpose": "strided copy (cuda.py)", "concat": "strided copy (cuda.py)", "slice": "strided copy (cuda.py)",
    "unslice": "fill + strided copy (cuda.py)", "pad2d": "fill + strided copy (cuda.py)",
    "crop2d": "strided copy (cuda.py)",
    "reshape": "view", "reshape_like": "view", "identity": "view", "copy": "view", "getitem": "view",
    "dropout_mask": "host (seeded numpy draws, as the reference) + upload",
}

HOST_FALLBACKS = {
    "dropout_mask": "drawn on the host (the reference's seeded generator, so every backend has the same "
                    "mask) and uploaded each training step; inference fills ones on the device",
    "transpose/concat/slice/unslice/pad2d/crop2d/expand_like/broadcast_like of rank > 6":
        "the reference implementation on the host (the copy kernel indexes up to 6 dims)",
    "fused nodes of an unknown pattern": "the body run by the reference (none exist today)",
    "batchnorm, bn_running_stat, is_training, lrn, global_maxpool": "the reference implementation on the "
        "host (inputs copied down, the result up) until these ops have kernels",
    "conv / conv_dx / conv_dw with groups > 1 or dilation > 1": "the reference implementation on the host",
    "pad2d / crop2d in reflect or edge mode; matmul of rank > 2": "the reference implementation on the host",
}
HOST_FALLBACK_OPS = ("batchnorm", "bn_running_stat", "is_training", "lrn", "global_maxpool")


def kernel_table():
    """[(op or fused pattern, kernel)] for every op of the table and every fused pattern."""
    rows = []
    for op in sorted(optable.OPS):
        d = optable.OPS[op]
        if d.source or op == "fused":
            continue
        rows.append((op, "generated elementwise" if d.scalar is not None else KERNELS.get(op, "host fallback")))
    for p in ("conv_relu", "conv_relu_maxpool", "route_relu", "elementwise"):
        rows.append((f"fused:{p}", KERNELS[f"fused:{p}"]))
    return rows


def _cu():
    global cuda
    if cuda is None:
        cuda = ck.require_cuda()
    return cuda


# ======================================================================================== own kernels
# (small kernels cuda_kernels has no equivalent of; same conventions: flat C-contiguous arrays, 1-D
# grid-stride loops of ck.EW_BLOCK threads, per-dtype factories so float32 kernels stay float32)

def _mk_copy(scaled):
    """dst[dbase + sum c_d*b_d] = src[sbase + sum c_d*a_d] (* scale) over a <= 6-D index space."""
    def factory(nbt):
        def copy_k(src, dst, n, s0, s1, s2, s3, s4, s5, a0, a1, a2, a3, a4, a5,
                   b0, b1, b2, b3, b4, b5, sbase, dbase, scale):
            start = cuda.grid(1)
            step = cuda.gridsize(1)
            for i in range(start, n, step):
                q = i
                c5 = q % s5
                q = q // s5
                c4 = q % s4
                q = q // s4
                c3 = q % s3
                q = q // s3
                c2 = q % s2
                q = q // s2
                c1 = q % s1
                c0 = q // s1
                si = sbase + c0 * a0 + c1 * a1 + c2 * a2 + c3 * a3 + c4 * a4 + c5 * a5
                di = dbase + c0 * b0 + c1 * b1 + c2 * b2 + c3 * b3 + c4 * b4 + c5 * b5
                if scaled:
                    dst[di] = src[si] * scale
                else:
                    dst[di] = src[si]
        return copy_k
    return factory


def _mk_gather(nbt):
    """out[o] = g[nc * HW + route[o]] with nc = o // HpWp (the max-pool route's transpose)."""
    def gather_k(g, route, out, n, HpWp, HW):
        start = cuda.grid(1)
        step = cuda.gridsize(1)
        for o in range(start, n, step):
            out[o] = g[(o // HpWp) * HW + route[o]]
    return gather_k


def _mk_onehot(nbt):
    """out (M, K): 1 where j == labels[row], else 0 (out-of-range labels give a zero row)."""
    def onehot_k(labels, out, n, K):
        start = cuda.grid(1)
        step = cuda.gridsize(1)
        one = nbt(1)
        zero = nbt(0)
        for i in range(start, n, step):
            r = i // K
            if labels[r] == i - r * K:
                out[i] = one
            else:
                out[i] = zero
    return onehot_k


def _mk_xent_dense_rows(nbt):
    """rows[r] = -sum_j y[r, j] * log_softmax(z[r])_j, one thread per row (stable: max-subtracted)."""
    def xent_dense_rows(z, y, rows, M, K):
        start = cuda.grid(1)
        step = cuda.gridsize(1)
        for r in range(start, M, step):
            base = r * K
            mx = z[base]
            for j in range(1, K):
                v = z[base + j]
                if v > mx:
                    mx = v
            tot = nbt(0)
            for j in range(K):
                tot += math.exp(z[base + j] - mx)
            lt = math.log(tot)
            s = nbt(0)
            for j in range(K):
                s -= y[base + j] * (z[base + j] - mx - lt)
            rows[r] = s
    return xent_dense_rows


_FACTORIES = {"copy": _mk_copy(False), "copy_scaled": _mk_copy(True), "gather": _mk_gather,
              "onehot": _mk_onehot, "xent_dense_rows": _mk_xent_dense_rows}
_KC: dict = {}


def _kern(name, dtype):
    key = (name, np.dtype(dtype))
    k = _KC.get(key)
    if k is None:
        c = _cu()
        k = c.jit(_FACTORIES[name](ck._nbtype(dtype)))
        _KC[key] = k
    return k


def _grid(n):
    return ck._grid1d(n), ck.EW_BLOCK


# ================================================================================ elementwise groups

_ARG = re.compile(r"\ba(\d+)\b")
_MATH = re.compile(r"\bmath\.")


def _literal(v):
    v = float(v)
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "(-inf)"
    return repr(v)


def translate(expr):
    """An op-table scalar expression in the language of cuda_kernels.elementwise_kernel
    (``math.exp(a0)`` -> ``exp(a0)``; everything else is already in it)."""
    return _MATH.sub("", expr)


def body_expressions(body, inline, dev_index):
    """Per body node, its expression over a<k> (device inputs, numbered by dev_index), o<j> (earlier body
    values) and inlined constants. body: [(expr, refs)] with refs ("in", k) | ("body", j)."""
    out = []
    for expr, refs in body:
        names = []
        for kind, i in refs:
            if kind == "body":
                names.append(f"o{i}")
            elif i in inline:
                names.append(f"({_literal(inline[i])})")
            else:
                names.append(f"a{dev_index[i]}")
        out.append(_ARG.sub(lambda m: names[int(m.group(1))], translate(expr)))
    return out


def _rewrite(expr, n_dev, n_prev):
    tree = ast.parse(expr.strip(), mode="eval")
    tree = ck._EwRewrite(n_dev, 0, n_prev, expr).visit(tree)
    return ast.unparse(tree.body)


def collapse(out_shape, in_shapes):
    """Merges loop dims (as the numba backend): (loop dims, per input "f" full / "s" one value / flags of
    the loop dims it runs along)."""
    total = shapes.numel(out_shape) or 1
    dims, flags = shapes.merge_loop_dims(out_shape, in_shapes)
    modes = []
    for k, s in enumerate(in_shapes):
        n = shapes.numel(s) or 1
        if n == total:
            modes.append("f")
        elif n == 1:
            modes.append("s")
        else:
            modes.append(tuple(fl[k] for fl in flags))
    return tuple(dims), modes


def group_source(exprs, results, modes):
    """Source of a generated 1-D grid-stride kernel: body values _vo<j> as temporaries (each expression
    translated by cuda_kernels' elementwise rewriter, so typed as elementwise_kernel's), inputs loaded
    full (index i), as one value (index 0) or broadcast (index from the coordinates in the collapsed loop
    dims _D<r>, passed at launch); only the results are stored."""
    n_dev = len(modes)
    rank = max((len(m) for m in modes if isinstance(m, tuple)), default=0)
    args = ["_n"] + [f"_out{r}" for r in range(len(results))] + [f"_in{k}" for k in range(n_dev)]
    args += [f"_D{r}" for r in range(rank)]
    lines = [f"def _ew_kernel({', '.join(args)}):", "    _start = cuda.grid(1)", "    _step = cuda.gridsize(1)",
             "    for _i in range(_start, _n, _step):"]
    if rank:
        lines.append("        _q = _i")
        for r in reversed(range(1, rank)):
            lines += [f"        _c{r} = _q % _D{r}", f"        _q = _q // _D{r}"]
        lines.append("        _c0 = _q")
    for k, m in enumerate(modes):
        if m == "f":
            lines.append(f"        _va{k} = _in{k}[_i]")
        elif m == "s":
            lines.append(f"        _va{k} = _in{k}[0]")
        else:
            run = [r for r in range(len(m)) if m[r]]
            idx = f"_c{run[0]}"
            for r in run[1:]:
                idx = f"({idx}) * _D{r} + _c{r}"
            lines.append(f"        _va{k} = _in{k}[{idx}]")
    for j, e in enumerate(exprs):
        lines.append(f"        _vo{j} = _T({_rewrite(e, n_dev, j)})")
    for r, j in enumerate(results):
        lines.append(f"        _out{r}[_i] = _vo{j}")
    return "\n".join(lines) + "\n"


_GCACHE: dict = {}


def group_pyfunc(src, dtype, cuda_module=None):
    ns = {"cuda": cuda_module if cuda_module is not None else _cu(), "math": math, "_T": ck._nbtype(dtype)}
    exec(compile(src, "<graphc cuda elementwise group>", "exec"), ns)  # noqa: S102
    return ns["_ew_kernel"]


def _group_kernel(src, dtype):
    key = (src, np.dtype(dtype))
    k = _GCACHE.get(key)
    if k is None:
        k = _cu().jit(group_pyfunc(src, dtype))
        _GCACHE[key] = k
    return k


def plan_elementwise(body, results, in_shapes, out_shape, inline):
    """How an elementwise group is lowered. body [(expr, refs)]; in_shapes per outer input; inline {k:
    value} for inputs that are scalar constants. Returns a dict: dev (outer input index per device input),
    modes, loop dims, exprs, and either ("ck", exprs for elementwise_kernel) or ("group", source)."""
    dev = [k for k in range(len(in_shapes)) if k not in inline]
    dev_index = {k: j for j, k in enumerate(dev)}
    loop, modes = collapse(out_shape, [in_shapes[k] for k in dev])
    exprs = body_expressions(body, inline, dev_index)
    plan = {"dev": dev, "modes": modes, "loop": loop, "exprs": exprs, "results": list(results)}
    uses = [0] * len(body)
    for _, refs in body:
        for kind, i in refs:
            if kind == "body":
                uses[i] += 1
    simple = (all(m == "f" for m in modes) and list(results) == sorted(results)
              and all(uses[j] <= 1 for j in range(len(body)) if j not in results))
    if simple:
        # compose one expression per result for cuda_kernels.elementwise_kernel (results may use the
        # earlier results o<p>; other body values are inlined: each is used once, nothing is recomputed)
        pos = {j: p for p, j in enumerate(results)}
        text = {}
        for j, e in enumerate(exprs):
            text[j] = re.sub(r"\bo(\d+)\b",
                             lambda m: f"o{pos[int(m.group(1))]}" if int(m.group(1)) in pos
                             else f"({text[int(m.group(1))]})", e)
        plan["kind"] = "ck"
        plan["ck_exprs"] = tuple(text[j] for j in results)
    else:
        plan["kind"] = "group"
        plan["source"] = group_source(exprs, list(results), modes)
    return plan


# ================================================================================ device-backed state

class DeviceState(MutableMapping):
    """``exe.state`` of the cuda backend: name -> numpy array, backed by device arrays.

    Reading an entry copies it from the device when the device holds a newer value; since the caller
    may change the array it got (``exe.state["optim/lr"][...] = 0.01``), the entry is uploaded before
    the next run if its bytes changed (a host comparison with the copy read, no transfer otherwise).
    Assigning an entry copies the value in and uploads it before the next run. ``peek`` gives a copy
    without any of this."""

    def __init__(self, host, dev):
        self._host = host          # name -> contiguous numpy array (declared shape)
        self._dev = dev            # name -> flat device array
        self._stale = set()        # the device is newer than the host copy
        self._read = {}            # name -> bytes as read (handed out: upload if they change)
        self._dirty = set()        # assigned on the host: upload

    def _sync(self, n):
        h = self._host[n]
        if n in self._stale:
            if h.size:
                self._dev[n].copy_to_host(h.reshape(-1))
            self._stale.discard(n)
        return h

    def __getitem__(self, n):
        h = self._sync(n)
        if n not in self._dirty:
            self._read[n] = h.tobytes()
        return h

    def __setitem__(self, n, v):
        if n not in self._host:
            raise GraphError(f"no state named {n!r}; states are {list(self._host)[:8]}")
        h = self._host[n]
        arr = np.asarray(v)
        if arr.size != h.size:
            raise GraphError(f"state {n!r} has shape {h.shape}; cannot assign an array of shape {arr.shape}")
        np.copyto(h, arr.reshape(h.shape), casting="unsafe")
        self._stale.discard(n)
        self._read.pop(n, None)
        self._dirty.add(n)

    def __delitem__(self, n):
        raise GraphError("states of a compiled graph cannot be removed")

    def __iter__(self):
        return iter(self._host)

    def __len__(self):
        return len(self._host)

    def __contains__(self, n):
        return n in self._host

    def shape(self, n):
        return self._host[n].shape

    def peek(self, n):
        """A host copy of the current value."""
        return self._sync(n).copy()

    def device(self, n):
        return self._dev[n]

    def push(self):
        """Uploads the entries changed on the host since they were read or assigned."""
        if not (self._dirty or self._read):
            return
        for n, before in self._read.items():
            if self._host[n].tobytes() != before:
                self._dirty.add(n)
        for n in self._dirty:
            if self._host[n].size:
                self._dev[n].copy_to_device(self._host[n].reshape(-1))
        self._dirty.clear()
        self._read.clear()

    def mark_device_newer(self, names):
        self._stale.update(names)


# =============================================================================== binding + executable

class _Bound:
    def __init__(self):
        self.V = {}              # value name -> flat device array
        self.steps = []          # (node name, launch callable)
        self.feeds = []          # (input name, device array)
        self.want = []           # (name, device array, shape)
        self.copy_back = []      # (state name, device array of its new value)
        self.scratch_bytes = 0
        self.bind_s = 0.0
        self.first_run_s = None


def _cstrides(shape):
    st, acc = [], 1
    for d in reversed(shape):
        st.append(acc)
        acc *= d
    return list(reversed(st))


class CudaExecutable(Executable):
    backend = "cuda"

    def __init__(self, graph, dtype=None, pipeline=None, verbose=False, **options):
        t0 = time.perf_counter()
        self._cuda = _cu()                     # BackendError (with the fix) when CUDA cannot run here
        super().__init__(graph, dtype, pipeline)
        if self.dtype not in (np.float32, np.float64):
            raise BackendError(f"the cuda backend runs float32 or float64, not {self.dtype}")
        self.simulator = ck.is_simulator()
        self.device = ck.cuda_status()[1]
        self.schedule = getattr(graph, "schedule", None) or graph.topo()
        self.options = options
        self.verbose = verbose
        c = self._cuda
        host, dev = {}, {}
        for n, v in self.state.items():
            h = np.array(v, order="C")     # (np.ascontiguousarray would turn a 0-d scalar into shape (1,))
            host[n] = h
            dev[n] = c.to_device(h.reshape(-1))
        self.state = DeviceState(host, dev)
        self.consts = {}
        for n in self.schedule:
            nd = graph.nx.nodes[n]
            if nd["op"] == "const":
                v = np.ascontiguousarray(self._cast(np.asarray(nd["attrs"]["value"]), nd["dtype"]))
                self.consts[n] = (v, c.to_device(v.reshape(-1)))
        self._bindings = {}
        self._ctx = RunContext({}, False, 0)
        self.conv_module = "cuda_kernels (implicit GEMM, fused conv-ReLU-pool)"
        self.compile_times = {"lower_s": time.perf_counter() - t0, "bindings": {}}

    # ------------------------------------------------------------------ state (host copies on demand)
    @property
    def params(self):
        """Trainable parameters by name: host copies of the device values."""
        return {n: self.state.peek(n) for n in self.graph.param_names}

    def state_dict(self):
        d = {n: self.state.peek(n) for n in self.state}
        d["__step__"] = np.array(self.step_count)
        return d

    # ------------------------------------------------------------------ binding
    def _plan(self, want, inplace):
        from graphc.passes.memory import plan_for
        return plan_for(self.graph, want, inplace, self.schedule)

    def _binding(self, env, want, inplace):
        key = (tuple(sorted(env.items())), tuple(want), inplace)
        b = self._bindings.get(key)
        if b is None:
            t0 = time.perf_counter()
            b = self._bind(env, want, inplace)
            b.bind_s = time.perf_counter() - t0
            self._bindings[key] = b
            self.compile_times["bindings"][key] = b
        return b

    def _bind(self, env, want, inplace):
        g = self.graph
        nodes = g.nx.nodes
        plan = self._plan(want, inplace)
        c = self._cuda
        self._binding_env = dict(env)
        b = _Bound()
        b.plan, b.env = plan, dict(env)
        slot_sizes = plan.slot_nbytes(env, self.dtype.itemsize)
        slot_bufs = {}
        V = b.V

        def shape_of(name):
            return tuple(shapes.resolve(nodes[name]["shape"], env))

        def np_dtype(name):
            dt = nodes[name]["dtype"]
            return self.dtype if dt.startswith("float") else np.dtype(dt)

        def scratch(n, dt=None):
            dt = np.dtype(dt or self.dtype)
            b.scratch_bytes += max(int(n), 1) * dt.itemsize
            return c.device_array(max(int(n), 1), dtype=dt)

        def out_array(name):
            """The flat device array `name` is written into: its slot's view, the state it updates in
            place, or (a result nothing reads in this binding) a private scratch buffer."""
            if name in V:
                return V[name]
            kind = plan.kind.get(name)
            n = shapes.numel(shape_of(name)) or 1
            dt = np_dtype(name)
            if kind == "state":
                arr = self.state.device(plan.inplace[name])
            elif kind == "buffer":
                k = plan.slot_of[name]
                if k not in slot_bufs:
                    slot_bufs[k] = c.device_array(max(slot_sizes[k], 1), dtype=np.uint8)
                arr = slot_bufs[k][:n * dt.itemsize].view(dt)
            else:
                arr = scratch(n, dt)
            V[name] = arr
            return arr

        self._scratch = scratch
        for n in [n for n in self.schedule if plan.kind.get(n) in ("input", "param", "const")]:
            op = nodes[n]["op"]
            if op == "input":
                arr = c.device_array(max(shapes.numel(shape_of(n)) or 1, 1), dtype=np_dtype(n))
                V[n] = arr
                b.feeds.append((n, arr))
            elif op == "param":
                V[n] = self.state.device(n)
            else:
                V[n] = self.consts[n][1]
        for n in plan.program:
            nd = nodes[n]
            op = nd["op"]
            if op == "getitem":
                continue                       # written by its fused node
            if plan.kind[n] == "alias":
                V[n] = V[nd["inputs"][0]]      # flat arrays: a reshape is the same array
                continue
            b.steps.append((n, self._lower(n, nd, V, shape_of, np_dtype, scratch, out_array)))
        for w in want:
            b.want.append((w, V[w], shape_of(w)))
        for s, u in g.updates.items():
            if u in V and u in set(want) and plan.kind.get(u) != "state" and V[u] is not self.state.device(s):
                b.copy_back.append((s, V[u]))
        return b

    # ------------------------------------------------------------------ lowering of one node
    def _lower(self, n, nd, V, shape_of, np_dtype, scratch, out_array):
        op = nd["op"]
        if op == "fused":
            return self._lower_fused(n, nd, V, shape_of, scratch, out_array)
        if optable.OPS[op].scalar is not None:
            body = [(optable.scalar_expression(op, nd["attrs"], _literal),
                     [("in", k) for k in range(len(nd["inputs"]))])]
            return self._lower_elementwise(body, list(nd["inputs"]), [0], [out_array(n)], shape_of(n), V, shape_of)
        lw = _LOWER.get(op)
        if lw is not None:
            step = lw(self, n, nd, V, shape_of, scratch, out_array)
            if step is not None:
                return step
        return self._host_fallback(n, nd, V, shape_of, out_array)

    def _result_arrays(self, n, nres, out_array, shape_of):
        """Output arrays of node n's results, by result index (a fused node with several results writes
        into its getitem nodes' arrays)."""
        if nres == 1:
            return [out_array(n)]
        by_index = {self.graph.nx.nodes[c]["attrs"]["index"]: c for c in self.graph.nx.successors(n)
                    if self.graph.nx.nodes[c]["op"] == "getitem"}
        outs = []
        body = self.graph.nx.nodes[n]["attrs"]["body"]
        res = self.graph.nx.nodes[n]["attrs"]["results"]
        for k in range(nres):
            if k in by_index:
                outs.append(out_array(by_index[k]))
            else:                               # a result nothing reads (removed): scratch
                bn = body[res[k]]
                shp = shapes.resolve(bn["shape"], self._binding_env)
                dt = self.dtype if bn["dtype"].startswith("float") else np.dtype(bn["dtype"])
                outs.append(self._scratch(shapes.numel(shp) or 1, dt))
        return outs

    def _host_fallback(self, n, nd, V, shape_of, out_array):
        """The op's reference implementation on the host: inputs copied down, results copied up."""
        opdef = optable.OPS[nd["op"]]
        attrs = nd["attrs"]
        ins = [(V[i], shape_of(i)) for i in nd["inputs"]]
        nres = len(attrs["results"]) if nd["op"] == "fused" else 1
        outs = self._result_arrays(n, nres, out_array, shape_of)
        shape = nd["shape"]
        ctx = self._ctx
        fdt = self.dtype

        def step():
            ctx.out_shape = shapes.resolve(shape, ctx.env)
            vals = [a.copy_to_host().reshape(s) for a, s in ins]
            out = opdef.ref(vals, attrs, ctx)
            outs_v = out if isinstance(out, tuple) else (out,)
            for dst, v in zip(outs, outs_v):
                v = np.asarray(v)
                if v.dtype.kind == "f" and v.dtype != fdt:
                    v = v.astype(fdt)
                v = np.ascontiguousarray(v, dtype=dst.dtype).reshape(-1)
                if v.size:
                    dst.copy_to_device(v)
        step.fallback = True
        return step

    # ------------------------------------------------------------------ fused patterns
    def _lower_fused(self, n, nd, V, shape_of, scratch, out_array):
        attrs = nd["attrs"]
        pattern = attrs["pattern"]
        body = attrs["body"]
        res = list(attrs["results"])
        ins = list(nd["inputs"])
        outs = self._result_arrays(n, len(res), out_array, shape_of)
        if pattern == "elementwise":
            ebody = [(optable.scalar_expression(bn["op"], bn["attrs"], _literal), list(bn["inputs"])) for bn in body]
            return self._lower_elementwise(ebody, ins, res, outs, tuple(shapes.resolve(body[res[0]]["shape"],
                                                                                        self._binding_env)),
                                           V, shape_of)
        if pattern == "conv_relu":
            conv = body[0]["attrs"]
            return _conv_step(V, ins, shape_of, conv["stride"], conv["pads"], outs[0], relu=True)
        if pattern == "conv_relu_maxpool":
            conv, pool = body[0]["attrs"], body[2]["attrs"]
            return _conv_pool_step(self, V, ins, shape_of, conv["stride"], conv["pads"], pool["size"],
                                   pool["stride"], outs[0], outs[1] if len(res) > 1 else None, scratch)
        if pattern == "route_relu":
            hw = tuple(body[0]["attrs"]["in_hw"])
            dz = outs[0]
            steps = [_route_scatter_step(V[ins[0]], V[ins[1]], dz, shape_of(ins[0]), hw)]
            if len(res) > 1:
                dyshape = shape_of(ins[0])
                zshape = (dyshape[0], dyshape[1], *hw)
                steps.append(_sum_step(dz, zshape, tuple(body[1]["attrs"]["axes"]), 1.0, outs[1], self.dtype,
                                       scratch))
            return _seq(steps)
        return self._host_fallback(n, nd, V, shape_of, out_array)

    def _lower_elementwise(self, body, ins, res, outs, out_shape, V, shape_of):
        nodes = self.graph.nx.nodes
        inline = {}
        for k, i in enumerate(ins):
            if nodes[i]["op"] == "const" and np.asarray(nodes[i]["attrs"]["value"]).size == 1:
                inline[k] = float(np.asarray(nodes[i]["attrs"]["value"]).reshape(-1)[0])
        plan = plan_elementwise(body, res, [shape_of(i) for i in ins], out_shape, inline)
        return _elementwise_step(plan, [V[ins[k]] for k in plan["dev"]], outs, self.dtype)

    # ------------------------------------------------------------------ running
    def _execute(self, feeds, env, training, want, inplace=False):
        b = self._binding(env, want, inplace)
        self.state.push()
        for name, arr in b.feeds:
            v = feeds[name]
            if v.size:
                arr.copy_to_device(np.ascontiguousarray(v).reshape(-1))
        ctx = self._ctx
        ctx.env, ctx.training, ctx.step = env, training, self.step_count
        t0 = time.perf_counter() if b.first_run_s is None else None
        for _, f in b.steps:
            f()
        if t0 is not None:
            self._cuda.synchronize()
            b.first_run_s = time.perf_counter() - t0
        return b

    def run(self, feeds, outputs=None, training=False, check_finite=False):
        feeds, env = self.check_feeds(feeds, check_finite)
        want = list(self.outputs if outputs is None else outputs)
        for o in want:
            if o not in self.graph:
                raise GraphError(f"no value named {o!r} to fetch; outputs are {self.outputs} (a value fused "
                                 "away is fetchable with compile(..., keep=[...]) or fuse=False)")
        stats = self.stat_updates(training)
        b = self._execute(feeds, env, training, want + [u for u in stats.values() if u not in want])
        out = {w: arr.copy_to_host().reshape(shp) for w, arr, shp in b.want if w in want}
        for s, u in stats.items():          # batch norm's running statistics, device to device
            self.state.device(s).copy_to_device(b.V[u])
        self.state.mark_device_newer(stats)
        return out

    def _train_want(self):
        return [self.graph.loss] + [u for u in self.graph.updates.values() if u != self.graph.loss]

    def step(self, feeds, check_finite=False) -> float:
        if not self.graph.updates:
            raise GraphError("this executable has no optimizer: compile(graph, optimizer=gc.optim.SGD(...))")
        feeds, env = self.check_feeds(feeds, check_finite)
        b = self._execute(feeds, env, True, self._train_want(), inplace=True)
        for s, arr in b.copy_back:
            self.state.device(s).copy_to_device(arr)
        self.state.mark_device_newer(self.graph.updates)
        self.step_count += 1
        return float(b.V[self.graph.loss].copy_to_host()[0])     # the one copy back of a step

    # ------------------------------------------------------------------ compile time and profiling
    def _dummy_feeds(self, batch):
        f = {}
        for n, (shape, dt) in self.input_types.items():
            s = tuple(batch if isinstance(d, str) else d for d in shape)
            f[n] = np.zeros(s, dtype=self.dtype if dt.startswith("float") else dt)
        return f

    @contextlib.contextmanager
    def _state_saved(self):
        saved = self.state_dict()
        try:
            yield
        finally:
            self.load_state_dict(saved)
            self.state.push()

    def precompile(self, batch=1, train=None, feeds=None):
        """Binds for `batch` and runs once (zero feeds unless given), so every kernel is compiled;
        parameters and optimizer state are left unchanged. Returns the seconds it took."""
        train = bool(self.graph.updates) if train is None else train
        feeds = feeds or self._dummy_feeds(batch)
        t0 = time.perf_counter()
        with self._state_saved():
            if train:
                self.step(feeds)
            else:
                self.run(feeds)
            self._cuda.synchronize()
        return time.perf_counter() - t0

    def profile(self, feeds, train=None, repeats=10, warmup=2):
        """Times every launch group of a run (or training step), synchronizing around each: a list of
        dicts {name, kind, ops, shapes, ms (median), flops, fallback}. Parameters are left unchanged."""
        train = bool(self.graph.updates) if train is None else train
        feeds_c, env = self.check_feeds(feeds)
        want = self._train_want() if train else list(self.outputs)
        c = self._cuda
        times = {}
        with self._state_saved():
            b = self._execute(feeds_c, env, train, want, inplace=train)
            c.synchronize()
            for r in range(warmup + repeats):
                for name, f in b.steps:
                    t0 = time.perf_counter()
                    f()
                    c.synchronize()
                    if r >= warmup:
                        times.setdefault(name, []).append(time.perf_counter() - t0)
        rows = []
        for name, f in b.steps:
            rows.append(dict(self.describe_kernel(name, env), ms=1e3 * float(np.median(times[name])),
                             fallback=bool(getattr(f, "fallback", False))))
        return rows

    def fallbacks(self):
        """Names of the bound steps that run on the host (see HOST_FALLBACKS)."""
        return sorted({n for b in self._bindings.values() for n, f in b.steps if getattr(f, "fallback", False)})


# ================================================================================ launch helpers

def _launcher(k, grid, block, *args):
    """A launch with its arguments resolved at bind time. (The configuration k[grid, block] is made at
    each call: the simulator's kernels keep the last configuration on the kernel object itself, so one
    made in advance would be overwritten by another launch of the same kernel.)"""
    def step():
        k[grid, block](*args)
    return step


def _seq(steps):
    steps = [s for s in steps if s is not None]
    if len(steps) == 1:
        return steps[0]

    def step():
        for s in steps:
            s()
    return step


def _elementwise_step(plan, ins, outs, dtype):
    n = int(outs[0].size)
    if plan["kind"] == "ck":
        k = ck.elementwise_kernel(plan["ck_exprs"], len(ins), 0)
        o = tuple(outs) if len(outs) > 1 else outs[0]

        def step():
            k(*ins, out=o)
        step.kernel = ("elementwise_kernel", plan["ck_exprs"])
        return step
    kern = _group_kernel(plan["source"], dtype)
    rank = max((len(m) for m in plan["modes"] if isinstance(m, tuple)), default=0)
    args = (n, *outs, *ins, *[int(d) for d in plan["loop"][:rank]])
    grid, block = _grid(n)
    step = _launcher(kern, grid, block, *args)
    step.kernel = ("group", plan["source"])
    return step


def _fill_step(arr, value):
    return lambda: ck._fill(arr, value)


def _copy_step(src, dst, space, sstr, dstr, sbase=0, dbase=0, scale=None):
    """Strided copy over the index space `space` (<= 6-D); None when the rank is too high."""
    space = [int(s) for s in space]
    if len(space) > MAX_COPY_RANK:
        return None
    pad = MAX_COPY_RANK - len(space)
    s6 = [1] * pad + space
    a6 = [0] * pad + [int(v) for v in sstr]
    b6 = [0] * pad + [int(v) for v in dstr]
    n = 1
    for s in space:
        n *= s
    if n == 0:
        return lambda: None
    dt = np.dtype(dst.dtype)
    k = _kern("copy" if scale is None else "copy_scaled", dt)
    sc = dt.type(1 if scale is None else scale)
    grid, block = _grid(n)
    return _launcher(k, grid, block, src, dst, n, *s6, *a6, *b6, int(sbase), int(dbase), sc)


def _conv_step(V, ins, shape_of, stride, pads, out, relu=False):
    x, w = V[ins[0]], V[ins[1]]
    bias = V[ins[2]] if len(ins) == 3 else None
    geom = ck._conv_geom(shape_of(ins[0]), shape_of(ins[1]), tuple(stride), tuple(pads))
    N, C, H, W, K, KH, KW, Ho, Wo = geom[:9]
    flags = (ck._F_BIAS if bias is not None else 0) | (ck._F_RELU if relu else 0)

    def step():
        ck._igemm("igemm_fwd", w, x, bias, out, K, N * Ho * Wo, C * KH * KW, dims=geom, flags=flags)
    return step


def _conv_pool_step(self, V, ins, shape_of, stride, pads, size, pstride, y, route, scratch):
    """maxpool(relu(conv(x, w) + b)) (+ the route) with cuda_kernels' fused kernel."""
    x, w = V[ins[0]], V[ins[1]]
    bias = V[ins[2]] if len(ins) == 3 else None
    geom = ck._conv_geom(shape_of(ins[0]), shape_of(ins[1]), tuple(stride), tuple(pads))
    N, C, H, W, K, KH, KW, Ho, Wo, sh, sw, pt, pl = geom
    PH, PW = size
    psh, psw = pstride
    Hp, Wp = (Ho - PH) // psh + 1, (Wo - PW) // psw + 1
    dt = self.dtype
    KHKW = KH * KW
    if PH * PW > ck.FUSE_MAXWIN or KHKW > ck.FUSE_FSM:
        # geometry the fused kernel does not take: conv (+bias), max-pool with route, ReLU / route fix-up
        z = scratch(N * K * Ho * Wo)
        rt = route if route is not None else scratch(N * K * Hp * Wp, np.int32)
        fix_y = ck.elementwise_kernel("a0 if a0 > 0 else 0", 1)
        fix_r = ck.elementwise_kernel("a1 if a0 > 0 else -1", 2)
        mp = _maxpool_launch(z, y, rt, (N, K, Ho, Wo), (PH, PW), (psh, psw), True, dt)
        flags = ck._F_BIAS if bias is not None else 0

        def step():
            ck._igemm("igemm_fwd", w, x, bias, z, K, N * Ho * Wo, C * KHKW, dims=geom, flags=flags)
            mp()
            if route is not None:
                fix_r(y, rt, out=rt)
            fix_y(y, out=y)
        return step
    cc = max(1, min(C, ck.FUSE_FSM // KHKW))
    bx = ck._p2(Wp, 16)
    by = ck._p2(Hp, 16)
    bz = max(1, min(ck.FUSE_KZ, 256 // (bx * by), ck._p2(N * K, ck.FUSE_KZ)))
    grid = (ck._cdiv(Wp, bx), ck._cdiv(Hp, by), max(1, min(ck._cdiv(N * K, bz), 65535)))
    flags = (1 if bias is not None else 0) | (2 if route is not None else 0)
    k = ck._kernel("conv_relu_pool", dt)
    args = (x, w, bias if bias is not None else ck._dummy(dt), y, route if route is not None else ck._dummy(np.int32),
            N, C, H, W, K, KH, KW, Ho, Wo, sh, sw, pt, pl, PH, PW, psh, psw, Hp, Wp, cc, flags)
    return _launcher(k, grid, (bx, by, bz), *args)


def _maxpool_launch(x, y, route, xshape, size, stride, save, dt):
    N, C, H, W = xshape
    PH, PW = size
    sh, sw = stride
    Ho, Wo = (H - PH) // sh + 1, (W - PW) // sw + 1
    n = N * C * Ho * Wo
    k = ck._kernel("maxpool", dt)
    grid, block = _grid(n)
    rt = route if route is not None else ck._dummy(np.int32)
    return _launcher(k, grid, block, x, y, rt, N * C, H, W, Ho, Wo, PH, PW, sh, sw, 1 if save else 0)


def _route_scatter_step(dy, route, dz, dyshape, in_hw):
    N, C, Hp, Wp = dyshape
    H, W = in_hw
    n = N * C * Hp * Wp
    k = ck._kernel("route_scatter", np.dtype(dz.dtype))
    grid, block = _grid(max(n, 1))
    scatter = _launcher(k, grid, block, dy, route, dz, N * C, Hp * Wp, H * W) if n else None
    return _seq([_fill_step(dz, 0), scatter])


# ---- reductions (cuda_kernels' reduce kernels into preallocated outputs and scratch) -------------------

def _rmid(x, A, B, C, scale, out, dt):
    """(A, B, C) -> (A, C) summing over B."""
    if B == 0:
        return _fill_step(out, 0)
    k = ck._kernel("reduce_mid", dt)
    bx, by = ck._p2(C, 32), ck._p2(B, 8)
    grid = (ck._cdiv(C, bx), max(1, min(A, 65535)))
    sc = dt.type(scale)
    return _launcher(k, grid, (bx, by), x, out, A, B, C, sc)


def _rkm(x, A, B, C, scale, out, dt, scratch):
    """(A, B, C) -> (B,) summing over A and C (split over the reduced range when B is small)."""
    if C == 1:
        return _rmid(x, 1, A, B, scale, out, dt)
    AC = A * C
    S = 1
    target = 4 * ck._sm_count()
    if B < target:
        S = max(1, min(ck._cdiv(target, B), ck._cdiv(AC, 8 * ck.RED_BLOCK), 65535))
    k = ck._kernel("reduce_keep_mid", dt)
    block = max(32, ck._p2(ck._cdiv(AC, S), ck.RED_BLOCK))
    grid = (max(1, min(B, 1 << 20)), S)
    if S == 1:
        sc = dt.type(scale)
        return _launcher(k, grid, block, x, out, A, B, C, S, sc)
    part = scratch(S * B)
    one = dt.type(1.0)
    return _seq([_launcher(k, grid, block, x, part, A, B, C, S, one), _rmid(part, 1, S, B, scale, out, dt)])


def _sum_step(x, shape, axes, scale, out, dt, scratch):
    """out = scale * sum of x (shape) over axes, with preallocated outputs (as cuda_kernels._sum_flat)."""
    dt = np.dtype(dt)
    shape = tuple(int(s) for s in shape)
    nd = len(shape)
    red = sorted({a % nd for a in axes}) if nd else []
    if not red:
        return _copy_step(x, out, [shapes.numel(shape) or 1], [1], [1], scale=scale)
    kept = [i for i in range(nd) if i not in red]

    def prod(seq):
        p = 1
        for i in seq:
            p *= shape[i]
        return p
    if not kept:
        return _rkm(x, 1, 1, prod(range(nd)), scale, out, dt, scratch)
    if kept == list(range(kept[0], kept[-1] + 1)):
        return _rkm(x, prod(range(kept[0])), prod(kept), prod(range(kept[-1] + 1, nd)), scale, out, dt, scratch)
    if red == list(range(red[0], red[-1] + 1)):
        return _rmid(x, prod(range(red[0])), prod(red), prod(range(red[-1] + 1, nd)), scale, out, dt)
    last = [red[-1]]
    while last[0] - 1 in red:
        last.insert(0, last[0] - 1)
    new_shape = tuple(s for i, s in enumerate(shape) if i not in last)
    part = scratch(shapes.numel(new_shape) or 1)
    first = _rmid(x, prod(range(last[0])), prod(last), prod(range(last[-1] + 1, nd)), 1.0, part, dt)
    rest = _sum_step(part, new_shape, [a for a in red if a < last[0]], scale, out, dt, scratch)
    return _seq([first, rest])


# ================================================================================ per-op lowering

def _low_conv(self, n, nd, V, shape_of, scratch, out_array):
    a = nd["attrs"]
    if not is_plain_conv(a):
        return None                     # grouped / dilated: host fallback until they have kernels
    return _conv_step(V, list(nd["inputs"]), shape_of, a["stride"], a["pads"], out_array(n))


def _low_conv_dx(self, n, nd, V, shape_of, scratch, out_array):
    a = nd["attrs"]
    if not is_plain_conv(a):
        return None
    dyn, wn = nd["inputs"]
    dy, w = V[dyn], V[wn]
    out = out_array(n)
    N, K = shape_of(dyn)[:2]
    ws = shape_of(wn)
    H, W = a["in_hw"]
    geom = ck._conv_geom((N, ws[1], H, W), ws, tuple(a["stride"]), tuple(a["pads"]))
    C, KH, KW = geom[1], geom[5], geom[6]

    def step():
        ck._igemm("igemm_dx", w, dy, None, out, C, N * H * W, K * KH * KW, dims=geom)
    return step


def _low_conv_dw(self, n, nd, V, shape_of, scratch, out_array):
    a = nd["attrs"]
    if not is_plain_conv(a):
        return None
    xn, dyn = nd["inputs"]
    x, dy = V[xn], V[dyn]
    out = out_array(n)
    xs = shape_of(xn)
    N, K, Ho, Wo = shape_of(dyn)
    KH, KW = a["k_hw"]
    geom = ck._conv_geom(xs, (K, xs[1], KH, KW), tuple(a["stride"]), tuple(a["pads"]))
    C = xs[1]

    def step():
        ck._igemm("igemm_dw", dy, x, None, out, K, C * KH * KW, N * Ho * Wo, dims=geom)
    return step


def _low_matmul(self, n, nd, V, shape_of, scratch, out_array):
    a = nd["attrs"]
    an, bn = nd["inputs"]
    A, B = V[an], V[bn]
    out = out_array(n)
    ta, tb = bool(a.get("trans_a")), bool(a.get("trans_b"))
    sa, sb = shape_of(an), shape_of(bn)
    if len(sa) != 2 or len(sb) != 2:
        return None                     # batched matmul: host fallback
    M, R = (sa[1], sa[0]) if ta else sa
    P = sb[0] if tb else sb[1]
    flags = (ck._F_TA if ta else 0) | (ck._F_TB if tb else 0)

    def step():
        ck._igemm("igemm_mm", A, B, None, out, M, P, R, flags=flags)
    return step


def _low_maxpool(self, n, nd, V, shape_of, scratch, out_array):
    a = nd["attrs"]
    return _maxpool_launch(V[nd["inputs"][0]], out_array(n), None, shape_of(nd["inputs"][0]), a["size"],
                           a["stride"], False, self.dtype)


def _low_maxpool_argmax(self, n, nd, V, shape_of, scratch, out_array):
    a = nd["attrs"]
    route = out_array(n)
    y = scratch(route.size)
    mp = _maxpool_launch(V[nd["inputs"][0]], y, route, shape_of(nd["inputs"][0]), a["size"], a["stride"], True,
                         self.dtype)
    if not a.get("relu", False):
        return mp
    fix = ck.elementwise_kernel("a1 if a0 > 0 else -1", 2)
    return _seq([mp, lambda: fix(y, route, out=route)])


def _low_maxpool_route(self, n, nd, V, shape_of, scratch, out_array):
    a = nd["attrs"]
    xn, dyn = nd["inputs"]
    dx = out_array(n)
    dys = shape_of(dyn)
    y = scratch(shapes.numel(dys))
    rt = scratch(shapes.numel(dys), np.int32)
    mp = _maxpool_launch(V[xn], y, rt, shape_of(xn), a["size"], a["stride"], True, self.dtype)
    return _seq([mp, _route_scatter_step(V[dyn], rt, dx, dys, shape_of(xn)[2:])])


def _low_maxpool_gather(self, n, nd, V, shape_of, scratch, out_array):
    a = nd["attrs"]
    xn, gn = nd["inputs"]
    out = out_array(n)
    os_ = shape_of(n)
    xs = shape_of(xn)
    cnt = shapes.numel(os_)
    y = scratch(cnt)
    rt = scratch(cnt, np.int32)
    mp = _maxpool_launch(V[xn], y, rt, xs, a["size"], a["stride"], True, self.dtype)
    k = _kern("gather", self.dtype)
    grid, block = _grid(cnt)
    g = V[gn]
    return _seq([mp, _launcher(k, grid, block, g, rt, out, cnt, os_[2] * os_[3], xs[2] * xs[3])])


def _low_route_scatter(self, n, nd, V, shape_of, scratch, out_array):
    dyn, rn = nd["inputs"]
    return _route_scatter_step(V[dyn], V[rn], out_array(n), shape_of(dyn), tuple(nd["attrs"]["in_hw"]))


def _avg_geom(xshape, size, stride):
    N, C, H, W = xshape
    PH, PW = size
    sh, sw = stride
    return N * C, H, W, (H - PH) // sh + 1, (W - PW) // sw + 1, PH, PW, sh, sw


def _low_avgpool(self, n, nd, V, shape_of, scratch, out_array):
    a = nd["attrs"]
    x, y = V[nd["inputs"][0]], out_array(n)
    NC, H, W, Ho, Wo, PH, PW, sh, sw = _avg_geom(shape_of(nd["inputs"][0]), a["size"], a["stride"])
    dt = self.dtype
    k = ck._kernel("avgpool", dt)
    grid, block = _grid(NC * Ho * Wo)
    inv = dt.type(1.0 / (PH * PW))
    return _launcher(k, grid, block, x, y, NC, H, W, Ho, Wo, PH, PW, sh, sw, inv)


def _low_avgpool_spread(self, n, nd, V, shape_of, scratch, out_array):
    a = nd["attrs"]
    dy, dx = V[nd["inputs"][0]], out_array(n)
    NC, H, W, Ho, Wo, PH, PW, sh, sw = _avg_geom(shape_of(n), a["size"], a["stride"])
    dt = self.dtype
    k = ck._kernel("avgpool_bwd", dt)
    grid, block = _grid(NC * H * W)
    inv = dt.type(1.0 / (PH * PW))
    return _launcher(k, grid, block, dy, dx, NC, H, W, Ho, Wo, PH, PW, sh, sw, inv)


def _low_gap(self, n, nd, V, shape_of, scratch, out_array):
    N, C, H, W = shape_of(nd["inputs"][0])
    return _rkm(V[nd["inputs"][0]], 1, N * C, H * W, 1.0 / (H * W), out_array(n), self.dtype, scratch)


def _low_gap_spread(self, n, nd, V, shape_of, scratch, out_array):
    N, C, H, W = shape_of(n)
    return _copy_step(V[nd["inputs"][0]], out_array(n), (N, C, H, W), (C, 1, 0, 0), _cstrides((N, C, H, W)),
                      scale=1.0 / (H * W))


def _low_sum(self, n, nd, V, shape_of, scratch, out_array, mean=False):
    xs = shape_of(nd["inputs"][0])
    axes = tuple(nd["attrs"]["axes"])
    cnt = 1
    for a in axes:
        cnt *= xs[a]
    return _sum_step(V[nd["inputs"][0]], xs, axes, (1.0 / max(cnt, 1)) if mean else 1.0, out_array(n),
                     self.dtype, scratch)


def _low_mean(self, n, nd, V, shape_of, scratch, out_array):
    return _low_sum(self, n, nd, V, shape_of, scratch, out_array, mean=True)


def _low_sum_to(self, n, nd, V, shape_of, scratch, out_array):
    xs, ls = shape_of(nd["inputs"][0]), shape_of(nd["inputs"][1])
    lead = len(xs) - len(ls)
    axes = tuple(range(lead)) + tuple(lead + i for i, d in enumerate(ls) if d == 1 and xs[lead + i] != 1)
    return _sum_step(V[nd["inputs"][0]], xs, axes, 1.0, out_array(n), self.dtype, scratch)


def _broadcast_strides(src_shape, out_shape):
    """Element strides of a contiguous `src_shape` read as broadcast to `out_shape` (0 on broadcast dims)."""
    nd = len(out_shape)
    s = (1,) * (nd - len(src_shape)) + tuple(src_shape)
    st = _cstrides(s)
    return [0 if (s[d] == 1 and out_shape[d] != 1) else st[d] for d in range(nd)]


def _low_expand_like(self, n, nd, V, shape_of, scratch, out_array):
    os_ = shape_of(n)
    return _copy_step(V[nd["inputs"][0]], out_array(n), os_, _broadcast_strides(shape_of(nd["inputs"][0]), os_),
                      _cstrides(os_))


def _low_broadcast_like(self, n, nd, V, shape_of, scratch, out_array):
    a = nd["attrs"]
    os_ = shape_of(n)
    keep = tuple(1 if d in a["axes"] else s for d, s in enumerate(os_))
    cnt = 1
    for d in a["axes"]:
        cnt *= os_[d]
    return _copy_step(V[nd["inputs"][0]], out_array(n), os_, _broadcast_strides(keep, os_), _cstrides(os_),
                      scale=(1.0 / cnt) if a["mean"] else None)


def _low_transpose(self, n, nd, V, shape_of, scratch, out_array):
    axes = tuple(nd["attrs"]["axes"])
    xst = _cstrides(shape_of(nd["inputs"][0]))
    os_ = shape_of(n)
    return _copy_step(V[nd["inputs"][0]], out_array(n), os_, [xst[a] for a in axes], _cstrides(os_))


def _low_concat(self, n, nd, V, shape_of, scratch, out_array):
    axis = nd["attrs"]["axis"]
    out = out_array(n)
    ost = _cstrides(shape_of(n))
    steps, start = [], 0
    for i in nd["inputs"]:
        s = shape_of(i)
        st = _copy_step(V[i], out, s, _cstrides(s), ost, dbase=start * ost[axis])
        if st is None:
            return None
        steps.append(st)
        start += s[axis]
    return _seq(steps)


def _low_slice(self, n, nd, V, shape_of, scratch, out_array):
    a = nd["attrs"]
    xst = _cstrides(shape_of(nd["inputs"][0]))
    os_ = shape_of(n)
    return _copy_step(V[nd["inputs"][0]], out_array(n), os_, xst, _cstrides(os_), sbase=a["start"] * xst[a["axis"]])


def _low_unslice(self, n, nd, V, shape_of, scratch, out_array):
    a = nd["attrs"]
    out = out_array(n)
    gs = shape_of(nd["inputs"][0])
    ost = _cstrides(shape_of(n))
    cp = _copy_step(V[nd["inputs"][0]], out, gs, _cstrides(gs), ost, dbase=a["start"] * ost[a["axis"]])
    return None if cp is None else _seq([_fill_step(out, 0), cp])


def _low_pad2d(self, n, nd, V, shape_of, scratch, out_array):
    if nd["attrs"].get("mode", "constant") != "constant":
        return None                     # reflect / edge: host fallback
    t, _, l, _ = nd["attrs"]["pads"]
    out = out_array(n)
    xs = shape_of(nd["inputs"][0])
    os_ = shape_of(n)
    cp = _copy_step(V[nd["inputs"][0]], out, xs, _cstrides(xs), _cstrides(os_), dbase=t * os_[3] + l)
    return _seq([_fill_step(out, nd["attrs"]["value"]), cp])


def _low_crop2d(self, n, nd, V, shape_of, scratch, out_array):
    if nd["attrs"].get("mode", "constant") != "constant":
        return None
    t, _, l, _ = nd["attrs"]["pads"]
    xs = shape_of(nd["inputs"][0])
    os_ = shape_of(n)
    return _copy_step(V[nd["inputs"][0]], out_array(n), os_, _cstrides(xs), _cstrides(os_), sbase=t * xs[3] + l)


def _softmax_rows(x, out, M, K, dt):
    k = ck._kernel("softmax", dt)
    grid = max(1, min(ck._cdiv(M, ck.SM_ROWS), 32 * ck._sm_count()))
    li, dy = ck._dummy(np.int32), ck._dummy(dt)
    one = dt.type(1.0)
    return _launcher(k, grid, (32, ck.SM_ROWS), x, li, dy, one, out, M, K)


def _low_softmax(self, n, nd, V, shape_of, scratch, out_array):
    xs = shape_of(n)
    axis = nd["attrs"]["axis"]
    out = out_array(n)
    K = xs[axis]
    M = (shapes.numel(xs) or 1) // max(K, 1)
    dt = self.dtype
    if axis == len(xs) - 1:
        return _softmax_rows(V[nd["inputs"][0]], out, M, K, dt)
    # permute the axis last, softmax the rows, permute back
    perm = [d for d in range(len(xs)) if d != axis] + [axis]
    ts = [xs[d] for d in perm]
    xst, tst = _cstrides(xs), _cstrides(ts)
    t1, t2 = scratch(M * K), scratch(M * K)
    to = _copy_step(V[nd["inputs"][0]], t1, ts, [xst[d] for d in perm], tst)
    back = _copy_step(t2, out, xs, [tst[perm.index(d)] for d in range(len(xs))], xst)
    if to is None or back is None:
        return None
    return _seq([to, _softmax_rows(t1, t2, M, K, dt), back])


def _labels_dense(self, name):
    return len(self.graph.nx.nodes[name]["shape"]) == 2


def _ew(self, exprs_body, ins, out, out_shape, in_shapes, results=None):
    """A generated elementwise kernel over explicit expressions (loss kernels)."""
    body = [(e, refs) for e, refs in exprs_body]
    plan = plan_elementwise(body, results or [len(body) - 1], in_shapes, out_shape, {})
    return _elementwise_step(plan, [ins[k] for k in plan["dev"]], [out], self.dtype)


def _onehot(self, labels, M, K, scratch):
    oh = scratch(M * K)
    k = _kern("onehot", self.dtype)
    grid, block = _grid(M * K)
    return oh, _launcher(k, grid, block, labels, oh, M * K, K)


def _low_sce(self, n, nd, V, shape_of, scratch, out_array):
    zn, ln = nd["inputs"][:2]
    M, K = shape_of(zn)
    dt = self.dtype
    out = out_array(n)
    rows = scratch(M)
    if _labels_dense(self, ln):
        k = _kern("xent_dense_rows", dt)
        grid, block = _grid(M)
        z, y = V[zn], V[ln]
        first = _launcher(k, grid, block, z, y, rows, M, K)
    else:
        k = ck._kernel("xent_rows", dt)
        grid = max(1, min(ck._cdiv(M, ck.SM_ROWS), 32 * ck._sm_count()))
        z, lab, dmy, one = V[zn], V[ln], ck._dummy(dt), dt.type(1.0)
        first = _launcher(k, grid, (32, ck.SM_ROWS), z, lab, dmy, one, rows, M, K)
    return _seq([first, _rkm(rows, 1, 1, M, 1.0 / max(M, 1), out, dt, scratch)])


def _low_sce_grad(self, n, nd, V, shape_of, scratch, out_array):
    zn, ln, dyn = nd["inputs"]
    M, K = shape_of(zn)
    dt = self.dtype
    out = out_array(n)
    if _labels_dense(self, ln):
        p = scratch(M * K)
        sm = _softmax_rows(V[zn], p, M, K, dt)
        ew = _ew(self, [(f"(a0 - a1) * (a2 / {float(M)!r})", [("in", 0), ("in", 1), ("in", 2)])],
                 [p, V[ln], V[dyn]], out, (M, K), [(M, K), (M, K), ()])
        return _seq([sm, ew])
    k = ck._kernel("xent_grad", dt)
    grid = max(1, min(ck._cdiv(M, ck.SM_ROWS), 32 * ck._sm_count()))
    z, lab, dy, one = V[zn], V[ln], V[dyn], dt.type(1.0)
    return _launcher(k, grid, (32, ck.SM_ROWS), z, lab, dy, one, out, M, K)


def _low_ce(self, n, nd, V, shape_of, scratch, out_array):
    pn, ln = nd["inputs"][:2]
    M, K = shape_of(pn)
    steps = []
    if _labels_dense(self, ln):
        y = V[ln]
    else:
        y, s = _onehot(self, V[ln], M, K, scratch)
        steps.append(s)
    t = scratch(M * K)
    steps.append(_ew(self, [("a1 * log(a0)", [("in", 0), ("in", 1)])], [V[pn], y], t, (M, K), [(M, K), (M, K)]))
    steps.append(_rkm(t, 1, 1, M * K, -1.0 / max(M, 1), out_array(n), self.dtype, scratch))
    return _seq(steps)


def _low_ce_grad(self, n, nd, V, shape_of, scratch, out_array):
    pn, ln, dyn = nd["inputs"]
    M, K = shape_of(pn)
    steps = []
    if _labels_dense(self, ln):
        y = V[ln]
    else:
        y, s = _onehot(self, V[ln], M, K, scratch)
        steps.append(s)
    steps.append(_ew(self, [(f"-(a1 / a0) * (a2 / {float(M)!r})", [("in", 0), ("in", 1), ("in", 2)])],
                     [V[pn], y, V[dyn]], out_array(n), (M, K), [(M, K), (M, K), ()]))
    return _seq(steps)


def _pair_loss(op):
    """A mean loss from the op table's loss_term: the term elementwise, then its mean."""
    expr = translate(optable.OPS[op].loss_term)

    def lower(self, n, nd, V, shape_of, scratch, out_array):
        an, bn = nd["inputs"][:2]
        s = shape_of(an)
        cnt = shapes.numel(s) or 1
        t = scratch(cnt)
        ew = _ew(self, [(expr, [("in", 0), ("in", 1)])], [V[an], V[bn]], t, s, [s, s])
        return _seq([ew, _rkm(t, 1, 1, cnt, 1.0 / cnt, out_array(n), self.dtype, scratch)])
    return lower


def _pair_grad(op):
    """A mean loss's gradient from the op table's grad_term: term * dy / n."""
    expr = "(" + translate(optable.OPS[op].grad_term) + ") * (a2 / {n})"

    def lower(self, n, nd, V, shape_of, scratch, out_array):
        an, bn, dyn = nd["inputs"]
        s = shape_of(an)
        cnt = shapes.numel(s) or 1
        e = expr.format(n=repr(float(cnt)))
        return _ew(self, [(e, [("in", 0), ("in", 1), ("in", 2)])], [V[an], V[bn], V[dyn]], out_array(n), s,
                   [s, s, ()])
    return lower


def _low_dropout_mask(self, n, nd, V, shape_of, scratch, out_array):
    """Host fallback by design: the reference's seeded draws, uploaded (training); ones (inference)."""
    out = out_array(n)
    shp = shape_of(n)
    rate, seed = float(nd["attrs"]["rate"]), int(nd["attrs"]["seed"])
    ctx = self._ctx
    dt = self.dtype

    def step():
        if not ctx.training or rate == 0.0:
            ck._fill(out, 1)
            return
        keep = np.random.default_rng([seed, ctx.step]).random(shp) >= rate
        out.copy_to_device((keep / (1.0 - rate)).astype(dt).reshape(-1))
    step.fallback = True
    return step


_LOWER = {
    "conv": _low_conv, "conv_dx": _low_conv_dx, "conv_dw": _low_conv_dw, "matmul": _low_matmul,
    "maxpool": _low_maxpool, "maxpool_argmax": _low_maxpool_argmax, "maxpool_route": _low_maxpool_route,
    "maxpool_gather": _low_maxpool_gather, "route_scatter": _low_route_scatter,
    "avgpool": _low_avgpool, "avgpool_spread": _low_avgpool_spread,
    "global_avgpool": _low_gap, "global_avgpool_spread": _low_gap_spread,
    "sum": _low_sum, "mean": _low_mean, "sum_to": _low_sum_to,
    "broadcast_like": _low_broadcast_like, "expand_like": _low_expand_like,
    "transpose": _low_transpose, "concat": _low_concat, "slice": _low_slice, "unslice": _low_unslice,
    "pad2d": _low_pad2d, "crop2d": _low_crop2d, "softmax": _low_softmax,
    "softmax_cross_entropy": _low_sce, "softmax_ce_grad": _low_sce_grad,
    "cross_entropy": _low_ce, "cross_entropy_grad": _low_ce_grad,
    "mse": _pair_loss("mse"), "mse_grad": _pair_grad("mse_grad"),
    "bce_with_sigmoid": _pair_loss("bce_with_sigmoid"), "bce_grad": _pair_grad("bce_grad"),
    "dropout_mask": _low_dropout_mask,
}


# ================================================================================ PTX (no GPU needed)

def compile_ptx_group_kernels(graph, env, cc=(9, 0), dtype=np.float32):
    """Compiles the generated elementwise kernels of a (piped) graph's elementwise nodes and groups to
    PTX with numba.cuda.compile_ptx (NVVM, no GPU); returns {node name: ptx}. Also compiles this
    module's own kernels (copy, gather, one-hot, dense cross-entropy rows) under "cuda.py:<name>"."""
    global cuda
    from numba import cuda as c
    from numba import types as T
    if cuda is None:
        cuda = c              # the module global the kernels name (resolved when compiling)
    f = ck._nbtype(dtype)
    arr = T.Array(f, 1, "C")
    res = {}
    i64, i32a, i64a = T.int64, T.Array(T.int32, 1, "C"), T.Array(T.int64, 1, "C")
    own = {"copy": (arr, arr) + (i64,) * 21 + (f,), "copy_scaled": (arr, arr) + (i64,) * 21 + (f,),
           "gather": (arr, i32a, arr, i64, i64, i64), "onehot": (i64a, arr, i64, i64),
           "xent_dense_rows": (arr, arr, arr, i64, i64)}
    for name, sig in own.items():
        res[f"cuda.py:{name}"] = c.compile_ptx(_FACTORIES[name](f), T.void(*sig), cc=cc)[0]
    nodes = graph.nx.nodes
    for n in graph.nx.nodes:
        nd = nodes[n]
        if nd["op"] == "fused" and nd["attrs"]["pattern"] == "elementwise":
            body = [(optable.scalar_expression(bn["op"], bn["attrs"], _literal), list(bn["inputs"]))
                    for bn in nd["attrs"]["body"]]
            res_idx = list(nd["attrs"]["results"])
            out_shape = shapes.resolve(nd["attrs"]["body"][res_idx[0]]["shape"], env)
        elif nd["op"] in optable.OPS and optable.OPS[nd["op"]].scalar is not None:
            body = [(optable.scalar_expression(nd["op"], nd["attrs"], _literal),
                     [("in", k) for k in range(len(nd["inputs"]))])]
            res_idx = [0]
            out_shape = shapes.resolve(nd["shape"], env)
        else:
            continue
        ins = list(nd["inputs"])
        inline = {k: float(np.asarray(nodes[i]["attrs"]["value"]).reshape(-1)[0]) for k, i in enumerate(ins)
                  if nodes[i]["op"] == "const" and np.asarray(nodes[i]["attrs"]["value"]).size == 1}
        plan = plan_elementwise(body, res_idx, [shapes.resolve(nodes[i]["shape"], env) for i in ins],
                                tuple(out_shape), inline)
        nout, ndev = len(res_idx), len(plan["dev"])
        if plan["kind"] == "ck":
            k = ck.elementwise_kernel(plan["ck_exprs"], ndev, 0)
            fn = k.pyfunc(dtype)
            sig = T.void(i64, *([arr] * nout), *([arr] * ndev))
        else:
            rank = max((len(m) for m in plan["modes"] if isinstance(m, tuple)), default=0)
            fn = group_pyfunc(plan["source"], dtype, cuda_module=c)
            sig = T.void(i64, *([arr] * nout), *([arr] * ndev), *([i64] * rank))
        res[n] = c.compile_ptx(fn, sig, cc=cc)[0]
    return res


def lower(graph, dtype=None, pipeline=None, **options):
    """graph (after the pipeline) -> CudaExecutable. Raises BackendError (with the fix) when neither a GPU
    nor the CUDA simulator can run here."""
    ck.require_cuda()
    options.pop("strategy", None)
    options.pop("threads", None)
    return CudaExecutable(graph, dtype=dtype, pipeline=pipeline, **options)
