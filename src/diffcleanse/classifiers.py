"""A small CNN image classifier trained on a zoo dataset: features for detection and evaluation.

Used as the encoder of BBTI (``features``: the penultimate layer), and by evaluation for FID-style
features and the ASR of class targets (``logits``). Saved as ``weights.safetensors`` plus
``config.json`` (architecture, image size, classes, held-out accuracy), so loading never unpickles.
Inputs are images in [-1, 1] of shape (N, 3, H, W); other sizes are resized to the trained size.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from diffcleanse import __version__
from diffcleanse.records import atomic_path, make_record, write_json

WEIGHTS, CONFIG = "weights.safetensors", "config.json"


class ClassifierLoadError(RuntimeError):
    """A classifier directory is missing or malformed."""


class SmallCNN(nn.Module):
    """Conv-GroupNorm-SiLU blocks, global average pooling, a linear head."""

    def __init__(self, num_classes: int, image_size: int, channels: tuple[int, ...] = (32, 64, 128),
                 in_channels: int = 3):
        super().__init__()
        self.config = {"num_classes": int(num_classes), "image_size": int(image_size),
                       "channels": [int(c) for c in channels], "in_channels": int(in_channels)}
        layers: list[nn.Module] = []
        prev = in_channels
        for i, c in enumerate(channels):
            layers += [nn.Conv2d(prev, c, 3, stride=1 if i == 0 else 2, padding=1),
                       nn.GroupNorm(min(8, c), c), nn.SiLU(),
                       nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(min(8, c), c), nn.SiLU()]
            prev = c
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(prev, num_classes)

    @property
    def feature_dim(self) -> int:
        """Width of ``features``."""
        return self.head.in_features

    def _fit(self, x: torch.Tensor) -> torch.Tensor:
        s = self.config["image_size"]
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False,
                              antialias=s < min(x.shape[-2:]))
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features (N, D) of images in [-1, 1]."""
        return self.body(self._fit(x)).mean(dim=(2, 3))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (N, K)."""
        return self.head(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x)


def _augment(x: torch.Tensor, g: torch.Generator, shift: int) -> torch.Tensor:
    """Random translations by up to ``shift`` pixels (reflect padding)."""
    if shift <= 0:
        return x
    n, _, h, w = x.shape
    pad = F.pad(x, (shift,) * 4, mode="replicate")
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=g)
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=g)
    return torch.stack([pad[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def train_classifier(images: torch.Tensor, labels: torch.Tensor, *, steps: int = 600,
                     batch_size: int = 64, lr: float = 2e-3, holdout: float = 0.2, seed: int = 0,
                     channels: tuple[int, ...] = (32, 64, 128), shift: int = 1,
                     device: str | torch.device = "cpu") -> tuple[SmallCNN, dict[str, Any]]:
    """Train a SmallCNN on ``images`` (N, 3, H, W in [-1, 1]) and integer ``labels`` (N,).

    A seeded ``holdout`` share is kept out of training and scored; returns (model, metrics).
    """
    if images.ndim != 4 or len(images) != len(labels):
        raise ValueError(f"need images (N, C, H, W) and N labels, got {tuple(images.shape)} and "
                         f"{tuple(labels.shape)}")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(images), generator=g)
    n_test = int(len(images) * holdout)
    test, train = perm[:n_test], perm[n_test:]
    num_classes = int(labels.max()) + 1
    torch.manual_seed(seed)
    model = SmallCNN(num_classes, images.shape[-1], tuple(channels), images.shape[1]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    x, y = images.to(device), labels.to(device)
    model.train()
    for _ in range(steps):
        idx = train[torch.randint(0, len(train), (batch_size,), generator=g)]
        loss = F.cross_entropy(model(_augment(x[idx], g, shift)), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        acc = (float((model(x[test]).argmax(1) == y[test]).float().mean()) if n_test else
               float("nan"))
    return model, {"holdout_accuracy": acc, "n_train": len(train), "n_holdout": n_test,
                   "final_loss": float(loss.detach())}


def save_classifier(model: SmallCNN, path: str | Path, meta: dict[str, Any] | None = None) -> None:
    """Write ``weights.safetensors`` + ``config.json`` (with ``meta``) to the directory ``path``."""
    with atomic_path(path) as tmp:
        tmp.mkdir()
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(tmp / WEIGHTS))
        cfg = {"architecture": "SmallCNN", **model.config, "meta": meta or {},
               "diffcleanse_version": __version__}
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> SmallCNN:
    """Load a classifier written by ``save_classifier`` (safetensors; no pickle)."""
    path = Path(path)
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise ClassifierLoadError(f"{path} is not a classifier directory (expected {CONFIG} and "
                                  f"{WEIGHTS}; make one with the workflow's train_classifier rule)")
    cfg = json.loads((path / CONFIG).read_text())
    if cfg.get("architecture") != "SmallCNN":
        raise ClassifierLoadError(f"{path}: unknown architecture {cfg.get('architecture')!r}")
    model = SmallCNN(cfg["num_classes"], cfg["image_size"], tuple(cfg["channels"]),
                     cfg.get("in_channels", 3))
    try:
        model.load_state_dict(load_file(str(path / WEIGHTS)))
    except RuntimeError as err:
        raise ClassifierLoadError(f"{path}: weights do not match its config ({err})") from err
    model.meta = cfg.get("meta", {})  # type: ignore[attr-defined]
    return model.to(device).eval()


def train_dataset_classifier(dataset: str, image_size: int, out_dir: str | Path,
                             record_path: str | Path, params: dict[str, Any], *, seed: int = 0,
                             device: str = "cpu") -> dict[str, Any]:
    """Train a classifier on a zoo dataset (``diffcleanse.data``), save it and its record."""
    from diffcleanse import data

    t0 = time.time()
    x, y = data.load_dataset(dataset, image_size, params.get("data_root", "data"),
                             download=params.get("download", False))
    if y is None:
        raise ValueError(f"dataset {dataset!r} has no labels, so no classifier can be trained on "
                         f"it: set detection.encoder to clip (or pixels) for such models")
    model, metrics = train_classifier(x, y, steps=params["steps"], batch_size=params["batch_size"],
                                      lr=params["lr"], holdout=params["holdout"], seed=seed,
                                      channels=tuple(params["channels"]), device=device)
    meta = {"dataset": dataset, "image_size": image_size, **metrics}
    save_classifier(model.cpu(), out_dir, meta)
    rec = make_record("train_classifier", params, seed, time.time() - t0, dataset=dataset,
                      image_size=image_size, **metrics)
    write_json(record_path, rec)
    return rec
