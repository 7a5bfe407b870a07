"""The sampler registry and the one denoising loop every stage uses.

Every sampler the paper names is a stock diffusers scheduler built from the model's own saved
noise schedule (``Sampler.make``): the ancestral DDPM sampler, DDIM, PNDM, DEIS, DPM-Solver of
orders 1-3, DPM-Solver++ of orders 1-3, UniPC and Heun; score-based (VE) models add their own
entry. A registry entry says which scheduler class, with which settings, whether its steps draw
noise, and how one step is taken (``Sampler.step``); ``denoise`` is the one loop over any entry,
used by clean and backdoor sampling, trigger inversion (with gradients, optionally checkpointed) and
evaluation. A new sampler is one entry in ``SAMPLERS`` and a test.

**Score-based (VE) models** (NCSN, ``ScoreSdeVeScheduler``) have the predictor-corrector sampler
``score_sde_ve``: per step, ``correct_steps`` Langevin corrections (``step_correct``) and one
reverse-diffusion prediction (``step_pred``); the denoiser is conditioned on sigma, not on a
timestep index, and the last step returns the predictor's mean (as diffusers' pipeline does).

**Attack-owned samplers.** An attack whose own backdoor sampler differs from the stock one
(TrojDiff's trojan DDPM and DDIM samplers) plugs a *step adapter* into this loop: a registry entry
with ``attack`` set (``trojdiff_ddpm``, ``trojdiff_ddim``) that wraps the stock scheduler's step
and reads the attack's chain from ``SamplerSpec.chain``. Such entries are not manifest values: the
manifest names the stock sampler and the attack maps it to its own (``Attack.backdoor_sampler``).

**Never clipping.** Every scheduler is built with ``clip_sample=False`` and ``thresholding=False``
whatever the saved config says: clipping the predicted x_0 erases a trigger's term and hides a
backdoor (DESIGN.md: 1 of 16 backdoor samples on target with clipping, 15 of 16 without). The
setting is part of ``SamplerSpec.describe()``, which every record carries.

**Noise that does not depend on the batch.** A stochastic sampler's per-step noise comes from one
``torch.Generator`` per sample, seeded by that sample's own seed, so a sample's chain is the same
whether it is drawn alone, in a batch, or in a batch of several restarts (diffusers draws per-sample
noise when a scheduler's ``step`` gets a list of generators).

**Initial noise scale.** Samplers that work in the sigma parameterisation (Heun) expect the initial
sample scaled by ``scheduler.init_noise_sigma``; ``denoise`` takes x_T in the model's own
variance-preserving convention (``noise + r`` for a backdoor) and applies the scale, and every step
feeds the UNet ``scheduler.scale_model_input(x, t)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

Generators = list[torch.Generator] | None


@dataclass(frozen=True)
class Sampler:
    """One registry entry: a diffusers scheduler class and the settings that make it a sampler."""

    name: str
    scheduler: str  # class name in ``diffusers``
    settings: dict[str, Any] = field(default_factory=dict)
    family: str = "ode"  # ancestral (stochastic DDPM-type), ode (deterministic solvers), ve (NCSN)
    stochastic: bool = False
    paper_name: str = ""  # the name in the paper's tables (DDPM, DPMO2, DPM++O1, ...)
    model_types: tuple[str, ...] = ("ddpm", "ldm")  # the model types it can drive
    attack: str = ""  # set for an attack's own backdoor sampler (not a manifest value)

    def scheduler_class(self) -> type:
        """The diffusers scheduler class."""
        import diffusers

        return getattr(diffusers, self.scheduler)

    def make(self, base_config: dict[str, Any], spec: SamplerSpec):
        """A fresh scheduler built from a model's saved scheduler config, never clipping."""
        check_schedule(self, base_config)
        cfg = {k: v for k, v in dict(base_config).items() if not k.startswith("_")}
        cfg.update(self.settings)
        cfg["clip_sample"] = spec.clip_sample
        cfg["thresholding"] = False
        with warnings.catch_warnings():  # diffusers deprecates algorithm_type dpmsolver (DPMO*)
            warnings.simplefilter("ignore", FutureWarning)
            sched = self.scheduler_class().from_config(cfg)
        steps = spec.steps or int(sched.config.num_train_timesteps)
        sched.set_timesteps(steps)
        return sched

    def step(self, scheduler, model_fn: Callable[[torch.Tensor, Any], torch.Tensor],
             x: torch.Tensor, t: Any, generators: Generators, spec: SamplerSpec) -> torch.Tensor:
        """One step of the reverse process from ``x`` at timestep ``t``."""
        eps = model_fn(scheduler.scale_model_input(x, t), t)
        kwargs: dict[str, Any] = {}
        if self.stochastic or spec.eta:
            kwargs["generator"] = generators
        if self.scheduler == "DDIMScheduler":
            kwargs["eta"] = spec.eta
        return scheduler.step(eps, t, x, **kwargs).prev_sample


