"""The adaptive attack of Diff-Cleanse's Appendix G (Eq. 16): any attack's loss plus an activation-
alignment term that hides the backdoor from Diff-Cleanse's channel importance,

    L'(x, t, eps, g) = L(x, t, eps, g) + lambda ||Delta a_t||^2,

where ``Delta a_t`` is the gap between the model's activations on a clean input and on a backdoored
input at the same timestep t and with the same noise: for each poisoned row, the clean input
``alpha_hat_t x0 + beta_hat_t eps`` of its own (clean) training image and the base attack's
backdoored input of that image (Eq. 1 with the trigger, the defender's view of a triggered input:
the attack's rho_hat). ``||.||^2`` is the squared difference averaged over the elements (the
reduction of the loss L itself, so that lambda weighs the two alike at any image size), then over
the poisoned rows. With the plain sum over elements lambda = 1e-3 already outweighs the loss per
element at 16 px (it cut the trigger coefficient the model learns by ~60%) and the backdoor never
took (ASR 0 after 500 steps, samples thrown off the data range); with the mean, the paper's
observation holds: lambda up to 1e-2 barely changes training, 1e-1 fights the backdoor.
The activations are the model's output (default) or the outputs of named modules
(``layers=mid_block;up_blocks.0``, summed over the layers). The paper's lambda grid is 0, 1e-3, 1e-2
and 1e-1 (1e-1 ruins training there); lambda = 0 is the base attack itself.

Everything but the loss (forward process, backdoored input, backdoor sampler) is the base attack's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from diffcleanse import samplers
from diffcleanse.attacks.base import Attack, AttackError, BackdoorSpec, Param, Process, _coef, bcast

BASES = ("baddiffusion", "villandiffusion", "trojdiff")


def _base(spec_or_params: BackdoorSpec | Mapping[str, Any]) -> Attack:
    from diffcleanse.attacks import get

    params = spec_or_params.params if isinstance(spec_or_params, BackdoorSpec) else spec_or_params
    return get(str(params.get("base") or "baddiffusion"))


class ActivationTap:
    """Records the outputs of named submodules during forward passes (forward hooks)."""

    def __init__(self, model: torch.nn.Module, names: list[str]):
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise AttackError(f"adaptive attack: the model has no module {', '.join(missing)} "
                              f"(attack_params layers=...; e.g. mid_block, up_blocks.0)")
        self.out: dict[str, torch.Tensor] = {}
        self._hooks = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def fn(module, args, output) -> None:
            self.out[name] = output[0] if isinstance(output, tuple) else output
        return fn

    def close(self) -> None:
        """Remove the hooks."""
        for h in self._hooks:
            h.remove()


def activation_gap(model: torch.nn.Module, process: Process, x_clean: torch.Tensor,
                   x_backdoor: torch.Tensor, t: torch.Tensor, layers: list[str] | None = None
                   ) -> torch.Tensor:
    """Per-row mean squared gap ``a(x_clean, t) - a(x_backdoor, t)`` (B,), of the output or summed
    over named layers."""
    both = torch.cat([x_clean, x_backdoor])
    tt = torch.cat([t, t])
    if not layers:
        out = process.predict_eps(model, both, tt)
        a, b = out.chunk(2)
        return (a - b).flatten(1).pow(2).mean(1)
    tap = ActivationTap(model, layers)
    try:
        model(both, process.model_time(tt))
        gap = torch.zeros(len(t), device=x_clean.device)
        for name in layers:
            a, b = tap.out[name].chunk(2)
            gap = gap + (a - b).flatten(1).pow(2).mean(1)
    finally:
        tap.close()
    return gap


class Adaptive(Attack):
    """The adaptive attack: a base attack plus lambda ||Delta a_t||^2 (module doc)."""

    name: ClassVar[str] = "adaptive"
    label: ClassVar[str] = "Adaptive"
    model_types: ClassVar[tuple[str, ...]] = ("ddpm", "ldm", "ncsn")
    target_kinds: ClassVar[tuple[str, ...]] = ("image", "class")
    params: ClassVar[dict[str, Param]] = {
        "base": Param(str, default="baddiffusion", choices=BASES,
                      help="the attack whose loss is extended"),
        "lambda": Param(float, required=True, low=0.0, high=10.0,
                        help="weight of the activation gap (paper: 0, 1e-3, 1e-2, 1e-1)"),
        "layers": Param(str, default="",
                        help="modules whose activations are aligned, separated by '+' "
                             "(empty: the model's output)"),
    }

    def _split(self, given: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        own = {k: v for k, v in given.items() if k in self.params}
        rest = {k: v for k, v in given.items() if k not in self.params}
        return own, rest

    def make_params(self, given: Mapping[str, Any], *, sampler: str, model_type: str
                    ) -> dict[str, Any]:
        own, rest = self._split(given)
        out = super().make_params(own, sampler=sampler, model_type=model_type)
        base = _base(out)
        return {**base.make_params(rest, sampler=sampler, model_type=model_type), **out}

    def check(self, *, model_type: str, sampler: str, trigger: str, target: str,
              params: Mapping[str, Any]) -> list[tuple[str, str]]:
        from diffcleanse.attacks.base import parse_params

        try:
            given = parse_params(params)
            own, rest = self._split(given)
            base = _base(super().make_params(own, sampler=sampler, model_type=model_type))
        except AttackError as err:
            return [("attack_params", str(err))]
        bad = base.check(model_type=model_type, sampler=sampler, trigger=trigger, target=target,
                         params=rest)
        return [(c, m.replace(f"attack {base.name}", f"attack adaptive (base {base.name})"))
                for c, m in bad]

    def samplers(self, model_type: str) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s for b in BASES for s in _base({"base": b}).samplers(
            model_type)))

    def coefficients(self, process: Process, spec: BackdoorSpec) -> dict[str, torch.Tensor]:
        return _base(spec).coefficients(process, spec)

    def inputs(self, y, eps, t, process, spec):
        return _base(spec).inputs(y, eps, t, process, spec)

    def backdoor_input(self, noise, trigger, spec=None):
        return _base(spec or {}).backdoor_input(noise, trigger, spec)

    def backdoor_sampler(self, sampler: samplers.SamplerSpec, spec: BackdoorSpec
                         ) -> samplers.SamplerSpec:
        return _base(spec).backdoor_sampler(sampler, spec)

    def loss(self, model: torch.nn.Module, process: Process, x0: torch.Tensor, eps: torch.Tensor,
             t: torch.Tensor, spec: BackdoorSpec, poison: torch.Tensor, y: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, float]]:
        base = _base(spec)
        loss, stats = base.loss(model, process, x0, eps, t, spec, poison, y)
        lam = float(spec.params.get("lambda", 0.0))
        idx = poison.nonzero(as_tuple=True)[0]
        if len(idx) == 0:
            return loss, {**stats, "activation_gap": 0.0}
        gap = activation_gap(model, process, *backdoor_pair(base, process, x0[idx], eps[idx],
                                                            t[idx], spec), t[idx],
                             layers_of(spec))
        gap = gap.mean()
        return loss + lam * gap, {**stats, "activation_gap": float(gap.detach())}


def layers_of(spec: BackdoorSpec) -> list[str]:
    """The named layers of an adaptive spec (empty: the model output)."""
    text = str(spec.params.get("layers") or "")
    return [n for n in text.split("+") if n]


def backdoor_pair(base: Attack, process: Process, x0: torch.Tensor, eps: torch.Tensor,
                  t: torch.Tensor, spec: BackdoorSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(clean input, backdoored input) of the same images, noise and timesteps: the clean process
    of ``x0`` and the base attack's Eq. 1 with ``x0`` as the image and its trigger."""
    c = base.coefficients(process, spec)
    r = spec.trigger.to(x0)
    clean = process.clean(x0, eps, t)
    bd = (bcast(c["alpha_hat"], t, x0) * x0 + _coef(c["beta_hat"], t, x0) * eps
          + bcast(c["rho_hat"], t, x0) * r)
    return clean, bd
