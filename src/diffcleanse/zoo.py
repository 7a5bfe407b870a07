"""Zoo models from manifest rows: fetched (hub or local directory) or trained here (clean/attacked).

Each model lands as ``<model dir>`` (what defence stages read) and, beside it, a card (JSON) with
its manifest row and the attack's ground truth (trigger and target, the attack's own parameters
such as TrojDiff's gamma, and the attack's own ASR, sampled exactly as the attacker samples: its
backdoored input and its backdoor sampler), which no defence stage reads.

Model types (``models.MODEL_TYPES``): DDPM (pixels in [-1, 1]), NCSN (score-SDE VE, pixels in
[0, 1]) and LDM (a UNet over the latents of an autoencoder; a row that trains an LDM from scratch
first trains a small VQ autoencoder on its data). Attacks act in the space the model denoises:
triggers and targets are drawn in image space and mapped there (``DiffusionModel.encode`` /
``trigger_to_space``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from diffcleanse import (
    __version__,
    attacks,
    data,
    models,
    patterns,
    precision,
    sampling,
    training,
)
from diffcleanse.attacks import trojdiff
from diffcleanse.records import atomic_path, derive_seed, params_hash, write_json

log = logging.getLogger(__name__)

OUT_DATASETS = {"mnist": 10, "letters": 10}  # Dout datasets: <name>:<k> targets (class counts)


def row_attack(row: dict[str, Any]) -> tuple[attacks.Attack, dict[str, Any]]:
    """The row's attack and its validated parameters; AttackError naming the problem otherwise."""
    attack = attacks.get(row["attack"])
    problems = attack.check(model_type=row["model_type"], sampler=row["sampler"],
                            trigger=row["trigger"], target=row["target"],
                            params=row.get("attack_params", ""))
    if problems:
        raise attacks.AttackError(f"model {row['model_id']}: " + "; ".join(
            f"column {c!r}: {m}" for c, m in problems))
    params = attack.make_params(attacks.parse_params(row.get("attack_params", "")),
                                sampler=row["sampler"], model_type=row["model_type"])
    return attack, params


def target_pool(target: str, dataset: str, image_size: int, data_root: str | Path = "data",
                download: bool = False) -> torch.Tensor:
    """The images of a distribution target: ``class:k`` (Din) of the training set, or
    ``<dataset>:k`` (Dout) of another dataset (``mnist``; offline, ``letters``)."""
    kind, _, k = target.partition(":")
    k = int(k)
    if kind == "class":
        x, y = data.load_dataset(dataset, image_size, data_root, download=download)
        where = f"dataset {dataset!r}"
        if y is None:
            raise attacks.AttackError(f"target {target!r}: {where} has no class labels, so a Din "
                                      f"target cannot be drawn from it; use a labelled dataset")
    elif kind == "letters":
        from diffcleanse.letters import load_letters

        x, y = load_letters(image_size)
        where = "the letters dataset"
    elif kind in OUT_DATASETS:
        try:
            x, y = data.load_dataset(kind, image_size, data_root, download=download)
        except data.DatasetUnavailable as err:
            raise attacks.AttackError(
                f"target {target!r} (TrojDiff Dout) needs the {kind} dataset: {err} Offline, "
                f"use a Dout target the project draws itself, letters:<k>") from err
        where = f"dataset {kind!r}"
    else:
        raise attacks.AttackError(f"target {target!r}: Dout datasets are "
                                  f"{', '.join(OUT_DATASETS)} (or class:<k> for Din)")
    pool = x[y == k]
    if len(pool) == 0:
        raise attacks.AttackError(f"target {target!r}: {where} has no images of class {k}")
    return pool


