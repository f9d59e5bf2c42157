"""Inference helpers: class predictions and probabilities, a confusion matrix, and optional plots.

    from graphc.infer import predict, confusion_matrix
    classes, probs = predict(result, ds.x_test)          # a TrainResult, an executable or a Graph
    cm = confusion_matrix(ds.y_test, classes)            # rows: true digit, columns: predicted

The plots (``plot_loss_curve``, ``plot_misclassified``) need matplotlib, an optional dependency
(``pip install matplotlib``); without it they raise a PlotError saying so. Nothing else here does.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from graphc.errors import GraphError

__all__ = ["predict", "softmax", "confusion_matrix", "accuracy", "format_confusion_matrix",
           "plot_loss_curve", "plot_misclassified", "PlotError"]


class PlotError(GraphError, ImportError):
    """A plot was asked for but matplotlib is not installed."""


def softmax(logits, axis=-1) -> np.ndarray:
    """Numerically stable softmax of a logits array."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def _images(images, dtype) -> np.ndarray:
    a = np.asarray(images)
    if a.dtype == np.uint8 or (np.issubdtype(a.dtype, np.integer) and a.ndim in (3, 4)):
        from graphc.data import normalize
        return normalize(a)          # uint8 digits (N, H, W) -> float (N, 1, H, W) in [0, 1]
    if a.ndim == 3:
        a = a[:, None]
    if a.ndim != 4:
        raise GraphError(f"predict expects images shaped (N, H, W) or (N, C, H, W), got {a.shape}")
    return a.astype(dtype, copy=False)


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
            g.output(g["logits"])
        return graphc.compile(g, backend=backend)
    raise GraphError(f"predict takes a TrainResult, an executable or a graphc.Graph, got {type(model).__name__}")


def predict(exe_or_graph, images, batch=256, backend="reference", logits="logits"):
    """Predicted classes (N,) int64 and class probabilities (N, K) float for ``images``.

    exe_or_graph: a TrainResult (uses its inference executable), an executable (training or inference;
    it runs in inference mode, dropout off) or a Graph (compiled for ``backend`` with its initial weights).
    images: uint8 digits (N, 28, 28) (normalized here as in training) or float (N, 1, 28, 28) already
    normalized. The graph's "labels" input, if any, is fed zeros: only ``logits`` is read."""
    exe = _executable(exe_or_graph, backend)
    if logits not in exe.graph:
        raise GraphError(f"graph {exe.graph.name!r} has no value {logits!r} to read class scores from")
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise GraphError(f"batch must be a positive integer, got {batch!r}")
    x = _images(images, exe.dtype)
    extra = {}
    for name, (shape, dtype) in exe.input_types.items():
        if name != "x" and len(shape) == 1 and dtype.startswith("int"):
            extra[name] = None                    # labels: fed zeros of the batch size
        elif name != "x":
            raise GraphError(f"predict feeds only the images \"x\"; the graph also takes input {name!r}")
    chunks = []
    for start in range(0, len(x), batch):
        xb = x[start:start + batch]
        feeds = {"x": xb}
        feeds.update({n: np.zeros(len(xb), dtype=np.int64) for n in extra})
        chunks.append(np.asarray(exe.run(feeds, outputs=[logits])[logits]))
    if not chunks:
        k = exe.graph.nx.nodes[logits]["shape"][-1]
        return np.zeros(0, dtype=np.int64), np.zeros((0, k if isinstance(k, int) else 0))
    scores = np.concatenate(chunks)
    probs = softmax(scores, axis=1)
    return np.argmax(scores, axis=1).astype(np.int64), probs.astype(scores.dtype)


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


# --------------------------------------------------------------------------- plots


def _pyplot(what):
    try:
        import matplotlib
        matplotlib.use("Agg")             # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError(f"{what} needs matplotlib, which is not installed; install it with: "
                        "pip install matplotlib") from None
    return plt


def plot_loss_curve(result, path) -> Path:
    """Saves a figure of the training loss per step (and per-epoch means) and the test accuracy per epoch.
    result: a TrainResult (or anything with step_losses / train_loss / test_accuracy lists)."""
    plt = _pyplot("plot_loss_curve")
    steps = list(getattr(result, "step_losses", []) or [])
    epoch_loss = list(getattr(result, "train_loss", []) or [])
    acc = list(getattr(result, "test_accuracy", []) or [])
    if not steps and not epoch_loss:
        raise GraphError("plot_loss_curve: the result holds no losses (was anything trained?)")
    fig, ax = plt.subplots(figsize=(7, 4))
    try:
        if steps:
            ax.plot(np.arange(1, len(steps) + 1), steps, lw=0.8, alpha=0.6, label="loss per step")
        if epoch_loss:
            per_epoch = len(steps) / len(epoch_loss) if steps else 1
            xs = [(i + 1) * per_epoch for i in range(len(epoch_loss))]
            ax.plot(xs, epoch_loss, "o-", label="mean loss per epoch")
        ax.set_xlabel("step" if steps else "epoch")
        ax.set_ylabel("training loss")
        ax.set_title(f"{getattr(result, 'model', 'model')}: training loss")
        handles, labels = ax.get_legend_handles_labels()
        if acc:
            ax2 = ax.twinx()
            per_epoch = len(steps) / len(acc) if steps else 1
            ax2.plot([(i + 1) * per_epoch for i in range(len(acc))], acc, "s--", color="tab:green",
                     label="test accuracy")
            ax2.set_ylabel("test accuracy")
            h2, l2 = ax2.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
        ax.legend(handles, labels, loc="center right")
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return Path(path)


def plot_misclassified(images, y_true, y_pred, path, max_images=36) -> Path:
    """Saves a grid of (up to max_images) misclassified digits titled "true -> predicted"."""
    plt = _pyplot("plot_misclassified")
    t, p = _labels(y_true, "y_true"), _labels(y_pred, "y_pred")
    imgs = np.asarray(images)
    if imgs.ndim == 4:
        imgs = imgs[:, 0]
    if imgs.ndim != 3 or len(imgs) != len(t) or len(t) != len(p):
        raise GraphError(f"plot_misclassified: images {np.shape(images)}, y_true {t.shape} and y_pred {p.shape} "
                         "must hold the same number of samples (images (N, H, W) or (N, 1, H, W))")
    wrong = np.flatnonzero(t != p)[:max_images]
    n = max(len(wrong), 1)
    cols = min(n, 6)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.8 * rows), squeeze=False)
    try:
        for ax in axes.ravel():
            ax.axis("off")
        if not len(wrong):
            axes[0, 0].text(0.5, 0.5, "no misclassified images", ha="center", va="center")
        for ax, i in zip(axes.ravel(), wrong):
            ax.imshow(imgs[i], cmap="gray_r")
            ax.set_title(f"{t[i]} -> {p[i]}", fontsize=9)
        fig.suptitle(f"misclassified: {int((t != p).sum())} of {len(t)} (true -> predicted)", fontsize=10)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return Path(path)
