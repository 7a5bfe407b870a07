"""Zoo models from manifest rows: fetched (hub or local directory) or trained here (clean/attacked).

Each model lands as ``<model dir>`` (what defence stages read) and, beside it, a card (JSON) with
its manifest row and the attack's ground truth (trigger and target, and the attack's own ASR),
which no defence stage reads.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from diffcleanse import __version__, attacks, data, models, patterns, sampling, training
from diffcleanse.records import atomic_path, derive_seed, write_json

log = logging.getLogger(__name__)


def backdoor_spec(row: dict[str, Any], image_size: int) -> attacks.BackdoorSpec | None:
    """The attack a manifest row describes (None for clean rows)."""
    if row["attack"] == "none":
        return None
    if row["attack"] != "baddiffusion":
        raise NotImplementedError(
            f"model {row['model_id']}: training with attack {row['attack']!r} is not implemented "
            f"yet (only baddiffusion); fetch such models with source hub:/local: instead"
        )
    if patterns.is_class_target(row["target"]):
        raise ValueError(f"model {row['model_id']}: BadDiffusion needs an image target")
    return attacks.BackdoorSpec(
        trigger=patterns.render_trigger(row["trigger"], image_size),
        target=patterns.render_target(row["target"], image_size, row["trigger"]),
        poison_rate=float(row["poison_rate"]),
    )


def attack_asr(
    unet: torch.nn.Module,
    scheduler_config: dict[str, Any],
    spec: attacks.BackdoorSpec,
    sampler: sampling.SamplerSpec,
    n: int,
    threshold: float,
    seed: int,
) -> dict[str, Any]:
    """The attack's own success: share of backdoor samples within an MSE threshold of the target,
    and the same share for clean samples (which should be ~0)."""
    bd = sampling.sample(
        unet,
        scheduler_config,
        n,
        spec=sampler,
        trigger=spec.trigger,
        seed=seed,
        desc="backdoor check",
    )
    cl = sampling.sample(unet, scheduler_config, n, spec=sampler, seed=seed, desc="clean check")
    mse_bd = ((bd - spec.target) ** 2).mean(dim=(1, 2, 3))
    mse_cl = ((cl - spec.target) ** 2).mean(dim=(1, 2, 3))
    return {
        "asr": float((mse_bd < threshold).float().mean()),
        "clean_hit_rate": float((mse_cl < threshold).float().mean()),
        "median_mse_backdoor": float(mse_bd.median()),
        "median_mse_clean": float(mse_cl.median()),
        "mse_threshold": threshold,
        "n_samples": n,
        "sampler": sampler.describe(),
    }


def _card(row: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "model_id": row["model_id"],
        "manifest_row": row,
        "diffcleanse_version": __version__,
        **extra,
    }


def _ground_truth(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "attack": row["attack"],
        "trigger": row["trigger"],
        "target": row["target"],
        "poison_rate": float(row["poison_rate"]),
        "backdoored": row["attack"] != "none",
    }


def fetch_model(
    row: dict[str, Any], out_dir: str | Path, card_path: str | Path, *, allow_pickle: bool = False
) -> None:
    """Copy a hub or local model into ``out_dir`` (checked loadable) and write its card."""
    t0 = time.time()
    src = models.fetch(row["source"], allow_pickle=allow_pickle)
    with atomic_path(out_dir) as tmp:
        unet, sched_cfg = models.load_model(src, allow_pickle=allow_pickle)
        models.save_model(unet, models.scheduler_from_config(sched_cfg), tmp)
    write_json(
        card_path,
        _card(
            row,
            ground_truth=_ground_truth(row),
            source=row["source"],
            seconds=round(time.time() - t0, 3),
        ),
    )


def train_model(
    row: dict[str, Any],
    params: dict[str, Any],
    out_dir: str | Path,
    card_path: str | Path,
    *,
    init_dir: str | Path | None,
    checkpoint_dir: str | Path,
    device: str = "cpu",
    base_seed: int = 0,
) -> dict[str, Any]:
    """Train a zoo model as its manifest row says; write the model directory and its card."""
    t0 = time.time()
    size = int(row["image_size"])
    x, _ = data.load_dataset(
        row["dataset"], size, params["data_root"], download=params.get("download", False)
    )
    log.info("dataset %s: %d images of %dx%d", row["dataset"], len(x), size, size)
    if init_dir:
        unet, sched_cfg = models.load_model(init_dir, device="cpu")
        scheduler = models.scheduler_from_config(sched_cfg)
        lr = params["finetune_lr"]
    else:
        torch.manual_seed(derive_seed(base_seed, row["model_id"], int(row["seed"]), "init"))
        unet = models.build_unet(size, **params["unet"])
        scheduler = models.build_scheduler(**params["scheduler"])
        lr = params["lr"]
    spec = backdoor_spec(row, size)
    seed = derive_seed(base_seed, row["model_id"], int(row["seed"]), "train")
    cfg = training.TrainConfig(
        steps=int(row["train_steps"]),
        batch_size=params["batch_size"],
        lr=lr,
        warmup_steps=params["warmup_steps"],
        ema_decay=params["ema_decay"],
        grad_clip=params["grad_clip"],
        checkpoint_every=params["checkpoint_every"],
        seed=seed,
        extra={
            "row": row,
            "init": str(init_dir or ""),
            "unet": params["unet"],
            "scheduler": params["scheduler"],
        },
    )
    ema, hist = training.train(
        unet, scheduler, x, cfg, attack=spec, checkpoint_dir=checkpoint_dir, device=device
    )
    ema = ema.cpu().eval()
    check = None
    if spec is not None:
        chk = params["attack_check"]
        check = attack_asr(
            ema,
            dict(scheduler.config),
            spec,
            sampling.SamplerSpec(name=row["sampler"]),
            chk["n_samples"],
            chk["mse_threshold"],
            derive_seed(base_seed, row["model_id"], "check"),
        )
        log.info(
            "attack check: ASR %.2f (clean hit rate %.2f) at MSE < %g",
            check["asr"],
            check["clean_hit_rate"],
            check["mse_threshold"],
        )
    with atomic_path(out_dir) as tmp:
        models.save_model(ema, scheduler, tmp)
    losses = hist["losses"]
    tail = losses[-200:]
    card = _card(
        row,
        ground_truth=_ground_truth(row),
        attack_check=check,
        seed=seed,
        training={
            "steps": cfg.steps,
            "lr": lr,
            "batch_size": cfg.batch_size,
            "resumed_from_step": hist["resumed_from"],
            "init": str(init_dir or ""),
            "final_loss": sum(tail) / max(1, len(tail)),
        },
        params=params,
        seconds=round(time.time() - t0, 3),
    )
    write_json(card_path, card)
    return card
