"""Preprocessing: how images become the float NCHW tensors a model takes, fitted on the training split
and stored with the model, so a prediction sees exactly what training saw.

    pre = Preprocess.fit(ds.x_train, mode="standardize")    # per-channel mean/std of the training split
    x = pre(ds.x_test)          # any batch or one image: (H, W), (C, H, W), (H, W, C), (N, ...) -> (N, C, H, W)
    meta = pre.to_meta(); Preprocess.from_meta(meta)        # recorded in checkpoints (JSON)

Two steps: integer pixels are scaled to [0, 1] (x / 255; floats are taken as already scaled: pixels
in [0, 1] for a model trained on integer pixels, the training data's own range otherwise), then
``mode="standardize"`` subtracts each channel's mean and divides by its standard deviation, both
measured on the training split after scaling; ``mode="scale"`` stops after the first step (the MNIST
loaders' default: the figures in the README were measured with pixel / 255).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphc.errors import DataError

__all__ = ["Preprocess", "MODES", "to_nchw", "Splits", "prepare_splits"]

MODES = ("scale", "standardize")
_CHANNELS = (1, 3, 4)          # a trailing axis of this size is read as channels: (H, W, C) images


def _is_int(a):
    return a.dtype.kind in "iub"


def to_nchw(a, what="images", channels=None, layout="auto") -> np.ndarray:
    """A batch (N, H, W), (N, C, H, W) or (N, H, W, C) as (N, C, H, W), without copying when possible.
    layout "NCHW" or "NHWC" says which; "auto" tells them apart by the square image (H == W) when only
    one reading has one, else by a channel axis of 1, 3 or 4 (or `channels`), else NCHW."""
    a = np.asarray(a)
    if a.ndim == 3:
        return a[:, None]
    if a.ndim != 4:
        raise DataError(f"{what} shaped {a.shape}: expected (N, H, W), (N, C, H, W) or (N, H, W, C)")
    if layout not in ("auto", "NCHW", "NHWC"):
        raise DataError(f"layout must be auto, NCHW or NHWC, got {layout!r}")
    if layout != "auto":
        return a if layout == "NCHW" else a.transpose(0, 3, 1, 2)
    if channels is not None:
        if a.shape[1] == channels:
            return a
        if a.shape[-1] == channels:
            return a.transpose(0, 3, 1, 2)
        raise DataError(f"{what} shaped {a.shape} have no axis of {channels} channels")
    square_chw, square_hwc = a.shape[2] == a.shape[3], a.shape[1] == a.shape[2]
    if square_hwc != square_chw:
        return a.transpose(0, 3, 1, 2) if square_hwc else a
    if not square_chw and a.shape[1] not in _CHANNELS and a.shape[-1] in _CHANNELS:
        return a.transpose(0, 3, 1, 2)
    return a


def _check_values(a, what):
    if a.dtype.kind not in "fiub":
        raise DataError(f"{what} must be numbers (uint8 pixels or floats), got dtype {a.dtype}")
    if a.dtype.kind == "f" and a.size and not np.isfinite(a).all():
        raise DataError(f"{what} hold {int((~np.isfinite(a)).sum())} NaN or inf values")
    if _is_int(a) and a.size and (a.min() < 0 or a.max() > 255):
        raise DataError(f"{what}: integer pixels must lie in 0..255 (got {a.min()}..{a.max()}); "
                        "give floats for other ranges")


@dataclass(frozen=True)
class Preprocess:
    """Integer pixels * scale, then (x - mean[c]) / std[c] per channel; images shaped (channels, *size)."""
    channels: int
    size: tuple                  # (H, W)
    scale: float                 # 1/255 for integer pixels, 1.0 for floats
    mean: tuple                  # per channel (zeros for mode "scale")
    std: tuple                   # per channel (ones for mode "scale")
    mode: str = "scale"

    @classmethod
    def fit(cls, x_train, mode="scale"):
        """The preprocessing of a training split: its scale from the dtype, mean/std measured on it."""
        if mode not in MODES:
            raise DataError(f"unknown normalization {mode!r}; choose one of {', '.join(MODES)}")
        a = to_nchw(x_train, "training images")
        _check_values(a, "training images")
        scale = 1.0 / 255.0 if _is_int(a) else 1.0
        c = a.shape[1]
        if mode == "scale" or not a.size:
            mean, std = (0.0,) * c, (1.0,) * c
        else:
            mean, std = _channel_stats(a, scale)
        return cls(int(c), tuple(int(s) for s in a.shape[2:]), scale, mean, std, mode)

    def __call__(self, images, dtype=np.float32) -> np.ndarray:
        """One image or a batch -> float (N, C, H, W), normalised as at training."""
        a, dtype = np.asarray(images), np.dtype(dtype)
        if a.ndim == 2 or (a.ndim == 3 and self._one_image(a)):
            a = a[None]                        # one image: (H, W), (C, H, W) or (H, W, C)
        try:
            a = to_nchw(a, "images", self.channels if a.ndim == 4 else None)
        except DataError as e:
            raise DataError(f"{e}; the model was trained on {(self.channels, *self.size)} (C, H, W) images") from None
        _check_values(a, "images")
        if tuple(a.shape[1:]) != (self.channels, *self.size):
            raise DataError(f"images shaped {tuple(a.shape[1:])} (C, H, W); the model was trained on "
                            f"{(self.channels, *self.size)}")
        out = a.astype(dtype) * dtype.type(self.scale) if _is_int(a) else a.astype(dtype)
        if self.mode == "standardize":
            out = (out - np.asarray(self.mean, dtype)[:, None, None]) / np.asarray(self.std, dtype)[:, None, None]
        return np.ascontiguousarray(out, dtype=dtype)

    def _one_image(self, a):
        """A 3-D array is one image when it has this preprocessing's image shape, channels first or last."""
        return tuple(a.shape) in ((self.channels, *self.size), (*self.size, self.channels))

    def to_meta(self) -> dict:
        return {"channels": self.channels, "size": list(self.size), "scale": self.scale, "mean": list(self.mean),
                "std": list(self.std), "mode": self.mode}

    @classmethod
    def from_meta(cls, m):
        try:
            return cls(int(m["channels"]), tuple(int(s) for s in m["size"]), float(m["scale"]),
                       tuple(float(v) for v in m["mean"]), tuple(float(v) for v in m["std"]), str(m["mode"]))
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"corrupt preprocessing record {m!r} ({type(e).__name__}: {e})") from None


