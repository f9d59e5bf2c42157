"""ONNX in and out: bring a model from PyTorch, Keras or a model zoo; take a trained one away.

    g = gc.onnx.load("model.onnx")                        # a graphc Graph: inputs, outputs, weights as params
    g = gc.onnx.load("model.onnx", loss="softmax_cross_entropy")   # + int64 input "labels", output "loss"
    exe = gc.compile(g, backend="numba", optimizer=gc.optim.Adam(1e-3)); exe.step({...})
    gc.onnx.save(exe, "trained.onnx")                     # the inference graph with the trained weights

Needs the optional `onnx` package (pip install 'graphc[onnx]'); `onnxruntime` for run_onnxruntime.
"""
from graphc.onnx.importer import load  # noqa: F401
from graphc.onnx.registry import OnnxError, UnsupportedOnnx  # noqa: F401


def save(graph_or_executable, path, opset=None, outputs=None):
    """Writes the inference graph as an ONNX model (see graphc.onnx.exporter.save)."""
    from graphc.onnx.exporter import save as _save
    return _save(graph_or_executable, path, opset=opset, outputs=outputs)


def run_onnxruntime(model, feeds, threads=None, repeats=0, expect=None, rtol=1e-4, atol=None):
    """Runs an ONNX model in onnxruntime (see graphc.onnx.peer.run_onnxruntime)."""
    from graphc.onnx.peer import run_onnxruntime as _run
    return _run(model, feeds, threads=threads, repeats=repeats, expect=expect, rtol=rtol, atol=atol)
