"""The interface every backdoor attack implements, and the forward processes they share.

Every attack of the papers is an instance of Diff-Cleanse's Eq. 1 over a model's noise schedule,

    x_t = alpha_hat_t y + beta_hat_t eps + rho_hat_t r,

with ``y`` the attack's target, ``eps ~ N(0, I)`` and ``r`` the additive trigger (``patterns``). A
model type's *clean* process (``Process``) gives alpha_hat and beta_hat on its T training steps
(VP: ``sqrt(abar_t)``, ``sqrt(1 - abar_t)``; VE/NCSN: 1 and ``sigma_t``), how its denoiser is
conditioned (VP: the timestep index; VE: sigma) and how its output reads as an epsilon prediction.
An ``Attack`` adds rho_hat, the model inputs and training target of a poisoned batch, the backdoored
initial noise (``backdoor_input``) and the sampler its backdoor is sampled with
(``backdoor_sampler``: the stock sampler for most, TrojDiff's own step adapter for TrojDiff).

The training target of a poisoned row is ``eps + k_t r``: the model keeps its plain
epsilon-parameterisation, so ``k_t`` must make an *unchanged* sampler follow the backdoored chain.
For the ancestral (SDE) sampler ``k_t`` has a closed form for any rho_hat
(``sde_trigger_coefficient``): with ``u_t = x_t - rho_hat_t r`` an ordinary chain of ``y``, the
sampler's posterior mean ``c0 x0_hat + ct x_t`` equals the backdoored one
``rho_hat_{t-1} r + c0 y + ct (x_t - rho_hat_t r)`` exactly when

    k_t = [rho_hat_t - alpha_hat_t (rho_hat_{t-1} - ct_t rho_hat_t) / c0_t] / beta_hat_t,

where ``c0``, ``ct`` are the clean posterior-mean coefficients (``rho_hat_{-1} = 0``: the data).
A new attack is one module with an ``Attack`` subclass, one entry in ``attacks.ATTACKS`` and its
tests.
"""

from __future__ import annotations

from abc import ABC
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from diffcleanse import samplers


class AttackError(ValueError):
    """An attack cannot run as asked (model type, sampler, target, trigger or parameters)."""


# ---------------------------------------------------------------- clean forward processes


