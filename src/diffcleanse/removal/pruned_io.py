"""The pruned-model format: safetensors weights, the original config, and the pruned shapes.

diffusers' ``save_pretrained`` writes a config that describes the *unpruned* architecture, and
``torch.save`` of the module would need unpickling to load. A pruned model directory therefore holds

    unet/config.json                              the original UNet2DModel config
    unet/diffusion_pytorch_model.safetensors      the pruned weights (plain tensors)
    unet/pruned_shapes.json                       every module whose shape differs from the config
    scheduler/scheduler_config.json

and is loaded by building the model from its config, replacing the listed modules by modules of the
recorded shapes, and loading the weights strictly (``load_pruned_unet``; ``models.load_model`` does
this by itself when ``pruned_shapes.json`` is present). GroupNorm layers that lost single channels
become ``UnevenGroupNorm`` (groups of unequal size); their group sizes are part of the shapes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from diffusers.models.downsampling import Downsample2D
from diffusers.models.upsampling import Upsample2D
from safetensors.torch import load_file, save_file
from torch import nn

PRUNED_SHAPES = "pruned_shapes.json"
FORMAT = "diffcleanse-pruned-unet/1"
WEIGHTS = "diffusion_pytorch_model.safetensors"


class UnevenGroupNorm(nn.Module):
    """Group normalisation over contiguous channel groups of (possibly) unequal sizes.

    Each group is normalised over its own channels exactly as ``nn.GroupNorm`` does (same kernel,
    called once per distinct group size), then the per-channel affine is applied. This is what is
    left of an ``nn.GroupNorm`` after single channels were pruned: the untouched groups keep their
    statistics, a group that lost a channel is normalised over the channels it kept.
    """

    def __init__(self, group_sizes: list[int], eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__()
        if not group_sizes or min(group_sizes) < 1:
            raise ValueError(f"group sizes must be positive, got {group_sizes}")
        self.group_sizes = [int(s) for s in group_sizes]
        self.num_groups = len(self.group_sizes)
        self.num_channels = sum(self.group_sizes)
        self.eps = float(eps)
        self.affine = bool(affine)
        if self.affine:
            self.weight = nn.Parameter(torch.ones(self.num_channels))
            self.bias = nn.Parameter(torch.zeros(self.num_channels))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        starts = [0]
        for s in self.group_sizes[:-1]:
            starts.append(starts[-1] + s)
        segments: list[tuple[int, list[int]]] = []
        for size in sorted(set(self.group_sizes)):
            chans = [c for st, s in zip(starts, self.group_sizes, strict=True) if s == size
                     for c in range(st, st + s)]
            segments.append((len(chans) // size, chans))
        self._segments = segments
        order = torch.tensor([c for _, chans in segments for c in chans])
        self.register_buffer("_inverse", torch.argsort(order), persistent=False)
        for i, (_, chans) in enumerate(segments):
            self.register_buffer(f"_seg{i}", torch.tensor(chans), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        if c != self.num_channels:
            raise ValueError(f"expected {self.num_channels} channels, got {c}")
        flat = x.reshape(n, c, -1)
        if len(self._segments) == 1:
            out = F.group_norm(flat, self.num_groups, eps=self.eps)
        else:
            parts = [F.group_norm(flat.index_select(1, getattr(self, f"_seg{i}")), k, eps=self.eps)
                     for i, (k, _) in enumerate(self._segments)]
            out = torch.cat(parts, 1).index_select(1, self._inverse)
        if self.affine:
            out = out * self.weight[:, None] + self.bias[:, None]
        return out.reshape(x.shape)

    def extra_repr(self) -> str:
        return f"group_sizes={self.group_sizes}, eps={self.eps}, affine={self.affine}"


def group_norm_for(group_sizes: list[int], eps: float, affine: bool) -> nn.Module:
    """``nn.GroupNorm`` when the groups are equal, else ``UnevenGroupNorm``."""
    if len(set(group_sizes)) == 1:
        return nn.GroupNorm(len(group_sizes), sum(group_sizes), eps=eps, affine=affine)
    return UnevenGroupNorm(group_sizes, eps=eps, affine=affine)


def module_shapes(unet: nn.Module) -> dict[str, dict[str, Any]]:
    """The shape-defining attributes of every prunable module (JSON-able), by module name."""
    out: dict[str, dict[str, Any]] = {}
    for name, m in unet.named_modules():
        if isinstance(m, nn.Conv2d):
            out[name] = {"type": "Conv2d", "in_channels": m.in_channels,
                         "out_channels": m.out_channels}
        elif isinstance(m, nn.Linear):
            out[name] = {"type": "Linear", "in_features": m.in_features,
                         "out_features": m.out_features}
        elif isinstance(m, UnevenGroupNorm):
            out[name] = {"type": "GroupNorm", "group_sizes": list(m.group_sizes)}
        elif isinstance(m, nn.GroupNorm):
            out[name] = {"type": "GroupNorm",
                         "group_sizes": [m.num_channels // m.num_groups] * m.num_groups}
        elif isinstance(m, (Upsample2D, Downsample2D)):
            out[name] = {"type": type(m).__name__, "channels": m.channels,
                         "out_channels": m.out_channels}
    return out


def _reference(config: dict[str, Any]) -> UNet2DModel:
    """The unpruned model a config describes (on the meta device: no memory, no init)."""
    with torch.device("meta"):
        return UNet2DModel.from_config(dict(config))


def pruned_shapes(unet: UNet2DModel) -> dict[str, dict[str, Any]]:
    """Modules whose shapes differ from what ``unet.config`` builds (empty: not pruned)."""
    ref = module_shapes(_reference(unet.config))
    return {k: v for k, v in module_shapes(unet).items() if ref.get(k) != v}


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def apply_shapes(unet: nn.Module, shapes: dict[str, dict[str, Any]]) -> None:
    """Replace the named modules by freshly built ones of the recorded shapes (weights follow)."""
    for name, spec in shapes.items():
        m = unet.get_submodule(name)
        kind = spec["type"]
        if kind == "Conv2d":
            new: nn.Module = nn.Conv2d(spec["in_channels"], spec["out_channels"], m.kernel_size,
                                       stride=m.stride, padding=m.padding, dilation=m.dilation,
                                       groups=m.groups, bias=m.bias is not None,
                                       padding_mode=m.padding_mode)
        elif kind == "Linear":
            new = nn.Linear(spec["in_features"], spec["out_features"], bias=m.bias is not None)
        elif kind == "GroupNorm":
            new = group_norm_for(spec["group_sizes"], m.eps, m.affine)
        elif kind in ("Upsample2D", "Downsample2D"):
            m.channels, m.out_channels = spec["channels"], spec["out_channels"]
            continue
        else:
            raise ValueError(f"{name}: unknown module type {kind!r} in pruned shapes")
        _set_module(unet, name, new)


def save_pruned_unet(unet: UNet2DModel, unet_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Write config + safetensors weights + pruned shapes into ``unet_dir``; returns the shapes."""
    unet_dir = Path(unet_dir)
    unet_dir.mkdir(parents=True, exist_ok=True)
    shapes = pruned_shapes(unet)
    unet.save_config(unet_dir)
    tensors = {k: v.detach().cpu().contiguous() for k, v in unet.state_dict().items()}
    save_file(tensors, str(unet_dir / WEIGHTS), metadata={"format": "pt"})
    (unet_dir / PRUNED_SHAPES).write_text(json.dumps({"format": FORMAT, "modules": shapes},
                                                     indent=1, sort_keys=True) + "\n")
    return shapes


def load_pruned_unet(unet_dir: str | Path) -> UNet2DModel:
    """Rebuild a pruned UNet2DModel from ``unet_dir`` (config, shapes, safetensors): no pickles."""
    unet_dir = Path(unet_dir)
    spec = json.loads((unet_dir / PRUNED_SHAPES).read_text())
    if spec.get("format") != FORMAT:
        raise ValueError(f"{unet_dir / PRUNED_SHAPES}: unknown format {spec.get('format')!r} "
                         f"(this version reads {FORMAT})")
    unet = UNet2DModel.from_config(UNet2DModel.load_config(unet_dir))
    apply_shapes(unet, spec["modules"])
    weights = sorted(unet_dir.glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"{unet_dir} has no safetensors weights")
    unet.load_state_dict(load_file(str(weights[0])), strict=True)
    return unet.eval()
