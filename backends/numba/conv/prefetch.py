"""A software prefetch for generated kernels: ``prefetch(a, i)`` asks the CPU to bring the cache line of
``a[i]`` (a 1-d array) towards L1, and does nothing else (LLVM's llvm.prefetch: no fault, no value, a
no-op where the target has no such instruction; an index past the end is harmless, though callers keep
within the array).

Why: at batch 1 a ResNet-18 runs each filter bank once per run, and its 512-channel banks (9.4 MB) no
longer fit the caches beside the others (47 MB of filters, a 32 MB L3), so conv/channels.py's kernel
reads them from memory, one input channel's block (2.3 KB) at a time, each a few hundred cycles of FMAs
apart: the CPU's own prefetcher did not keep up. Its 512 -> 512 3x3 on 7x7 took 1.44 ms on 2 threads
with its filters evicted (a 64 MB array read between calls) against 0.65 ms with them in cache. Asking
for the block two channels ahead (a scratch copy of channels.py's kernel): 256 -> 256 on 14x14 with
evicted filters 1.25 -> 1.00 ms; the whole batch-1 step 2-8% faster, the same bits (channels.py's doc).
"""
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.extending import intrinsic


@intrinsic
def prefetch(typingctx, arr, i):
    """Prefetch arr[i] for reading, into all cache levels (llvm.prefetch: read, locality 3, data)."""
    if not (isinstance(arr, types.Array) and arr.ndim == 1 and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                            "llvm.prefetch.p0")
        idx = context.cast(builder, args[1], sig.args[1], types.intp)
        builder.call(fn, [builder.bitcast(builder.gep(a.data, [idx]), i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()
    return types.none(arr, i), codegen
