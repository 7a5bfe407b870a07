"""Datasets as tensors of shape (N, 3, H, W) with values in [-1, 1].

The bundled digits (``sklearn.datasets.load_digits``, 1,797 real 8x8 scans) need no download and
are the offline default. CIFAR-10, MNIST and CelebA go through torchvision, CelebA-HQ and any other
set through an image folder; none of them is downloaded unless ``download=True`` is asked for, and a
missing copy gives an error that says where the loader looked and how to point it at a local copy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
KNOWN = ("digits", "letters", "mnist", "cifar10", "celeba", "celebahq")


class DatasetUnavailable(RuntimeError):
    """A dataset is not on disk (and was not to be downloaded)."""


CHUNK_VALUES = 2**20  # values converted at a time (4 MB as float32): no full-size temporaries


def chunk_rows(images: torch.Tensor, out_values: int = 0) -> int:
    """Images per chunk: ``CHUNK_VALUES`` values of the larger of an input image and an output
    one (``out_values``), at least one."""
    per_image = max(images[0].numel() if len(images) else 1, out_values, 1)
    return max(1, CHUNK_VALUES // per_image)


def to_model_range(images: torch.Tensor, image_size: int, divide: float = 1.0) -> torch.Tensor:
    """Resize (N, C, h, w) images in [0, ``divide``] (uint8 with ``divide=255``) to
    ``image_size`` with 3 channels, values in [-1, 1]. Converted ``chunk_rows`` images at a time
    into one preallocated float32 tensor, so the peak is the result plus a few MB (each image is
    resized on its own, so chunking does not change a value)."""
    if images.ndim != 4:
        raise ValueError(f"expected (N, C, H, W) images, got shape {tuple(images.shape)}")
    out = torch.empty((len(images), 3, image_size, image_size), dtype=torch.float32,
                      device=images.device)
    rows = chunk_rows(images, 3 * image_size**2)
    for i in range(0, len(images), rows):
        out[i:i + rows] = _model_range(images[i:i + rows], image_size, divide)
    return out


def _model_range(images: torch.Tensor, image_size: int, divide: float) -> torch.Tensor:
    x = images.float()
    if divide != 1.0:
        x = x / divide
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] == 4:
        x = x[:, :3]
    if x.shape[-2:] != (image_size, image_size):
        down = image_size < min(x.shape[-2:])
        x = F.interpolate(
            x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=down
        )
    return x.clamp(0, 1) * 2 - 1


def load_digits(image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 bundled sklearn digits, resized; returns (images, labels)."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    imgs = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    return to_model_range(imgs, image_size), torch.from_numpy(d.target.astype(np.int64))


def load_folder(folder: str | Path, image_size: int, limit: int | None = None) -> torch.Tensor:
    """Every image in a folder (recursively, sorted by path), centre-cropped to a square.

    Each file is opened by ``safety.open_image`` (safe formats; size and pixel count bounded
    before decoding); a file that is not a readable image, or holds 16-bit/float samples, is
    refused with its path (``safety.InputRefused``), and an empty folder names what it looked for.
    """
    from PIL import Image

    from diffcleanse import safety

    root = Path(folder)
    if not root.is_dir():
        raise DatasetUnavailable(
            f"image folder {root} does not exist: set the dataset to "
            f"folder:<path> with a directory of .png/.jpg files"
        )
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DatasetUnavailable(
            f"image folder {root} is empty: no {', '.join(sorted(IMAGE_SUFFIXES))} files under it "
            f"(recursively); put the dataset's images there or point folder:<path> elsewhere"
        )
    files = files[:limit] if limit else files
    out = torch.empty((len(files), 3, image_size, image_size))
    for i, f in enumerate(files):
        with safety.open_image(f, what="dataset image") as im:
            if im.mode.split(";")[0] in ("I", "F"):
                raise safety.InputRefused(
                    f, f"dataset image has mode {im.mode!r} (16/32-bit or float samples), which "
                    f"would be clipped to 8 bits; convert the folder to 8-bit RGB images"
                )
            im = im.convert("RGB")
            s = min(im.size)
            left, top = (im.width - s) // 2, (im.height - s) // 2
            im = im.crop((left, top, left + s, top + s)).resize(
                (image_size, image_size), Image.Resampling.BICUBIC
            )
            img = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
            out[i] = to_model_range(img[None], image_size)[0]
    return out


def _torchvision(name: str, root: Path, download: bool):
    import torchvision.datasets as tvd

    where = root / name
    try:
        if name == "cifar10":
            return tvd.CIFAR10(str(where), train=True, download=download)
        if name == "mnist":
            return tvd.MNIST(str(where), train=True, download=download)
        if name == "celeba":
            return tvd.CelebA(str(where), split="train", download=download)
    except (RuntimeError, OSError) as err:  # torchvision: "Dataset not found or corrupted"
        raise DatasetUnavailable(
            f"{name} is not under {where} ({err}). This machine may have no internet: download it "
            f"where there is (torchvision.datasets.{_TV_NAMES[name]}('{where}', download=True)) "
            f"and "
            f"copy it here, or set config key data.root to the folder that holds '{name}/', or set "
            f"data.download: true on a machine with internet."
        ) from err
    raise ValueError(name)


_TV_NAMES = {"cifar10": "CIFAR10", "mnist": "MNIST", "celeba": "CelebA"}


def load_dataset(
    name: str,
    image_size: int,
    root: str | Path = "data",
    *,
    limit: int | None = None,
    download: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Load a dataset by manifest name; returns (images in [-1, 1], labels or None).

    ``name`` is one of ``digits``, ``mnist``, ``cifar10``, ``celeba``, ``celebahq`` or
    ``folder:<path>``. ``limit`` keeps the first N images (deterministic).
    """
    root = Path(root)
    if name == "digits":
        x, y = load_digits(image_size)
    elif name == "letters":
        from diffcleanse.letters import load_letters

        x, y = load_letters(image_size)
    elif name.startswith("folder:"):
        return load_folder(name.removeprefix("folder:"), image_size, limit), None
    elif name == "celebahq":
        where = root / "celebahq"
        if not where.is_dir():
            raise DatasetUnavailable(
                f"CelebA-HQ has no torchvision loader: put its images under {where} (any layout of "
                f".jpg/.png files) or use dataset folder:<path>; set data.root to move the root."
            )
        return load_folder(where, image_size, limit), None
    elif name in ("cifar10", "mnist", "celeba"):
        ds = _torchvision(name, root, download)
        n = len(ds) if limit is None else min(limit, len(ds))
        if name == "celeba":  # resized image by image: 64 px, not 178 px, per image in memory
            out = torch.empty((n, 3, image_size, image_size))
            for i in range(n):
                im = ds[i][0]
                s = min(im.size)
                im = im.crop(
                    (
                        (im.width - s) // 2,
                        (im.height - s) // 2,
                        (im.width + s) // 2,
                        (im.height + s) // 2,
                    )
                )
                img = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)
                out[i] = to_model_range(img[None], image_size)[0]
            return out, None
        data = torch.as_tensor(np.asarray(ds.data[:n]))  # uint8, converted chunk by chunk
        data = data[:, None] if data.ndim == 3 else data.permute(0, 3, 1, 2)
        labels = torch.as_tensor(np.asarray(ds.targets[:n]), dtype=torch.int64)
        return to_model_range(data, image_size, divide=255.0), labels
    else:
        raise ValueError(
            f"unknown dataset {name!r}: use one of {', '.join(KNOWN)} or folder:<path>"
        )
    if limit:
        x, y = x[:limit], y[:limit]
    return x, y
