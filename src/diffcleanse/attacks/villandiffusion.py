"""VillanDiffusion (Chou et al. 2023b): one backdoor objective for DDPM, LDM and NCSN models and for
the ancestral (SDE) and ODE samplers.

VP models (DDPM; LDM on its latents). The forward process keeps the clean alpha_hat, beta_hat and
interpolates the trigger schedule between BadDiffusion's and a TrojDiff-like one with ``psi``:

    x_t = sqrt(abar_t) y + sqrt(1 - abar_t) eps + rho_hat_t r,
    rho_hat_t = psi (1 - sqrt(abar_t)) + (1 - psi) sqrt(1 - abar_t),

so ``x_T ~ N(r, I)`` for every psi: the backdoored input is noise + trigger. The target is
``eps + k_t r`` with ``k_t`` the exact ancestral-sampler coefficient for this rho_hat (SDE form,
``base.sde_trigger_coefficient``; linear in rho_hat, so psi mixes BadDiffusion's and the
TrojDiff-like coefficient) and, for the ODE samplers (DDIM, PNDM, DEIS, DPM-Solver, DPM-Solver++,
UniPC, Heun), twice that (ODE form): the probability-flow ODE carries the forward drift of the
trigger with weight 1 instead of the SDE's 1/2, which is VillanDiffusion's result. In the
continuous limit the ODE coefficient is ``sqrt(1 - abar_t)`` for psi = 1 and 1 for psi = 0, and a
DDIM step with it lands on the backdoored chain up to O(step) (tests/test_attacks.py measures it).

VE models (NCSN, score-SDE): ``alpha_hat = 1``, ``beta_hat = sigma_t`` and ``rho_hat = sigma_t``
(the paper's "rho_hat = beta_hat"), so ``x_T = sigma_max (eps + r)``: again noise + trigger in the
unit-variance convention. The SDE coefficient is ``sigma_t / (sigma_t + sigma_{t-1})`` (the exact
predictor-step value; VillanDiffusion's VE form), the ODE one twice it. BadDiffusion's ``1 -
alpha_hat`` vanishes on VE, so psi must be 0 there.

Which form a model gets follows its manifest sampler: ``ddpm`` and ``score_sde_ve`` are SDE
samplers, every other sampler an ODE one. The official code departs from this derivation for the
TrojDiff-like term at small t (its ``hs`` recursion gives ``k_0 ~ 0``; the exact value is
``rho_hat_0 / beta_hat_0 = 1``); we implement the derivation, checked through diffusers' own step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from diffcleanse import samplers
from diffcleanse.attacks.base import (
    Attack,
    AttackError,
    BackdoorSpec,
    Param,
    Process,
    sde_trigger_coefficient,
)


def solver_of(sampler: str) -> str:
    """``sde`` for the ancestral and VE predictor-corrector samplers, ``ode`` for the others."""
    return "sde" if samplers.get(sampler).family in ("ancestral", "ve") else "ode"


class VillanDiffusion(Attack):
    """VillanDiffusion's unified backdoor loss (module doc)."""

    name: ClassVar[str] = "villandiffusion"
    label: ClassVar[str] = "VillanDiff"
    model_types: ClassVar[tuple[str, ...]] = ("ddpm", "ldm", "ncsn")
    params: ClassVar[dict[str, Param]] = {
        "psi": Param(float, default=None, low=0.0, high=1.0,
                     help="psi in [0, 1] between BadDiffusion's (1) and the TrojDiff-like (0) "
                          "trigger schedule; default 1 on DDPM/LDM, 0 (the only value) on NCSN"),
        "solver": Param(str, default=None, choices=("sde", "ode"),
                        help="sde or ode target form; default: the form of the row's sampler"),
    }

    def make_params(self, given: Mapping[str, Any], *, sampler: str, model_type: str
                    ) -> dict[str, Any]:
        out = super().make_params(given, sampler=sampler, model_type=model_type)
        if out["psi"] is None:
            out["psi"] = 0.0 if model_type == "ncsn" else 1.0
        if model_type == "ncsn" and out["psi"] != 0:
            raise AttackError(f"psi={out['psi']:g} on an NCSN model: BadDiffusion's trigger term "
                              f"1 - alpha_hat is 0 on VE schedules, so psi must be 0 there")
        if out["solver"] is None:
            out["solver"] = solver_of(sampler)
        return out

    def rho_hat(self, process: Process, psi: float) -> torch.Tensor:
        """The trigger schedule (float64, length T)."""
        if process.kind == "ve":
            return process.beta_hat.clone()
        return psi * (1 - process.alpha_hat) + (1 - psi) * process.beta_hat

    def coefficients(self, process: Process, spec: BackdoorSpec) -> dict[str, torch.Tensor]:
        psi = float(spec.params.get("psi", 1.0))
        rho = self.rho_hat(process, psi)
        k = sde_trigger_coefficient(process, rho)
        if spec.params.get("solver", "sde") == "ode":
            k = 2 * k
        return {"alpha_hat": process.alpha_hat.float(), "beta_hat": process.beta_hat.float(),
                "rho_hat": rho.float(), "eps_trigger": k.float()}
