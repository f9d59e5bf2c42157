"""The training loop: ``graphc train MODEL`` and the same from Python.

    from graphc.train import train
    result = train("lenet5", epochs=5, batch=128, optimizer="adam")     # embedded 5k MNIST subset
    result.final_test_accuracy, result.train_loss, result.images_per_second, result.exe
    result = train("codelab_cnn", data="cifar.npz", lr_schedule="warmup:1+cosine", validation=0.1,
                   augment="crop:4,flip", callbacks=[gc.callbacks.EarlyStopping(patience=2)])

Data: "mnist5k" (default), "mnist:DIR", "FILE.npz", "images:DIR" or a graphc.data.Dataset (see
graphc.data). A zoo model is built for the data: its in_channels, image_size and num_classes. The
images are preprocessed as graphc.preprocess fits them on the training split (recorded in the
checkpoint, so ``gc.load`` and ``graphc predict`` apply the same).

Reproducible: the seed fixes the initial weights (``graphc.models.load(name, seed=seed)``), the batch
order of every epoch (``graphc.data.batches(seed=seed, epoch=e)``), the augmentation and the dropout
masks (seeded by the graph's seed and the step counter). ``save=PATH`` writes a checkpoint (parameters,
optimizer and schedule state, step counter, history, the model's recipe and preprocessing; atomically)
at the end of every epoch, and also when the run is interrupted with Ctrl-C mid-epoch; ``resume=PATH``
continues from it exactly: the result equals an uninterrupted run. ``epochs`` is the total number of
epochs of the run, so an interrupted run continues with the same command plus ``--resume``.

Before the first epoch the kernels are compiled (or loaded from the disk cache) in a phase of their
own, so epoch 1's images/s measures training only.
Data-parallel under ``mpiexec -n R`` (``distributed``): R shards of every global batch, evaluation split
over the ranks, rank 0 prints, runs the callbacks and checkpoints (graphc.distributed, README "Scaling out").
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
from graphc import distributed as dist
from graphc.checkpoint import graph_fingerprint, load_checkpoint, read_checkpoint, save_checkpoint
from graphc.errors import BackendError, CheckpointError, DataError, GraphError
from graphc.files import check_writable
from graphc.preprocess import prepare_splits
from graphc.progress import Ticker, executors_quiet, kernel_count, progress_bar

__all__ = ["train", "TrainResult", "evaluate", "make_optimizer", "add_train_arguments", "main_from_args",
           "train_from_args",
           "OPTIMIZERS", "DEFAULT_LR", "HISTORY"]

OPTIMIZERS = ("sgd", "momentum", "adam")
#: learning rate used when none is given
DEFAULT_LR = {"adam": 1e-3, "sgd": 0.1, "momentum": 0.01}
DEFAULTS = {"data": "mnist5k", "batch": 64, "optimizer": "adam", "seed": 0}
EVAL_BATCH = 500
#: the per-epoch histories a TrainResult keeps and a checkpoint carries
HISTORY = ("train_loss", "val_loss", "val_accuracy", "test_loss", "test_accuracy", "learning_rate",
           "images_per_second", "epoch_seconds", "step_losses")


@dataclass
class TrainResult:
    """What a training run returns. Lists hold one entry per epoch trained so far (a resumed run
    includes the epochs from its checkpoint)."""
    model: str
    backend: str
    train_loss: list = field(default_factory=list)         # mean training loss over each epoch's samples
    val_loss: list = field(default_factory=list)           # on the validation split (NaN without one)
    val_accuracy: list = field(default_factory=list)
    test_loss: list = field(default_factory=list)
    test_accuracy: list = field(default_factory=list)
    learning_rate: list = field(default_factory=list)      # the learning rate of each epoch's last step
    images_per_second: list = field(default_factory=list)  # training images per second (evaluation excluded)
    epoch_seconds: list = field(default_factory=list)      # training seconds per epoch (evaluation excluded)
    step_losses: list = field(default_factory=list)        # loss of every training step
    final_test_accuracy: float = float("nan")
    exe: object = None          # the training executable (exe.params, exe.state_dict())
    infer_exe: object = None    # inference executable of the same graph, holding the final parameters
    config: dict = field(default_factory=dict)
    artifact: object = None     # graphc.artifact.Artifact: recipe, preprocessing, class names (gc.save)
    stopped_early: bool = False     # a callback (EarlyStopping) ended the run before `epochs`

    @property
    def epochs(self) -> int:
        return len(self.train_loss)

    def __repr__(self):
        return (f"TrainResult(model={self.model!r}, backend={self.backend!r}, epochs={self.epochs}, "
                f"final_test_accuracy={self.final_test_accuracy:.4f})")


# --------------------------------------------------------------------------- helpers


def make_optimizer(name, lr=None, schedule=None):
    """"sgd" | "momentum" (SGD with momentum 0.9) | "adam", or a gc.optim optimizer (returned as is).
    lr None: the default of DEFAULT_LR. schedule: a graphc.schedules schedule (or None)."""
    from graphc import optim
    if isinstance(name, optim.Optimizer):
        if lr is not None:
            name.lr = optim.hyper("train", "the learning rate (--lr)", lr)
        if schedule is not None:
            name._set_schedule(schedule)
        return name
    if name not in OPTIMIZERS:
        raise GraphError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    lr = DEFAULT_LR[name] if lr is None else optim.hyper("train", "the learning rate (--lr)", lr)
    if name == "adam":
        return optim.Adam(lr, schedule=schedule)
    return optim.SGD(lr, momentum=0.9 if name == "momentum" else 0.0, schedule=schedule)


def _optimizer_config(opt) -> dict:
    from graphc import optim
    name = "adam" if isinstance(opt, optim.Adam) else ("momentum" if getattr(opt, "momentum", 0) else "sgd")
    return {"name": name, **{k: v for k, v in vars(opt).items() if isinstance(v, (int, float, bool, str))}}


def _load_model(model, seed, ds=None):
    """(graph, name, recipe): a zoo model or a model file's function is built for the data (in_channels,
    image_size, num_classes, when it takes them); the recipe records how (graphc.artifact)."""
    from graphc import models
    from graphc.artifact import recipe
    from graphc.graph import Graph
    if isinstance(model, Graph):
        return model, model.name, {"model": None, "kwargs": {}}
    if not isinstance(model, str):
        raise GraphError(f"model must be a graphc.Graph, a zoo name or 'path.py:function', got {type(model).__name__}")
    kwargs = {"seed": seed}
    if ds is not None:
        x = ds.x_train
        c, hw = (1, x.shape[1:]) if x.ndim == 3 else (x.shape[1], x.shape[2:])
        kwargs.update(in_channels=int(c), image_size=int(hw[0]) if hw[0] == hw[1] else [int(v) for v in hw],
                      num_classes=ds.num_classes)
    graph, used = models.build(model, **kwargs)
    return graph, model, recipe(model, used)


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
    for key in ("optimizer", "history", "partial", "recipe", "preprocess"):
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
    for key in ("data", "model", "lr_schedule", "augment", "normalization"):
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


def _compile(graph, backend, optimizer, log, dp=None):
    import graphc
    if backend == "numba":
        try:
            return graphc.compile(graph, backend="numba", optimizer=optimizer, distributed=dp), "numba"
        except (ImportError, BackendError, NotImplementedError) as e:
            if log:
                log(f"note: the numba backend is not available here ({type(e).__name__}: {e}); "
                    "using the reference backend (slower)")
            backend = "reference"
    return graphc.compile(graph, backend=backend, optimizer=optimizer, distributed=dp), backend


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

    def __init__(self, enabled=True):
        self.requested = self.forced = False
        self._old = None
        self.enabled = enabled       # off in a data-parallel run: ranks cannot agree on the step to stop at

    def _handler(self, signum, frame):
        if self.requested:
            self.forced = True
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        if self.enabled and threading.current_thread() is threading.main_thread():
            try:
                self._old = signal.signal(signal.SIGINT, self._handler)
            except (ValueError, OSError):
                self._old = None
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


# --------------------------------------------------------------------------- the run


class _Run:
    """One training run: set up by __init__ (configuration, data, model, compilation, resume), then
    run() trains epoch by epoch. Callbacks see it as `run` (graphc.callbacks)."""

    def __init__(self, model, data, epochs, batch, optimizer, lr, backend, seed, save, resume, progress, log,
                 allow_nonfinite, lr_schedule, validation, augment, normalization, callbacks, export,
                 distributed=None, sync_bn=False):
        self.dp = dist.for_training(distributed, sync_bn)
        self.ranks, self.rank = (self.dp.size, self.dp.rank) if self.dp is not None else (1, 0)
        if self.rank != 0:               # rank 0 prints and runs the callbacks
            log, progress = None, False
        self.say = log or (lambda *a, **k: None)
        self.log, self.progress, self.allow_nonfinite = log, progress, allow_nonfinite
        self.epochs = _count(epochs, "epochs")
        seed = None if seed is None else _count(seed, "seed")
        batch = None if batch is None else _count(batch, "batch", 1)
        self.save = None if save is None else check_writable(save, "checkpoint")   # now, not after an epoch
        self.export = None if export is None else _check_export(export)
        self.callbacks = list(callbacks or ()) if self.rank == 0 else []     # they print, log, write files
        self.resume = resume
        ckpt_meta = None
        if resume is not None:
            _, ckpt_meta = read_checkpoint(resume)
            ckpt_meta = _checked_meta(ckpt_meta, resume)
        self.resuming = ckpt_meta is not None
        cm = self.cm = ckpt_meta or {}
        copt = cm.get("optimizer") or {}
        self.seed = int(_resolve(seed, "seed", ckpt_meta, cm.get("seed")))
        if batch is None and ckpt_meta is not None:
            batch = dist.resumed_batch(cm, self.ranks)       # on another number of ranks: the same global batch
        self.batch = int(_resolve(batch, "batch", ckpt_meta, cm.get("batch")))
        opt_name = _resolve(optimizer, "optimizer", ckpt_meta, copt.get("name"))
        self.lr_given = lr is not None
        if lr is None and ckpt_meta is not None and opt_name == copt.get("name"):
            lr = copt.get("lr")
        self.opt = make_optimizer(opt_name, lr)        # a bad optimizer fails before the data is read
        self.opt_cfg = _optimizer_config(self.opt)
        self._setup_data(model, data, validation, normalization, augment)
        self._setup_schedule(lr_schedule)
        self._check_resume()
        _check_model(self.graph, self.splits.x_train.shape)
        self.exe, self.backend = _compile(self.graph, backend, self.opt, log, self.dp)
        if self.dp is not None:
            self.say(dist.describe(self.dp, self.batch))
        self.infer = _inference_exe(self.graph, self.backend)
        self._setup_result()

    # ------------------------------------------------------------------ setup
    def _setup_data(self, model, data, validation, normalization, augment):
        from graphc.augment import Augment
        from graphc.preprocess import Preprocess
        cm = self.cm
        if data is None:
            data = cm.get("data") or DEFAULTS["data"]
        ds = data if isinstance(data, gdata.Dataset) else gdata.load_dataset(data)
        self.data_spec = ds.name
        if len(ds.x_train) == 0 or len(ds.x_test) == 0:
            raise DataError(f"dataset {self.data_spec!r} has {len(ds.x_train)} training and {len(ds.x_test)} test "
                            "images; both must be non-empty")
        self.graph, self.model_name, self.recipe = _load_model(model, self.seed, ds)
        self.fingerprint = graph_fingerprint(self.graph)
        self.validation = float(cm.get("validation") or 0.0) if validation is None else validation
        self.normalization = normalization or cm.get("normalization") or ds.normalization
        recorded = Preprocess.from_meta(cm["preprocess"]) if isinstance(cm.get("preprocess"), dict) else None
        if recorded is not None and normalization not in (None, recorded.mode):
            recorded = None
        self.splits = prepare_splits(ds, self.normalization, self.validation, self.seed, recorded)
        self.augment = Augment.parse(augment if augment is not None else cm.get("augment"))
        self.classes = ds.classes
        self.num_classes = ds.num_classes
        self.shard = -(-len(self.splits.x_train) // self.ranks)          # training images per rank and epoch
        self.n_batches = (self.shard + self.batch - 1) // self.batch

    def _setup_schedule(self, spec):
        from graphc import schedules
        if spec is None and self.resuming:
            spec = self.cm.get("lr_schedule")
        self.schedule_spec = spec if isinstance(spec, str) or spec is None else repr(spec)
        self.schedule = schedules.parse(spec, self.n_batches, self.epochs)
        if self.schedule is not None:
            self.opt._set_schedule(self.schedule)

    def _check_resume(self):
        cm, say = self.cm, self.say
        if not self.resuming:
            return
        resume, name = self.resume, self.model_name
        if cm.get("model") not in (None, name):
            raise CheckpointError(f"{resume}: checkpoint was written for model {cm['model']!r}, not {name!r}")
        if cm.get("fingerprint") not in (None, self.fingerprint):
            raise CheckpointError(f"{resume}: checkpoint was written for a different graph structure than {name!r} "
                                  f"(fingerprint {cm['fingerprint']}, this graph's is {self.fingerprint})")
        if cm.get("seed") not in (None, self.seed):
            say(f"note: the checkpoint was trained with seed {cm['seed']}, continuing with seed {self.seed}: "
                "the batch order and dropout masks differ from an uninterrupted run")
        if cm.get("batch") not in (None, self.batch) or int(cm.get("ranks", 1)) != self.ranks:
            say(f"note: the checkpoint was trained on {cm.get('ranks', 1)} rank(s) x batch {cm.get('batch')}, "
                f"continuing on {self.ranks} x {self.batch}")
        if cm.get("data") not in (None, self.data_spec):
            say(f"note: the checkpoint was trained on {cm['data']!r}, continuing on {self.data_spec!r}")

    def _setup_result(self):
        from graphc.artifact import Artifact
        r = self.result = TrainResult(model=self.model_name, backend=self.backend, exe=self.exe, infer_exe=self.infer)
        r.artifact = Artifact(self.recipe["model"], self.recipe["kwargs"], self.splits.preprocess, self.classes,
                              self.fingerprint)
        self.infer.artifact = r.artifact
        self.start_epoch, self.skip_batches = 0, 0
        self.part = {"loss_sum": 0.0, "seen": 0, "seconds": 0.0}
        if self.resuming:
            self._restore()
        r.config = {"model": self.model_name, "data": self.data_spec, "epochs": self.epochs, "batch": self.batch,
                    "optimizer": self.opt_cfg, "backend": self.backend, "seed": self.seed,
                    "lr_schedule": self.schedule_spec, "validation": self.validation,
                    "augment": self.augment.spec() if self.augment else None, "normalization": self.normalization,
                    "ranks": self.ranks, "global_batch": self.batch * self.ranks,
                    "sync_bn": bool(self.dp is not None and self.dp.sync_bn)}
        self.step_losses_logged = len(r.step_losses)

    def _restore(self):
        cm, exe, r = self.cm, self.exe, self.result
        load_checkpoint(self.resume, exe, fingerprint=self.fingerprint, model=self.model_name)
        if self.lr_given and "optim/lr" in exe.state and not np.isclose(float(exe.state["optim/lr"]), self.opt.lr,
                                                                        rtol=1e-6, atol=0):
            exe.state["optim/lr"] = np.full_like(exe.state["optim/lr"], self.opt.lr)
            self.say(f"note: learning rate set to {self.opt.lr:g} (the checkpoint had "
                     f"{(cm.get('optimizer') or {}).get('lr')})")
        hist = cm.get("history") or {}
        for k in HISTORY:
            getattr(r, k).extend(float(v) for v in hist.get(k, []))
        self.start_epoch = int(cm.get("epoch", 0))
        self.skip_batches = int(cm.get("batch_in_epoch", 0))
        self.part = dict(cm.get("partial") or self.part)
        self.skip_batches = dist.resumed_position(cm, self.skip_batches, self.part, self.batch, self.ranks, self.say)
        where = f"epoch {self.start_epoch} done" if not self.skip_batches else \
            f"epoch {self.start_epoch + 1} at batch {self.skip_batches}"
        self.say(f"resuming from {self.resume}: {where}, step {exe.step_count}")
        if r.test_accuracy:
            r.final_test_accuracy = r.test_accuracy[-1]

    # ------------------------------------------------------------------ what callbacks read
    @property
    def has_validation(self) -> bool:
        return self.splits.x_val is not None

    @property
    def x_test(self):
        return self.splits.x_test

    @property
    def y_test(self):
        return self.splits.y_test

    def history_rows(self):
        """One dict per epoch trained (graphc.callbacks.LOG_FIELDS); NaN where not measured."""
        from graphc.callbacks import LOG_FIELDS
        r = self.result
        cols = {"train_loss": r.train_loss, "val_loss": r.val_loss, "val_accuracy": r.val_accuracy,
                "test_loss": r.test_loss, "test_accuracy": r.test_accuracy, "lr": r.learning_rate,
                "images_per_second": r.images_per_second, "seconds": r.epoch_seconds}
        rows = []
        for e in range(len(r.train_loss)):
            row = {k: (float(v[e]) if e < len(v) else float("nan")) for k, v in cols.items()}
            rows.append({k: (e + 1 if k == "epoch" else row[k]) for k in LOG_FIELDS})
        return rows

    def learning_rate(self) -> float:
        """The learning rate of the last step (base rate times the schedule's factor)."""
        base = float(np.asarray(self.exe.state.get("optim/lr", self.opt.lr)))
        if self.schedule is None:
            return base
        return base * self.schedule.factor(max(self.exe.step_count - 1, 0))

    # ------------------------------------------------------------------ checkpoints
    def meta(self, epoch_done, batch_in_epoch=0, partial=None):
        r = self.result
        return {"model": self.model_name, "fingerprint": self.fingerprint, "epoch": int(epoch_done),
                "batch_in_epoch": int(batch_in_epoch), "partial": partial, "step": int(self.exe.step_count),
                "seed": self.seed, "batch": self.batch, "optimizer": self.opt_cfg, "data": self.data_spec,
                "epochs": self.epochs, "backend": self.backend, "graph": self.graph.name, "ranks": self.ranks,
                "global_batch": self.batch * self.ranks,
                "lr_schedule": self.schedule_spec, "validation": self.validation,
                "augment": r.config["augment"], "normalization": self.normalization,
                **r.artifact.to_meta(), "history": {k: list(getattr(r, k)) for k in HISTORY}}

    def checkpoint(self, meta_now, where):
        """Saves unless the state is non-finite: then stop (default), or keep the file as it is."""
        exe, save = self.exe, self.save
        if _finite_state(exe):
            dist.save_on_rank0(save_checkpoint, save, exe, meta_now, self.dp)
        elif not self.allow_nonfinite:
            raise GraphError(f"training diverged: parameters are NaN or inf {where}; stopped without saving "
                             f"({save} keeps the last finite checkpoint). Fix: lower the learning rate "
                             f"(now {self.opt.lr:g}), or pass allow_nonfinite=True (--allow-nonfinite) to continue")
        elif save.exists():
            self.say(f"note: parameters are NaN or inf {where}; {save} is not overwritten (it keeps the last "
                     "checkpoint written)")
        else:
            dist.save_on_rank0(save_checkpoint, save, exe, meta_now, self.dp)

    # ------------------------------------------------------------------ training
    def compile_phase(self):
        """Compiles (or loads from the disk cache) every kernel of the training step and the evaluation
        before the first epoch, with its own bar and time, so epoch 1's images/s measures training only."""
        exes = [e for e in (self.exe, self.infer) if hasattr(e, "precompile")]
        if not exes:
            return
        n = sum(kernel_count(e) for e in exes)
        bar = progress_bar(self.progress, total=len(exes), desc=f"compiling {n} kernels", unit="program")
        t0 = time.perf_counter()
        def sizes(n, batch):         # the full batches and the last, smaller one, each bound once
            return sorted({min(batch, n)} | ({n % batch} if n % batch else set()))
        # each rank on its own, then they wait for each other; the bar, not the executors, says what compiles
        with Ticker(bar), dist.compiling(self.dp), executors_quiet(exes):
            for b in sizes(self.shard, self.batch):
                self.exe.precompile(b)
            if bar is not None:
                bar.update(1)
            if self.infer in exes:
                m = len(self.splits.x_test)        # (a rank evaluates m // ranks or one more test images)
                for b in set(sizes(-(-m // self.ranks), EVAL_BATCH) + sizes(m // self.ranks or 1, EVAL_BATCH)):
                    self.infer.precompile(b)
        if bar is not None:
            bar.close()
        self.say(f"compiled {n} kernels in {time.perf_counter() - t0:.1f} s (training step and evaluation; "
                 "cached on disk, so the next run starts faster)")

    def batches(self, epoch, first):
        """The epoch's mini-batches from batch `first` on, augmented when asked (seeded per batch)."""
        s = self.splits
        it = itertools.islice(gdata.batches(s.x_train, s.y_train, self.batch, shuffle=True, seed=self.seed,
                                            epoch=epoch, rank=self.rank, ranks=self.ranks), first, None)
        for b, (xb, yb) in enumerate(it, first):
            yield (self.augment(xb, self.seed, epoch, b) if self.augment else xb), yb

    def train_epoch(self, epoch):
        """Trains one epoch; returns (loss sum, samples seen, seconds). Ctrl-C saves a mid-epoch checkpoint."""
        exe, result = self.exe, self.result
        first = self.skip_batches if epoch == self.start_epoch else 0
        p = self.part
        loss_sum, seen, seconds = (p["loss_sum"], p["seen"], p["seconds"]) if first else (0.0, 0, 0.0)
        bar = progress_bar(self.progress, total=self.n_batches, initial=first, desc=f"epoch {epoch + 1}/{self.epochs}",
                   unit="batch")
        b = first
        t0 = time.perf_counter()
        n_losses = len(result.step_losses)
        with _DeferredInterrupt(enabled=self.dp is None) as stop:
            try:
                for xb, yb in self.batches(epoch, first):
                    loss = exe.step({"x": xb, "labels": yb})
                    b += 1
                    if not math.isfinite(loss) and not self.allow_nonfinite:
                        raise self._diverged(loss, epoch, b)
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
                if self.save is not None and stop.requested and not stop.forced:
                    seconds += time.perf_counter() - t0
                    self.checkpoint(self.meta(epoch, b, {"loss_sum": loss_sum, "seen": seen, "seconds": seconds}),
                                    f"after batch {b} of epoch {epoch + 1}")
                    self.say(f"interrupted in epoch {epoch + 1} after batch {b}/{self.n_batches}; checkpoint saved "
                             f"to {self.save} (continue with the same command and --resume {self.save})")
                raise
        if bar is not None:
            bar.close()
        return dist.epoch_totals(result.step_losses, n_losses, loss_sum, seen, seconds + time.perf_counter() - t0,
                                 self.dp)

    def _diverged(self, loss, epoch, b):
        save = self.save
        return GraphError(f"training diverged: the loss is {loss} at step {self.exe.step_count} (epoch {epoch + 1}, "
                          f"batch {b}); stopped" + (f" without saving ({save} keeps the last finite checkpoint)"
                                                    if save is not None else "")
                          + f". Fix: lower the learning rate (now {self.opt.lr:g}), check the data for NaN/inf, or "
                          "pass allow_nonfinite=True (--allow-nonfinite) to continue")

    def end_epoch(self, epoch, loss_sum, seen, seconds) -> bool:
        """Evaluates, records and reports the epoch, runs the callbacks, saves; True: a callback stops."""
        r, s = self.result, self.splits
        _sync_params(self.exe, self.infer)
        acc, test_loss = dist.evaluate_shards(evaluate, self.infer, s.x_test, s.y_test, self.dp)
        val_acc, val_loss = dist.evaluate_shards(evaluate, self.infer, s.x_val, s.y_val, self.dp) \
            if self.has_validation else (math.nan, math.nan)
        logs = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "val_loss": val_loss,
                "val_accuracy": val_acc, "test_loss": test_loss, "test_accuracy": acc, "lr": self.learning_rate(),
                "images_per_second": seen / seconds if seconds > 0 else float("inf"), "seconds": seconds}
        for k, key in (("train_loss", "train_loss"), ("val_loss", "val_loss"), ("val_accuracy", "val_accuracy"),
                       ("test_loss", "test_loss"), ("test_accuracy", "test_accuracy"), ("learning_rate", "lr"),
                       ("images_per_second", "images_per_second"), ("epoch_seconds", "seconds")):
            getattr(r, k).append(float(logs[key]))
        r.final_test_accuracy = acc
        val = f"val loss {val_loss:.4f}, val accuracy {val_acc:.4f}, " if self.has_validation else ""
        lr = f", lr {logs['lr']:.3g}" if self.schedule is not None else ""
        self.say(f"epoch {epoch + 1}/{self.epochs}: train loss {logs['train_loss']:.4f}, {val}"
                 f"test loss {test_loss:.4f}, "
                 f"test accuracy {acc:.4f}, {logs['images_per_second']:,.0f} images/s ({seconds:.1f} s){lr}")
        stop = dist.any_rank(any([bool(cb.on_epoch_end(self, logs)) for cb in self.callbacks]), self.dp)
        if self.save is not None:
            self.checkpoint(self.meta(epoch + 1), f"after epoch {epoch + 1}")
        return stop

    def run(self) -> TrainResult:
        r = self.result
        if self.start_epoch >= self.epochs:
            self.say(f"nothing to train: the checkpoint has {self.start_epoch} epoch(s) done and --epochs is "
                     f"{self.epochs}; raise --epochs to train more")
        for cb in self.callbacks:
            cb.on_train_begin(self)
        if self.start_epoch < self.epochs:
            self.compile_phase()
        for epoch in range(self.start_epoch, self.epochs):
            if self.end_epoch(epoch, *self.train_epoch(epoch)):
                r.stopped_early = epoch + 1 < self.epochs
                break
        for cb in self.callbacks:
            cb.on_train_end(self)
        restored = dist.share_rank0_state(self.exe, self.dp, any(getattr(cb, "best_state", None) is not None
                                                                 for cb in self.callbacks))
        _sync_params(self.exe, self.infer)
        from graphc.artifact import inference_graph
        from graphc.checkpoint import is_training_state
        r.artifact.graph = inference_graph(self.graph, {n: v for n, v in self.exe.state.items()
                                                        if not is_training_state(n)})
        if not r.test_accuracy or restored:
            r.final_test_accuracy, _ = dist.evaluate_shards(evaluate, self.infer, self.splits.x_test,
                                                            self.splits.y_test, self.dp)
        if self.export is not None and self.rank == 0:
            from graphc.artifact import export_onnx
            export_onnx(r, self.export)                  # `graphc train --export FILE.onnx`
            self.say(f"exported {self.export}")
        self.say(f"test accuracy: {r.final_test_accuracy:.4f}")
        return r


def _check_export(path):
    """--export: the ONNX file is checked now, and that graphc can write ONNX (see graphc.artifact)."""
    from graphc.artifact import onnx_exporter
    path = check_writable(path, "ONNX export")
    onnx_exporter("--export")
    return path


def train(model, data=None, epochs=1, batch=None, optimizer=None, lr=None, backend="numba", seed=None,
          save=None, resume=None, progress=True, log=print, allow_nonfinite=False, lr_schedule=None,
          validation=None, augment=None, normalization=None, callbacks=(), export=None, distributed=None,
          sync_bn=False) -> TrainResult:
    """Trains ``model`` and returns a TrainResult.

    model: a graphc.Graph, a zoo name ("lenet5", "mnist_convnet", "mlp", ...) or "path.py:function";
        it needs inputs "x" and "labels", a value "logits" and a scalar loss output. A zoo model (or a
        function taking them) is built with the data's in_channels, image_size and num_classes.
    data: "mnist5k" (default: the embedded 4,000/1,000 MNIST subset), "mnist:DIR" (the four MNIST IDX
        files in DIR), "FILE.npz" (x_train, y_train[, x_test, y_test]), "images:DIR" (a folder per class),
        or a graphc.data.Dataset (Dataset.from_arrays(x, y) for your own arrays).
    epochs: total epochs of the run (a resumed run trains the ones its checkpoint has not done yet).
    batch (default 64), optimizer ("adam" default, "sgd", "momentum" or a gc.optim optimizer), lr (default
        adam 1e-3, sgd 0.1, momentum 0.01 with momentum 0.9), seed (default 0), lr_schedule, validation,
        augment, normalization: when resuming, each left as None is taken from the checkpoint.
    lr_schedule: "step:EPOCHS[:GAMMA]", "cosine[:MIN]", "warmup:EPOCHS[+cosine|+step:...]" or a
        graphc.schedules schedule: computed in the graph, saved in checkpoints.
    validation: a fraction of the training split held out (seeded, stratified) and evaluated every epoch.
    augment: "crop[:PAD]" and/or "flip" ("crop:4,flip"), for RGB photos (graphc.augment).
    normalization: "scale" or "standardize" (default: the dataset's; graphc.preprocess).
    callbacks: graphc.callbacks callbacks (EarlyStopping, CSVLogger, TensorBoard, Plots, your own).
    backend: "numba" (falls back to "reference" with a note when unavailable) or "reference".
    save: checkpoint path, written at the end of every epoch (and on Ctrl-C mid-epoch); gc.load reads it.
    resume: checkpoint path to continue from.
    export: an .onnx path written after training (gc.onnx.save; needs the onnx extra).
    progress: tqdm.auto bars (a widget in Jupyter; redrawn every 5 s when stderr is piped). log: where
        lines go (None: silent).
    allow_nonfinite: by default a NaN/inf loss or parameter stops the run with a GraphError (the last
        checkpoint, written before the divergence, is kept); True continues, and still never writes
        non-finite parameters over an existing checkpoint.
    distributed: data-parallel over MPI ranks, `batch` per rank (None: when launched by mpiexec with several
        ranks; True; False; a graphc.distributed Communicator or DataParallel). sync_bn: global-batch BN.
    """
    return _Run(model, data, epochs, batch, optimizer, lr, backend, seed, save, resume, progress, log,
                allow_nonfinite, lr_schedule, validation, augment, normalization, callbacks, export,
                distributed, sync_bn).run()


# --------------------------------------------------------------------------- CLI glue


def add_train_arguments(parser: argparse.ArgumentParser, model=True) -> argparse.ArgumentParser:
    """Adds the training options to an argparse parser (the `graphc train` sub-command uses it):
    positional MODEL (unless model=False), --data, --epochs, --batch, --optimizer, --lr, --lr-schedule,
    --validation, --early-stopping, --augment, --normalize, --backend, --seed, --save, --resume, --log,
    --tensorboard, --plots, --export, --no-progress, --allow-nonfinite. Attribute names: model, data,
    epochs, batch, optimizer, lr, lr_schedule, validation, early_stopping, augment, normalization,
    backend, seed, save, resume, log, tensorboard, plots, export, progress, allow_nonfinite."""
    from graphc.compiler import BACKENDS
    if model:
        parser.add_argument("model", metavar="MODEL",
                            help="a zoo model (mlp, lenet5, mnist_convnet, codelab_cnn, resnet, inception, ...) "
                                 "or path/to/file.py:function returning a graphc.Graph")
    parser.add_argument("--data", default=None, metavar="SPEC",
                        help="mnist5k (default: the embedded 4,000/1,000 MNIST subset), mnist:DIR (the four MNIST "
                             "IDX files), FILE.npz (x_train, y_train[, x_test, y_test]: any float or uint8 images, "
                             "any channel count) or images:DIR (one subfolder of images per class; needs Pillow)")
    parser.add_argument("--epochs", type=int, default=1, metavar="E",
                        help="total epochs of the run (default 1; with --resume, the epochs left are trained)")
    parser.add_argument("--batch", type=int, default=None, metavar="N", help="mini-batch size (default 64)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                        help="default adam; momentum is SGD with momentum 0.9")
    parser.add_argument("--lr", type=float, default=None, metavar="LR",
                        help="learning rate (default: adam 0.001, sgd 0.1, momentum 0.01)")
    parser.add_argument("--lr-schedule", default=None, metavar="SPEC",
                        help="step:EPOCHS[:GAMMA] (times GAMMA, default 0.1, every EPOCHS), cosine[:MIN] (down to "
                             "MIN x lr over the run), warmup:EPOCHS (linear), warmup:1+cosine; part of the graph, "
                             "so it is checkpointed")
    parser.add_argument("--validation", type=float, default=None, metavar="F",
                        help="hold a fraction F of the training images out as a validation split (e.g. 0.1)")
    parser.add_argument("--early-stopping", type=int, default=None, metavar="P",
                        help="stop when the validation loss (the test loss without --validation) has not improved "
                             "for P epochs")
    parser.add_argument("--augment", default=None, metavar="SPEC",
                        help="crop[:PAD] (random crops of the zero-padded image) and/or flip (horizontal), e.g. "
                             "crop:4,flip; for RGB photos")
    parser.add_argument("--normalize", dest="normalization", choices=("scale", "standardize"), default=None,
                        help="scale: integer pixels / 255; standardize: then each channel's mean and std on the "
                             "training split (default: scale for MNIST, standardize for --data FILE.npz/images:DIR)")
    parser.add_argument("--backend", choices=BACKENDS, default="numba",
                        help="default numba (falls back to reference, with a note, when unavailable)")
    parser.add_argument("--seed", type=int, default=None, metavar="S",
                        help="seed of the initial weights, batch order, augmentation and dropout (default 0)")
    parser.add_argument("--save", default=None, metavar="CKPT",
                        help="write a checkpoint (.npz) at the end of every epoch (atomically); gc.load and "
                             "graphc predict read it")
    parser.add_argument("--resume", default=None, metavar="CKPT",
                        help="continue from a checkpoint; unset --seed/--batch/--optimizer/--lr/--data/"
                             "--lr-schedule come from it")
    parser.add_argument("--log", default=None, metavar="CSV", help="write one row per epoch to a CSV file")
    parser.add_argument("--tensorboard", default=None, metavar="DIR",
                        help="write TensorBoard scalars to DIR (needs: pip install 'graphc[tensorboard]')")
    parser.add_argument("--plots", default=None, metavar="DIR",
                        help="write DIR/curves.png and DIR/confusion.png after training (needs matplotlib: "
                             "pip install 'graphc[plots]')")
    parser.add_argument("--export", default=None, metavar="FILE.onnx",
                        help="write the trained model as ONNX after training (needs gc.onnx)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bars (a widget in Jupyter; redrawn every 5 s when piped)")
    parser.add_argument("--allow-nonfinite", action="store_true",
                        help="keep training when the loss or the parameters become NaN/inf (default: stop with "
                             "an error); a non-finite state never overwrites an existing checkpoint")
    parser.add_argument("--sync-bn", action="store_true", help="under mpiexec: batch norm normalises with the "
                        "global batch's statistics (allreduced mean and variance) instead of each rank's")
    return parser


def callbacks_from_args(args) -> list:
    """The callbacks `graphc train`'s options ask for (each checks its file or package now)."""
    from graphc import callbacks as cbs
    out = []
    if getattr(args, "early_stopping", None) is not None:
        out.append(cbs.EarlyStopping(patience=args.early_stopping))
    if getattr(args, "log", None):
        out.append(cbs.CSVLogger(args.log))
    if getattr(args, "tensorboard", None):
        out.append(cbs.TensorBoard(args.tensorboard))
    if getattr(args, "plots", None):
        out.append(cbs.Plots(args.plots))
    return out


def train_from_args(args, model=None) -> TrainResult:
    """train() with the options of a parsed argparse Namespace (see add_train_arguments); attributes it
    lacks take train()'s defaults. model: overrides args.model (the examples' fixed model)."""
    def arg(name, default=None):
        return getattr(args, name, default)
    return train(model if model is not None else args.model, data=arg("data"), epochs=arg("epochs", 1),
                 batch=arg("batch"), optimizer=arg("optimizer"), lr=arg("lr"), backend=arg("backend") or "numba",
                 seed=arg("seed"), save=arg("save"), resume=arg("resume"), progress=arg("progress", True), log=print,
                 allow_nonfinite=arg("allow_nonfinite", False), lr_schedule=arg("lr_schedule"),
                 validation=arg("validation"), augment=arg("augment"), normalization=arg("normalization"),
                 callbacks=callbacks_from_args(args), export=arg("export"), sync_bn=arg("sync_bn", False))


def main_from_args(args) -> int:
    """Runs `graphc train` from a parsed argparse Namespace (see add_train_arguments). Returns the exit
    status: 0 after training, 130 when interrupted with Ctrl-C. graphc errors (GraphError and its
    subclasses: DataError, CheckpointError, ...) propagate for the caller to print."""
    try:
        train_from_args(args)
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
