"""Simple augmentation of training batches (float NCHW, after preprocessing): random crops of the
image padded with zeros, and random horizontal flips, as torchvision's RandomCrop(size, padding) and
RandomHorizontalFlip. Meant for RGB photos; a flipped digit is another glyph, so MNIST runs use none.

    aug = Augment.parse("crop:4,flip")        # what --augment reads ("crop" pads 4, "flip")
    xb = aug(xb, seed=0, epoch=3, batch=17)   # the same (seed, epoch, batch) always gives the same batch

Each batch's randomness comes from (seed, epoch, batch index), so a run resumed mid-epoch sees the
batches an uninterrupted run would have seen.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphc.errors import GraphError

__all__ = ["Augment"]


@dataclass(frozen=True)
class Augment:
    crop_pad: int = 0            # pad each side by this many pixels, then crop back to the image size
    flip: bool = False           # mirror left-right with probability 1/2

    @classmethod
    def parse(cls, spec):
        """"crop[:PAD]" and/or "flip", comma-separated; None, "" or "none": no augmentation (returns None)."""
        if spec is None or isinstance(spec, cls):
            return spec
        if not isinstance(spec, str):
            raise GraphError(f"--augment must be text like 'crop:4,flip', got {type(spec).__name__}")
        pad, flip = 0, False
        for part in (p.strip() for p in spec.split(",") if p.strip()):
            name, _, arg = part.partition(":")
            if name == "none" and not arg:
                continue
            if name == "flip" and not arg:
                flip = True
            elif name == "crop" and (not arg or arg.isdigit()):
                pad = int(arg) if arg else 4
                if pad < 1:
                    raise GraphError(f"--augment {spec!r}: the crop padding must be at least 1 pixel")
            else:
                raise GraphError(f"unknown --augment {part!r} in {spec!r}; use crop[:PAD] and/or flip, "
                                 "e.g. --augment crop:4,flip")
        return cls(pad, flip) if (pad or flip) else None

    def spec(self) -> str:
        return ",".join(([f"crop:{self.crop_pad}"] if self.crop_pad else []) + (["flip"] if self.flip else []))

    def __call__(self, x, seed=0, epoch=0, batch=0):
        """An augmented copy of the batch x (N, C, H, W)."""
        rng = np.random.default_rng([int(seed), int(epoch), int(batch), 0xA06])
        n, _, h, w = x.shape
        out = x
        if self.crop_pad:
            p = self.crop_pad
            padded = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
            dy, dx = rng.integers(0, 2 * p + 1, n), rng.integers(0, 2 * p + 1, n)
            out = np.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
        if self.flip:
            mirror = rng.random(n) < 0.5
            out = out.copy() if out is x else out
            out[mirror] = out[mirror, :, :, ::-1]
        return np.ascontiguousarray(out)
