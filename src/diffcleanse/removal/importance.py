"""Channel importance by accumulated Taylor scores (Diff-Cleanse Eqs. 8-9; Diff-Pruning's recipe).

For a loss ``L_t`` and a parameter ``theta``, the score of one weight is
``|theta * sum_t dL_t/dtheta|`` (Eq. 9: gradients are summed over the chosen timesteps *before*
the absolute value). A prunable structure (a channel and everything torch-pruning removes with it)
scores the sum over its weights (Eq. 8). On one model, one batch of clean images ``x0`` and one
noise ``eps`` (Algorithm 2) this module takes up to five gradient sums, the score *kinds*:

* ``clean``: clean inputs ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` at the timesteps t > T
  (Eq. 9, the paper's I_c);
* ``clean_all``: the same inputs at every timestep (an ablation: the clean loss is largest at small
  t, where Eq. 9's I_c never looks);
* ``backdoor``: the defender's backdoor inputs ``x_t = alpha_t x0 + beta_t eps + rho_t r`` (Eq. 1)
  with alpha, beta of clean diffusion and ``rho_t`` linear from 2e-4 to 1 (the defender does not
  know the attack), the inverted trigger ``r``, t > T (the paper's I_b);
* ``backdoor_all``: the same at every timestep;
* ``diffpruning``: Diff-Pruning's own recipe: clean inputs from t = 1 upwards until the loss falls
  below ``thr`` times the largest loss seen.

The clean kinds come from one ascending pass over the timesteps (``clean`` is the part t > T of
``clean_all``, ``diffpruning`` a prefix), the backdoor kinds from another. Both losses target
``eps`` (Algorithm 2, lines 6 and 9). Scores are stored per parameter and per pruning direction
(``<kind>/<param>/out`` sums over every dimension but 0, ``/in`` over every dimension but 1), so
the pruner can score any dependency group it builds (``GroupScorer``).

How the removal methods combine them (``removal.methods``): Diff-Cleanse removes the largest
``I = n(I_b) - n(I_c)`` per group, with ``n`` a per-group normaliser (``NORMALISERS``: ``none`` is
the paper's raw difference; ``mean`` divides each group's scores by their mean, as the official
code's Torch-Pruning importance does before it combines the two passes; ``rank`` replaces scores
by their within-group ranks). Without a normaliser the backdoor score, often tens of times larger,
decides alone (measured: docs/removal.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from diffcleanse.attacks import process_of

KINDS = ("clean", "clean_all", "backdoor", "backdoor_all", "diffpruning")
TIMESTEP_SETS = ("above_T", "all")


def score_kind(inputs: str, timesteps: str) -> str:
    """The score kind of ``inputs`` (clean | backdoor) accumulated over ``timesteps``
    (``above_T``: t > T, Eq. 9; ``all``: every timestep)."""
    if inputs not in ("clean", "backdoor"):
        raise ValueError(f"unknown score inputs {inputs!r}: use clean or backdoor")
    if timesteps not in TIMESTEP_SETS:
        raise ValueError(f"unknown timestep set {timesteps!r}: use {', '.join(TIMESTEP_SETS)} "
                         f"(config: removal.importance.{inputs}_timesteps)")
    return inputs if timesteps == "above_T" else f"{inputs}_all"


def _norm_none(v: torch.Tensor) -> torch.Tensor:
    return v


def _norm_mean(v: torch.Tensor) -> torch.Tensor:
    m = v.mean()
    return v / m if float(m) != 0.0 else torch.zeros_like(v)


def _norm_rank(v: torch.Tensor) -> torch.Tensor:
    if len(v) < 2:
        return torch.zeros_like(v)
    return v.argsort().argsort().to(v.dtype) / (len(v) - 1)


NORMALISERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "none": _norm_none,  # the paper's Algorithm 2: I_b - I_c as accumulated
    "mean": _norm_mean,  # the official code: each group's scores over their mean
    "rank": _norm_rank,  # within-group ranks in [0, 1]: invariant to any monotone rescaling
}


def normalise(v: torch.Tensor, name: str) -> torch.Tensor:
    """``v`` (one group's channel scores) under the normaliser ``name``."""
    if name not in NORMALISERS:
        raise ValueError(f"unknown normaliser {name!r}: use {', '.join(NORMALISERS)} "
                         f"(config: removal.importance.normaliser)")
    return NORMALISERS[name](v)


@dataclass(frozen=True)
class ImportanceConfig:
    """How the gradients are accumulated (paper defaults: T = 950 of 1000, batch 16)."""

    t_threshold_frac: float = 0.95
    batch_size: int = 16
    rho_start: float = 2e-4
    rho_end: float = 1.0
    diffpruning_thr: float = 0.05

    def describe(self) -> dict[str, Any]:
        """A JSON-able description for records."""
        return asdict(self)


def threshold_timestep(num_train_timesteps: int, frac: float) -> int:
    """The paper's T (1-based timesteps) for a schedule of ``num_train_timesteps`` steps."""
    return min(max(int(round(frac * num_train_timesteps)), 0), num_train_timesteps - 1)


def accumulation_timesteps(num_train_timesteps: int, threshold: int) -> list[int]:
    """0-based diffusers indices of the paper's timesteps t > T (paper t = index + 1)."""
    return list(range(threshold, num_train_timesteps))


def rho_schedule(num_train_timesteps: int, start: float = 2e-4, end: float = 1.0) -> torch.Tensor:
    """``rho_t`` for every 0-based timestep: linear from ``start`` (t = 1) to ``end`` (last t)."""
    return torch.linspace(start, end, num_train_timesteps)


def backdoor_inputs(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, trigger: torch.Tensor,
                    scheduler, rho: torch.Tensor) -> torch.Tensor:
    """The defender's backdoor inputs (Eq. 1 with the clean process's alpha/beta and a linear
    rho): ``alpha_t x0 + beta_t eps + rho_t r``."""
    r = rho.to(x0.device)[t].view(-1, 1, 1, 1)
    return process_of(scheduler).clean(x0, eps, t) + r * trigger.to(x0)


def _accumulate(unet: nn.Module, make_input, predict, n: int, device: torch.device,
                num_steps: int,
                threshold: int, *, want_above: bool, want_all: bool, stop_thr: float | None
                ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, list[float]]]:
    """One ascending pass over the timesteps; per-parameter gradient sums of
    ``||eps - eps_theta(x_t, t)||^2`` for the sets asked for: ``above`` (t > T), ``all``, and
    ``prefix`` (with ``stop_thr``: from t = 1 until the loss falls below ``stop_thr`` x max).

    ``make_input(t)`` returns (x_t, target) for a batch at timestep tensor ``t``. Returns the sums
    and the per-timestep losses of each set.
    """
    params = list(unet.named_parameters())
    sums: dict[str, dict[str, torch.Tensor]] = {}
    wanted = [s for s, w in (("above", want_above), ("all", want_all),
                             ("prefix", stop_thr is not None)) if w]
    for s in wanted:
        sums[s] = {k: torch.zeros_like(p) for k, p in params}
    losses: dict[str, list[float]] = {s: [] for s in wanted}
    prefix_open, loss_max = stop_thr is not None, 0.0
    for step in range(num_steps):
        into = [s for s in wanted if (s == "all") or (s == "above" and step >= threshold)
                or (s == "prefix" and prefix_open)]
        if not into:
            continue
        for _, p in params:
            p.grad = None
        t = torch.full((n,), step, dtype=torch.long, device=device)
        x_t, target = make_input(t)
        loss = torch.nn.functional.mse_loss(predict(x_t, t), target)
        loss.backward()
        value = float(loss.detach())
        for s in into:
            losses[s].append(value)
            acc = sums[s]
            for k, p in params:
                if p.grad is not None:
                    acc[k].add_(p.grad)
        if prefix_open:
            loss_max = max(loss_max, value)
            if value < stop_thr * loss_max:
                prefix_open = False
    for _, p in params:
        p.grad = None
    return sums, losses


