"""Clean and backdoor sampling: one loop over any diffusers scheduler.

Backdoor sampling starts from ``noise + r`` (the trigger as an additive offset; see ``patterns``).
Sampling never clips the predicted x_0 (``clip_sample=False``) whatever the saved scheduler config
says: clipping erases the trigger's term and hides a backdoor (DESIGN.md measured 1/16 vs 15/16).
The setting is returned in every ``SamplerSpec.describe()`` so records can state it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from tqdm.auto import tqdm

SAMPLERS: dict[str, type] = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}


@dataclass(frozen=True)
class SamplerSpec:
    """Which sampler, how many steps, and the clipping setting used."""

    name: str = "ddpm"
    steps: int | None = None  # None: the schedule's full number of training steps
    clip_sample: bool = False
    eta: float = 0.0  # DDIM only

    def describe(self) -> dict[str, Any]:
        """A JSON-able description for records."""
        return asdict(self)


def make_scheduler(base_config: dict[str, Any], spec: SamplerSpec):
    """A fresh scheduler of the requested kind built from a model's saved scheduler config."""
    if spec.name not in SAMPLERS:
        raise ValueError(f"unknown sampler {spec.name!r}: use one of {', '.join(SAMPLERS)}")
    cfg = {k: v for k, v in dict(base_config).items() if not k.startswith("_")}
    cfg["clip_sample"] = spec.clip_sample
    cfg.pop("thresholding", None)
    sched = SAMPLERS[spec.name].from_config(cfg)
    steps = spec.steps or sched.config.num_train_timesteps
    sched.set_timesteps(steps)
    return sched


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def denoise(
    unet: torch.nn.Module,
    scheduler,
    x_T: torch.Tensor,
    spec: SamplerSpec,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Run the reverse process from x_T for one batch (gradients follow torch's grad mode)."""
    x = x_T
    kwargs = {"eta": spec.eta} if spec.name == "ddim" else {}
    for t in scheduler.timesteps:
        eps = unet(x, t.to(x.device)).sample
        x = scheduler.step(eps, t, x, generator=generator, **kwargs).prev_sample
    return x


@torch.no_grad()
def sample(
    unet: torch.nn.Module,
    scheduler_config: dict[str, Any],
    n: int,
    *,
    spec: SamplerSpec = SamplerSpec(),
    trigger: torch.Tensor | None = None,
    seed: int = 0,
    batch_size: int = 64,
    noise: torch.Tensor | None = None,
    progress: bool = True,
    desc: str = "sampling",
) -> torch.Tensor:
    """Draw ``n`` samples (clean, or backdoor when ``trigger`` is given) in [-1, 1], on CPU.

    The initial noise comes from ``seed`` (or is passed in as ``noise``) so the same call gives the
    same images; stochastic samplers use a generator derived from the same seed.
    """
    unet.eval()
    device = next(unet.parameters()).device
    size = unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    shape = (n, unet.config.in_channels, *size)
    if noise is None:
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    elif tuple(noise.shape) != shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {shape}")
    if trigger is not None and tuple(trigger.shape[-3:]) != shape[1:]:
        raise ValueError(f"trigger has shape {tuple(trigger.shape)}, model expects {shape[1:]}")
    out = []
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    batches = range(0, n, batch_size)
    for start in tqdm(batches, desc=desc, disable=not progress, leave=False):
        x_T = noise[start : start + batch_size].to(device)
        if trigger is not None:
            x_T = x_T + trigger.to(device)
        sched = make_scheduler(scheduler_config, spec)
        out.append(denoise(unet, sched, x_T, spec, generator=gen).clamp(-1, 1).float().cpu())
    return torch.cat(out)