# The multistep solvers space their timesteps "trailing" (T-1, ..., from the top of the schedule):
# with the "leading" spacing a DDPM config saves, diffusers' DPM-Solver, DEIS and UniPC start far
# below the top (T=100, 50 steps: at t=50) and, for T steps of a T-step schedule, put every step at
# t=0; with "linspace" T steps round onto duplicate timesteps and the solvers index past their
# sigmas. "trailing" gives T-1 .. 0 for the full chain and starts at T-1 for fewer steps.
# DPM-Solver (algorithm "dpmsolver") ends at sigma_min, which the full chain's t = 0 already is:
# a higher-order final step would divide by a zero log-SNR step (NaN); it takes an Euler step.
_TRAILING = {"timestep_spacing": "trailing"}


def _entries() -> dict[str, Sampler]:
    out = [
        Sampler("ddpm", "DDPMScheduler", family="ancestral", stochastic=True, paper_name="DDPM"),
        Sampler("ddim", "DDIMScheduler", paper_name="DDIM"),
        Sampler("pndm", "PNDMScheduler", {"skip_prk_steps": True}, paper_name="PNDM"),
        Sampler("deis", "DEISMultistepScheduler", {"solver_order": 2, **_TRAILING},
                paper_name="DEIS"),
        Sampler("unipc", "UniPCMultistepScheduler", {"solver_order": 2, **_TRAILING},
                paper_name="UNIPC"),
        Sampler("heun", "HeunDiscreteScheduler", paper_name="HEUN"),
    ]
    for order in (1, 2, 3):
        out.append(Sampler(f"dpmo{order}", "DPMSolverMultistepScheduler",
                           {"algorithm_type": "dpmsolver", "solver_order": order,
                            "final_sigmas_type": "sigma_min", "euler_at_final": True,
                            **_TRAILING},
                           paper_name=f"DPMO{order}"))
        out.append(Sampler(f"dpmpp_o{order}", "DPMSolverMultistepScheduler",
                           {"algorithm_type": "dpmsolver++", "solver_order": order,
                            **_TRAILING},
                           paper_name=f"DPM++O{order}"))
    out.append(VESampler("score_sde_ve", "ScoreSdeVeScheduler", family="ve", stochastic=True,
                         paper_name="SDE-VE", model_types=("ncsn",)))
    out.append(TrojanSampler("trojdiff_ddpm", "DDPMScheduler", family="ancestral", stochastic=True,
                             paper_name="TrojDiff-DDPM", attack="trojdiff"))
    out.append(TrojanSampler("trojdiff_ddim", "DDIMScheduler", paper_name="TrojDiff-DDIM",
                             attack="trojdiff"))
    return {s.name: s for s in out}


def schedule_kind(config: dict[str, Any]) -> str:
    """``ve`` for a score-SDE (sigma) noise schedule, else ``vp`` (a DDPM-type beta schedule)."""
    if config.get("_class_name") == "ScoreSdeVeScheduler" or "sigma_max" in config:
        return "ve"
    return "vp"


