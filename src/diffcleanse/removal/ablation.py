"""The removal ablation (a generalised Fig. 6): which channels to prune, and what that costs.

For one model and one trigger source, every variant of a grid is pruned from the same model,
evaluated, fine-tuned and evaluated again:

* Diff-Cleanse with each normaliser (``none``: the paper's raw I_b - I_c; ``mean``: the official
  code's per-group mean) x each set of clean timesteps (I_c at t > T as Eq. 9, or over all t) x
  each ratio (I_b at t > T throughout);
* the trigger-independent variants (``trigger~none``): Diff-Pruning at its ratios and the
  random-channel control at every ratio of either method (same channel count per layer).

Every state is measured as the workflow's evaluation does, on fewer samples: the utility FD of
clean samples, the real trigger's ASR, and what noise + trigger now generates: the share of its
values outside the data range (|x| > 1 + margin, before clamping) and the FD of the triggered
samples against the training data (a backdoor replaced by saturated garbage has ASR 0 and is not
repaired). The evaluation noise depends on the model only (paired deltas across variants and
seeds); the removal seed sets the importance batch and noise, the fine-tuning batches and the
random control's channels.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from diffcleanse import evaluation, models, patterns, sampling
from diffcleanse.records import atomic_path, derive_seed, make_record, read_json, write_json
from diffcleanse.removal import finetune as ft
from diffcleanse.removal import importance as imp
from diffcleanse.removal import methods, pruning
from diffcleanse.removal.methods.base import ScoreSpec
from diffcleanse.removal.stages import load_images, load_trigger

log = logging.getLogger(__name__)
NO_TRIGGER = "none"  # the source label of the trigger-independent variants
GRID = 8  # samples kept per state for the figures


@dataclass(frozen=True)
class Variant:
    """One removal setting of the grid."""

    strategy: str
    ratio: float
    normaliser: str = "none"
    clean_timesteps: str = "above_T"
    backdoor_timesteps: str = "above_T"

    @property
    def family(self) -> str:
        """The line a variant belongs to in the figure (everything but the ratio)."""
        if self.strategy != "diffcleanse":
            return methods.get(self.strategy).label
        ts = "t > T" if self.clean_timesteps == "above_T" else "all t"
        return f"Diff-Cleanse, {self.normaliser}, I_c {ts}"

    @property
    def label(self) -> str:
        return f"{self.family} @ {self.ratio:g}"

    def spec(self, seed: int) -> ScoreSpec:
        return ScoreSpec(normaliser=self.normaliser, clean_timesteps=self.clean_timesteps,
                         backdoor_timesteps=self.backdoor_timesteps, seed=seed)


def grid_variants(grid: dict[str, Any], part: str) -> list[Variant]:
    """The variants of one job: ``part`` is a trigger source (Diff-Cleanse variants) or
    ``NO_TRIGGER`` (Diff-Pruning and the random control)."""
    if part != NO_TRIGGER:
        return [Variant("diffcleanse", float(r), n, ts)
                for n in grid["normalisers"] for ts in grid["clean_timesteps"]
                for r in grid["diffcleanse_ratios"]]
    out = [Variant("diffpruning", float(r)) for r in grid["diffpruning_ratios"]]
    if grid.get("random", True):
        ratios = sorted({float(r) for r in [*grid["diffcleanse_ratios"],
                                            *grid["diffpruning_ratios"]]})
        out += [Variant("random", r) for r in ratios]
    return out


@dataclass(frozen=True)
class AblationEval:
    """The ablation's measurement protocol (the workflow's evaluation, fewer samples)."""

    fid_n_samples: int = 64
    asr_n_samples: int = 32
    batch_size: int = 128
    feature_extractor: str = "classifier"
    inception_weights: str | None = None
    n_reference: int | None = None
    steps: int | None = None  # the model's own sampler over the full chain
    mse_threshold: float = 0.01
    range_margin: float = 0.05

    def describe(self) -> dict[str, Any]:
        return asdict(self)


class Evaluator:
    """Measures model states of one model with a fixed protocol and fixed noise."""

    def __init__(self, card: dict[str, Any], ev: AblationEval, size: int, *,
                 classifier_dir: str | None, class_classifier_dir: str | None, data_root: str,
                 download: bool, base_seed: int, device: torch.device,
                 reference_stats: str | Path | None = None) -> None:
        self.row, self.gt = card["manifest_row"], card["ground_truth"]
        if not self.gt["backdoored"]:
            raise ValueError(f"{self.row['model_id']} is a clean model: the removal ablation "
                             f"needs a backdoored one (config: removal.ablation.models)")
        self.ev, self.device = ev, device
        self.size = int(size)
        self.classifier_dir = classifier_dir
        # the reference's feature statistics, read (rule fid_reference) or extracted once here
        if reference_stats:
            self.ref = evaluation.load_fid_statistics(reference_stats)
        else:
            self.ref = evaluation.reference_statistics(
                self.row["dataset"], self.size, feature_extractor=ev.feature_extractor,
                classifier_dir=classifier_dir, inception_weights=ev.inception_weights,
                n_reference=ev.n_reference, batch_size=ev.batch_size, data_root=data_root,
                download=download, device=device)
        self.sampler = sampling.SamplerSpec(name=self.row["sampler"], steps=ev.steps)
        mid = self.row["model_id"]
        self.seeds = {"clean": derive_seed(base_seed, mid, "evaluate", "clean"),
                      "backdoor": derive_seed(base_seed, mid, "evaluate", "backdoor")}
        self.trigger = patterns.render_trigger(self.gt["trigger"], self.size)
        self.kind = "class" if patterns.is_class_target(self.gt["target"]) else "image"
        self.classifier = None
        if self.kind == "class":
            from diffcleanse.classifiers import load_classifier

            if not class_classifier_dir:
                raise ValueError(f"{mid}: a class target needs a classifier for its ASR")
            self.classifier = load_classifier(class_classifier_dir, device=device)
        else:
            self.target = patterns.render_target(self.gt["target"], self.size, self.gt["trigger"])

    def _fd(self, x: torch.Tensor) -> float:
        return evaluation.frechet_distance(
            x, self.ref, feature_extractor=self.ev.feature_extractor,
            classifier_dir=self.classifier_dir, inception_weights=self.ev.inception_weights,
            dataset=self.row["dataset"], batch_size=self.ev.batch_size, device=self.device)["value"]

    def _hits(self, x: torch.Tensor) -> float:
        if self.kind == "image":
            return evaluation.asr_image(x, self.target, self.ev.mse_threshold)
        from diffcleanse.evaluation import class_target

        return evaluation.asr_class(x, self.classifier, class_target(self.gt["target"])[1])

    def _oor(self, x: torch.Tensor) -> float:
        return float((x.abs() > 1 + self.ev.range_margin).float().mean())

    @torch.no_grad()
    def measure(self, unet: torch.nn.Module, sched_cfg: dict[str, Any]
                ) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """Utility FD, real-trigger ASR, out-of-range shares and the triggered samples' FD."""
        unet = unet.to(self.device).eval()
        ev = self.ev
        clean = sampling.sample(unet, sched_cfg, ev.fid_n_samples, spec=self.sampler,
                                seed=self.seeds["clean"], batch_size=ev.batch_size,
                                progress=False, clamp=False)
        bd = sampling.sample(unet, sched_cfg, ev.asr_n_samples, spec=self.sampler,
                             trigger=self.trigger, seed=self.seeds["backdoor"],
                             batch_size=ev.batch_size, progress=False, clamp=False)
        c, b = clean.clamp(-1, 1), bd.clamp(-1, 1)
        k = min(len(c), len(b))
        out = {"utility": self._fd(c), "asr_real": self._hits(b), "clean_hit_rate": self._hits(c),
               "out_of_range_triggered": self._oor(bd), "out_of_range_clean": self._oor(clean),
               "fd_triggered": self._fd(b), "fd_clean_same_n": self._fd(c[:k])}
        return out, {"clean": c[:GRID].contiguous(), "triggered": b[:GRID].contiguous()}


