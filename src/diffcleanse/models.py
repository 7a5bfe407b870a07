"""Diffusion models on disk: load from a hub id or a local directory, save as diffusers directories.

A model directory has the ``unet/`` + ``scheduler/`` layout that diffusers pipelines use; loading
also accepts the flat layout of ``google/ddpm-cifar10-32`` (``config.json`` + weights +
``scheduler_config.json`` in one folder). Weights are read from safetensors only: a pickle-only
checkpoint (``*.bin``/``*.pt``) is refused unless the caller passes ``allow_pickle=True``, because
unpickling an untrusted file can run arbitrary code.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class ModelLoadError(RuntimeError):
    """A model could not be loaded (missing, pickle-only, malformed or with non-finite weights)."""


def build_unet(
    image_size: int,
    block_out_channels: list[int] | tuple[int, ...] = (32, 64),
    layers_per_block: int = 1,
    attention: bool = True,
    norm_num_groups: int = 8,
    attention_head_dim: int = 8,
    in_channels: int = 3,
) -> UNet2DModel:
    """A small diffusers UNet2DModel; with ``attention`` the lowest-resolution block attends."""
    n = len(block_out_channels)
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    if attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return UNet2DModel(
        sample_size=image_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=norm_num_groups,
        attention_head_dim=attention_head_dim,
    )


def build_scheduler(
    num_train_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    beta_schedule: str = "linear",
) -> DDPMScheduler:
    """A DDPM noise schedule. Betas are given for 1000 steps and rescaled for fewer steps."""
    scale = 1000 / num_train_timesteps
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_start=beta_start * scale,
        beta_end=min(beta_end * scale, 0.999),
        beta_schedule=beta_schedule,
        clip_sample=False,
        variance_type="fixed_small",
    )


def save_model(unet: UNet2DModel, scheduler, path: str | Path) -> None:
    """Write ``unet/`` (config + safetensors) and ``scheduler/`` under ``path`` (no pickles).

    A pruned UNet (shapes that its config does not describe) is written in the pruned format of
    ``diffcleanse.removal.pruned_io`` (config + safetensors + ``pruned_shapes.json``).
    """
    from diffcleanse.removal.pruned_io import pruned_shapes, save_pruned_unet

    path = Path(path)
    if pruned_shapes(unet):
        save_pruned_unet(unet, path / "unet")
    else:
        unet.save_pretrained(path / "unet", safe_serialization=True)
    scheduler.save_pretrained(path / "scheduler")


def _layout(path: Path) -> tuple[Path, Path]:
    """(unet folder, scheduler config file) for either layout."""
    if (path / "unet" / "config.json").is_file():
        unet_dir = path / "unet"
    elif (path / "config.json").is_file():
        unet_dir = path
    else:
        raise ModelLoadError(
            f"{path} is not a diffusers model directory: expected unet/config.json "
            f"(pipeline layout) or config.json (flat layout, as google/ddpm-cifar10-32)"
        )
    for cand in (path / "scheduler" / "scheduler_config.json", path / "scheduler_config.json"):
        if cand.is_file():
            return unet_dir, cand
    raise ModelLoadError(
        f"{path} has no scheduler config (scheduler/scheduler_config.json or scheduler_config.json)"
    )


def _check_weights(unet_dir: Path, allow_pickle: bool) -> bool:
    """True when safetensors weights exist; raises for pickle-only unless allowed."""
    if list(unet_dir.glob("*.safetensors")):
        return True
    pickles = [p.name for p in unet_dir.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles and not allow_pickle:
        raise ModelLoadError(
            f"{unet_dir} holds only pickle weights ({', '.join(pickles)}). Unpickling an untrusted "
            f"file can run arbitrary code, so it is refused. If you trust its source, opt in with "
            f"allow_pickle=True (CLI: --allow-pickle; config: models.allow_pickle: true), "
            f"or convert "
            f"it to safetensors first."
        )
    if not pickles:
        raise ModelLoadError(f"{unet_dir} has no weights file (*.safetensors)")
    return False


def fetch(
    spec: str,
    dest: str | Path | None = None,
    *,
    allow_pickle: bool = False,
    cache_dir: str | None = None,
) -> Path:
    """Resolve ``hub:<repo>[@rev]``, ``local:<path>`` or a bare path/hub id to a local directory.

    Hub downloads take only configs and safetensors (and pickles only when allowed).
    """
    spec = spec.removeprefix("local:")
    if spec.startswith("hub:") or (
        not Path(spec).exists() and spec.count("/") == 1 and not spec.startswith((".", "/"))
    ):
        repo = spec.removeprefix("hub:")
        repo, _, revision = repo.partition("@")
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError

        patterns = ["*.json", "*.safetensors", "*/*.json", "*/*.safetensors"]
        if allow_pickle:
            patterns += ["*.bin", "*/*.bin"]
        try:
            local = snapshot_download(
                repo, revision=revision or None, allow_patterns=patterns, cache_dir=cache_dir
            )
        except (OSError, HFValidationError, ValueError) as err:
            raise ModelLoadError(
                f"could not fetch {repo!r}{'@' + revision if revision else ''} from the hub "
                f"({err}). "
                f"Offline? Download it elsewhere (huggingface-cli download {repo}) and use "
                f"local:<dir>, or set HF_HOME to a cache that holds it."
            ) from err
        src = Path(local)
    else:
        src = Path(spec)
        if not src.exists():
            raise ModelLoadError(f"model directory {src} does not exist")
    if dest is not None:
        shutil.copytree(src, dest, dirs_exist_ok=False)
        return Path(dest)
    return src


def load_model(
    path: str | Path,
    *,
    allow_pickle: bool = False,
    device: str | torch.device = "cpu",
    expected_channels: int | None = None,
) -> tuple[UNet2DModel, dict[str, Any]]:
    """Load (unet, scheduler config dict) from a local directory in either layout.

    Refuses pickle-only weights (see module doc), a channel count other than ``expected_channels``,
    and weights that are not finite. Pruned models (with ``unet/pruned_shapes.json``) are rebuilt
    to their saved shapes by ``diffcleanse.removal.pruned_io.load_pruned_unet``.
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model directory {path} does not exist")
    unet_dir, sched_file = _layout(path)
    use_st = _check_weights(unet_dir, allow_pickle)
    try:
        if (unet_dir / "pruned_shapes.json").is_file():
            from diffcleanse.removal.pruned_io import load_pruned_unet

            unet = load_pruned_unet(unet_dir)
        else:
            unet = UNet2DModel.from_pretrained(
                unet_dir, use_safetensors=use_st, low_cpu_mem_usage=False
            )
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise ModelLoadError(f"could not load a UNet2DModel from {unet_dir}: {err}") from err
    sched_cfg = json.loads(sched_file.read_text())
    if expected_channels is not None and unet.config.in_channels != expected_channels:
        raise ModelLoadError(
            f"{path}: the model takes {unet.config.in_channels} channels, expected "
            f"{expected_channels}"
        )
    bad = [n for n, p in unet.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise ModelLoadError(
            f"{path}: {len(bad)} weight tensors hold NaN/inf (first: {bad[0]}); "
            f"the model is corrupt"
        )
    return unet.to(device).eval(), sched_cfg


def scheduler_from_config(cfg: dict[str, Any]) -> DDPMScheduler:
    """A DDPM scheduler (the training noise schedule) from a saved DDPM-family config."""
    return DDPMScheduler.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
