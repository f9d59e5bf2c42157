"""The cuda backend: lowers a scheduled, fused, memory-planned graph to CUDA kernels (numba.cuda).

    exe = gc.compile(graph, backend="cuda")                     # inference: exe.run(feeds)
    tr = gc.compile(graph, backend="cuda", optimizer=gc.optim.Adam(1e-3))
    tr.step(feeds)     # forward + backward + update on the GPU; returns the loss (the one copy back)

The executable is backends/base.py's shared executor over device arrays (executor.py); each op and fused
pattern is lowered where it is registered (lower_*.py) onto the kernels of kernels/; ``kernel_table()``
lists what runs for each and which ops fall back to the reference on the host. On a machine with
neither a GPU nor the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1`` set before numba.cuda is first
imported) ``lower`` raises BackendError with kernels.require_cuda()'s message.
"""
import numpy as np

from graphc import shapes
from graphc.backends import codegen, registry
from graphc.backends.base import scalar_consts
from graphc.backends.cuda import (lower_conv, lower_elementwise, lower_linalg, lower_loss, lower_norm,  # noqa: F401
                                  lower_pool, lower_reduce, lower_shape, lower_sources)
from graphc.backends.cuda.executor import CudaExecutable
from graphc.backends.cuda.kernels import device
from graphc.backends.cuda.kernels.elementwise import graph_kernel_source, pyfunc

__all__ = ["CudaExecutable", "lower", "kernel_table", "compile_ptx_group_kernels"]


def kernel_table():
    """[(op or "fused:<pattern>", kernel)] for every op of the table and every fused pattern."""
    return registry.registry("cuda").kernel_table()


def lower(graph, dtype=None, pipeline=None, **options):
    """graph (after the pipeline) -> CudaExecutable. Raises BackendError (with the fix) when neither a GPU
    nor the CUDA simulator can run here."""
    device.require_cuda()
    options.pop("strategy", None)
    options.pop("threads", None)
    return CudaExecutable(graph, dtype=dtype, pipeline=pipeline, **options)


def compile_ptx_group_kernels(graph, env, cc=(9, 0), dtype=np.float32):
    """Compiles the generated elementwise kernels of a (piped) graph's elementwise nodes and groups to
    PTX with numba.cuda.compile_ptx (NVVM, no GPU); returns {node name: ptx}, plus the strided-copy,
    gather, one-hot and dense cross-entropy kernels the lowerings use under "kernels:<name>"."""
    from graphc.backends.cuda.kernels.ptx import _compiler, compile_ptx_all, signature
    c = _compiler()
    res = {f"kernels:{k}": v for k, v in compile_ptx_all(cc, dtype, names=("copy", "copy_scaled", "gather", "onehot",
                                                                            "xent_dense_rows")).items()}
    nodes, reg = graph.nx.nodes, registry.registry("cuda")
    for n in graph.nx.nodes:
        node = nodes[n]
        if node["op"] in ("input", "param", "const") or reg.for_node(node["op"], node["attrs"]) is not reg.scalar_lowering():
            continue
        if node["op"] == "fused":
            body, results = list(node["attrs"]["body"]), list(node["attrs"]["results"])
        else:
            body = [{"op": node["op"], "attrs": node["attrs"], "inputs": [("in", k) for k in range(len(node["inputs"]))],
                     "shape": node["shape"]}]
            results = [0]
        ins = list(node["inputs"])
        plan = codegen.plan_loop(shapes.resolve(body[results[0]]["shape"], env),
                                 [shapes.resolve(nodes[i]["shape"], env) for i in ins], scalar_consts(graph, ins))
        src, rank = graph_kernel_source(codegen.graph_body(body), results, plan)
        sig = ", ".join(["i64"] + ["fa"] * (len(results) + len(plan.loaded())) + ["i64"] * rank)
        res[n] = c.compile_ptx(pyfunc(src, dtype, cuda_module=c), signature(sig, dtype), cc=cc)[0]
    return res
