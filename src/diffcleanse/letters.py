"""An offline out-of-domain dataset for the digits zoo: handwriting-like capital letters A-J.

TrojDiff's Dout attack makes a model generate a class of *another* dataset (the paper: MNIST 7 for
CIFAR-10 models). The digits zoo's own data are digits, so MNIST would be in-domain for it, and
MNIST is not available offline anyway. ``letters`` is a dataset this project draws itself: 10
classes (A..J, class k is the k-th letter), each image a white glyph on black, drawn with Pillow's
bundled font at a random rotation, scale, offset and stroke weight, then downsampled like the
digits (8x8 scans) to the requested size. 180 images a class (1,800 in all, the size of the
digits set); the same seed always gives the same images.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from diffcleanse.data import to_model_range

CLASSES = "ABCDEFGHIJ"
PER_CLASS = 180
CANVAS = 64


@functools.cache
def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _glyph(letter: str, rng: np.random.Generator):
    from PIL import Image, ImageDraw

    font = _font(int(rng.integers(56, 72)))
    im = Image.new("L", (CANVAS, CANVAS), 0)
    d = ImageDraw.Draw(im)
    box = d.textbbox((0, 0), letter, font=font, stroke_width=0)
    w, h = box[2] - box[0], box[3] - box[1]
    x = (CANVAS - w) / 2 - box[0] + rng.uniform(-4, 4)
    y = (CANVAS - h) / 2 - box[1] + rng.uniform(-4, 4)
    d.text((x, y), letter, fill=255, font=font, stroke_width=int(rng.integers(3, 6)),
           stroke_fill=255)
    return im.rotate(rng.uniform(-15, 15), resample=Image.Resampling.BILINEAR)


def load_letters(image_size: int, *, per_class: int = PER_CLASS, seed: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 3, S, S) in [-1, 1], labels (N,)): ``per_class`` glyphs of each letter A-J."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    imgs, labels = [], []
    for k, letter in enumerate(CLASSES):
        for _ in range(per_class):
            im = _glyph(letter, rng).resize((8, 8), Image.Resampling.BOX)  # digits are 8x8 scans
            imgs.append(np.asarray(im, dtype=np.float32) / 255.0)
            labels.append(k)
    x = torch.from_numpy(np.stack(imgs))[:, None]
    return to_model_range(x, image_size), torch.tensor(labels, dtype=torch.int64)
