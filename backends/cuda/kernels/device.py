"""Whether CUDA can run here, the kernel factory registry, launches, and the small host helpers every
cuda kernel module uses.

Nothing here imports numba.cuda at module import time: the package imports on a machine with neither a
GPU nor the simulator; ``cuda_status()`` says whether CUDA can be used and why not, ``require_cuda()``
raises ``BackendError`` with the fix. Kernels name numba.cuda as their module's global ``cuda`` (never a
closure variable): the simulator swaps that global for its per-thread fake while a kernel runs, so
``kernel()`` binds it in the kernel's module before jitting.
"""
from __future__ import annotations

import os
import sys

import numpy as np

from graphc.errors import BackendError

INSTALL_HINT = ("backend='cuda' needs an NVIDIA GPU with a CUDA driver, or NUMBA_ENABLE_CUDASIM=1 for the "
                "simulator; install the GPU extra with pip install 'graphc[cuda]'")
EW_BLOCK = 256                  # threads per block of the 1-D grid-stride kernels

cuda = None                     # numba.cuda, bound by load_cuda()
_USABLE = False


# ============================================================================================ availability

def _import_cuda():
    from numba import cuda as c   # lazy on purpose
    return c


def _is_sim_module(c) -> bool:
    return str(getattr(getattr(c, "jit", None), "__module__", "")).startswith("numba.cuda.simulator")


def is_simulator() -> bool:
    """True when numba.cuda in this process is the CUDA simulator."""
    try:
        return _is_sim_module(_import_cuda())
    except Exception:  # pragma: no cover - numba missing
        return False


def _unavailable_reason(c, late):
    err = None
    try:
        err = c.cuda_error()
    except Exception as e:  # pragma: no cover
        err = e
    msg = " ".join(str(err).split()) if err is not None else ""
    low = msg.lower()
    if "driver" in low and ("not be found" in low or "cannot be found" in low or "not found" in low):
        why = "no CUDA driver found (libcuda is not installed: no NVIDIA GPU driver on this machine)"
    elif "no cuda-capable device" in low or "no device" in low or "cuda_error_no_device" in low:
        why = "the CUDA driver is installed but no GPU is visible (CUDA_VISIBLE_DEVICES? containers?)"
    elif msg:
        why = f"CUDA is not usable: {msg}"
    else:
        why = "no CUDA GPU is available"
    return f"{why}{late}; {INSTALL_HINT}"


def cuda_status():
    """``(ok, reason)``: whether the cuda backend can run in this process, and why (not)."""
    env_sim = os.environ.get("NUMBA_ENABLE_CUDASIM", "") not in ("", "0")
    try:
        c = _import_cuda()
    except Exception as e:  # numba missing, or numba-cuda without its CUDA bindings
        return False, f"numba.cuda cannot be imported ({type(e).__name__}: {e}); {INSTALL_HINT}"
    if _is_sim_module(c):
        return True, ("CUDA simulator is on (NUMBA_ENABLE_CUDASIM=1): kernels run as Python threads on the "
                      "CPU - correct but very slow; no real GPU is used")
    late = (" (NUMBA_ENABLE_CUDASIM=1 was set only after numba.cuda had been imported, so the simulator "
            "is not active in this process)") if env_sim else ""
    try:
        ok = bool(c.is_available())
    except Exception as e:  # pragma: no cover
        return False, f"CUDA check failed ({type(e).__name__}: {e}){late}; {INSTALL_HINT}"
    if not ok:
        return False, _unavailable_reason(c, late)
    try:
        dev = c.get_current_device()
        name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
        cc = dev.compute_capability
        return True, f"NVIDIA GPU {name} (compute capability {cc[0]}.{cc[1]})"
    except Exception as e:  # pragma: no cover
        return False, f"a CUDA GPU is listed but cannot be opened ({e}){late}; {INSTALL_HINT}"


def require_cuda():
    """Raises ``BackendError`` unless CUDA (a GPU or the simulator) can run here; returns numba.cuda."""
    return load_cuda(check=True)


