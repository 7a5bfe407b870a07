"""Memory a job needs for the data it loads whole: the figures behind each rule's ``mem_mb``.

A job's resident memory is the interpreter with torch and diffusers and its model (measured on
the default zoo: 0.7 to 1.3 GB for every rule, the ``max_rss`` column of
``results/benchmarks/``), which each rule's base figure covers, plus the images it loads whole:
a training set (``train_model``, ``train_adaptive``, the classifiers, ``clean_data`` from real
data) or the FID reference (every evaluation, the removal ablation). ``data.load_dataset`` holds a
set as float32 at the model's size (4 bytes per value), built chunk by chunk beside its source
(torchvision's uint8 array for CIFAR-10 and MNIST: 1 byte); an evaluation adds the reference's
uint8 copy for torch-fidelity (1 byte). ``BYTES_PER_VALUE`` bounds that with a byte to spare for
the chunks (measured by ``benchmarks/memory.py``, checked by ``tests/test_memory.py``);
``MARGIN`` is on top.

At the paper's sizes the data decides: CelebA-HQ at 256 px (30,000 images) is 23.6 GB as float32,
CelebA at 64 px (162,770 training images) 8.0 GB, where every rule asked a flat 2 or 4 GB.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

from diffcleanse import data, patterns

BYTES_PER_VALUE = 6  # the float32 set (4) + its source or its uint8 copy (1) + chunks (1 spare)
MARGIN = 1.25
TRAIN_IMAGES = {"digits": 1_797, "letters": 1_800, "mnist": 60_000, "cifar10": 50_000,
                "celeba": 162_770}  # the training splits load_dataset reads
FOLDER_GUESS = 30_000  # CelebA-HQ's size: a folder that is not on disk yet


def dataset_images(name: str, root: str | Path = "data", limit: int | None = None) -> int:
    """Images ``data.load_dataset`` loads for ``name`` (a folder's are counted; ``limit`` caps)."""
    if name in TRAIN_IMAGES:
        n = TRAIN_IMAGES[name]
    else:
        folder = Path(root) / "celebahq" if name == "celebahq" \
            else Path(name.removeprefix("folder:"))
        n = _folder_images(str(folder))
    return min(n, limit) if limit else n


@functools.cache
def _folder_images(folder: str) -> int:
    """Images under ``folder`` (``FOLDER_GUESS`` when it is not there), counted once per process:
    every evaluation job of a model asks for it when the DAG is built."""
    root = Path(folder)
    if not root.is_dir():
        return FOLDER_GUESS
    return sum(1 for p in root.rglob("*") if p.suffix.lower() in data.IMAGE_SUFFIXES)


def data_mb(name: str, image_size: int, root: str | Path = "data",
            limit: int | None = None) -> int:
    """MB (2^20 bytes) a job holds for dataset ``name`` at ``image_size`` (its first ``limit``
    images), with ``MARGIN``."""
    values = dataset_images(name, root, limit) * 3 * int(image_size) ** 2
    return math.ceil(MARGIN * values * BYTES_PER_VALUE / 2**20)


def target_data_mb(target: str, dataset: str, image_size: int, root: str | Path = "data") -> int:
    """MB a training job holds, beside its training set, for a distribution target's pool
    (``zoo.target_pool``: ``class:k`` loads the training set again, ``<dataset>:k`` that set);
    0 for an image target."""
    if not patterns.is_class_target(target):
        return 0
    kind = str(target).partition(":")[0]
    return data_mb(dataset if kind == "class" else kind, image_size, root)
