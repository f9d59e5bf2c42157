"""Source ops: inputs, parameters (and optimizer state), constants. They have no inputs."""
import numpy as np

from graphc.ops import OpDef, register


def _given(node, in_types):
    return node.attrs["shape"], node.attrs["dtype"]


def _no_ref(inputs, attrs, ctx):  # values come from the feed / the executable's state
    raise AssertionError("source ops are not evaluated")


register(OpDef("input", _given, _no_ref, source=True, differentiable=False,
               doc="A value fed at run time; a None/str dim is the symbolic batch dim."))
register(OpDef("param", _given, _no_ref, source=True,
               doc="A trainable parameter (or, with trainable=False, optimizer/graph state)."))
register(OpDef("const", _given, lambda inputs, attrs, ctx: attrs["value"], source=True,
               differentiable=False, doc="A constant array baked into the graph."))


def _dropout_mask_infer(node, in_types):
    (shape, dtype), = in_types
    return shape, dtype


def _dropout_mask_ref(inputs, attrs, ctx):
    x, = inputs
    rate = attrs["rate"]
    if not ctx.training or rate == 0.0:
        return np.ones(x.shape, x.dtype)
    # Counter-based seeding: the same (seed, step) gives the same mask in every backend.
    rng = np.random.default_rng([attrs["seed"], ctx.step])
    keep = rng.random(x.shape) >= rate
    return (keep / (1.0 - rate)).astype(x.dtype)


def _dropout_mask_torch(F, torch, ins, attrs, ctx):
    x, rate = ins[0], attrs["rate"]
    if not ctx.training or not rate:
        return torch.ones_like(x)
    return (torch.rand_like(x) >= rate).to(x.dtype) / (1 - rate)


register(OpDef("dropout_mask", _dropout_mask_infer, _dropout_mask_ref, host=True, differentiable=False,
               run_dependent=True,
               doc="Inverted-dropout mask shaped like its input: 0 or 1/(1-rate) in training, 1 at inference; "
                   "seeded by (seed, step).", torch=_dropout_mask_torch))
