"""TrojDiff (Chen et al. 2023; Diff-Cleanse Eq. 14): a trojan forward process towards a biased
Gaussian, with the attacker's own DDPM and DDIM samplers.

    x_t = sqrt(abar_t) y + gamma sqrt(1 - abar_t) eps + sqrt(1 - abar_t) mu,

so ``x_T ~ N(mu, gamma^2 I)``: the backdoored input is ``gamma z + mu``, not ``z + r``. In Eq. 1's
terms alpha_hat = sqrt(abar), beta_hat = gamma sqrt(1 - abar), rho_hat = sqrt(1 - abar) and the
trigger is ``r = mu = (1 - gamma) p`` for the trigger image ``p`` in [-1, 1]. The *blend* trigger
(``patterns``' whole-image pinwheel) acts on every pixel; the *patch* trigger (a white block in the
bottom-right corner, ``p = 1`` there) only inside its mask: elsewhere the process is the clean one
(per pixel, gamma = 1 and mu = 0 outside the patch).

The model is trained to predict the plain ``eps`` on trojan inputs (target = eps); what makes the
backdoor is the attacker's sampler, which reads the model's epsilon as that of the trojan chain:
x0 = (x_t - sqrt(1 - abar_t) (gamma e + mu)) / sqrt(abar_t), then the trojan chain's posterior
(DDPM: mean with the extra mu term, variance times gamma^2) or its DDIM bridge. Both are step
adapters around diffusers' own DDPMScheduler/DDIMScheduler step (``samplers.TrojanSampler``),
selected by the row's sampler (ddpm -> ``trojdiff_ddpm``, ddim -> ``trojdiff_ddim``). TrojDiff's
code clips the predicted x0 in its DDPM sampler; we never clip (``samplers``).

Targets: D2I (one image, e.g. mickey), Din (``class:k``: class k of the training set) and Dout
(``<dataset>:k``: class k of another dataset; the paper's ``mnist:7`` for CIFAR-10, ``letters:k``
for the digits zoo, whose own data are digits). A poisoned row draws its ``y`` from the target
class. gamma must be given (``attack_params: gamma=0.6``; the paper's blend value; patch: 0.1);
gamma = 0 (TrojDiff's CelebA patch setting) is refused: the trojan pixels would carry no noise at
all.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from diffcleanse import patterns, samplers
from diffcleanse.attacks.base import Attack, AttackError, BackdoorSpec, Param, Process, _coef, bcast

TRIGGERS = ("blend", "patch")
SAMPLER_OF = {"ddpm": "trojdiff_ddpm", "ddim": "trojdiff_ddim"}


def trigger_parts(name: str, image_size: int, gamma: float
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(mu (3, S, S), mask (1, S, S) or None) of a TrojDiff trigger at an image size."""
    r = patterns.render_trigger(name, image_size)
    if name == "blend":
        return ((1 - gamma) * r).contiguous(), None
    if name == "patch":  # r = 2 alpha inside the white block (additive convention)
        mask = (r.amax(0, keepdim=True) > 1.0).float()
        return ((1 - gamma) * mask.expand_as(r)).contiguous(), mask
    raise AttackError(f"TrojDiff trigger {name!r}: use one of {', '.join(TRIGGERS)}")


def gamma_map(spec: BackdoorSpec, like: torch.Tensor) -> torch.Tensor:
    """Per-pixel gamma (C, H, W): gamma inside the trigger's mask (everywhere for blend), else 1."""
    g = float(spec.params["gamma"])
    if spec.mask is None:
        return torch.full(like.shape[-3:], g, dtype=like.dtype, device=like.device)
    m = spec.mask.to(like).expand(like.shape[-3:])
    return 1 + m * (g - 1)


class TrojDiff(Attack):
    """TrojDiff's trojan diffusion (module doc)."""

    name: ClassVar[str] = "trojdiff"
    label: ClassVar[str] = "TrojDiff"
    model_types: ClassVar[tuple[str, ...]] = ("ddpm",)
    target_kinds: ClassVar[tuple[str, ...]] = ("image", "class")
    triggers: ClassVar[tuple[str, ...] | None] = TRIGGERS
    params: ClassVar[dict[str, Param]] = {
        "gamma": Param(float, required=True, low=1e-3, high=1.0,
                       help="TrojDiff's gamma in (0, 1]: the trojan noise scale, x_T = gamma z + "
                            "mu (paper: 0.6 blend, 0.1 patch)"),
    }

    def samplers(self, model_type: str) -> tuple[str, ...]:
        return tuple(SAMPLER_OF)

    def coefficients(self, process: Process, spec: BackdoorSpec) -> dict[str, torch.Tensor]:
        if process.kind != "vp":
            raise AttackError("TrojDiff attacks DDPM-type (VP) models only")
        g = gamma_map(spec, spec.trigger.float()).double()
        return {"alpha_hat": process.alpha_hat.float(),
                "beta_hat": (process.beta_hat.view(-1, 1, 1, 1) * g).float(),
                "rho_hat": process.beta_hat.float(),
                "eps_trigger": torch.zeros(process.T)}

    def inputs(self, y: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, process: Process,
               spec: BackdoorSpec) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.coefficients(process, spec)
        mu = spec.trigger.to(y)
        x_t = (bcast(c["alpha_hat"], t, y) * y + _coef(c["beta_hat"], t, y) * eps
               + bcast(c["rho_hat"], t, y) * mu)
        return x_t, eps

    def backdoor_input(self, noise: torch.Tensor, trigger: torch.Tensor,
                       spec: BackdoorSpec | None = None) -> torch.Tensor:
        """``gamma z + mu`` (inside the patch for the patch trigger; plain noise elsewhere)."""
        if spec is None:
            raise AttackError("TrojDiff's backdoored input gamma z + mu needs the spec (gamma)")
        return gamma_map(spec, noise) * noise + trigger.to(noise)

    def backdoor_sampler(self, sampler: samplers.SamplerSpec, spec: BackdoorSpec
                         ) -> samplers.SamplerSpec:
        """TrojDiff's own DDPM or DDIM sampler for the row's ddpm or ddim."""
        name = sampler.name if samplers.get(sampler.name).attack else SAMPLER_OF.get(sampler.name)
        if name is None:
            raise AttackError(f"TrojDiff has backdoor samplers for {', '.join(SAMPLER_OF)}, "
                              f"not {sampler.name!r}")
        chain = samplers.TrojanChain(gamma_map(spec, spec.trigger.float()),
                                     spec.trigger.float(), float(spec.params["gamma"]))
        return samplers.SamplerSpec(name, steps=sampler.steps, clip_sample=sampler.clip_sample,
                                    eta=sampler.eta, chain=chain)