def load_cuda(check=True):
    """numba.cuda, bound to the module global ``cuda``; with ``check`` (every launch path) a BackendError
    with the fix when neither a GPU nor the simulator can run (checked once per process). PTX
    compilation passes check=False: it needs no GPU."""
    global cuda, _USABLE
    if cuda is None:
        try:
            cuda = _import_cuda()
        except Exception as e:
            raise BackendError(f"{INSTALL_HINT}. Here: numba.cuda cannot be imported ({e})") from e
    if check and not _USABLE:
        ok, reason = cuda_status()
        if not ok:
            raise BackendError(f"{INSTALL_HINT}. Here: {reason.split(';')[0]}")
        _USABLE = True
    return cuda


# ===================================================================================== kernels and launches

FACTORIES: dict = {}            # name -> (factory(numba dtype) -> python kernel, PTX signature)
_JITTED: dict = {}


def factory(name, signature):
    """Registers fn(nbt) -> the Python kernel for numba dtype nbt. signature: the kernel's argument types
    for PTX compilation, e.g. "fa, fa, ia, i64*10" (fa/ia/la: float/int32/int64 arrays, f: a float of the
    dtype, i64: an int)."""
    def register(fn):
        FACTORIES[name] = (fn, signature)
        return fn
    return register


class _DeviceMath:
    """``math`` as the device computes it, for kernels run by the simulator: Python's math raises where a
    GPU returns IEEE values (log(0) is -inf, exp(1000) inf, sqrt(-1) NaN), so the simulator could not
    run the NaN/inf paths the device does. Its functions are numpy's (float32 stays float32, as on the
    device); constants and the rest are math's."""

    _IEEE = ("exp", "log", "log1p", "expm1", "sqrt", "pow", "tanh", "sin", "cos", "floor", "ceil", "fabs")

    def __init__(self):
        import math
        self.__dict__.update({k: getattr(math, k) for k in dir(math) if not k.startswith("_")})
        for name in self._IEEE:
            self.__dict__[name] = self._quiet(getattr(np, {"pow": "power"}.get(name, name)))

    @staticmethod
    def _quiet(fn):
        def ieee(*args):
            with np.errstate(all="ignore"):
                return fn(*args)
        return ieee


def kernel_math(c):
    """The ``math`` kernels of numba.cuda module `c` are given: math itself, or _DeviceMath under the
    simulator."""
    import math
    return _DeviceMath() if _is_sim_module(c) else math


def bind_cuda_global(fn, c):
    """Gives the module that defines `fn` its ``cuda`` global (the simulator swaps it per kernel), and
    under the simulator its ``math`` (kernel_math)."""
    mod = sys.modules.get(fn.__module__)
    if mod is not None and getattr(mod, "cuda", None) is None:
        mod.cuda = c
        if _is_sim_module(c) and hasattr(mod, "math"):
            mod.math = kernel_math(c)


def kernel(name, dtype):
    """The jitted kernel `name` for arrays of `dtype` (made once per process)."""
    key = (name, np.dtype(dtype))
    k = _JITTED.get(key)
    if k is None:
        c = load_cuda()
        make = FACTORIES[name][0]
        bind_cuda_global(make, c)
        fn = make(nbtype(dtype))
        k = _JITTED[key] = c.jit(fn)
    return k


def launcher(k, grid, block, *args):
    """A launch with its arguments resolved at bind time. (The configuration k[grid, block] is made at
    each call: the simulator's kernels keep the last configuration on the kernel object itself, so one
    made in advance would be overwritten by another launch of the same kernel.)"""
    def step():
        k[grid, block](*args)
    return step


def seq(steps):
    """One step running `steps` (None entries skipped) in order."""
    steps = [s for s in steps if s is not None]
    if len(steps) == 1:
        return steps[0]

    def step():
        for s in steps:
            s()
    return step


def nothing():
    """A step with no work (an empty launch)."""


def grid1d(n, block=EW_BLOCK):
    return max(1, min(cdiv(n, block), 32 * sm_count()))


def launch1d(name, dtype, n, *args):
    """A 1-D grid-stride launch of kernel `name` over n elements (its args after the arrays include n
    where the kernel needs it)."""
    return launcher(kernel(name, dtype), grid1d(n), EW_BLOCK, *args) if n else nothing


# ============================================================================================ small helpers

_SM_COUNT = []


def sm_count() -> int:
    if not _SM_COUNT:
        c = load_cuda()
        n = 132  # H100 SXM
        if _is_sim_module(c):
            n = 4  # keeps simulated grids tiny while still exercising the split/multi-block paths
        else:
            try:
                n = int(c.get_current_device().MULTIPROCESSOR_COUNT)
            except Exception:  # pragma: no cover
                pass
        _SM_COUNT.append(max(1, n))
    return _SM_COUNT[0]


