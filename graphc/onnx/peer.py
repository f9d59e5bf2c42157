"""onnxruntime as a peer: run an ONNX model (or a graphc graph, exported on the fly) on its CPU
execution provider with the thread count graphc uses and the same feeds, time it, and check that it
agrees with graphc's outputs. `graphc bench --compare onnxruntime` calls run_onnxruntime."""
from __future__ import annotations

import os
import time

import numpy as np

from graphc.errors import GraphError


def _ort():
    try:
        import onnxruntime
    except ImportError as e:
        raise GraphError("the onnxruntime peer needs the onnxruntime package: pip install 'graphc[onnx]'") from e
    return onnxruntime


def _model_bytes(model):
    from graphc.executable import Executable
    from graphc.graph import Graph
    if isinstance(model, (str, os.PathLike)):
        with open(model, "rb") as f:
            return f.read()
    if isinstance(model, (Graph, Executable)):
        from graphc.onnx.exporter import to_model
        model = to_model(model)
    if hasattr(model, "SerializeToString"):
        return model.SerializeToString()
    if isinstance(model, bytes):
        return model
    raise GraphError(f"run_onnxruntime takes a path, an onnx.ModelProto, bytes, a Graph or an executable, "
                     f"got {type(model).__name__}")


def default_threads():
    """graphc's numba backend runs on numba's thread pool; onnxruntime gets as many intra-op threads."""
    try:
        import numba
        return int(numba.get_num_threads())
    except Exception:   # noqa: BLE001 - numba missing or misconfigured: one thread per core
        return os.cpu_count() or 1


def session(model, threads=None):
    """An onnxruntime InferenceSession on the CPU provider: `threads` intra-op threads, one inter-op
    thread, sequential execution, all graph optimisations."""
    ort = _ort()
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads or default_threads())
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(_model_bytes(model), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as e:   # noqa: BLE001 - onnxruntime's own exception types
        raise GraphError(f"onnxruntime cannot run this model ({type(e).__name__}: {e})") from e


def agreement(got, want, rtol=1e-4, atol=None):
    """(agree, max abs error) of two arrays; atol defaults to 1e-5 times the reference's magnitude."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        return False, float("inf")
    scale = float(np.max(np.abs(want), initial=1.0))
    atol = 1e-5 * scale if atol is None else atol
    err = float(np.max(np.abs(got - want), initial=0.0))
    return bool(np.allclose(got, want, rtol=rtol, atol=atol)), err


def session_inputs(sess, feeds):
    """The session's inputs from `feeds` (entries it does not take, such as labels, dropped; floats cast
    to the model's input type)."""
    types = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int64)": np.int64,
             "tensor(int32)": np.int32}
    inputs = {}
    for i in sess.get_inputs():
        if i.name not in feeds:
            raise GraphError(f"onnxruntime peer: no feed for the model's input {i.name!r}")
        inputs[i.name] = np.asarray(feeds[i.name]).astype(types.get(i.type, np.float32), copy=False)
    return inputs


def run_onnxruntime(model, feeds, threads=None, repeats=0, expect=None, rtol=1e-4, atol=None):
    """Runs `model` in onnxruntime on `feeds` (entries the model does not take, such as labels, are
    dropped; floats are cast to the model's input type).

    Returns {"outputs": {name: array}, "version", "threads", "step_ms": median of `repeats` timed runs
    after 3 warm-up runs (None when repeats is 0), "agree" and "max_abs_err" against `expect`
    ({output name: graphc's array}; None when not given)}."""
    ort = _ort()
    threads = int(threads or default_threads())
    sess = session(model, threads)
    inputs = session_inputs(sess, feeds)
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, sess.run(names, inputs)))
    result = {"outputs": outs, "version": ort.__version__, "threads": threads, "step_ms": None,
              "agree": None, "max_abs_err": None}
    if repeats:
        for _ in range(3):
            sess.run(names, inputs)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            sess.run(names, inputs)
            times.append(time.perf_counter() - t0)
        result["step_ms"] = 1e3 * float(np.median(times))
    if expect is not None:
        common = [n for n in names if n in expect]
        if not common:
            raise GraphError(f"onnxruntime peer: none of the model's outputs {names} is among graphc's "
                             f"{sorted(expect)}")
        checks = [agreement(outs[n], expect[n], rtol, atol) for n in common]
        result["agree"] = all(ok for ok, _ in checks)
        result["max_abs_err"] = max(err for _, err in checks)
    return result
