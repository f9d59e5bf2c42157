"""The executor every compiling backend shares (numba, cuda): binding over the memory plan, run, step,
precompile, profile, state snapshots, compile times. The model is PyTensor's JITLinker, with each
backend a small subclass (its NumbaLinker is 32 lines on top).

How a run works. For each batch size and set of wanted values (and in-place updates or not) the
executable *binds* the graph once: it allocates the memory plan's slots (passes/memory.py), makes
every value an array of its slot (or of the state it updates in place, or of its input for a view),
lowers every node through the backend's registry (backends/registry.py) into a step with its
argument arrays resolved, and keeps the list of steps. A run is then: feed the inputs, call the
steps, fetch the wanted values. A backend supplies only what differs: buffers and views, feed upload,
fetch, state storage, how the steps are run, and its lowerings.

Values computed from the state alone. In an executable without updates (inference), a node whose inputs
are all parameters, constants or such values (and whose op does not depend on the run's mode or step:
OpDef.run_dependent) is computed ahead of the run, into a buffer of its own, and again only when the
state changed: the prologue (e.g. the conv weights and biases that passes/fold_bn.py folds batch norm
into). The state changes with a step or training run, load_state_dict, an assigned ``exe.state[name]``,
and (numba) an array handed out by ``exe.state[name]``, which the caller may edit in place: it counts as
changed at the next run, and at every run while the caller still holds it.
"""
from __future__ import annotations

import contextlib
import time

import numpy as np

from graphc import shapes
from graphc.errors import GraphError
from graphc.executable import Executable, RunContext
from graphc.ops.fused import members as fused_members
from graphc.backends import codegen
from graphc.backends import registry as registries
from graphc.backends.kernel_cache import blas_in_use


def scalar_consts(graph, inputs):
    """{position: value} of the inputs that are one-element constants (inlined into generated kernels)."""
    nodes = graph.nx.nodes
    consts = {}
    for k, i in enumerate(inputs):
        if nodes[i]["op"] == "const":
            v = np.asarray(nodes[i]["attrs"]["value"])
            if v.size == 1:
                consts[k] = float(v.reshape(-1)[0])
    return consts


def state_derived(graph, schedule):
    """{node: the states it reads} for every node computed from parameters and constants alone (through
    ops that do not depend on the run's mode or step), in an executable without updates."""
    from graphc import ops as optable
    nodes = graph.nx.nodes
    reads = {}
    for n in schedule:
        d = nodes[n]
        if d["op"] in ("param", "const"):
            reads[n] = {n} if d["op"] == "param" else set()
            continue
        ops = [bn["op"] for bn in d["attrs"]["body"]] if d["op"] == "fused" else [d["op"]]
        if d["op"] == "input" or not d["inputs"] or any(optable.OPS[o].run_dependent for o in ops) \
                or not all(i in reads for i in d["inputs"]):
            continue
        reads[n] = set().union(*(reads[i] for i in d["inputs"]))
    return {n: r for n, r in reads.items() if nodes[n]["op"] not in ("param", "const")}


def _then_release(step, values, indices):
    """step, then the arrays at `indices` of values dropped (their last reader has run)."""
    def run():
        step()
        for i in indices:
            values[i] = None
    return run