def cdiv(a, b):
    return -(-a // b)


def p2(n, cap):
    """Smallest power of two >= n, at most cap."""
    p = 1
    while p < n and p < cap:
        p *= 2
    return p


def pair(v, name):
    if isinstance(v, (int, np.integer)):
        return int(v), int(v)
    try:
        a, b = v
        return int(a), int(b)
    except Exception as e:
        raise BackendError(f"{name} must be an int or an (h, w) pair, got {v!r}") from e


def pads4(p):
    if isinstance(p, (int, np.integer)):
        return (int(p),) * 4
    p = tuple(int(v) for v in p)
    if len(p) == 2:
        return p[0], p[0], p[1], p[1]
    if len(p) == 4:
        return p
    raise BackendError(f"pads must be an int, (ph, pw) or (top, bottom, left, right), got {p!r}")


_NB = {}


def nbtype(dtype):
    dt = np.dtype(dtype)
    if dt not in _NB:
        from numba import from_dtype
        _NB[dt] = from_dtype(dt)
    return _NB[dt]


def fdtype(*arrays):
    """The float dtype the arrays share (a BackendError when they do not)."""
    dt = np.dtype(arrays[0].dtype)
    if dt not in (np.float32, np.float64):
        raise BackendError(f"cuda kernels take float32 or float64 arrays, got {dt}")
    for a in arrays[1:]:
        if a is not None and np.dtype(a.dtype) != dt:
            raise BackendError(f"cuda kernel arguments mix dtypes: {dt} and {np.dtype(a.dtype)}")
    return dt


def flat(a):
    """1-D view of a C-contiguous device array."""
    if not a.is_c_contiguous():
        raise BackendError(f"cuda kernels need C-contiguous device arrays (got shape {a.shape}, strides "
                           f"{getattr(a, 'strides', '?')})")
    return a.reshape(a.size)


def check_shape(a, ndim, what):
    if len(a.shape) != ndim:
        raise BackendError(f"{what} must be {ndim}-D, got shape {tuple(a.shape)}")


def to_device(a, dtype=None):
    """numpy -> device (C-contiguous); device arrays pass through."""
    c = load_cuda()
    if isinstance(a, np.ndarray) or np.isscalar(a):
        return c.to_device(np.ascontiguousarray(a, dtype=dtype))
    return a


def to_host(a):
    if a is None or isinstance(a, (np.ndarray, int, float)):
        return a
    if isinstance(a, tuple):
        return tuple(to_host(v) for v in a)
    if isinstance(a, list):
        return [to_host(v) for v in a]
    return a.copy_to_host()


def empty(shape, dtype):
    return load_cuda().device_array(tuple(int(s) for s in shape), dtype=np.dtype(dtype))


def alloc_flat(n, dtype=None):
    """A flat device array of n (at least 1) elements: the scratch allocator of the public functions."""
    return load_cuda().device_array(max(int(n), 1), dtype=np.dtype(dtype or np.float32))


@factory("fill", "fa, f, i64")
def _mk_fill(nbt):
    def fill_k(out, value, n):
        start = cuda.grid(1)
        step = cuda.gridsize(1)
        for i in range(start, n, step):
            out[i] = value
    return fill_k


def fill_step(out, value):
    """A step setting every element of the flat array `out` to value."""
    n = int(out.size)
    dt = np.dtype(out.dtype)
    return launch1d("fill", dt, n, out, dt.type(value), n)


def fill(out, value):
    fill_step(flat(out), value)()
    return out


def device_zeros(shape, dtype=np.float32):
    return fill(empty(shape, dtype), 0)


_DUMMY = {}


def dummy(dtype, value=0):
    """A 1-element device array standing for an absent argument (a bias, a route)."""
    key = (np.dtype(dtype), value)
    if key not in _DUMMY:
        _DUMMY[key] = load_cuda().to_device(np.full(1, value, np.dtype(dtype)))
    return _DUMMY[key]


def flag_sink():
    """A 1-element int32 device array for a kernel flag that nobody reads (a dummy of its own: a kernel
    setting it changes no argument another kernel reads)."""
    return dummy(np.int32, -(2**31))
