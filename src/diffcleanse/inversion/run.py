"""Running any inversion method on one model: the common verdict, records and output files.

``run_method`` builds the method's ``Context`` (the verdict batch of clean noise and its per-sample
seeds, derived from the config seed, the model id and the seed index, so every method of one seed
sees the same noise), runs the method, then draws the verdict samples from ``noise + trigger`` with
the model's own sampler (unless the method already did, as BBTI), computes MSCR (every reading) and
the method's own statistics, and times the whole (UNet evaluations counted by a hook).
``invert_model`` is the workflow rule's call: load, check, run, write every output atomically.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffcleanse import detection, samplers
from diffcleanse.encoders import Encoder
from diffcleanse.inversion.base import Context, InversionError, Progress, UNetCounter
from diffcleanse.models import DiffusionModel
from diffcleanse.records import derive_seed

log = logging.getLogger(__name__)

# the settings of inversion: that are not one method's own
COMMON_KEYS = ("methods", "seeds", "batch_size", "steps", "threads", "sampler")
OUTPUT_FILES = {"trigger": "trigger.safetensors", "trigger_png": "trigger.png",
                "samples_png": "samples.png", "samples": "samples.safetensors",
                "record": "record.json"}


@dataclass
class InversionResult:
    """A method's trigger, the verdict samples it makes, and the evidence."""

    method: str
    trigger: torch.Tensor  # (C, H, W), additive offset: backdoor input = noise + trigger
    samples: torch.Tensor  # (N, C, H, W) verdict samples from noise + trigger, decoded, unclipped
    verdict: dict[str, Any]  # detection.verdict on their embeddings
    statistics: dict[str, float]  # the method's own (its population detector's features)
    iterations: int
    stopped_early: bool
    seconds: float
    unet_rows: int
    history: list[dict[str, Any]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def unet_evals_per_second(self) -> float:
        """Throughput of UNet evaluations during the inversion."""
        return self.unet_rows / self.seconds if self.seconds > 0 else 0.0


def seeds_for(base_seed: int, model_id: str, method: str, seed_index: int) -> dict[str, int]:
    """The method's own seed and the verdict batch's noise seed (method-independent)."""
    return {"method": derive_seed(base_seed, model_id, "invert_trigger", method, seed_index),
            "verdict_noise": derive_seed(base_seed, model_id, "verdict-noise", seed_index)}


def verdict_batch(shape: tuple[int, int, int], n: int, seed: int, device: torch.device | str
                  ) -> tuple[torch.Tensor, list[int]]:
    """``n`` clean noise images and their per-sample step-noise seeds, from ``seed``."""
    noise = torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))
    return noise.to(device), samplers.sample_seeds(seed, 0, n)


def _tqdm_progress(total: int | None, desc: str, enabled: bool) -> tuple[Progress, Any]:
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, disable=not enabled, mininterval=1.0, leave=False)

    def report(row: dict[str, Any]) -> None:
        bar.update(1)
        shown = {k: row[k] for k in ("start", "mscr", "loss") if k in row}
        bar.set_postfix({k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in shown.items()})
        log.debug("%s", row)

    return report, bar


def run_method(model: DiffusionModel, method: str, params: dict[str, Any] | None,
               detect: detection.DetectionSpec, encoder: Encoder | None, *,
               sampler: samplers.SamplerSpec, batch_size: int, seed: int, noise_seed: int,
               progress: Progress | bool = True, state_dir: Path | None = None
               ) -> InversionResult:
    """Run one inversion method on ``model`` (module doc). ``params`` are the method's own
    settings (``inversion.<method>`` in the config); unknown keys are refused."""
    from diffcleanse.inversion import get_method

    m = get_method(method)
    m.check_model(model)
    spec = m.make_spec(params, where=f"inversion.{method}")
    if batch_size < 2:
        raise ValueError(f"inversion.batch_size must be at least 2 (MSCR compares samples), got "
                         f"{batch_size}")
    if encoder is None:
        raise InversionError("the verdict needs an encoder (detection.encoder)")
    unet = model.unet.eval().requires_grad_(False)
    _check_weights(unet)
    encoder = encoder.to(model.device)
    noise, seeds = verdict_batch(model.space_shape, batch_size, noise_seed, model.device)
    bar = None
    if isinstance(progress, bool):
        progress, bar = _tqdm_progress(m.budget(spec), f"{method} inversion", progress)
    ctx = Context(model=model, sampler=sampler, noise=noise, noise_seeds=seeds, seed=seed,
                  detect=detect, encoder=encoder, progress=progress, state_dir=state_dir)
    counter = UNetCounter(unet)
    t0 = time.time()
    try:
        res = m.invert(ctx, spec)
        trigger = res.trigger.detach().to(model.device)
        if tuple(trigger.shape) != tuple(model.space_shape):
            raise InversionError(f"{method} returned a trigger of shape {tuple(trigger.shape)}, "
                                 f"the model takes {model.space_shape}")
        samples = res.samples if res.samples is not None else \
            ctx.backdoor_samples(trigger).detach()
        with torch.no_grad():
            verdict = detection.verdict(encoder(samples.clamp(-1, 1)), detect, samples)
            stats = m.statistics(ctx, spec, res, samples)
    finally:
        counter.close()
        if bar is not None:
            bar.close()
    return InversionResult(method=method, trigger=res.trigger.detach().cpu(),
                           samples=samples.detach().cpu(), verdict=verdict,
                           statistics={k: float(v) for k, v in stats.items()},
                           iterations=res.iterations, stopped_early=res.stopped_early,
                           seconds=time.time() - t0, unet_rows=counter.rows, history=res.history,
                           details={**res.details, "spec": m.describe(spec)},
                           tensors=res.tensors)


