"""Lowering registries: for each backend, the function that lowers each op and each fused pattern,
registered where it is written (the model is JAX's ``register_lowering(prim, rule, platform=...)``)::

    lowering, pattern_lowering = lowerings("numba")

    @lowering("avgpool", kernel="kernels.pool.avgpool_k")
    def avgpool(ctx):                # ctx: backends.base.LowerContext
        ...
        return step                  # a callable run per call, or None: the reference runs it on the host

    @pattern_lowering("my_pattern", kernel="...")
    def my_pattern(ctx):             # its body members by role: ctx.members["conv"], ...

The kernel table (``kernel_table()``), the benchmark's per-kernel kind and the list of ops that fall
back to the reference are generated from these registrations.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from graphc import ops as optable

FALLBACK = "fallback: the op table's reference implementation, run on the host"
VIEW = "view (no kernel: the value is its input's buffer)"


@dataclass(frozen=True)
class Lowering:
    key: str                 # the op, or the fused pattern
    fn: Callable             # fn(ctx) -> step callable, or None (the reference runs the node on the host)
    kernel: str              # what runs, in words (the kernel table)
    pattern: bool = False
    scalar_ops: bool = False  # also lowers every single op that has a scalar expression
    host: bool = False       # runs on the host by design (shown as a fallback)


def is_view(op):
    """Ops whose value is a view of their input's buffer (the memory plan makes them aliases) and the
    results of multi-result fused nodes (written by the fused node itself)."""
    from graphc import ops as optable
    return op == "getitem" or (op in optable.OPS and optable.OPS[op].alias)


class Registry:
    def __init__(self, backend):
        self.backend = backend
        self.ops: dict[str, Lowering] = {}
        self.patterns: dict[str, Lowering] = {}

    def _add(self, table, key, lw):
        if key in table:
            raise ValueError(f"{self.backend}: {key!r} lowered twice")
        table[key] = lw
        return lw.fn

    def lowering(self, *ops, kernel, host=False):
        """Decorator: fn(ctx) lowers the ops `ops` on this backend."""
        def register(fn):
            for op in ops:
                self._add(self.ops, op, Lowering(op, fn, kernel, host=host))
            return fn
        return register

    def pattern_lowering(self, pattern, kernel, scalar_ops=False):
        """Decorator: fn(ctx) lowers fused nodes of `pattern` (with scalar_ops, also every lone op that
        has a scalar expression: the body is then that one op)."""
        return lambda fn: self._add(self.patterns, pattern, Lowering(pattern, fn, kernel, True, scalar_ops))

    def scalar_lowering(self):
        return next((lw for lw in self.patterns.values() if lw.scalar_ops), None)

    def for_node(self, op, attrs):
        """The lowering of a node (None: the reference runs it on the host)."""
        if op == "fused":
            return self.patterns.get(attrs["pattern"])
        lw = self.ops.get(op)
        if lw is None and optable.OPS[op].scalar is not None:
            return self.scalar_lowering()
        return lw

    def kernel_table(self):
        """[(op or "fused:<pattern>", kernel)] for every op of the table and every fused pattern."""
        rows = []
        scalar = self.scalar_lowering()
        for op in sorted(optable.OPS):
            d = optable.OPS[op]
            if d.source or op == "fused":
                continue
            if is_view(op):
                rows.append((op, VIEW))
            elif op in self.ops:
                rows.append((op, self.ops[op].kernel))
            elif d.scalar is not None and scalar is not None:
                rows.append((op, scalar.kernel))
            else:
                rows.append((op, FALLBACK))
        rows += [(f"fused:{p}", lw.kernel) for p, lw in sorted(self.patterns.items())]
        return rows

    def fallback_ops(self):
        """Ops this backend always runs with the reference on the host."""
        return [op for op, kernel in self.kernel_table() if kernel == FALLBACK]


_REGISTRIES: dict[str, Registry] = {}


def registry(backend) -> Registry:
    return _REGISTRIES.setdefault(backend, Registry(backend))


def lowerings(backend):
    """(lowering, pattern_lowering): the registration decorators of `backend`."""
    r = registry(backend)
    return r.lowering, r.pattern_lowering
