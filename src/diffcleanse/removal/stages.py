"""Stage 2 as file-to-file steps (one per workflow rule) and as one call (``repair_model``).

Every step writes its outputs atomically and a JSON record with the parameters that made it, the
package version, the seed and the seconds it took.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from diffcleanse import data, models, sampling
from diffcleanse.records import atomic_path, derive_seed, make_record, read_json, write_json
from diffcleanse.removal import finetune as ft
from diffcleanse.removal import importance as imp
from diffcleanse.removal import pruning

log = logging.getLogger(__name__)
DATA_SOURCES = ("synthetic", "real")


def load_trigger(path: str | Path, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Stage 1's inverted trigger (safetensors key ``trigger``: an additive offset (3, H, W))."""
    t = load_file(str(path))
    if "trigger" not in t:
        raise KeyError(f"{path} holds no tensor 'trigger' (keys: {', '.join(t)})")
    r = t["trigger"].float()
    if r.ndim == 4 and r.shape[0] == 1:
        r = r[0]
    if shape is not None and tuple(r.shape) != tuple(shape):
        raise ValueError(f"{path}: trigger has shape {tuple(r.shape)}, the model takes {shape}")
    return r


def load_images(path: str | Path) -> torch.Tensor:
    """Clean images written by ``make_clean_data`` (safetensors key ``images``)."""
    return load_file(str(path))["images"]


def _model_shape(unet) -> tuple[int, int, int]:
    size = unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (unet.config.in_channels, h, w)


def make_clean_data(model_dir: str | Path, out_path: str | Path, record_path: str | Path, *,
                    source: str = "synthetic", n: int, dataset: str = "",
                    data_root: str | Path = "data", sampler: str = "ddpm",
                    steps: int | None = None, batch_size: int = 256, seed: int = 0,
                    device: str = "cpu", progress: bool = True) -> dict[str, Any]:
    """Clean images for importance and fine-tuning: ``n`` samples of the model itself
    (``synthetic``, data-free) or ``n`` images of its ``dataset`` drawn at random (``real``)."""
    t0 = time.time()
    if source not in DATA_SOURCES:
        raise ValueError(f"unknown clean-data source {source!r}: use {', '.join(DATA_SOURCES)}")
    unet, sched_cfg = models.load_model(model_dir, device=device)
    _, h, _ = _model_shape(unet)
    spec = sampling.SamplerSpec(name=sampler, steps=steps)
    if source == "synthetic":
        images = ft.synthesise(unet, sched_cfg, n, spec=spec, seed=seed, batch_size=batch_size,
                               progress=progress)
    else:
        x, _ = data.load_dataset(dataset, h, data_root)
        pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
        images = x[pick]
    with atomic_path(out_path) as tmp:
        save_file({"images": images.contiguous().float()}, str(tmp))
    params = {"source": source, "n": n, "dataset": dataset,
              "sampler": spec.describe() if source == "synthetic" else None,
              "batch_size": batch_size}
    record = make_record("clean_data", params, seed, time.time() - t0, model_dir=str(model_dir),
                         n_images=len(images), shape=list(images.shape[1:]))
    write_json(record_path, record)
    return record


def _rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float | None:
    if len(a) < 2:
        return None
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den else None


def run_importance(model_dir: str | Path, data_path: str | Path, trigger_path: str | Path,
                   out_path: str | Path, record_path: str | Path, *,
                   cfg: imp.ImportanceConfig | None = None, seed: int = 0,
                   device: str = "cpu") -> dict[str, Any]:
    """Accumulate the clean, backdoor and Diff-Pruning Taylor scores of one model (Eqs. 8-9).

    Writes per-parameter score vectors (what ``run_prune`` reads) and per-group channel scores
    ``group/<root>/<kind>`` and ``group/<root>/I`` (= backdoor - clean) to ``out_path``.
    """
    t0 = time.time()
    cfg = cfg or imp.ImportanceConfig()
    unet, sched_cfg = models.load_model(model_dir, device=device)
    scheduler = models.scheduler_from_config(sched_cfg)
    trigger = load_trigger(trigger_path, _model_shape(unet))
    images = load_images(data_path)
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    vectors, info = imp.compute_importance(unet, scheduler, images[pick[:cfg.batch_size]], trigger,
                                           cfg, seed=derive_seed(seed, "noise"))
    table = pruning.group_scores(unet, vectors)
    tensors = dict(vectors)
    summary = []
    for root, kinds in table.items():
        for kind, v in kinds.items():
            tensors[f"group/{root}/{kind}"] = v
        i_b, i_c = kinds["backdoor"], kinds["clean"]
        summary.append({"root": root, "channels": len(i_c), "sum_clean": float(i_c.sum()),
                        "sum_backdoor": float(i_b.sum()),
                        "rank_correlation_clean_backdoor": _rank_correlation(i_c, i_b),
                        "top_I": [int(i) for i in kinds["I"].argsort(descending=True)[:3]]})
    with atomic_path(out_path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    seconds = time.time() - t0
    record = make_record("importance", cfg.describe(), seed, seconds, model_dir=str(model_dir),
                         trigger=str(trigger_path), data=str(data_path), T=info["T"],
                         num_train_timesteps=info["num_train_timesteps"],
                         timesteps=info["timesteps"], batch_size=info["batch_size"],
                         diffpruning_timesteps=info["diffpruning_timesteps"],
                         losses=info["losses"], groups=summary,
                         score_definition="I = I_b - I_c (paper Eq. 9 / Algorithm 2)")
    write_json(record_path, record)
    return record


def _vectors(path: str | Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(path)).items() if not k.startswith("group/")}


