"""Distances between images for the baselines' sample statistics (Elijah, PureDiffusion).

Elijah's *uniformity* and PureDiffusion's *uniform score* measure how alike the samples drawn from
``noise + trigger`` are. The official Elijah code uses LPIPS (piq's VGG variant); here:

* ``pixels-mse`` (the default, needs no weights): the mean over values of the squared difference
  of two images mapped to [0, 1] (clamped first), so identical images give 0 and a black and a
  white image give 1.
* ``encoder``: the squared L2 distance of the ``detection`` encoder's embeddings (divided by their
  dimension), labelled ``encoder`` (which encoder: the record's ``encoder`` field).
* ``lpips-alex`` / ``lpips-vgg``: LPIPS v0.1 (Zhang et al. 2018) over torchvision's AlexNet or
  VGG16 built *without* weights and loaded from a LOCAL safetensors file (no downloads here). The
  file holds the backbone's ``features.*`` tensors (torchvision naming) and the five linear heads
  ``lin0.weight`` .. ``lin4.weight`` (shape (1, C, 1, 1); the lpips package's
  ``lin{i}.model.1.weight`` naming is accepted too). ``convert_lpips_weights`` writes it from the
  two standard files (torchvision's backbone checkpoint and the lpips package's ``alex.pth`` /
  ``vgg.pth``) on a machine that has them. Images smaller than ``size`` are resized (bilinear) to
  ``size`` first: AlexNet's pooling leaves nothing of a 16-pixel image.

Every statistic computed with a distance carries its label (``uniformity[pixels-mse]``,
``uniformity[lpips-alex]``) so figures from different distances never mix.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

DISTANCES = ("pixels-mse", "encoder", "lpips-alex", "lpips-vgg")
# LPIPS v0.1 input scaling (inputs in [-1, 1]) and the layers it reads
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
_SLICES = {"alex": (2, 5, 8, 10, 12), "vgg": (4, 9, 16, 23, 30)}  # end index of each slice
_CHANNELS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}


class PerceptualUnavailable(RuntimeError):
    """A perceptual distance's local weights are missing or do not fit."""


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (unclipped samples) clamped and mapped to [0, 1]."""
    return (images.clamp(-1, 1) + 1) / 2


class LPIPS(nn.Module):
    """LPIPS v0.1 over an AlexNet or VGG16 backbone whose weights come from a local file."""

    def __init__(self, net: str, weights: str | Path, *, size: int = 64,
                 config_key: str = "perceptual_weights"):
        super().__init__()
        import torchvision
        from safetensors.torch import load_file

        if net not in _SLICES:
            raise ValueError(f"LPIPS backbone {net!r}: use alex or vgg")
        path = Path(weights)
        if not path.is_file():
            raise PerceptualUnavailable(
                f"{config_key}: LPIPS weights file {path} does not exist (pretrained backbones "
                f"cannot be downloaded here: write one with diffcleanse.perceptual."
                f"convert_lpips_weights on a machine that has them, or choose the offline "
                f"distance pixels-mse)")
        state = load_file(str(path))
        backbone = (torchvision.models.alexnet(weights=None) if net == "alex"
                    else torchvision.models.vgg16(weights=None)).features
        own = {k.removeprefix("features."): v for k, v in state.items()
               if k.startswith("features.")}
        try:
            backbone.load_state_dict(own, strict=True)
        except RuntimeError as err:
            raise PerceptualUnavailable(f"{config_key}: {path} does not hold a torchvision "
                                        f"{net} backbone ({err})") from err
        ends = _SLICES[net]
        starts = (0, *ends[:-1])
        self.slices = nn.ModuleList(backbone[a:b] for a, b in zip(starts, ends, strict=True))
        self.lins = nn.ParameterList()
        for i, ch in enumerate(_CHANNELS[net]):
            w = state.get(f"lin{i}.weight", state.get(f"lin{i}.model.1.weight"))
            if w is None or tuple(w.shape) != (1, ch, 1, 1):
                raise PerceptualUnavailable(f"{config_key}: {path} lacks the LPIPS head "
                                            f"lin{i}.weight of shape (1, {ch}, 1, 1)")
            self.lins.append(nn.Parameter(w.float(), requires_grad=False))
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1))
        self.size, self.net = size, net
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.shape[-1] < self.size or x.shape[-2] < self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear",
                              align_corners=False)
        h = (x - self.shift) / self.scale
        out = []
        for sl in self.slices:
            h = sl(h)
            out.append(h / (h.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-pair LPIPS of images ``a`` and ``b`` in [-1, 1], (N, 3, H, W) -> (N,)."""
        fa, fb = self._features(a.clamp(-1, 1)), self._features(b.clamp(-1, 1))
        d = torch.zeros(a.shape[0], device=a.device)
        for w, x, y in zip(self.lins, fa, fb, strict=True):
            d = d + F.conv2d((x - y).pow(2), w).mean(dim=(1, 2, 3))
        return d


