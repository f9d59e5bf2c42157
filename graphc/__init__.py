"""graphc: a computational-graph compiler for convolutional networks.

    import graphc as gc
    g = gc.Graph("net"); x = g.input("x", (None, 1, 28, 28)) ...; g.output(loss)
    exe = gc.compile(g, backend="numba", optimizer=gc.optim.Adam(1e-3)); exe.step(feeds)
    exe = gc.load("run.npz"); exe.run({"x": images})      # a trained model (graphc train --save)
"""
from graphc.errors import (BackendError, CheckpointError, DataError, DistributedError, DTypeError,  # noqa: F401
                           FeedError, GradError, GraphError, InstallError, OutputError, ShapeError)


def _require_installed():
    """graphc.passes and graphc.backends live in passes/ and backends/ beside graphc/ and exist only once
    pyproject.toml has mapped them (pip install); a bare checkout on sys.path would import graphc without
    them. Say so now, instead of failing later in a pass."""
    import importlib.util
    import os
    missing = [m for m in ("graphc.passes", "graphc.backends") if importlib.util.find_spec(m) is None]
    if missing:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        raise InstallError(f"graphc is not installed: {' and '.join(missing)} cannot be imported (they live in "
                           f"passes/ and backends/ of the checkout, mapped by pyproject.toml). Fix: run "
                           f"`pip install -e .` in {root}")


_require_installed()
from graphc.graph import Graph, Value  # noqa: F401
from graphc.compiler import compile  # noqa: F401
from graphc import optim  # noqa: F401

__version__ = "0.1.0"


def grad(graph, wrt=None, loss=None):
    """The backward graph (a Graph) with outputs "grad/<name>" for each value in wrt (default: params)."""
    from graphc.passes.transforms.autodiff import grad as _grad
    return _grad(graph, wrt=wrt, loss=loss)


def __getattr__(name):   # heavier pieces load on first use
    import importlib
    lazy = {"gradcheck": ("graphc.gradient_check", "gradcheck"), "summary": ("graphc.summarize", "summary"),
            "render": ("graphc.rendering", "render"), "models": ("graphc.models", None),
            "data": ("graphc.data", None), "nn": ("graphc.nn", None), "train": ("graphc.train", None),
            "infer": ("graphc.infer", None), "checkpoint": ("graphc.checkpoint", None), "bench": ("graphc.bench", None),
            "onnx": ("graphc.onnx", None), "distributed": ("graphc.distributed", None),
            "load": ("graphc.artifact", "load"), "save": ("graphc.artifact", "save"),
            "callbacks": ("graphc.callbacks", None), "schedules": ("graphc.schedules", None),
            "plots": ("graphc.plots", None), "preprocess": ("graphc.preprocess", None),
            "artifact": ("graphc.artifact", None)}
    if name in lazy:
        mod, attr = lazy[name]
        m = importlib.import_module(mod)
        return getattr(m, attr) if attr else m
    raise AttributeError(f"module 'graphc' has no attribute {name!r}")