def run_prune(model_dir: str | Path, importance_path: str | Path, out_dir: str | Path,
              record_path: str | Path, *, strategy: str, ratio: float,
              groupnorm: str = "exact") -> dict[str, Any]:
    """Prune one model with ``strategy`` at ``ratio`` and save it in the pruned format."""
    t0 = time.time()
    unet, sched_cfg = models.load_model(model_dir)
    rec = pruning.prune_unet(unet, _vectors(importance_path), strategy, ratio, groupnorm)
    with atomic_path(out_dir) as tmp:
        models.save_model(unet, models.scheduler_from_config(sched_cfg), tmp)
    params = {"strategy": strategy, "ratio": ratio, "groupnorm": groupnorm}
    record = make_record("prune", params, None, time.time() - t0, model_dir=str(model_dir),
                         importance=str(importance_path), **rec)
    write_json(record_path, record)
    return record


def run_finetune(pruned_dir: str | Path, reference_dir: str | Path, data_path: str | Path,
                 out_dir: str | Path, record_path: str | Path, *,
                 cfg: ft.FinetuneConfig, seed: int = 0,
                 checkpoint_dir: str | Path | None = None, device: str = "cpu",
                 progress: bool = True, stop_after: int | None = None,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fine-tune a pruned model (loss_p against the unpruned ``reference_dir``, or loss_c).

    Resumes from ``checkpoint_dir`` when it holds a checkpoint of the same parameters.
    """
    t0 = time.time()
    unet, sched_cfg = models.load_model(pruned_dir)
    scheduler = models.scheduler_from_config(sched_cfg)
    reference = models.load_model(reference_dir)[0] if cfg.loss == "p" else None
    images = load_images(data_path)
    ema, hist = ft.finetune(unet, scheduler, images, cfg, reference=reference, seed=seed,
                            checkpoint_dir=checkpoint_dir, device=device, progress=progress,
                            stop_after=stop_after, extra=extra)
    if hist["stopped_at"] < hist["steps"]:
        return {"stopped_at": hist["stopped_at"], "steps": hist["steps"]}
    with atomic_path(out_dir) as tmp:
        models.save_model(ema.cpu().eval(), scheduler, tmp)
    tail = hist["losses"][-100:]
    record = make_record(
        "finetune", cfg.describe(), seed, time.time() - t0, pruned_dir=str(pruned_dir),
        reference_dir=str(reference_dir) if reference is not None else None,
        data=str(data_path), n_images=len(images), steps=hist["steps"],
        resumed_from_step=hist["resumed_from"], final_loss=sum(tail) / max(1, len(tail)),
        loss_definition="loss_p = loss_c + loss_b" if cfg.loss == "p" else "loss_c",
        params_count=sum(p.numel() for p in ema.parameters()))
    write_json(record_path, record)
    return record


def repair_model(model_dir: str | Path, trigger: torch.Tensor | str | Path, out_dir: str | Path,
                 *, strategy: str = "diffcleanse", ratio: float = 0.02, loss: str = "p",
                 groupnorm: str = "exact", clean_images: torch.Tensor | None = None,
                 n_synthetic: int = 6000, sampler: str = "ddpm", sampler_steps: int | None = None,
                 importance: imp.ImportanceConfig | None = None,
                 finetune: ft.FinetuneConfig | None = None, seed: int = 0,
                 device: str = "cpu", progress: bool = True) -> dict[str, Any]:
    """Prune and fine-tune one flagged model; write the repaired model to ``out_dir``.

    ``trigger`` is the inverted trigger (a tensor or stage 1's ``trigger.safetensors``). Without
    ``clean_images``, ``n_synthetic`` clean images are sampled from the model itself. ``out_dir``
    gets the repaired model (pruned format) and ``repair.json``, a record of every step.
    """
    t0 = time.time()
    unet, sched_cfg = models.load_model(model_dir, device=device)
    scheduler = models.scheduler_from_config(sched_cfg)
    shape = _model_shape(unet)
    r = trigger if isinstance(trigger, torch.Tensor) else load_trigger(trigger, shape)
    if tuple(r.shape) != shape:
        raise ValueError(f"trigger has shape {tuple(r.shape)}, the model takes {shape}")
    importance = importance or imp.ImportanceConfig()
    finetune = dataclasses.replace(finetune or ft.FinetuneConfig(), loss=loss)
    times: dict[str, float] = {}
    tick = time.time()
    if clean_images is None:
        spec = sampling.SamplerSpec(name=sampler, steps=sampler_steps)
        clean_images = ft.synthesise(unet, sched_cfg, n_synthetic, spec=spec,
                                     seed=derive_seed(seed, "synthetic"), progress=progress)
        data_source = f"synthetic ({n_synthetic} samples, {spec.name})"
    else:
        data_source = f"given ({len(clean_images)} images)"
    times["clean_data"] = time.time() - tick
    tick = time.time()
    pick = torch.randperm(len(clean_images), generator=torch.Generator().manual_seed(seed))
    batch = clean_images[pick[:importance.batch_size]]
    vectors, info = imp.compute_importance(unet, scheduler, batch, r, importance,
                                           seed=derive_seed(seed, "noise"))
    times["importance"] = time.time() - tick
    tick = time.time()
    pruned = models.load_model(model_dir, device=device)[0]
    prune_rec = pruning.prune_unet(pruned, vectors, strategy, ratio, groupnorm)
    times["prune"] = time.time() - tick
    tick = time.time()
    ema, hist = ft.finetune(pruned, scheduler, clean_images.cpu(), finetune, reference=unet,
                            seed=derive_seed(seed, "finetune"), device=device, progress=progress)
    times["finetune"] = time.time() - tick
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        models.save_model(ema.cpu().eval(), scheduler, tmp)
        params = {"strategy": strategy, "ratio": ratio, "loss": loss, "groupnorm": groupnorm,
                  "importance": importance.describe(), "finetune": finetune.describe(),
                  "data": data_source}
        write_json(tmp / "repair.json", make_record(
            "repair", params, seed, time.time() - t0, model_dir=str(model_dir),
            stage_seconds={k: round(v, 3) for k, v in times.items()}, T=info["T"],
            prune={k: prune_rec[k] for k in ("out_channels", "parameters", "macs")},
            finetune_steps=hist["steps"]))
    return read_json(out_dir / "repair.json")


def summarise_removal(model_id: str, finetune_records: list[str | Path], out_path: str | Path, *,
                      verdict_path: str | Path | None = None,
                      run_on: str = "flagged") -> dict[str, Any]:
    """One model's removal outcome from the records beside each ``finetune.json``: the verdict it
    acted on, and per strategy/ratio/loss what was removed and the seconds of every stage."""
    verdict = read_json(verdict_path) if verdict_path else None
    runs, seconds = [], {}
    for path in map(Path, finetune_records):
        ftr = read_json(path)
        run_dir = path.parent.parent  # .../strategy~s/ratio~r/loss~l/finetune.json
        prr = read_json(run_dir / "prune.json")
        importance = run_dir.parent.parent / "importance.json"
        if importance.is_file():
            seconds["importance"] = read_json(importance)["seconds"]
        data = Path(ftr["data"]).with_suffix(".json")
        if data.is_file():
            seconds["clean_data"] = read_json(data)["seconds"]
        runs.append({
            "strategy": prr["strategy"], "ratio": prr["ratio"], "loss": ftr["params"]["loss"],
            "groupnorm": prr["groupnorm"], "model_dir": str(path.parent / "finetuned"),
            "out_channels_removed": prr["out_channels"]["fraction_removed"],
            "params_removed": prr["parameters"]["fraction_removed"],
            "macs_removed": prr["macs"]["fraction_removed"],
            "finetune_steps": ftr["steps"],
            "seconds": {"prune": prr["seconds"], "finetune": ftr["seconds"]},
        })
    summary = make_record("removal_summary", {"run_on": run_on}, None, 0.0, model=model_id,
                          flagged=None if verdict is None else bool(verdict["backdoored"]),
                          mscr=None if verdict is None else verdict.get("mscr"),
                          acted=bool(runs), runs=runs, seconds_per_model=seconds)
    write_json(out_path, summary)
    return summary