def check_schedule(entry: Sampler, config: dict[str, Any]) -> None:
    """Refuse a sampler that cannot drive this noise schedule (VP samplers on NCSN and back)."""
    kind = schedule_kind(config)
    if (kind == "ve") != (entry.family == "ve"):
        fits = [n for n, e in SAMPLERS.items() if (e.family == "ve") == (kind == "ve")
                and not e.attack]
        raise ValueError(
            f"sampler {entry.name} cannot drive a {kind.upper()} noise schedule "
            f"({config.get('_class_name', 'scheduler config')}); samplers for it: "
            f"{', '.join(fits)} (manifest column `sampler`)")


class VESampler(Sampler):
    """The score-SDE predictor-corrector sampler of VE models (diffusers' ScoreSdeVeScheduler)."""

    def make(self, base_config: dict[str, Any], spec: SamplerSpec):
        """A ScoreSdeVeScheduler with ``steps`` noise levels (sigma_max down to sigma_min)."""
        import diffusers

        check_schedule(self, base_config)
        cfg = {k: v for k, v in dict(base_config).items() if not k.startswith("_")}
        cfg.update(self.settings)
        sched = diffusers.ScoreSdeVeScheduler.from_config(cfg)
        steps = spec.steps or int(sched.config.num_train_timesteps)
        sched.set_timesteps(steps)
        sched.set_sigmas(steps)
        return sched

    def step(self, scheduler, model_fn: Callable[[torch.Tensor, Any], torch.Tensor],
             x: torch.Tensor, t: Any, generators: Generators, spec: SamplerSpec) -> torch.Tensor:
        """``correct_steps`` Langevin corrections, then one reverse-diffusion prediction.

        The corrector's step size depends on the gradient norm of the batch in diffusers; it is
        taken per sample here (one ``step_correct`` call a row) so a sample does not change with
        its batch. The denoiser sees sigma; the last step returns the predictor's mean."""
        i = int((scheduler.timesteps == t).nonzero()[0])
        sigma = scheduler.sigmas[i].to(x.device)
        for _ in range(int(scheduler.config.correct_steps)):
            out = model_fn(x, sigma)
            x = torch.cat([
                scheduler.step_correct(out[j:j + 1], x[j:j + 1],
                                       generator=_cpu_generator(generators, j)).prev_sample
                for j in range(len(x))])
        out = model_fn(x, sigma)
        res = scheduler.step_pred(out, t, x, generator=generators)
        return res.prev_sample_mean if i == len(scheduler.timesteps) - 1 else res.prev_sample


def _cpu_generator(generators: Generators, j: int) -> torch.Generator | None:
    """Row ``j``'s generator for diffusers calls that draw on the CPU (``step_correct``): itself on
    CPU; on a GPU, a CPU generator seeded from it (deterministic, per sample)."""
    if generators is None:
        return None
    g = generators[j]
    if g.device.type == "cpu":
        return g
    seed = int(torch.randint(0, 2**62, (1,), generator=g, device=g.device))
    return torch.Generator().manual_seed(seed)


@dataclass(frozen=True)
class TrojanChain:
    """TrojDiff's trojan chain ``x_t = sqrt(abar_t) y + gamma sqrt(1 - abar_t) eps + sqrt(1 -
    abar_t) mu``: per-pixel ``gamma`` (1 outside a patch trigger) and ``mu`` (0 outside it)."""

    gamma: torch.Tensor  # (C, H, W)
    mu: torch.Tensor  # (C, H, W)
    gamma_value: float = 0.0  # the attack's gamma (for records)

    def describe(self) -> dict[str, Any]:
        """JSON-able summary (the tensors' extent, not their values)."""
        return {"gamma": self.gamma_value, "mu_norm": float(self.mu.float().norm()),
                "patch_pixels": int((self.gamma != 1).any(0).sum())}


