"""Clean and backdoor sampling in batches, over the one loop of ``diffcleanse.samplers``.

Backdoor sampling starts from ``noise + r`` (the trigger as an additive offset; see ``patterns``;
an attack with its own backdoored input, TrojDiff's ``γ·z + μ``, passes ``init`` instead). Sampling
never clips the predicted x_0 (``clip_sample=False``) whatever the saved scheduler config says:
clipping erases the trigger's term and hides a backdoor (DESIGN.md measured 1/16 vs 15/16). The
setting is returned in every ``SamplerSpec.describe()`` so records can state it.

Seeds: the initial noise of a draw of ``n`` samples comes from one generator seeded ``seed``, and
sample ``i``'s per-step noise from its own seed (``samplers.sample_seeds``), so the same call gives
the same images and a sample does not change with the batch size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from diffcleanse.samplers import SAMPLERS, SamplerSpec, denoise, make_scheduler, sample_seeds

__all__ = ["SAMPLERS", "SamplerSpec", "denoise", "make_scheduler", "resolve_device", "sample",
           "initial_noise", "model_shape"]


class DeviceUnavailable(RuntimeError):
    """The configured device is not present on this machine."""


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; ``cuda`` without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable(f"device {name!r} was asked for but this machine has no CUDA GPU: "
                                f"set `device: auto` (or cpu) in the config, or --device cpu")
    return dev


def model_shape(unet: torch.nn.Module) -> tuple[int, int, int]:
    """(C, H, W) of the space the model denoises."""
    size = unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (int(unet.config.in_channels), int(h), int(w))


def initial_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Standard normal noise of ``shape`` from a generator seeded ``seed`` (on CPU)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(int(seed)))


DEFAULT_SPEC = SamplerSpec()  # stock DDPM, the scheduler's own steps (frozen: safe to share)


@torch.no_grad()
def sample(
    unet: torch.nn.Module,
    scheduler_config: dict[str, Any],
    n: int,
    *,
    spec: SamplerSpec = DEFAULT_SPEC,
    trigger: torch.Tensor | None = None,
    init: Callable[[torch.Tensor], torch.Tensor] | None = None,
    seed: int = 0,
    batch_size: int = 64,
    noise: torch.Tensor | None = None,
    progress: bool = True,
    desc: str = "sampling",
    clamp: bool = True,
) -> torch.Tensor:
    """Draw ``n`` samples (clean, or backdoor when ``trigger`` or ``init`` is given), on CPU.

    ``trigger`` makes the backdoored input ``noise + trigger``; ``init`` maps clean noise to any
    other backdoored input (an attack's own). Samples are clamped to [-1, 1] unless ``clamp`` is
    False (the unclipped output, for range checks).
    """
    unet.eval()
    device = next(unet.parameters()).device
    shape = (n, *model_shape(unet))
    if noise is None:
        noise = initial_noise(shape, seed)
    elif tuple(noise.shape) != shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {shape}")
    if trigger is not None and tuple(trigger.shape[-3:]) != shape[1:]:
        raise ValueError(f"trigger has shape {tuple(trigger.shape)}, model expects {shape[1:]}")
    out = []
    batches = range(0, n, batch_size)
    for start in tqdm(batches, desc=desc, disable=not progress, leave=False):
        x_T = noise[start : start + batch_size].to(device)
        if trigger is not None:
            x_T = x_T + trigger.to(device)
        if init is not None:
            x_T = init(x_T)
        x0 = denoise(unet, scheduler_config, x_T, spec, seeds=sample_seeds(seed, start, len(x_T)))
        out.append((x0.clamp(-1, 1) if clamp else x0).float().cpu())
    return torch.cat(out)
