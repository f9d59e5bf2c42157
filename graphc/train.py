"""The training loop: ``graphc train MODEL`` and the same from Python.

    from graphc.train import train
    result = train("lenet5", epochs=5, batch=128, optimizer="adam")     # embedded 5k MNIST subset
    result.final_test_accuracy, result.train_loss, result.images_per_second, result.exe

Reproducible: the seed fixes the initial weights (``graphc.models.load(name, seed=seed)``), the batch
order of every epoch (``graphc.data.batches(seed=seed, epoch=e)``) and the dropout masks (seeded by
the graph's seed and the step counter). ``save=PATH`` writes a checkpoint (parameters, optimizer state,
step counter, history; atomically) at the end of every epoch, and also when the run is interrupted
with Ctrl-C mid-epoch; ``resume=PATH`` continues from it exactly: the result equals an uninterrupted
run. ``epochs`` is the total number of epochs of the run, so an interrupted run continues with the same
command plus ``--resume``.
"""
from __future__ import annotations

import argparse
import itertools
import math
import numbers
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from graphc import data as gdata
from graphc.checkpoint import graph_fingerprint, load_checkpoint, read_checkpoint, save_checkpoint
from graphc.errors import BackendError, CheckpointError, DataError, GraphError
from graphc.files import check_writable

__all__ = ["train", "TrainResult", "evaluate", "make_optimizer", "add_train_arguments", "main_from_args",
           "OPTIMIZERS", "DEFAULT_LR"]

OPTIMIZERS = ("sgd", "momentum", "adam")
#: learning rate used when none is given
DEFAULT_LR = {"adam": 1e-3, "sgd": 0.1, "momentum": 0.01}
DEFAULTS = {"data": "mnist5k", "batch": 64, "optimizer": "adam", "seed": 0}
EVAL_BATCH = 500


@dataclass
class TrainResult:
    """What a training run returns. Lists hold one entry per epoch trained so far (a resumed run
    includes the epochs from its checkpoint)."""
    model: str
    backend: str
    train_loss: list = field(default_factory=list)         # mean training loss over each epoch's samples
    test_loss: list = field(default_factory=list)
    test_accuracy: list = field(default_factory=list)
    images_per_second: list = field(default_factory=list)  # training images per second (evaluation excluded)
    epoch_seconds: list = field(default_factory=list)      # training seconds per epoch (evaluation excluded)
    step_losses: list = field(default_factory=list)        # loss of every training step
    final_test_accuracy: float = float("nan")
    exe: object = None          # the training executable (exe.params, exe.state_dict())
    infer_exe: object = None    # inference executable of the same graph, holding the final parameters
    config: dict = field(default_factory=dict)

    @property
    def epochs(self) -> int:
        return len(self.train_loss)

    def __repr__(self):
        return (f"TrainResult(model={self.model!r}, backend={self.backend!r}, epochs={self.epochs}, "
                f"final_test_accuracy={self.final_test_accuracy:.4f})")


# --------------------------------------------------------------------------- helpers


def make_optimizer(name, lr=None):
    """"sgd" | "momentum" (SGD with momentum 0.9) | "adam", or a gc.optim optimizer (returned as is).
    lr None: the default of DEFAULT_LR."""
    from graphc import optim
    if isinstance(name, optim.Optimizer):
        if lr is not None:
            name.lr = optim.hyper("train", "the learning rate (--lr)", lr)
        return name
    if name not in OPTIMIZERS:
        raise GraphError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    lr = DEFAULT_LR[name] if lr is None else optim.hyper("train", "the learning rate (--lr)", lr)
    if name == "adam":
        return optim.Adam(lr)
    return optim.SGD(lr, momentum=0.9 if name == "momentum" else 0.0)


def _optimizer_config(opt) -> dict:
    from graphc import optim
    name = "adam" if isinstance(opt, optim.Adam) else ("momentum" if getattr(opt, "momentum", 0) else "sgd")
    return {"name": name, **{k: v for k, v in vars(opt).items() if isinstance(v, (int, float, bool, str))}}


