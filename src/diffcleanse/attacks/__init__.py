"""Backdoor attacks on unconditional diffusion models, one module each, in one registry.

``ATTACKS`` maps a manifest ``attack`` value to its ``Attack`` (``base.py``: the interface, the
clean forward processes, ``BackdoorSpec``): BadDiffusion, VillanDiffusion (SDE/ODE, VP/VE), TrojDiff
(its own DDPM/DDIM samplers) and the adaptive attack of Diff-Cleanse's Appendix G. A new attack is
one module, one entry here and its tests. docs/attacks.md gives every attack's equations.
"""

from __future__ import annotations

import torch

from diffcleanse.attacks.adaptive import Adaptive
from diffcleanse.attacks.baddiffusion import (
    BadDiffusion,
    baddiffusion_coefficients,
    baddiffusion_inputs,
)
from diffcleanse.attacks.base import (
    Attack,
    AttackError,
    BackdoorSpec,
    Param,
    Process,
    VEProcess,
    VPProcess,
    is_class_target,
    parse_params,
    poisoned_batch,
    process_of,
    sde_trigger_coefficient,
)
from diffcleanse.attacks.trojdiff import TrojDiff
from diffcleanse.attacks.villandiffusion import VillanDiffusion

ATTACKS: dict[str, Attack] = {a.name: a for a in (BadDiffusion(), VillanDiffusion(), TrojDiff(),
                                                  Adaptive())}

__all__ = ["ATTACKS", "Attack", "AttackError", "BackdoorSpec", "Param", "Process", "VEProcess",
           "VPProcess", "alphas_cumprod", "baddiffusion_coefficients", "baddiffusion_inputs",
           "clean_inputs", "get", "is_class_target", "names", "parse_params", "poisoned_batch",
           "process_of", "sde_trigger_coefficient"]


def names() -> tuple[str, ...]:
    """Manifest values of the ``attack`` column: ``none`` and every registered attack."""
    return ("none", *ATTACKS)


def get(name: str) -> Attack:
    """The attack registered as ``name``, or an AttackError listing what is implemented."""
    if name not in ATTACKS:
        raise AttackError(f"unknown attack {name!r}: implemented are {', '.join(ATTACKS)} "
                          f"(manifest column `attack`)")
    return ATTACKS[name]


def alphas_cumprod(scheduler) -> torch.Tensor:
    """abar_t for t = 0 .. T-1 from a diffusers scheduler, as float64."""
    return scheduler.alphas_cumprod.to(torch.float64)


def clean_inputs(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, scheduler
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean diffusion (Eq. 12): returns (x_t, training target eps)."""
    return process_of(scheduler).clean(x0, eps, t), eps