def taylor_vectors(unet: nn.Module, grads: dict[str, torch.Tensor], kind: str
                   ) -> dict[str, torch.Tensor]:
    """Per-index sums of ``|theta * G|`` for every parameter: ``<kind>/<name>/out`` and ``/in``."""
    out: dict[str, torch.Tensor] = {}
    for name, p in unet.named_parameters():
        s = (p.detach() * grads[name]).abs().float().cpu()
        out[f"{kind}/{name}/out"] = s.reshape(s.shape[0], -1).sum(1) if s.ndim > 1 else s
        if s.ndim > 1:
            out[f"{kind}/{name}/in"] = s.transpose(0, 1).reshape(s.shape[1], -1).sum(1)
    return out


def check_trigger(trigger: torch.Tensor, shape: tuple[int, ...], where: str = "trigger") -> None:
    """Refuse a trigger whose shape is not the model's input (C, H, W)."""
    if tuple(trigger.shape) != tuple(shape):
        raise ValueError(f"{where} has shape {tuple(trigger.shape)}, the model takes "
                         f"{tuple(shape)}: use a trigger inverted on this model (config: "
                         f"removal.triggers; CLI: the scan's trigger.safetensors)")


def compute_importance(unet: nn.Module, scheduler, x0: torch.Tensor, trigger: torch.Tensor | None,
                       cfg: ImportanceConfig, *, seed: int = 0,
                       kinds: tuple[str, ...] = ("clean", "backdoor", "diffpruning")
                       ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Taylor score vectors for ``kinds`` and a JSON-able description of how they were made.

    ``x0`` is a batch of clean images (the first ``cfg.batch_size`` are used), ``trigger`` the
    inverted trigger (C, H, W) as an additive offset (needed only for the backdoor kinds).
    """
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown importance kind {unknown[0]!r}: use {', '.join(KINDS)}")
    device = next(unet.parameters()).device
    n = min(cfg.batch_size, len(x0))
    if n < 1:
        raise ValueError("no clean images to accumulate gradients on")
    if any(k.startswith("backdoor") for k in kinds):
        if trigger is None:
            raise ValueError("the backdoor scores need a trigger")
        check_trigger(trigger, tuple(x0.shape[1:]))
    unet.eval().requires_grad_(True)
    x0 = x0[:n].to(device)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    N = int(scheduler.config.num_train_timesteps)
    T = threshold_timestep(N, cfg.t_threshold_frac)
    rho = rho_schedule(N, cfg.rho_start, cfg.rho_end)

    process = process_of(scheduler)  # DDPM-type or NCSN (VE: conditioned on sigma, a score)

    def clean(t):
        return process.clean(x0, eps, t), eps

    def backdoor(t):
        return backdoor_inputs(x0, eps, t, trigger.to(device), scheduler, rho), eps

    def predict(x_t, t):
        return process.predict_eps(unet, x_t, t)

    vectors: dict[str, torch.Tensor] = {}
    info: dict[str, Any] = {"num_train_timesteps": N, "T": T,
                            "timesteps": [s + 1 for s in accumulation_timesteps(N, T)],
                            "batch_size": n, "config": cfg.describe(), "losses": {},
                            "timestep_ranges": {}}
    for inputs, fn in (("clean", clean), ("backdoor", backdoor)):
        above, every = inputs in kinds, f"{inputs}_all" in kinds
        dp = inputs == "clean" and "diffpruning" in kinds
        if not (above or every or dp):
            continue
        sums, losses = _accumulate(unet, fn, predict, n, device, N, T, want_above=above,
                                   want_all=every,
                                   stop_thr=cfg.diffpruning_thr if dp else None)
        for part, kind in (("above", inputs), ("all", f"{inputs}_all"), ("prefix", "diffpruning")):
            if part in sums:
                vectors |= taylor_vectors(unet, sums[part], kind)
                info["losses"][kind] = losses[part]
                first = T + 1 if part == "above" else 1
                info["timestep_ranges"][kind] = [first, first + len(losses[part]) - 1]
    if "diffpruning" in info["timestep_ranges"]:
        info["diffpruning_timesteps"] = info["timestep_ranges"]["diffpruning"]
    unet.requires_grad_(False)
    return vectors, info


class GroupScorer:
    """Scores torch-pruning groups of one model from stored per-parameter Taylor vectors."""

    def __init__(self, model: nn.Module, vectors: dict[str, torch.Tensor]) -> None:
        self.names = {m: n for n, m in model.named_modules()}
        self.vectors = vectors

    def score(self, group, kind: str) -> torch.Tensor:
        """Per-channel (root index) sums of the ``kind`` scores over every parameter the group
        removes: weights and biases of output pruning, weights of input pruning, norm affines."""
        total = torch.zeros(len(group[0].idxs), dtype=torch.float64)
        for i, (dep, idxs) in enumerate(group):
            layer = dep.target.module
            name = self.names.get(layer)
            root_idxs = group[i].root_idxs
            if name is None or any(r is None for r in root_idxs):
                continue
            direction = "in" if getattr(dep.handler, "__name__", "") == "prune_in_channels" \
                else "out"
            index = torch.as_tensor(idxs, dtype=torch.long)
            target = torch.as_tensor(root_idxs, dtype=torch.long)
            for pname, p in layer.named_parameters(recurse=False):
                key = f"{kind}/{name + '.' if name else ''}{pname}/{direction}"
                if direction == "in" and p.ndim < 2:
                    continue  # a bias is not touched by input pruning
                if key not in self.vectors:
                    raise KeyError(f"no {kind} score for {key}: importance and model differ "
                                   f"(recompute the importance for this model and method)")
                total.scatter_add_(0, target, self.vectors[key][index].double())
        return total


class KeepScore(tp.importance.Importance):
    """A torch-pruning importance from a function of the group: higher keeps, the pruner drops
    the lowest. ``keep(group) -> (keep scores, {name: per-channel score})``; every group's
    scores are remembered by root module name in ``self.seen`` for the records."""

    def __init__(self, keep: Callable[[Any], tuple[torch.Tensor, dict[str, torch.Tensor]]],
                 names: dict[nn.Module, str]) -> None:
        self.keep = keep
        self.names = names
        self.seen: dict[str, dict[str, torch.Tensor]] = {}

    def __call__(self, group) -> torch.Tensor:
        score, parts = self.keep(group)
        root = self.names.get(group[0].dep.target.module, "?")
        self.seen[root] = {**parts, "keep": score}
        return score.float()