class Binding:
    """One binding: the value arrays (by index), the steps in order, what is fed and fetched."""

    def __init__(self, env, want, inplace, plan):
        self.env, self.want, self.inplace, self.plan = dict(env), tuple(want), inplace, plan
        self.values = []         # value arrays; an entry of a dynamic value is set while running
        self.index = {}          # value name -> position in values
        self.dynamic = set()     # values whose array is known only at run time (feeds, new arrays)
        self.steps = []          # (node name, callable)
        self.prologue = []       # (node name, callable): values of the state alone, run when it changed
        self.prologue_state = set()      # the states the prologue reads
        self.prologue_gen = None         # the state generation it was last run for
        self.kinds = {}          # node name -> (lowering key, kernel, runs on the host)
        self.feeds = []          # (input name, index)
        self.fetch = []          # (value name, index, shape)
        self.copy_back = []      # (state name, index): updates not written in place
        self.slots = {}          # memory-plan slot -> buffer
        self.scratch_bytes = 0
        self.bind_s = 0.0
        self.first_run_s = None
        self.threads = None
        self.thread_times = {}
        self.thread_trials = []     # thread counts the next runs try (numba: the count is chosen online)
        self.runs_since_choice = 0  # (numba: the count is chosen again, later: after recheck[0] runs)
        self.recheck = ()
        self.trial_warmups = 0      # (numba: the next trial runs are warm-ups, not timed)
        self.compile_stats = None   # what the backend's precompile found, loaded and compiled

    def slot(self, name):
        i = self.index.get(name)
        if i is None:
            i = self.index[name] = len(self.values)
            self.values.append(None)
        return i


class LowerContext:
    """What a lowering receives: the node (name, op, attrs, inputs; members by role and the body of a
    fused node), its binding, and helpers for shapes, dtypes and arrays."""

    def __init__(self, exe, b, name, node):
        self.exe, self.binding, self.name = exe, b, name
        self.op, self.attrs, self.inputs = node["op"], node["attrs"], tuple(node["inputs"])
        self.dtype = exe.dtype
        self.values = b.values
        self.run = exe._ctx                   # RunContext: training, step, env while running
        self._node = node
        self._dynamic_out = False
        if self.op == "fused":
            self.members = fused_members(self.attrs)
            self.body = list(self.attrs["body"])
            self.result_index = list(self.attrs["results"])
        else:
            self.members = {}
            self.body = [{"name": name, "op": self.op, "inputs": tuple(("in", k) for k in range(len(self.inputs))),
                          "attrs": self.attrs, "shape": node["shape"], "dtype": node["dtype"], "role": "ew0"}]
            self.result_index = [0]

    # ---- shapes and dtypes
    def shape_of(self, name):
        return tuple(shapes.resolve(self.exe.graph.nx.nodes[name]["shape"], self.binding.env))

    def dtype_of(self, name):
        return self.exe.np_dtype(self.exe.graph.nx.nodes[name]["dtype"])

    @property
    def out_shape(self):
        return tuple(shapes.resolve(self.body[self.result_index[0]]["shape"], self.binding.env))

    # ---- arrays
    def index(self, name):
        return self.binding.slot(name)

    def is_dynamic(self, name):
        return name in self.binding.dynamic

    def array(self, name):
        """The bound array of `name` (for a value that is not dynamic)."""
        return self.values[self.binding.slot(name)]

    def static(self, names=None):
        """The arrays of `names` (default: the inputs) when all are known at bind time, else None."""
        names = self.inputs if names is None else names
        if any(n in self.binding.dynamic for n in names):
            return None
        return [self.array(n) for n in names]

    @property
    def results(self):
        """The value names of the node's results, by result index (None: a result nothing reads)."""
        if len(self.result_index) == 1:
            return [self.name]
        g = self.exe.graph.nx
        by_index = {g.nodes[c]["attrs"]["index"]: c for c in g.successors(self.name) if g.nodes[c]["op"] == "getitem"}
        return [by_index.get(k) for k in range(len(self.result_index))]

    def out(self, k=0):
        """The array result k is written into (its planned buffer, the state it updates in place, or
        private scratch for a result nothing reads)."""
        name = self.results[k]
        if name is None:
            bn = self.body[self.result_index[k]]
            return self.scratch(shapes.resolve(bn["shape"], self.binding.env), self.exe.np_dtype(bn["dtype"]))
        return self.exe._out_array(self.binding, name)

    def scratch(self, shape, dtype=None):
        """A private work array of this binding."""
        dtype = np.dtype(dtype or self.dtype)
        self.binding.scratch_bytes += (shapes.numel(tuple(shape)) or 1) * dtype.itemsize
        return self.exe._scratch(tuple(int(s) for s in shape), dtype)

    def reduction(self):
        """(axes, scale) of a sum, mean or sum_to node: the axes of input 0 it sums over, and the factor
        applied (1/count for a mean)."""
        xs = self.shape_of(self.inputs[0])
        if "axes" in self.attrs:
            axes = tuple(a % max(len(xs), 1) for a in self.attrs["axes"])
        else:
            axes = shapes.sum_to_axes(xs, self.shape_of(self.inputs[1]))
        count = int(np.prod([xs[a] for a in axes], dtype=np.int64))
        return axes, (1.0 / max(count, 1) if self.op == "mean" else 1.0)

    # ---- elementwise bodies
    def loop_plan(self):
        """The codegen loop plan of this elementwise node or group (inputs that are scalar constants
        inlined as literals)."""
        return codegen.plan_loop(self.out_shape, [self.shape_of(i) for i in self.inputs],
                                 scalar_consts(self.exe.graph, self.inputs))

    def dynamic_outputs(self):
        """Declares that the step sets its results' arrays at run time (it returns new arrays)."""
        self._dynamic_out = True


