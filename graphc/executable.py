"""The executable every backend returns: feeds in by input name, numpy arrays out by value name."""
from __future__ import annotations

import os

import numpy as np

from graphc import shapes
from graphc.errors import CheckpointError, FeedDTypeError, FeedError, FeedShapeError, GraphError

#: Ops that read their second input as class ids (int labels (N,)) indexing the first input's columns.
CLASS_LOSSES = ("softmax_cross_entropy", "cross_entropy", "softmax_ce_grad", "cross_entropy_grad")
#: Ops that pass a value through unchanged (labels may reach a loss through them).
_PASS_THROUGH = ("identity", "copy", "reshape", "reshape_like")


def label_source(graph, name):
    """The value that class labels `name` come from, through pass-through ops."""
    nodes = graph.nx.nodes
    while nodes[name]["op"] in _PASS_THROUGH:
        name = nodes[name]["inputs"][0]
    return name


def class_label_inputs(graph):
    """{int input (or const) name: (number of classes K, name of the loss reading it)} for every integer
    value a class loss uses as indices: the feed check (for consts, compile) refuses labels outside
    0..K-1. Labels computed otherwise (a concat with a const, a reshape of a 2-D input) are checked by
    the class-loss kernels themselves (and the reference ops), which never index with a bad label."""
    nodes, found = graph.nx.nodes, {}
    for n, k, src in _class_losses(graph):
        src = label_source(graph, src)
        if nodes[src]["op"] in ("input", "const") and len(nodes[src]["shape"]) == 1 and isinstance(k, int):
            prev = found.get(src)
            found[src] = (k, n) if prev is None or k < prev[0] else prev
    return found


def _class_losses(graph):
    """(loss name, number of classes, name of the value holding its labels) for every class-loss node,
    also inside fused nodes (whose body refers to the group's inputs as ("in", k))."""
    for n, d in graph.nx.nodes(data=True):
        if d["op"] in CLASS_LOSSES:
            yield n, graph.nx.nodes[d["inputs"][0]]["shape"][-1], d["inputs"][1]
        for b in d["attrs"].get("body", ()) if d["op"] == "fused" else ():
            scores, labels = b["inputs"][:2] if b["op"] in CLASS_LOSSES else (None, None)
            if labels is not None and labels[0] == "in":
                shape = graph.nx.nodes[d["inputs"][scores[1]]]["shape"] if scores[0] == "in" else \
                    d["attrs"]["body"][scores[1]]["shape"]
                yield b["name"], shape[-1], d["inputs"][labels[1]]


def check_labels(name, arr, k, loss, what="input", cls=FeedError):
    """FeedError (cls) naming the first label outside 0..k-1, its position and the valid range."""
    if arr.size <= 8:                 # (a batch-1 run: numpy's min and max cost 1.5 us each)
        vals = arr.ravel().tolist()
        if min(vals) >= 0 and max(vals) < k:
            return
    elif arr.min() >= 0 and arr.max() < k:
        return
    bad = np.flatnonzero((arr < 0) | (arr >= k))
    raise cls(f"{what} {name!r}: label {int(arr[bad[0]])} at position {int(bad[0])} is outside 0..{k - 1} "
              f"({len(bad)} bad label(s)); {loss!r} has {k} classes. Fix: labels must be class ids 0..{k - 1}")


def param_too_big(name, shape, dtype, why):
    nbytes = shapes.numel(shape) * np.dtype(dtype).itemsize
    return GraphError(f"param {name!r} {shapes.fmt(shape)} {dtype} needs {nbytes:,} bytes ({nbytes / 2**30:.1f} GiB), "
                      f"{why}. Fix: use smaller dims")


def check_param_sizes(graph, dtype=None):
    """Refuses, before anything is allocated, a param larger than this machine's memory."""
    try:
        limit = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return
    for name in graph.state_names:
        nd = graph.nx.nodes[name]
        dt = dtype if dtype is not None and nd["dtype"].startswith("float") else nd["dtype"]
        if shapes.numel(nd["shape"]) * np.dtype(dt).itemsize > limit:
            raise param_too_big(name, nd["shape"], dt, f"more than this machine's {limit / 2**30:.1f} GiB of memory")


