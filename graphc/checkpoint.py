"""Checkpoints: every parameter and optimizer state of an executable in one ``.npz``, plus metadata.

    save_checkpoint("run.npz", exe, {"model": "lenet5", "epoch": 3, ...})
    meta = load_checkpoint("run.npz", exe)          # shape-checked; raises CheckpointError on mismatch

File layout (version 2): the i-th state value (parameter or optimizer state, in the order of the
metadata's ``state_names``) under the key ``"state/<i>"``, the step counter under ``"__step__"`` and the
metadata as a JSON string under ``"__meta__"`` (``format``, ``version``, ``state_names``, and whatever
the caller put in: model name, epoch, step, seed, optimizer config, data spec, graph fingerprint...).
The names live only in the JSON, so any parameter name round-trips (``file``, ``allow_pickle``, names
with dots, slashes or NUL characters). Version 1 files (one array per name) are still read. Loads with
``allow_pickle=False``: a checkpoint never runs code; a file that is not a checkpoint, or whose
metadata or step counter is malformed, is a CheckpointError.

Writes are atomic (graphc.files.atomic_write): a temporary file in the same directory, flushed and
fsync'ed, then ``os.replace``-d over the destination. An interrupted or failed write leaves the
previous checkpoint (or nothing) in place, never a half-written file; a failed write (read-only file
system, full disk) is one OutputError line. Temp files of a writer killed outright are removed by the
next save or load of the same path.
"""
from __future__ import annotations

import hashlib
import json
import numbers
import zipfile
from pathlib import Path

import numpy as np

from graphc.errors import CheckpointError
from graphc.files import atomic_write, clean_stale_temps

__all__ = ["save_checkpoint", "write_arrays", "load_checkpoint", "read_checkpoint", "graph_fingerprint",
           "is_training_state", "FORMAT", "VERSION"]

FORMAT = "graphc-checkpoint"
VERSION = 2
META_KEY = "__meta__"
STEP_KEY = "__step__"


