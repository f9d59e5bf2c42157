"""matmul: the implicit GEMM (kernels/gemm.py igemm_mm; transposes read in place); batched (rank > 2)
operands: one GEMM launch per matrix of the broadcast batch, on views of the flat arrays."""
import itertools

import numpy as np

from graphc.backends.cuda.kernels.device import seq
from graphc.backends.cuda.kernels.gemm import matmul_step
from graphc.backends.registry import lowerings

lowering, pattern_lowering = lowerings("cuda")


def _offsets(shape, batch):
    """Element offset of each matrix of a (*b, r, c) operand for every index of the broadcast batch."""
    b = (1,) * (len(batch) - len(shape[:-2])) + tuple(shape[:-2])
    size = int(shape[-2]) * int(shape[-1])
    strides = [int(np.prod(b[d + 1:], dtype=np.int64)) * size for d in range(len(b))]
    return [sum(0 if b[d] == 1 else i * strides[d] for d, i in enumerate(idx))
            for idx in itertools.product(*(range(s) for s in batch))]


@lowering("matmul", kernel="kernels/gemm.py implicit GEMM igemm_mm (transposes read in place; batched: a launch "
                           "per matrix)")
def matmul(ctx):
    sa, sb = ctx.shape_of(ctx.inputs[0]), ctx.shape_of(ctx.inputs[1])
    ta, tb = bool(ctx.attrs.get("trans_a")), bool(ctx.attrs.get("trans_b"))
    a, b = ctx.arrays()
    out = ctx.out()
    if len(sa) == 2 and len(sb) == 2:
        return matmul_step(a, b, out, sa, sb, ta, tb)
    so = ctx.shape_of(ctx.name)
    batch, (m, n) = so[:-2], so[-2:]
    ka, kb = int(sa[-2]) * int(sa[-1]), int(sb[-2]) * int(sb[-1])
    steps = [matmul_step(a[oa:oa + ka], b[ob:ob + kb], out[k * m * n:(k + 1) * m * n], sa[-2:], sb[-2:], ta, tb)
             for k, (oa, ob) in enumerate(zip(_offsets(sa, batch), _offsets(sb, batch)))]
    return seq(steps)