def _materialise(graph, name):
    """A param's initial value; one too large to allocate is a GraphError naming it and its bytes."""
    nd = graph.nx.nodes[name]
    try:
        return np.array(graph.params[name])
    except (MemoryError, ValueError) as e:
        raise param_too_big(name, nd["shape"], nd["dtype"], f"which cannot be allocated here ({type(e).__name__})") \
            from None


class _Feeds(dict):
    """Checked feeds. A caller that did not say which outputs it wants (outputs=None) learns of a
    missing input when the run first reads it: one FeedError naming it."""

    def __init__(self, takes):
        super().__init__()
        self.takes = takes

    def __missing__(self, name):
        raise FeedError(f"missing feed for input {name!r} (the values asked for depend on it); the graph takes "
                        f"{self.takes}")


class RunContext:
    """What a running op may need besides its inputs: symbolic-dim bindings, mode, step counter."""
    __slots__ = ("env", "training", "step", "out_shape")

    def __init__(self, env, training, step):
        self.env, self.training, self.step, self.out_shape = env, training, step, None


class Executable:
    backend = "?"
    #: set by gc.load / graphc.artifact: how the model was built, its preprocessing and class names
    artifact = None

    def __init__(self, graph, dtype=None, pipeline=None):
        self.graph = graph
        self.dtype = np.dtype(dtype or graph.dtype)
        self.pipeline = pipeline
        self.step_count = 0
        self.state = {}
        for name in graph.state_names:
            self.state[name] = self._cast(_materialise(graph, name), graph.nx.nodes[name]["dtype"])
        self.input_types = {n: (graph.nx.nodes[n]["shape"], graph.nx.nodes[n]["dtype"]) for n in graph.inputs}
        self.labels = class_label_inputs(graph)
        for name, (k, loss) in self.labels.items():
            if graph.nx.nodes[name]["op"] == "const":
                check_labels(name, np.asarray(graph.nx.nodes[name]["attrs"]["value"]), k, loss, "const", GraphError)
        self.outputs = list(graph.outputs)

    def _cast(self, arr, declared):
        return arr.astype(self.dtype if declared.startswith("float") else declared, copy=False)

    # ------------------------------------------------------------------ feeds
    def needed_inputs(self, outputs=None):
        """The inputs the values `outputs` (default: the executable's outputs) depend on. An inference run
        of a graph that also has a loss needs no labels: run({"x": x}, outputs=["logits"])."""
        key = tuple(self.outputs if outputs is None else outputs)
        cache = self.__dict__.setdefault("_needed_inputs", {})
        if key not in cache:
            import networkx as nx
            need = set(key)
            for o in key:
                if o in self.graph.nx:
                    need |= nx.ancestors(self.graph.nx, o)
            cache[key] = [n for n in self.input_types if n in need]
        return cache[key]

    @staticmethod
    def _check_feed(name, arr, shape, dtype, env):
        """The feed's rank, dims (binding the symbolic ones in env) and kind of dtype; returns it."""
        if arr.ndim != len(shape):
            raise FeedShapeError(f"input {name!r} expects shape {shapes.fmt(shape)} (rank {len(shape)}), "
                                 f"got {arr.shape}")
        for want, got in zip(shape, arr.shape):
            if isinstance(want, str):
                if got == 0:
                    raise FeedShapeError(f"input {name!r} is empty: its batch dim {want} is 0; feed at least one "
                                         "sample (a mean over an empty batch is undefined)")
                if env.setdefault(want, got) != got:
                    raise FeedShapeError(f"input {name!r}: dim {want} is {got} here but {env[want]} in another "
                                         "input; every input must share the batch size")
            elif want != got:
                raise FeedShapeError(f"input {name!r} expects shape {shapes.fmt(shape)}, got {arr.shape}")
        kind = arr.dtype.kind
        if dtype.startswith("int") and kind not in "iu":
            raise FeedDTypeError(f"input {name!r} expects integer {dtype} data (class labels), got {arr.dtype}")
        if dtype.startswith("float") and kind not in "fiub":
            raise FeedDTypeError(f"input {name!r} expects numbers ({dtype}), got {arr.dtype}")
        return arr

    def check_feeds(self, feeds, check_finite=False, outputs=None):
        """Validates feeds against the inputs; returns (cast feeds, symbolic-dim bindings).
        Inputs that `outputs` (default: the executable's outputs) do not depend on may be left out; fed
        ones are checked all the same (shapes, dtypes, label ranges)."""
        if not isinstance(feeds, dict):
            raise FeedError(f"feeds must be a dict of input name -> array, got {type(feeds).__name__}")
        last = self.__dict__.get("_last_feeds")
        # the same names and outputs as the last accepted call, each feed an array shaped and typed like
        # that call's (which needed no cast): only what depends on the values is checked again (a batch-1
        # MNIST run's cost ~2 us of its ~30)
        if last is not None and last[0] == outputs and last[1] == tuple(feeds) and not check_finite:
            for name, shape, dtype, labels in last[2]:
                arr = feeds[name]
                if type(arr) is not np.ndarray or arr.shape != shape or arr.dtype != dtype:
                    break
                if labels is not None:
                    check_labels(name, arr, *labels)
            else:
                out = _Feeds(last[3])
                out.update(feeds)
                return out, dict(last[4])
        takes = self.__dict__.get("_takes")
        if takes is None:              # (formatted once: the error messages' list of the inputs)
            takes = self._takes = ", ".join(f"{n}{shapes.fmt(s)} {d}" for n, (s, d) in self.input_types.items())
        if outputs is not None:
            missing = [n for n in self.needed_inputs(outputs) if n not in feeds]
            if missing:
                raise FeedError(f"missing feed for input(s) {missing} (needed by {list(outputs)}); the graph "
                                f"takes {takes}")
        unknown = [n for n in feeds if n not in self.input_types]
        if unknown:
            raise FeedError(f"unknown feed name(s) {unknown}; the graph's inputs are {list(self.input_types)}")
        env, out = {}, _Feeds(takes)
        seen = []                      # (name, shape, dtype, label check) of feeds used as given
        for name, (shape, dtype) in self.input_types.items():
            if name not in feeds:
                continue
            arr = self._check_feed(name, np.asarray(feeds[name]), shape, dtype, env)
            labels = self.labels.get(name)
            if labels is not None:           # before the cast: int32 labels must not wrap into range
                check_labels(name, arr, *labels)
            cast = self._cast(arr, dtype)
            if check_finite and cast.dtype.kind == "f" and not np.isfinite(cast).all():
                raise FeedError(f"input {name!r} holds NaN or inf values ({int((~np.isfinite(cast)).sum())} of them)")
            if cast is arr and type(feeds[name]) is np.ndarray:
                seen.append((name, arr.shape, arr.dtype, labels))
            out[name] = cast
        if outputs is None:        # a missing input whose batch size nothing else gives: say so now
            unbound = [n for n in self.needed_inputs() if n not in feeds
                       and any(isinstance(d, str) and d not in env for d in self.input_types[n][0])]
            if unbound:
                raise FeedError(f"missing feed for input(s) {unbound} (needed by {self.outputs}); the graph takes "
                                f"{takes}")
        self._last_feeds = (None if outputs is None else list(outputs), tuple(feeds), seen, takes, dict(env)) \
            if len(seen) == len(feeds) else None
        return out, env

    # ------------------------------------------------------------------ running
    def run(self, feeds, outputs=None, training=False, check_finite=False):
        """Runs the graph; returns {output name: array}. `outputs` may name any value to fetch.
        training=True runs in training mode (dropout on, batch norm on batch statistics) and stores
        batch norm's new running statistics."""
        if training and self.folded_bn():
            return self._training_twin().run(feeds, outputs, True, check_finite)
        want = list(self.outputs if outputs is None else outputs)
        for o in want:
            if o not in self.graph:
                raise GraphError(f"no value named {o!r} to fetch; outputs are {self.outputs}")
        stats = self.stat_updates(training)
        feeds, env = self.check_feeds(feeds, check_finite, outputs=want + list(stats.values()))
        vals = self._execute(feeds, env, training, want + [u for u in stats.values() if u not in want])
        for s, u in stats.items():
            self.state[s] = np.array(vals[u])
        return {o: vals[o] for o in want}

    def folded_bn(self):
        """The batch norms this executable's forward folded into their convs (passes/fold_bn.py)."""
        return tuple(getattr(self.graph, "bn_folded", ()) or ())

    def _training_twin(self):
        """A training-mode run needs batch statistics, which a forward with batch norm folded into its
        convs no longer computes: such runs go to the same graph compiled without the fold (built on first
        use; it shares this executable's state, so the running statistics it updates are this one's)."""
        twin = getattr(self, "_twin", None)
        if twin is None:
            from graphc.compiler import compile
            twin = compile(self.source, **dict(self.compile_args, fold_bn=False))
            twin.state = self.state
            self._twin = twin
        twin.step_count = self.step_count
        return twin

    def stat_updates(self, training):
        """{running statistic: its new value} that a run in this mode stores (none at inference)."""
        return dict(getattr(self.graph, "stat_updates", {}) or {}) if training else {}

    def step(self, feeds, check_finite=False) -> float:
        """One training step (forward, backward, update); returns the loss."""
        if not self.graph.updates:
            raise GraphError("this executable has no optimizer: compile(graph, optimizer=gc.optim.SGD(...))")
        want = [self.graph.loss] + list(self.graph.updates.values())
        feeds, env = self.check_feeds(feeds, check_finite, outputs=want)
        vals = self._execute(feeds, env, True, want)
        self._apply_updates(vals)
        self.step_count += 1
        return float(vals[self.graph.loss])

    def _apply_updates(self, vals):
        for state, new in self.graph.updates.items():
            self.state[state] = vals[new]

    def _execute(self, feeds, env, training, want):
        raise NotImplementedError

    def describe_kernel(self, name, env):
        """What the benchmark table shows for node `name`: kind (fused pattern, "elementwise" or the
        op), the ops it runs, its resolved shapes and its FLOPs."""
        from graphc import ops as optable
        nd = self.graph.nx.nodes[name]
        op = nd["op"]
        ins = [shapes.resolve(self.graph.nx.nodes[i]["shape"], env) for i in nd["inputs"]]
        out = shapes.resolve(nd["shape"], env)
        if op == "fused":
            kind, ops = nd["attrs"]["pattern"], [bn["op"] for bn in nd["attrs"]["body"]]
        elif optable.OPS[op].scalar is not None:
            kind, ops = "elementwise", [op]
        else:
            kind, ops = op, [op]
        fl = optable.OPS[op].flops
        try:
            flops = int(fl(ins, out, nd["attrs"])) if fl else 0
        except Exception:
            flops = 0
        return {"name": name, "kind": kind, "ops": ops, "shapes": {"in": ins, "out": out}, "flops": flops}

    # ------------------------------------------------------------------ state
    @property
    def params(self):
        """Trainable parameters by name (current values)."""
        return {n: self.state[n] for n in self.graph.param_names}

    def state_dict(self):
        """Every parameter and optimizer-state array plus the step counter (copies)."""
        d = {n: np.array(v) for n, v in self.state.items()}
        d["__step__"] = np.array(self.step_count)
        return d

    def load_state_dict(self, d):
        for n in self.state:
            want = tuple(self.graph.nx.nodes[n]["shape"])
            if n not in d:
                raise CheckpointError(f"checkpoint has no value for {n!r}")
            if tuple(np.shape(d[n])) != want:
                raise CheckpointError(f"checkpoint value {n!r} has shape {tuple(np.shape(d[n]))}, "
                                      f"the graph expects {want}")
        step = np.asarray(d.get("__step__", 0))
        if step.shape != () or step.dtype.kind not in "iu" or int(step) < 0:
            raise CheckpointError(f"'__step__' (the step counter) must be one integer >= 0, got {step.dtype} "
                                  f"shape {step.shape}")
        extra = [k for k in d if k not in self.state and k != "__step__"]
        if extra:
            raise CheckpointError(f"checkpoint has values the graph does not: {extra[:5]}")
        for n in self.state:
            self.state[n] = self._cast(np.array(d[n]), self.graph.nx.nodes[n]["dtype"])
        self.step_count = int(step)
