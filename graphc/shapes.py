"""Shape helpers shared by the op table: symbolic batch dims, broadcasting, conv and pool output sizes.

A dim is an int or a str (a symbolic dim such as the batch dim ``"N"``, bound when the graph runs).
"""
from __future__ import annotations

import math
import numbers

from graphc.errors import ShapeError


def fmt(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def is_static(shape) -> bool:
    return all(isinstance(d, int) for d in shape)


def numel(shape, env=None):
    """Number of elements; symbolic dims are looked up in env (or the result is None)."""
    n = 1
    for d in shape:
        if isinstance(d, str):
            if env is None or d not in env:
                return None
            d = env[d]
        n *= d
    return n


def resolve(shape, env) -> tuple:
    return tuple(env[d] if isinstance(d, str) else d for d in shape)


def broadcast(node, *shapes):
    """numpy broadcasting over possibly-symbolic shapes; a symbolic dim meets only itself or 1."""
    nd = max(len(s) for s in shapes)
    out = []
    for i in range(nd):
        dims = {s[len(s) - nd + i] for s in shapes if len(s) - nd + i >= 0}
        dims.discard(1)
        if len(dims) > 1:
            node.fail(ShapeError, "cannot broadcast shapes " + " and ".join(fmt(s) for s in shapes),
                      "numpy broadcasting needs each trailing dim equal or 1; reshape one operand")
        out.append(dims.pop() if dims else 1)
    return tuple(out)


def is_int(v) -> bool:
    """A Python or numpy integer, not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def pair(v, what="value", minimum=None):
    """An int or a pair of ints -> (a, b); with `minimum`, each must be >= minimum (stride 0 would
    divide by zero, a negative pad would read outside the input)."""
    if is_int(v):
        v = (v, v)
    if not (isinstance(v, (tuple, list)) and len(v) == 2 and all(is_int(i) for i in v)):
        raise ShapeError(f"{what} must be an int or a pair of ints, got {v!r}")
    if minimum is not None and min(v) < minimum:
        raise ShapeError(f"{what} must be {'positive' if minimum == 1 else f'>= {minimum}'}, got {v!r}")
    return (int(v[0]), int(v[1]))


def pads4(pads, what="padding"):
    """(top, bottom, left, right) of non-negative ints (an int pads all four sides)."""
    if is_int(pads):
        pads = (pads,) * 4
    if not (isinstance(pads, (tuple, list)) and len(pads) == 4 and all(is_int(p) for p in pads)):
        raise ShapeError(f"{what} must be an int or (top, bottom, left, right) ints, got {pads!r}")
    if min(pads) < 0:
        raise ShapeError(f"{what} must be >= 0 on every side, got {tuple(pads)}")
    return tuple(int(p) for p in pads)


def norm_axis(axis, ndim, what="axis"):
    """An axis in -ndim..ndim-1 -> 0..ndim-1; anything else is a ShapeError (numpy's rule, no wrapping)."""
    if not is_int(axis) or not -ndim <= axis < ndim:
        raise ShapeError(f"{what} {axis!r} is out of range for a {ndim}-D value (valid: {-ndim}..{ndim - 1})")
    return int(axis) % ndim


def conv_pads(pad, in_hw, k_hw, stride):
    """Normalise a padding spec to (top, bottom, left, right).

    int or (ph, pw): symmetric; 'valid': none; 'same': output = ceil(in / stride), the extra row/column
    going to the bottom/right as Keras/TensorFlow do (so even kernels work).
    """
    if isinstance(pad, str):
        if pad == "valid":
            return (0, 0, 0, 0)
        if pad == "same":
            out = []
            for n, k, s in zip(in_hw, k_hw, stride):
                total = max((math.ceil(n / s) - 1) * s + k - n, 0)
                out += [total // 2, total - total // 2]
            return tuple(out)
        raise ShapeError(f"padding must be an int, a pair, a 4-tuple, 'valid' or 'same', got {pad!r}")
    if isinstance(pad, (tuple, list)) and len(pad) == 4:
        return pads4(pad)
    ph, pw = pair(pad, "padding", minimum=0)
    return (ph, ph, pw, pw)


def window_out(n, k, s, p_total=0):
    """Output length of a sliding window: floor((n + P - k) / s) + 1 (conv: (W - F + 2P)/S + 1)."""
    return (n + p_total - k) // s + 1


def merge_loop_dims(out_shape, in_shapes):
    """The loop nest of a broadcasting elementwise kernel with adjacent dims merged when every input
    runs along both or neither: returns (dims, flags), flags[d][k] = input k runs along loop dim d."""
    nd = len(out_shape)
    padded = [(1,) * (nd - len(s)) + tuple(s) for s in in_shapes]
    dims, flags = [], []
    for d in range(nd):
        if out_shape[d] == 1:
            continue
        f = tuple(p[d] != 1 for p in padded)
        if flags and flags[-1] == f:
            dims[-1] *= out_shape[d]
        else:
            dims.append(out_shape[d])
            flags.append(f)
    if not dims:
        dims, flags = [1], [tuple(False for _ in in_shapes)]
    return dims, flags


def sum_to_axes(shape, target):
    """The axes to sum `shape` over (keeping dims) so that it becomes `target` (which broadcasts to it):
    the leading extra axes and those where target has 1 and shape has not."""
    lead = len(shape) - len(target)
    return tuple(range(lead)) + tuple(lead + i for i, d in enumerate(target) if d == 1 and shape[lead + i] != 1)
