"""dropout_mask: numpy's seeded generator on the host (the same draws as the reference, so the same
mask in every backend), thresholded by kernels/mask.py. The fused dropout (x * dropout_mask(x), where
nothing else reads the mask): a copy of x at inference, the same mask and product in training."""
import numpy as np

from graphc.backends.numba.kernels.mask import dropout_mask_k
from graphc.backends.registry import lowerings

lowering, pattern_lowering = lowerings("numba")


def _mask_step(attrs, run, out):
    """A step writing the mask into `out`: ones at inference, the reference's seeded draws in training."""
    flat = out.reshape(-1)
    rate, seed = float(attrs["rate"]), int(attrs["seed"])
    scale = 1.0 / (1.0 - rate)

    def step():
        if not run.training or rate == 0.0:
            out.fill(1)
            return
        u = np.random.default_rng([seed, run.step]).random(out.shape)   # the reference's draws
        dropout_mask_k(u.reshape(-1), rate, scale, flat)
    return step


@lowering("dropout_mask", kernel="host RNG (numpy, the reference's draws) + kernels/mask.py dropout_mask_k")
def dropout_mask(ctx):
    return _mask_step(ctx.attrs, ctx.run, ctx.out())


@pattern_lowering("dropout", kernel="inference: a copy of x; training: the mask (host RNG + kernels/mask.py "
                                    "dropout_mask_k) and numpy's product")
def dropout(ctx):
    out, run, values, xi = ctx.out(), ctx.run, ctx.values, ctx.index(ctx.inputs[0])
    rate = float(ctx.members["mask"]["attrs"]["rate"])
    mask = ctx.scratch(out.shape, out.dtype) if rate else None    # (a training run's, rare here)
    fill = _mask_step(ctx.members["mask"]["attrs"], run, mask) if rate else None
    copy, mul = np.copyto, np.multiply

    def step():
        x = values[xi]
        if not run.training or not rate:
            copy(out, x)
            return
        fill()
        mul(x, mask, out=out)
    return step
