"""Diffusion training (DDPM, NCSN, LDM latents), clean or attacked: EMA, gradient clipping,
checkpoints and resume.

Every step draws its batch, timesteps, noise and poison mask from a generator seeded by
(seed, step), so a run resumed from a checkpoint continues exactly as an uninterrupted run would.
Checkpoints are one safetensors file (model, EMA, Adam moments) whose metadata carries the step, the
training parameters and a digest of the tensors, plus a readable JSON copy of that metadata; a
checkpoint of other parameters, or a torn one (parts that disagree), is ignored rather than resumed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from diffcleanse import precision
from diffcleanse.attacks import BackdoorSpec
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
        if (prec := precision.current()) != "fp32":  # fp32 checkpoints from before stay valid
            d["precision"] = prec
        return json.loads(json.dumps(d, default=str))


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
            pe.lerp_(pm, 1 - decay)


CHECKPOINT_FORMAT = "diffcleanse-train-checkpoint/2"


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes (sorted by name)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        v = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _save_checkpoint(
    ckpt_dir: Path, step: int, model, ema, opt, cfg: TrainConfig, losses: list[float],
    stats: dict[str, list[float]] | None = None,
) -> None:
    """One atomic unit: ``state.safetensors`` holds the tensors *and* the step, the parameter
    fingerprint, the losses (and the attack's per-step ``stats``, so a resumed run reports the
    same final statistics) and a digest of the tensors in its metadata, written to a temporary
    file and renamed. ``state.json`` is a readable copy of the metadata (written after)."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors |= {f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            tensors[f"opt.{i}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    meta = {"format": CHECKPOINT_FORMAT, "step": step, "fingerprint": cfg.fingerprint(),
            "digest": _digest(tensors)}
    tmp = ckpt_dir / "state.safetensors.tmp"
    extra = {"losses": json.dumps(losses)}
    if stats is not None:
        extra["stats"] = json.dumps(stats)
    save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta), **extra})
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, ckpt_dir / "state.safetensors")
    (ckpt_dir / "state.json.tmp").write_text(json.dumps({**meta, "losses": losses}))
    os.replace(ckpt_dir / "state.json.tmp", ckpt_dir / "state.json")


class TornCheckpoint(RuntimeError):
    """A checkpoint whose parts disagree (weights, step, sidecar): never resumed."""


def _read_checkpoint(st_file: Path, meta_file: Path) -> tuple[dict[str, Any], list[float],
                                                             dict[str, torch.Tensor]]:
    """The metadata, losses and tensors of a checkpoint, or TornCheckpoint."""
    try:
        with safe_open(str(st_file), framework="pt") as f:
            raw = f.metadata() or {}
        t = load_file(str(st_file))
    except Exception as err:  # a truncated or foreign file: safetensors raises several types
        raise TornCheckpoint(f"{st_file} cannot be read ({err})") from err
    if "meta" not in raw:
        raise TornCheckpoint(f"{st_file} carries no step and fingerprint (an older or foreign "
                             f"checkpoint)")
    meta = json.loads(raw["meta"])
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise TornCheckpoint(f"{st_file}: unknown checkpoint format {meta.get('format')!r}")
    if _digest(t) != meta.get("digest"):
        raise TornCheckpoint(f"{st_file}: the tensors do not match the digest written with them")
    if meta_file.is_file():
        side = json.loads(meta_file.read_text())
        if side.get("step") != meta["step"] or side.get("digest") != meta["digest"]:
            raise TornCheckpoint(f"{meta_file} says step {side.get('step')}, the weights in "
                                 f"{st_file.name} are of step {meta['step']}")
    meta["stats"] = json.loads(raw.get("stats", "{}"))
    return meta, json.loads(raw.get("losses", "[]")), t


