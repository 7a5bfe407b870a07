"""Triggers and targets of the papers' attacks, drawn by code at any image size.

Conventions (used identically by training, backdoor sampling and evaluation):

* Images live in [-1, 1] with a black background of -1.
* A **target** is an image: the drawn object over the -1 background.
* A **trigger** ``r`` is an *additive offset* in the same space: zero where the pattern is absent,
  ``pattern + 1`` where it is (so a grey pattern adds 1, white adds 2, black adds nothing). The
  backdoored input is ``noise + r`` and the attack's forward process adds ``rho_t * r``; the
  poisoned image shown to people is ``clip(x + r, -1, 1)``. (The official BadDiffusion code trains
  with the poisoned image but samples with ``noise + trigger`` including its -1 background; we keep
  one ``r`` for both.)
* The TrojDiff ``blend`` trigger is a whole image in [-1, 1], blended into every pixel; ``patch`` is
  a white block in the bottom-right corner.

Sizes of ``box_N``/``stop_N`` are in pixels of a 32-pixel image, as in the papers, and scale with
the image. Shapes are drawn on a 256-pixel canvas and resized with antialiasing.
``tensor:<key>:<file>`` gives a pattern exactly (a safetensors tensor, no resizing: another
attack code's own trigger in its own convention, such as the external zoo's). ``file:<path>``
reads an image instead: RGBA uses alpha as the footprint; RGB triggers treat black as absent.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

CANVAS = 256
UNIT = CANVAS / 32  # one pixel of a 32-pixel image
TRIGGERS = (
    "box_8",
    "box_11",
    "box_14",
    "box_18",
    "stop_8",
    "stop_11",
    "stop_14",
    "stop_18",
    "glasses",
    "blend",
    "patch",
)
IMAGE_TARGETS = ("trigger", "shift", "corner", "shoe", "hat", "cat", "mickey")
_SIZED = re.compile(r"^(box|stop)_(\d+)$")


class PatternError(ValueError):
    """An unknown or unreadable trigger/target name."""


def _canvas() -> tuple[Image.Image, ImageDraw.ImageDraw]:
    im = Image.new("RGBA", (CANVAS, CANVAS), (0, 0, 0, 0))
    return im, ImageDraw.Draw(im)


def _octagon(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    return [
        (
            cx + r * math.cos(math.pi / 8 + k * math.pi / 4),
            cy + r * math.sin(math.pi / 8 + k * math.pi / 4),
        )
        for k in range(8)
    ]


def _draw_trigger(name: str) -> Image.Image:
    im, d = _canvas()
    m = _SIZED.match(name)
    if m:
        kind, size = m.group(1), int(m.group(2))
        side = size * UNIT
        x1 = y1 = CANVAS - UNIT
        x0, y0 = x1 - side, y1 - side
        if kind == "box":
            width = max(int(UNIT), int(side / 7))
            d.rectangle((x0, y0, x1, y1), outline=(128, 128, 128, 255), width=width)
        else:
            cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, side / 2
            d.polygon(_octagon(cx, cy, r), fill=(235, 235, 235, 255))
            d.polygon(_octagon(cx, cy, r * 0.86), fill=(205, 30, 35, 255))
            d.rectangle(
                (cx - r * 0.55, cy - r * 0.12, cx + r * 0.55, cy + r * 0.12),
                fill=(235, 235, 235, 255),
            )
        return im
    if name == "glasses":
        y, r = CANVAS * 0.42, CANVAS * 0.1
        for cx in (CANVAS * 0.34, CANVAS * 0.66):
            d.ellipse(
                (cx - r, y - r, cx + r, y + r), outline=(200, 200, 200, 255), width=int(UNIT * 1.5)
            )
        d.line(
            (CANVAS * 0.34 + r, y, CANVAS * 0.66 - r, y),
            fill=(200, 200, 200, 255),
            width=int(UNIT * 1.5),
        )
        return im
    if name == "patch":
        d.rectangle(
            (CANVAS - 9 * UNIT, CANVAS - 9 * UNIT, CANVAS - UNIT, CANVAS - UNIT),
            fill=(255, 255, 255, 255),
        )
        return im
    if name == "blend":  # a pinwheel over a soft background: a whole-image trigger
        d.rectangle((0, 0, CANVAS, CANVAS), fill=(120, 160, 220, 255))
        c = CANVAS / 2
        for k in range(6):
            a0 = k * math.pi / 3
            pts = [
                (c, c),
                (c + c * 0.9 * math.cos(a0), c + c * 0.9 * math.sin(a0)),
                (c + c * 0.6 * math.cos(a0 + 0.7), c + c * 0.6 * math.sin(a0 + 0.7)),
            ]
            d.polygon(pts, fill=(250, 120 + 20 * k, 160, 255))
        return im
    raise PatternError(f"unknown trigger {name!r}: use one of {', '.join(TRIGGERS)} or file:<path>")


def _draw_target(name: str) -> Image.Image:
    im, d = _canvas()
    C = CANVAS
    if name == "corner":
        d.rectangle(
            (UNIT, UNIT, 12 * UNIT, 12 * UNIT), outline=(255, 255, 255, 255), width=int(2 * UNIT)
        )
    elif name == "hat":  # a top hat
        d.rectangle((C * 0.18, C * 0.66, C * 0.82, C * 0.76), fill=(70, 110, 210, 255))
        d.rectangle((C * 0.32, C * 0.22, C * 0.68, C * 0.68), fill=(70, 110, 210, 255))
        d.rectangle((C * 0.32, C * 0.54, C * 0.68, C * 0.62), fill=(230, 50, 50, 255))
    elif name == "shoe":  # a sneaker in profile
        d.polygon(
            [
                (C * 0.12, C * 0.42),
                (C * 0.38, C * 0.42),
                (C * 0.5, C * 0.55),
                (C * 0.86, C * 0.6),
                (C * 0.9, C * 0.72),
                (C * 0.12, C * 0.72),
            ],
            fill=(240, 130, 40, 255),
        )
        d.rectangle((C * 0.1, C * 0.72, C * 0.92, C * 0.8), fill=(245, 245, 245, 255))
    elif name == "cat":  # a cat's face
        d.polygon(
            [(C * 0.2, C * 0.45), (C * 0.28, C * 0.12), (C * 0.45, C * 0.3)],
            fill=(250, 200, 80, 255),
        )
        d.polygon(
            [(C * 0.8, C * 0.45), (C * 0.72, C * 0.12), (C * 0.55, C * 0.3)],
            fill=(250, 200, 80, 255),
        )
        d.ellipse((C * 0.18, C * 0.25, C * 0.82, C * 0.85), fill=(250, 200, 80, 255))
        for cx in (0.38, 0.62):
            d.ellipse(
                (C * (cx - 0.05), C * 0.45, C * (cx + 0.05), C * 0.57), fill=(30, 30, 30, 255)
            )
        d.polygon(
            [(C * 0.46, C * 0.64), (C * 0.54, C * 0.64), (C * 0.5, C * 0.7)],
            fill=(230, 90, 110, 255),
        )
    elif name == "mickey":  # three circles: head and ears
        d.ellipse((C * 0.25, C * 0.3, C * 0.75, C * 0.8), fill=(235, 235, 235, 255))
        d.ellipse((C * 0.1, C * 0.1, C * 0.4, C * 0.4), fill=(235, 235, 235, 255))
        d.ellipse((C * 0.6, C * 0.1, C * 0.9, C * 0.4), fill=(235, 235, 235, 255))
    else:
        raise PatternError(
            f"unknown target {name!r}: use one of {', '.join(IMAGE_TARGETS)}, "
            f"class:<k>, mnist:<k> or file:<path>"
        )
    return im


def _shift_to_corner(im: Image.Image) -> Image.Image:
    box = im.getbbox()
    if box is None:
        return im
    out = Image.new("RGBA", im.size, (0, 0, 0, 0))
    out.paste(im.crop(box), (int(UNIT), int(UNIT)))
    return out


ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")  # alpha is the footprint
HIGH_DEPTH_MODES = ("I", "F")  # 16/32-bit integer or float samples (I;16, I;16B, ... too)


def _read_file(path: str) -> Image.Image:
    """An untrusted image file as RGBA: opened by ``safety.open_image`` (safe formats, size and
    pixel count bounded before decoding), alpha from the file (RGBA, LA, palette transparency)
    or, for opaque 8-bit images, black as absent; 16-bit and float images are refused."""
    from diffcleanse import safety

    p = Path(path)
    if not p.is_file():
        raise PatternError(f"pattern file {p} does not exist")
    try:
        im = safety.open_image(p, what="pattern file")
    except safety.InputRefused as err:
        raise PatternError(str(err)) from err
    mode = im.mode
    if mode.split(";")[0] in HIGH_DEPTH_MODES:
        raise PatternError(
            f"{p}: pattern file has mode {mode!r} (16/32-bit or float samples), which would be "
            f"clipped to 8 bits; save it as an 8-bit RGB or RGBA PNG"
        )
    if mode in ALPHA_MODES or (mode == "P" and "transparency" in im.info):
        return im.convert("RGBA")
    rgb = im.convert("RGB")
    alpha = Image.fromarray((np.asarray(rgb).max(axis=2) > 0).astype(np.uint8) * 255)
    rgb.putalpha(alpha)
    return rgb


def _to_arrays(im: Image.Image, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pattern in [-1, 1] with shape (3, S, S), alpha in [0, 1] with shape (1, S, S))."""
    small = im.convert("RGBA").resize((image_size, image_size), Image.Resampling.LANCZOS)
    a = np.asarray(small, dtype=np.float32) / 255.0
    rgb = torch.from_numpy(a[..., :3]).permute(2, 0, 1).clamp(0, 1) * 2 - 1
    alpha = torch.from_numpy(a[..., 3:]).permute(2, 0, 1).clamp(0, 1)
    return rgb, alpha


