"""Image files: a folder of images, one subfolder per class (torchvision's ImageFolder layout), read
into a Dataset; single images read for prediction. Needs Pillow (``pip install 'graphc[images]'``).

    DIR/cat/001.png  DIR/cat/002.jpg  DIR/dog/001.png ...        -> classes ("cat", "dog"), a seeded
                                                                   stratified 80/20 train/test split
    DIR/train/cat/...  DIR/test/cat/...  (or DIR/val/...)        -> the split as given

Class ids follow the sorted subfolder names. Images are read greyscale when every one is greyscale,
else RGB (an alpha channel is dropped); images of other sizes than the most common one are resized
to it (bilinear), with a note of how many were.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np

from graphc.errors import DataError

__all__ = ["load_image_folder", "read_image", "read_images", "IMAGE_EXTENSIONS", "pillow"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
_TEST_DIRS = ("test", "val", "valid", "validation")


def pillow(what="reading images"):
    """PIL.Image, or a DataError saying how to install Pillow."""
    try:
        from PIL import Image
    except ImportError:
        raise DataError(f"{what} needs Pillow, which is not installed; install it with: "
                        "pip install 'graphc[images]' (or pip install pillow)") from None
    return Image


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def _class_files(root: Path) -> dict:
    """{class name: [image paths]} of a folder with one subfolder per class."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files = {c: sorted(p for p in (root / c).rglob("*") if _is_image(p)) for c in classes}
    files = {c: f for c, f in files.items() if f}
    if not files:
        raise DataError(f"{root}: no class subfolders with images ({', '.join(IMAGE_EXTENSIONS)}); lay the folder "
                        "out as DIR/<class name>/<image files>, one subfolder per class")
    return files


def _open(Image, path, mode=None):
    try:
        with Image.open(path) as im:
            im.load()
            if mode is None:
                return im.copy()
            return im.convert(mode) if im.mode != mode else im.copy()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


def _mode_of(im) -> str:
    return "L" if im.mode in ("1", "L", "LA", "I", "I;16", "F") or (im.mode == "P" and _palette_grey(im)) else "RGB"


def _palette_grey(im) -> bool:
    rgb = im.convert("RGB")
    a = np.asarray(rgb)
    return bool((a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all())


def read_images(paths, mode=None, size=None, log=None) -> np.ndarray:
    """uint8 images (N, H, W) (mode "L") or (N, H, W, 3) ("RGB"): mode None picks L when every image is
    greyscale; size (W, H) None picks the most common size; others are resized (bilinear)."""
    Image = pillow()
    ims = [_open(Image, p) for p in paths]
    if mode is None:
        mode = "L" if all(_mode_of(im) == "L" for im in ims) else "RGB"
    if size is None:
        size = Counter(im.size for im in ims).most_common(1)[0][0]
    resized = 0
    out = []
    for p, im in zip(paths, ims):
        im = im.convert(mode) if im.mode != mode else im
        if im.size != tuple(size):
            im = im.resize(tuple(size), Image.BILINEAR)
            resized += 1
        out.append(np.asarray(im, dtype=np.uint8))
    if resized and log:
        log(f"note: {resized} of {len(ims)} images resized to {size[0]}x{size[1]}")
    return np.stack(out) if out else np.zeros((0, size[1], size[0]), np.uint8)


def read_image(path, channels=None, size=None) -> np.ndarray:
    """One image file as uint8 (H, W) for channels 1, (H, W, 3) for 3; size (H, W) resizes it."""
    mode = None if channels is None else ("L" if channels == 1 else "RGB")
    wh = None if size is None else (int(size[1]), int(size[0]))
    return read_images([Path(path)], mode=mode, size=wh)[0]


def load_image_folder(directory, test_fraction=0.2, seed=0, log=print):
    """A Dataset from DIR/<class>/<images> (split test_fraction, seeded and stratified) or from
    DIR/train/<class>/... with DIR/test/<class>/... (or val/)."""
    from graphc.data import Dataset, _fraction_split
    root = Path(os.path.expanduser(str(directory)))
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found")
    pillow(f"images:{directory}")
    test_dir = next((root / d for d in _TEST_DIRS if (root / d).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        train_files, test_files = _class_files(root / "train"), _class_files(test_dir)
        unknown = sorted(set(test_files) - set(train_files))
        if unknown:
            raise DataError(f"{test_dir}: classes {unknown} have no training images in {root / 'train'}")
    else:
        train_files, test_files = _class_files(root), None
    classes = sorted(train_files)
    ids = {c: i for i, c in enumerate(classes)}
    paths = [p for c in classes for p in train_files[c]]
    labels = np.array([ids[c] for c in classes for _ in train_files[c]], dtype=np.int64)
    if test_files is not None:
        tpaths = [p for c in sorted(test_files) for p in test_files[c]]
        tlabels = np.array([ids[c] for c in sorted(test_files) for _ in test_files[c]], dtype=np.int64)
    else:
        if any(len(f) < 2 for f in train_files.values()):
            few = [c for c, f in train_files.items() if len(f) < 2]
            raise DataError(f"{root}: classes {few} have fewer than 2 images; a train/test split needs 2 per class")
        tr, te = _fraction_split(labels, test_fraction, seed)
        tpaths, tlabels = [paths[i] for i in te], labels[te]
        paths, labels = [paths[i] for i in tr], labels[tr]
    x = read_images(paths, log=log)
    mode = "L" if x.ndim == 3 else "RGB"
    xt = read_images(tpaths, mode=mode, size=(x.shape[2], x.shape[1]), log=log)
    if mode == "RGB":                                     # (N, H, W, 3) -> (N, 3, H, W)
        x, xt = x.transpose(0, 3, 1, 2), xt.transpose(0, 3, 1, 2)
    return Dataset.from_arrays(x, labels, xt, tlabels, classes=classes, name=f"images:{directory}",
                               normalization="standardize")
