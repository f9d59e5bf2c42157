"""The executable every backend returns: feeds in by input name, numpy arrays out by value name."""
from __future__ import annotations

import numpy as np

from graphc import shapes
from graphc.errors import CheckpointError, FeedDTypeError, FeedError, FeedShapeError, GraphError


class RunContext:
    """What a running op may need besides its inputs: symbolic-dim bindings, mode, step counter."""
    __slots__ = ("env", "training", "step", "out_shape")

    def __init__(self, env, training, step):
        self.env, self.training, self.step, self.out_shape = env, training, step, None


class Executable:
    backend = "?"

    def __init__(self, graph, dtype=None, pipeline=None):
        self.graph = graph
        self.dtype = np.dtype(dtype or graph.dtype)
        self.pipeline = pipeline
        self.step_count = 0
        self.state = {}
        for name in graph.state_names:
            self.state[name] = self._cast(np.array(graph.params[name]), graph.nx.nodes[name]["dtype"])
        self.input_types = {n: (graph.nx.nodes[n]["shape"], graph.nx.nodes[n]["dtype"]) for n in graph.inputs}
        self.outputs = list(graph.outputs)

    def _cast(self, arr, declared):
        return arr.astype(self.dtype if declared.startswith("float") else declared, copy=False)

    # ------------------------------------------------------------------ feeds
    def check_feeds(self, feeds, check_finite=False):
        """Validates feeds against the inputs; returns (cast feeds, symbolic-dim bindings)."""
        if not isinstance(feeds, dict):
            raise FeedError(f"feeds must be a dict of input name -> array, got {type(feeds).__name__}")
        missing = [n for n in self.input_types if n not in feeds]
        if missing:
            raise FeedError(f"missing feed for input(s) {missing}; the graph takes "
                            + ", ".join(f"{n}{shapes.fmt(s)} {d}" for n, (s, d) in self.input_types.items()))
        unknown = [n for n in feeds if n not in self.input_types]
        if unknown:
            raise FeedError(f"unknown feed name(s) {unknown}; the graph's inputs are {list(self.input_types)}")
        env, out = {}, {}
        for name, (shape, dtype) in self.input_types.items():
            arr = np.asarray(feeds[name])
            if arr.ndim != len(shape):
                raise FeedShapeError(f"input {name!r} expects shape {shapes.fmt(shape)} (rank {len(shape)}), "
                                     f"got {arr.shape}")
            for want, got in zip(shape, arr.shape):
                if isinstance(want, str):
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
            arr = self._cast(arr, dtype)
            if check_finite and arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise FeedError(f"input {name!r} holds NaN or inf values ({int((~np.isfinite(arr)).sum())} of them)")
            out[name] = arr
        return out, env

    # ------------------------------------------------------------------ running
    def run(self, feeds, outputs=None, training=False, check_finite=False):
        """Runs the graph; returns {output name: array}. `outputs` may name any value to fetch.
        training=True runs in training mode (dropout on, batch norm on batch statistics) and stores
        batch norm's new running statistics."""
        feeds, env = self.check_feeds(feeds, check_finite)
        want = list(self.outputs if outputs is None else outputs)
        for o in want:
            if o not in self.graph:
                raise GraphError(f"no value named {o!r} to fetch; outputs are {self.outputs}")
        stats = self.stat_updates(training)
        vals = self._execute(feeds, env, training, want + [u for u in stats.values() if u not in want])
        for s, u in stats.items():
            self.state[s] = np.array(vals[u])
        return {o: vals[o] for o in want}

    def stat_updates(self, training):
        """{running statistic: its new value} that a run in this mode stores (none at inference)."""
        return dict(getattr(self.graph, "stat_updates", {}) or {}) if training else {}

    def step(self, feeds, check_finite=False) -> float:
        """One training step (forward, backward, update); returns the loss."""
        if not self.graph.updates:
            raise GraphError("this executable has no optimizer: compile(graph, optimizer=gc.optim.SGD(...))")
        feeds, env = self.check_feeds(feeds, check_finite)
        vals = self._execute(feeds, env, True, [self.graph.loss] + list(self.graph.updates.values()))
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
        extra = [k for k in d if k not in self.state and k != "__step__"]
        if extra:
            raise CheckpointError(f"checkpoint has values the graph does not: {extra[:5]}")
        for n in self.state:
            self.state[n] = self._cast(np.array(d[n]), self.graph.nx.nodes[n]["dtype"])
        self.step_count = int(d.get("__step__", 0))
