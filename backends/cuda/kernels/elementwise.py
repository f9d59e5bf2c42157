"""Elementwise CUDA kernels, written by the shared generator (backends/codegen.py, CudaDialect): the
graph's elementwise nodes and groups (with broadcasting), and ``elementwise_kernel`` for hand-written
expressions (same-size inputs, scalars s<k>, several outputs)."""
from __future__ import annotations

import ast

import numpy as np

from graphc.backends import codegen
from graphc.backends.cuda.kernels.device import (EW_BLOCK, empty, flat, grid1d, kernel_math, launcher, load_cuda,
                                                 nbtype, nothing)
from graphc.errors import BackendError

_JITTED: dict = {}


def pyfunc(src, dtype, cuda_module=None):
    """The Python kernel function of a generated source (what gets jitted or compiled to PTX)."""
    c = cuda_module if cuda_module is not None else load_cuda(check=False)
    ns = {"cuda": c, "math": kernel_math(c), "_T": nbtype(dtype)}
    exec(compile(src, "<graphc cuda elementwise>", "exec"), ns)  # noqa: S102
    return ns["_ew_kernel"]


def jitted(src, dtype):
    key = (src, np.dtype(dtype))
    k = _JITTED.get(key)
    if k is None:
        k = _JITTED[key] = load_cuda().jit(pyfunc(src, dtype))
    return k


def graph_kernel_source(body, results, plan):
    """(source, rank) of a graph node's or group's kernel: body [(expr, refs)], its loop plan."""
    return codegen.CudaDialect().source(body, list(results), plan)


def graph_step(src, rank, plan, ins, outs, dtype):
    """The launch of a generated group kernel over flat arrays: ins are the loaded inputs' arrays."""
    n = int(outs[0].size)
    if not n:
        return nothing
    args = (n, *outs, *ins, *[int(d) for d in plan.dims[:rank]])
    return launcher(jitted(src, dtype), grid1d(n), EW_BLOCK, *args)


class ElementwiseKernel:
    """A generated 1-D grid-stride kernel computing one or more outputs from same-size inputs.

    ``k(*inputs, scalars=(), out=None, dtype=None)``: inputs are device arrays of one size (shapes may
    differ: they are read flat); scalars are Python numbers (cast to the kernel dtype); ``out`` is an
    array or a tuple of arrays (may alias inputs: every input is read before any output is written at an
    index, so in-place optimizer updates are safe); the outputs get the first input's shape and dtype
    unless ``out`` or ``dtype`` says otherwise. Returns the output, or a tuple for several.
    """

    def __init__(self, exprs, n_inputs, n_scalars):
        self.exprs, self.n_inputs, self.n_scalars = exprs, n_inputs, n_scalars
        self._body = [(e, [("in", i) for i in range(n_inputs)]) for e in exprs]
        self._plan = codegen.LoopPlan((1,), ["full"] * n_inputs, {})
        self.source = self._source(cast=True)             # float kernels
        self._int_source = None                           # integer kernels, on demand
        self._jitted = {}

    def _source(self, cast):
        return codegen.CudaDialect().source(self._body, list(range(len(self.exprs))), self._plan, self.n_scalars,
                                            cast)[0]

    def pyfunc(self, dtype):
        """The plain Python kernel function for outputs of ``dtype``."""
        src = self.source
        if np.dtype(dtype).kind != "f":
            if self._int_source is None:
                self._int_source = self._source(cast=False)
            src = self._int_source
        return pyfunc(src, dtype)

    def _get(self, dtype):
        dt = np.dtype(dtype)
        k = self._jitted.get(dt)
        if k is None:
            k = self._jitted[dt] = load_cuda().jit(self.pyfunc(dt))
        return k

    def _outputs(self, inputs, out, dtype, n):
        if out is None:
            if dtype is None:
                dtype = next((a.dtype for a in inputs if np.dtype(a.dtype).kind == "f"), inputs[0].dtype)
            return tuple(empty(tuple(inputs[0].shape), dtype) for _ in self.exprs)
        outs = out if isinstance(out, tuple) else (out,)
        if len(outs) != len(self.exprs):
            raise BackendError(f"elementwise kernel {self.exprs!r} has {len(self.exprs)} outputs, got {len(outs)}")
        for o in outs:
            if int(o.size) != n:
                raise BackendError(f"elementwise kernel output of size {o.size}, expected {n}")
        return outs

    def __call__(self, *inputs, scalars=(), out=None, dtype=None):
        if len(inputs) != self.n_inputs:
            raise BackendError(f"elementwise kernel {self.exprs!r} takes {self.n_inputs} inputs, got {len(inputs)}")
        scalars = tuple(scalars) if isinstance(scalars, (tuple, list)) else (scalars,)
        if len(scalars) != self.n_scalars:
            raise BackendError(f"elementwise kernel {self.exprs!r} takes {self.n_scalars} scalars, "
                               f"got {len(scalars)}")
        n = int(inputs[0].size) if inputs else (int(out[0].size) if isinstance(out, tuple) else int(out.size))
        for a in inputs:
            if int(a.size) != n:
                raise BackendError(f"elementwise kernel {self.exprs!r}: inputs differ in size "
                                   f"({[tuple(v.shape) for v in inputs]}); no broadcasting here")
        outs = self._outputs(inputs, out, dtype, n)
        dt = np.dtype(outs[0].dtype)
        if n:
            sc = tuple(dt.type(s) for s in scalars)
            self._get(dt)[grid1d(n), EW_BLOCK](n, *(flat(o) for o in outs), *(flat(a) for a in inputs), *sc)
        return outs if len(outs) > 1 else outs[0]


