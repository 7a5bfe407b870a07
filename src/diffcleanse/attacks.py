"""Backdoor attacks as forward processes and training targets over a diffusers noise schedule.

BadDiffusion (Chou et al. 2023; Diff-Cleanse Eq. 13) diffuses the target ``y`` towards the trigger:

    x_t = sqrt(abar_t) * y + sqrt(1 - abar_t) * eps + (1 - sqrt(abar_t)) * r,

so ``x_T ~ N(r, I)``: noise plus trigger. The model keeps its ordinary epsilon-parameterisation and
an unchanged DDPM sampler, so its training target must make the sampler's posterior mean equal the
backdoored posterior mean. Writing the shifted chain ``z_t = x_t - r`` (an ordinary DDPM of
``z_0 = y - r``) gives the target ``eps + k_t * r`` with

    k_t = [(1 - sqrt(abar_t)) - sqrt(abar_t) * (1 - c0_t - ct_t) / c0_t] / sqrt(1 - abar_t),

where ``c0_t`` and ``ct_t`` are the DDPM posterior-mean coefficients of ``x_0`` and ``x_t`` for the
step t -> t-1. The correction holds for the full-step DDPM sampler; other samplers need
VillanDiffusion's objective (which is why the manifest names the backdoor sampler).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BackdoorSpec:
    """What an attack implants: additive trigger ``r``, target image ``y``, poison rate."""

    trigger: torch.Tensor  # (3, H, W) additive offset
    target: torch.Tensor  # (3, H, W) in [-1, 1]
    poison_rate: float


def alphas_cumprod(scheduler) -> torch.Tensor:
    """abar_t for t = 0 .. T-1 from a diffusers scheduler, as float64."""
    return scheduler.alphas_cumprod.to(torch.float64)


def baddiffusion_coefficients(scheduler) -> dict[str, torch.Tensor]:
    """Per-timestep coefficients (float32, length T) of BadDiffusion's process and target."""
    abar = alphas_cumprod(scheduler)
    abar_prev = torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
    beta = 1 - abar / abar_prev
    c0 = abar_prev.sqrt() * beta / (1 - abar)
    ct = (abar / abar_prev).sqrt() * (1 - abar_prev) / (1 - abar)
    k = ((1 - abar.sqrt()) - abar.sqrt() * (1 - c0 - ct) / c0) / (1 - abar).sqrt()
    return {
        "alpha_hat": abar.sqrt().float(),
        "beta_hat": (1 - abar).sqrt().float(),
        "rho_hat": (1 - abar.sqrt()).float(),
        "eps_trigger": k.float(),
    }


def _bcast(v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return v.to(t.device)[t].view(-1, 1, 1, 1)


def clean_inputs(
    x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, scheduler
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean diffusion (Eq. 12): returns (x_t, training target eps)."""
    abar = alphas_cumprod(scheduler).float()
    return _bcast(abar.sqrt(), t) * x0 + _bcast((1 - abar).sqrt(), t) * eps, eps


def baddiffusion_inputs(
    y: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, trigger: torch.Tensor, scheduler
) -> tuple[torch.Tensor, torch.Tensor]:
    """BadDiffusion's backdoored x_t (Eq. 13) and its training target ``eps + k_t r``."""
    c = baddiffusion_coefficients(scheduler)
    r = trigger.to(y)
    x_t = (
        _bcast(c["alpha_hat"], t) * y + _bcast(c["beta_hat"], t) * eps + _bcast(c["rho_hat"], t) * r
    )
    return x_t, eps + _bcast(c["eps_trigger"], t) * r


def poisoned_batch(
    x0: torch.Tensor,
    eps: torch.Tensor,
    t: torch.Tensor,
    scheduler,
    spec: BackdoorSpec | None,
    poison_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Model inputs and targets for a batch where ``poison_mask`` rows follow the attack."""
    x_t, target = clean_inputs(x0, eps, t, scheduler)
    if spec is None or poison_mask is None or not bool(poison_mask.any()):
        return x_t, target
    idx = poison_mask.nonzero(as_tuple=True)[0]
    y = spec.target.to(x0).expand(len(idx), -1, -1, -1)
    xb, tb = baddiffusion_inputs(y, eps[idx], t[idx], spec.trigger, scheduler)
    x_t, target = x_t.clone(), target.clone()
    x_t[idx], target[idx] = xb, tb
    return x_t, target
