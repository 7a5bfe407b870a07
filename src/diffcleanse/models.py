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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel

from diffcleanse import precision

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
    return precision.attach(UNet2DModel(
        sample_size=image_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=norm_num_groups,
        attention_head_dim=attention_head_dim,
    ))


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


def _safety_check(path: Path, allow_pickle: bool) -> None:
    """Issue 15: ``safety.check_model_dir``, its refusal as a ModelLoadError."""
    from diffcleanse import safety

    try:
        safety.check_model_dir(path, allow_pickle=allow_pickle)
    except safety.InputRefused as err:
        raise ModelLoadError(f"refused: {err}") from err


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
        from huggingface_hub.errors import HFValidationError

        from diffcleanse import safety  # issue 15: bounded hub waits, clear revision errors

        patterns = ["*.json", "*.safetensors", "*/*.json", "*/*.safetensors"]
        if allow_pickle:
            patterns += ["*.bin", "*/*.bin"]
        try:
            local = safety.hub_snapshot(  # issue 15 (was snapshot_download)
                repo, revision or None, patterns, cache_dir=cache_dir
            )
        except safety.InputRefused as err:  # issue 15
            raise ModelLoadError(str(err)) from err
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
    _safety_check(src, allow_pickle)  # issue 15: refuse a hostile directory before copying it
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
    _safety_check(path, allow_pickle)  # issue 15: before anything of the directory is loaded
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
    return precision.attach(unet.to(device).eval()), sched_cfg


def scheduler_from_config(cfg: dict[str, Any]):
    """The training noise schedule from a saved scheduler config: a ``DDPMScheduler`` for
    DDPM-type schedules (DDPM, DDIM, ... configs: DDPM and LDM models), a ``ScoreSdeVeScheduler``
    for score-SDE VE ones (NCSN)."""
    from diffusers import ScoreSdeVeScheduler

    clean = {k: v for k, v in cfg.items() if not k.startswith("_")}
    if cfg.get("_class_name") == "ScoreSdeVeScheduler" or "sigma_max" in cfg:
        return ScoreSdeVeScheduler.from_config(clean)
    return DDPMScheduler.from_config(clean)


# ---------------------------------------------------------------- model types


@dataclass(frozen=True)
class ModelType:
    """One family of diffusion models: where it denoises and how it is laid out on disk."""

    name: str
    schedule: str  # vp (DDPM-type betas) | ve (score-SDE sigmas)
    space: str  # pixels | latents
    pixel_range: tuple[float, float]  # value range of pixel-space samples (-1..1, or 0..1)
    pipeline: str  # diffusers pipeline class of the layout (model_index.json)
    layout: str  # what the directory holds


MODEL_TYPES: dict[str, ModelType] = {
    "ddpm": ModelType("ddpm", "vp", "pixels", (-1.0, 1.0), "DDPMPipeline",
                      "unet/ + scheduler/ (google/ddpm-cifar10-32; also the flat layout)"),
    "ncsn": ModelType("ncsn", "ve", "pixels", (0.0, 1.0), "ScoreSdeVePipeline",
                      "unet/ (Fourier sigma embedding) + scheduler/ (ScoreSdeVeScheduler), pixels "
                      "in [0, 1] (google/ncsnpp-*)"),
    "ldm": ModelType("ldm", "vp", "latents", (-1.0, 1.0), "LDMPipeline",
                     "unet/ over latents + vqvae/ (VQModel) or vae/ (AutoencoderKL) + scheduler/ "
                     "(CompVis/ldm-celebahq-256)"),
}


def model_type_of(path: str | Path) -> str:
    """The model type of a model directory (model_index.json, else the folders it holds)."""
    path = Path(path)
    index = path / "model_index.json"
    if index.is_file():
        cls = json.loads(index.read_text()).get("_class_name", "")
        for mt in MODEL_TYPES.values():
            if mt.pipeline == cls:
                return mt.name
    if (path / "vqvae").is_dir() or (path / "vae").is_dir():
        return "ldm"
    for cand in (path / "scheduler" / "scheduler_config.json", path / "scheduler_config.json"):
        if cand.is_file():
            cfg = json.loads(cand.read_text())
            if cfg.get("_class_name") == "ScoreSdeVeScheduler" or "sigma_max" in cfg:
                return "ncsn"
            break
    return "ddpm"


