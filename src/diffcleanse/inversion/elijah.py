"""Elijah's trigger inversion (An et al., AAAI 2024) and its detector's features.

**Inversion.** A backdoored model carries the trigger's distribution shift into its prediction at
the first denoising step: for noise ε ~ N(0, I) and the trigger τ, the batch mean of the
predicted noise at t = T follows τ, not 0. Elijah fits τ to that shift with a fixed batch of noise
ε_1..ε_B (B = 100 up to 127 px, 50 up to 255 px, 20 above; drawn once) by Adam (lr 0.1) on

    ddpm (BadDiffusion, elijah_helper.py):           ℓ(τ) = ‖ mean_b ε_θ(ε_b + τ, T) − λ·τ ‖₁
    ode  (VillanDiffusion ODE, elijah_helper_ddim):  ℓ(τ) = ‖ mean_b ε_θ(ε_b + τ, T) − 2λ·τ ‖₁
    ncsn (VE score models, elijah_helper_ncsn):
         ℓ(τ) = ‖ τ − mean_b (−σ_max/λ)·s_θ(σ_max·(ε_b + τ), σ_max) ‖₁

with λ = 0.5, ‖·‖₁ the mean absolute value over pixels (torch's ``l1_loss``) and T the last
training timestep (``num_train_timesteps − 1`` in diffusers' 0-based indexing; for NCSN the
model's time input is the noise level σ_max). The variants' official initialisations and budgets:
ddpm τ ~ −U(0, 1), 100 epochs; ode τ ~ U(−1, 1), 10 epochs; ncsn τ ~ U(0, 1), 100 epochs. One
epoch is one Adam step on the whole fixed batch. The variant follows the model (NCSN models and
VE samplers: ncsn) and its backdoor sampler's family (ancestral DDPM: ddpm; deterministic ODE
solvers: ode) unless ``variant`` names one. The trivial τ = 0 also has a near-zero loss for any
model (the mean of ε_θ(ε) over clean noise is about 0), so the initialisation matters.

**Features** (``statistics``): on the verdict samples from ``noise + τ`` (decoded, clamped to the
data range as the official pipeline's output is): *uniformity* (``perceptual.uniformity``: the
trimmed mean of pairwise perceptual distances, its ``compute_uniformity``) under the configured
distance, named ``uniformity[<distance>]``, and the mean total variation ``total_variation``
(``perceptual.total_variation``). Elijah's random-forest detector over them is not here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from diffcleanse import perceptual
from diffcleanse.inversion.base import (
    Context,
    InversionError,
    InversionMethod,
    MethodResult,
)
from diffcleanse.population import DetectorSpec

VARIANTS = ("ddpm", "ode", "ncsn")
INITS = ("neg_uniform", "uniform", "symmetric_uniform")
_DEFAULTS = {  # variant: (init, epochs, coefficient of λ in the target)
    "ddpm": ("neg_uniform", 100, 1.0),
    "ode": ("symmetric_uniform", 10, 2.0),
    "ncsn": ("uniform", 100, 1.0),
}


@dataclass(frozen=True)
class ElijahSpec:
    """Elijah's settings (official defaults; None: the variant's own, module doc)."""

    variant: str | None = None  # ddpm | ode | ncsn; None: from the model type and sampler family
    scale: float = 0.5  # λ
    epochs: int | None = None
    lr: float = 0.1
    batch: int | None = None  # None: 100 (< 128 px), 50 (< 256 px), 20
    init: str | None = None  # neg_uniform (−U(0,1)) | uniform (U(0,1)) | symmetric_uniform
    perceptual: str = "pixels-mse"  # distance of the uniformity (perceptual.DISTANCES)
    perceptual_weights: str | None = None  # local LPIPS safetensors for lpips-alex / lpips-vgg
    perceptual_size: int = 64  # LPIPS resizes smaller images to this side
    uniformity_trim: int = 4

    def __post_init__(self) -> None:
        if self.variant is not None and self.variant not in VARIANTS:
            raise ValueError(f"inversion.elijah.variant {self.variant!r}: use one of "
                             f"{', '.join(VARIANTS)} or null")
        if self.init is not None and self.init not in INITS:
            raise ValueError(f"inversion.elijah.init {self.init!r}: use one of {', '.join(INITS)}")
        for name in ("epochs", "batch"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"inversion.elijah.{name} must be at least 1 (or null), got {v}")
        perceptual.check_distance_setting(self.perceptual, self.perceptual_weights,
                                          "inversion.elijah.perceptual")

    def resolved(self, variant: str) -> tuple[str, int, float]:
        """(init, epochs, target coefficient) for ``variant``."""
        init, epochs, coef = _DEFAULTS[variant]
        return self.init or init, self.epochs or epochs, coef


def choose_variant(model_type: str, sampler_family: str) -> str:
    """Elijah's variant for a model type and its backdoor sampler's family (module doc)."""
    if model_type == "ncsn" or sampler_family == "ve":
        return "ncsn"
    return "ddpm" if sampler_family == "ancestral" else "ode"


def official_batch(shape: tuple[int, int, int]) -> int:
    """The official noise batch: 20 from 256 px, 50 from 128 px, else 100."""
    side = max(shape[1:])
    return 20 if side >= 256 else 50 if side >= 128 else 100


def initial_trigger(init: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """τ_0 of shape ``shape``: −U(0, 1), U(0, 1) or U(−1, 1)."""
    u = torch.rand(shape, generator=generator)
    return {"neg_uniform": -u, "uniform": u, "symmetric_uniform": 2 * u - 1}[init]


def sigma_max(scheduler_config: dict[str, Any]) -> float:
    """σ_max of a VE (NCSN) model's saved schedule."""
    if "sigma_max" not in scheduler_config:
        raise InversionError("Elijah's ncsn variant needs sigma_max in the model's scheduler "
                             "config (a ScoreSdeVe schedule)")
    return float(scheduler_config["sigma_max"])