def _load_checkpoint(ckpt_dir: Path, model, ema, opt, cfg: TrainConfig,
                     stats: dict[str, list[float]] | None = None) -> tuple[int, list[float]]:
    """Resume state from ``ckpt_dir``: (step, losses), or (0, []) when there is nothing to resume
    (no checkpoint, other parameters, or a torn checkpoint: detected, logged, not resumed).
    ``stats``, when given, is filled with the checkpoint's per-step attack statistics."""
    meta_file, st_file = ckpt_dir / "state.json", ckpt_dir / "state.safetensors"
    if not st_file.is_file():
        return 0, []
    try:
        meta, losses, t = _read_checkpoint(st_file, meta_file)
    except TornCheckpoint as err:
        log.warning("torn checkpoint, not resumed (starting afresh): %s", err)
        return 0, []
    if meta.get("fingerprint") != cfg.fingerprint():
        log.warning("checkpoint in %s was made with other parameters: starting afresh", ckpt_dir)
        return 0, []
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
    if stats is not None:
        stats.update({k: list(v) for k, v in meta["stats"].items()})
    log.info("resumed from %s at step %d", ckpt_dir, meta["step"])
    return int(meta["step"]), list(losses)


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
    snapshot_every: int | None = None,
    on_snapshot: Callable[[int, torch.nn.Module], None] | None = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train ``unet`` on ``data`` (N, C, H, W in the space it denoises); returns (EMA, history).

    ``scheduler`` is the training noise schedule: a DDPM-type scheduler (DDPM models, LDM latents)
    or a ``ScoreSdeVeScheduler`` (NCSN: the model is conditioned on sigma and predicts the score,
    trained as ``-sigma * output`` against the noise). With ``attack`` each sample is poisoned with
    probability ``attack.poison_rate`` and the batch loss is that attack's (``attacks.ATTACKS``:
    BadDiffusion, VillanDiffusion, TrojDiff, adaptive). ``stop_after`` ends the run early after that
    global step (for tests of resume); the checkpoint then holds the state to continue from. With
    ``teacher`` (a frozen reference model) the loss adds ``||eps_model(x_t, t) - eps_teacher(x_t,
    t)||^2`` on the same ``x_t`` (Diff-Cleanse's loss_b, so the loss is loss_p = loss_c + loss_b);
    without it the loop is unchanged. ``on_snapshot(step, ema)`` is called every ``snapshot_every``
    steps (the utility-during-training curve of the adaptive attack, Fig. 14).
    """
    from diffcleanse.attacks import get as get_attack
    from diffcleanse.attacks import process_of

    device = torch.device(device)
    if teacher is not None:
        if attack is not None:
            raise ValueError("training with both an attack and a teacher is not supported")
        teacher = teacher.to(device).eval().requires_grad_(False)
    process = process_of(scheduler)
    method = get_attack(attack.attack) if attack is not None else None
    model = unet.to(device).train().requires_grad_(True)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    stats: dict[str, list[float]] = {}
    start, losses = _load_checkpoint(ckpt, model, ema, opt, cfg, stats) if ckpt else (0, [])
    data = data.to(device)
    T = process.T
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
        for grp in opt.param_groups:
            grp["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        x0, eps, t = data[idx], eps.to(device), t.to(device)
        if method is not None:
            y = attack.draw_targets(int(mask.sum()), g).to(device)
            loss, extra = method.loss(model, process, x0, eps, t, attack, mask.to(device), y)
            for k, v in extra.items():
                stats.setdefault(k, []).append(v)
        else:
            x_t = process.clean(x0, eps, t)
            pred = process.predict_eps(model, x_t, t)
            loss = torch.nn.functional.mse_loss(pred, eps)
            if teacher is not None:
                with torch.no_grad():
                    ref = process.predict_eps(teacher, x_t, t)
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
        if on_snapshot is not None and snapshot_every and done % snapshot_every == 0:
            on_snapshot(done, ema)
        if ckpt and (
            done % cfg.checkpoint_every == 0
            or done == cfg.steps
            or (stop_after is not None and done >= stop_after)
        ):
            _save_checkpoint(ckpt, done, model, ema, opt, cfg, losses, stats)
        if stop_after is not None and done >= stop_after and done < cfg.steps:
            return ema, {"losses": losses, "stopped_at": done, "resumed_from": start,
                         "stats": stats}
    bar.close()
    return ema, {"losses": losses, "stopped_at": cfg.steps, "resumed_from": start, "stats": stats}
