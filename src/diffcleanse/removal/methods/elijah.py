"""Elijah's backdoor removal (An et al. 2024): fine-tune the suspicious model, prune nothing.

Against a frozen copy ``theta0`` of the suspicious model and the inverted trigger ``tau``, every
step minimises

    loss_c(x_t)                                    the clean diffusion loss on a batch of clean data
  + ||eps_theta(eps + tau, T) - eps_theta0(eps, T)||^2   the trigger no longer shifts the output
  + ||eps_theta(eps, T)       - eps_theta0(eps, T)||^2   clean noise keeps its output

at the last timestep T, with ``eps`` the batch's noise (the reference implementation's
``deshift_loss``, BadDiffusion/baddiffusion.py in njuaplusplus/Elijah). The clean data is a share
``data_fraction`` of the clean images (Elijah: 10 % of the training set; here of the removal's
clean data, synthetic by default). The loop has the zoo's training loop's guarantees: a batch,
timesteps and noise seeded per (seed, step), EMA, gradient clipping, checkpoints that resume
exactly.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from diffcleanse import training
from diffcleanse.attacks import process_of
from diffcleanse.records import derive_seed
from diffcleanse.removal import importance as imp
from diffcleanse.removal.methods.base import RemovalMethod


class Elijah(RemovalMethod):
    name = "elijah"
    label = "Elijah (fine-tuning)"
    prunes = False
    uses_trigger = True


@dataclass(frozen=True)
class ElijahConfig:
    """Elijah's removal budget (reference: 11 epochs over 10 % of CIFAR-10, batch 128)."""

    data_fraction: float = 0.1
    epochs: float = 11.0
    lr: float = 2e-4
    batch_size: int = 128
    warmup_steps: int = 0
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    checkpoint_every: int = 500

    def __post_init__(self) -> None:
        if not 0 < self.data_fraction <= 1:
            raise ValueError(f"removal.elijah.data_fraction must be in (0, 1], got "
                             f"{self.data_fraction}")

    def n_images(self, available: int) -> int:
        """Clean images used: ``data_fraction`` of ``available``, at least one."""
        return max(1, round(self.data_fraction * available))

    def steps(self, available: int) -> int:
        """Optimiser steps: ``epochs`` passes over the used images."""
        return max(1, math.ceil(self.epochs * self.n_images(available) / self.batch_size))

    def describe(self) -> dict[str, Any]:
        """A JSON-able description for records."""
        return asdict(self)


def deshift_terms(model: torch.nn.Module, frozen: torch.nn.Module, eps: torch.Tensor,
                  trigger: torch.Tensor, t_last: int, process=None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(||eps_theta(x_T + tau, T) - eps_theta0(x_T, T)||^2, ||eps_theta(x_T, T) -
    eps_theta0(x_T, T)||^2) as mean squared errors at the last timestep, with x_T the noise
    (``eps``; ``sigma_T eps`` for a VE process) and the models' epsilon predictions."""
    t = torch.full((len(eps),), t_last, dtype=torch.long, device=eps.device)
    x_T = eps if process is None or process.kind != "ve" else eps * float(process.beta_hat[-1])

    def pred(m, x):
        return m(x, t).sample if process is None else process.predict_eps(m, x, t)

    with torch.no_grad():
        ref = pred(frozen, x_T)
    shifted = pred(model, x_T + trigger.to(eps))
    benign = pred(model, x_T)
    return (torch.nn.functional.mse_loss(shifted, ref),
            torch.nn.functional.mse_loss(benign, ref))


def repair(model: torch.nn.Module, scheduler, data: torch.Tensor, trigger: torch.Tensor,
           cfg: ElijahConfig, *, seed: int = 0, checkpoint_dir: str | Path | None = None,
           device: str | torch.device = "cpu", progress: bool = True,
           stop_after: int | None = None, extra: dict[str, Any] | None = None
           ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Fine-tune ``model`` with Elijah's loss; returns (EMA model, history).

    ``data``: the clean images available (a seeded ``data_fraction`` of them is used);
    ``trigger``: the inverted trigger (C, H, W). ``stop_after`` ends early after that step (the
    checkpoint then holds the state to continue from).
    """
    device = torch.device(device)
    imp.check_trigger(trigger, tuple(data.shape[1:]))
    steps = cfg.steps(len(data))
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(
        derive_seed(seed, "elijah-data")))[:cfg.n_images(len(data))]
    data = data[pick].to(device)
    tcfg = training.TrainConfig(
        steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
        ema_decay=cfg.ema_decay, grad_clip=cfg.grad_clip, checkpoint_every=cfg.checkpoint_every,
        seed=seed, extra={"elijah": cfg.describe(), "n_images": len(pick),
                          "trigger_sum": float(trigger.double().sum()), **(extra or {})})
    frozen = copy.deepcopy(model).to(device).eval().requires_grad_(False)
    model = model.to(device).train().requires_grad_(True)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    start, losses = training._load_checkpoint(ckpt, model, ema, opt, tcfg) if ckpt else (0, [])
    n_t = int(scheduler.config.num_train_timesteps)
    process = process_of(scheduler)
    r = trigger.to(device)
    parts: dict[str, list[float]] = {"clean": [], "shift": [], "benign": []}
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="elijah removal",
               disable=not progress, mininterval=2.0)
    done = start
    for step in bar:
        g = torch.Generator().manual_seed(derive_seed(tcfg.seed, "step", step))
        idx = torch.randint(0, len(data), (cfg.batch_size,), generator=g)
        t = torch.randint(0, n_t, (cfg.batch_size,), generator=g)
        eps = torch.randn((cfg.batch_size, *data.shape[1:]), generator=g).to(device)
        x_t = process.clean(data[idx], eps, t.to(device))
        for grp in opt.param_groups:
            grp["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        loss_c = torch.nn.functional.mse_loss(process.predict_eps(model, x_t, t.to(device)), eps)
        shift, benign = deshift_terms(model, frozen, eps, r, n_t - 1, process)
        loss = loss_c + shift + benign
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        training._ema_update(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))
        losses.append(loss.item())
        for k, v in (("clean", loss_c), ("shift", shift), ("benign", benign)):
            parts[k].append(float(v.detach()))
        done = step + 1
        if ckpt and (done % cfg.checkpoint_every == 0 or done == steps
                     or (stop_after is not None and done >= stop_after)):
            training._save_checkpoint(ckpt, done, model, ema, opt, tcfg, losses)
        if stop_after is not None and done >= stop_after and done < steps:
            break
    bar.close()
    model.requires_grad_(False)
    return ema, {"losses": losses, "parts": parts, "steps": steps, "stopped_at": done,
                 "resumed_from": start, "n_images": len(pick)}
