"""Two questions Numba asks over and over while it compiles, answered once per process: the type of a
call, and the ABI size of an LLVM type.

**Calls.** The same function on the same argument types is resolved once.

Typing a kernel resolves every call, operator and subscript in it (``a * b``, ``x[i, j]``) through
``BaseFunction.get_call_type``. That tries each of the function's templates in turn (operator.mul has
dozens) and builds an error message for every template that does not match; Numba keeps no record of
what it found, so the 500th ``float32 * float32`` of a cold start costs what the first did. Compiling
mnist_convnet's training step (16 kernels) in one process (``GRAPHC_COMPILE_WORKERS=0``) resolves about
3,500 calls, 95% of them repeats of an earlier one, and typing took 1.7-1.8 s of its ~8 s of compile
CPU, 0.8-1.0 s with this memo (a scratch count, and timers around Numba's passes).

What is remembered is only a success, keyed by the typing context, the target in force and the exact
argument types (literal values included): a template's own caches (compiled @overload bodies, the
implementation key for lowering) were filled by that first resolution, so the answer given again is the
one Numba would compute. Failures and calls with keyword arguments go to Numba each time. The optimised
LLVM IR of every kernel in that step is the same with and without the memo (compared after Numba's
module passes, its unique name suffixes aside). It applies to every Numba compile in the process, a
user's own @njit functions included (the same types come out, sooner); ``GRAPHC_NUMBA_COMPILE_MEMO=0``
turns it off, and a Numba whose ``get_call_type`` does not look as expected is left alone.

**ABI sizes.** Lowering asks the size of each variable's LLVM type (for debug information that is off
by default), and llvmlite answers each question by printing a module holding one global of that type and
parsing it with LLVM: about 400 parses for a few dozen distinct types, 0.36 s of a cProfile of the
step's one-process compile (scratch). The size of a type under one data layout follows from the type's
text, so it is remembered by that text, except for types that name a struct (``%name``), whose body the
text does not show. The same switch turns this off.
"""
from __future__ import annotations

import inspect
import os

_INSTALLED: list = []       # [the original get_call_type] once installed


def install() -> bool:
    """Puts the memos in front of Numba's ``BaseFunction.get_call_type`` and ``BaseContext.get_abi_sizeof``
    (once per process); False where they are turned off or Numba's methods do not have the expected
    shape."""
    if _INSTALLED:
        return True
    if os.environ.get("GRAPHC_NUMBA_COMPILE_MEMO", "1") == "0":
        return False
    from numba.core.base import BaseContext
    from numba.core.target_extension import get_local_target
    from numba.core.types.functions import BaseFunction
    original = BaseFunction.get_call_type
    sizeof = BaseContext.get_abi_sizeof
    if list(inspect.signature(original).parameters) != ["self", "context", "args", "kws"] or \
            list(inspect.signature(sizeof).parameters) != ["self", "ty"]:
        return False

    def get_call_type(self, context, args, kws):
        if kws:
            return original(self, context, args, kws)
        try:
            memo = self.__dict__["_graphc_call_types"]
        except KeyError:
            memo = self.__dict__["_graphc_call_types"] = {}
        # the context itself (not its id: a dead one's id can be reused) and the target, which orders
        # the templates (a CUDA overload is preferred under the CUDA target)
        key = (context, get_local_target(context), args)
        try:
            return memo[key]
        except KeyError:
            pass
        except TypeError:           # an argument type that cannot be hashed: Numba decides each time
            return original(self, context, args, kws)
        sig = original(self, context, args, kws)
        if sig is not None:
            memo[key] = sig
        return sig

    sizes = {}

    def get_abi_sizeof(self, ty):
        text = str(ty)
        if "%" in text:             # a named struct: its text does not show its body
            return sizeof(self, ty)
        key = (self.target_data, text)      # held here, so no other layout can take its address
        if key not in sizes:
            sizes[key] = sizeof(self, ty)
        return sizes[key]

    get_call_type.__wrapped__ = original
    BaseFunction.get_call_type = get_call_type
    get_abi_sizeof.__wrapped__ = sizeof
    BaseContext.get_abi_sizeof = get_abi_sizeof
    _INSTALLED.append(original)
    return True


def original_get_call_type():
    """Numba's own ``get_call_type`` (for tests: the memo's answers against a fresh resolution)."""
    return _INSTALLED[0] if _INSTALLED else None