def graph_fingerprint(graph) -> str:
    """A short structural hash of a (forward) graph: every node's name, op, shape, dtype, inputs and
    attributes (constant values excluded), in a deterministic order. Two graphs built by the same
    code with the same hyper-parameters have the same fingerprint whatever their weights or seed."""
    nodes = graph.nx.nodes
    rows = []
    for n in graph.topo():
        d = nodes[n]
        if d.get("role", "forward") != "forward" or n.startswith("optim/"):
            continue
        attrs = {k: v for k, v in d["attrs"].items() if k not in ("value", "seed", "init")}
        rows.append([n, d["op"], list(d["shape"]), d["dtype"], list(d["inputs"]), attrs])
    text = json.dumps(rows, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _write_npz(fileobj, arrays: dict) -> None:
    """Writes the arrays as an uncompressed .npz into an open binary file (a seam for tests)."""
    np.savez(fileobj, **arrays)


def save_checkpoint(path, exe, meta=None) -> Path:
    """Writes ``exe.state_dict()`` (every parameter, optimizer state and the step counter) and ``meta``
    (a JSON-serialisable dict) to ``path`` atomically. Returns the path written."""
    return write_arrays(path, exe.state_dict(), meta, dtype=str(getattr(exe, "dtype", "")))


def write_arrays(path, state, meta=None, dtype="") -> Path:
    """Writes a checkpoint from arrays by name (a state dict: values plus the step counter under
    ``"__step__"``) and metadata, atomically. save_checkpoint's core."""
    path = Path(path)
    meta = dict(meta or {})
    state = dict(state)
    step = int(state.pop(STEP_KEY, 0))
    names = sorted(state)
    meta.setdefault("step", step)
    meta.update(format=FORMAT, version=VERSION, state_names=names, dtype=dtype)
    try:
        meta_text = json.dumps(meta, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint metadata must be JSON-serialisable: {e}") from None
    arrays = {f"state/{i}": np.asarray(state[n]) for i, n in enumerate(names)}
    arrays[STEP_KEY] = np.array(step)
    arrays[META_KEY] = np.array(meta_text)
    return atomic_write(path, lambda f: _write_npz(f, arrays), "checkpoint")


def read_checkpoint(path) -> tuple[dict, dict]:
    """Reads a checkpoint file into (arrays by name, metadata); CheckpointError if it is not one."""
    path = Path(path)
    clean_stale_temps(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise CheckpointError(f"{path}: not a graphc checkpoint (a single .npy array, not an .npz archive)")
        with z:
            arrays = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError, MemoryError, NotImplementedError,
            zipfile.LargeZipFile, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable graphc checkpoint (corrupt or truncated file: "
                              f"{type(e).__name__}: {e})") from None
    if META_KEY not in arrays:
        raise CheckpointError(f"{path}: not a graphc checkpoint (no {META_KEY!r} entry)")
    try:
        meta = json.loads(str(arrays.pop(META_KEY)))
    except (ValueError, TypeError, RecursionError) as e:
        raise CheckpointError(f"{path}: corrupt checkpoint metadata ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a graphc checkpoint (format {meta.get('format') if isinstance(meta, dict) else meta!r})")
    version = meta.get("version", 0)
    if not _is_int(version) or version < 1:
        raise CheckpointError(f"{path}: corrupt checkpoint metadata (version {version!r})")
    if version > VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {meta['version']} is newer than this graphc "
                              f"reads ({VERSION}); upgrade graphc")
    names = meta.get("state_names")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise CheckpointError(f"{path}: corrupt checkpoint metadata (state_names is not a list of names)")
    if version >= 2:
        if names is None:
            raise CheckpointError(f"{path}: corrupt checkpoint metadata (no state_names)")
        keys = [f"state/{i}" for i in range(len(names))]
        missing = [n for n, k in zip(names, keys) if k not in arrays]
        stray = sorted(set(arrays) - set(keys) - {STEP_KEY})
        if missing or stray or len(set(names)) != len(names):
            raise CheckpointError(f"{path}: corrupt checkpoint, its index lists {len(names)} values "
                                  + (f"but the file lacks {missing[:5]}" if missing else
                                     f"and the file also holds {stray[:3]}" if stray else "with repeated names"))
        arrays = {**{n: arrays[k] for n, k in zip(names, keys)},
                  **({STEP_KEY: arrays[STEP_KEY]} if STEP_KEY in arrays else {})}
    elif names is not None:
        missing = [n for n in names if n not in arrays]
        if missing:
            raise CheckpointError(f"{path}: corrupt checkpoint, its index lists {missing[:5]} but the file "
                                  "does not hold them")
    step = arrays.get(STEP_KEY, np.array(0))
    if step.shape != () or step.dtype.kind not in "iu" or int(step) < 0:
        raise CheckpointError(f"{path}: corrupt checkpoint, the step counter {STEP_KEY!r} must be one integer "
                              f">= 0, got a {step.dtype} array of shape {step.shape}")
    return arrays, meta


def is_training_state(name) -> bool:
    """State only a training step uses (optimizer and schedule state, "optim/..."): an inference
    executable loads a training checkpoint without it; parameters and batch-norm statistics stay."""
    return name.startswith("optim/")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _describe(meta) -> str:
    parts = []
    if meta.get("model"):
        parts.append(f"model {meta['model']!r}")
    opt = meta.get("optimizer")
    if isinstance(opt, dict) and opt.get("name"):
        parts.append(f"optimizer {opt['name']!r}")
    return " with ".join(parts) if parts else "another graph"


def load_checkpoint(path, exe, fingerprint=None, model=None) -> dict:
    """Loads a checkpoint into ``exe`` (parameters, optimizer state, step counter) and returns its metadata.
    An executable without optimizer state (inference) takes a training checkpoint's parameters and
    batch-norm statistics and leaves its optimizer state out.

    Checked before anything is changed, each failure a CheckpointError naming the problem: a file that
    is missing, corrupt or not a checkpoint; a ``fingerprint`` (see ``graph_fingerprint``) or ``model``
    name other than the one recorded; values the graph has and the file lacks (or the reverse, e.g.
    optimizer state of another optimizer); arrays of the wrong shape."""
    path = Path(path)
    arrays, meta = read_checkpoint(path)
    if model is not None and meta.get("model") is not None and meta["model"] != model:
        raise CheckpointError(f"{path}: checkpoint was written for model {meta['model']!r}, not {model!r}")
    if fingerprint is not None and meta.get("fingerprint") is not None and meta["fingerprint"] != fingerprint:
        raise CheckpointError(f"{path}: checkpoint was written for a different graph structure "
                              f"({_describe(meta)}, fingerprint {meta['fingerprint']}; this graph's is "
                              f"{fingerprint}): same model name but other layers or sizes?")
    state = exe.state
    if not any(is_training_state(n) for n in state):      # an inference executable: drop the optimizer's
        arrays = {n: a for n, a in arrays.items() if not is_training_state(n)}
    missing = [n for n in state if n not in arrays]
    extra = [n for n in arrays if n not in state and n != STEP_KEY]
    if missing or extra:
        lines = [f"{path}: checkpoint ({_describe(meta)}) does not match this executable"]
        if missing:
            lines.append(f"  missing from the checkpoint: {', '.join(missing[:8])}"
                         + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""))
        if extra:
            lines.append(f"  in the checkpoint but not in the graph: {', '.join(extra[:8])}"
                         + (f" (+{len(extra) - 8} more)" if len(extra) > 8 else ""))
        if "optim/sched/step" in missing + extra:
            lines.append("  (the learning-rate schedule differs: resume with the checkpoint's --lr-schedule, or none "
                         "if it had none)")
        elif any(n.startswith("optim/") for n in missing + extra):
            lines.append("  (optimizer state differs: resume with the optimizer the checkpoint was trained with)")
        raise CheckpointError("\n".join(lines))
    wrong = [(n, tuple(arrays[n].shape), tuple(np.shape(state[n]))) for n in state
             if tuple(arrays[n].shape) != tuple(np.shape(state[n]))]
    if wrong:
        raise CheckpointError(f"{path}: checkpoint ({_describe(meta)}) has arrays of the wrong shape: "
                              + "; ".join(f"{n}: checkpoint {a}, graph {b}" for n, a, b in wrong[:8]))
    bad = [n for n in state if arrays[n].dtype.kind not in "fiub"]
    if bad:
        raise CheckpointError(f"{path}: checkpoint arrays {bad[:5]} are not numeric")
    exe.load_state_dict(arrays)
    return meta
