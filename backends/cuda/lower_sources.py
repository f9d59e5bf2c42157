"""dropout_mask: on the host by design (the reference's seeded draws, so every backend has the same
mask), uploaded each training step (one host->device copy per dropout layer); inference fills ones.
The fused dropout (x * dropout_mask(x), where nothing else reads the mask): a device copy of x at
inference, the same mask and a product kernel in training."""
import numpy as np

from graphc.backends.cuda.kernels.device import fill_step
from graphc.backends.cuda.lower_elementwise import expression_step
from graphc.backends.registry import lowerings

lowering, pattern_lowering = lowerings("cuda")


def _mask_step(attrs, run, out, shape, dtype):
    """A step writing the mask into the flat device array `out`: ones at inference, the reference's
    seeded draws (uploaded) in training."""
    rate, seed = float(attrs["rate"]), int(attrs["seed"])
    ones = fill_step(out, 1)

    def step():
        if not run.training or rate == 0.0:
            ones()
            return
        keep = np.random.default_rng([seed, run.step]).random(shape) >= rate
        out.copy_to_device((keep / (1.0 - rate)).astype(dtype).reshape(-1))
    return step


@lowering("dropout_mask", host=True,
          kernel="host (seeded numpy draws, as the reference) + upload; inference: a device fill")
def dropout_mask(ctx):
    return _mask_step(ctx.attrs, ctx.run, ctx.out(), ctx.shape_of(ctx.name), ctx.dtype)


@pattern_lowering("dropout", kernel="inference: a device copy of x; training: the host mask (as "
                                   "dropout_mask) uploaded and a product kernel")
def dropout(ctx):
    shape, run = ctx.out_shape, ctx.run
    x, out = ctx.array(ctx.inputs[0]), ctx.out()
    attrs = ctx.members["mask"]["attrs"]
    copy = expression_step(ctx, "a0", [x], out, shape, [shape])
    if not float(attrs["rate"]):
        return copy
    mask = ctx.alloc(out.size)
    fill = _mask_step(attrs, run, mask, shape, ctx.dtype)
    product = expression_step(ctx, "a0 * a1", [x, mask], out, shape, [shape, shape])

    def step():
        if not run.training:
            copy()
            return
        fill()
        product()
    return step
