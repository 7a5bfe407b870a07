"""PureDiffusion's multi-timestep trigger inversion (Truong & Le, 2024) and its uniform score.

Notation: ᾱ_t the noise schedule, BadDiffusion's backdoored forward process
``x_t^b = √ᾱ_t·y + √(1−ᾱ_t)·ε + (1−√ᾱ_t)·r`` (``attacks.baddiffusion_inputs``), ε_θ the model.

**1. Trigger-shift scales λ_t.** A BadDiffusion model learns ``ε_θ(x_t^b, t) ≈ ε + λ_t·r`` with
λ_t independent of the trigger (the paper's Proposition 1; for BadDiffusion λ_t is the schedule's
``k_t``, ``attacks.baddiffusion_coefficients(...)["eps_trigger"]``). ``scales``:

* ``surrogate`` (the paper's): implant a known surrogate trigger r_s → target y_s into a COPY of
  the model by brief BadDiffusion fine-tuning (``training.train`` with ``attacks.BackdoorSpec``;
  400 steps, batch 32, lr 2e-4, poison rate 0.5) on clean images the model itself draws (256,
  ``sampling.sample``; the defender has no data), then estimate λ_t on the copy by least squares
  (the paper's Eqs. 14-15), averaged over a batch of ε and BadDiffusion's forward process on the
  defender's own y_s: ``λ_t = mean_b ⟨ε_θ'(x_t^b, t) − ε_b, r_s⟩ / ‖r_s‖²``
  (``estimate_scales``). The paper fixes neither the surrogate pair nor the fine-tuning budget.
  r_s is the glasses pattern over a −1 background (``surrogate_background``: a whole-image offset,
  as the official BadDiffusion triggers are), because a brief fine-tuning learns such a trigger
  and not a small local one: on the tiny test model after 400 steps the copy's λ at the first 10
  steps averaged 0.67-0.73 for the bare glasses (norm 3.3; 0.99 before fine-tuning, k_t 0.556)
  and 0.556-0.558 over the −1 background (norm 13).
* ``analytic``: ``λ_t = k_t`` from the model's schedule alone (BadDiffusion's process assumed).

Records say which (``details.scales``).

**2. Multi-timestep inversion** (Eqs. 16-17, whose formulas the text lost). Our reading: with a
fixed batch ε_1..ε_B (B = 40) and x^{(0)} = ε_b + r, run the model's own backdoor sampler
(``samplers.denoise``, the one loop, differentiable) and let ε̂_j(r) be the batch mean of the
predicted noise at the j-th denoising step (timestep t_j, j = 0 .. k−1, k = 10); then

    r* = argmin_r  E_{j ~ U{0..k−1}}  ‖ ε̂_j(r) − λ_{t_j}·r ‖₁,

one Adam step (lr 0.1) per epoch on one sampled j (30 epochs), the gradient passing through the
j + 1 UNet calls of the chain. Why this reading: the text says the loss fits "the neural network's
output at timestep t, given that its input at the first denoising step contains the trigger" to
the trigger shift λ_t·r, with t sampled from the first k steps and the gradient passing through
the network from the first step to t; it extends Elijah (whose loss is exactly this at j = 0 with
λ = 0.5, L1 of batch means), and it is what the scales are for: along a backdoored chain x_t
follows the backdoored marginal, so ε_θ(x_t, t) = ε' + λ_t r with ε' averaging to 0 over the
batch. ``loss: l2`` (mean squared instead of L1) and ``visited: all`` (the sum over every step
0..j the chain visits, not only the sampled one) are the other readings, off by default. The
initialisation (unstated) is Elijah's −U(0, 1).

**3. Uniform score** (``statistics``): the mean distance over the N(N−1)/2 pairs of distinct
verdict samples from ``noise + r`` (``perceptual.mean_pairwise``; lower is more uniform), named
``uniform_score[<distance>]``. The paper's "total distance of every pair" fixes neither the
distance nor the normalisation; we take the mean over pairs (so it does not grow with N) and the
pixel MSE on [0, 1] images by default. ASR and L2 to the true trigger need ground truth: the
evaluation computes them, never this method.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from diffcleanse import attacks, perceptual, samplers
from diffcleanse.inversion.base import (
    Context,
    InversionError,
    InversionMethod,
    MethodResult,
    UNetCounter,
)
from diffcleanse.inversion.elijah import INITS, initial_trigger
from diffcleanse.population import DetectorSpec
from diffcleanse.records import derive_seed

SCALES = ("surrogate", "analytic")
LOSSES = ("l1", "l2")
VISITED = ("last", "all")


@dataclass(frozen=True)
class PureDiffusionSpec:
    """PureDiffusion's settings (the paper's where it gives them; module doc)."""

    scales: str = "surrogate"  # surrogate (paper) | analytic (BadDiffusion's k_t)
    surrogate_trigger: str = "glasses"  # patterns name (or file:<path>) of r_s's pattern
    surrogate_background: float = -1.0  # added to r_s everywhere (module doc)
    surrogate_target: str = "cat"  # patterns name of y_s
    surrogate_images: int = 256  # clean images the model draws for the fine-tuning
    surrogate_steps: int = 400  # BadDiffusion fine-tuning steps on the copy
    surrogate_batch: int = 32
    surrogate_lr: float = 2e-4
    surrogate_poison_rate: float = 0.5
    scale_batch: int = 64  # samples per timestep of the least-squares estimate
    k: int = 10  # first k denoising steps
    batch: int = 40
    epochs: int = 30
    lr: float = 0.1
    init: str = "neg_uniform"
    loss: str = "l1"
    visited: str = "last"  # last: the sampled step only; all: every step up to it
    perceptual: str = "pixels-mse"  # distance of the uniform score (perceptual.DISTANCES)
    perceptual_weights: str | None = None
    perceptual_size: int = 64

    def __post_init__(self) -> None:
        for name, allowed in (("scales", SCALES), ("loss", LOSSES), ("visited", VISITED),
                              ("init", INITS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"inversion.purediffusion.{name} {getattr(self, name)!r}: use "
                                 f"one of {', '.join(allowed)}")
        for name in ("surrogate_images", "surrogate_steps", "surrogate_batch", "scale_batch",
                     "k", "batch", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"inversion.purediffusion.{name} must be at least 1")
        if not 0 < self.surrogate_poison_rate <= 1:
            raise ValueError("inversion.purediffusion.surrogate_poison_rate must lie in (0, 1]")
        perceptual.check_distance_setting(self.perceptual, self.perceptual_weights,
                                          "inversion.purediffusion.perceptual")


def analytic_scales(scheduler_config: dict[str, Any]) -> torch.Tensor:
    """BadDiffusion's λ_t = k_t for t = 0 .. T−1 from a saved schedule."""
    from diffcleanse.models import scheduler_from_config

    return attacks.baddiffusion_coefficients(scheduler_from_config(scheduler_config))[
        "eps_trigger"]


