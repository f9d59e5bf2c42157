"""Save and load trained models: ``gc.save`` and ``gc.load``.

    result = gc.train.train("lenet5", epochs=1, save="run.npz")   # a training checkpoint...
    exe = gc.load("run.npz")                  # ...is also an inference model: a ready executable
    exe.run({"x": images})                    # {"logits": (N, K), "probs": (N, K)}; no labels needed
    gc.infer.predict(exe, image)              # one image or a batch, preprocessed as at training
    gc.save("model.npz", result)              # parameters only (no optimizer state): a smaller file

A checkpoint written by ``graphc train --save`` (or ``gc.save``) records what is needed to rebuild the
graph without the training code: the model's recipe (a zoo name, or ``path/to/file.py:function``, with
the keyword arguments it was built with: ``in_channels``, ``image_size``, ``num_classes``, ``seed``),
the graph's fingerprint (checked on load), the preprocessing fitted on the training split
(graphc.preprocess) and the class names. ``gc.load`` rebuilds the graph, keeps its forward part with
the outputs ``logits`` and ``probs`` (softmax), compiles it and loads the parameters and batch-norm
running statistics; a training checkpoint's optimizer state is left out. A graph built in Python
(``train(graph)``) has no recipe: pass it, ``gc.load(path, model=graph)``.

The loaded executable's ``artifact`` (an Artifact) holds the recipe, preprocessing, class names, the
checkpoint's metadata and ``graph``: the inference graph with the trained parameters as its values.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from graphc.checkpoint import graph_fingerprint, is_training_state, load_checkpoint, read_checkpoint, write_arrays
from graphc.errors import CheckpointError, GraphError

__all__ = ["Artifact", "save", "load", "trained_graph", "recipe", "inference_graph", "export_onnx", "onnx_exporter",
           "is_checkpoint"]

#: the outputs of an inference graph built by load()
LOGITS, PROBS = "logits", "probs"


@dataclass
class Artifact:
    """What gc.load knows about a model beyond its executable."""
    model: str | None = None               # zoo name or /abs/path/file.py:function (None: built in Python)
    kwargs: dict = field(default_factory=dict)
    preprocess: object = None              # a graphc.preprocess.Preprocess, or None (images fed as they are)
    classes: tuple | None = None           # class names by id, or None
    fingerprint: str | None = None
    meta: dict = field(default_factory=dict)
    path: Path | None = None
    graph: object = None                   # the inference graph, its params set to the trained values

    def class_name(self, k: int) -> str:
        return self.classes[k] if self.classes and 0 <= k < len(self.classes) else str(k)

    def to_meta(self) -> dict:
        return {"recipe": {"model": self.model, "kwargs": dict(self.kwargs)},
                "preprocess": self.preprocess.to_meta() if self.preprocess is not None else None,
                "classes": list(self.classes) if self.classes else None}


def recipe(spec, kwargs) -> dict:
    """The recipe recorded for a model spec: a zoo name as is, a file path made absolute."""
    if isinstance(spec, str) and ":" in spec and not spec.startswith(("/", "\\")) and not os.path.exists(spec):
        path, fn = spec.rsplit(":", 1)
        spec = f"{os.path.abspath(path)}:{fn}"
    return {"model": spec, "kwargs": {k: v for k, v in kwargs.items() if isinstance(v, (int, float, str, bool))}}


def inference_graph(graph, params=None):
    """The forward graph with outputs "logits" and "probs" (softmax of the logits); params (name ->
    array) replace the initial values."""
    if LOGITS not in graph:
        raise GraphError(f"graph {graph.name!r} has no value {LOGITS!r} (the class scores); an inference model "
                         "reads its predictions there")
    g = graph.clone()
    g.outputs = [LOGITS]
    g.loss = None
    if PROBS not in g:
        g.softmax(g[LOGITS], name=PROBS)
    g.outputs.append(PROBS)
    for name, value in (params or {}).items():
        if name in g.params:
            g.params[name] = np.array(value, dtype=g.nx.nodes[name]["dtype"])
    return g


def is_checkpoint(path) -> bool:
    """Whether `path` names an existing .npz file (the CLI's MODEL_OR_CHECKPOINT test)."""
    return isinstance(path, (str, os.PathLike)) and str(path).lower().endswith(".npz") and os.path.isfile(path)


def _artifact_of(meta, path) -> Artifact:
    from graphc.preprocess import Preprocess
    rec = meta.get("recipe")
    if isinstance(rec, dict):
        model, kwargs = rec.get("model"), rec.get("kwargs") or {}
    else:                                   # older checkpoints name the zoo model only
        model, kwargs = meta.get("model"), {}
    if not isinstance(kwargs, dict) or (model is not None and not isinstance(model, str)):
        raise CheckpointError(f"{path}: corrupt checkpoint metadata (recipe {rec!r})")
    pre = meta.get("preprocess")
    try:
        pre = Preprocess.from_meta(pre) if isinstance(pre, dict) else None
    except GraphError as e:
        raise CheckpointError(f"{path}: {e}") from None
    classes = meta.get("classes")
    classes = tuple(str(c) for c in classes) if isinstance(classes, list) else None
    return Artifact(model, dict(kwargs), pre, classes, meta.get("fingerprint"), meta, Path(path))


def _rebuild(art, path, model):
    from graphc import models
    from graphc.graph import Graph
    if isinstance(model, Graph):
        return model
    spec = model if isinstance(model, str) else art.model
    if spec is None or (spec not in models.ZOO and ":" not in spec):
        raise CheckpointError(f"{path}: the checkpoint names no model graphc can rebuild ({spec!r}: the graph was "
                              "built in Python); pass it: gc.load(path, model=graph) or --model FILE.py:function")
    try:
        return models.load(spec, **(art.kwargs if spec == art.model else {}))
    except GraphError as e:
        raise CheckpointError(f"{path}: cannot rebuild the model {spec!r}: {e}") from None


def _checked_graph(path, art, model):
    graph = _rebuild(art, path, model)
    fingerprint = graph_fingerprint(graph)
    if art.fingerprint not in (None, fingerprint):
        raise CheckpointError(f"{path}: the checkpoint was written for another graph than {graph.name!r} "
                              f"(fingerprint {art.fingerprint}, the rebuilt graph's is {fingerprint}): was the model "
                              "file or its arguments changed?")
    return graph


def trained_graph(path, model=None):
    """(graph, Artifact): the model's whole graph (loss included) rebuilt from the checkpoint at `path`,
    its parameters and batch-norm statistics set to the trained values (for gc.render --checkpoint)."""
    path = Path(os.path.expanduser(os.fspath(path)))
    arrays, meta = read_checkpoint(path)
    art = _artifact_of(meta, path)
    graph = _checked_graph(path, art, model).clone()
    missing = [n for n in graph.state_names if n not in arrays]
    if missing:
        raise CheckpointError(f"{path}: the checkpoint lacks {missing[:5]} of graph {graph.name!r}")
    for n in graph.state_names:
        if tuple(arrays[n].shape) != tuple(graph.nx.nodes[n]["shape"]):
            raise CheckpointError(f"{path}: {n} is {arrays[n].shape} in the checkpoint, "
                                  f"{graph.nx.nodes[n]['shape']} in the graph")
        graph.params[n] = np.array(arrays[n], dtype=graph.nx.nodes[n]["dtype"])
    return graph, art


def load(path, backend="reference", model=None, dtype=None):
    """A ready inference executable of the model saved at `path` (a training checkpoint or gc.save's
    file): outputs "logits" and "probs", parameters and batch-norm statistics loaded, no labels needed.
    model: a Graph (or a model spec) to use instead of the recorded recipe. exe.artifact: see Artifact."""
    import graphc
    path = Path(os.path.expanduser(os.fspath(path)))
    _, meta = read_checkpoint(path)
    art = _artifact_of(meta, path)
    graph = _checked_graph(path, art, model)
    exe = graphc.compile(inference_graph(graph), backend=backend, dtype=dtype)
    load_checkpoint(path, exe)
    art.graph = inference_graph(graph, {n: exe.state[n] for n in exe.state})
    exe.artifact = art
    return exe


def save(path, model, preprocess=None, classes=None) -> Path:
    """Writes the inference model of `model` (a TrainResult, or an executable; gc.load's or any with
    "logits") to `path` atomically: parameters and batch-norm statistics, no optimizer state, and the
    recipe, preprocessing and class names (taken from the TrainResult or exe.artifact unless given)."""
    exe, art = _source(model)
    if preprocess is not None:
        art.preprocess = preprocess
    if classes is not None:
        art.classes = tuple(str(c) for c in classes)
    state = {n: np.asarray(v) for n, v in exe.state.items() if not is_training_state(n)}
    meta = {**art.meta, **art.to_meta(), "kind": "model", "model": art.model, "fingerprint": art.fingerprint}
    for k in ("state_names", "format", "version", "partial", "batch_in_epoch"):
        meta.pop(k, None)
    return write_arrays(path, {**state, "__step__": np.array(exe.step_count)}, meta, dtype=str(exe.dtype))


def _source(model):
    from graphc.executable import Executable
    if hasattr(model, "exe") and hasattr(model, "config"):          # a TrainResult
        art = getattr(model, "artifact", None) or Artifact()
        return model.exe, Artifact(**{**vars(art)})
    if isinstance(model, Executable):
        art = model.artifact or Artifact(model=None)
        return model, Artifact(**{**vars(art)})
    raise GraphError(f"gc.save takes a TrainResult or an executable, got {type(model).__name__}")


def onnx_exporter(what="ONNX export"):
    """gc.onnx.save, or a GraphError saying why it is not there (the `onnx` package missing: `graphc train
    --export` checks this before training)."""
    import importlib.util
    if importlib.util.find_spec("onnx") is None:
        raise GraphError(f"{what} needs gc.onnx.save: pip install -e \".[onnx]\" (onnx, onnxruntime); "
                         "the checkpoint (--save, gc.save) holds the trained model for gc.load and graphc predict")
    from graphc import onnx as gonnx
    return gonnx.save


def export_onnx(model, path):
    """`graphc train --export FILE.onnx`: writes the trained inference graph (the
    parameters as its values) through gc.onnx.save. model: gc.load's executable or a TrainResult."""
    exe, art = _source(model)
    save_onnx = onnx_exporter()
    if art.graph is None:
        raise GraphError("export_onnx needs the model's graph: give gc.load's executable or a TrainResult")
    return save_onnx(art.graph, path)
