"""Image encoders for BBTI behind one interface: a differentiable map from images in [-1, 1]
(N, 3, H, W) to embeddings (N, D), with a ``name`` and ``describe()`` stated in every output.

* ``ClipEncoder``: an open_clip image tower (paper: ViT-B/32). ``pretrained`` is a hub tag
  (``openai``, ``laion2b_s34b_b79k``, ...) or a local weights file (``.safetensors``, ``.bin``...).
  Offline, a tag that is not cached fails with an error naming the config key to set. A randomly
  initialised CLIP (``pretrained=None``) is refused unless ``allow_random=True`` (tests only): it
  does not separate images.
* ``PixelEncoder``: the raw pixels, each image centred on its own mean, so cosine similarity is the
  Pearson correlation of two images. Needs no weights; works for any model.
* ``ClassifierEncoder``: the penultimate features of a ``classifiers.SmallCNN`` trained on the
  model's dataset (the workflow's default: it separates the classes of that data).

``make_encoder("pixels" | "clip[:<pretrained>]" | "classifier:<dir>")`` builds one from a spec.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class EncoderUnavailable(RuntimeError):
    """An encoder's weights cannot be found or loaded."""


class Encoder(nn.Module):
    """Base class: ``encoder(images)`` -> embeddings; frozen, in eval mode, differentiable."""

    name: str = "encoder"

    def describe(self) -> dict[str, Any]:
        """JSON-able description for records (what produced the embeddings)."""
        return {"name": self.name}

    def freeze(self) -> Encoder:
        """Eval mode, no parameter gradients (gradients still flow to the input)."""
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self


class PixelEncoder(Encoder):
    """Flattened pixels minus each image's mean (cosine = Pearson correlation)."""

    def __init__(self, size: int | None = None):
        super().__init__()
        self.size = size
        self.name = "pixels" if size is None else f"pixels@{size}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.size is not None and x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        z = x.flatten(1).float()
        return z - z.mean(dim=1, keepdim=True)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "pixels", "centred": True, "size": self.size}


class ClassifierEncoder(Encoder):
    """Penultimate features of a classifier trained on the model's dataset."""

    def __init__(self, classifier: nn.Module, source: str = ""):
        super().__init__()
        self.classifier = classifier
        self.source = source
        meta = getattr(classifier, "meta", {}) or {}
        self.meta = meta
        self.name = f"classifier:{meta.get('dataset', '?')}_{meta.get('image_size', '?')}"
        self.freeze()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(x)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "classifier", "path": self.source,
                "holdout_accuracy": self.meta.get("holdout_accuracy"),
                "feature_dim": int(self.classifier.feature_dim)}


class ClipEncoder(Encoder):
    """An open_clip image tower; images are resized to its input size and normalised."""

    def __init__(self, model_name: str = "ViT-B-32", pretrained: str | None = "openai", *,
                 allow_random: bool = False, config_key: str = "detection.clip_pretrained",
                 cache_dir: str | None = None):
        super().__init__()
        import open_clip

        if pretrained is None and not allow_random:
            raise EncoderUnavailable(
                f"a randomly initialised CLIP {model_name} does not separate images: set "
                f"{config_key} to a hub tag (e.g. openai) or a local weights file")
        is_file = pretrained is not None and Path(pretrained).suffix in (
            ".safetensors", ".bin", ".pt", ".pth")
        if is_file and not Path(pretrained).is_file():
            raise EncoderUnavailable(f"CLIP weights file {pretrained} does not exist (set "
                                     f"{config_key} to an existing file or a hub tag)")
        try:
            model = open_clip.create_model(model_name, pretrained=pretrained, cache_dir=cache_dir,
                                           require_pretrained=pretrained is not None)
        except Exception as err:  # open_clip raises RuntimeError/OSError/HF errors offline
            raise EncoderUnavailable(
                f"could not load CLIP {model_name} weights {pretrained!r} ({type(err).__name__}: "
                f"{err}). Offline machines cannot download them: download once where there is "
                f"internet (open_clip.create_model({model_name!r}, pretrained={pretrained!r})) and "
                f"set {config_key} to the local weights file, or choose another encoder "
                f"(detection.encoder: classifier or pixels)") from err
        self.visual = model.visual
        size = self.visual.image_size
        self.input_size = size if isinstance(size, int) else int(size[0])
        self.model_name, self.pretrained = model_name, pretrained
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1))
        self.name = f"clip:{model_name}:{'random-init' if pretrained is None else pretrained}"
        self.freeze()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic",
                          align_corners=False)
        x = ((x.clamp(-1, 1) + 1) / 2 - self.mean) / self.std
        return self.visual(x)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "clip", "model": self.model_name,
                "pretrained": self.pretrained, "random_init": self.pretrained is None}


def make_encoder(spec: str, *, clip_model: str = "ViT-B-32", classifier_dir: str | None = None,
                 device: str | torch.device = "cpu", allow_random: bool = False) -> Encoder:
    """Build an encoder from ``pixels``, ``clip[:<pretrained tag or file>]`` or
    ``classifier[:<dir>]`` (the directory may also come as ``classifier_dir``)."""
    kind, _, arg = spec.partition(":")
    if kind == "pixels":
        enc: Encoder = PixelEncoder(int(arg) if arg else None)
    elif kind == "clip":
        enc = ClipEncoder(clip_model, arg or "openai", allow_random=allow_random)
    elif kind == "classifier":
        where = arg or classifier_dir
        if not where:
            raise EncoderUnavailable("encoder 'classifier' needs a classifier directory "
                                     "(classifier:<dir>; the workflow trains one per dataset)")
        from diffcleanse.classifiers import ClassifierLoadError, load_classifier

        try:
            enc = ClassifierEncoder(load_classifier(where), source=str(where))
        except ClassifierLoadError as err:
            raise EncoderUnavailable(str(err)) from err
    else:
        raise ValueError(f"unknown encoder {spec!r}: use pixels, clip[:<weights>] or "
                         f"classifier:<dir>")
    return enc.to(device).freeze()


def encoder_from_params(params: dict[str, Any], *, classifier_dir: str | None = None,
                        device: str | torch.device = "cpu") -> Encoder:
    """The encoder named by the workflow's ``detection`` params (``encoder``: classifier, clip,
    pixels; ``clip_model``/``clip_pretrained`` for clip)."""
    kind = params.get("encoder", "classifier")
    if kind == "clip":
        pretrained = params.get("clip_pretrained") or "openai"
        return ClipEncoder(params.get("clip_model", "ViT-B-32"), pretrained).to(device).freeze()
    if kind == "classifier":
        return make_encoder("classifier", classifier_dir=classifier_dir, device=device)
    return make_encoder(kind, device=device)