@torch.no_grad()
def estimate_scales(unet: torch.nn.Module, scheduler_config: dict[str, Any],
                    trigger: torch.Tensor, target: torch.Tensor, timesteps: list[int], *,
                    batch: int, generator: torch.Generator) -> torch.Tensor:
    """Least-squares λ_t (Eq. 15) at each of ``timesteps``: the batch mean of
    ``⟨ε_θ(x_t^b, t) − ε, r⟩ / ‖r‖²`` with x_t^b BadDiffusion's forward process of ``target``
    under ``trigger`` (both (C, H, W)). Returns a float tensor (len(timesteps),)."""
    from diffcleanse.models import scheduler_from_config

    sched = scheduler_from_config(scheduler_config)
    device = next(unet.parameters()).device
    r = trigger.to(device).float()
    rr = float(r.pow(2).sum())
    if rr == 0:
        raise InversionError("the least-squares scale needs a non-zero trigger")
    y = target.to(device).float().expand(batch, -1, -1, -1)
    out = []
    for t in timesteps:
        eps = torch.randn((batch, *r.shape), generator=generator).to(device)
        tt = torch.full((batch,), int(t), device=device, dtype=torch.long)
        x_t, _ = attacks.baddiffusion_inputs(y, eps, tt, r, sched)
        shift = (unet(x_t, tt).sample - eps).flatten(1) @ r.flatten()
        out.append(float((shift / rr).mean()))
    return torch.tensor(out)


