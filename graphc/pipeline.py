"""The ordered, printable pass pipeline that `compile()` runs. Each pass is a function Graph -> Graph in
its own file under passes/; each but check can be switched off by its flag (e.g. compile(..., fuse=False)).
A pass that cannot be imported is an error (InstallError), never a pass silently off."""
from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass
class Pass:
    name: str        # also the compile() flag that switches it off
    target: str      # "module:function" in graphc.passes
    doc: str
    backends: tuple = ("numba", "cuda")   # where it runs by default

    def load(self):
        mod, fn = self.target.split(":")
        try:
            return getattr(importlib.import_module(f"graphc.passes.{mod}"), fn)
        except ImportError as e:
            from graphc.errors import InstallError
            raise InstallError(f"pass {self.name!r} (graphc.passes.{mod}) cannot be imported: {e}. Fix: "
                               "reinstall graphc (`pip install -e .` in a checkout)") from e


PASSES = [
    Pass("check", "check:check", "refuse cycles, dangling inputs, unknown ops", ("reference", "numba", "cuda")),
    Pass("fold_bn", "fold_bn:fold_bn", "inference: conv -> batch norm folded into the conv's weights and bias "
                                       "(from the current parameters, each run)"),
    Pass("simplify", "simplify:simplify", "algebraic simplification: x*1, x+0, identity/copy, reshape of reshape"),
    Pass("fold", "fold:fold_constants", "constant folding"),
    Pass("cse", "cse:cse", "common-subexpression elimination"),
    Pass("dce", "dce:dce", "dead-code elimination", ("reference", "numba", "cuda")),
    Pass("fuse", "fuse:fuse", "the patterns of passes/patterns.py: conv->ReLU->maxpool (+ backward), elementwise"),
    Pass("schedule", "schedule:schedule", "topological order", ("reference", "numba", "cuda")),
    Pass("memory", "memory:plan_memory", "buffer reuse for dead values"),
]


class Pipeline:
    def __init__(self, backend, **flags):
        from graphc.errors import GraphError
        unknown = [f for f in flags if f not in {p.name for p in PASSES}]
        if unknown:
            raise GraphError(f"unknown pass flag(s) {unknown}; passes are {[p.name for p in PASSES]}")
        if not flags.get("check", True):
            raise GraphError("check=False: the check pass cannot be switched off (every other pass and every "
                             "backend relies on a checked graph: no cycles, no dangling inputs, known ops). "
                             "Fix: drop check=False")
        self.backend = backend
        self.passes = []
        for p in PASSES:
            on = bool(flags.get(p.name, backend in p.backends))
            self.passes.append((p, on, p.load() if on else None))

    def __call__(self, graph):
        for p, on, fn in self.passes:
            if on:
                graph = fn(graph)
        return graph

    def __str__(self):
        lines = [f"pipeline for backend {self.backend!r}:"]
        for i, (p, on, _) in enumerate(self.passes, 1):
            lines.append(f"  {i}. {p.name:<9} {'on ' if on else 'off'}  {p.doc}")
        return "\n".join(lines)

    @property
    def enabled(self):
        return [p.name for p, on, _ in self.passes if on]
