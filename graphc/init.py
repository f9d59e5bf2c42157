"""Parameter initialisers. Seeded per (graph seed, parameter name), so a parameter's initial value
does not depend on the order the graph was built in."""
import zlib

import numpy as np

from graphc.errors import GraphError


def fans(shape):
    """(fan_in, fan_out) for dense (out, in) and conv (K, C, KH, KW) weights."""
    if len(shape) < 2:
        n = shape[0] if shape else 1
        return n, n
    receptive = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    return shape[1] * receptive, shape[0] * receptive


def initial_value(name, shape, dtype, init, seed, scale=None):
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    fan_in, fan_out = fans(shape)
    if init == "zeros":
        v = np.zeros(shape)
    elif init == "ones":
        v = np.ones(shape)
    elif init == "constant":
        v = np.full(shape, 0.0 if scale is None else scale)
    elif init == "uniform":
        s = 0.05 if scale is None else scale
        v = rng.uniform(-s, s, shape)
    elif init == "normal":
        v = rng.normal(0.0, 0.01 if scale is None else scale, shape)
    elif init in ("he", "he_normal", "kaiming"):
        v = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
    elif init == "he_uniform":
        lim = np.sqrt(6.0 / fan_in)
        v = rng.uniform(-lim, lim, shape)
    elif init in ("glorot", "glorot_uniform", "xavier"):
        lim = np.sqrt(6.0 / (fan_in + fan_out))
        v = rng.uniform(-lim, lim, shape)
    elif init == "glorot_normal":
        v = rng.normal(0.0, np.sqrt(2.0 / (fan_in + fan_out)), shape)
    elif init == "torch":   # PyTorch's default for Linear/Conv weights and biases: U(+-1/sqrt(fan_in))
        lim = 1.0 / np.sqrt(fan_in if scale is None else scale)
        v = rng.uniform(-lim, lim, shape)
    else:
        raise GraphError(f"parameter {name!r}: unknown init {init!r}; use zeros, ones, constant, uniform, normal, "
                         "he, he_uniform, glorot, glorot_normal, torch, or value=np.array(...)")
    return np.asarray(v, dtype=dtype)


INITS = ("zeros", "ones", "constant", "uniform", "normal", "he", "he_uniform", "glorot", "glorot_normal", "torch")
