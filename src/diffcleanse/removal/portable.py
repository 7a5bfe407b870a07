"""Load a pruned diffusers UNet2DModel without diffcleanse (only torch, diffusers, safetensors).

This file is self-contained on purpose: ``diffcleanse.removal.pruned_io`` uses it, and every
repaired model directory gets a verbatim copy as ``load_pruned.py``, so a pruned model can be
shipped to people who do not install diffcleanse::

    import sys; sys.path.insert(0, "repaired")          # the model directory
    import load_pruned
    pipe = load_pruned.load_pipeline("repaired")        # DDPMPipeline (LDMPipeline, ...)
    images = pipe(batch_size=4).images

The format (``diffcleanse-pruned-unet/1``)::

    unet/config.json                          the UNet2DModel config of the *unpruned* architecture
    unet/diffusion_pytorch_model.safetensors  the pruned weights (plain tensors)
    unet/pruned_shapes.json                   {"format": ..., "modules": {name: shape}} for every
                                              module whose shape differs from what the config builds
    scheduler/scheduler_config.json           the noise schedule (clip_sample: false)

A shape entry is ``{"type": "Conv2d", "in_channels", "out_channels"}``, ``{"type": "Linear",
"in_features", "out_features"}``, ``{"type": "GroupNorm", "group_sizes": [...]}`` (groups of
unequal size after single channels were pruned: ``UnevenGroupNorm``) or ``{"type": "Upsample2D" |
"Downsample2D", "channels", "out_channels"}``. Loading builds the model from the config, replaces
the listed modules by modules of the recorded shapes and loads the weights strictly. Before any
tensor is allocated, the shapes file is checked against the config (known modules, same types,
sizes that only shrink) and against the safetensors header (every tensor's shape): a file that does
not match its weights, or asks for absurd sizes, is refused with a ``PrunedFormatError``.
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
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

PRUNED_SHAPES = "pruned_shapes.json"
FORMAT = "diffcleanse-pruned-unet/1"
WEIGHTS = "diffusion_pytorch_model.safetensors"
MAX_SHAPES_BYTES = 16 * 2**20  # a shapes file is a few kB per hundred modules
MAX_PARAMETERS = 20_000_000_000  # the unpruned architecture a config may ask for


class PrunedFormatError(ValueError):
    """A pruned-model directory that does not describe a loadable model."""


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


def reference(config: dict[str, Any]) -> UNet2DModel:
    """The unpruned model a config describes, on the meta device (no memory, no init)."""
    try:
        with torch.device("meta"):
            return UNet2DModel.from_config(dict(config))
    except Exception as err:  # diffusers raises ValueError, TypeError, ... on a bad config
        raise PrunedFormatError(f"the UNet config does not build a UNet2DModel: {err}") from err


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


_SIZE_KEYS = {"Conv2d": ("in_channels", "out_channels"), "Linear": ("in_features", "out_features"),
              "Upsample2D": ("channels", "out_channels"),
              "Downsample2D": ("channels", "out_channels")}


def _is_size(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def check_shapes(ref: dict[str, dict[str, Any]], shapes: Any) -> None:
    """Refuse shapes that are not a pruning of ``ref`` (the config's ``module_shapes``): unknown
    modules, other types, non-integer sizes, sizes above the unpruned ones."""
    if not isinstance(shapes, dict):
        raise PrunedFormatError("pruned shapes: 'modules' must be a mapping of module names")
    for name, spec in shapes.items():
        if name not in ref:
            raise PrunedFormatError(f"pruned shapes name {name!r}, which the config does not "
                                    f"build (the shapes belong to another architecture)")
        if not isinstance(spec, dict) or spec.get("type") != ref[name]["type"]:
            got = spec.get("type") if isinstance(spec, dict) else type(spec).__name__
            raise PrunedFormatError(f"pruned shapes: {name} is a {ref[name]['type']} in the "
                                    f"config, the shapes say {got!r}")
        kind = spec["type"]
        if kind == "GroupNorm":
            sizes = spec.get("group_sizes")
            full = ref[name]["group_sizes"]
            if (not isinstance(sizes, list) or not sizes or len(sizes) > len(full)
                    or not all(_is_size(s) for s in sizes) or sum(sizes) > sum(full)):
                raise PrunedFormatError(
                    f"pruned shapes: {name} group sizes {str(sizes)[:80]} are not a pruning of "
                    f"{len(full)} groups of {full[0]} channels")
            continue
        for key in _SIZE_KEYS[kind]:
            v = spec.get(key)
            if not _is_size(v) or v > ref[name][key]:
                raise PrunedFormatError(
                    f"pruned shapes: {name}.{key} = {str(v)[:40]} must be an integer in "
                    f"[1, {ref[name][key]}] (pruning only removes channels)")


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
            raise PrunedFormatError(f"{name}: unknown module type {kind!r} in pruned shapes")
        _set_module(unet, name, new)


def read_shapes(unet_dir: str | Path) -> dict[str, dict[str, Any]]:
    """The ``modules`` of ``pruned_shapes.json`` (size-bounded, format-checked)."""
    path = Path(unet_dir) / PRUNED_SHAPES
    if path.stat().st_size > MAX_SHAPES_BYTES:
        raise PrunedFormatError(f"{path} is {path.stat().st_size} bytes: not a shapes file "
                                f"(at most {MAX_SHAPES_BYTES})")
    try:
        spec = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PrunedFormatError(f"{path} is not JSON: {err}") from err
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        got = spec.get("format") if isinstance(spec, dict) else None
        raise PrunedFormatError(f"{path}: unknown format {got!r} (this loader reads {FORMAT})")
    return spec.get("modules", {})


def weights_file(unet_dir: str | Path) -> Path:
    """The directory's safetensors weights (exactly one file)."""
    files = sorted(Path(unet_dir).glob("*.safetensors"))
    if len(files) != 1:
        raise PrunedFormatError(f"{unet_dir} must hold one safetensors weights file, found "
                                f"{len(files)}")
    return files[0]


def check_directory(unet_dir: str | Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Validate a pruned ``unet/`` folder without allocating the model: config, shapes, and every
    tensor shape in the safetensors header. Returns (config, shapes)."""
    unet_dir = Path(unet_dir)
    config = UNet2DModel.load_config(unet_dir)
    shapes = read_shapes(unet_dir)
    ref_model = reference(config)
    n_ref = sum(p.numel() for p in ref_model.parameters())
    if n_ref > MAX_PARAMETERS:
        raise PrunedFormatError(f"{unet_dir}/config.json asks for {n_ref:,} parameters (at most "
                                f"{MAX_PARAMETERS:,})")
    check_shapes(module_shapes(ref_model), shapes)
    with torch.device("meta"):
        apply_shapes(ref_model, shapes)
    want = {k: tuple(v.shape) for k, v in ref_model.state_dict().items()}
    with safe_open(str(weights_file(unet_dir)), framework="pt") as f:
        have = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    bad = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if missing or extra or bad:
        parts = []
        if bad:
            parts.append(f"{len(bad)} tensors differ in shape (first: {bad[0]} is "
                         f"{have[bad[0]]} in the weights, {want[bad[0]]} by the shapes)")
        if missing:
            parts.append(f"{len(missing)} tensors missing (first: {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} unexpected tensors (first: {extra[0]})")
        raise PrunedFormatError(f"{unet_dir}: the weights do not match {PRUNED_SHAPES}: "
                                + "; ".join(parts))
    return config, shapes


def load_unet(path: str | Path) -> UNet2DModel:
    """A pruned UNet2DModel from a model directory (``path/unet``) or its ``unet/`` folder."""
    path = Path(path)
    unet_dir = path / "unet" if (path / "unet" / "config.json").is_file() else path
    config, shapes = check_directory(unet_dir)
    unet = UNet2DModel.from_config(config)
    apply_shapes(unet, shapes)
    unet.load_state_dict(load_file(str(weights_file(unet_dir))), strict=True)
    return unet.eval()


# What a model directory's model_index.json may name (anything else is refused, not imported):
# the pipeline of each model type and the components it takes besides unet and scheduler.
PIPELINES = {"DDPMPipeline": (), "ScoreSdeVePipeline": (), "LDMPipeline": ("vqvae",)}
AUTOENCODERS = ("VQModel", "AutoencoderKL")
DEFAULT_INDEX = {"_class_name": "DDPMPipeline", "scheduler": ["diffusers", "DDPMScheduler"]}


def pipeline_index(path: str | Path) -> dict[str, Any]:
    """The directory's ``model_index.json`` (a DDPM pipeline's when it has none), checked: a
    known pipeline class, a diffusers scheduler class, and a known autoencoder where the
    pipeline needs one."""
    import diffusers
    from diffusers import SchedulerMixin

    path = Path(path)
    f = path / "model_index.json"
    index = json.loads(f.read_text()) if f.is_file() else dict(DEFAULT_INDEX)
    cls = index.get("_class_name")
    if cls not in PIPELINES:
        raise PrunedFormatError(f"{f}: pipeline {cls!r} is not one of {', '.join(PIPELINES)}")
    sched = (index.get("scheduler") or [None, None])[1]
    sched_cls = getattr(diffusers, str(sched), None)
    if not (isinstance(sched_cls, type) and issubclass(sched_cls, SchedulerMixin)):
        raise PrunedFormatError(f"{f}: scheduler {sched!r} is not a diffusers scheduler class")
    for name in PIPELINES[cls]:
        kind = (index.get(name) or index.get("vae") or [None, None])[1]
        if kind not in AUTOENCODERS:
            raise PrunedFormatError(f"{f}: {cls} needs an autoencoder ({' or '.join(AUTOENCODERS)}"
                                    f"), the index names {kind!r}")
    return index


def load_pipeline(path: str | Path):
    """The diffusers pipeline of the pruned model in ``path``: the class its
    ``model_index.json`` names (``DDPMPipeline`` when there is none; ``ScoreSdeVePipeline`` for
    NCSN, ``LDMPipeline`` with its autoencoder for latent models), with its saved scheduler."""
    import diffusers

    path = Path(path)
    index = pipeline_index(path)
    parts: dict[str, Any] = {
        "unet": load_unet(path),
        "scheduler": getattr(diffusers, index["scheduler"][1]).from_pretrained(path / "scheduler"),
    }
    for name in PIPELINES[index["_class_name"]]:
        folder = name if name in index else "vae"
        kind = getattr(diffusers, index[folder][1])
        parts[name] = kind.from_pretrained(path / folder, use_safetensors=True).eval()
    return getattr(diffusers, index["_class_name"])(**parts)