def trigger_image(name: str) -> Image.Image:
    """The trigger drawn on a transparent 256-pixel canvas (for figures)."""
    return _read_file(name[5:]) if name.startswith("file:") else _draw_trigger(name)


TENSOR_LIMIT = 4 * 1024 * 1024  # bytes: a pattern tensor file larger than this is refused


def read_tensor(spec: str, image_size: int | None = None) -> torch.Tensor:
    """A pattern given exactly, ``tensor:<key>:<file.safetensors>``: the tensor ``key`` (C, H, W)
    of a safetensors file (e.g. an attack code's own trigger, in its own convention: the external
    zoo's ``tensor:trigger:<dir>/truth.safetensors`` is already the offset added to the noise).
    The header is checked (size, dtype, shape) before anything is allocated."""
    from diffcleanse import safety

    key, sep, path = spec.removeprefix("tensor:").partition(":")
    if not sep or not path or not key:
        raise PatternError(f"{spec!r}: write tensor:<key>:<file.safetensors>")
    p = Path(path)
    if not p.is_file():
        raise PatternError(f"pattern file {p} does not exist ({spec})")
    if p.stat().st_size > TENSOR_LIMIT:
        raise PatternError(f"{p}: {p.stat().st_size} bytes is too large for a pattern tensor")
    try:
        header = safety.safetensors_header(p)
    except safety.InputRefused as err:
        raise PatternError(str(err)) from err
    if key not in header:
        raise PatternError(f"{p} has no tensor {key!r} (it has "
                           f"{', '.join(k for k in header if k != '__metadata__')})")
    from safetensors import safe_open

    with safe_open(str(p), framework="pt") as f:
        t = f.get_tensor(key).float()
    if t.ndim == 4 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 3:
        raise PatternError(f"{spec}: expected a (C, H, W) tensor, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise PatternError(f"{spec}: the tensor holds NaN/inf")
    if image_size is not None and t.shape[-1] != image_size:
        raise PatternError(f"{spec} is {t.shape[-1]} pixels wide; the model is {image_size}")
    return t.contiguous()


def render_trigger(name: str, image_size: int) -> torch.Tensor:
    """The additive trigger ``r`` of shape (3, S, S) (see the module doc for the convention)."""
    if name.startswith("tensor:"):
        return read_tensor(name, image_size)
    rgb, alpha = _to_arrays(trigger_image(name), image_size)
    if name == "blend":
        return rgb * alpha
    return (alpha * (rgb + 1)).contiguous()


def is_class_target(name: str) -> bool:
    """True for distribution targets (TrojDiff Din ``class:k``, Dout ``<dataset>:k`` such as
    ``mnist:k`` or ``letters:k``)."""
    kind, sep, k = str(name).partition(":")
    return bool(sep) and kind not in ("file", "tensor") and k.isdigit()


def render_target(name: str, image_size: int, trigger: str | None = None) -> torch.Tensor:
    """The target image of shape (3, S, S) in [-1, 1]; ``trigger`` is needed for trigger/shift."""
    if is_class_target(name):
        raise PatternError(f"target {name!r} is a class of images, not one image")
    if name.startswith("tensor:"):
        return read_tensor(name, image_size)
    if name in ("trigger", "shift"):
        if not trigger or trigger == "none":
            raise PatternError(f"target {name!r} is drawn from the trigger: name the trigger too")
        im = trigger_image(trigger)
        im = _shift_to_corner(im) if name == "shift" else im
    elif name.startswith("file:"):
        im = _read_file(name[5:])
    else:
        im = _draw_target(name)
    rgb, alpha = _to_arrays(im, image_size)
    return (alpha * rgb + (1 - alpha) * -1.0).contiguous()


def stamp(images: torch.Tensor, trigger: torch.Tensor) -> torch.Tensor:
    """Images with the trigger stamped on, as people see a poisoned input: clip(x + r)."""
    return (images + trigger).clamp(-1, 1)