def build_ncsn_scheduler(num_train_timesteps: int = 100, sigma_min: float = 0.01,
                         sigma_max: float = 10.0, snr: float = 0.16, correct_steps: int = 1):
    """A score-SDE VE schedule (geometric sigmas; google/ncsnpp uses sigma_max 348-1348, 2000
    steps; tiny 8-16 px digits in [0, 1] need sigma_max ~ 10, their largest pairwise distance)."""
    from diffusers import ScoreSdeVeScheduler

    return ScoreSdeVeScheduler(num_train_timesteps=num_train_timesteps, sigma_min=sigma_min,
                               sigma_max=sigma_max, snr=snr, correct_steps=correct_steps)


def build_ncsn_unet(image_size: int, **unet_kwargs: Any) -> UNet2DModel:
    """A small UNet2DModel conditioned on sigma (Fourier embedding; it outputs the score, as
    google/ncsnpp-* do)."""
    unet = build_unet(image_size, **unet_kwargs)
    cfg = dict(unet.config)
    cfg["time_embedding_type"] = "fourier"
    cfg["flip_sin_to_cos"] = True
    return precision.attach(
        UNet2DModel.from_config({k: v for k, v in cfg.items() if not k.startswith("_")}))


def build_vqvae(in_channels: int = 3, block_out_channels: tuple[int, ...] = (32, 64),
                latent_channels: int = 3, num_vq_embeddings: int = 256,
                norm_num_groups: int = 8):
    """A small diffusers VQModel (each extra block halves the side: (32, 64) -> latents at 1/2)."""
    from diffusers import VQModel

    n = len(block_out_channels)
    return VQModel(in_channels=in_channels, out_channels=in_channels,
                   down_block_types=("DownEncoderBlock2D",) * n,
                   up_block_types=("UpDecoderBlock2D",) * n,
                   block_out_channels=tuple(block_out_channels), layers_per_block=1,
                   latent_channels=latent_channels, num_vq_embeddings=num_vq_embeddings,
                   vq_embed_dim=latent_channels, norm_num_groups=norm_num_groups,
                   scaling_factor=1.0)