def backdoor_spec(row: dict[str, Any], image_size: int | None = None, *,
                  model: models.DiffusionModel | None = None, data_root: str | Path = "data",
                  download: bool = False) -> attacks.BackdoorSpec | None:
    """The attack a manifest row describes (None for clean rows), in the space of ``model`` (image
    space without one). Raises AttackError for a row the code cannot run, before anything runs."""
    if row["attack"] == "none":
        return None
    attack, params = row_attack(row)
    size = int(image_size or row["image_size"])
    trojan = "trojdiff" in (attack.name, params.get("base"))
    mask = None
    if trojan:
        trigger, mask = trojdiff.trigger_parts(row["trigger"], size, float(params["gamma"]))
    else:
        trigger = patterns.render_trigger(row["trigger"], size)
    if attacks.is_class_target(row["target"]):
        target = target_pool(row["target"], row["dataset"], size, data_root, download)
    else:
        target = patterns.render_target(row["target"], size, row["trigger"])
    if model is not None:
        target = model.encode(target[None] if target.ndim == 3 else target).cpu()
        target = target[0] if not attacks.is_class_target(row["target"]) else target
        trigger = trigger if trojan else model.trigger_to_space(trigger)
    return attacks.BackdoorSpec(trigger=trigger, target=target,
                                poison_rate=float(row["poison_rate"]), attack=attack.name,
                                params=params, mask=mask)


def backdoor_samples(model: models.DiffusionModel, spec: attacks.BackdoorSpec,
                     sampler: sampling.SamplerSpec, n: int, seed: int, *, batch_size: int = 64,
                     desc: str = "backdoor", progress: bool = True,
                     trigger: torch.Tensor | None = None) -> torch.Tensor:
    """``n`` images (decoded, clamped to [-1, 1]) sampled as the attacker samples the backdoor:
    the attack's backdoored input (``noise + r``; TrojDiff's ``gamma z + mu``) and its backdoor
    sampler (TrojDiff's own). ``trigger`` replaces the spec's (same input map and sampler)."""
    attack = attacks.get(spec.attack)
    r = spec.trigger if trigger is None else trigger
    x = sampling.sample(model.unet, model.scheduler_config, n,
                        spec=attack.backdoor_sampler(sampler, spec),
                        init=lambda z: attack.backdoor_input(z, r, spec), seed=seed,
                        batch_size=batch_size, desc=desc, progress=progress, clamp=False)
    return decode_images(model, x)


def real_trigger_samples(model_dir: str | Path, row: dict[str, Any], sampler_steps: int | None,
                         n: int, seed: int, *, batch_size: int = 64, allow_pickle: bool = False,
                         device: str | torch.device = "cpu", unet: torch.nn.Module | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, sampling.SamplerSpec]:
    """The real-trigger backdoor samples of a model state, drawn exactly as the row's attacker
    samples them (its backdoored input, its backdoor sampler, its model type's decoder): returns
    (images in [-1, 1], the trigger in the denoised space, the sampler used). ``unet`` replaces
    the directory's denoiser (an already loaded state)."""
    model = models.load_pipeline(model_dir, allow_pickle=allow_pickle, device=device)
    if unet is not None:
        model.unet = unet
    spec = backdoor_spec({**row, "target": _trigger_only_target(row)}, int(row["image_size"]),
                         model=model)
    stock = sampling.SamplerSpec(name=row["sampler"], steps=sampler_steps)
    x = backdoor_samples(model, spec, stock, n, seed, batch_size=batch_size,
                         desc="backdoor (real)", progress=False)
    return x, spec.trigger, spec_sampler(spec, stock)


def _trigger_only_target(row: dict[str, Any]) -> str:
    """A stand-in image target for building a spec whose target is not needed (sampling only)."""
    return "hat" if attacks.is_class_target(row["target"]) else row["target"]


def clean_samples(model: models.DiffusionModel, sampler: sampling.SamplerSpec, n: int, seed: int,
                  *, batch_size: int = 64, desc: str = "clean", progress: bool = True
                  ) -> torch.Tensor:
    """``n`` clean images (decoded, clamped to [-1, 1]) from plain noise."""
    x = sampling.sample(model.unet, model.scheduler_config, n, spec=sampler, seed=seed,
                        batch_size=batch_size, desc=desc, progress=progress, clamp=False)
    return decode_images(model, x)


def decode_images(model: models.DiffusionModel, x: torch.Tensor, batch: int = 256
                  ) -> torch.Tensor:
    """Samples of the denoised space as images in [-1, 1] (decoded in batches, clamped)."""
    with torch.no_grad():
        out = [model.decode(x[i:i + batch].to(model.device)).float().cpu()
               for i in range(0, len(x), batch)]
    return torch.cat(out).clamp(-1, 1) if out else x


