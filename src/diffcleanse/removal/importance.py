"""Channel importance by accumulated Taylor scores (Diff-Cleanse Eqs. 8-9; Diff-Pruning's recipe).

For a loss ``L_t`` and a parameter ``theta``, the score of one weight is
``|theta * sum_t dL_t/dtheta|`` (Eq. 9: gradients are summed over the chosen timesteps *before*
the absolute value). A prunable structure (a channel and everything torch-pruning removes with it)
scores the sum over its weights (Eq. 8). Three gradient sums are taken on one model, one batch of
clean images ``x0`` and one noise ``eps`` (Algorithm 2):

* ``clean``: clean inputs ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` at the timesteps t > T;
* ``backdoor``: the defender's backdoor inputs ``x_t = alpha_t x0 + beta_t eps + rho_t r`` (Eq. 1)
  with alpha, beta of clean diffusion and ``rho_t`` linear from 2e-4 to 1 (the defender does not
  know the attack), the inverted trigger ``r``, same timesteps;
* ``diffpruning``: Diff-Pruning's own recipe: clean inputs from t = 0 upwards until the loss falls
  below ``thr`` times the largest loss seen.

Both losses target ``eps`` (Algorithm 2, lines 6 and 9). Diff-Cleanse removes the channels with the
largest ``I = I_b - I_c`` (the paper; the official code's ``-(I_b + I_c)`` is not used),
Diff-Pruning those with the smallest clean score. Scores are stored per parameter and per pruning
direction (``<kind>/<param>/out`` sums over every dimension but 0, ``/in`` over every dimension but
1), so the pruner can score any dependency group it builds; ``pruning.group_scores`` gives them per
group.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from diffcleanse.attacks import alphas_cumprod, clean_inputs

KINDS = ("clean", "backdoor", "diffpruning")


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
    """The defender's backdoor inputs (Eq. 1 with clean alpha/beta and a linear rho)."""
    abar = alphas_cumprod(scheduler).float().to(x0.device)[t].view(-1, 1, 1, 1)
    r = rho.to(x0.device)[t].view(-1, 1, 1, 1)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * eps + r * trigger.to(x0)


def _accumulate(unet: nn.Module, make_input, timesteps: list[int], n: int, device: torch.device,
                stop_thr: float | None = None) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Sum of parameter gradients of ``||eps - eps_theta(x_t, t)||^2`` over ``timesteps``.

    ``make_input(t)`` returns (x_t, target) for a batch at timestep tensor ``t``. With ``stop_thr``
    the loop stops after the first step whose loss is below ``stop_thr`` times the largest so far.
    """
    params = [(k, p) for k, p in unet.named_parameters()]
    for _, p in params:
        p.grad = None
    losses: list[float] = []
    loss_max = 0.0
    for step in timesteps:
        t = torch.full((n,), step, dtype=torch.long, device=device)
        x_t, target = make_input(t)
        loss = torch.nn.functional.mse_loss(unet(x_t, t).sample, target)
        loss.backward()
        value = float(loss.detach())
        losses.append(value)
        loss_max = max(loss_max, value)
        if stop_thr is not None and value < stop_thr * loss_max:
            break
    grads = {k: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
             for k, p in params}
    for _, p in params:
        p.grad = None
    return grads, losses


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


def compute_importance(unet: nn.Module, scheduler, x0: torch.Tensor, trigger: torch.Tensor,
                       cfg: ImportanceConfig, *, seed: int = 0,
                       kinds: tuple[str, ...] = KINDS) -> tuple[dict[str, torch.Tensor],
                                                                dict[str, Any]]:
    """Taylor score vectors for ``kinds`` and a JSON-able description of how they were made.

    ``x0`` is a batch of clean images (the first ``cfg.batch_size`` are used), ``trigger`` the
    inverted trigger (3, H, W) as an additive offset.
    """
    device = next(unet.parameters()).device
    unet.eval().requires_grad_(True)
    n = min(cfg.batch_size, len(x0))
    if n < 1:
        raise ValueError("no clean images to accumulate gradients on")
    x0 = x0[:n].to(device)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    N = int(scheduler.config.num_train_timesteps)
    T = threshold_timestep(N, cfg.t_threshold_frac)
    steps = accumulation_timesteps(N, T)
    rho = rho_schedule(N, cfg.rho_start, cfg.rho_end)
    r = trigger.to(device)

    def clean(t):
        return clean_inputs(x0, eps, t, scheduler)

    def backdoor(t):
        return backdoor_inputs(x0, eps, t, r, scheduler, rho), eps

    vectors: dict[str, torch.Tensor] = {}
    info: dict[str, Any] = {"num_train_timesteps": N, "T": T, "timesteps": [s + 1 for s in steps],
                            "batch_size": n, "config": cfg.describe(), "losses": {}}
    for kind in kinds:
        if kind == "clean":
            grads, losses = _accumulate(unet, clean, steps, n, device)
        elif kind == "backdoor":
            grads, losses = _accumulate(unet, backdoor, steps, n, device)
        elif kind == "diffpruning":
            grads, losses = _accumulate(unet, clean, list(range(N)), n, device,
                                        stop_thr=cfg.diffpruning_thr)
            info["diffpruning_timesteps"] = [1, len(losses)]
        else:
            raise ValueError(f"unknown importance kind {kind!r}: use {', '.join(KINDS)}")
        info["losses"][kind] = losses
        vectors |= taylor_vectors(unet, grads, kind)
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
                    raise KeyError(f"no {kind} score for {key}: importance and model differ")
                total.scatter_add_(0, target, self.vectors[key][index].double())
        return total


class DiffCleanseImportance(tp.importance.Importance):
    """Keep-score ``I_c - I_b``: the pruner drops the lowest, i.e. the largest ``I = I_b - I_c``."""

    def __init__(self, scorer: GroupScorer) -> None:
        self.scorer = scorer

    def __call__(self, group) -> torch.Tensor:
        return (self.scorer.score(group, "clean") - self.scorer.score(group, "backdoor")).float()


class DiffPruningImportance(tp.importance.Importance):
    """Keep-score: Diff-Pruning's clean Taylor importance; the pruner drops the smallest."""

    def __init__(self, scorer: GroupScorer) -> None:
        self.scorer = scorer

    def __call__(self, group) -> torch.Tensor:
        return self.scorer.score(group, "diffpruning").float()


IMPORTANCES: dict[str, type[tp.importance.Importance]] = {
    "diffcleanse": DiffCleanseImportance,
    "diffpruning": DiffPruningImportance,
}