def _check_weights(unet: torch.nn.Module) -> None:
    bad = [n for n, p in unet.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise InversionError(f"{len(bad)} weight tensors hold NaN/inf (first: {bad[0]})")


def inversion_record(result: InversionResult, *, model: str, sampler: samplers.SamplerSpec,
                     detect: detection.DetectionSpec, encoder: Encoder, batch_size: int,
                     seeds: dict[str, int], seed_index: int, params: dict[str, Any],
                     extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The record of one inversion (JSON-able): verdict, statistics, protocol, seeds, seconds."""
    from diffcleanse.records import make_record

    v = result.verdict
    return make_record(
        "invert_trigger", {"inversion": params, "detection": detect.describe(),
                           "encoder": encoder.describe(), **(extra or {})},
        seeds["method"], result.seconds, model=model, method=result.method,
        seed_index=seed_index, seeds=seeds, gradient=result.details.get("gradient"),
        mscr=v["mscr"], backdoored=v["backdoored"],
        verdict="backdoored" if v["backdoored"] else "clean", detection=v,
        statistics=result.statistics, iterations=result.iterations,
        stopped_early=result.stopped_early, encoder=encoder.name, sampler=sampler.describe(),
        steps=sampler.steps, batch_size=batch_size, kappa=detect.kappa,
        kappa_class=detect.kappa_class, kappa_d=detect.kappa_d, active_kappa=detect.active_kappa,
        unet_evaluations=result.unet_rows, unet_evals_per_second=result.unet_evals_per_second,
        trigger_norm=float(result.trigger.norm()), details=result.details,
        history=result.history)


def save_outputs(result: InversionResult, out: dict[str, str | Path], record: dict[str, Any]
                 ) -> None:
    """Write the trigger (safetensors, PNG), the samples (PNG grid, safetensors) and the record.

    ``out`` maps ``trigger``, ``trigger_png``, ``samples_png``, ``samples`` and ``record`` to paths;
    each file is written atomically, the record last (so a record means the rest is whole).
    """
    from safetensors.torch import save_file

    from diffcleanse import reporting
    from diffcleanse.records import atomic_path, write_json

    extra = {f"extra.{k}": v.detach().cpu().contiguous() for k, v in result.tensors.items()}
    with atomic_path(out["trigger"]) as tmp:
        save_file({"trigger": result.trigger.contiguous(), **extra}, str(tmp),
                  metadata={"convention": "additive offset: backdoor input = noise + trigger",
                            "model": str(record.get("model", "")), "method": result.method})
    if out.get("samples"):
        with atomic_path(out["samples"]) as tmp:
            save_file({"samples": result.samples.contiguous()}, str(tmp))
    reporting.trigger_figure(result.trigger, record, out["trigger_png"])
    reporting.inversion_samples_figure(result.samples, record, out["samples_png"])
    write_json(out["record"], record)


def invert_model(model_dir: str | Path, out: dict[str, str | Path],
                 inversion_params: dict[str, Any],
                 detection_params: dict[str, Any], *, model_id: str, method: str = "bbti",
                 seed_index: int = 0, classifier_dir: str | None = None, seed: int = 0,
                 device: str = "cpu", allow_pickle: bool = False, progress: bool = True
                 ) -> dict[str, Any]:
    """The workflow's ``invert_trigger``: load a model, run ``method``, write the outputs.

    ``inversion_params`` is the config's ``inversion`` section with the model's ``sampler``
    (``steps``, ``batch_size`` and the method's own ``<method>`` sub-section are read from it).
    Everything that can fail (model, encoder, settings) is checked before anything is written.
    """
    from diffcleanse import encoders, models
    from diffcleanse.inversion import get_method

    m = get_method(method)
    own = dict(inversion_params.get(method) or {})
    m.make_spec(own, where=f"inversion.{method}")  # bad settings fail before the model loads
    detect = detection.spec_from_params(detection_params)
    model = models.load_pipeline(model_dir, allow_pickle=allow_pickle, device=device)
    m.check_model(model)
    sampler = samplers.SamplerSpec(name=inversion_params.get("sampler", "ddpm"),
                                   steps=inversion_params.get("steps"))
    enc = encoders.encoder_from_params(detection_params, classifier_dir=classifier_dir,
                                       device=device)
    batch = int(inversion_params.get("batch_size", 16))
    seeds = seeds_for(seed, model_id, method, seed_index)
    result = run_method(model, method, own, detect, enc, sampler=sampler, batch_size=batch,
                        seed=seeds["method"], noise_seed=seeds["verdict_noise"], progress=progress)
    record = inversion_record(result, model=model_id, sampler=sampler, detect=detect, encoder=enc,
                              batch_size=batch, seeds=seeds, seed_index=seed_index, params=own,
                              extra={"base_seed": seed, "model_dir": str(model_dir)})
    save_outputs(result, out, record)
    return record
