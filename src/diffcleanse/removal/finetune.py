"""Clean data for fine-tuning, and fine-tuning of a pruned model with loss_p or loss_c.

Data-free path (the paper's): clean images sampled from the suspicious model itself (Appendix D:
6,000 for CIFAR-10 and CelebA, 3,000 for CelebA-HQ). Real clean data is used when the config asks.

Fine-tuning reuses ``training.train`` (seeded per step, EMA, safetensors checkpoints with a
parameter fingerprint, exact resume). ``loss_p = loss_c + loss_b``:
``loss_c = ||eps - eps_theta'(x_t, t)||^2`` on clean ``x_t``,
``loss_b = ||eps_theta'(x_t, t) - eps_theta(x_t, t)||^2`` against the frozen unpruned model
``theta`` on the same ``x_t``; ``loss_c`` alone is the ablation (Table 4).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from diffcleanse import sampling, training

LOSSES = ("p", "c")
# Appendix D: synthetic images per dataset for fine-tuning.
PAPER_SAMPLES = {"cifar10": 6000, "celeba": 6000, "celebahq": 3000}


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning hyperparameters (paper: 40 epochs, lr 2e-4, batch 128 at 32 px)."""

    epochs: float = 40.0
    lr: float = 2e-4
    batch_size: int = 128
    loss: str = "p"
    warmup_steps: int = 0
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    checkpoint_every: int = 500

    def steps(self, n_images: int) -> int:
        """Optimiser steps for ``epochs`` passes over ``n_images`` (batches drawn with
        replacement)."""
        return max(1, math.ceil(self.epochs * n_images / self.batch_size))

    def describe(self) -> dict[str, Any]:
        """A JSON-able description for records."""
        return asdict(self)


def sample_count(dataset: str, counts: dict[str, int], scale: float = 1.0) -> int:
    """Images to synthesise for a model trained on ``dataset``: ``counts[dataset]`` (or
    ``counts["default"]``) times ``scale``, at least one."""
    base = counts.get(dataset, counts.get("default"))
    if base is None:
        raise KeyError(f"no synthetic sample count for dataset {dataset!r} and no 'default'")
    return max(1, int(round(base * scale)))


def synthesise(unet: torch.nn.Module, scheduler_config: dict[str, Any], n: int, *,
               spec: sampling.SamplerSpec | None = None, seed: int = 0,
               batch_size: int = 256, progress: bool = True) -> torch.Tensor:
    """``n`` clean samples of the model itself (the data-free path), in [-1, 1]."""
    return sampling.sample(unet, scheduler_config, n, spec=spec or sampling.SamplerSpec(),
                           seed=seed, batch_size=batch_size, progress=progress,
                           desc="synthetic data")


def finetune(model: torch.nn.Module, scheduler, data: torch.Tensor, cfg: FinetuneConfig, *,
             reference: torch.nn.Module | None = None, seed: int = 0,
             checkpoint_dir: str | Path | None = None, device: str | torch.device = "cpu",
             progress: bool = True, stop_after: int | None = None,
             extra: dict[str, Any] | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Fine-tune a pruned ``model`` on clean ``data``; returns (EMA model, history).

    ``cfg.loss == "p"`` needs ``reference`` (the unpruned model, kept frozen); ``"c"`` ignores it.
    ``extra`` joins the checkpoint fingerprint (say which model/strategy/ratio this is).
    """
    if cfg.loss not in LOSSES:
        raise ValueError(f"unknown fine-tuning loss {cfg.loss!r}: use {', '.join(LOSSES)}")
    if cfg.loss == "p" and reference is None:
        raise ValueError("loss_p needs the unpruned reference model")
    tcfg = training.TrainConfig(
        steps=cfg.steps(len(data)), batch_size=cfg.batch_size, lr=cfg.lr,
        warmup_steps=cfg.warmup_steps, ema_decay=cfg.ema_decay, grad_clip=cfg.grad_clip,
        checkpoint_every=cfg.checkpoint_every, seed=seed,
        extra={"finetune": cfg.describe(), "n_images": len(data), **(extra or {})})
    teacher = reference if cfg.loss == "p" else None
    ema, hist = training.train(model, scheduler, data, tcfg, checkpoint_dir=checkpoint_dir,
                               device=device, progress=progress, stop_after=stop_after,
                               teacher=teacher)
    return ema, hist | {"steps": tcfg.steps}
