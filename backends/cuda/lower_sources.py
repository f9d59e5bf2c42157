"""dropout_mask: on the host by design (the reference's seeded draws, so every backend has the same
mask), uploaded each training step (one host->device copy per dropout layer); inference fills ones."""
import numpy as np

from graphc.backends.cuda.kernels.device import fill_step
from graphc.backends.registry import lowerings

lowering, pattern_lowering = lowerings("cuda")


@lowering("dropout_mask", host=True,
          kernel="host (seeded numpy draws, as the reference) + upload; inference: a device fill")
def dropout_mask(ctx):
    out = ctx.out()
    shape = ctx.shape_of(ctx.name)
    rate, seed = float(ctx.attrs["rate"]), int(ctx.attrs["seed"])
    run, dtype = ctx.run, ctx.dtype
    ones = fill_step(out, 1)

    def step():
        if not run.training or rate == 0.0:
            ones()
            return
        keep = np.random.default_rng([seed, run.step]).random(shape) >= rate
        out.copy_to_device((keep / (1.0 - rate)).astype(dtype).reshape(-1))
    return step