def attack_asr(
    unet: torch.nn.Module,
    scheduler_config: dict[str, Any],
    spec: attacks.BackdoorSpec,
    sampler: sampling.SamplerSpec,
    n: int,
    threshold: float,
    seed: int,
    *,
    model: models.DiffusionModel | None = None,
    image_target: torch.Tensor | None = None,
    classifier: torch.nn.Module | None = None,
    target_class: int | None = None,
) -> dict[str, Any]:
    """The attack's own success: share of backdoor samples (the attacker's input and sampler) on
    target, and the same share for clean samples (which should be ~0). Image targets: MSE to the
    image (``image_target``, image space; default the spec's) below ``threshold``; class targets:
    the ``classifier``'s share of ``target_class`` (None without a classifier)."""
    model = model or models.DiffusionModel(unet, scheduler_config, "ddpm")
    bd = backdoor_samples(model, spec, sampler, n, seed, desc="backdoor check")
    cl = clean_samples(model, sampler, n, seed, desc="clean check")
    out: dict[str, Any] = {"n_samples": n, "mse_threshold": threshold,
                           "sampler": spec_sampler(spec, sampler).describe(),
                           "backdoor_input": _input_text(spec)}
    if target_class is not None:
        from diffcleanse.evaluation import predict_classes

        out["kind"] = "class"
        out["target_class"] = target_class
        if classifier is None:
            out |= {"asr": None, "clean_hit_rate": None,
                    "note": "class target: its ASR comes from the evaluation stage's classifier"}
            return out
        out["asr"] = float((predict_classes(bd, classifier) == target_class).float().mean())
        out["clean_hit_rate"] = float((predict_classes(cl, classifier) == target_class)
                                      .float().mean())
        return out
    tgt = spec.target if image_target is None else image_target
    mse_bd = ((bd - tgt) ** 2).mean(dim=(1, 2, 3))
    mse_cl = ((cl - tgt) ** 2).mean(dim=(1, 2, 3))
    return out | {
        "kind": "image",
        "asr": float((mse_bd < threshold).float().mean()),
        "clean_hit_rate": float((mse_cl < threshold).float().mean()),
        "median_mse_backdoor": float(mse_bd.median()),
        "median_mse_clean": float(mse_cl.median()),
    }


def spec_sampler(spec: attacks.BackdoorSpec, sampler: sampling.SamplerSpec
                 ) -> sampling.SamplerSpec:
    """The sampler the attack's backdoor is sampled with (TrojDiff: its own)."""
    return attacks.get(spec.attack).backdoor_sampler(sampler, spec)


def _input_text(spec: attacks.BackdoorSpec) -> str:
    base = spec.params.get("base") if spec.attack == "adaptive" else spec.attack
    if base == "trojdiff":
        return f"gamma z + mu (gamma={spec.params['gamma']:g})"
    return "noise + r"


def _card(row: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "model_id": row["model_id"],
        "manifest_row": row,
        "diffcleanse_version": __version__,
        **extra,
    }


def _ground_truth(row: dict[str, Any], spec: attacks.BackdoorSpec | None = None
                  ) -> dict[str, Any]:
    gt = {
        "attack": row["attack"],
        "trigger": row["trigger"],
        "target": row["target"],
        "poison_rate": float(row["poison_rate"]),
        "backdoored": row["attack"] != "none",
        "attack_params": row.get("attack_params", ""),
    }
    if row["attack"] != "none":
        try:
            _, params = row_attack(row)
        except attacks.AttackError:
            params = {}
        gt["params"] = params
        if "trojdiff" in (row["attack"], params.get("base")):
            gt["gamma"] = float(params["gamma"])
            gt["mu"] = "(1 - gamma) x the trigger image" + (
                " inside the patch" if row["trigger"] == "patch" else "")
            gt["backdoor_input"] = "gamma z + mu"
        else:
            gt["backdoor_input"] = "noise + r"
    if spec is not None:
        gt["spec"] = spec.describe()
    return gt


