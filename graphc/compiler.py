"""compile(): graph -> (training graph) -> pass pipeline -> backend executable."""
from __future__ import annotations

from graphc.errors import BackendError, GraphError
from graphc.pipeline import Pipeline

BACKENDS = ("reference", "numba", "cuda")


def compile(graph, backend="reference", optimizer=None, loss=None, dtype=None, keep=(), distributed=None, **flags):
    """Compiles `graph` for `backend` ("reference", "numba", "cuda").

    optimizer: a gc.optim optimizer -> a training executable (`exe.step(feeds)` runs forward, backward
    and update and returns the loss). dtype: override the float dtype (e.g. "float64").
    keep: names of values that must stay fetchable with exe.run(feeds, outputs=[...]) although passes
    would fuse or remove them (e.g. keep=["logits"] on a training executable).
    distributed: data-parallel training across the ranks of an MPI job (True, a graphc.distributed
    Communicator or DataParallel): the step averages the gradients over the ranks with allreduce nodes
    before the update (and with sync_bn, batch norm uses the global batch's statistics); `exe.distributed`.
    flags: switch passes on/off, e.g. fuse=False; see `exe.pipeline`. Backend options: threads ("auto" or a
    count), progress ("auto": a "compiling N kernels" line on stderr while kernels compile; None; or a
    callable(done, total)), parallel_min (numba: elements from which a kernel runs in parallel)."""
    from graphc.graph import Graph
    if not isinstance(graph, Graph):
        raise GraphError(f"compile() takes a graphc.Graph, got {type(graph).__name__}")
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if dtype is not None and str(dtype) not in ("float32", "float64"):
        raise GraphError(f"dtype must be float32 or float64, got {dtype!r}")
    options = {k: flags.pop(k) for k in list(flags) if k in ("threads", "strategy", "verbose", "parallel_min",
                                                             "progress")}
    threads = options.get("threads", "auto")
    if threads != "auto" and not (isinstance(threads, int) and not isinstance(threads, bool) and threads >= 1):
        raise GraphError(f"threads must be 'auto' or a positive int, got {threads!r}")
    progress = options.get("progress", "auto")
    if not (progress in ("auto", None, False) or callable(progress)):
        raise GraphError(f"progress must be 'auto' (a line on stderr while kernels compile), None or a "
                         f"callable(done, total), got {progress!r}")
    _check_optimizer(optimizer)
    pipeline = Pipeline(backend, **flags)
    from graphc import distributed as dist
    dp = dist.resolve(distributed)
    if dp is not None and optimizer is None:
        raise GraphError("distributed=... makes a data-parallel training step: give an optimizer too "
                         "(compile(graph, optimizer=gc.optim.SGD(0.1), distributed=True))")
    if dp is not None and backend == "numba" and "threads" not in options:
        # a fixed thread count: the executor's timing of thread counts could differ between ranks, and
        # then so would the number of runs, each of which takes part in the collectives
        import numba
        options["threads"] = dp.threads(numba.config.NUMBA_NUM_THREADS)
    from graphc.passes.check import check
    check(graph)
    from graphc.executable import check_param_sizes
    check_param_sizes(graph, dtype)
    g = graph
    if dp is not None and dp.sync_bn:
        from graphc.passes.transforms.sync_bn import sync_batchnorm
        g = sync_batchnorm(graph, dp)
    if optimizer is not None:
        from graphc.passes.transforms.training import training_graph
        g = training_graph(g, optimizer, loss, distributed=dp)
    for k in keep:
        if k not in g:
            raise GraphError(f"keep={k!r}: no such value in graph {graph.name!r}")
    if keep:
        g = g.clone()
        g.keep |= set(keep)
    g = pipeline(g)
    import importlib
    mod = importlib.import_module(f"graphc.backends.{backend}")
    exe = mod.lower(g, dtype=dtype, pipeline=pipeline, **options)
    exe.source = graph          # the graph as the user built it (gc.onnx.save exports it)
    exe.distributed = dp
    exe.compile_args = dict(backend=backend, loss=loss, dtype=dtype, keep=keep, **options, **flags)
    return exe


def _check_optimizer(optimizer):
    from graphc.optim import Optimizer
    if optimizer is not None and not isinstance(optimizer, Optimizer):
        raise GraphError(f"optimizer must be a gc.optim optimizer (gc.optim.SGD(0.1), gc.optim.Adam()), "
                         f"got {type(optimizer).__name__}")