class Distance:
    """A labelled distance between images in [-1, 1]: ``d(a, b)`` per row, (N,) for (N, 3, H, W)."""

    def __init__(self, label: str, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.label, self._fn = label, fn

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self._fn(a, b)

    def matrix(self, images: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        """All pairwise distances of ``images`` (N, N), in chunks of pairs."""
        n = images.shape[0]
        ii, jj = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        ii, jj = ii.flatten(), jj.flatten()
        out = torch.empty(n * n, device=images.device)
        with torch.no_grad():
            for s in range(0, n * n, chunk):
                out[s:s + chunk] = self(images[ii[s:s + chunk]], images[jj[s:s + chunk]]).float()
        return out.view(n, n)


def make_distance(kind: str, *, weights: str | Path | None = None, encoder: nn.Module | None = None,
                  size: int = 64, config_key: str = "perceptual") -> Distance:
    """The distance ``kind`` (one of ``DISTANCES``; module doc). ``config_key`` names the setting
    that chose it in error messages (its weights file is ``<config_key>_weights``)."""
    if kind == "pixels-mse":
        return Distance("pixels-mse",
                        lambda a, b: (to_unit(a) - to_unit(b)).pow(2).flatten(1).mean(dim=1))
    if kind == "encoder":
        if encoder is None:
            raise PerceptualUnavailable(f"{config_key}: encoder needs the detection encoder")

        def enc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            za, zb = encoder(a.clamp(-1, 1)).flatten(1), encoder(b.clamp(-1, 1)).flatten(1)
            return (za - zb).pow(2).mean(dim=1)

        return Distance("encoder", enc)
    if kind in ("lpips-alex", "lpips-vgg"):
        if weights is None:
            raise PerceptualUnavailable(f"{config_key}: {kind} needs a local weights file: set "
                                        f"{config_key}_weights (or use pixels-mse)")
        net = LPIPS(kind.removeprefix("lpips-"), weights, size=size,
                    config_key=f"{config_key}_weights")
        return Distance(kind, lambda a, b: net.to(a.device)(a, b))
    raise ValueError(f"{config_key}: unknown distance {kind!r} (use one of {', '.join(DISTANCES)})")


def check_distance_setting(kind: str, weights: str | Path | None, config_key: str) -> None:
    """Fail early (before any model is loaded) on an unknown distance or a missing weights file."""
    if kind not in DISTANCES:
        raise ValueError(f"{config_key}: unknown distance {kind!r} (use one of "
                         f"{', '.join(DISTANCES)})")
    if kind.startswith("lpips-"):
        if weights is None:
            raise PerceptualUnavailable(f"{config_key}: {kind} needs a local weights file: set "
                                        f"{config_key}_weights (or use pixels-mse)")
        if not Path(weights).is_file():
            raise PerceptualUnavailable(
                f"{config_key}_weights: LPIPS weights file {weights} does not exist (set it to a "
                f"local safetensors file written by diffcleanse.perceptual.convert_lpips_weights, "
                f"or use {config_key}: pixels-mse)")


def uniformity(images: torch.Tensor, distance: Distance, trim: int = 4) -> float:
    """Elijah's uniformity (its ``compute_uniformity``): the N × N matrix of pairwise distances,
    each row sorted and its ``trim`` smallest and largest entries dropped (the smallest is the
    image's zero distance to itself), the rows' means sorted and again ``trim`` dropped at each
    end, then the mean. Needs N > 2·trim."""
    n = images.shape[0]
    if n <= 2 * trim:
        raise ValueError(f"uniformity drops {trim} values at each end: it needs more than "
                         f"{2 * trim} samples, got {n} (raise inversion.batch_size)")
    d = distance.matrix(images)
    rows = torch.sort(d, dim=1).values[:, trim:n - trim].mean(dim=1)
    return float(torch.sort(rows).values[trim:n - trim].mean())


def mean_pairwise(images: torch.Tensor, distance: Distance) -> float:
    """PureDiffusion's uniform score: the mean distance over the N(N−1)/2 unordered pairs of
    distinct samples (0 when all samples are alike; lower is more uniform)."""
    n = images.shape[0]
    if n < 2:
        raise ValueError("the uniform score needs at least two samples")
    d = distance.matrix(images)
    iu = torch.triu_indices(n, n, offset=1)
    return float(d[iu[0], iu[1]].mean())


def total_variation(images: torch.Tensor) -> float:
    """Elijah's TV (torchmetrics ``TotalVariation(reduction='mean')`` on [0, 1] images): per image
    the sum of absolute differences of vertically and horizontally adjacent values over all
    channels, averaged over the images."""
    x = to_unit(images).float()
    dv = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).sum(dim=1)
    dh = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).sum(dim=1)
    return float((dv + dh).mean())


def convert_lpips_weights(backbone: str | Path, heads: str | Path, out: str | Path) -> Path:
    """Write the local LPIPS file (module doc) from torchvision's backbone checkpoint
    (``alexnet-owt-7be5be79.pth`` / ``vgg16-397923af.pth``) and the lpips package's heads
    (``weights/v0.1/alex.pth`` / ``vgg.pth``). Both are read with ``weights_only=True``."""
    from safetensors.torch import save_file

    bb = torch.load(str(backbone), map_location="cpu", weights_only=True)
    hd = torch.load(str(heads), map_location="cpu", weights_only=True)
    tensors = {k: v.contiguous() for k, v in bb.items() if k.startswith("features.")}
    for k, v in hd.items():
        if k.startswith("lin") and k.endswith(".weight"):
            tensors[f"{k.split('.')[0]}.weight"] = v.contiguous()
    save_file(tensors, str(out))
    return Path(out)
