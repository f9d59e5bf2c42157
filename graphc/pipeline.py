"""The ordered, printable pass pipeline that `compile()` runs. Each pass is a function Graph -> Graph in
its own file under passes/; each can be switched off by its flag (e.g. compile(..., fuse=False))."""
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
        return getattr(importlib.import_module(f"graphc.passes.{mod}"), fn)


PASSES = [
    Pass("check", "check:check", "refuse cycles, dangling inputs, unknown ops", ("reference", "numba", "cuda")),
    Pass("simplify", "simplify:simplify", "algebraic simplification: x*1, x+0, identity/copy, reshape of reshape"),
    Pass("fold", "fold:fold_constants", "constant folding"),
    Pass("cse", "cse:cse", "common-subexpression elimination"),
    Pass("dce", "dce:dce", "dead-code elimination", ("reference", "numba", "cuda")),
    Pass("fuse", "fuse:fuse", "conv(+bias)->ReLU->maxpool and its backward; elementwise chains"),
    Pass("schedule", "schedule:schedule", "topological order", ("reference", "numba", "cuda")),
    Pass("memory", "memory:plan_memory", "buffer reuse for dead values"),
]


class Pipeline:
    def __init__(self, backend, **flags):
        unknown = [f for f in flags if f not in {p.name for p in PASSES}]
        if unknown:
            from graphc.errors import GraphError
            raise GraphError(f"unknown pass flag(s) {unknown}; passes are {[p.name for p in PASSES]}")
        self.backend = backend
        self.passes = []
        for p in PASSES:
            on = flags.get(p.name, backend in p.backends)
            if p.name == "check":
                on = True
            try:
                fn = p.load() if on else None
            except ModuleNotFoundError:
                fn, on = None, False      # pass not available in this build
            self.passes.append((p, on, fn))

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
