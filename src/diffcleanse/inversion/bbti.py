"""BBTI: black-box trigger inversion with MSCR detection (Diff-Cleanse Algorithm 1).

Draw a trigger ``r`` of the input's shape; each iteration samples ``X_0`` from ``X_T = ε + r`` over
the fixed verdict batch of clean noise ε with the model's backdoor sampler (no clipping), embeds
``X_0``, computes MSCR (``detection.mscr``) and stops once MSCR >= κ_d (the model is flagged);
otherwise it takes one Adam step (lr 0.1) on ℓ = ℓ_s + λ·ℓ_e (Eqs. 2-4; optionally + λ_r·ℓ_r, the
range loss, which is not in the paper). Four gradients (``BBTISpec.gradient``):

* ``blackbox`` (the paper's): the sampler runs under ``torch.no_grad`` and dℓ/dX_0 reaches r
  through Eq. 1 at t = T. The backdoored input is ``X_T = ε + r`` and Eq. 1 says
  ``X_T = α̂_T X_0 + β̂_T ε + ρ̂_T r``, so ``X_0 = (ε + r − β̂_T ε − ρ̂_T r) / α̂_T`` and the *total*
  derivative is ``dX_0/dr = (1 − ρ̂_T) / α̂_T``. For BadDiffusion ρ̂_T = 1 − α̂_T, so it is exactly 1:
  the official code's identity (``x_T.grad = images.grad``). The defender does not know the
  attack's ρ̂; BadDiffusion's is the one the paper's derivation assumes (its other attacks share
  α̂, and VillanDiffusion's VP branch shares ρ̂). So dℓ/dr = mean over the batch of dℓ/dX_0.
* ``blackbox_partial``: the *partial* derivative at a fixed X_T, ``−ρ̂_T/α̂_T`` (opposite sign; what
  this code used before; kept to compare, ``benchmarks/inversion.py``).
* ``whitebox`` (exact): backpropagates through ``whitebox_steps`` steps of the same sampler with
  each UNet call checkpointed; its early-stop MSCR is only a nomination that one no-grad pass of
  the verdict sampler confirms.
* ``zeroth_order`` (not in the paper; docs/detection.md): no derivative of the sampler at all.
  Each iteration also samples the verdict batch from ``zo_directions`` antithetic pairs
  ``r ± σ·U(u_k)`` (common random numbers: the same clean noise and step-noise seeds) and
  estimates dℓ/dr = mean_k (ℓ(r + σU(u_k)) − ℓ(r − σU(u_k))) / (2σ) · U(u_k), with ℓ's weights
  fixed at the centre's. ``u_k ~ N(0, 1)`` lives on a coarse grid that ``U`` (nearest
  upsampling) spreads over the input: coarse to fine, ``zo_resolutions[i]`` cells per side for
  ``zo_stage_iters`` iterations each, the last for the rest. A smoothed loss sees the *share* of
  samples that fall into the target, which the pathwise gradients do not; a coarse grid keeps the
  estimate sharp (12 unknowns at 2 × 2 × 3, against 768 pixels at 16 px). Cost per iteration:
  ``2·zo_directions + 1`` sampling passes.

Adam's step does not depend on the gradient's scale, only on its direction per coordinate, so the
two black-box variants differ in sign alone.

**Exploration** (``explore``: N > 0; not in the paper, whose Algorithm 1 starts from one
r ~ N(0, 1)). Before its first step each start samples N candidates on the verdict batch: its own
initial trigger, then triggers drawn U(−``explore_scale``, ``explore_scale``) per cell on grids of
``explore_resolutions`` cells per side in turn, one value for every channel (``grey``) or one per
channel (``rgb``) as ``explore_colours`` alternate, nearest-upsampled. A candidate whose MSCR
reaches κ_d flags the start (Algorithm 1's stop, on the same batch); otherwise the start's Adam
iterations begin at the best candidate (highest MSCR, then lowest loss). The backdoors of both
zoos answer coarse shifts that the gradients do not find (docs/detection.md, measured).
After the random candidates come the *patch* candidates (``explore_patches``: grids, cells per
side; ``()`` none): one cell of a coarse grid set to ±v for each v of ``explore_patch_values``,
zero elsewhere, every cell in turn: a local patch of a few amplitudes, which is what a patch
trigger's coarse average is and what a random candidate, non-zero in every cell, almost never
is. They come last, so a model a random candidate flags is flagged exactly as without them.

**Restarts in one batch.** ``restarts`` independent starts (each its own trigger and Adam) share
``max_iters`` evenly. With ``batched: true`` (the default) they run side by side as one batch of
``restarts × batch_size`` samples; each start stops on its own. The result is the one the starts
would give run one after another (``batched: false``): the first start, in order, that is flagged;
otherwise the best trigger by MSCR (ties to the later one). A start that is flagged ends every start
after it (they would never have run); the starts before it run to the end of their budget. Every
sample's noise is seeded per sample, so a start's chain does not depend on the batch around it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffcleanse import detection, samplers
from diffcleanse.encoders import Encoder
from diffcleanse.inversion.base import (
    Context,
    InversionError,
    InversionMethod,
    MethodResult,
)

log = logging.getLogger(__name__)
GRADIENTS = ("blackbox", "blackbox_partial", "whitebox", "zeroth_order")
EXPLORE_COLOURS = ("grey", "rgb")


@dataclass(frozen=True)
class BBTISpec:
    """Hyperparameters of BBTI (paper defaults; the default zoo's config departs, README)."""

    gradient: str = "blackbox"
    whitebox_steps: int | None = None  # sampler steps the white-box differentiates (None: all)
    max_iters: int = 100
    lr: float = 0.1
    restarts: int = 1
    batched: bool = True  # run the restarts side by side in one batch (same results)
    init_scale: float = 1.0  # r ~ init_scale · N(0, 1) (paper: 1)
    trigger_bound: float | None = 2.0  # keep r in [-b, b] after each step (None: unbounded)
    entropy_loss: bool = True  # False: ℓ_s alone (the paper's Table 3 ablation)
    range_loss: bool = False  # add ℓ_r (not in the paper; README)
    range_weight: float | None = None  # None: balanced against ℓ_s each step, like λ of ℓ_e
    early_stop: bool = True
    zo_directions: int = 6  # zeroth_order: antithetic direction pairs per iteration
    zo_sigma: float = 0.3  # zeroth_order: perturbation scale (trigger units)
    zo_resolutions: tuple[int, ...] = (2, 4, 8)  # zeroth_order: grid cells per side, coarse first
    zo_stage_iters: int = 8  # zeroth_order: iterations at each resolution but the last
    explore: int = 0  # candidates each start samples before its first step (0: none; module doc)
    explore_scale: float = 1.0  # their cell values ~ U(-s, s), in trigger units
    explore_resolutions: tuple[int, ...] = (1, 2, 4)  # their grid cells per side, in turn
    explore_colours: tuple[str, ...] = ("grey", "rgb")  # grey: one value per cell for every
    # channel; rgb: one per cell and channel; in turn (module doc)
    explore_patches: tuple[int, ...] = ()  # grids whose single cells the pool also tries, after
    # the random candidates (module doc; empty: none, as in the paper)
    explore_patch_values: tuple[float, ...] = (0.25, 0.5)  # each patch's grey values, ± each

    def __post_init__(self) -> None:
        object.__setattr__(self, "zo_resolutions", tuple(int(v) for v in self.zo_resolutions))
        object.__setattr__(self, "explore_resolutions",
                           tuple(int(v) for v in self.explore_resolutions))
        object.__setattr__(self, "explore_colours", tuple(self.explore_colours))
        object.__setattr__(self, "explore_patches", tuple(int(v) for v in self.explore_patches))
        object.__setattr__(self, "explore_patch_values",
                           tuple(float(v) for v in self.explore_patch_values))
        if self.gradient not in GRADIENTS:
            raise ValueError(f"inversion.bbti.gradient {self.gradient!r}: use one of "
                             f"{', '.join(GRADIENTS)}")
        if self.max_iters < 1:
            raise ValueError(f"inversion.bbti.max_iters must be at least 1, got {self.max_iters}")
        if not 1 <= self.restarts <= self.max_iters:
            raise ValueError(
                f"inversion.bbti.restarts (--restarts) is {self.restarts}: it must lie in "
                f"[1, max_iters = {self.max_iters}] (--max-iters), since the starts share "
                "max_iters")
        if self.whitebox_steps is not None and self.whitebox_steps < 1:
            raise ValueError("inversion.bbti.whitebox_steps must be at least 1 (or null)")
        if self.zo_directions < 1 or self.zo_stage_iters < 1:
            raise ValueError("inversion.bbti.zo_directions and zo_stage_iters must be at least 1")
        if not self.zo_sigma > 0:
            raise ValueError(f"inversion.bbti.zo_sigma must be positive, got {self.zo_sigma}")
        if not self.zo_resolutions or min(self.zo_resolutions) < 1:
            raise ValueError("inversion.bbti.zo_resolutions must list grid sizes of at least 1, "
                             f"got {list(self.zo_resolutions)}")
        if self.explore < 0:
            raise ValueError(f"inversion.bbti.explore must be 0 (off) or a number of candidates, "
                             f"got {self.explore}")
        if not self.explore_scale > 0:
            raise ValueError("inversion.bbti.explore_scale must be positive, got "
                             f"{self.explore_scale}")
        if not self.explore_resolutions or min(self.explore_resolutions) < 1:
            raise ValueError("inversion.bbti.explore_resolutions must list grid sizes of at "
                             f"least 1, got {list(self.explore_resolutions)}")
        if not self.explore_colours or set(self.explore_colours) - set(EXPLORE_COLOURS):
            raise ValueError(f"inversion.bbti.explore_colours {list(self.explore_colours)}: list "
                             f"one or more of {', '.join(EXPLORE_COLOURS)}")
        if self.explore_patches and min(self.explore_patches) < 1:
            raise ValueError("inversion.bbti.explore_patches must list grid sizes of at least 1 "
                             f"(or be empty), got {list(self.explore_patches)}")
        if self.explore_patches and (not self.explore_patch_values
                                     or not min(self.explore_patch_values) > 0):
            raise ValueError("inversion.bbti.explore_patch_values must list positive values (each "
                             f"is tried with both signs), got {list(self.explore_patch_values)}")

    def zo_resolution(self, iteration: int) -> int:
        """Grid cells per side of the zeroth-order directions at a start's ``iteration``."""
        return self.zo_resolutions[min(iteration // self.zo_stage_iters,
                                       len(self.zo_resolutions) - 1)]

    def patch_count(self, shape: tuple[int, int, int] | None = None) -> int:
        """Patch candidates each start's pool holds for an input of ``shape`` (C, H, W; None:
        one at least as large as every grid)."""
        if not self.explore:
            return 0
        cells = sum(g * g if shape is None else min(g, shape[1]) * min(g, shape[2])
                    for g in self.explore_patches)
        return cells * len(self.explore_patch_values) * 2

    @property
    def per_start(self) -> int:
        """Iterations each start may take."""
        return math.ceil(self.max_iters / self.restarts)


def ste_clamp(x: torch.Tensor) -> torch.Tensor:
    """Clamp to [-1, 1] in value, identity in gradient (what people see, without dead gradients)."""
    return x + (x.clamp(-1, 1) - x).detach()


def embed(encoder: Encoder, x0: torch.Tensor) -> torch.Tensor:
    """Embeddings of unclipped samples: clamped to the data range with a straight-through
    gradient, then encoded (what MSCR and ℓ_s see)."""
    return encoder(ste_clamp(x0))


def objective(x0: torch.Tensor, z: torch.Tensor, spec: BBTISpec,
              detect: detection.DetectionSpec, weights: dict[str, float] | None = None
              ) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss BBTI minimises on unclipped samples ``x0`` and their embeddings ``z`` (of the
    clamped samples): ℓ_s + λ·ℓ_e, plus λ_r·ℓ_r with ``spec.range_loss``. ``weights`` (the parts
    of an earlier call) fix λ and λ_r instead of balancing them on these samples."""
    lam = lam_r = None
    if weights is not None:
        lam, lam_r = weights["lambda"], weights["lambda_range"]
    return detection.bbti_loss(ste_clamp(x0), z, use_entropy=spec.entropy_loss,
                               kappa_minus=detect.kappa_minus, kappa_plus=detect.kappa_plus,
                               bins=detect.entropy_bins, raw=x0 if spec.range_loss else None,
                               range_margin=detect.range_margin,
                               range_weight=spec.range_weight if lam_r is None else lam_r,
                               entropy_weight=lam)


def coarse_directions(spec: BBTISpec, shape: tuple[int, int, int], iteration: int,
                      generator: torch.Generator) -> torch.Tensor:
    """The zeroth-order search's ``zo_directions`` directions U(u_k), (K, C, H, W): N(0, 1) on
    the iteration's coarse grid, nearest-upsampled to the input's size."""
    c, h, w = shape
    cells = spec.zo_resolution(iteration)
    u = torch.randn((spec.zo_directions, c, min(cells, h), min(cells, w)), generator=generator)
    return torch.nn.functional.interpolate(u, size=(h, w), mode="nearest")


def patch_candidates(spec: BBTISpec, shape: tuple[int, int, int]
                     ) -> tuple[torch.Tensor, list[int]]:
    """The pool's patch candidates, (``spec.patch_count(shape)``, C, H, W), and their grid sizes:
    for each grid of ``explore_patches`` (cells per side), each cell in row-major order, each
    value v of ``explore_patch_values``: +v, then −v, on that cell for every channel, zero
    elsewhere (nearest-upsampled). Deterministic: the same for every start and seed."""
    c, h, w = shape
    out, grids = [], []
    for g in spec.explore_patches:
        gh, gw = min(g, h), min(g, w)
        for cell in range(gh * gw):
            for v in spec.explore_patch_values:
                for sign in (1.0, -1.0):
                    u = torch.zeros((1, 1, gh, gw))
                    u.view(-1)[cell] = sign * v
                    out.append(torch.nn.functional.interpolate(u, size=(h, w), mode="nearest")
                               .expand(1, c, h, w))
                    grids.append(g)
    return (torch.cat(out) if out else torch.zeros((0, c, h, w))), grids


def explore_candidates(spec: BBTISpec, r0: torch.Tensor, generator: torch.Generator
                       ) -> tuple[torch.Tensor, list[int]]:
    """A start's exploration pool, (``spec.explore`` + ``spec.patch_count``, C, H, W), and each
    candidate's grid size: its initial trigger ``r0`` (1, C, H, W) first (grid 0: per pixel),
    then values drawn U(−``explore_scale``, ``explore_scale``) on grids of
    ``explore_resolutions[i]`` cells per side in turn, one value per cell for all channels
    (``grey``) or per cell and channel (``rgb``) as ``explore_colours`` alternate,
    nearest-upsampled; then the patch candidates (``patch_candidates``); all kept inside the
    trigger bound."""
    _, c, h, w = r0.shape
    out, grids = [r0.cpu()], [0]
    for i in range(spec.explore - 1):
        cells = spec.explore_resolutions[i % len(spec.explore_resolutions)]
        grey = spec.explore_colours[i % len(spec.explore_colours)] == "grey"
        u = (2 * torch.rand((1, 1 if grey else c, min(cells, h), min(cells, w)),
                            generator=generator) - 1).expand(1, c, -1, -1)
        out.append(torch.nn.functional.interpolate(spec.explore_scale * u, size=(h, w),
                                                   mode="nearest"))
        grids.append(cells)
    patches, patch_grids = patch_candidates(spec, (c, h, w))
    pool = torch.cat([*out, patches])
    grids += patch_grids
    if spec.trigger_bound is not None:
        pool = pool.clamp(-spec.trigger_bound, spec.trigger_bound)
    return pool, grids


def zo_gradient(losses: torch.Tensor, directions: torch.Tensor, sigma: float) -> torch.Tensor:
    """The antithetic estimate of dℓ/dr from the losses at r + σ·d_k (first K) and r − σ·d_k
    (last K): mean_k (ℓ⁺_k − ℓ⁻_k) / (2σ) · d_k, shaped (1, C, H, W)."""
    k = directions.shape[0]
    slope = (losses[:k] - losses[k:]) / (2 * sigma)
    return (slope.view(k, 1, 1, 1) * directions).mean(dim=0, keepdim=True)


def eq1_coefficients(scheduler_config: dict[str, Any]) -> dict[str, float]:
    """α̂_T and ρ̂_T of Eq. 1 at the last training timestep, for BadDiffusion's process (the one
    the black-box derivation assumes): α̂_T = sqrt(ᾱ_T), ρ̂_T = 1 − α̂_T."""
    from diffcleanse.models import scheduler_from_config

    a = float(scheduler_from_config(scheduler_config).alphas_cumprod[-1].sqrt())
    return {"alpha_hat_T": a, "rho_hat_T": 1.0 - a}


def blackbox_scale(gradient: str, scheduler_config: dict[str, Any]) -> float:
    """dX_0/dr of the black-box gradient: total (1 − ρ̂_T)/α̂_T or partial −ρ̂_T/α̂_T."""
    c = eq1_coefficients(scheduler_config)
    if gradient == "blackbox":
        return (1.0 - c["rho_hat_T"]) / c["alpha_hat_T"]
    if gradient == "blackbox_partial":
        return -c["rho_hat_T"] / c["alpha_hat_T"]
    raise ValueError(gradient)


@dataclass
class _Start:
    """One start's trigger, optimiser and outcome."""

    index: int
    r: torch.Tensor
    opt: torch.optim.Adam
    iters: int = 0
    done: bool = False
    flagged_at: int | None = None
    flagged: tuple[float, torch.Tensor, torch.Tensor] | None = None