def elijah_loss(unet: torch.nn.Module, noise: torch.Tensor, trigger: torch.Tensor, variant: str,
                scale: float, scheduler_config: dict[str, Any]) -> torch.Tensor:
    """ℓ(τ) of the variant (module doc) on the fixed batch ``noise`` for trigger (1, C, H, W)."""
    x = noise + trigger
    if variant == "ncsn":
        s = sigma_max(scheduler_config)
        t = torch.full((len(x),), s, device=x.device)
        out = unet(s * x, t).sample
        return F.l1_loss(trigger[0], (out * (-s / scale)).mean(dim=0))
    T = int(scheduler_config["num_train_timesteps"]) - 1
    t = torch.full((len(x),), T, device=x.device, dtype=torch.long)
    out = unet(x, t).sample
    coef = _DEFAULTS[variant][2]
    return F.l1_loss(out.mean(dim=0), coef * scale * trigger[0])


def shift_coefficient(unet: torch.nn.Module, scheduler_config: dict[str, Any], r: torch.Tensor,
                      n: int = 100, seed: int = 0) -> float:
    """Elijah's premise as a number: the first-step mean noise shift caused by ``r`` (C, H, W),
    mean over ``n`` noise draws of ε_θ(ε + r, T) − ε_θ(ε, T), projected on ``r``: λ such that the
    shift is λ·r (Elijah assumes 0.5 at a backdoor's trigger)."""
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn((n, *r.shape), generator=g).to(r.device)
    t = torch.full((n,), int(scheduler_config["num_train_timesteps"]) - 1, device=r.device)
    with torch.no_grad():
        shift = (unet(eps + r, t).sample - unet(eps, t).sample).mean(dim=0)
    return float((shift * r).sum() / (r * r).sum())


class Elijah(InversionMethod):
    """Elijah's distribution-shift trigger inversion (module doc)."""

    name = "elijah"
    label = "Elijah"
    Spec = ElijahSpec
    model_types = ("ddpm", "ncsn")
    features = ("uniformity[pixels-mse]", "total_variation")
    # the paper's detector: a random forest over both features, trained on clean and backdoored
    detector = DetectorSpec("random_forest", features)

    def detector_for(self, spec: ElijahSpec) -> DetectorSpec:
        return DetectorSpec("random_forest", (f"uniformity[{spec.perceptual}]",
                                              "total_variation"))

    def variant(self, ctx: Context, spec: ElijahSpec) -> str:
        """The variant this model and sampler get."""
        if spec.variant is not None:
            return spec.variant
        return choose_variant(ctx.model.model_type, ctx.sampler.entry.family)

    def budget(self, spec: ElijahSpec) -> int:
        return spec.epochs or max(e for _, e, _ in _DEFAULTS.values())

    def invert(self, ctx: Context, spec: ElijahSpec) -> MethodResult:
        variant = self.variant(ctx, spec)
        if variant == "ncsn" and ctx.model.model_type != "ncsn":
            raise InversionError(f"Elijah's ncsn variant needs an NCSN (VE) model; this one is "
                                 f"{ctx.model.model_type} (inversion.elijah.variant)")
        if len(ctx.noise) <= 2 * spec.uniformity_trim:  # fail before the work, not after it
            raise InversionError(f"Elijah's uniformity drops {spec.uniformity_trim} samples at "
                                 f"each end: inversion.batch_size must exceed "
                                 f"{2 * spec.uniformity_trim}, got {len(ctx.noise)}")
        init, epochs, coef = spec.resolved(variant)
        batch = spec.batch or official_batch(ctx.shape)
        noise = torch.randn((batch, *ctx.shape), generator=ctx.generator("elijah", "noise"))
        noise = noise.to(ctx.device)
        tau0 = initial_trigger(init, (1, *ctx.shape), ctx.generator("elijah", "init"))
        tau = tau0.clone().to(ctx.device).requires_grad_(True)
        opt = torch.optim.Adam([tau], lr=spec.lr)
        cfg = ctx.model.scheduler_config
        rows: list[dict[str, Any]] = []
        for e in range(epochs):
            loss = elijah_loss(ctx.unet, noise, tau, variant, spec.scale, cfg)
            if not torch.isfinite(loss):
                raise InversionError(f"Elijah's loss became {float(loss)} at epoch {e}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            row = {"iteration": e, "loss": float(loss.detach()),
                   "trigger_norm": float(tau.detach().norm())}
            rows.append(row)
            ctx.report(row)
        with torch.no_grad():
            final = float(elijah_loss(ctx.unet, noise, tau, variant, spec.scale, cfg))
        return MethodResult(
            trigger=tau.detach()[0].cpu(), iterations=epochs, history=rows,
            details={"variant": variant, "init": init, "epochs": epochs, "batch": batch,
                     "target_coefficient": coef * spec.scale, "final_loss": final,
                     "initial_trigger_norm": float(tau0.norm())},
            tensors={"initial_trigger": tau0[0]})

    def statistics(self, ctx: Context, spec: ElijahSpec, result: MethodResult,
                   samples: torch.Tensor) -> dict[str, float]:
        dist = perceptual.make_distance(spec.perceptual, weights=spec.perceptual_weights,
                                        encoder=ctx.encoder, size=spec.perceptual_size,
                                        config_key="inversion.elijah.perceptual")
        return {f"uniformity[{dist.label}]": perceptual.uniformity(samples, dist,
                                                                   spec.uniformity_trim),
                "total_variation": perceptual.total_variation(samples)}
