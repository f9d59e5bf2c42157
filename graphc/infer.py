"""Inference helpers: class predictions and probabilities, top-k, a confusion matrix (plots: graphc.plots).

    from graphc.infer import predict, confusion_matrix
    classes, probs = predict(result, ds.x_test)          # a TrainResult, gc.load's executable, any executable
    classes, probs = predict(exe, image)                 # one image: (H, W), (C, H, W) or (H, W, C); N = 1
    top, p = topk(probs, 3)                              # the 3 likeliest classes of each image
    cm = confusion_matrix(ds.y_test, classes)            # rows: true class, columns: predicted

Images are preprocessed as at training when the model records it (gc.load's executables, TrainResults):
integer pixels scaled, channels standardised with the training split's statistics. Without a record,
uint8 digits are scaled to [0, 1] and floats are taken as already normalised.
The plots (``plot_loss_curve``, ``plot_misclassified``, ...) live in graphc.plots (matplotlib, optional)
and are importable from here too.
"""
from __future__ import annotations

import numpy as np

from graphc.errors import GraphError

__all__ = ["predict", "topk", "softmax", "confusion_matrix", "accuracy", "format_confusion_matrix",
           "preprocessing_of", "plot_loss_curve", "plot_misclassified", "PlotError"]


def softmax(logits, axis=-1) -> np.ndarray:
    """Numerically stable softmax of a logits array."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def _legacy_images(images, exe) -> np.ndarray:
    """Images for a model with no recorded preprocessing: uint8 digits scaled to [0, 1], floats as given;
    one image (H, W) or (C, H, W) of the graph's image shape becomes a batch of one."""
    a = np.asarray(images)
    want = tuple(exe.graph.nx.nodes["x"]["shape"][1:]) if "x" in exe.graph else ()
    if a.ndim == 2 or (a.ndim == 3 and tuple(a.shape) == want):
        a = a[None]
    if a.dtype == np.uint8 or (np.issubdtype(a.dtype, np.integer) and a.ndim in (3, 4)):
        from graphc.data import normalize
        return normalize(a)          # uint8 digits (N, H, W) -> float (N, 1, H, W) in [0, 1]
    if a.ndim == 3:
        a = a[:, None]
    if a.ndim != 4:
        raise GraphError(f"predict expects images shaped (N, H, W) or (N, C, H, W), got {a.shape}")
    return a.astype(exe.dtype, copy=False)


def preprocessing_of(model):
    """The Preprocess recorded with a model (gc.load's executable, a TrainResult), or None."""
    art = getattr(model, "artifact", None)
    return getattr(art, "preprocess", None)


def _executable(model, backend):
    """An executable from a TrainResult (its inference executable), an executable, or a Graph."""
    from graphc.executable import Executable
    from graphc.graph import Graph
    if hasattr(model, "infer_exe") and hasattr(model, "exe"):     # a TrainResult
        return model.infer_exe if model.infer_exe is not None else model.exe
    if isinstance(model, Executable):
        return model
    if isinstance(model, Graph):
        import graphc
        g = model.clone()
        if "logits" in g:
            g.outputs = ["logits"]
        return graphc.compile(g, backend=backend)
    raise GraphError(f"predict takes a TrainResult, an executable or a graphc.Graph, got {type(model).__name__}")


def predict(model, images, batch=256, backend="reference", logits="logits", preprocess=None):
    """Predicted classes (N,) int64 and class probabilities (N, K) for ``images``.

    model: a TrainResult (its inference executable), an executable (gc.load's; or a training one, run in
    inference mode, dropout off) or a Graph (compiled for ``backend`` with its initial weights).
    images: one image ((H, W), (C, H, W) or (H, W, C): N = 1) or a batch, preprocessed as the model
    records (``preprocess``, a graphc.preprocess.Preprocess, overrides it). Only "x" is fed: an input
    "labels" that the scores do not depend on needs no feed."""
    exe = _executable(model, backend)
    if logits not in exe.graph:
        raise GraphError(f"graph {exe.graph.name!r} has no value {logits!r} to read class scores from")
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise GraphError(f"batch must be a positive integer, got {batch!r}")
    pre = preprocess or preprocessing_of(model) or preprocessing_of(exe)
    x = pre(images, dtype=exe.dtype) if pre is not None else _legacy_images(images, exe)
    chunks = [np.asarray(exe.run({"x": x[i:i + batch]}, outputs=[logits])[logits]) for i in range(0, len(x), batch)]
    if not chunks:
        k = exe.graph.nx.nodes[logits]["shape"][-1]
        return np.zeros(0, dtype=np.int64), np.zeros((0, k if isinstance(k, int) else 0))
    scores = np.concatenate(chunks)
    probs = softmax(scores, axis=1)
    return np.argmax(scores, axis=1).astype(np.int64), probs.astype(scores.dtype)


def topk(probs, k=5):
    """(classes (N, k), probabilities (N, k)): each row's k likeliest classes, likeliest first (ties: the
    lower class id first)."""
    p = np.asarray(probs)
    if p.ndim != 2:
        raise GraphError(f"topk expects probabilities shaped (N, K), got {p.shape}")
    k = max(1, min(int(k), p.shape[1]))
    order = np.argsort(-p, axis=1, kind="stable")[:, :k]
    return order.astype(np.int64), np.take_along_axis(p, order, axis=1)


def _labels(a, name):
    a = np.asarray(a)
    if a.ndim != 1 or not (np.issubdtype(a.dtype, np.integer) or a.size == 0):
        raise GraphError(f"{name} must be a 1-D array of integer class ids, got shape {a.shape} dtype {a.dtype}")
    return a.astype(np.int64)


def confusion_matrix(y_true, y_pred, k=10) -> np.ndarray:
    """k x k int64 counts: entry [i, j] is how many samples of true class i were predicted as j."""
    t, p = _labels(y_true, "y_true"), _labels(y_pred, "y_pred")
    if t.shape != p.shape:
        raise GraphError(f"y_true and y_pred differ in length: {t.shape[0]} and {p.shape[0]}")
    for a, name in ((t, "y_true"), (p, "y_pred")):
        if a.size and (a.min() < 0 or a.max() >= k):
            raise GraphError(f"{name} holds class ids outside 0..{k - 1}")
    return np.bincount(t * k + p, minlength=k * k).reshape(k, k).astype(np.int64)


def accuracy(y_true, y_pred) -> float:
    t, p = _labels(y_true, "y_true"), _labels(y_pred, "y_pred")
    if t.shape != p.shape:
        raise GraphError(f"y_true and y_pred differ in length: {t.shape[0]} and {p.shape[0]}")
    return float((t == p).mean()) if t.size else float("nan")


def format_confusion_matrix(cm) -> str:
    """The confusion matrix as a text table (rows true, columns predicted) with per-class recall."""
    cm = np.asarray(cm)
    k = cm.shape[0]
    w = max(4, len(str(int(cm.max(initial=0)))) + 1)
    lines = ["true\\pred" + "".join(f"{j:>{w}}" for j in range(k)) + "  recall"]
    for i in range(k):
        total = cm[i].sum()
        recall = f"{cm[i, i] / total:.3f}" if total else "  -  "
        lines.append(f"{i:>9}" + "".join(f"{int(v):>{w}}" for v in cm[i]) + f"  {recall}")
    return "\n".join(lines)


from graphc.plots import PlotError, plot_loss_curve, plot_misclassified  # noqa: E402,F401  (their old home)