class BBTI(InversionMethod):
    """Diff-Cleanse's BBTI (module doc)."""

    name = "bbti"
    label = "BBTI"
    Spec = BBTISpec
    uses_encoder = True
    model_types = ("ddpm", "ncsn", "ldm")

    def budget(self, spec: BBTISpec) -> int:
        return spec.max_iters + spec.restarts * (spec.explore + spec.patch_count())

    def invert(self, ctx: Context, spec: BBTISpec) -> MethodResult:
        if ctx.encoder is None:
            raise InversionError("BBTI needs an encoder (detection.encoder)")
        if spec.batched:
            run = _Run(ctx, spec, list(range(spec.restarts)))
            run.loop()
            runs = [run]
        else:
            runs = []
            for j in range(spec.restarts):
                run = _Run(ctx, spec, [j])
                run.loop()
                runs.append(run)
                if run.first_flagged() is not None:
                    break
        return _finish(ctx, spec, runs)


class _Run:
    """Starts run side by side (one batch), each with its own Adam and its own stop."""

    def __init__(self, ctx: Context, spec: BBTISpec, indices: list[int]):
        self.ctx, self.spec = ctx, spec
        c, h, w = ctx.shape
        self.starts = []
        for j in indices:
            g = ctx.generator("start", j)
            r = spec.init_scale * torch.randn((1, c, h, w), generator=g)
            if spec.trigger_bound is not None:
                r = r.clamp(-spec.trigger_bound, spec.trigger_bound)
            r = r.to(ctx.device).requires_grad_(True)
            self.starts.append(_Start(j, r, torch.optim.Adam([r], lr=spec.lr)))
        self.rows: list[dict[str, Any]] = []
        # the best (score, start, iteration, trigger, samples) so far, and the best confirmation
        self.best: tuple[float, int, int, torch.Tensor, torch.Tensor] | None = None
        self.best_check: tuple[float, int, int, torch.Tensor, torch.Tensor] | None = None
        self.white = spec.gradient == "whitebox"
        self.zo = spec.gradient == "zeroth_order"
        self.few = samplers.SamplerSpec(name=ctx.sampler.name,
                                        steps=spec.whitebox_steps or ctx.sampler.steps,
                                        eta=ctx.sampler.eta)
        self.scale = None if self.white or self.zo else blackbox_scale(
            spec.gradient, ctx.model.scheduler_config)

    def first_flagged(self) -> _Start | None:
        flagged = [s for s in self.starts if s.flagged is not None]
        return min(flagged, key=lambda s: s.index) if flagged else None

    def active(self) -> list[_Start]:
        return [s for s in self.starts if not s.done]

    def loop(self) -> None:
        ctx, spec, detect = self.ctx, self.spec, self.ctx.detect
        b = len(ctx.noise)
        self.restore()
        if spec.explore and not any(r.get("phase") == "explore" for r in self.rows):
            self._explore()
            self.save()
        while self.active():
            act = self.active()
            k = act[0].iters
            # the triggers sampled this iteration: per start its own (and, zeroth-order, its
            # 2K perturbed ones after it): P per start
            dirs = [self._directions(s) for s in act] if self.zo else []
            cands = torch.cat([self._candidates(s, d) for s, d in zip(act, dirs, strict=True)]
                              if self.zo else [s.r for s in act])  # (A·P, C, H, W)
            per = len(cands) // len(act)
            noise = ctx.noise.repeat(len(cands), 1, 1, 1)
            x_T = noise + cands.repeat_interleave(b, dim=0)
            seeds = ctx.noise_seeds * len(cands)
            if not self.white:
                x_T = x_T.detach()
            x0 = ctx.sample_from(x_T, seeds=seeds, spec=self.few if self.white else ctx.sampler,
                                 grad=self.white)
            if not self.white:
                x0 = x0.detach().requires_grad_(not self.zo)
            total = None
            for a, s in enumerate(act):
                if s.done:  # a start before it was flagged in this very iteration
                    continue
                xs = x0[a * per * b:(a * per + 1) * b]
                z = embed(ctx.encoder, xs)
                score = detection.mscr(z.detach(), detect.active_kappa,
                                       detection.in_band(xs, detect))
                row = {"iteration": s.index * spec.per_start + s.iters, "start": s.index,
                       "mscr": score, "trigger_norm": float(s.r.detach().norm())}
                self.best = _better(self.best, (score, s.index, s.iters, s.r.detach().clone(),
                                                xs.detach().clone()))
                if spec.early_stop and score >= detect.kappa_d:
                    check = (score, s.r.detach().clone(), xs.detach().clone())
                    # the few-step samples only nominate: the verdict sampler decides
                    if self.white:
                        x = ctx.backdoor_samples(s.r.detach()).detach()
                        check = (_mscr(ctx, x), s.r.detach().clone(), x)
                    row["mscr_verdict_sampler"] = check[0]
                    self.best_check = _better(self.best_check,
                                              (check[0], s.index, s.iters, check[1], check[2]))
                    if check[0] >= detect.kappa_d:
                        s.flagged, s.flagged_at, s.done = check, s.iters, True
                        self.rows.append(row)
                        s.iters += 1
                        self._drop_after(s.index)
                        ctx.report(row)
                        continue
                loss, parts = objective(xs, z, spec, detect)
                if not torch.isfinite(loss):
                    raise InversionError(f"the loss became {float(loss)} at iteration "
                                         f"{row['iteration']} (start {s.index})")
                row.update(loss=float(loss.detach()), **parts)
                if self.zo:
                    row["zo_resolution"] = spec.zo_resolution(s.iters)
                    s.r.grad = self._zo_grad(x0[a * per * b:(a + 1) * per * b], parts, dirs[a])
                else:
                    total = loss if total is None else total + loss
                self.rows.append(row)
                ctx.report(row)
            if total is not None:
                total.backward()
            for a, s in enumerate(act):
                if s.done:
                    continue
                if not self.white and not self.zo:  # Eq. 1 at t = T (module doc)
                    s.r.grad = self.scale * x0.grad[a * b:(a + 1) * b].mean(dim=0, keepdim=True)
                s.opt.step()
                s.opt.zero_grad(set_to_none=True)
                if spec.trigger_bound is not None:
                    with torch.no_grad():
                        s.r.clamp_(-spec.trigger_bound, spec.trigger_bound)
                s.iters += 1
                if s.iters >= spec.per_start:
                    s.done = True
            if k % 10 == 0:
                log.info("iteration %d of each start: MSCR %s", k,
                         " ".join(f"{r['mscr']:.3f}" for r in self.rows[-len(act):]))
            self.save()

    # ---- exploration before the first step (module doc)
    _EXPLORE_CHUNK = 8  # candidates sampled in one batch

    def _explore(self) -> None:
        """Each active start samples its exploration pool on the verdict batch; a candidate that
        reaches κ_d flags the start, otherwise the start begins from its best candidate (highest
        MSCR, then lowest loss)."""
        ctx, spec, detect = self.ctx, self.spec, self.ctx.detect
        b = len(ctx.noise)
        for s in self.active():
            if s.done:  # a start before it was flagged while exploring
                continue
            pool, grids = explore_candidates(spec, s.r.detach(), ctx.generator("explore",
                                                                                s.index))
            pool = pool.to(ctx.device)
            ranked: list[tuple[float, float, int]] = []
            for lo in range(0, len(pool), self._EXPLORE_CHUNK):
                chunk = pool[lo:lo + self._EXPLORE_CHUNK]
                with torch.no_grad():
                    x0 = ctx.sample_from(ctx.noise.repeat(len(chunk), 1, 1, 1)
                                         + chunk.repeat_interleave(b, dim=0),
                                         seeds=ctx.noise_seeds * len(chunk))
                for i, xs in enumerate(x0.split(b), start=lo):
                    with torch.no_grad():
                        z = embed(ctx.encoder, xs)
                        score = detection.mscr(z, detect.active_kappa,
                                               detection.in_band(xs, detect))
                        loss, _ = objective(xs, z, spec, detect)
                    row = {"phase": "explore", "iteration": s.index * spec.per_start,
                           "start": s.index, "candidate": i, "grid": grids[i], "mscr": score,
                           "loss": float(loss), "trigger_norm": float(pool[i].norm())}
                    if i >= spec.explore:
                        row["patch"] = True
                    self.rows.append(row)
                    ctx.report(row)
                    self.best = _better(self.best, (score, s.index, -1, pool[i:i + 1].clone(),
                                                    xs.clone()))
                    ranked.append((-score, float(loss), i))
                    if spec.early_stop and score >= detect.kappa_d:
                        s.flagged, s.flagged_at, s.done = (score, pool[i:i + 1].clone(),
                                                           xs.clone()), 0, True
                        self._drop_after(s.index)
                        break
                if s.done:
                    break
            best = min(ranked)
            if not s.done:
                with torch.no_grad():
                    s.r.copy_(pool[best[2]:best[2] + 1])
            log.info("start %d explored %d candidates: best MSCR %.3f%s", s.index,
                     len(ranked), -best[0], " (flagged)" if s.done else "")

    # ---- the zeroth-order search (module doc)
    def _directions(self, s: _Start) -> torch.Tensor:
        """A start's directions at its current iteration: seeded by (start, iteration), so the
        same with or without other starts beside it, and after a resume."""
        g = self.ctx.generator("zeroth_order", s.index, s.iters)
        return coarse_directions(self.spec, self.ctx.shape, s.iters, g).to(self.ctx.device)

    def _candidates(self, s: _Start, d: torch.Tensor) -> torch.Tensor:
        """r, then r + σ·d_k, then r − σ·d_k (each kept inside the trigger bound)."""
        r = s.r.detach()
        out = torch.cat([r, r + self.spec.zo_sigma * d, r - self.spec.zo_sigma * d])
        b = self.spec.trigger_bound
        return out if b is None else out.clamp(-b, b)

    def _zo_grad(self, x: torch.Tensor, parts: dict[str, float], d: torch.Tensor
                 ) -> torch.Tensor:
        """dℓ/dr estimated from one start's perturbed samples ``x`` (its centre first)."""
        b = len(self.ctx.noise)
        with torch.no_grad():
            losses = torch.stack([
                objective(xs, embed(self.ctx.encoder, xs), self.spec, self.ctx.detect,
                          weights=parts)[0]
                for xs in x[b:].split(b)])
        return zo_gradient(losses, d, self.spec.zo_sigma)

    # ---- resumable state (``ctx.state_dir``): everything the loop needs, after each iteration
    def _fingerprint(self) -> str:
        from diffcleanse import precision
        from diffcleanse.records import params_hash

        ctx = self.ctx
        return params_hash({"spec": self.spec.__dict__, "seed": ctx.seed,
                            "noise_seeds": ctx.noise_seeds[:4], "n": len(ctx.noise_seeds),
                            "sampler": ctx.sampler.describe(), "starts": [s.index for s in
                                                                           self.starts],
                            "detect": ctx.detect.describe(), "encoder": ctx.encoder.name,
                            **({} if precision.current() == "fp32"
                               else {"precision": precision.current()})})

    def _paths(self) -> tuple[Path, Path] | None:
        if self.ctx.state_dir is None:
            return None
        tag = "-".join(str(s.index) for s in self.starts)
        return (self.ctx.state_dir / f"bbti-{tag}.safetensors",
                self.ctx.state_dir / f"bbti-{tag}.json")

    def save(self) -> None:
        paths = self._paths()
        if paths is None:
            return
        from safetensors.torch import save_file

        from diffcleanse.records import atomic_path, write_json

        t: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {"fingerprint": self._fingerprint(), "rows": self.rows,
                                "starts": []}
        for s in self.starts:
            st = s.opt.state.get(s.r, {})
            t[f"r.{s.index}"] = s.r.detach().cpu().contiguous()
            for name in ("exp_avg", "exp_avg_sq"):
                if name in st:
                    t[f"{name}.{s.index}"] = st[name].detach().cpu().contiguous()
            meta["starts"].append({"index": s.index, "iters": s.iters, "done": s.done,
                                   "flagged_at": s.flagged_at,
                                   "adam_step": float(st["step"]) if "step" in st else None,
                                   "flagged_score": s.flagged[0] if s.flagged else None})
            if s.flagged:
                t[f"flagged_r.{s.index}"] = s.flagged[1].cpu().contiguous()
                t[f"flagged_x.{s.index}"] = s.flagged[2].cpu().contiguous()
        for name, cand in (("best", self.best), ("check", self.best_check)):
            if cand is not None:
                meta[name] = [cand[0], cand[1], cand[2]]
                t[f"{name}_r"], t[f"{name}_x"] = cand[3].cpu().contiguous(), \
                    cand[4].cpu().contiguous()
        tensors, record = paths
        tensors.parent.mkdir(parents=True, exist_ok=True)
        # a flagged start that is also the best candidate holds the same tensors under two keys;
        # safetensors refuses shared storage, so every entry gets its own copy
        t = {k: v.clone() for k, v in t.items()}
        with atomic_path(tensors) as tmp:
            save_file(t, str(tmp))
        write_json(record, meta)  # written last: a state is whole when its JSON is

    def restore(self) -> None:
        paths = self._paths()
        if paths is None or not paths[1].is_file() or not paths[0].is_file():
            return
        from safetensors.torch import load_file

        from diffcleanse.records import read_json

        meta = read_json(paths[1])
        if meta.get("fingerprint") != self._fingerprint():
            log.warning("state in %s was made with other settings: starting afresh", paths[1])
            return
        t = load_file(str(paths[0]))
        dev = self.ctx.device
        for s, m in zip(self.starts, meta["starts"], strict=True):
            with torch.no_grad():
                s.r.copy_(t[f"r.{s.index}"].to(dev))
            if m["adam_step"] is not None:
                s.opt.state[s.r] = {"step": torch.tensor(m["adam_step"]),
                                    "exp_avg": t[f"exp_avg.{s.index}"].to(dev),
                                    "exp_avg_sq": t[f"exp_avg_sq.{s.index}"].to(dev)}
            s.iters, s.done, s.flagged_at = m["iters"], m["done"], m["flagged_at"]
            if m["flagged_score"] is not None:
                s.flagged = (m["flagged_score"], t[f"flagged_r.{s.index}"].to(dev),
                             t[f"flagged_x.{s.index}"].to(dev))
        for name in ("best", "check"):
            if name in meta:
                score, j, k = meta[name]
                cand = (score, j, k, t[f"{name}_r"].to(dev), t[f"{name}_x"].to(dev))
                setattr(self, "best" if name == "best" else "best_check", cand)
        self.rows = meta["rows"]
        log.info("resumed BBTI from %s after %d iterations", paths[1], len(self.rows))

    def _drop_after(self, index: int) -> None:
        for s in self.starts:
            if s.index > index:
                s.done = True