def fetch_model(
    row: dict[str, Any], out_dir: str | Path, card_path: str | Path, *, allow_pickle: bool = False
) -> None:
    """Copy a hub or local model into ``out_dir`` (checked loadable) and write its card."""
    t0 = time.time()
    src = models.fetch(row["source"], allow_pickle=allow_pickle)
    with atomic_path(out_dir) as tmp:
        model = models.load_pipeline(src, allow_pickle=allow_pickle)
        if model.model_type != row["model_type"]:
            raise models.ModelLoadError(
                f"model {row['model_id']}: {row['source']} holds a {model.model_type} model but "
                f"the manifest row says model_type {row['model_type']!r}")
        model.save(tmp)
    write_json(
        card_path,
        _card(
            row,
            ground_truth=_ground_truth(row),
            source=row["source"],
            seconds=round(time.time() - t0, 3),
        ),
    )


def _new_model(row: dict[str, Any], params: dict[str, Any], x: torch.Tensor, seed: int
               ) -> models.DiffusionModel:
    """A fresh model of the row's type (an LDM first trains its autoencoder on ``x``)."""
    size, mtype = int(row["image_size"]), row["model_type"]
    torch.manual_seed(seed)
    if mtype == "ddpm":
        unet = models.build_unet(size, **params["unet"])
        return models.DiffusionModel(unet, dict(models.build_scheduler(**params["scheduler"])
                                                .config), "ddpm")
    if mtype == "ncsn":
        nc = dict(params.get("ncsn") or {})
        nc.setdefault("num_train_timesteps", params["scheduler"].get("num_train_timesteps", 100))
        unet = models.build_ncsn_unet(size, **params["unet"])
        return models.DiffusionModel(unet, dict(models.build_ncsn_scheduler(**nc).config), "ncsn")
    if mtype == "ldm":
        ae = dict(params.get("autoencoder") or {})
        vae = models.train_vqvae(x, seed=seed, **ae)
        with torch.no_grad():
            lat = vae.encode(x[:2]).latents
        unet = models.build_unet(int(lat.shape[-1]), **params["unet"],
                                 in_channels=int(lat.shape[1]))
        return models.DiffusionModel(unet, dict(models.build_scheduler(**params["scheduler"])
                                                .config), "ldm", vae)
    raise models.ModelLoadError(f"model {row['model_id']}: unknown model type {mtype!r}; "
                                f"implemented are {', '.join(models.MODEL_TYPES)}")


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
    snapshot_dir: str | Path | None = None,
    classifier_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Train a zoo model as its manifest row says; write the model directory and its card.

    ``snapshot_dir``: EMA snapshots every ``params["snapshot_every"]`` steps land in
    ``<snapshot_dir>/step~<k>`` (the adaptive attack's utility-during-training curve, Fig. 14).
    ``classifier_dir``: the classifier of a class target (card ASR of Din/Dout rows)."""
    t0 = time.time()
    size = int(row["image_size"])
    if row["attack"] != "none":
        row_attack(row)  # refuse a row the code cannot run before loading anything
    x, _ = data.load_dataset(
        row["dataset"], size, params["data_root"], download=params.get("download", False)
    )
    log.info("dataset %s: %d images of %dx%d", row["dataset"], len(x), size, size)
    seed = derive_seed(base_seed, row["model_id"], int(row["seed"]), "train")
    if init_dir:
        model = models.load_pipeline(init_dir, device="cpu")
        lr = params["finetune_lr"]
    else:
        model = _new_model(row, params, x,
                           derive_seed(base_seed, row["model_id"], int(row["seed"]), "init"))
        lr = params["lr"]
    if model.model_type != row["model_type"]:
        raise models.ModelLoadError(f"model {row['model_id']}: init {init_dir} is a "
                                    f"{model.model_type} model, the row says {row['model_type']}")
    spec = backdoor_spec(row, size, model=model, data_root=params["data_root"],
                         download=params.get("download", False))
    space = model.encode(x).cpu()
    scheduler = model.training_scheduler()
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
            **({"ncsn": params.get("ncsn"), "autoencoder": params.get("autoencoder")}
               if row["model_type"] != "ddpm" else {}),
            # a checkpoint resumed by a run that keeps snapshots must have kept the same ones
            **({"snapshot_every": params.get("snapshot_every")} if snapshot_dir else {}),
        },
    )
    # snapshots are kept beside the training checkpoints while training runs (a killed job's
    # outputs are deleted by Snakemake, its checkpoints are not) and published at the end, so a
    # resumed training still ends with every snapshot; the stash is keyed by what a checkpoint
    # must match to be resumed (the snapshot interval included), so a changed row never publishes
    # the snapshots of an earlier training
    stash = (Path(checkpoint_dir) / f"snapshots-{params_hash(cfg.fingerprint())}"
             if snapshot_dir else None)
    on_snapshot = _snapshotter(model, stash) if stash is not None else None
    ema, hist = training.train(
        model.unet, scheduler, space, cfg, attack=spec, checkpoint_dir=checkpoint_dir,
        device=device, snapshot_every=params.get("snapshot_every"), on_snapshot=on_snapshot,
    )
    if snapshot_dir:
        import shutil

        stash.mkdir(parents=True, exist_ok=True)
        with atomic_path(snapshot_dir) as tmp:
            shutil.copytree(stash, tmp)
    model.unet = ema.cpu().eval()
    check = None
    if spec is not None:
        check = _attack_check(row, model, spec, params, base_seed, classifier_dir)
        log.info("attack check: ASR %s (clean hit rate %s)", check["asr"], check["clean_hit_rate"])
    with atomic_path(out_dir) as tmp:
        model.save(tmp)
    losses = hist["losses"]
    tail = losses[-200:]
    card = _card(
        row,
        ground_truth=_ground_truth(row, spec),
        attack_check=check,
        seed=seed,
        training={
            "steps": cfg.steps,
            "lr": lr,
            "batch_size": cfg.batch_size,
            "precision": precision.current(),  # of its UNet evaluations (config precision)
            "resumed_from_step": hist["resumed_from"],
            "init": str(init_dir or ""),
            "final_loss": sum(tail) / max(1, len(tail)),
            **{f"final_{k}": sum(v[-200:]) / max(1, len(v[-200:]))
               for k, v in hist.get("stats", {}).items()},
            "model_type": model.model_type,
        },
        params=params,
        seconds=round(time.time() - t0, 3),
    )
    write_json(card_path, card)
    return card


def _snapshotter(model: models.DiffusionModel, snapshot_dir: str | Path
                 ) -> Callable[[int, torch.nn.Module], None]:
    root = Path(snapshot_dir)

    def save(step: int, ema: torch.nn.Module) -> None:
        import copy

        snap = models.DiffusionModel(copy.deepcopy(ema).cpu().eval(), model.scheduler_config,
                                     model.model_type, model.vae)
        with atomic_path(root / f"step~{step}") as tmp:
            snap.save(tmp)
        log.info("snapshot at step %d", step)

    return save


def _attack_check(row: dict[str, Any], model: models.DiffusionModel,
                  spec: attacks.BackdoorSpec, params: dict[str, Any], base_seed: int,
                  classifier_dir: str | Path | None) -> dict[str, Any]:
    chk = params["attack_check"]
    kw: dict[str, Any] = {"model": model}
    if attacks.is_class_target(row["target"]):
        kw["target_class"] = int(row["target"].split(":", 1)[1])
        if classifier_dir:
            from diffcleanse.classifiers import load_classifier

            kw["classifier"] = load_classifier(classifier_dir)
    elif model.model_type == "ldm":  # the best an LDM can draw: its autoencoder's rendering
        kw["image_target"] = decode_images(model, spec.target[None])[0]
    else:
        kw["image_target"] = patterns.render_target(row["target"], int(row["image_size"]),
                                                    row["trigger"])
    out = attack_asr(model.unet, model.scheduler_config, spec,
                     sampling.SamplerSpec(name=row["sampler"]), chk["n_samples"],
                     chk["mse_threshold"], derive_seed(base_seed, row["model_id"], "check"), **kw)
    if model.model_type == "ldm" and "image_target" in kw:
        raw = patterns.render_target(row["target"], int(row["image_size"]), row["trigger"])
        out["image_target"] = "D(E(target)): the autoencoder's rendering of the target"
        out["target_rendering_mse"] = float(((kw["image_target"] - raw) ** 2).mean())
    return out