_KERNELS: dict = {}


def elementwise_kernel(expr_source, n_inputs, n_scalars=None):
    """Compiles (once; cached) a CUDA kernel for a scalar expression over inputs a0..a{n-1}.

    ``expr_source``: a string such as ``"a0 * (a1 > 0)"`` or ``"a0 - s0 * a1"`` (``s0, s1, ...`` are
    scalar constants passed at call time), or a tuple of strings for several outputs, where expression k
    may use the earlier outputs ``o0..o{k-1}``. Functions: exp, log, log1p, expm1, sqrt, tanh, sin, cos,
    floor, ceil, fabs, abs, pow, min, max, where(c, x, y); ``x if c else y``; constants inf, nan, pi, e.
    Example, Adam in one kernel (inputs g, m, v, p; scalars b1, b2, lr_t, eps)::

        adam = elementwise_kernel(("s0*a1 + (1-s0)*a0", "s1*a2 + (1-s1)*a0*a0",
                                   "a3 - s2*o0/(sqrt(o1) + s3)"), 4)
        adam(g, m, v, p, scalars=(b1, b2, lr_t, eps), out=(m, v, p))
    """
    exprs = (expr_source,) if isinstance(expr_source, str) else tuple(expr_source)
    if not exprs or not all(isinstance(e, str) for e in exprs):
        raise BackendError(f"elementwise_kernel takes an expression string or a tuple of them, got {expr_source!r}")
    if n_scalars is None:
        n_scalars = 0
        for e in exprs:
            try:
                for node in ast.walk(ast.parse(e.strip(), mode="eval")):
                    if isinstance(node, ast.Name) and node.id.startswith("s") and node.id[1:].isdigit():
                        n_scalars = max(n_scalars, int(node.id[1:]) + 1)
            except SyntaxError as err:
                raise BackendError(f"elementwise expression {e!r} does not parse: {err}") from err
    key = (exprs, int(n_inputs), int(n_scalars))
    k = _KERNELS.get(key)
    if k is None:
        k = _KERNELS[key] = ElementwiseKernel(exprs, int(n_inputs), int(n_scalars))
    return k
