"""`graphc predict MODEL_OR_CHECKPOINT INPUT...`: the likeliest classes of images, with their probabilities.

    graphc predict run.npz digit.png                 # a checkpoint of graphc train --save (or gc.save)
    graphc predict run.npz a.png b.png photos/       # files, and every image in a folder
    graphc predict run.npz batch.npy --top-k 5       # an .npy of one image or a batch
    graphc predict lenet5 digit.png                  # a zoo model with its initial (untrained) weights

Each image gets one line: its name, then the top-k classes (class names when the training data had
them) with their probabilities. Images are read with Pillow (``pip install 'graphc[images]'``),
converted to the model's channels and size, and preprocessed as recorded at training (gc.load).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from graphc.errors import DataError, GraphError

__all__ = ["add_predict_arguments", "main_from_args", "load_model_for_prediction", "read_inputs", "format_row"]


def add_predict_arguments(p):
    p.add_argument("model", metavar="MODEL_OR_CHECKPOINT",
                   help="a checkpoint (.npz) from graphc train --save or gc.save, or a zoo model / "
                        "path/to/file.py:function (its initial weights)")
    p.add_argument("inputs", metavar="INPUT", nargs="+",
                   help="image files (.png, .jpg, ...), folders of them, or .npy arrays of one image or a batch")
    p.add_argument("--top-k", type=int, default=3, metavar="K", help="classes shown per image (default 3)")
    p.add_argument("--backend", choices=("reference", "numba", "cuda"), default="reference",
                   help="backend to run on (default reference: no compile wait for a few images)")
    p.add_argument("--model", dest="model_spec", default=None, metavar="SPEC",
                   help="rebuild the checkpoint's graph from this zoo name or file.py:function instead of "
                        "the recorded recipe (a model trained from a Graph built in Python)")
    p.add_argument("--batch", type=int, default=256, metavar="N", help="images per run (default 256)")
    return p


def load_model_for_prediction(spec, backend="reference", model=None, say=print):
    """gc.load for a checkpoint path; for a model spec, its graph with initial weights (and a note)."""
    from graphc import artifact, models
    if artifact.is_checkpoint(spec):
        return artifact.load(spec, backend=backend, model=model)
    if str(spec).lower().endswith(".npz"):
        raise GraphError(f"checkpoint {spec} not found")
    import graphc
    graph = models.load(spec)
    say(f"note: {spec} is a model, not a checkpoint: predicting with its initial (untrained) weights")
    exe = graphc.compile(artifact.inference_graph(graph), backend=backend)
    exe.artifact = artifact.Artifact(model=spec, graph=graph)
    return exe


def _image_files(folder: Path):
    from graphc.imagefolder import IMAGE_EXTENSIONS
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                   and not p.name.startswith("."))
    if not files:
        raise DataError(f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def _image_shape(exe):
    """(channels, (H, W)) the model takes: from its recorded preprocessing, else its input "x"."""
    pre = getattr(exe.artifact, "preprocess", None)
    if pre is not None:
        return pre.channels, pre.size
    shape = exe.graph.nx.nodes["x"]["shape"]
    if len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:]):
        raise GraphError(f"the model's input x is shaped {shape}; graphc predict reads images for (N, C, H, W)")
    return shape[1], tuple(shape[2:])


def read_inputs(inputs, exe):
    """(names, images): every INPUT read, images as uint8 arrays sized for the model, or an .npy's array
    rows as they are (the model's preprocessing applies to both)."""
    from graphc.imagefolder import read_image
    channels, size = _image_shape(exe)
    names, images = [], []
    for inp in inputs:
        path = Path(os.path.expanduser(inp))
        if path.is_dir():
            files = _image_files(path)
        elif path.is_file():
            files = [path]
        else:
            raise DataError(f"{inp}: no such file or folder")
        for f in files:
            if f.suffix.lower() == ".npy":
                arr = _read_npy(f)
                one = arr.ndim == 2 or (arr.ndim == 3 and tuple(arr.shape) in ((channels, *size), (*size, channels)))
                rows = [arr] if one else list(arr)
                names += [str(f)] if one else [f"{f}[{i}]" for i in range(len(rows))]
                images += rows
            else:
                names.append(str(f))
                img = read_image(f, channels=channels, size=size)
                images.append(img.transpose(2, 0, 1) if img.ndim == 3 else img)
    return names, images


def _read_npy(path):
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npy array ({type(e).__name__}: {e})") from None


def format_row(name, classes, probs, class_name) -> str:
    return f"{name}: " + ", ".join(f"{class_name(int(c))} ({p:.2%})" for c, p in zip(classes, probs))


def main_from_args(args) -> int:
    from graphc.infer import predict, topk
    if args.top_k < 1 or args.batch < 1:
        raise GraphError(f"--top-k and --batch must be at least 1, got {args.top_k} and {args.batch}")
    exe = load_model_for_prediction(args.model, backend=args.backend, model=args.model_spec)
    names, images = read_inputs(args.inputs, exe)
    groups = {}                              # same-shaped images are predicted together
    for i, img in enumerate(images):
        groups.setdefault((np.asarray(img).shape, np.asarray(img).dtype.str), []).append(i)
    rows = [None] * len(images)
    for idx in groups.values():
        _, probs = predict(exe, np.stack([np.asarray(images[i]) for i in idx]), batch=args.batch)
        top, p = topk(probs, args.top_k)
        for j, i in enumerate(idx):
            rows[i] = format_row(names[i], top[j], p[j], exe.artifact.class_name)
    for row in rows:
        print(row)
    return 0