def synthesise_clean(ctx: Context, n: int, seed: int) -> torch.Tensor:
    """``n`` clean images the model draws with its own sampler (clamped to [-1, 1]; a DDPM
    model's denoised space is its image space)."""
    from diffcleanse import sampling

    x = sampling.sample(ctx.unet, ctx.model.scheduler_config, n, spec=ctx.sampler, seed=seed,
                        batch_size=64, progress=False)
    return x.to(ctx.device)


def implant_surrogate(ctx: Context, spec: PureDiffusionSpec) -> tuple[torch.nn.Module,
                                                                      dict[str, Any]]:
    """A copy of the model with the surrogate backdoor r_s → y_s fine-tuned in (module doc)."""
    from diffcleanse import patterns, training
    from diffcleanse.models import scheduler_from_config

    c, h, w = ctx.shape
    r_s = patterns.render_trigger(spec.surrogate_trigger, h) + spec.surrogate_background
    y_s = patterns.render_target(spec.surrogate_target, h, spec.surrogate_trigger)
    if r_s.shape != (c, h, w):
        raise InversionError(f"the surrogate trigger has shape {tuple(r_s.shape)}, the model "
                             f"denoises {ctx.shape} (PureDiffusion needs a pixel-space model)")
    data = synthesise_clean(ctx, spec.surrogate_images, derive_seed(ctx.seed, "pd", "clean"))
    cfg = training.TrainConfig(steps=spec.surrogate_steps, batch_size=spec.surrogate_batch,
                               lr=spec.surrogate_lr,
                               warmup_steps=max(1, spec.surrogate_steps // 10),
                               seed=derive_seed(ctx.seed, "pd", "surrogate"))
    attack = attacks.BackdoorSpec(trigger=r_s, target=y_s, poison_rate=spec.surrogate_poison_rate)
    copy_ = copy.deepcopy(ctx.unet)
    copy_._forward_hooks.clear()  # a deep copy would carry the runner's UNet counter along
    counter = UNetCounter(copy_)
    try:
        with torch.enable_grad():
            ema, hist = training.train(copy_, scheduler_from_config(ctx.model.scheduler_config),
                                       data, cfg, attack=attack, device=ctx.device,
                                       progress=False)
    finally:
        counter.close()
    ema = ema.eval().requires_grad_(False)
    losses = hist["losses"]
    tail = losses[-max(1, len(losses) // 10):]
    return ema, {"trigger": spec.surrogate_trigger, "background": spec.surrogate_background,
                 "trigger_norm": float(r_s.norm()), "target": spec.surrogate_target,
                 "images": spec.surrogate_images, "steps": spec.surrogate_steps,
                 "final_loss": sum(tail) / len(tail), "training_unet_rows": counter.rows,
                 "r_s": r_s, "y_s": y_s}


def visited_timesteps(ctx: Context, k: int) -> list[int]:
    """The training timesteps of the first ``k`` steps of the model's backdoor sampler."""
    ts = samplers.make_scheduler(ctx.model.scheduler_config, ctx.sampler).timesteps
    if k > len(ts):
        raise InversionError(f"inversion.purediffusion.k = {k} exceeds the sampler's "
                             f"{len(ts)} steps")
    return [int(t) for t in ts[:k]]


def shift_loss(eps_mean: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """L1 (mean absolute) or L2 (mean squared) between a batch-mean prediction and λ·r."""
    return F.l1_loss(eps_mean, target) if kind == "l1" else F.mse_loss(eps_mean, target)


class PureDiffusion(InversionMethod):
    """PureDiffusion (module doc)."""

    name = "purediffusion"
    label = "PureDiffusion"
    Spec = PureDiffusionSpec
    model_types = ("ddpm",)
    features = ("uniform_score[pixels-mse]",)
    # a threshold on the uniform score (lower: more uniform, a backdoor); the paper gives none
    detector = DetectorSpec("threshold", features, higher_is_backdoored=False)

    def detector_for(self, spec: PureDiffusionSpec) -> DetectorSpec:
        return DetectorSpec("threshold", (f"uniform_score[{spec.perceptual}]",),
                            higher_is_backdoored=False)

    def budget(self, spec: PureDiffusionSpec) -> int:
        return spec.epochs

    def scales(self, ctx: Context, spec: PureDiffusionSpec, timesteps: list[int]
               ) -> tuple[torch.Tensor, dict[str, Any]]:
        """λ at ``timesteps`` and what produced them (module doc, step 1)."""
        k_t = analytic_scales(ctx.model.scheduler_config)
        analytic = torch.stack([k_t[t] for t in timesteps]).float()
        info: dict[str, Any] = {"scales": spec.scales, "analytic": analytic.tolist()}
        if spec.scales == "analytic":
            return analytic, info
        surrogate, s_info = implant_surrogate(ctx, spec)
        lam = estimate_scales(surrogate, ctx.model.scheduler_config, s_info.pop("r_s"),
                              s_info.pop("y_s"), timesteps, batch=spec.scale_batch,
                              generator=ctx.generator("pd", "scales"))
        del surrogate
        info["surrogate"] = s_info
        return lam, info

    def invert(self, ctx: Context, spec: PureDiffusionSpec) -> MethodResult:
        ts = visited_timesteps(ctx, spec.k)
        lam, info = self.scales(ctx, spec, ts)
        lam = lam.to(ctx.device)
        noise = torch.randn((spec.batch, *ctx.shape), generator=ctx.generator("pd", "noise"))
        noise = noise.to(ctx.device)
        seeds = samplers.sample_seeds(derive_seed(ctx.seed, "pd", "steps"), 0, spec.batch)
        r0 = initial_trigger(spec.init, (1, *ctx.shape), ctx.generator("pd", "init"))
        r = r0.clone().to(ctx.device).requires_grad_(True)
        opt = torch.optim.Adam([r], lr=spec.lr)
        pick = ctx.generator("pd", "steps-drawn")
        rows: list[dict[str, Any]] = []
        for e in range(spec.epochs):
            j = int(torch.randint(0, spec.k, (1,), generator=pick))
            seen: dict[int, torch.Tensor] = {}

            def on_step(i: int, t: Any, x_in: torch.Tensor, eps: torch.Tensor,
                        j: int = j, seen: dict[int, torch.Tensor] = seen) -> None:
                if i == j or spec.visited == "all":
                    seen[i] = eps

            samplers.denoise(ctx.unet, ctx.model.scheduler_config, noise + r, ctx.sampler,
                             seeds=seeds, grad=True, steps_limit=j + 1, on_step=on_step)
            parts = [shift_loss(seen[i].mean(dim=0), lam[i] * r[0], spec.loss) for i in seen]
            loss = torch.stack(parts).mean()
            if not torch.isfinite(loss):
                raise InversionError(f"PureDiffusion's loss became {float(loss)} at epoch {e}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            row = {"iteration": e, "step": j, "timestep": ts[j], "loss": float(loss.detach()),
                   "trigger_norm": float(r.detach().norm())}
            rows.append(row)
            ctx.report(row)
        return MethodResult(
            trigger=r.detach()[0].cpu(), iterations=spec.epochs, history=rows,
            details={**info, "lambda": lam.tolist(), "timesteps": ts,
                     "initial_trigger_norm": float(r0.norm())},
            tensors={"initial_trigger": r0[0]})

    def statistics(self, ctx: Context, spec: PureDiffusionSpec, result: MethodResult,
                   samples: torch.Tensor) -> dict[str, float]:
        dist = perceptual.make_distance(spec.perceptual, weights=spec.perceptual_weights,
                                        encoder=ctx.encoder, size=spec.perceptual_size,
                                        config_key="inversion.purediffusion.perceptual")
        return {f"uniform_score[{dist.label}]": perceptual.mean_pairwise(samples, dist)}