class Process:
    """A model's clean forward process ``x_t = alpha_hat_t x0 + beta_hat_t eps`` on its T training
    steps (index ``t = 0 .. T-1``, 0 the least noisy), with the ancestral sampler's posterior-mean
    coefficients ``c0`` (of x0) and ``ct`` (of x_t) for the step t -> t-1."""

    kind: ClassVar[str] = ""

    def __init__(self, alpha_hat: torch.Tensor, beta_hat: torch.Tensor, c0: torch.Tensor,
                 ct: torch.Tensor):
        self.alpha_hat, self.beta_hat = alpha_hat.double(), beta_hat.double()
        self.c0, self.ct = c0.double(), ct.double()

    @property
    def T(self) -> int:
        """Number of training timesteps."""
        return len(self.alpha_hat)

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """What the denoiser is conditioned on at timestep index ``t``."""
        return t

    def to_eps(self, out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The denoiser's output read as an epsilon prediction."""
        return out

    def predict_eps(self, model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor
                    ) -> torch.Tensor:
        """The model's epsilon prediction for ``x`` at timestep indices ``t``."""
        return self.to_eps(model(x, self.model_time(t)).sample, t)

    def clean(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Clean diffused inputs ``alpha_hat_t x0 + beta_hat_t eps``."""
        return bcast(self.alpha_hat, t, x0) * x0 + bcast(self.beta_hat, t, x0) * eps


class VPProcess(Process):
    """DDPM-type (variance-preserving) schedules: DDPM and LDM models."""

    kind = "vp"

    @classmethod
    def from_scheduler(cls, scheduler) -> VPProcess:
        """From a diffusers scheduler with ``alphas_cumprod`` (DDPM, DDIM, ...)."""
        abar = scheduler.alphas_cumprod.double()
        prev = torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
        beta = 1 - abar / prev
        c0 = prev.sqrt() * beta / (1 - abar)
        ct = (abar / prev).sqrt() * (1 - prev) / (1 - abar)
        out = cls(abar.sqrt(), (1 - abar).sqrt(), c0, ct)
        out.abar32 = scheduler.alphas_cumprod.float()
        return out

    def clean(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Clean diffused inputs (in float32 arithmetic, as the training loop always had)."""
        abar = getattr(self, "abar32", None)
        if abar is None:
            return super().clean(x0, eps, t)
        return bcast(abar.sqrt(), t, x0) * x0 + bcast((1 - abar).sqrt(), t, x0) * eps


class VEProcess(Process):
    """Score-SDE VE schedules (NCSN): ``x_t = x0 + sigma_t eps`` on ``T`` geometric sigmas; the
    denoiser is conditioned on sigma and outputs the score, so ``eps = -sigma * output``."""

    kind = "ve"

    def __init__(self, sigmas: torch.Tensor):
        sigmas = sigmas.double()
        prev = torch.cat([torch.zeros(1, dtype=sigmas.dtype), sigmas[:-1]])
        ct = prev**2 / sigmas**2
        super().__init__(torch.ones_like(sigmas), sigmas, 1 - ct, ct)
        self.sigmas = sigmas

    @classmethod
    def from_scheduler(cls, scheduler) -> VEProcess:
        """From a ``ScoreSdeVeScheduler``: its ``num_train_timesteps`` discrete sigmas."""
        import math

        c = scheduler.config
        T = int(c.num_train_timesteps)
        sig = torch.exp(torch.linspace(math.log(c.sigma_min), math.log(c.sigma_max), T,
                                       dtype=torch.float64))
        return cls(sig)

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigmas.to(t.device)[t].float()

    def to_eps(self, out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -bcast(self.sigmas, t, out) * out


def process_of(scheduler) -> Process:
    """The clean process of a training scheduler (DDPM-type or ScoreSdeVeScheduler)."""
    if type(scheduler).__name__ == "ScoreSdeVeScheduler":
        return VEProcess.from_scheduler(scheduler)
    return VPProcess.from_scheduler(scheduler)


def bcast(v: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``v[t]`` shaped (B, 1, 1, 1) in ``like``'s dtype and device."""
    return v.to(like.device)[t.to(like.device)].to(like.dtype).view(-1, 1, 1, 1)


def sde_trigger_coefficient(process: Process, rho_hat: torch.Tensor) -> torch.Tensor:
    """``k_t`` (float64, length T) of the target ``eps + k_t r`` that makes the ancestral sampler's
    posterior mean the backdoored chain's (module doc)."""
    rho = rho_hat.double()
    prev = torch.cat([torch.zeros(1, dtype=rho.dtype), rho[:-1]])
    a, b, c0, ct = process.alpha_hat, process.beta_hat, process.c0, process.ct
    return (rho - a * (prev - ct * rho) / c0) / b


# ---------------------------------------------------------------- what an attack implants


@dataclass(frozen=True)
class BackdoorSpec:
    """What an attack implants, in the space the model denoises.

    ``trigger`` is the additive offset ``r`` (C, H, W); ``target`` one target image (C, H, W) or,
    for distribution targets (TrojDiff Din/Dout), a pool of images (N, C, H, W) that poisoned rows
    draw from; ``params`` the attack's own parameters (JSON-able: psi, solver, gamma, lambda, ...);
    ``mask`` (1, H, W) where a local trigger acts (TrojDiff's patch), None for everywhere.
    """

    trigger: torch.Tensor
    target: torch.Tensor
    poison_rate: float
    attack: str = "baddiffusion"
    params: Mapping[str, Any] = field(default_factory=dict)
    mask: torch.Tensor | None = None

    @property
    def is_distribution(self) -> bool:
        """True when the target is a pool of images (a class), not one image."""
        return self.target.ndim == 4

    def draw_targets(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` targets for poisoned rows (the one image repeated, or draws from the pool)."""
        if not self.is_distribution:
            return self.target.expand(n, -1, -1, -1)
        idx = torch.randint(0, len(self.target), (n,), generator=generator)
        return self.target[idx]

    def describe(self) -> dict[str, Any]:
        """JSON-able summary for cards and records."""
        return {"attack": self.attack, "poison_rate": self.poison_rate, "params": dict(self.params),
                "target_pool": len(self.target) if self.is_distribution else None,
                "trigger_norm": float(self.trigger.float().norm()),
                "mask_pixels": None if self.mask is None else int(self.mask.sum())}


@dataclass(frozen=True)
class Param:
    """One attack parameter a manifest row can set in ``attack_params`` (``key=value``)."""

    kind: type  # float, str
    default: Any = None  # None with required: the row must give it
    required: bool = False
    low: float | None = None  # inclusive bounds for numbers
    high: float | None = None
    choices: tuple[str, ...] = ()
    help: str = ""

    def parse(self, key: str, text: Any) -> Any:
        """The value from manifest text (or a native value), or an AttackError naming the fix."""
        if self.kind is float:
            try:
                v = float(text)
            except (TypeError, ValueError):
                raise AttackError(f"{key}={text!r} is not a number ({self.help})") from None
            if (self.low is not None and v < self.low) or (self.high is not None and v > self.high):
                raise AttackError(f"{key}={v:g} is out of range [{self.low}, {self.high}] "
                                  f"({self.help})")
            return v
        v = str(text)
        if self.choices and v not in self.choices:
            raise AttackError(f"{key}={v!r} is not one of {', '.join(self.choices)} ({self.help})")
        return v


def parse_params(text: str | Mapping[str, Any] | None) -> dict[str, str]:
    """``"gamma=0.6; lambda=0.01"`` (``;`` or ``,`` separated) -> ``{"gamma": "0.6", ...}``."""
    if text is None or isinstance(text, Mapping):
        return dict(text or {})
    out: dict[str, str] = {}
    for part in str(text).replace(",", ";").split(";"):
        part = part.strip()
        if not part:
            continue
        key, eq, value = part.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise AttackError(f"attack_params item {part!r} is not key=value "
                              f"(e.g. gamma=0.6; lambda=0.01)")
        out[key.strip()] = value.strip()
    return out


# ---------------------------------------------------------------- the interface


class Attack(ABC):
    """One backdoor attack. Subclasses set the class variables and override what differs.

    Class variables: ``name`` (registry key, manifest value), ``label`` (tables), ``model_types``
    it attacks, ``target_kinds`` (``image``; ``class`` for Din/Dout), ``triggers`` (None: any
    additive trigger of ``patterns`` except other attacks' own; else the only ones it takes),
    ``params`` (what ``attack_params`` may set).
    """

    name: ClassVar[str]
    label: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ("ddpm", "ldm")
    target_kinds: ClassVar[tuple[str, ...]] = ("image",)
    triggers: ClassVar[tuple[str, ...] | None] = None
    params: ClassVar[dict[str, Param]] = {}

    # -- what it supports (manifest checks)

    def samplers(self, model_type: str) -> tuple[str, ...]:
        """The stock samplers (manifest names) whose backdoor this attack implants."""
        fam = "ve" if model_type == "ncsn" else None
        return tuple(n for n, e in samplers.SAMPLERS.items()
                     if not e.attack and (e.family == "ve") == (fam == "ve")
                     and model_type in e.model_types)

    def make_params(self, given: Mapping[str, Any], *, sampler: str, model_type: str
                    ) -> dict[str, Any]:
        """Validated parameters with defaults (raises AttackError naming the key and the fix)."""
        unknown = sorted(set(given) - set(self.params))
        if unknown:
            allowed = ", ".join(self.params) or "none"
            raise AttackError(f"attack {self.name} has no parameter {', '.join(unknown)} "
                              f"(its parameters: {allowed})")
        out: dict[str, Any] = {}
        for key, p in self.params.items():
            if key in given:
                out[key] = p.parse(key, given[key])
            elif p.required:
                raise AttackError(f"attack {self.name} needs {key}=<value> in attack_params "
                                  f"({p.help})")
            else:
                out[key] = p.default
        return out

    def check(self, *, model_type: str, sampler: str, trigger: str, target: str,
              params: Mapping[str, Any]) -> list[tuple[str, str]]:
        """Problems of a manifest row for this attack: (column, message) pairs; empty if it runs."""
        bad: list[tuple[str, str]] = []
        if model_type not in self.model_types:
            bad.append(("model_type", f"{model_type!r}: attack {self.name} attacks model types "
                        f"{', '.join(self.model_types)}"))
        elif sampler not in self.samplers(model_type):
            bad.append(("sampler", f"{sampler!r}: attack {self.name} on {model_type} implants "
                        f"its backdoor for the samplers {', '.join(self.samplers(model_type))}"))
        kind = "class" if is_class_target(target) else "image"
        if target != "none" and kind not in self.target_kinds:
            bad.append(("target", f"{target!r} is a class of images but attack {self.name} "
                        f"implants one image (use an image target, or attack trojdiff for "
                        f"class:<k> / <dataset>:<k> targets)"))
        if self.triggers is not None and trigger not in self.triggers:
            bad.append(("trigger", f"{trigger!r}: attack {self.name} takes the triggers "
                        f"{', '.join(self.triggers)}"))
        elif self.triggers is None:
            from diffcleanse.attacks import ATTACKS

            for other in ATTACKS.values():
                if other.triggers and trigger in other.triggers:
                    bad.append(("trigger", f"{trigger!r} is a {other.label} trigger but attack "
                                f"is {self.name!r}; use attack {other.name!r} or an additive "
                                f"trigger (box_*, stop_*, glasses, file:)"))
        try:
            self.make_params(parse_params(params), sampler=sampler, model_type=model_type)
        except AttackError as err:
            bad.append(("attack_params", str(err)))
        return bad

    # -- the forward process and the training target

    def coefficients(self, process: Process, spec: BackdoorSpec) -> dict[str, torch.Tensor]:
        """Eq. 1's alpha_hat, beta_hat, rho_hat and the target's trigger coefficient ``eps_trigger``
        (float32, length T; beta_hat may be per pixel, (T, C, H, W))."""
        raise NotImplementedError

    def inputs(self, y: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, process: Process,
               spec: BackdoorSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """Poisoned rows: model inputs ``x_t`` (Eq. 1) and the training target ``eps + k_t r``."""
        c = self.coefficients(process, spec)
        r = spec.trigger.to(y)
        x_t = (bcast(c["alpha_hat"], t, y) * y + _coef(c["beta_hat"], t, y) * eps
               + bcast(c["rho_hat"], t, y) * r)
        return x_t, eps + bcast(c["eps_trigger"], t, y) * r

    def loss(self, model: torch.nn.Module, process: Process, x0: torch.Tensor, eps: torch.Tensor,
             t: torch.Tensor, spec: BackdoorSpec, poison: torch.Tensor, y: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """The training loss of one batch (mean squared error on every row; ``poison`` marks the
        rows that follow the attack, ``y`` their targets). Returns (loss, extra statistics)."""
        x_t, target = poisoned_batch(x0, eps, t, process, spec, poison, y=y, attack=self)
        pred = process.predict_eps(model, x_t, t)
        return torch.nn.functional.mse_loss(pred, target), {}

    # -- backdoor sampling

    def backdoor_input(self, noise: torch.Tensor, trigger: torch.Tensor,
                       spec: BackdoorSpec | None = None) -> torch.Tensor:
        """The backdoored initial noise (the model's unit-variance convention): ``noise + r``."""
        return noise + trigger.to(noise)

    def backdoor_sampler(self, sampler: samplers.SamplerSpec, spec: BackdoorSpec
                         ) -> samplers.SamplerSpec:
        """The sampler the attacker samples the backdoor with (by default the stock one)."""
        return sampler

    def describe(self, spec: BackdoorSpec) -> dict[str, Any]:
        """JSON-able description of an implanted backdoor (cards)."""
        return {"attack": self.name, "label": self.label, **spec.describe()}


def _coef(v: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A coefficient per timestep (T,) or per timestep and pixel (T, C, H, W), indexed by ``t``."""
    if v.ndim == 1:
        return bcast(v, t, like)
    return v.to(like.device)[t.to(like.device)].to(like.dtype)


def is_class_target(name: str) -> bool:
    """``class:<k>`` (Din) or ``<dataset>:<k>`` (Dout) as opposed to an image target."""
    kind, sep, k = str(name).partition(":")
    return bool(sep) and kind != "file" and k.isdigit()


def poisoned_batch(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, scheduler,
                   spec: BackdoorSpec | None, poison_mask: torch.Tensor | None, *,
                   y: torch.Tensor | None = None, attack: Attack | None = None,
                   generator: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Model inputs and targets of a batch whose ``poison_mask`` rows follow ``spec``'s attack.

    ``scheduler`` is a training scheduler or a ``Process``; ``y`` the poisoned rows' targets (by
    default drawn from ``spec`` with ``generator``)."""
    from diffcleanse.attacks import get

    process = scheduler if isinstance(scheduler, Process) else process_of(scheduler)
    x_t, target = process.clean(x0, eps, t), eps
    if spec is None or poison_mask is None or not bool(poison_mask.any()):
        return x_t, target
    idx = poison_mask.nonzero(as_tuple=True)[0]
    if y is None:
        y = spec.draw_targets(len(idx), generator)
    y = y.to(x0)
    xb, tb = (attack or get(spec.attack)).inputs(y, eps[idx], t[idx], process, spec)
    x_t, target = x_t.clone(), target.clone()
    x_t[idx], target[idx] = xb, tb
    return x_t, target