def _better(a: tuple | None, b: tuple) -> tuple:
    """The better of two (score, start, iteration, ...) candidates: higher score, ties to the later
    (start, iteration), as a run of the starts one after another keeps the last best."""
    return b if a is None or (b[0], b[1], b[2]) >= (a[0], a[1], a[2]) else a


def _mscr(ctx: Context, x: torch.Tensor) -> float:
    with torch.no_grad():
        return detection.mscr(ctx.encoder(x.clamp(-1, 1)), ctx.detect.active_kappa,
                              detection.in_band(x, ctx.detect))


def _finish(ctx: Context, spec: BBTISpec, runs: list[_Run]) -> MethodResult:
    """The result the starts give run one after another (module doc)."""
    flagged = [s for run in runs for s in run.starts if s.flagged is not None]
    last = min(s.index for s in flagged) if flagged else None
    rows = sorted((r for run in runs for r in run.rows
                   if last is None or r["start"] <= last),
                  key=lambda r: (r["start"], r["iteration"]))
    if flagged:
        s = min(flagged, key=lambda s: s.index)
        score, r, samples = s.flagged
        stopped = True
    else:
        stopped = False
        best = None
        for run in runs:
            best = run.best if best is None else _better(best, run.best)
        r, samples = best[3], best[4]
        if spec.gradient == "whitebox":  # verdict with the configured sampler
            samples = ctx.backdoor_samples(r).detach()
            score = _mscr(ctx, samples)
        else:
            score = best[0]
        checks = [run.best_check for run in runs if run.best_check is not None]
        if checks:
            conf = checks[0]
            for c in checks[1:]:
                conf = _better(conf, c)
            if conf[0] >= score:
                score, r, samples = conf[0], conf[3], conf[4]
    explored = sum(1 for row in rows if row.get("phase") == "explore")
    return MethodResult(trigger=r[0].detach().cpu(), iterations=len(rows) - explored,
                        history=rows, stopped_early=stopped, samples=samples.detach(),
                        details={"gradient": spec.gradient, "explore_candidates": explored,
                                 "eq1": eq1_coefficients(ctx.model.scheduler_config),
                                 "mscr_selected": score})