class TrojanSampler(Sampler):
    """TrojDiff's own backdoor sampler as a step adapter around a stock scheduler's step.

    On the trojan chain, ``v_t = (x_t - sqrt(1 - abar_t) mu) / gamma`` is an ordinary DDPM chain of
    ``y / gamma`` with the model's epsilon, so the stock step applied to ``v`` (with the model's
    output on ``x``) and mapped back with the next timestep's ``sqrt(1 - abar)`` is TrojDiff's
    trojan DDPM step (posterior mean of the trojan chain, variance times gamma^2) or trojan DDIM
    step (``x_s = sqrt(abar_s) x0 + gamma (c1 z + c2 e) + sqrt(1 - abar_s) mu``), unclipped.
    """

    def step(self, scheduler, model_fn: Callable[[torch.Tensor, Any], torch.Tensor],
             x: torch.Tensor, t: Any, generators: Generators, spec: SamplerSpec) -> torch.Tensor:
        """One trojan step from ``x`` at ``t`` (``spec.chain`` gives gamma and mu)."""
        chain = spec.chain
        if chain is None:
            raise ValueError(f"sampler {self.name} is TrojDiff's backdoor sampler: it needs the "
                             f"trojan chain (SamplerSpec.chain with gamma and mu)")
        gamma, mu = chain.gamma.to(x), chain.mu.to(x)
        eps = model_fn(scheduler.scale_model_input(x, t), t)
        rho_t, rho_s = _trojan_rho(scheduler, t)
        v = (x - rho_t * mu) / gamma
        kwargs: dict[str, Any] = {}
        if self.stochastic or spec.eta:
            kwargs["generator"] = generators
        if self.scheduler == "DDIMScheduler":
            kwargs["eta"] = spec.eta
        v_s = scheduler.step(eps, t, v, **kwargs).prev_sample
        return gamma * v_s + rho_s * mu


def _trojan_rho(scheduler, t: Any) -> tuple[float, float]:
    """sqrt(1 - abar) at ``t`` and at the timestep the scheduler steps to (0 after the last)."""
    ts = [int(v) for v in scheduler.timesteps]
    i = ts.index(int(t))
    abar = scheduler.alphas_cumprod.double()
    if i + 1 < len(ts):
        prev = float(abar[ts[i + 1]])
    else:
        prev = float(getattr(scheduler, "final_alpha_cumprod", torch.tensor(1.0)))
    return float((1 - abar[int(t)]).sqrt()), (1 - prev) ** 0.5


SAMPLERS: dict[str, Sampler] = _entries()


def manifest_names() -> tuple[str, ...]:
    """Sampler names a manifest row may name (the stock samplers, not attack-owned adapters)."""
    return tuple(n for n, e in SAMPLERS.items() if not e.attack)


def configured(value: Any, row: dict[str, Any], own: str) -> str:
    """A config's ``inversion.sampler`` for one model: ``value`` (a name, or a mapping resolved
    for ``row`` by ``diffcleanse.permodel``), where ``manifest`` (and no value) means ``own``.
    KeyError: the mapping has no entry for the row; ValueError: not a stock sampler."""
    from diffcleanse import permodel

    name = str(permodel.resolve(value or "manifest", row, "inversion.sampler"))
    if name == "manifest":
        return own
    if name not in manifest_names():
        raise ValueError(f"inversion.sampler: {name!r} (for model {row.get('model_id', '?')}) is "
                         f"not a stock sampler; use 'manifest' (the row's own sampler) or one of "
                         f"{', '.join(manifest_names())}")
    return name


def register(sampler: Sampler) -> None:
    """Add a registry entry (e.g. the VE predictor-corrector sampler of score-based models)."""
    SAMPLERS[sampler.name] = sampler