def _load_model(model, seed):
    from graphc import models
    from graphc.graph import Graph
    if isinstance(model, Graph):
        return model, model.name
    if not isinstance(model, str):
        raise GraphError(f"model must be a graphc.Graph, a zoo name or 'path.py:function', got {type(model).__name__}")
    return models.load(model, seed=seed), model


def _count(value, what, minimum=0):
    """An int >= minimum (not a bool), from an argument or checkpoint metadata."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise GraphError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _checked_meta(cm, path) -> dict:
    """The checkpoint metadata train() resumes from, each field checked: a crafted or damaged file is one
    CheckpointError line, never a traceback."""
    def bad(what, v):
        return CheckpointError(f"{path}: corrupt checkpoint metadata: {what} {v!r}")

    def count(key, minimum=0):
        v = cm.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < minimum):
            raise bad(f"{key} must be an integer >= {minimum}, got", v)

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    out = dict(cm)
    for key, minimum in (("epoch", 0), ("batch_in_epoch", 0), ("seed", 0), ("batch", 1)):
        count(key, minimum)
    for key in ("optimizer", "history", "partial"):
        if out.get(key) is not None and not isinstance(out[key], dict):
            raise bad(f"{key} must be a mapping, got", out[key])
    for k, v in (out.get("history") or {}).items():
        if not (isinstance(v, list) and all(number(x) for x in v)):
            raise bad(f"history[{k!r}] must be a list of numbers, got", v)
    part = out.get("partial")
    if part is not None:
        if set(part) != {"loss_sum", "seen", "seconds"} or not all(number(v) for v in part.values()) \
                or not isinstance(part["seen"], int) or part["seen"] < 0 or part["seconds"] < 0:
            raise bad("partial must be {loss_sum: number, seen: int >= 0, seconds: number >= 0}, got", part)
    for key in ("data", "model"):
        if out.get(key) is not None and not isinstance(out[key], str):
            raise bad(f"{key} must be a string, got", out[key])
    return out


def _finite_state(exe) -> bool:
    return all(v.dtype.kind != "f" or np.isfinite(v).all() for v in map(np.asarray, exe.state.values()))


def _check_model(graph, x_shape):
    nodes = graph.nx.nodes
    problems = []
    if "x" not in graph.inputs:
        problems.append('an input "x" (the images)')
    if "labels" not in graph.inputs:
        problems.append('an input "labels" (int64 class ids)')
    if "logits" not in graph:
        problems.append('a value "logits"')
    if problems:
        raise GraphError(f"graph {graph.name!r} cannot be trained by graphc.train: it needs "
                         + ", ".join(problems) + " (as every graphc.models zoo model has) and a scalar loss output")
    want = nodes["x"]["shape"]
    if len(want) != len(x_shape) or any(not isinstance(w, str) and w != g for w, g in zip(want[1:], x_shape[1:])):
        raise GraphError(f"model {graph.name!r} takes images shaped {tuple(want)}, the data has {tuple(x_shape)}")


def _compile(graph, backend, optimizer, log):
    import graphc
    if backend == "numba":
        try:
            return graphc.compile(graph, backend="numba", optimizer=optimizer), "numba"
        except (ImportError, BackendError, NotImplementedError) as e:
            if log:
                log(f"note: the numba backend is not available here ({type(e).__name__}: {e}); "
                    "using the reference backend (slower)")
            backend = "reference"
    return graphc.compile(graph, backend=backend, optimizer=optimizer), backend


def _inference_exe(graph, backend):
    """An executable of the forward graph (no backward, no update) that also outputs "logits"."""
    import graphc
    g = graph.clone()
    g.output(g["logits"])
    return graphc.compile(g, backend=backend)


def _sync_params(src, dst):
    for n in dst.state:
        if n in src.state:
            dst.state[n] = src.state[n]


def evaluate(exe, x, y, batch=EVAL_BATCH):
    """(accuracy, mean loss) of an executable (inference or training) on normalized images x and labels y,
    in inference mode (dropout off), batch by batch."""
    correct, loss_sum = 0, 0.0
    loss_name = exe.graph.loss or (exe.outputs[0] if exe.outputs else None)
    want = ["logits"] + ([loss_name] if loss_name and loss_name != "logits" else [])
    for start in range(0, len(x), batch):
        xb, yb = x[start:start + batch], y[start:start + batch]
        out = exe.run({"x": xb, "labels": yb}, outputs=want)
        correct += int((np.argmax(out["logits"], axis=1) == yb).sum())
        if len(want) > 1:
            loss_sum += float(out[want[1]]) * len(xb)
    n = max(len(x), 1)
    return correct / n, (loss_sum / n if len(want) > 1 else float("nan"))


def _progress_enabled(progress) -> bool:
    if not progress:
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _resolve(value, key, ckpt_meta, ckpt_value=None):
    if value is not None:
        return value
    if ckpt_meta is not None and ckpt_value is not None:
        return ckpt_value
    return DEFAULTS[key]


class _DeferredInterrupt:
    """While active (main thread only), the first Ctrl-C only sets ``requested``: the loop finishes the
    step in flight, so parameters and optimizer state are consistent when the checkpoint is written.
    A second Ctrl-C raises KeyboardInterrupt at once (``forced``)."""

    def __init__(self):
        self.requested = self.forced = False
        self._old = None

    def _handler(self, signum, frame):
        if self.requested:
            self.forced = True
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            try:
                self._old = signal.signal(signal.SIGINT, self._handler)
            except (ValueError, OSError):
                self._old = None
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


# --------------------------------------------------------------------------- train


def train(model, data=None, epochs=1, batch=None, optimizer=None, lr=None, backend="numba", seed=None,
          save=None, resume=None, progress=True, log=print, allow_nonfinite=False) -> TrainResult:
    """Trains ``model`` and returns a TrainResult.

    model: a graphc.Graph, a zoo name ("lenet5", "mnist_convnet", "mlp", ...) or "path.py:function";
        it needs inputs "x" and "labels", a value "logits" and a scalar loss output.
    data: "mnist5k" (default: the embedded 4,000/1,000 MNIST subset), "mnist:DIR" (the four MNIST IDX
        files in DIR), or a graphc.data.Dataset.
    epochs: total epochs of the run (a resumed run trains the ones its checkpoint has not done yet).
    batch (default 64), optimizer ("adam" default, "sgd", "momentum" or a gc.optim optimizer), lr (default
        adam 1e-3, sgd 0.1, momentum 0.01 with momentum 0.9), seed (default 0): when resuming, each left
        as None is taken from the checkpoint.
    backend: "numba" (falls back to "reference" with a note when unavailable) or "reference".
    save: checkpoint path, written at the end of every epoch (and on Ctrl-C mid-epoch).
    resume: checkpoint path to continue from.
    progress: a tqdm bar per epoch (only when stderr is a terminal). log: where lines go (None: silent).
    allow_nonfinite: by default a NaN/inf loss or parameter stops the run with a GraphError (the last
        checkpoint, written before the divergence, is kept); True continues, and still never writes
        non-finite parameters over an existing checkpoint.
    """
    say = log or (lambda *a, **k: None)
    epochs = _count(epochs, "epochs")
    seed = None if seed is None else _count(seed, "seed")
    batch = None if batch is None else _count(batch, "batch", 1)
    if save is not None:
        save = check_writable(save, "checkpoint")        # now, not after the first epoch

    ckpt_arrays = ckpt_meta = None
    if resume is not None:
        ckpt_arrays, ckpt_meta = read_checkpoint(resume)
        ckpt_meta = _checked_meta(ckpt_meta, resume)
    cm = ckpt_meta or {}
    copt = cm.get("optimizer") or {}

    seed = int(_resolve(seed, "seed", ckpt_meta, cm.get("seed")))
    batch = int(_resolve(batch, "batch", ckpt_meta, cm.get("batch")))
    opt_name = _resolve(optimizer, "optimizer", ckpt_meta, copt.get("name"))
    lr_given = lr is not None
    if lr is None and ckpt_meta is not None and opt_name == copt.get("name"):
        lr = copt.get("lr")
    opt = make_optimizer(opt_name, lr)
    opt_cfg = _optimizer_config(opt)

    graph, model_name = _load_model(model, seed)     # a broken model fails before the data is read
    if data is None:
        data = cm.get("data") or DEFAULTS["data"]
    ds = data if isinstance(data, gdata.Dataset) else gdata.load_dataset(data)
    data_spec = ds.name
    if len(ds.x_train) == 0 or len(ds.x_test) == 0:
        raise DataError(f"dataset {data_spec!r} has {len(ds.x_train)} training and {len(ds.x_test)} test images; "
                        "both must be non-empty")

    fingerprint = graph_fingerprint(graph)
    if ckpt_meta is not None:
        if cm.get("model") not in (None, model_name):
            raise CheckpointError(f"{resume}: checkpoint was written for model {cm['model']!r}, not {model_name!r}")
        if cm.get("fingerprint") not in (None, fingerprint):
            raise CheckpointError(f"{resume}: checkpoint was written for a different graph structure than "
                                  f"{model_name!r} (fingerprint {cm['fingerprint']}, this graph's is {fingerprint})")
        if cm.get("seed") not in (None, seed):
            say(f"note: the checkpoint was trained with seed {cm['seed']}, continuing with seed {seed}: "
                "the batch order and dropout masks differ from an uninterrupted run")
        if cm.get("batch") not in (None, batch):
            say(f"note: the checkpoint was trained with batch {cm['batch']}, continuing with batch {batch}")
        if cm.get("data") not in (None, data_spec):
            say(f"note: the checkpoint was trained on {cm['data']!r}, continuing on {data_spec!r}")

    x_train, y_train = gdata.normalize(ds.x_train), np.asarray(ds.y_train, dtype=np.int64)
    x_test, y_test = gdata.normalize(ds.x_test), np.asarray(ds.y_test, dtype=np.int64)
    _check_model(graph, x_train.shape)

    exe, backend_used = _compile(graph, backend, opt, log)
    infer = _inference_exe(graph, backend_used)

    result = TrainResult(model=model_name, backend=backend_used, exe=exe, infer_exe=infer)
    start_epoch, skip_batches, part = 0, 0, {"loss_sum": 0.0, "seen": 0, "seconds": 0.0}
    if ckpt_meta is not None:
        load_checkpoint(resume, exe, fingerprint=fingerprint, model=model_name)
        if lr_given and "optim/lr" in exe.state and not np.isclose(float(exe.state["optim/lr"]), opt.lr,
                                                                    rtol=1e-6, atol=0):
            exe.state["optim/lr"] = np.full_like(exe.state["optim/lr"], opt.lr)
            say(f"note: learning rate set to {opt.lr:g} (the checkpoint had {copt.get('lr')})")
        hist = cm.get("history") or {}
        for k in ("train_loss", "test_loss", "test_accuracy", "images_per_second", "epoch_seconds", "step_losses"):
            getattr(result, k).extend(float(v) for v in hist.get(k, []))
        start_epoch = int(cm.get("epoch", 0))
        skip_batches = int(cm.get("batch_in_epoch", 0))
        part = dict(cm.get("partial") or part)
        where = f"epoch {start_epoch} done" if not skip_batches else \
            f"epoch {start_epoch + 1} at batch {skip_batches}"
        say(f"resuming from {resume}: {where}, step {exe.step_count}")
        if len(result.test_accuracy):
            result.final_test_accuracy = result.test_accuracy[-1]
    del ckpt_arrays

    result.config = {"model": model_name, "data": data_spec, "epochs": int(epochs), "batch": batch,
                     "optimizer": opt_cfg, "backend": backend_used, "seed": seed}
    n_batches = (len(x_train) + batch - 1) // batch
    if start_epoch >= epochs:
        say(f"nothing to train: the checkpoint has {start_epoch} epoch(s) done and --epochs is {epochs}; "
            "raise --epochs to train more")

    def checkpoint(meta_now, where):
        """Saves unless the state is non-finite: then stop (default), or keep the file as it is."""
        if _finite_state(exe):
            save_checkpoint(save, exe, meta_now)
        elif not allow_nonfinite:
            raise GraphError(f"training diverged: parameters are NaN or inf {where}; stopped without saving "
                             f"({save} keeps the last finite checkpoint). Fix: lower the learning rate "
                             f"(now {opt.lr:g}), or pass allow_nonfinite=True (--allow-nonfinite) to continue")
        elif save.exists():
            say(f"note: parameters are NaN or inf {where}; {save} is not overwritten (it keeps the last "
                "checkpoint written)")
        else:
            save_checkpoint(save, exe, meta_now)

    def meta(epoch_done, batch_in_epoch=0, partial=None):
        return {"model": model_name, "fingerprint": fingerprint, "epoch": int(epoch_done),
                "batch_in_epoch": int(batch_in_epoch), "partial": partial, "step": int(exe.step_count),
                "seed": seed, "batch": batch, "optimizer": opt_cfg, "data": data_spec, "epochs": int(epochs),
                "backend": backend_used, "graph": graph.name,
                "history": {k: list(getattr(result, k)) for k in
                            ("train_loss", "test_loss", "test_accuracy", "images_per_second", "epoch_seconds",
                             "step_losses")}}

    show_bar = _progress_enabled(progress)
    for epoch in range(start_epoch, epochs):
        first = skip_batches if epoch == start_epoch else 0
        loss_sum, seen, seconds = (part["loss_sum"], part["seen"], part["seconds"]) if first else (0.0, 0, 0.0)
        it = gdata.batches(x_train, y_train, batch, shuffle=True, seed=seed, epoch=epoch)
        it = itertools.islice(it, first, None)
        bar = None
        if show_bar:
            from tqdm import tqdm
            bar = tqdm(total=n_batches, initial=first, desc=f"epoch {epoch + 1}/{epochs}", unit="batch",
                       file=sys.stderr, leave=False, dynamic_ncols=True)
        b = first
        t0 = time.perf_counter()
        with _DeferredInterrupt() as stop:
            try:
                for xb, yb in it:
                    loss = exe.step({"x": xb, "labels": yb})
                    b += 1
                    if not math.isfinite(loss) and not allow_nonfinite:
                        raise GraphError(
                            f"training diverged: the loss is {loss} at step {exe.step_count} (epoch {epoch + 1}, "
                            f"batch {b}); stopped" + (f" without saving ({save} keeps the last finite checkpoint)"
                                                      if save is not None else "")
                            + f". Fix: lower the learning rate (now {opt.lr:g}), check the data for NaN/inf, or "
                            "pass allow_nonfinite=True (--allow-nonfinite) to continue")
                    loss_sum += loss * len(xb)
                    seen += len(xb)
                    result.step_losses.append(loss)
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss_sum / seen:.4f}", refresh=False)
                        bar.update(1)
                    if stop.requested:
                        raise KeyboardInterrupt
            except KeyboardInterrupt:
                if bar is not None:
                    bar.close()
                # Only a Ctrl-C seen between two steps leaves a consistent state to save; a second
                # Ctrl-C (or one outside the main thread's handler) stops at once and saves nothing.
                if save is not None and stop.requested and not stop.forced:
                    seconds += time.perf_counter() - t0
                    checkpoint(meta(epoch, b, {"loss_sum": loss_sum, "seen": seen, "seconds": seconds}),
                               f"after batch {b} of epoch {epoch + 1}")
                    say(f"interrupted in epoch {epoch + 1} after batch {b}/{n_batches}; checkpoint saved to "
                        f"{save} (continue with the same command and --resume {save})")
                raise
        seconds += time.perf_counter() - t0
        if bar is not None:
            bar.close()
        _sync_params(exe, infer)
        acc, test_loss = evaluate(infer, x_test, y_test)
        train_loss = loss_sum / max(seen, 1)
        ips = seen / seconds if seconds > 0 else float("inf")
        result.train_loss.append(train_loss)
        result.test_loss.append(test_loss)
        result.test_accuracy.append(acc)
        result.images_per_second.append(ips)
        result.epoch_seconds.append(seconds)
        result.final_test_accuracy = acc
        say(f"epoch {epoch + 1}/{epochs}: train loss {train_loss:.4f}, test loss {test_loss:.4f}, "
            f"test accuracy {acc:.4f}, {ips:,.0f} images/s ({seconds:.1f} s)")
        if save is not None:
            checkpoint(meta(epoch + 1), f"after epoch {epoch + 1}")

    if not result.test_accuracy:        # nothing trained and no history: evaluate the weights as they are
        _sync_params(exe, infer)
        result.final_test_accuracy, _ = evaluate(infer, x_test, y_test)
    else:
        _sync_params(exe, infer)
    say(f"test accuracy: {result.final_test_accuracy:.4f}")
    return result


# --------------------------------------------------------------------------- CLI glue


def add_train_arguments(parser: argparse.ArgumentParser, model=True) -> argparse.ArgumentParser:
    """Adds the training options to an argparse parser (the `graphc train` sub-command uses it):
    positional MODEL (unless model=False), --data, --epochs, --batch, --optimizer, --lr, --backend,
    --seed, --save, --resume, --no-progress. Attribute names: model, data, epochs, batch, optimizer, lr,
    backend, seed, save, resume, progress."""
    from graphc.compiler import BACKENDS
    if model:
        parser.add_argument("model", metavar="MODEL",
                            help="a zoo model (mlp, lenet5, mnist_convnet, codelab_cnn, resnet, inception, ...) "
                                 "or path/to/file.py:function returning a graphc.Graph")
    parser.add_argument("--data", default=None, metavar="SPEC",
                        help="mnist5k (default: the embedded 4,000/1,000 MNIST subset) or mnist:DIR "
                             "(a directory with the four MNIST IDX files, plain or .gz)")
    parser.add_argument("--epochs", type=int, default=1, metavar="E",
                        help="total epochs of the run (default 1; with --resume, the epochs left are trained)")
    parser.add_argument("--batch", type=int, default=None, metavar="N", help="mini-batch size (default 64)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                        help="default adam; momentum is SGD with momentum 0.9")
    parser.add_argument("--lr", type=float, default=None, metavar="LR",
                        help="learning rate (default: adam 0.001, sgd 0.1, momentum 0.01)")
    parser.add_argument("--backend", choices=BACKENDS, default="numba",
                        help="default numba (falls back to reference, with a note, when unavailable)")
    parser.add_argument("--seed", type=int, default=None, metavar="S",
                        help="seed of the initial weights, batch order and dropout (default 0)")
    parser.add_argument("--save", default=None, metavar="CKPT",
                        help="write a checkpoint (.npz) at the end of every epoch (atomically)")
    parser.add_argument("--resume", default=None, metavar="CKPT",
                        help="continue from a checkpoint; unset --seed/--batch/--optimizer/--lr/--data "
                             "come from it")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bar (it is shown only on a terminal anyway)")
    parser.add_argument("--allow-nonfinite", action="store_true",
                        help="keep training when the loss or the parameters become NaN/inf (default: stop with "
                             "an error); a non-finite state never overwrites an existing checkpoint")
    return parser


def main_from_args(args) -> int:
    """Runs `graphc train` from a parsed argparse Namespace (see add_train_arguments). Returns the exit
    status: 0 after training, 130 when interrupted with Ctrl-C. graphc errors (GraphError and its
    subclasses: DataError, CheckpointError, ...) propagate for the caller to print."""
    try:
        train(args.model, data=getattr(args, "data", None), epochs=getattr(args, "epochs", 1),
              batch=getattr(args, "batch", None), optimizer=getattr(args, "optimizer", None),
              lr=getattr(args, "lr", None), backend=getattr(args, "backend", "numba") or "numba",
              seed=getattr(args, "seed", None), save=getattr(args, "save", None),
              resume=getattr(args, "resume", None), progress=getattr(args, "progress", True), log=print,
              allow_nonfinite=getattr(args, "allow_nonfinite", False))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def main(argv=None) -> int:
    """`python -m graphc.train MODEL ...` (the same options as `graphc train`)."""
    parser = add_train_arguments(argparse.ArgumentParser(prog="python -m graphc.train",
                                                         description="Train a graphc model on MNIST digits."))
    args = parser.parse_args(argv)
    try:
        return main_from_args(args)
    except GraphError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
