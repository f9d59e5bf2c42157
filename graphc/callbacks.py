"""Training callbacks: a small hook into graphc.train's loop, and the ones `graphc train` offers.

    class Show(gc.callbacks.Callback):
        def on_epoch_end(self, run, logs):
            print(logs["epoch"], logs["val_loss"])      # return True to stop training here

    gc.train.train("lenet5", epochs=20, validation=0.1,
                   callbacks=[gc.callbacks.EarlyStopping(patience=2), gc.callbacks.CSVLogger("run.csv"), Show()])

``run`` is the training run: ``run.result`` (the TrainResult so far: histories, ``exe``, ``infer_exe``),
``run.x_test``/``run.y_test`` (preprocessed test split), ``run.classes``, ``run.say`` (the log). ``logs``
holds the epoch's numbers: epoch (1-based), train_loss, val_loss, val_accuracy (NaN without a
validation split), test_loss, test_accuracy, lr (the learning rate of the epoch's last step),
images_per_second, seconds.

Built in: EarlyStopping (--early-stopping), CSVLogger (--log), TensorBoard (--tensorboard; needs
tensorboardX: ``pip install 'graphc[tensorboard]'``), Plots (--plots; needs matplotlib).
"""
from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

import numpy as np

from graphc.errors import GraphError

__all__ = ["Callback", "EarlyStopping", "CSVLogger", "TensorBoard", "Plots", "LOG_FIELDS"]

#: the fields of an epoch's logs (and the columns of the CSV log), in order
LOG_FIELDS = ("epoch", "train_loss", "val_loss", "val_accuracy", "test_loss", "test_accuracy", "lr",
              "images_per_second", "seconds")


class Callback:
    """Override any of these; on_epoch_end returning True stops training after that epoch."""

    def on_train_begin(self, run):
        pass

    def on_epoch_end(self, run, logs) -> bool | None:
        return None

    def on_train_end(self, run):
        pass


class EarlyStopping(Callback):
    """Stops when `monitor` (default val_loss; test_loss when the run has no validation split) has not
    improved by more than min_delta for `patience` epochs. restore_best: put back the parameters of the
    best epoch at the end. Its state comes from the run's history, so a resumed run continues it."""

    def __init__(self, patience=3, monitor="val_loss", min_delta=0.0, restore_best=False):
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise GraphError(f"EarlyStopping: patience must be an integer >= 1, got {patience!r}")
        if monitor not in LOG_FIELDS or not monitor.endswith(("loss", "accuracy")):
            raise GraphError(f"EarlyStopping: monitor must be one of val_loss, test_loss, val_accuracy, "
                             f"test_accuracy, train_loss, got {monitor!r}")
        self.patience, self.monitor, self.min_delta = patience, monitor, float(min_delta)
        self.restore_best = restore_best
        self.best = self.best_epoch = None
        self.best_state = None
        self.stopped_epoch = None

    def _key(self, run):
        if self.monitor.startswith("val_") and not run.has_validation:
            key = "test_" + self.monitor[4:]
            run.say(f"note: early stopping watches {key}: the run has no validation split (--validation)")
            return key
        return self.monitor

    def on_train_begin(self, run):
        self.key = self._key(run)
        self.sign = -1.0 if self.key.endswith("accuracy") else 1.0
        for epoch, v in enumerate(getattr(run.result, self.key, []), 1):     # a resumed run's history
            self._update(run, epoch, v, keep_state=False)

    def _update(self, run, epoch, value, keep_state=True) -> bool:
        if value != value:
            return False
        if self.best is None or self.sign * (value - self.best) < -self.min_delta:
            self.best, self.best_epoch = value, epoch
            if keep_state and self.restore_best:
                self.best_state = {n: np.array(v) for n, v in run.result.exe.state.items()}
            return True
        return False

    def on_epoch_end(self, run, logs):
        self._update(run, logs["epoch"], logs[self.key])
        if logs["epoch"] - self.best_epoch >= self.patience:
            self.stopped_epoch = logs["epoch"]
            run.say(f"early stopping: {self.key} has not improved for {self.patience} epoch(s) "
                    f"(best {self.best:.4f} at epoch {self.best_epoch})")
            return True
        return None

    def on_train_end(self, run):
        if self.restore_best and self.best_state is not None and self.best_epoch != len(run.result.train_loss):
            for n, v in self.best_state.items():
                run.result.exe.state[n] = v
            run.say(f"restored the parameters of epoch {self.best_epoch} ({self.key} {self.best:.4f})")