def _channel_stats(a, scale, chunk=4096):
    """Per-channel mean and standard deviation of a batch (after scaling), in float64, chunk by chunk."""
    c = a.shape[1]
    n = 0
    s1, s2 = np.zeros(c), np.zeros(c)
    for i in range(0, len(a), chunk):
        b = a[i:i + chunk].astype(np.float64) * scale
        s1 += b.sum(axis=(0, 2, 3))
        s2 += (b * b).sum(axis=(0, 2, 3))
        n += b.shape[0] * b.shape[2] * b.shape[3]
    mean = s1 / n
    std = np.sqrt(np.maximum(s2 / n - mean * mean, 0.0))
    std = np.where(std > 1e-8, std, 1.0)        # a constant channel is only shifted
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


@dataclass
class Splits:
    """The preprocessed splits a run trains, validates and tests on, and the preprocessing used."""
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray | None
    y_val: np.ndarray | None
    x_test: np.ndarray
    y_test: np.ndarray
    preprocess: object


def prepare_splits(ds, normalization, validation, seed, recorded=None) -> Splits:
    """Holds `validation` (a fraction) out of the training split, seeded and stratified, and preprocesses
    every split as graphc.preprocess fits it on what is left for training (or as `recorded`, a resumed
    checkpoint's preprocessing)."""
    from graphc.data import _fraction_split
    xtr, ytr = ds.x_train, np.asarray(ds.y_train, dtype=np.int64)
    xval = yval = None
    if validation:
        if not (isinstance(validation, (int, float)) and 0 < validation < 1):
            raise DataError(f"validation must be a fraction in (0, 1), got {validation!r}")
        tr, va = _fraction_split(ytr, validation, seed)
        xtr, ytr, xval, yval = xtr[tr], ytr[tr], xtr[va], ytr[va]
    pre = recorded or Preprocess.fit(xtr, normalization or ds.normalization)
    return Splits(pre(xtr), ytr, None if xval is None else pre(xval), yval, pre(ds.x_test),
                   np.asarray(ds.y_test, dtype=np.int64), pre)
