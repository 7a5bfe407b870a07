"""TERD (Mo et al., ICML 2024): two-stage trigger estimation, KL model statistics, input detection.

Notation: ᾱ_t the model's noise schedule, T its number of training timesteps, w = 10 the window
of timesteps at each end of the chain, μ the trigger, ε_θ the model. TERD's "reversed loss"
(its ``reverse_loss.p_losses_diffuser``) noises one x_0 twice, with independent n_1, n_2, adds
μ (or not), and asks that the model's residual n − ε_θ not depend on which noise was drawn:

    x_i = √ᾱ_t·x_0 + √(1−ᾱ_t)·n_i + c·μ,   i = 1, 2
    L(x_0, μ, t, c) = ½ · mean_b ‖ (n_1 − ε_θ(x_1, t)) − (n_2 − ε_θ(x_2, t)) ‖²   (sum over pixels)

For a backdoored model the residual on triggered inputs is a fixed function of μ (the trigger's
shift), the same for both noises, so the true trigger makes L small; for the wrong μ the residuals
carry the noise. Both stages also *subtract* ``weight_decay · ‖μ‖₁`` (the official sign: a
reward for a larger trigger, keeping μ from the trivial 0) and use SGD (lr 0.5) with a cosine
schedule, batch 16, μ_0 ~ −U(0, 1):

* **Stage 1, trigger estimation** (3,000 iterations): x_0 ~ N(0, I) (no data: noise stands in
  for images), t ~ U{T−w .. T−1}, c = 1: minimise ``L(x_0, μ, t, 1) − λ‖μ‖₁`` (λ = 5e-5).
* **Stage 2, trigger refinement** (1,000 = 3,000/3 iterations, a fresh SGD and cosine schedule):
  generate x̂_0 from ε + μ with a 10-step DDIM sampler (differentiably: the gradient reaches μ
  through the chain as well), then minimise
  ``½[L(x̂_0, μ, t_hi, 1) + L(x̂_0, μ, t_lo, 0)] − λ‖μ‖₁`` with t_hi ~ U{T−w .. T−1} and
  t_lo ~ U{0 .. w−1}, the gradient's norm clipped to 0.01.

Cost: a stage-2 iteration is a differentiable 10-step chain (10 forwards, 10 backwards) plus two
stage-1 losses, so it costs about 10 stage-1 iterations (``benchmarks/terd_stages.py``). The chain
keeps its graph, as the official code does; ``checkpoint: true`` recomputes each UNet call in the
backward instead (about 1.4 x the time, for a tenth of the chain's activation memory).

Departures: the official stage-2 DDIM scheduler is a fixed CIFAR-10 schedule with diffusers'
default ``clip_sample=True``; here it is the model's own schedule and never clips (``samplers``).

**Model detection** (``statistics``, its ``model_detection.py``): the per-value KL divergence of
N(μ_i, γ_i²) from N(0, 1), ``−log γ_i + (γ_i² + μ_i² − 1)/2``, with γ = 1 (BadDiffusion) this is
μ_i²/2; ``kl_mean`` is its mean over values and ``kl_var`` its variance (the official M_r and V_r
without the normalising offsets N_m = −0.4, N_v = 0.003, which it says may be set to zero). TERD
publishes no threshold: a threshold calibrated on clean models decides.

**Input detection** (``input_detection``, its ``input_detection.py``): an input x is flagged as
triggered when its log-likelihood under N(μ̂, I) exceeds that under N(0, I), i.e. when
‖x − μ̂‖² < ‖x‖²; TPR is the share of triggered inputs (noise + true trigger) flagged, TNR the
share of clean inputs (noise) not flagged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from diffcleanse import samplers
from diffcleanse.inversion.base import (
    Context,
    InversionError,
    InversionMethod,
    MethodResult,
)
from diffcleanse.inversion.elijah import INITS, initial_trigger
from diffcleanse.population import DetectorSpec


@dataclass(frozen=True)
class TERDSpec:
    """TERD's settings (official defaults, module doc)."""

    iterations: int = 3000  # stage 1
    refine_iterations: int | None = None  # stage 2; None: iterations // 3
    batch: int = 16
    lr: float = 0.5
    weight_decay: float = 5e-5  # weight of the L1 reward on μ (subtracted)
    window: int = 10  # timesteps at each end of the chain
    refine_steps: int = 10  # DDIM steps of stage 2's generation
    clip_norm: float = 0.01
    init: str = "neg_uniform"
    checkpoint: bool = False  # stage 2: recompute each UNet call of the chain in the backward

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"inversion.terd.init {self.init!r}: use one of {', '.join(INITS)}")
        for name in ("iterations", "batch", "window", "refine_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"inversion.terd.{name} must be at least 1")
        if self.refine_iterations is not None and self.refine_iterations < 0:
            raise ValueError("inversion.terd.refine_iterations must be at least 0 (or null)")

    @property
    def refine(self) -> int:
        """Stage-2 iterations."""
        return self.iterations // 3 if self.refine_iterations is None else self.refine_iterations


def reversed_loss(unet: torch.nn.Module, abar: torch.Tensor, x0: torch.Tensor, mu: torch.Tensor,
                  t: torch.Tensor, with_trigger: bool, generator: torch.Generator
                  ) -> torch.Tensor:
    """TERD's L(x_0, μ, t, c) (module doc) for a batch ``x0`` and per-sample timesteps ``t``."""
    n1 = torch.randn(x0.shape, generator=generator).to(x0.device)
    n2 = torch.randn(x0.shape, generator=generator).to(x0.device)
    a = abar.to(x0.device)[t].view(-1, 1, 1, 1)
    shift = mu if with_trigger else 0.0 * mu
    x1 = a.sqrt() * x0 + (1 - a).sqrt() * n1 + shift
    x2 = a.sqrt() * x0 + (1 - a).sqrt() * n2 + shift
    res1 = n1 - unet(x1, t).sample
    res2 = n2 - unet(x2, t).sample
    return 0.5 * (res1 - res2).pow(2).flatten(1).sum(dim=1).mean()


def kl_statistics(mu: torch.Tensor, gamma: torch.Tensor | float = 1.0) -> dict[str, float]:
    """TERD's model-level statistics of a trigger estimate: mean and variance over values of
    KL(N(μ_i, γ_i²) ‖ N(0, 1)) (module doc)."""
    m = mu.detach().flatten().double()
    g = torch.as_tensor(gamma, dtype=torch.float64).expand_as(m)
    kl = -torch.log(g) + (g * g + m * m - 1) / 2
    return {"kl_mean": float(kl.mean()), "kl_var": float((kl - kl.mean()).pow(2).mean())}


def input_detection(estimate: torch.Tensor, true_trigger: torch.Tensor, *, n: int = 1000,
                    seed: int = 0, gamma: float = 1.0) -> dict[str, float]:
    """TERD's input-level detection with the trigger ``estimate`` μ̂ (the true trigger gives the
    oracle rates): ``n`` clean inputs ε and ``n`` triggered inputs γ·ε + μ (``true_trigger``);
    an input is flagged when ‖x − μ̂‖² < ‖x‖² (module doc). Returns TPR (triggered inputs
    flagged), TNR (clean inputs not flagged) and, for γ = 1, their exact values
    ``tnr_exact = Φ(‖μ̂‖/2)`` and ``tpr_exact = Φ((2⟨μ̂, μ⟩ − ‖μ̂‖²) / (2‖μ̂‖))`` (Φ the standard
    normal CDF; a zero μ̂ flags nothing)."""
    mu_hat = estimate.detach().flatten().double().cpu()
    mu = true_trigger.detach().flatten().double().cpu()
    if mu_hat.shape != mu.shape:
        raise ValueError(f"the estimate has {mu_hat.numel()} values, the trigger {mu.numel()}")
    g = torch.Generator().manual_seed(int(seed))
    clean = torch.randn((n, mu.numel()), generator=g, dtype=torch.float64)
    poisoned = gamma * torch.randn((n, mu.numel()), generator=g, dtype=torch.float64) + mu

    def flagged(x: torch.Tensor) -> torch.Tensor:
        return (x - mu_hat).pow(2).sum(dim=1) < x.pow(2).sum(dim=1)

    out = {"tpr": float(flagged(poisoned).double().mean()),
           "tnr": float((~flagged(clean)).double().mean()), "n": n}
    norm = float(mu_hat.norm())
    if gamma == 1.0:
        phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
        if norm == 0:
            out.update(tpr_exact=0.0, tnr_exact=1.0)
        else:
            out.update(tnr_exact=phi(norm / 2),
                       tpr_exact=phi((2 * float(mu_hat @ mu) - norm ** 2) / (2 * norm)))
    return out


class TERD(InversionMethod):
    """TERD's trigger estimation and refinement (module doc)."""

    name = "terd"
    label = "TERD"
    Spec = TERDSpec
    model_types = ("ddpm",)
    features = ("kl_mean", "kl_var")
    # a threshold on the KL mean (a trigger's values stray from N(0, 1)); TERD publishes none
    detector = DetectorSpec("threshold", ("kl_mean",), higher_is_backdoored=True)

    def budget(self, spec: TERDSpec) -> int:
        return spec.iterations + spec.refine

    def invert(self, ctx: Context, spec: TERDSpec) -> MethodResult:
        from diffcleanse.models import scheduler_from_config

        cfg = ctx.model.scheduler_config
        abar = scheduler_from_config(cfg).alphas_cumprod.float()
        T = len(abar)
        if 2 * spec.window > T:
            raise InversionError(f"inversion.terd.window = {spec.window} needs at least "
                                 f"{2 * spec.window} timesteps; the model has {T}")
        mu0 = initial_trigger(spec.init, ctx.shape, ctx.generator("terd", "init"))
        mu = mu0.clone().to(ctx.device).requires_grad_(True)
        g = ctx.generator("terd", "draws")
        b, dev = spec.batch, ctx.device
        rows: list[dict[str, Any]] = []

        def step(opt, sched, loss: torch.Tensor, stage: int, it: int, clip: bool) -> None:
            total = loss - spec.weight_decay * mu.abs().sum()
            if not torch.isfinite(total):
                raise InversionError(f"TERD's loss became {float(total)} at stage {stage}, "
                                     f"iteration {it}")
            opt.zero_grad(set_to_none=True)
            total.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_([mu], spec.clip_norm)
            opt.step()
            sched.step()
            row = {"iteration": it, "stage": stage, "loss": float(loss.detach()),
                   "trigger_norm": float(mu.detach().norm())}
            rows.append(row)
            ctx.report(row)

        opt = torch.optim.SGD([mu], lr=spec.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, spec.iterations)
        for it in range(spec.iterations):
            t = torch.randint(T - spec.window, T, (b,), generator=g).to(dev)
            x0 = torch.randn((b, *ctx.shape), generator=g).to(dev)
            step(opt, sched, reversed_loss(ctx.unet, abar, x0, mu, t, True, g), 1, it, False)
        stage1 = mu.detach().clone()
        if spec.refine:
            opt = torch.optim.SGD([mu], lr=spec.lr)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, spec.refine)
            ddim = samplers.SamplerSpec("ddim", steps=spec.refine_steps)
            for it in range(spec.iterations, spec.iterations + spec.refine):
                noise = torch.randn((b, *ctx.shape), generator=g).to(dev)
                x0 = samplers.denoise(ctx.unet, cfg, noise + mu, ddim, grad=True,
                                      checkpoint=spec.checkpoint)
                t_hi = torch.randint(T - spec.window, T, (b,), generator=g).to(dev)
                t_lo = torch.randint(0, spec.window, (b,), generator=g).to(dev)
                loss = 0.5 * (reversed_loss(ctx.unet, abar, x0, mu, t_hi, True, g)
                              + reversed_loss(ctx.unet, abar, x0, mu, t_lo, False, g))
                step(opt, sched, loss, 2, it, True)
        return MethodResult(
            trigger=mu.detach().cpu(), iterations=len(rows), history=rows,
            details={"stage1_iterations": spec.iterations, "stage2_iterations": spec.refine,
                     "stage1_trigger_norm": float(stage1.norm()),
                     "initial_trigger_norm": float(mu0.norm())},
            tensors={"initial_trigger": mu0, "stage1_trigger": stage1.cpu()})

    def statistics(self, ctx: Context, spec: TERDSpec, result: MethodResult,
                   samples: torch.Tensor) -> dict[str, float]:
        return kl_statistics(result.trigger)
