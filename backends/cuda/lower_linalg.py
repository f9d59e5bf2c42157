"""matmul: the implicit GEMM (kernels/gemm.py igemm_mm; transposes read in place)."""
from graphc.backends.cuda.kernels.gemm import matmul_step
from graphc.backends.registry import lowerings

lowering, pattern_lowering = lowerings("cuda")


@lowering("matmul", kernel="kernels/gemm.py implicit GEMM igemm_mm (transposes read in place)")
def matmul(ctx):
    if len(ctx.shape_of(ctx.inputs[0])) != 2 or len(ctx.shape_of(ctx.inputs[1])) != 2:
        return None                     # batched (rank > 2): host fallback
    a, b = ctx.arrays()
    return matmul_step(a, b, ctx.out(), ctx.shape_of(ctx.inputs[0]), ctx.shape_of(ctx.inputs[1]),
                       bool(ctx.attrs.get("trans_a")), bool(ctx.attrs.get("trans_b")))
