"""PTX for every kernel (needs numba-cuda with NVVM, not a GPU): a compile check of the sources and of
what NVVM makes of them (registers, spills, shared memory, float64 instructions)."""
from __future__ import annotations

import numpy as np

from graphc.backends.cuda.kernels import device
from graphc.backends.cuda.kernels.elementwise import elementwise_kernel
from graphc.errors import BackendError


def signature(text, dtype):
    """A numba signature from a factory's "fa, ia, i64*3, f" (see device.factory)."""
    from numba import types as T
    f = device.nbtype(dtype)
    kinds = {"fa": T.Array(f, 1, "C"), "ia": T.Array(T.int32, 1, "C"), "la": T.Array(T.int64, 1, "C"),
             "f": f, "i64": T.int64}
    args = []
    for part in (p.strip() for p in text.split(",")):
        kind, _, count = part.partition("*")
        args += [kinds[kind]] * int(count or 1)
    return T.void(*args)


def _compiler():
    c = device.load_cuda(check=False)
    if device._is_sim_module(c) or not hasattr(c, "compile_ptx"):
        raise BackendError("PTX compilation needs the real numba.cuda target, not the simulator")
    for mod in ("gemm", "conv_pool", "depthwise", "pool", "reduce", "softmax", "copy", "norm",
                "plane"):  # fill the factory registry
        __import__(f"graphc.backends.cuda.kernels.{mod}")
    return c


def compile_ptx_all(cc=(9, 0), dtype=np.float32, elementwise=(), names=None):
    """Compiles every kernel (or those in ``names``) and the given elementwise kernels
    (``(exprs, n_inputs[, n_scalars])``) to PTX for compute capability ``cc`` with ``cuda.compile_ptx``;
    returns {name: ptx}. Needs NVVM (numba-cuda's pip CUDA toolkit, pip install 'graphc[cuda]', or a
    CUDA toolkit on the system), not a GPU; raises BackendError under the simulator."""
    c = _compiler()
    res = {}
    for name, (make, sigs) in device.FACTORIES.items():
        if names is not None and name not in names:
            continue
        device.bind_cuda_global(make, c)
        for k, sig in enumerate((sigs,) if isinstance(sigs, str) else sigs):
            res[name if k == 0 else f"{name}[{k}]"] = c.compile_ptx(make(device.nbtype(dtype)), signature(sig, dtype),
                                                                    cc=cc)[0]
    for spec in elementwise:
        k = elementwise_kernel(*spec)
        sig = signature(", ".join(["i64"] + ["fa"] * (len(k.exprs) + k.n_inputs) + ["f"] * k.n_scalars), dtype)
        res[f"elementwise{k.exprs!r}"] = c.compile_ptx(k.pyfunc(dtype), sig, cc=cc)[0]
    return res