def _fmt(v):
    return "" if isinstance(v, float) and math.isnan(v) else (f"{v:.6g}" if isinstance(v, float) else str(v))


class CSVLogger(Callback):
    """One row per epoch (LOG_FIELDS) in a CSV file, rewritten atomically after every epoch (a resumed run
    keeps its earlier epochs' rows: they come from the checkpoint's history)."""

    def __init__(self, path):
        from graphc.files import check_writable
        self.path = check_writable(path, "CSV log")

    def on_epoch_end(self, run, logs):
        from graphc.files import atomic_write
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(LOG_FIELDS)
        for row in run.history_rows():
            w.writerow([_fmt(row[k]) for k in LOG_FIELDS])
        text = buf.getvalue()
        atomic_write(self.path, lambda f: f.write(text), "CSV log", binary=False)


def _summary_writer(logdir):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise GraphError("--tensorboard needs tensorboardX (or torch with tensorboard), which is not installed; "
                             "install it with: pip install 'graphc[tensorboard]'") from None
    return SummaryWriter(str(logdir))


class TensorBoard(Callback):
    """Scalars for TensorBoard in `logdir`: loss/train, loss/val, loss/test, accuracy/val, accuracy/test,
    lr and images_per_second per epoch, and loss/step per training step (at each epoch's end)."""

    def __init__(self, logdir):
        self.logdir = Path(os.path.expanduser(str(logdir)))
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.writer = _summary_writer(self.logdir)

    def on_epoch_end(self, run, logs):
        e = logs["epoch"]
        tags = {"loss/train": "train_loss", "loss/val": "val_loss", "loss/test": "test_loss",
                "accuracy/val": "val_accuracy", "accuracy/test": "test_accuracy", "lr": "lr",
                "images_per_second": "images_per_second"}
        for tag, key in tags.items():
            if logs[key] == logs[key]:
                self.writer.add_scalar(tag, float(logs[key]), e)
        steps = run.result.step_losses
        first = run.step_losses_logged
        for i in range(first, len(steps)):
            self.writer.add_scalar("loss/step", float(steps[i]), i + 1)
        run.step_losses_logged = len(steps)
        self.writer.flush()

    def on_train_end(self, run):
        self.writer.close()


class Plots(Callback):
    """At the end: DIR/curves.png (loss and accuracy per epoch) and DIR/confusion.png (test split)."""

    def __init__(self, directory):
        from graphc.plots import _pyplot
        _pyplot("--plots")                        # no matplotlib: say so before training
        self.dir = Path(os.path.expanduser(str(directory)))
        self.dir.mkdir(parents=True, exist_ok=True)

    def on_train_end(self, run):
        from graphc import plots
        from graphc.infer import confusion_matrix, predict
        if not run.result.train_loss:
            return
        written = [plots.plot_history(run.result, self.dir / "curves.png")]
        classes, _ = predict(run.result.infer_exe, run.x_test, preprocess=_identity)
        k = max(run.num_classes, int(classes.max(initial=0)) + 1)
        written.append(plots.plot_confusion_matrix(confusion_matrix(run.y_test, classes, k=k),
                                                   self.dir / "confusion.png", classes=run.classes))
        run.say("wrote " + ", ".join(str(p) for p in written))


def _identity(x, dtype=np.float32):
    """The test split is already preprocessed."""
    return np.asarray(x, dtype=dtype)
