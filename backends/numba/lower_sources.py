"""dropout_mask: numpy's seeded generator on the host (the same draws as the reference, so the same
mask in every backend), thresholded by kernels/mask.py."""
import numpy as np

from graphc.backends.numba.kernels.mask import dropout_mask_k
from graphc.backends.registry import lowerings

lowering, pattern_lowering = lowerings("numba")


@lowering("dropout_mask", kernel="host RNG (numpy, the reference's draws) + kernels/mask.py dropout_mask_k")
def dropout_mask(ctx):
    out = ctx.out()
    flat = out.reshape(-1)
    rate, seed = float(ctx.attrs["rate"]), int(ctx.attrs["seed"])
    scale = 1.0 / (1.0 - rate)
    run = ctx.run

    def step():
        if not run.training or rate == 0.0:
            out.fill(1)
            return
        u = np.random.default_rng([seed, run.step]).random(out.shape)   # the reference's draws
        dropout_mask_k(u.reshape(-1), rate, scale, flat)
    return step