def train_vqvae(images: torch.Tensor, *, steps: int = 600, batch_size: int = 64,
                lr: float = 1e-3, seed: int = 0, progress: bool = False, **arch: Any):
    """Train a small VQ autoencoder on images in [-1, 1] (reconstruction + VQ losses); sets its
    ``scaling_factor`` to 1 / std of the latents so the latent diffusion sees unit variance."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    vae = build_vqvae(in_channels=images.shape[1], **arch)
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    vae.train()
    for _ in tqdm(range(steps), desc="autoencoder", disable=not progress, mininterval=2.0):
        x = images[torch.randint(0, len(images), (batch_size,), generator=g)]
        out = vae(x)
        loss = torch.nn.functional.mse_loss(out.sample, x) + out.commit_loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        z = torch.cat([vae.encode(images[i:i + 256]).latents for i in range(0, len(images), 256)])
    vae.register_to_config(scaling_factor=float(1.0 / z.std().clamp_min(1e-6)))
    return vae


def _load_autoencoder(path: Path, allow_pickle: bool, device: str | torch.device):
    """The autoencoder of an LDM directory (vqvae/ VQModel or vae/ AutoencoderKL), checked."""
    from diffusers import AutoencoderKL, VQModel

    for name, cls in (("vqvae", VQModel), ("vae", AutoencoderKL)):
        d = path / name
        if (d / "config.json").is_file():
            use_st = _check_weights(d, allow_pickle)
            try:
                vae = cls.from_pretrained(d, use_safetensors=use_st, low_cpu_mem_usage=False)
            except (OSError, ValueError, RuntimeError, KeyError) as err:
                raise ModelLoadError(f"could not load a {cls.__name__} from {d}: {err}") from err
            bad = [n for n, p in vae.named_parameters() if not torch.isfinite(p).all()]
            if bad:
                raise ModelLoadError(f"{d}: {len(bad)} weight tensors hold NaN/inf (first: "
                                     f"{bad[0]}); the autoencoder is corrupt")
            return vae.to(device).eval().requires_grad_(False)
    raise ModelLoadError(f"{path} is an LDM directory without an autoencoder: expected "
                         f"vqvae/config.json (VQModel) or vae/config.json (AutoencoderKL)")


@dataclass
class DiffusionModel:
    """A loaded diffusion model as every stage sees it: the denoiser (``unet``, what removal
    prunes), its saved noise schedule, its type (``MODEL_TYPES``), and maps between images in
    [-1, 1] and the space it denoises: ``encode``/``decode`` (the identity for DDPM; ``x -> (x +
    1) / 2`` for NCSN, whose pixels live in [0, 1]; the autoencoder for LDMs, latents scaled by its
    ``scaling_factor`` as diffusers' LDMPipeline does).

    Triggers live in the denoised space (inversion adds them to the sampler's input): for an LDM
    that is the latent space, and an image-space trigger ``r`` maps to the latent offset it makes
    on a black image, ``E(clip(-1 + r)) - E(-1)`` (``trigger_to_space``); for NCSN to ``r / 2``.
    """

    unet: torch.nn.Module
    scheduler_config: dict[str, Any]
    model_type: str = "ddpm"
    vae: torch.nn.Module | None = None

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ModelLoadError(f"unknown model type {self.model_type!r}: implemented are "
                                 f"{', '.join(MODEL_TYPES)}")
        if self.model_type == "ldm" and self.vae is None:
            raise ModelLoadError("an LDM needs its autoencoder (vae)")

    @property
    def info(self) -> ModelType:
        """The model type's registry entry."""
        return MODEL_TYPES[self.model_type]

    @property
    def space_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the space the denoiser works in (where triggers live)."""
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (int(self.unet.config.in_channels), int(h), int(w))

    @property
    def device(self) -> torch.device:
        """The device of the denoiser's weights."""
        return next(self.unet.parameters()).device

    @property
    def scaling_factor(self) -> float:
        """The LDM's latent scaling (1 for pixel-space models)."""
        if self.vae is None:
            return 1.0
        return float(getattr(self.vae.config, "scaling_factor", 1.0) or 1.0)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (unclipped) from samples of the denoised space."""
        if self.model_type == "ncsn":
            return 2 * x - 1
        if self.vae is None:
            return x
        vae = self.vae.to(x.device)
        return vae.decode(x / self.scaling_factor).sample

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Points of the denoised space for images in [-1, 1] (targets, training data)."""
        if self.model_type == "ncsn":
            return (images + 1) / 2
        if self.vae is None:
            return images
        vae, out = self.vae, []
        with torch.no_grad():
            for i in range(0, len(images), 256):
                x = images[i:i + 256].to(self.device)
                out.append(vae.to(x.device).encode(x).latents * self.scaling_factor)
        return torch.cat(out)

    def trigger_to_space(self, trigger: torch.Tensor) -> torch.Tensor:
        """An image-space additive trigger (3, H, W) as an offset of the denoised space."""
        if self.model_type == "ncsn":
            return trigger / 2
        if self.vae is None:
            return trigger
        black = -torch.ones((1, *trigger.shape), dtype=trigger.dtype)
        z = self.encode(torch.cat([(black[0] + trigger).clamp(-1, 1)[None], black]))
        return (z[0] - z[1]).cpu()

    def training_scheduler(self):
        """The training noise schedule (DDPMScheduler or ScoreSdeVeScheduler)."""
        return scheduler_from_config(self.scheduler_config)

    def save(self, path: str | Path) -> None:
        """Write the model in its diffusers layout (safetensors only; model_index.json for the
        pipeline class, so ``DiffusionPipeline.from_pretrained`` loads NCSN and LDM dirs)."""
        path = Path(path)
        save_model(self.unet, self.training_scheduler(), path)
        if self.scheduler_config.get("_class_name"):  # keep the saved scheduler class (DDIM, ...)
            (path / "scheduler" / "scheduler_config.json").write_text(
                json.dumps(self.scheduler_config, indent=2, sort_keys=True) + "\n")
        if self.model_type == "ddpm":
            return
        comps: dict[str, Any] = {"_class_name": self.info.pipeline,
                                 "unet": ["diffusers", "UNet2DModel"],
                                 "scheduler": ["diffusers",
                                               self.scheduler_config.get("_class_name")
                                               or type(self.training_scheduler()).__name__]}
        if self.vae is not None:
            name = "vqvae" if type(self.vae).__name__ == "VQModel" else "vae"
            self.vae.save_pretrained(path / name, safe_serialization=True)
            comps[name] = ["diffusers", type(self.vae).__name__]
        (path / "model_index.json").write_text(json.dumps(comps, indent=2) + "\n")


def load_pipeline(path: str | Path, *, allow_pickle: bool = False,
                  device: str | torch.device = "cpu",
                  expected_channels: int | None = None) -> DiffusionModel:
    """Load a model directory as a ``DiffusionModel`` of its type (``model_type_of``): every check
    of ``load_model`` applies to the UNet, and the same to an LDM's autoencoder."""
    path = Path(path)
    unet, sched_cfg = load_model(path, allow_pickle=allow_pickle, device=device,
                                 expected_channels=expected_channels)
    mtype = model_type_of(path)
    vae = _load_autoencoder(path, allow_pickle, device) if mtype == "ldm" else None
    return DiffusionModel(unet=unet, scheduler_config=sched_cfg, model_type=mtype, vae=vae)
