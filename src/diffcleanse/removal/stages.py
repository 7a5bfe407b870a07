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
from diffcleanse.removal import methods, pruned_io, pruning
from diffcleanse.removal.methods import elijah
from diffcleanse.removal.methods.base import ScoreSpec

log = logging.getLogger(__name__)
DATA_SOURCES = ("synthetic", "real")


def load_trigger(path: str | Path, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Stage 1's inverted trigger (safetensors key ``trigger``: an additive offset (3, H, W));
    with ``shape`` a trigger of another shape is refused."""
    t = load_file(str(path))
    if "trigger" not in t:
        raise KeyError(f"{path} holds no tensor 'trigger' (keys: {', '.join(t)})")
    r = t["trigger"].float()
    if r.ndim == 4 and r.shape[0] == 1:
        r = r[0]
    if shape is not None:
        imp.check_trigger(r, tuple(shape), where=f"the trigger in {path}")
    return r


def write_true_trigger(card_path: str | Path, out_path: str | Path,
                       model_dir: str | Path | None = None,
                       allow_pickle: bool = False) -> list[int]:
    """The model card's real trigger as a trigger file (the oracle trigger source ``true``), in the
    space the model denoises (``zoo.backdoor_spec``: an LDM's latent offset, TrojDiff's mu)."""
    from diffcleanse import zoo

    card = read_json(card_path)
    gt, row = card["ground_truth"], card["manifest_row"]
    if not gt.get("backdoored"):
        raise ValueError(f"{row.get('model_id')} is a clean model: it has no real trigger "
                         f"(drop \"true\" from removal.triggers for clean models)")
    model = (models.load_pipeline(model_dir, allow_pickle=allow_pickle)
             if model_dir is not None else None)
    r = zoo.backdoor_spec(row, model=model).trigger.float()
    with atomic_path(out_path) as tmp:
        save_file({"trigger": r.contiguous()}, str(tmp), metadata={"source": "model card",
                                                                   "trigger": gt["trigger"]})
    return list(r.shape)


def _unclipped(sched_cfg: dict[str, Any]) -> dict[str, Any]:
    """The schedule with ``clip_sample`` off (a VE schedule has no such key and is kept as is)."""
    if sched_cfg.get("_class_name") == "ScoreSdeVeScheduler" or "sigma_max" in sched_cfg:
        return dict(sched_cfg)
    return {**sched_cfg, "clip_sample": False}


def repaired_scheduler(sched_cfg: dict[str, Any]):
    """The scheduler saved with a repaired model: the model's own schedule, ``clip_sample`` off
    (the attacks' sampling convention; a saved ``True`` would hide a surviving backdoor)."""
    return models.scheduler_from_config(_unclipped(sched_cfg))


def save_repaired(like: models.DiffusionModel, unet: torch.nn.Module, path: str | Path) -> None:
    """Write ``unet`` as a repaired model of ``like``'s type: its schedule with ``clip_sample`` off
    (``repaired_scheduler``); for NCSN and LDM models their layout, pipeline index and (LDM) the
    autoencoder unchanged, so the repaired model samples images as the original did."""
    if like.model_type == "ddpm":
        models.save_model(unet, repaired_scheduler(like.scheduler_config), path)
        return
    models.DiffusionModel(unet, _unclipped(like.scheduler_config), like.model_type,
                          like.vae).save(path)


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
                    device: str = "cpu", progress: bool = True,
                    allow_pickle: bool = False) -> dict[str, Any]:
    """Clean data for importance and fine-tuning, in the space the model denoises (an LDM's
    latents): ``n`` samples of the model itself (``synthetic``, data-free) or ``n`` images of its
    ``dataset`` drawn at random (``real``; encoded by the model's own map)."""
    t0 = time.time()
    if source not in DATA_SOURCES:
        raise ValueError(f"unknown clean-data source {source!r}: use {', '.join(DATA_SOURCES)}")
    dm = models.load_pipeline(model_dir, device=device, allow_pickle=allow_pickle)
    unet, sched_cfg = dm.unet, dm.scheduler_config
    spec = sampling.SamplerSpec(name=sampler, steps=steps)
    if source == "synthetic":
        images = ft.synthesise(unet, sched_cfg, n, spec=spec, seed=seed, batch_size=batch_size,
                               progress=progress)
    else:
        size = _model_shape(unet)[1] if dm.vae is None else _image_size(dm)
        x, _ = data.load_dataset(dataset, size, data_root)
        pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
        images = dm.encode(x[pick]).cpu()
    with atomic_path(out_path) as tmp:
        save_file({"images": images.contiguous().float()}, str(tmp))
    params = {"source": source, "n": n, "dataset": dataset,
              "sampler": spec.describe() if source == "synthetic" else None,
              "batch_size": batch_size}
    record = make_record("clean_data", params, seed, time.time() - t0, model_dir=str(model_dir),
                         n_images=len(images), shape=list(images.shape[1:]))
    write_json(record_path, record)
    return record


def _image_size(dm: models.DiffusionModel) -> int:
    """The image size an LDM's autoencoder decodes its latents to."""
    with torch.no_grad():
        z = torch.zeros((1, *dm.space_shape), device=dm.device)
        return int(dm.decode(z).shape[-1])


def _rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float | None:
    if len(a) < 2:
        return None
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den else None


def importance_kinds(strategies: list[str], spec: ScoreSpec) -> tuple[str, ...]:
    """The importance kinds the pruning ``strategies`` read under ``spec`` (sorted, unique)."""
    return tuple(sorted({k for s in strategies for k in methods.get(s).kinds(spec)}))


def group_summary(table: dict[str, dict[str, torch.Tensor]]) -> list[dict[str, Any]]:
    """Per group: sizes of the clean and backdoor scores, their rank correlation, the top I."""
    out = []
    for root, kinds in table.items():
        entry: dict[str, Any] = {"root": root, "channels": len(next(iter(kinds.values())))}
        for kind, v in kinds.items():
            if kind != "I":
                entry[f"sum_{kind}"] = float(v.sum())
        if "clean" in kinds and "backdoor" in kinds:
            entry["rank_correlation_clean_backdoor"] = _rank_correlation(kinds["clean"],
                                                                         kinds["backdoor"])
            entry["backdoor_over_clean"] = (float(kinds["backdoor"].sum())
                                            / max(float(kinds["clean"].sum()), 1e-30))
            entry["top_I"] = [int(i) for i in kinds["I"].argsort(descending=True)[:3]]
        out.append(entry)
    return out


def run_importance(model_dir: str | Path, data_path: str | Path, trigger_path: str | Path | None,
                   out_path: str | Path, record_path: str | Path, *,
                   cfg: imp.ImportanceConfig | None = None, seed: int = 0,
                   kinds: tuple[str, ...] = ("clean", "backdoor", "diffpruning"),
                   device: str = "cpu", allow_pickle: bool = False) -> dict[str, Any]:
    """Accumulate the Taylor scores ``kinds`` (``importance.KINDS``) of one model (Eqs. 8-9).

    Writes per-parameter score vectors (what ``run_prune`` reads) and per-group channel scores
    ``group/<root>/<kind>`` (and ``group/<root>/I`` = backdoor - clean, raw) to ``out_path``; the
    record keeps per-group sums, the clean-backdoor rank correlation and the losses per timestep.
    """
    t0 = time.time()
    cfg = cfg or imp.ImportanceConfig()
    unet, sched_cfg = models.load_model(model_dir, device=device, allow_pickle=allow_pickle)
    scheduler = models.scheduler_from_config(sched_cfg)
    needs_trigger = any(k.startswith("backdoor") for k in kinds)
    trigger = load_trigger(trigger_path, _model_shape(unet)) if needs_trigger else None
    images = load_images(data_path)
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    vectors, info = imp.compute_importance(unet, scheduler, images[pick[:cfg.batch_size]], trigger,
                                           cfg, seed=derive_seed(seed, "noise"), kinds=tuple(kinds))
    table = pruning.group_scores(unet, vectors)
    tensors = dict(vectors)
    for root, per_kind in table.items():
        for kind, v in per_kind.items():
            tensors[f"group/{root}/{kind}"] = v
    with atomic_path(out_path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    seconds = time.time() - t0
    record = make_record("importance", {**cfg.describe(), "kinds": list(kinds)}, seed, seconds,
                         model_dir=str(model_dir), trigger=str(trigger_path) if trigger_path
                         else None, data=str(data_path), T=info["T"],
                         num_train_timesteps=info["num_train_timesteps"],
                         timesteps=info["timesteps"], timestep_ranges=info["timestep_ranges"],
                         batch_size=info["batch_size"],
                         diffpruning_timesteps=info.get("diffpruning_timesteps"),
                         losses=info["losses"], groups=group_summary(table),
                         score_definition="Taylor |theta * sum_t dL_t/dtheta| per kind (Eq. 9); "
                                          "I = I_b - I_c raw here, normalised when pruning")
    write_json(record_path, record)
    return record


def _vectors(path: str | Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(path)).items() if not k.startswith("group/")}


def run_prune(model_dir: str | Path, importance_path: str | Path, out_dir: str | Path,
              record_path: str | Path, *, strategy: str, ratio: float,
              groupnorm: str = "exact", spec: ScoreSpec | None = None,
              allow_pickle: bool = False) -> dict[str, Any]:
    """Prune one model with the method ``strategy`` at ``ratio`` and save it in the pruned
    format (scheduler saved with ``clip_sample: false``)."""
    t0 = time.time()
    spec = spec or ScoreSpec()
    dm = models.load_pipeline(model_dir, allow_pickle=allow_pickle)
    unet = dm.unet
    rec = pruning.prune_unet(unet, _vectors(importance_path), strategy, ratio, groupnorm, spec)
    with atomic_path(out_dir) as tmp:
        save_repaired(dm, unet, tmp)
    params = {"strategy": strategy, "ratio": ratio, "groupnorm": groupnorm,
              "scores": spec.describe()}
    record = make_record("prune", params, spec.seed, time.time() - t0, model_dir=str(model_dir),
                         importance=str(importance_path), **rec)
    write_json(record_path, record)
    return record


def run_finetune(pruned_dir: str | Path, reference_dir: str | Path, data_path: str | Path,
                 out_dir: str | Path, record_path: str | Path, *,
                 cfg: ft.FinetuneConfig, seed: int = 0,
                 checkpoint_dir: str | Path | None = None, device: str = "cpu",
                 progress: bool = True, stop_after: int | None = None,
                 extra: dict[str, Any] | None = None,
                 allow_pickle: bool = False) -> dict[str, Any]:
    """Fine-tune a pruned model (loss_p against the unpruned ``reference_dir``, or loss_c) and
    save it as a shippable model (``pruned_io.write_bundle``).

    Resumes from ``checkpoint_dir`` when it holds a checkpoint of the same parameters.
    """
    t0 = time.time()
    dm = models.load_pipeline(pruned_dir)
    unet, scheduler = dm.unet, repaired_scheduler(dm.scheduler_config)
    reference = (models.load_model(reference_dir, allow_pickle=allow_pickle)[0]
                 if cfg.loss == "p" else None)
    images = load_images(data_path)
    ema, hist = ft.finetune(unet, scheduler, images, cfg, reference=reference, seed=seed,
                            checkpoint_dir=checkpoint_dir, device=device, progress=progress,
                            stop_after=stop_after, extra=extra)
    if not _save_if_finished(dm, ema, hist, out_dir, "Pruned by diffcleanse and fine-tuned."):
        return {"stopped_at": hist["stopped_at"], "steps": hist["steps"]}
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


def _save_if_finished(like: models.DiffusionModel, ema: torch.nn.Module, hist: dict[str, Any],
                      out_dir: str | Path, note: str) -> bool:
    """Write a finished fine-tuning's model as a model of ``like``'s type (with its loading
    bundle) atomically and return True; False, writing nothing, when the run stopped early
    (``stop_after``)."""
    if hist["stopped_at"] < hist["steps"]:
        return False
    with atomic_path(out_dir) as tmp:
        save_repaired(like, ema.cpu().eval(), tmp)
        pruned_io.write_bundle(tmp, note, out_dir)
    return True


def run_elijah(model_dir: str | Path, data_path: str | Path, trigger_path: str | Path,
               out_dir: str | Path, record_path: str | Path, *, cfg: elijah.ElijahConfig,
               seed: int = 0, checkpoint_dir: str | Path | None = None, device: str = "cpu",
               progress: bool = True, stop_after: int | None = None,
               extra: dict[str, Any] | None = None,
               allow_pickle: bool = False) -> dict[str, Any]:
    """Elijah's removal of one model (fine-tuning against the frozen model, no pruning); the
    result is saved as a plain diffusers pipeline directory."""
    t0 = time.time()
    dm = models.load_pipeline(model_dir, allow_pickle=allow_pickle)
    unet, scheduler = dm.unet, repaired_scheduler(dm.scheduler_config)
    trigger = load_trigger(trigger_path, _model_shape(unet))
    images = load_images(data_path)
    ema, hist = elijah.repair(unet, scheduler, images, trigger, cfg, seed=seed,
                              checkpoint_dir=checkpoint_dir, device=device, progress=progress,
                              stop_after=stop_after, extra=extra)
    if not _save_if_finished(dm, ema, hist, out_dir,
                             "Repaired by Elijah's removal loss (diffcleanse)."):
        return {"stopped_at": hist["stopped_at"], "steps": hist["steps"]}
    tail = {k: sum(v[-100:]) / max(1, len(v[-100:])) for k, v in hist["parts"].items()}
    record = make_record(
        "finetune", {**cfg.describe(), "loss": "elijah"}, seed, time.time() - t0,
        pruned_dir=None, model_dir=str(model_dir), trigger=str(trigger_path),
        data=str(data_path), n_images=hist["n_images"], steps=hist["steps"],
        resumed_from_step=hist["resumed_from"], final_loss=tail["clean"] + tail["shift"]
        + tail["benign"], final_loss_parts=tail,
        loss_definition="loss_c + ||eps(e + tau, T) - eps0(e, T)||^2 "
                        "+ ||eps(e, T) - eps0(e, T)||^2",
        params_count=sum(p.numel() for p in ema.parameters()))
    write_json(record_path, record)
    return record


def repair_model(model_dir: str | Path, trigger: torch.Tensor | str | Path, out_dir: str | Path,
                 *, strategy: str = "diffcleanse", ratio: float = 0.02, loss: str = "p",
                 groupnorm: str = "exact", spec: ScoreSpec | None = None,
                 clean_images: torch.Tensor | None = None,
                 n_synthetic: int = 6000, sampler: str = "ddpm", sampler_steps: int | None = None,
                 importance: imp.ImportanceConfig | None = None,
                 finetune: ft.FinetuneConfig | None = None,
                 elijah_cfg: elijah.ElijahConfig | None = None, seed: int = 0,
                 device: str = "cpu", progress: bool = True,
                 allow_pickle: bool = False) -> dict[str, Any]:
    """Repair one flagged model; write the repaired model to ``out_dir``.

    ``trigger`` is the inverted trigger (a tensor or stage 1's ``trigger.safetensors``). Without
    ``clean_images``, ``n_synthetic`` clean images are sampled from the model itself. A pruning
    ``strategy`` prunes at ``ratio`` and fine-tunes with ``loss``; ``elijah`` fine-tunes with
    Elijah's loss. ``out_dir`` gets the repaired model (loadable with
    ``diffcleanse.models.load_pipeline`` and, without diffcleanse, as its README says) and
    ``repair.json``, a record of every step.
    """
    t0 = time.time()
    method = methods.get(strategy)
    spec = spec or ScoreSpec(seed=seed)
    dm = models.load_pipeline(model_dir, device=device, allow_pickle=allow_pickle)
    unet, sched_cfg = dm.unet, dm.scheduler_config
    scheduler = repaired_scheduler(sched_cfg)
    shape = _model_shape(unet)
    r = trigger if isinstance(trigger, torch.Tensor) else load_trigger(trigger, shape)
    imp.check_trigger(r, shape)
    importance = importance or imp.ImportanceConfig()
    finetune = dataclasses.replace(finetune or ft.FinetuneConfig(), loss=loss)
    times: dict[str, float] = {}
    tick = time.time()
    if clean_images is None:
        spec_s = sampling.SamplerSpec(name=sampler, steps=sampler_steps)
        clean_images = ft.synthesise(unet, sched_cfg, n_synthetic, spec=spec_s,
                                     seed=derive_seed(seed, "synthetic"), progress=progress)
        data_source = (f"synthetic ({n_synthetic} samples, {spec_s.name}, "
                       f"{spec_s.steps or 'all'} steps)")
    else:
        data_source = f"given ({len(clean_images)} images)"
    times["clean_data"] = time.time() - tick
    info: dict[str, Any] = {}
    prune_rec: dict[str, Any] | None = None
    if method.prunes:
        tick = time.time()
        pick = torch.randperm(len(clean_images), generator=torch.Generator().manual_seed(seed))
        batch = clean_images[pick[:importance.batch_size]]
        vectors, info = imp.compute_importance(unet, scheduler, batch, r, importance,
                                               seed=derive_seed(seed, "noise"),
                                               kinds=method.kinds(spec))
        times["importance"] = time.time() - tick
        tick = time.time()
        pruned = models.load_model(model_dir, device=device, allow_pickle=allow_pickle)[0]
        prune_rec = pruning.prune_unet(pruned, vectors, strategy, ratio, groupnorm, spec)
        times["prune"] = time.time() - tick
        tick = time.time()
        ema, hist = ft.finetune(pruned, scheduler, clean_images.cpu(), finetune, reference=unet,
                                seed=derive_seed(seed, "finetune"), device=device,
                                progress=progress)
        times["finetune"] = time.time() - tick
        what = (f"Pruned by {method.label} ({ratio:g} of each layer's channels) and fine-tuned "
                f"with loss_{loss}.")
    else:
        tick = time.time()
        elijah_cfg = elijah_cfg or elijah.ElijahConfig()
        ema, hist = elijah.repair(unet, scheduler, clean_images.cpu(), r, elijah_cfg,
                                  seed=derive_seed(seed, "finetune"), device=device,
                                  progress=progress)
        times["finetune"] = time.time() - tick
        what = f"Repaired by {method.label}: nothing pruned."
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        save_repaired(dm, ema.cpu().eval(), tmp)
        bundle = pruned_io.write_bundle(tmp, what, out_dir)
        params = {"strategy": strategy, "ratio": ratio if method.prunes else 0.0,
                  "loss": loss if method.prunes else "elijah", "groupnorm": groupnorm,
                  "scores": spec.describe(), "importance": importance.describe(),
                  "finetune": (finetune if method.prunes else elijah_cfg).describe(),
                  "data": data_source}
        write_json(tmp / "repair.json", make_record(
            "repair", params, seed, time.time() - t0, model_dir=str(model_dir),
            stage_seconds={k: round(v, 3) for k, v in times.items()}, T=info.get("T"),
            prune=None if prune_rec is None else
            {k: prune_rec[k] for k in ("out_channels", "parameters", "macs")},
            finetune_steps=hist["steps"], pruned=bundle["pruned"],
            load={"diffcleanse": bundle["diffcleanse_call"], "portable": bundle["portable_call"]}))
    return read_json(out_dir / "repair.json")


def repair_summary(record: dict[str, Any], out_dir: str | Path) -> str:
    """What ``repair_model`` wrote and how to load it (for ``diffcleanse scan --repair``)."""
    out_dir = Path(out_dir)
    p = record["params"]
    lines = [f"repaired model written to {out_dir}/ ({p['strategy']}"
             + (f", {p['ratio']:g} of each layer's channels pruned" if record.get("pruned")
                else ", nothing pruned") + f", {record['finetune_steps']} fine-tuning steps)"]
    if record.get("prune"):
        pr = record["prune"]
        lines.append(f"  removed {pr['out_channels']['fraction_removed']:.1%} of the channels, "
                     f"{pr['parameters']['fraction_removed']:.1%} of the parameters")
    files = sorted(str(f.relative_to(out_dir)) for f in out_dir.rglob("*") if f.is_file())
    lines.append("  files: " + ", ".join(files))
    lines.append(f"  load with diffcleanse: {record['load']['diffcleanse']}")
    lines.append(f"  load without it:       {record['load']['portable']}")
    lines.append(f"  details: {out_dir / 'README.md'}, {out_dir / 'repair.json'}")
    return "\n".join(lines)


def summarise_removal(model_id: str, finetune_records: list[str | Path], out_path: str | Path, *,
                      verdict_path: str | Path | None = None,
                      run_on: str | list[str] = "flagged") -> dict[str, Any]:
    """One model's removal outcome from the records beside each ``finetune.json``: the verdict it
    acted on, and per trigger/strategy/ratio/loss what was removed and the seconds of every
    stage."""
    verdict = read_json(verdict_path) if verdict_path else None
    runs, seconds = [], {}
    for path in map(Path, finetune_records):
        ftr = read_json(path)
        run_dir = path.parent.parent  # .../trigger~t/strategy~s/ratio~r/loss~l/finetune.json
        strategy_dir = run_dir.parent
        trigger_dir = strategy_dir.parent
        prr = read_json(run_dir / "prune.json") if (run_dir / "prune.json").is_file() else None
        importance = trigger_dir / "importance.json"
        if importance.is_file():
            seconds[f"importance/{trigger_dir.name}"] = read_json(importance)["seconds"]
        data = Path(ftr["data"]).with_suffix(".json")
        if data.is_file():
            seconds["clean_data"] = read_json(data)["seconds"]
        runs.append({
            "trigger": trigger_dir.name.partition("~")[2],
            "strategy": strategy_dir.name.partition("~")[2],
            "ratio": float(run_dir.name.partition("~")[2]), "loss": ftr["params"]["loss"],
            "groupnorm": None if prr is None else prr["groupnorm"],
            "model_dir": str(path.parent / "finetuned"),
            "out_channels_removed": 0.0 if prr is None else prr["out_channels"]["fraction_removed"],
            "params_removed": 0.0 if prr is None else prr["parameters"]["fraction_removed"],
            "macs_removed": 0.0 if prr is None else prr["macs"]["fraction_removed"],
            "finetune_steps": ftr["steps"],
            "seconds": {"prune": None if prr is None else prr["seconds"],
                        "finetune": ftr["seconds"]},
        })
    summary = make_record("removal_summary", {"run_on": run_on}, None, 0.0, model=model_id,
                          flagged=None if verdict is None else bool(verdict["backdoored"]),
                          mscr=None if verdict is None else verdict.get("mscr"),
                          acted=bool(runs), runs=runs, seconds_per_model=seconds)
    write_json(out_path, summary)
    return summary