class CompiledExecutable(Executable):
    """The shared executor; a backend subclass supplies the hooks marked below."""
    backend = "?"
    conv_module = ""

    def __init__(self, graph, dtype=None, pipeline=None, **options):
        t0 = time.perf_counter()
        super().__init__(graph, dtype, pipeline)
        self.schedule = getattr(graph, "schedule", None) or graph.topo()
        self.options = options
        self.registry = registries.registry(self.backend)
        self._bindings = {}
        self._last_binding = None
        self._ctx = RunContext({}, False, 0)
        self._state_gen = 0                 # bumped whenever the state may have changed
        self.state_version = 0              # bumped at a run when the state may have changed since the last
        self._version_gen = 0
        self._derived = {} if graph.updates else state_derived(graph, self.schedule)
        nodes = graph.nx.nodes(data=True)
        self._fused_away = {b["name"] for _, d in nodes if d["op"] == "fused" for b in d["attrs"]["body"]
                            if b["name"] not in graph.nx} | \
                           {r for _, d in nodes if d["op"] == "fused" for r in d["attrs"].get("replaces", ())
                            if r not in graph.nx}
        self._setup()
        self._lower_s = time.perf_counter() - t0

    def np_dtype(self, declared):
        return self.dtype if declared.startswith("float") else np.dtype(declared)

    # ------------------------------------------------------------------ backend hooks
    def _setup(self):
        """Backend state made once (device copies of the state and constants)."""

    def _alloc(self, nbytes):
        raise NotImplementedError

    def _view(self, buf, shape, dtype):
        raise NotImplementedError

    def _scratch(self, shape, dtype):
        raise NotImplementedError

    def _state_array(self, name):
        raise NotImplementedError

    def _const_array(self, name):
        raise NotImplementedError

    def _bind_input(self, b, name, i):
        """Sets up input `name` (index i): its buffer, or marks it dynamic."""
        raise NotImplementedError

    def _bind_alias(self, b, name, src):
        """Value `name` is a view of `src`: sets its array, or returns a step that does per run."""
        raise NotImplementedError

    def _upload(self, b, feeds):
        raise NotImplementedError

    def _fetch(self, b, i, shape):
        raise NotImplementedError

    def _to_host(self, arr, shape):
        return arr

    def _store(self, dst, value):
        np.copyto(dst, np.asarray(value).reshape(dst.shape), casting="unsafe")

    def _push_state(self):
        """Makes the bound state agree with exe.state (a user may have replaced entries); True when that
        changed the bound state."""
        return False

    def _volatile_state(self):
        """States a caller may have edited in place since the last run (arrays handed out by exe.state)."""
        return ()

    def _copy_back(self, b, pairs):
        """Stores values of binding b into the state: pairs [(state name, value index)]."""
        raise NotImplementedError

    def _state_written(self, names):
        """The steps (or _copy_back) wrote these states where they live (a device): host copies are stale."""

    def _run_steps(self, b, threads=None):
        for _, f in b.steps:
            f()

    def _synchronize(self):
        """Waits for the steps launched so far (asynchronous devices)."""

    def _profiling(self, b):
        return contextlib.nullcontext()

    def _context(self, b, name, node):
        return LowerContext(self, b, name, node)

    # ------------------------------------------------------------------ binding
    @property
    def compile_times(self):
        """{"lower_s": building the executable, "bindings": [{batch env, want, bind_s, first_run_s
        (compiling or loading every kernel), threads, thread_ms, kernels (found, cached, compiled,
        workers)}]} for every binding made so far."""
        rows = [{"env": dict(env), "step": inplace, "outputs": list(want), "bind_s": b.bind_s,
                 "first_run_s": b.first_run_s, "threads": b.threads, "thread_ms": dict(b.thread_times),
                 "kernels": b.compile_stats}
                for (env, want, inplace), b in self._bindings.items()]
        return {"lower_s": self._lower_s, "bindings": rows}

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
        from graphc.passes.memory import plan_for
        nodes = self.graph.nx.nodes
        b = Binding(env, want, inplace, plan_for(self.graph, want, inplace, self.schedule))
        b.slot_sizes = b.plan.slot_nbytes(env, self.dtype.itemsize)
        for n in self.schedule:
            op, kind = nodes[n]["op"], b.plan.kind.get(n)
            if kind not in ("input", "param", "const"):
                continue
            i = b.slot(n)
            if op == "input":
                b.feeds.append((n, i))
                self._bind_input(b, n, i)
            else:
                b.values[i] = self._state_array(n) if op == "param" else self._const_array(n)
        for n in b.plan.program:             # values of the state alone: buffers of their own (they live on)
            if n in self._derived and b.plan.kind[n] == "buffer":
                b.values[b.slot(n)] = self._scratch(tuple(shapes.resolve(nodes[n]["shape"], env)),
                                                    self.np_dtype(nodes[n]["dtype"]))
        for n in b.plan.program:
            node = nodes[n]
            if node["op"] == "getitem":
                continue                    # written by its fused node
            if b.plan.kind[n] == "alias":
                step = self._bind_alias(b, n, node["inputs"][0])
                if step is not None:
                    b.steps.append((n, step))
                    b.kinds[n] = ("view", registries.VIEW, False)
                continue
            if n in self._derived:
                b.prologue.append((n, self._lower_node(b, n, node)))
                b.prologue_state |= self._derived[n]
            else:
                b.steps.append((n, self._lower_node(b, n, node)))
        for w in want:
            b.fetch.append((w, b.slot(w), tuple(shapes.resolve(nodes[w]["shape"], env))))
        for s, u in self.graph.updates.items():
            if u in b.index and u in set(want) and b.plan.kind.get(u) != "state" \
                    and b.values[b.index[u]] is not self._state_array(s):
                b.copy_back.append((s, b.index[u]))
        self._release_after_last_use(b)
        return b

    def _release_after_last_use(self, b):
        """Drops each run-time array (a kernel's new result, outside the memory plan) after the last
        step that reads it, so it lives no longer than a planned value would: held until the next run,
        ResNet-18's conv gradients alone outweighed the whole plan. Only what the steps make: a value of
        the prologue (made when the state changes, not on every run) stays."""
        nodes, g = self.graph.nx.nodes, self.graph.nx
        made = {n for n, _ in b.steps} | {s for n, _ in b.steps for s in g.successors(n) if nodes[s]["op"] == "getitem"}
        droppable = (b.dynamic & made) - set(b.want) - set(self.graph.updates.values())
        last = {}
        for k, (n, _) in enumerate(b.steps):
            for i in nodes[n]["inputs"]:
                if i in droppable:
                    last[i] = k
        drops = {}
        for name, k in last.items():
            drops.setdefault(k, []).append(b.index[name])
        for k, idx in drops.items():
            n, f = b.steps[k]
            b.steps[k] = (n, _then_release(f, b.values, tuple(idx)))

    def _out_array(self, b, name):
        i = b.slot(name)
        if b.values[i] is not None and name not in b.dynamic:
            return b.values[i]
        plan, node = b.plan, self.graph.nx.nodes[name]
        shp, dt = tuple(shapes.resolve(node["shape"], b.env)), self.np_dtype(node["dtype"])
        kind = plan.kind.get(name)
        if kind == "state":
            arr = self._state_array(plan.inplace[name])
        elif name in plan.slot_of:
            k = plan.slot_of[name]
            if k not in b.slots:
                b.slots[k] = self._alloc(max(b.slot_sizes[k], 1))
            arr = self._view(b.slots[k], shp, dt)
        else:                               # a value the plan does not hold (an unread result)
            arr = self._scratch(shp, dt)
        b.values[i] = arr
        return arr

    def _lower_node(self, b, n, node):
        """The step of node n from its registered lowering, or the reference on the host."""
        lw = self.registry.for_node(node["op"], node["attrs"])
        ctx = self._context(b, n, node)
        step = lw.fn(ctx) if lw is not None else None
        if step is None:
            step = self._fallback(ctx)
            key = node["attrs"]["pattern"] if node["op"] == "fused" else node["op"]
            b.kinds[n] = (key, registries.FALLBACK, True)
        else:
            b.kinds[n] = (lw.key, lw.kernel, lw.host)
        if ctx._dynamic_out:
            b.dynamic.update(r for r in ctx.results if r is not None)
        return step

    def _fallback(self, ctx):
        """The op table's reference implementation on the host: inputs read (copied down from a
        device), results stored into their arrays."""
        from graphc import ops as optable
        opdef, attrs, values = optable.OPS[ctx.op], ctx.attrs, ctx.values
        ins = [(ctx.index(i), ctx.shape_of(i)) for i in ctx.inputs]
        outs = [ctx.out(k) for k in range(len(ctx.result_index))]
        shape, run, fdt = ctx._node["shape"], self._ctx, self.dtype
        to_host, store = self._to_host, self._store

        def step():
            blas_in_use()                 # (the reference's numpy may call BLAS)
            run.out_shape = shapes.resolve(shape, run.env)
            out = opdef.ref([to_host(values[i], s) for i, s in ins], attrs, run)
            for dst, v in zip(outs, out if isinstance(out, tuple) else (out,)):
                v = np.asarray(v)
                store(dst, v.astype(fdt) if v.dtype.kind == "f" and v.dtype != fdt else v)
        step.fallback = True
        return step

    # ------------------------------------------------------------------ running
    def _execute(self, feeds, env, training, want, inplace=False):
        b = self._binding(env, want, inplace)
        if self._push_state():
            self._state_gen += 1
        self._upload(b, feeds)
        ctx = self._ctx
        ctx.env, ctx.training, ctx.step = env, training, self.step_count
        touched = self._volatile_state()     # (every run: it also forgets what callers no longer hold)
        if touched or self._version_gen != self._state_gen:     # (what kernels derive from the state and keep)
            self.state_version += 1
            self._version_gen = self._state_gen
        if b.prologue and (b.prologue_gen != self._state_gen or b.prologue_state & set(touched)):
            for _, f in b.prologue:
                f()
            b.prologue_gen = self._state_gen
        if b.first_run_s is None:
            self._first_run(b)
        else:
            self._run_binding(b)
        return b

    def _run_binding(self, b):
        """A run of a binding after its first."""
        self._run_steps(b, b.threads)

    def _first_run(self, b):
        """The first run of a binding compiles (or loads) every kernel it meets: timed."""
        t0 = time.perf_counter()
        self._run_steps(b)
        self._synchronize()
        b.first_run_s = time.perf_counter() - t0

    def run(self, feeds, outputs=None, training=False, check_finite=False):
        if training and self.folded_bn():
            out = self._training_twin().run(feeds, outputs, True, check_finite)
            self._state_gen += 1                 # it updated the running statistics
            return out
        want = list(self.outputs if outputs is None else outputs)
        for o in () if outputs is None else want:
            if o not in self.graph:
                raise GraphError(f"no value named {o!r} to fetch; outputs are {self.outputs}"
                                 + ("" if o not in self._fused_away else
                                    " (it was fused away: compile with keep=[...] or fuse=False)"))
        stats = self.stat_updates(training) if training else None   # batch norm's running statistics
        want_all = want + [u for u in stats.values() if u not in want] if stats else want
        feeds, env = self.check_feeds(feeds, check_finite, outputs=want_all)   # inputs they need, no others
        b = self._execute(feeds, env, training, want_all)
        fetch = self._fetch
        out = {w: fetch(b, i, shp) for w, i, shp in b.fetch if w in want}
        if stats:
            self._copy_back(b, [(s, b.index[u]) for s, u in stats.items()])
            self._state_written(stats)
            self._state_gen += 1
        return out

    def _train_want(self):
        return [self.graph.loss] + [u for u in self.graph.updates.values() if u != self.graph.loss]

    def step(self, feeds, check_finite=False) -> float:
        if not self.graph.updates:
            raise GraphError("this executable has no optimizer: compile(graph, optimizer=gc.optim.SGD(...))")
        feeds, env = self.check_feeds(feeds, check_finite)
        b = self._execute(feeds, env, True, self._train_want(), inplace=True)
        self._copy_back(b, b.copy_back)
        self._state_written(self.graph.updates)     # in place or copied back
        self._state_gen += 1
        self.step_count += 1
        return float(self._fetch(b, b.index[self.graph.loss], ()))

    # ------------------------------------------------------------------ compile time and profiling
    def _dummy_feeds(self, batch):
        f = {}
        for n, (shape, dt) in self.input_types.items():
            s = tuple(batch if isinstance(d, str) else d for d in shape)
            f[n] = np.zeros(s, dtype=self.dtype if dt.startswith("float") else dt)
        return f

    def load_state_dict(self, d):
        super().load_state_dict(d)
        self._state_gen += 1

    @contextlib.contextmanager
    def _state_saved(self):
        """Parameters, optimizer state and the step counter are restored afterwards."""
        saved = self.state_dict()
        try:
            yield
        finally:
            self.load_state_dict(saved)
            self._push_state()

    def precompile(self, batch=1, train=None, feeds=None):
        """Binds for `batch` and runs once (on zero feeds unless given) so every kernel is compiled or
        loaded from the disk cache; parameters and optimizer state are left unchanged. Returns the
        seconds it took (bind + first run)."""
        train = bool(self.graph.updates) if train is None else train
        feeds = feeds or self._dummy_feeds(batch)
        t0 = time.perf_counter()
        with self._state_saved():
            if train:
                self.step(feeds)
            else:
                self.run(feeds)
            self._synchronize()
        return time.perf_counter() - t0

    def profile(self, feeds, train=None, repeats=10, warmup=2):
        """Times every step of a run (or a training step): a list of dicts {name, kind (the lowering
        that made it), kernel, ops, shapes, ms (median), flops, fallback}, in program order.
        Parameters are left unchanged."""
        train = bool(self.graph.updates) if train is None else train
        feeds_c, env = self.check_feeds(feeds)
        want = self._train_want() if train else list(self.outputs)
        times = {}
        sync = self._synchronize
        with self._state_saved():
            b = self._execute(feeds_c, env, train, want, inplace=train)     # binds, feeds, compiles
            sync()
            with self._profiling(b):
                for r in range(warmup + repeats):
                    for name, f in b.steps:
                        t0 = time.perf_counter()
                        f()
                        sync()
                        if r >= warmup:
                            times.setdefault(name, []).append(time.perf_counter() - t0)
        rows = []
        for name, _ in b.steps:
            kind, kernel, host = b.kinds[name]
            row = dict(self.describe_kernel(name, env), ms=1e3 * float(np.median(times[name])), fallback=host,
                       kernel=kernel)
            if kind != "view":
                row["kind"] = kind
            rows.append(row)
        return rows

    def fallbacks(self):
        """Names of the bound steps that run on the host."""
        return sorted({n for b in self._bindings.values() for n, (_, _, host) in b.kinds.items() if host})