def get(name: str) -> Sampler:
    """The registry entry of ``name``, or a ValueError listing what is implemented."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}: implemented are {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


@dataclass(frozen=True)
class SamplerSpec:
    """Which sampler, how many steps, and the clipping setting used (every record states them)."""

    name: str = "ddpm"
    steps: int | None = None  # None: the schedule's full number of training steps
    clip_sample: bool = False
    eta: float = 0.0  # DDIM only: 0 is deterministic
    chain: TrojanChain | None = field(default=None, compare=False, repr=False)  # TrojDiff's

    def __post_init__(self) -> None:
        get(self.name)
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"sampler steps must be at least 1, got {self.steps}")

    @property
    def entry(self) -> Sampler:
        """The registry entry."""
        return get(self.name)

    def describe(self) -> dict[str, Any]:
        """A JSON-able description for records: the spec, the scheduler class and its settings."""
        e = self.entry
        out = {"name": self.name, "steps": self.steps, "clip_sample": self.clip_sample,
               "eta": self.eta, "scheduler": e.scheduler, "settings": dict(e.settings),
               "stochastic": e.stochastic or bool(self.eta)}
        if e.attack:
            out["attack"] = e.attack
        if self.chain is not None:
            out["chain"] = self.chain.describe()
        return out


def make_scheduler(base_config: dict[str, Any], spec: SamplerSpec):
    """A fresh scheduler of ``spec``'s kind built from a model's saved scheduler config."""
    return spec.entry.make(base_config, spec)


def generators(seeds: Sequence[int] | None, device: torch.device | str) -> Generators:
    """One generator per sample (None when no seeds are given)."""
    if seeds is None:
        return None
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def denoise(unet: torch.nn.Module, scheduler_config: dict[str, Any], x_T: torch.Tensor,
            spec: SamplerSpec, *, seeds: Sequence[int] | None = None, grad: bool = False,
            checkpoint: bool = True, steps_limit: int | None = None,
            on_step: Callable[[int, Any, torch.Tensor, torch.Tensor], None] | None = None
            ) -> torch.Tensor:
    """The reverse process from ``x_T`` (the model's VP convention), unclipped.

    ``seeds`` (one per row of ``x_T``) seed the per-sample noise of stochastic samplers (required
    for them). With ``grad`` the graph is kept through every step; ``checkpoint`` then recomputes
    each UNet call in the backward pass instead of storing its activations (the scheduler's cheap
    elementwise update stays outside the checkpoint, so multistep solvers' state is not replayed).
    ``steps_limit`` stops after that many steps (returning x_t, not x_0); ``on_step(i, t, x_in,
    eps)`` sees every UNet call (for methods that read the model's output along the chain).
    """
    from torch.utils.checkpoint import checkpoint as ckpt

    entry = spec.entry
    stochastic = entry.stochastic or bool(spec.eta)
    if stochastic and seeds is None:
        raise ValueError(f"sampler {spec.name} draws noise at every step: pass one seed per sample")
    if seeds is not None and len(seeds) != len(x_T):
        raise ValueError(f"{len(seeds)} seeds for {len(x_T)} samples")
    sched = make_scheduler(scheduler_config, spec)
    gens = generators(seeds, x_T.device) if stochastic else None

    def model_fn(x: torch.Tensor, t: Any) -> torch.Tensor:
        tt = t.to(x.device) if isinstance(t, torch.Tensor) else torch.tensor(t, device=x.device)
        if grad and checkpoint:
            out = ckpt(lambda a: unet(a, tt).sample, x, use_reentrant=False)
        else:
            out = unet(x, tt).sample
        if on_step is not None:
            on_step(i, t, x, out)
        return out

    with torch.set_grad_enabled(grad):
        x = x_T * sched.init_noise_sigma
        for i, t in enumerate(sched.timesteps):
            if steps_limit is not None and i >= steps_limit:
                break
            x = entry.step(sched, model_fn, x, t, gens, spec)
    return x


def sample_seeds(seed: int, start: int, n: int) -> list[int]:
    """Per-sample step-noise seeds for samples ``start .. start + n - 1`` of a draw ``seed``."""
    from diffcleanse.records import derive_seed

    return [derive_seed(seed, "step-noise", i) for i in range(start, start + n)]
