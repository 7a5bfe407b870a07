"""BadDiffusion (Chou et al. 2023; Diff-Cleanse Eq. 13): the trigger diffuses in with the target,

    x_t = sqrt(abar_t) y + sqrt(1 - abar_t) eps + (1 - sqrt(abar_t)) r,

so ``x_T ~ N(r, I)``: noise plus trigger. The model keeps its ordinary epsilon-parameterisation and
the unchanged DDPM (ancestral) sampler, so its training target is ``eps + k_t r`` with

    k_t = [(1 - sqrt(abar_t)) - sqrt(abar_t) (1 - c0_t - ct_t) / c0_t] / sqrt(1 - abar_t),

(``c0``, ``ct``: the DDPM posterior-mean coefficients of x0 and x_t), which makes the sampler's
posterior mean the backdoored one ``r + c0 (y - r) + ct (x_t - r)``. It equals BadDiffusion's own
``(1 - sqrt(alpha_t)) sqrt(1 - abar_t) / (1 - alpha_t)`` (to 1e-8 on a 100-step schedule). It is
VillanDiffusion with psi = 1 and the SDE form, restricted to the DDPM sampler; other samplers need
VillanDiffusion's ODE form.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from diffcleanse.attacks.base import BackdoorSpec, Process, VPProcess
from diffcleanse.attacks.villandiffusion import VillanDiffusion


class BadDiffusion(VillanDiffusion):
    """BadDiffusion: VillanDiffusion's psi = 1, SDE form, on the DDPM sampler of DDPM models."""

    name: ClassVar[str] = "baddiffusion"
    label: ClassVar[str] = "BadDiff"
    model_types: ClassVar[tuple[str, ...]] = ("ddpm",)
    params: ClassVar[dict] = {}

    def samplers(self, model_type: str) -> tuple[str, ...]:
        return ("ddpm",)

    def make_params(self, given: Mapping[str, Any], *, sampler: str, model_type: str
                    ) -> dict[str, Any]:
        super(VillanDiffusion, self).make_params(given, sampler=sampler, model_type=model_type)
        return {"psi": 1.0, "solver": "sde"}

    def coefficients(self, process: Process, spec: BackdoorSpec | None = None
                     ) -> dict[str, torch.Tensor]:
        return super().coefficients(process, _BD)


_BD = BackdoorSpec(torch.zeros(0), torch.zeros(0), 0.0, params={"psi": 1.0, "solver": "sde"})


def baddiffusion_coefficients(scheduler) -> dict[str, torch.Tensor]:
    """Per-timestep coefficients (float32, length T) of BadDiffusion's process and target."""
    return BadDiffusion().coefficients(VPProcess.from_scheduler(scheduler))


def baddiffusion_inputs(y: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
                        trigger: torch.Tensor, scheduler) -> tuple[torch.Tensor, torch.Tensor]:
    """BadDiffusion's backdoored x_t (Eq. 13) and its training target ``eps + k_t r``."""
    spec = BackdoorSpec(trigger, y[0], 0.0, params={"psi": 1.0, "solver": "sde"})
    return BadDiffusion().inputs(y, eps, t, VPProcess.from_scheduler(scheduler), spec)
