"""DDPM training, clean or with an attack, with EMA, gradient clipping, checkpoints and resume.

Every step draws its batch, timesteps, noise and poison mask from a generator seeded by
(seed, step), so a run resumed from a checkpoint continues exactly as an uninterrupted run would.
Checkpoints are safetensors (model, EMA, Adam moments) plus a JSON sidecar; they carry a hash of the
training parameters and a mismatching checkpoint is ignored rather than resumed.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from diffcleanse.attacks import BackdoorSpec, poisoned_batch
from diffcleanse.records import derive_seed

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Hyperparameters of one training run."""

    steps: int
    batch_size: int = 32
    lr: float = 2e-4
    warmup_steps: int = 100
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    checkpoint_every: int = 500
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # anything else that defines the run

    def fingerprint(self) -> dict[str, Any]:
        """What must match for a checkpoint to be resumed."""
        d = {k: v for k, v in self.__dict__.items() if k != "checkpoint_every"}
        return json.loads(json.dumps(d, default=str))


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
            pe.lerp_(pm, 1 - decay)


def _save_checkpoint(
    ckpt_dir: Path, step: int, model, ema, opt, cfg: TrainConfig, losses: list[float]
) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors |= {f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            tensors[f"opt.{i}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_dir / "state.safetensors.tmp"
    save_file(tensors, str(tmp))
    meta = {"step": step, "fingerprint": cfg.fingerprint(), "losses": losses}
    (ckpt_dir / "state.json.tmp").write_text(json.dumps(meta))
    os.replace(tmp, ckpt_dir / "state.safetensors")
    os.replace(ckpt_dir / "state.json.tmp", ckpt_dir / "state.json")


def _load_checkpoint(ckpt_dir: Path, model, ema, opt, cfg: TrainConfig) -> tuple[int, list[float]]:
    meta_file, st_file = ckpt_dir / "state.json", ckpt_dir / "state.safetensors"
    if not (meta_file.is_file() and st_file.is_file()):
        return 0, []
    meta = json.loads(meta_file.read_text())
    if meta.get("fingerprint") != cfg.fingerprint():
        log.warning("checkpoint in %s was made with other parameters: starting afresh", ckpt_dir)
        return 0, []
    t = load_file(str(st_file))
    model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
    ema.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("ema.")})
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in t.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    sd["state"] = state
    opt.load_state_dict(sd)
    log.info("resumed from %s at step %d", ckpt_dir, meta["step"])
    return int(meta["step"]), list(meta.get("losses", []))


def train(
    unet: torch.nn.Module,
    scheduler,
    data: torch.Tensor,
    cfg: TrainConfig,
    *,
    attack: BackdoorSpec | None = None,
    checkpoint_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    stop_after: int | None = None,
    teacher: torch.nn.Module | None = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train ``unet`` on ``data`` (N, 3, H, W in [-1, 1]); returns (EMA model, history).

    With ``attack`` each sample is poisoned with probability ``attack.poison_rate`` (BadDiffusion).
    ``stop_after`` ends the run early after that global step (for tests of resume); the checkpoint
    then holds the state to continue from. With ``teacher`` (a frozen reference model) the loss
    adds ``||eps_model(x_t, t) - eps_teacher(x_t, t)||^2`` on the same ``x_t`` (Diff-Cleanse's
    loss_b, so the loss is loss_p = loss_c + loss_b); without it the loop is unchanged.
    """
    device = torch.device(device)
    if teacher is not None:
        teacher = teacher.to(device).eval().requires_grad_(False)
    model = unet.to(device).train().requires_grad_(True)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    start, losses = _load_checkpoint(ckpt, model, ema, opt, cfg) if ckpt else (0, [])
    data = data.to(device)
    T = scheduler.config.num_train_timesteps
    bar = tqdm(
        range(start, cfg.steps),
        initial=start,
        total=cfg.steps,
        desc="training",
        disable=not progress,
        mininterval=2.0,
    )
    for step in bar:
        g = torch.Generator().manual_seed(derive_seed(cfg.seed, "step", step))
        idx = torch.randint(0, len(data), (cfg.batch_size,), generator=g)
        t = torch.randint(0, T, (cfg.batch_size,), generator=g)
        eps = torch.randn((cfg.batch_size, *data.shape[1:]), generator=g)
        mask = (torch.rand(cfg.batch_size, generator=g) < attack.poison_rate) if attack else None
        x_t, target = poisoned_batch(
            data[idx],
            eps.to(device),
            t.to(device),
            scheduler,
            attack,
            mask.to(device) if mask is not None else None,
        )
        for grp in opt.param_groups:
            grp["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        pred = model(x_t, t.to(device)).sample
        loss = torch.nn.functional.mse_loss(pred, target)
        if teacher is not None:
            with torch.no_grad():
                ref = teacher(x_t, t.to(device)).sample
            loss = loss + torch.nn.functional.mse_loss(pred, ref)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        _ema_update(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / 50:.4f}")
        done = step + 1
        if ckpt and (
            done % cfg.checkpoint_every == 0
            or done == cfg.steps
            or (stop_after is not None and done >= stop_after)
        ):
            _save_checkpoint(ckpt, done, model, ema, opt, cfg, losses)
        if stop_after is not None and done >= stop_after and done < cfg.steps:
            return ema, {"losses": losses, "stopped_at": done, "resumed_from": start}
    bar.close()
    return ema, {"losses": losses, "stopped_at": cfg.steps, "resumed_from": start}