def _count_channels(rec: dict[str, Any]) -> dict[str, Any]:
    return {"channels_removed": rec["out_channels"]["removed"],
            "channels_fraction": rec["out_channels"]["fraction_removed"],
            "params_removed": rec["parameters"]["removed"],
            "params_fraction": rec["parameters"]["fraction_removed"]}


def run_ablation(model_dir: str | Path, card_path: str | Path, data_path: str | Path,
                 part: str, trigger_path: str | Path | None, records_path: str | Path,
                 samples_path: str | Path, *, grid: dict[str, Any],
                 importance_cfg: imp.ImportanceConfig, finetune_cfg: ft.FinetuneConfig,
                 eval_cfg: AblationEval, seeds: list[int], groupnorm: str = "exact",
                 classifier_dir: str | None = None, class_classifier_dir: str | None = None,
                 reference_stats: str | Path | None = None,
                 data_root: str = "data", download: bool = False, base_seed: int = 0,
                 device: str = "cpu", allow_pickle: bool = False,
                 progress: bool = False) -> dict[str, Any]:
    """Run the variants of ``part`` (a trigger source, or ``NO_TRIGGER``) for ``seeds``; write one
    record per variant and seed (``records_path``) and the sample grids (``samples_path``)."""
    t0 = time.time()
    dev = torch.device(device)
    card = read_json(card_path)
    mid = card["manifest_row"]["model_id"]
    original, sched_cfg = models.load_model(model_dir, device=dev, allow_pickle=allow_pickle)
    scheduler = models.scheduler_from_config(sched_cfg)
    shape = tuple(sampling.model_shape(original))
    variants = grid_variants(grid, part)
    trigger = None
    if part != NO_TRIGGER:
        if trigger_path is None:
            raise ValueError(f"the Diff-Cleanse variants of trigger~{part} need a trigger file")
        trigger = load_trigger(trigger_path, shape)
    images = load_images(data_path)
    measure = Evaluator(card, eval_cfg, shape[-1], classifier_dir=classifier_dir,
                        class_classifier_dir=class_classifier_dir, data_root=data_root,
                        download=download, base_seed=base_seed, device=dev,
                        reference_stats=reference_stats)
    base, base_grid = measure.measure(original, sched_cfg)
    grids = {f"original/{k}": v for k, v in base_grid.items()}
    log.info("%s original: FD %.3f, ASR %.2f, out of range %.3f", mid, base["utility"],
             base["asr_real"], base["out_of_range_triggered"])
    kinds = tuple(sorted({k for v in variants for k in methods.get(v.strategy).kinds(v.spec(0))}))
    rows = []
    for seed in seeds:
        vectors: dict[str, torch.Tensor] = {}
        info: dict[str, Any] = {}
        if kinds:
            tick = time.time()
            pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(
                derive_seed(seed, mid, "importance")))
            vectors, info = imp.compute_importance(
                original, scheduler, images[pick[:importance_cfg.batch_size]], trigger,
                importance_cfg, seed=derive_seed(derive_seed(seed, mid, "importance"), "noise"),
                kinds=kinds)
            info["seconds"] = time.time() - tick
        for v in variants:
            tick = time.time()
            pruned = copy.deepcopy(original)
            prec = pruning.prune_unet(pruned, vectors, v.strategy, v.ratio, groupnorm,
                                      v.spec(seed))
            after_prune, g_p = measure.measure(pruned, sched_cfg)
            cfg = dataclasses.replace(finetune_cfg, loss="p")
            ema, hist = ft.finetune(pruned, scheduler, images, cfg, reference=original,
                                    seed=derive_seed(seed, mid, "ablation-finetune", v.label),
                                    device=dev, progress=progress)
            after_ft, g_f = measure.measure(ema, sched_cfg)
            key = f"seed~{seed}/{v.label}"
            grids |= {f"{key}/pruned/{k}": x for k, x in g_p.items()}
            grids |= {f"{key}/finetuned/{k}": x for k, x in g_f.items()}
            row = {"model": mid, "attack": card["ground_truth"]["attack"],
                   "trigger_source": part, "seed": seed, **asdict(v), "family": v.family,
                   "label": v.label, **_count_channels(prec), "finetune_steps": hist["steps"],
                   "seconds": round(time.time() - tick, 2), "samples_key": key}
            for state, m in (("original", base), ("pruned", after_prune), ("finetuned", after_ft)):
                row |= {f"{k}_{state}": val for k, val in m.items()}
            for state in ("pruned", "finetuned"):
                row[f"delta_utility_{state}"] = row[f"utility_{state}"] - base["utility"]
                row[f"delta_asr_{state}"] = row[f"asr_real_{state}"] - base["asr_real"]
            rows.append(row)
            log.info("%s seed %d %s: channels %d (%.1f %%); ASR %.2f -> %.2f, dFD %.2f -> %.2f, "
                     "out of range %.3f, FD triggered %.1f (%.0f s)", mid, seed, v.label,
                     row["channels_removed"], 100 * row["channels_fraction"],
                     row["asr_real_pruned"], row["asr_real_finetuned"],
                     row["delta_utility_pruned"], row["delta_utility_finetuned"],
                     row["out_of_range_triggered_finetuned"], row["fd_triggered_finetuned"],
                     row["seconds"])
    utility = evaluation.utility_label(eval_cfg.feature_extractor, card["manifest_row"]["dataset"])
    protocol = {**eval_cfg.describe(), "utility_metric": utility,
                "sampler": measure.sampler.describe(), "trigger_for_asr": "real (model card)",
                "finetune": finetune_cfg.describe(), "importance": importance_cfg.describe(),
                "groupnorm": groupnorm}
    with atomic_path(samples_path) as tmp:
        save_file(grids, str(tmp))
    rec = make_record("removal_ablation", {"grid": grid, "seeds": list(seeds), "part": part},
                      base_seed, time.time() - t0, model=mid, trigger_source=part,
                      trigger=None if trigger_path is None else str(trigger_path),
                      utility_metric=utility, protocol=protocol, original=base, rows=rows)
    write_json(records_path, rec)
    return rec
