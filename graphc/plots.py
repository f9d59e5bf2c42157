"""Plots of a training run and of a model's predictions (matplotlib, an optional dependency:
``pip install 'graphc[plots]'``; without it each raises a PlotError saying so).

    plot_history(result, "curves.png")                 # loss and accuracy per epoch (train, validation, test)
    plot_confusion_matrix(cm, "confusion.png", classes=ds.classes)
    plot_loss_curve(result, "loss.png"); plot_misclassified(images, y_true, y_pred, "wrong.png")

``graphc train --plots DIR`` writes curves.png and confusion.png into DIR after training.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from graphc.errors import GraphError

__all__ = ["PlotError", "plot_history", "plot_confusion_matrix", "plot_loss_curve", "plot_misclassified"]


class PlotError(GraphError, ImportError):
    """A plot was asked for but matplotlib is not installed."""


def _labels(a, name):
    from graphc.infer import _labels as labels
    return labels(a, name)


def _pyplot(what):
    try:
        import matplotlib
        matplotlib.use("Agg")             # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError(f"{what} needs matplotlib, which is not installed; install it with: "
                        "pip install matplotlib (or pip install 'graphc[plots]')") from None
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


def plot_history(result, path) -> Path:
    """Loss (left) and accuracy (right) per epoch: training loss, validation and test loss/accuracy,
    as far as the run measured them. result: a TrainResult (or anything with those lists)."""
    plt = _pyplot("plot_history")
    series = {k: list(getattr(result, k, []) or []) for k in
              ("train_loss", "val_loss", "test_loss", "train_accuracy", "val_accuracy", "test_accuracy")}
    if not series["train_loss"]:
        raise GraphError("plot_history: the result holds no epochs (was anything trained?)")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    try:
        for ax, kind in ((ax1, "loss"), (ax2, "accuracy")):
            for split in ("train", "val", "test"):
                ys = series.get(f"{split}_{kind}") or []
                ys = [y for y in ys if y == y]              # NaN: not measured
                if ys:
                    ax.plot(range(1, len(ys) + 1), ys, "o-", label={"val": "validation"}.get(split, split))
            ax.set_xlabel("epoch")
            ax.set_ylabel(kind)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
        fig.suptitle(f"{getattr(result, 'model', 'model')}: training curves")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return Path(path)


def plot_confusion_matrix(cm, path, classes=None, title="confusion matrix") -> Path:
    """The confusion matrix as a heat map with counts (rows: true class, columns: predicted)."""
    plt = _pyplot("plot_confusion_matrix")
    cm = np.asarray(cm)
    k = cm.shape[0]
    names = [str(c) for c in classes][:k] if classes else [str(i) for i in range(k)]
    size = max(4.0, 0.45 * k + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    try:
        ax.imshow(cm, cmap="Blues")
        ax.set_xticks(range(k), names, rotation=45 if max(map(len, names)) > 2 else 0)
        ax.set_yticks(range(k), names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        top = cm.max(initial=0)
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=8,
                            color="white" if cm[i, j] > top / 2 else "black")
        ax.set_title(f"{title} (accuracy {np.trace(cm) / max(cm.sum(), 1):.3f})")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return Path(path)
