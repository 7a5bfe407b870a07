"""Trigger inversion. BBTI (Diff-Cleanse Algorithm 1) now; Elijah, PureDiffusion and TERD join as
other values of ``InversionSpec.method``.

BBTI: draw the trigger ``r ~ N(0, 1)`` of the input's shape and a fixed batch of clean noise; each
iteration samples ``X_0`` from ``X_T = noise + r`` with the model's backdoor sampler (no clipping),
embeds ``X_0``, computes MSCR (``detection.mscr``) and stops once MSCR >= κ_d (the model is
flagged); otherwise it takes one Adam step (lr 0.1) on ℓ = ℓ_s + λ·ℓ_e. Two gradients:

* ``blackbox`` (the paper's, the default): the sampler runs under ``torch.no_grad``; dℓ/dX_0 is
  carried to r through the linear relation of Eq. 1 at t = T, ``X_T = α̂_T X_0 + β̂_T ε + ρ̂_T r``
  with ρ̂_T = 1: at a fixed X_T, dX_0/dr = -ρ̂_T/α̂_T, so dℓ/dr = -(1/α̂_T) · mean over the batch of
  dℓ/dX_0 (α̂_T = sqrt(ᾱ_T), BadDiffusion's Eq. 13; Adam makes the scale immaterial, the sign is
  what matters). The official code instead treats the sampler as the identity (dX_0/dX_T = +I);
  on the tiny zoo that direction pointed away from the true trigger (cosine -0.23) and drove r to
  saturated "natural" triggers, while Eq. 1's sign found the real target (see README). One
  no-grad sampling pass per iteration; only black-box access to the sampler is needed.
* ``whitebox`` (exact): backpropagates through a sampler of ``whitebox_steps`` steps (default: a
  few-step run of the same sampler) with activation checkpointing per step, so memory stays one
  step's activations. Each iteration costs about four forward passes per step; the early-stop
  MSCR is taken on those few-step samples, and the final verdict re-samples with the configured
  sampler and step count (the same protocol as the black-box variant).

The samples' stochasticity (DDPM's per-step noise) comes from generators seeded by (seed, step), so
sampling is a deterministic function of r and a rerun with the same seed gives the same trigger.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from diffcleanse import detection, sampling
from diffcleanse.encoders import Encoder
from diffcleanse.records import derive_seed

log = logging.getLogger(__name__)
METHODS = ("bbti",)
GRADIENTS = ("blackbox", "whitebox")


class InversionError(RuntimeError):
    """Inversion cannot run on this model or diverged."""


@dataclass(frozen=True)
class InversionSpec:
    """Hyperparameters of one inversion run (every one lands in the record)."""

    method: str = "bbti"
    gradient: str = "blackbox"  # the paper's; the default zoo's config uses whitebox (README)
    sampler: str = "ddpm"  # the model's backdoor sampler (manifest column `sampler`)
    steps: int | None = None  # None: the full chain of training timesteps
    whitebox_steps: int | None = None  # steps the white-box differentiates (None: `steps`)
    batch_size: int = 16
    max_iters: int = 100
    lr: float = 0.1
    restarts: int = 1  # independent starts sharing max_iters evenly (each: a new r, a new Adam)
    init_scale: float = 1.0  # r ~ init_scale · N(0, 1) (paper: 1; the default zoo uses 0.1)
    trigger_bound: float | None = 2.0  # keep r in [-b, b] after each step (None: unbounded)
    entropy_loss: bool = True  # False: ℓ_s alone (the paper's Table 3 ablation)
    kappa_minus: float = detection.KAPPA_MINUS
    kappa_plus: float = detection.KAPPA_PLUS
    entropy_bins: int = 4096
    range_loss: bool = False  # add ℓ_r: keep unclipped samples in the data range (not in paper)
    range_weight: float | None = None  # None: balanced against ℓ_s each step, like λ of ℓ_e
    early_stop: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown inversion method {self.method!r}: use one of "
                             f"{', '.join(METHODS)}")
        if self.gradient not in GRADIENTS:
            raise ValueError(f"unknown gradient {self.gradient!r}: use one of "
                             f"{', '.join(GRADIENTS)}")
        if self.sampler not in sampling.SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}: use one of "
                             f"{', '.join(sampling.SAMPLERS)}")
        if self.batch_size < 2 or self.max_iters < 1:
            raise ValueError("batch_size must be >= 2 and max_iters >= 1")
        if not 1 <= self.restarts <= self.max_iters:
            raise ValueError("restarts must lie in [1, max_iters]")

    def sampler_spec(self, whitebox: bool = False) -> sampling.SamplerSpec:
        """The sampler used for backdoor sampling (never clipping)."""
        steps = self.whitebox_steps if whitebox and self.whitebox_steps else self.steps
        return sampling.SamplerSpec(name=self.sampler, steps=steps, clip_sample=False)

    def describe(self) -> dict[str, Any]:
        """JSON-able description."""
        return asdict(self)


@dataclass
class InversionResult:
    """What an inversion returns: the trigger, the samples it makes, and the detection evidence."""

    trigger: torch.Tensor  # (C, H, W), additive offset: backdoor input = noise + trigger
    samples: torch.Tensor  # (N, C, H, W) final backdoor samples with the trigger, unclipped
    verdict: dict[str, Any]  # detection.verdict on the samples' embeddings
    iterations: int  # optimisation iterations run (Adam steps taken + the final check)
    stopped_early: bool
    seconds: float
    unet_rows: int  # UNet evaluations (one image at one timestep), all passes included
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def unet_evals_per_second(self) -> float:
        """Throughput of UNet evaluations during the inversion."""
        return self.unet_rows / self.seconds if self.seconds > 0 else 0.0


class _Counter:
    """Counts UNet rows evaluated through a forward hook."""

    def __init__(self, unet: torch.nn.Module):
        self.rows = 0
        self._h = unet.register_forward_hook(self._hook)

    def _hook(self, module, args, out) -> None:
        self.rows += int(args[0].shape[0])

    def close(self) -> None:
        self._h.remove()


def _ste_clamp(x: torch.Tensor) -> torch.Tensor:
    """Clamp to [-1, 1] in value, identity in gradient (what people see, without dead gradients)."""
    return x + (x.clamp(-1, 1) - x).detach()


def _step_fn(unet, sched, spec: sampling.SamplerSpec, seed: int, i: int, t):
    kwargs = {"eta": spec.eta} if spec.name == "ddim" else {}

    def fn(x: torch.Tensor) -> torch.Tensor:
        g = torch.Generator(device=x.device).manual_seed(seed + i)
        eps = unet(x, t.to(x.device)).sample
        return sched.step(eps, t, x, generator=g, **kwargs).prev_sample

    return fn


def backdoor_sample(unet: torch.nn.Module, scheduler_config: dict[str, Any], x_T: torch.Tensor,
                    spec: sampling.SamplerSpec, seed: int, *, differentiable: bool = False
                    ) -> torch.Tensor:
    """Reverse process from ``x_T`` (unclamped output). With ``differentiable`` the graph is kept
    through every step with activation checkpointing; otherwise it runs under no_grad."""
    sched = sampling.make_scheduler(scheduler_config, spec)
    x = x_T
    with torch.set_grad_enabled(differentiable):
        for i, t in enumerate(sched.timesteps):
            fn = _step_fn(unet, sched, spec, seed, i, t)
            x = checkpoint(fn, x, use_reentrant=False) if differentiable else fn(x)
    return x


def embed(encoder: Encoder, x0: torch.Tensor) -> torch.Tensor:
    """Embeddings of unclipped samples: clamped to the data range with a straight-through
    gradient, then encoded (what MSCR and ℓ_s see)."""
    return encoder(_ste_clamp(x0))


def objective(x0: torch.Tensor, z: torch.Tensor, spec: InversionSpec,
              detect: detection.DetectionSpec) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss BBTI minimises on unclipped samples ``x0`` and their embeddings ``z`` (of the
    clamped samples): ℓ_s + λ·ℓ_e, plus λ_r·ℓ_r with ``spec.range_loss``."""
    return detection.bbti_loss(_ste_clamp(x0), z, use_entropy=spec.entropy_loss,
                               kappa_minus=spec.kappa_minus, kappa_plus=spec.kappa_plus,
                               bins=spec.entropy_bins, raw=x0 if spec.range_loss else None,
                               range_margin=detect.range_margin, range_weight=spec.range_weight)


def _verdict_sample(unet: torch.nn.Module, scheduler_config: dict[str, Any], encoder: Encoder,
                    noise: torch.Tensor, r: torch.Tensor, spec: sampling.SamplerSpec, seed: int,
                    detect: detection.DetectionSpec
                    ) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(MSCR, trigger, samples) from one no-grad pass of the verdict sampler from noise + r."""
    r = r.detach().clone()
    x0 = backdoor_sample(unet, scheduler_config, noise + r, spec, seed).detach()
    with torch.no_grad():
        score = detection.mscr(encoder(x0.clamp(-1, 1)), detect.active_kappa,
                               detection.in_band(x0, detect))
    return score, r, x0


def blackbox_alpha_hat(scheduler_config: dict[str, Any]) -> float:
    """α̂_T = sqrt(ᾱ_T) of Eq. 1 at the last training timestep (the black-box gradient's scale)."""
    from diffcleanse.models import scheduler_from_config

    return float(scheduler_from_config(scheduler_config).alphas_cumprod[-1].sqrt())


def _check_model(unet: torch.nn.Module) -> tuple[int, int, int]:
    c = int(unet.config.in_channels)
    size = unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if c != 3:
        raise InversionError(f"the model takes {c}-channel inputs; BBTI's encoders need RGB "
                             f"(3 channels)")
    bad = [n for n, p in unet.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise InversionError(f"{len(bad)} weight tensors hold NaN/inf (first: {bad[0]})")
    return c, h, w


def invert_trigger(unet: torch.nn.Module, scheduler_config: dict[str, Any], encoder: Encoder,
                   spec: InversionSpec | None = None,
                   detect: detection.DetectionSpec | None = None, *, seed: int = 0,
                   progress: bool = False) -> InversionResult:
    """Invert a trigger and decide whether the model is backdoored (Algorithm 1, see module doc)."""
    spec = spec or InversionSpec()
    detect = detect or detection.DetectionSpec()
    c, h, w = _check_model(unet)
    unet.eval().requires_grad_(False)
    device = next(unet.parameters()).device
    encoder = encoder.to(device)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((spec.batch_size, c, h, w), generator=g).to(device)

    def fresh_start() -> tuple[torch.Tensor, torch.optim.Adam]:
        r = spec.init_scale * torch.randn((1, c, h, w), generator=g).to(device)
        if spec.trigger_bound is not None:
            r = r.clamp(-spec.trigger_bound, spec.trigger_bound)
        r.requires_grad_(True)
        return r, torch.optim.Adam([r], lr=spec.lr)

    r, opt = fresh_start()
    per_start = math.ceil(spec.max_iters / spec.restarts)
    sample_seed = derive_seed(seed, "sampler-noise")
    full, few = spec.sampler_spec(), spec.sampler_spec(whitebox=True)
    white = spec.gradient == "whitebox"
    bb_scale = -1.0 / blackbox_alpha_hat(scheduler_config)  # dX_0/dr from Eq. 1
    counter = _Counter(unet)
    t0 = time.time()
    history: list[dict[str, float]] = []
    best: tuple[float, torch.Tensor, torch.Tensor] | None = None  # by the score optimised on
    confirmed: tuple[float, torch.Tensor, torch.Tensor] | None = None  # by the verdict sampler
    stopped = False
    try:
        for it in range(spec.max_iters):
            if it and it % per_start == 0:  # the next start: a new trigger and a fresh Adam
                r, opt = fresh_start()
            opt.zero_grad(set_to_none=True)
            x_T = noise + r if white else (noise + r).detach()
            x0 = backdoor_sample(unet, scheduler_config, x_T, few if white else full, sample_seed,
                                 differentiable=white)
            if not white:
                x0 = x0.detach().requires_grad_(True)
            z = embed(encoder, x0)
            score = detection.mscr(z.detach(), detect.active_kappa,
                                   detection.in_band(x0, detect))
            row = {"iteration": it, "start": it // per_start, "mscr": score,
                   "trigger_norm": float(r.detach().norm())}
            if best is None or score >= best[0]:
                best = (score, r.detach().clone(), x0.detach().clone())
            if spec.early_stop and score >= detect.kappa_d:
                # the white-box's few-step samples only nominate: the verdict sampler decides
                check = (score, r.detach().clone(), x0.detach()) if not white else \
                    _verdict_sample(unet, scheduler_config, encoder, noise, r, full,
                                    sample_seed, detect)
                row["mscr_verdict_sampler"] = check[0]
                if confirmed is None or check[0] >= confirmed[0]:
                    confirmed = check
                if check[0] >= detect.kappa_d:
                    history.append(row)
                    stopped = True
                    break
            loss, parts = objective(x0, z, spec, detect)
            if not torch.isfinite(loss):
                raise InversionError(f"the loss became {float(loss)} at iteration {it}")
            loss.backward()
            if not white:  # Eq. 1 at t = T, fixed X_T: dX_0/dr = -ρ̂_T/α̂_T (see the module doc)
                r.grad = bb_scale * x0.grad.mean(dim=0, keepdim=True)
            opt.step()
            if spec.trigger_bound is not None:
                with torch.no_grad():
                    r.clamp_(-spec.trigger_bound, spec.trigger_bound)
            row.update(loss=float(loss.detach()), **parts)
            history.append(row)
            if progress or it % 10 == 0:
                log.info("iteration %d: MSCR %.3f loss %.4f", it, score, row["loss"])
        assert best is not None
        if white:  # verdict with the configured sampler, as for the black-box variant
            best = _verdict_sample(unet, scheduler_config, encoder, noise, best[1], full,
                                   sample_seed, detect)
        if confirmed is not None and confirmed[0] >= best[0]:
            best = confirmed
        _, r_best, samples = best
        with torch.no_grad():
            final = detection.verdict(encoder(samples.clamp(-1, 1)), detect, samples)
    finally:
        counter.close()
    seconds = time.time() - t0
    return InversionResult(trigger=r_best[0].cpu(), samples=samples.cpu(),
                           verdict=final, iterations=len(history), stopped_early=stopped,
                           seconds=seconds, unet_rows=counter.rows, history=history)


def inversion_record(result: InversionResult, spec: InversionSpec,
                     detect: detection.DetectionSpec, encoder: Encoder, *, model: str,
                     seed: int, extra_params: dict[str, Any] | None = None) -> dict[str, Any]:
    """The record of one inversion (JSON-able): verdict, protocol, encoder, seed, seconds."""
    from diffcleanse.records import make_record

    params = {"inversion": spec.describe(), "detection": detect.describe(),
              "encoder": encoder.describe(), **(extra_params or {})}
    return make_record(
        "invert_trigger", params, seed, result.seconds, model=model, method=spec.method,
        gradient=spec.gradient, mscr=result.verdict["mscr"],
        backdoored=result.verdict["backdoored"],
        verdict="backdoored" if result.verdict["backdoored"] else "clean",
        detection=result.verdict, iterations=result.iterations,
        stopped_early=result.stopped_early, encoder=encoder.name,
        sampler=spec.sampler_spec().describe(), steps=spec.steps,
        whitebox_sampler=spec.sampler_spec(whitebox=True).describe() if spec.gradient ==
        "whitebox" else None,
        batch_size=spec.batch_size, kappa=detect.kappa, kappa_class=detect.kappa_class,
        kappa_d=detect.kappa_d, active_kappa=detect.active_kappa,
        unet_evaluations=result.unet_rows, unet_evals_per_second=result.unet_evals_per_second,
        trigger_norm=float(result.trigger.norm()), history=result.history)


def save_outputs(result: InversionResult, out: dict[str, str | Path], record: dict[str, Any]
                 ) -> None:
    """Write the trigger (safetensors, PNG), the samples (PNG grid, safetensors) and the record.

    ``out`` maps ``trigger``, ``trigger_png``, ``samples_png``, ``samples`` and ``record`` to paths;
    each file is written atomically, the record last.
    """
    from safetensors.torch import save_file

    from diffcleanse import reporting
    from diffcleanse.records import atomic_path, write_json

    with atomic_path(out["trigger"]) as tmp:
        save_file({"trigger": result.trigger.contiguous()}, str(tmp),
                  metadata={"convention": "additive offset: backdoor input = noise + trigger",
                            "model": str(record.get("model", ""))})
    if out.get("samples"):
        with atomic_path(out["samples"]) as tmp:
            save_file({"samples": result.samples.contiguous()}, str(tmp))
    r = result.trigger
    shown = (r - r.min()) / (r.max() - r.min() + 1e-8) * 2 - 1
    v = result.verdict
    title = (f"{record.get('model', '')}: inverted trigger (min-max scaled, range "
             f"[{float(r.min()):.2f}, {float(r.max()):.2f}])\nencoder {record['encoder']}")
    reporting.image_rows([("trigger", shown[None])], title, out["trigger_png"])
    n = min(len(result.samples), 16)
    shown_x = result.samples.clamp(-1, 1)
    rows = [(f"noise +\ntrigger {i // 8 + 1}", shown_x[i:i + 8]) for i in range(0, n, 8)]
    s = record["sampler"]
    title = (f"{record.get('model', '')}: MSCR {v['mscr']:.2f} (κ={record['active_kappa']}) -> "
             f"{record['verdict']}\n{s['name']} {s['steps'] or 'all'} steps, clip_sample="
             f"{s['clip_sample']}, encoder {record['encoder']}")
    reporting.image_rows(rows, title, out["samples_png"])
    write_json(out["record"], record)


def spec_from_params(params: dict[str, Any]) -> InversionSpec:
    """An InversionSpec from the workflow's ``inversion`` params (unknown keys are ignored)."""
    names = InversionSpec.__dataclass_fields__
    return InversionSpec(**{k: v for k, v in params.items() if k in names})


def invert_model(model_dir: str | Path, out: dict[str, str | Path],
                 inversion_params: dict[str, Any], detection_params: dict[str, Any], *,
                 model_id: str, classifier_dir: str | None = None, seed: int = 0,
                 device: str = "cpu", allow_pickle: bool = False) -> dict[str, Any]:
    """Load a model, invert its trigger, write the outputs (``save_outputs``); return the record.

    ``seed`` is the config's base seed; the run's own seed is derived from (seed, model id, stage).
    Everything that can fail (model, encoder, parameters) is checked before anything is written.
    """
    from diffcleanse import encoders, models

    spec = spec_from_params(inversion_params)
    detect = detection.spec_from_params(detection_params)
    unet, sched_cfg = models.load_model(model_dir, allow_pickle=allow_pickle, device=device)
    _check_model(unet)
    enc = encoders.encoder_from_params(detection_params, classifier_dir=classifier_dir,
                                       device=device)
    run_seed = derive_seed(seed, model_id, "invert_trigger", spec.method)
    result = invert_trigger(unet, sched_cfg, enc, spec, detect, seed=run_seed)
    record = inversion_record(result, spec, detect, enc, model=model_id, seed=run_seed,
                              extra_params={"base_seed": seed, "model_dir": str(model_dir)})
    save_outputs(result, out, record)
    return record


SCAN_FILES = {"trigger": "trigger.safetensors", "trigger_png": "trigger.png",
              "samples_png": "samples.png", "samples": "samples.safetensors",
              "record": "record.json"}


def load_scan_config(path: str | Path) -> dict[str, Any]:
    """The ``inversion:`` and ``detection:`` sections of a workflow config file, for ``scan``."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist (--config)")
    cfg = yaml.safe_load(path.read_text())
    if not isinstance(cfg, dict) or not isinstance(cfg.get("inversion"), dict):
        raise ValueError(f"{path} has no `inversion:` section: pass a workflow config such as "
                         f"config.yaml (--config)")
    det = cfg.get("detection") or {}
    if not isinstance(det, dict):
        raise ValueError(f"{path}: `detection:` must be a mapping (--config)")
    return {"inversion": cfg["inversion"], "detection": det}


def scan_model(model: str, out_dir: str | Path, *, sampler: str = "ddpm", encoder: str = "pixels",
               clip_model: str = "ViT-B-32", target_kind: str = "image", seed: int = 0,
               allow_pickle: bool = False, image_size: int | None = None, device: str = "auto",
               threads: int | None = None,
               inversion_overrides: dict[str, Any] | None = None,
               config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Stage 1 on one model outside the workflow (``diffcleanse scan``); returns the record.

    ``model`` is a local diffusers directory or a hub id. Settings are the paper's protocol, or
    with ``config`` (``load_scan_config``) a workflow config's ``inversion:`` and ``detection:``;
    ``sampler``, ``target_kind`` and ``inversion_overrides`` override either. The outputs
    (``SCAN_FILES``) appear in ``out_dir`` all together or not at all; an existing ``out_dir`` is
    replaced only when it holds an earlier scan's record. Every check (model, channels, weights,
    encoder) runs before writing.
    """
    from diffcleanse import encoders, models
    from diffcleanse.records import atomic_path

    if threads:
        torch.set_num_threads(int(threads))
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir())
                                                     and not (out_dir / "record.json").is_file())):
        raise FileExistsError(f"{out_dir} exists and is not an earlier scan's output: choose --out")
    dev = str(sampling.resolve_device(device))
    config = config or {}
    spec = spec_from_params({**config.get("inversion", {}), "sampler": sampler,
                             **(inversion_overrides or {})})
    detect = detection.spec_from_params({**config.get("detection", {}),
                                         "target_kind": target_kind})
    local = models.fetch(model, allow_pickle=allow_pickle)
    unet, sched_cfg = models.load_model(local, allow_pickle=allow_pickle, device=dev,
                                        expected_channels=3)
    size = unet.config.sample_size
    if image_size is not None and size != image_size:
        raise InversionError(f"{model}: the model makes {size}-pixel images, not {image_size}")
    enc = encoders.make_encoder(encoder, clip_model=clip_model, device=dev)
    run_seed = derive_seed(seed, "scan", spec.method)
    result = invert_trigger(unet, sched_cfg, enc, spec, detect, seed=run_seed)
    record = inversion_record(result, spec, detect, enc, model=model, seed=run_seed,
                              extra_params={"base_seed": seed, "model_dir": str(local)})
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        save_outputs(result, {k: tmp / v for k, v in SCAN_FILES.items()}, record)
    return record


def scan_summary(record: dict[str, Any], out_dir: str | Path) -> str:
    """The lines ``diffcleanse scan`` prints."""
    s = record["sampler"]
    return "\n".join([
        f"{record['model']}: {record['verdict'].upper()} (MSCR {record['mscr']:.3f} "
        f"{'>=' if record['backdoored'] else '<'} κ_d {record['kappa_d']}, κ = "
        f"{record['active_kappa']})",
        f"  encoder {record['encoder']}; {s['name']} {s['steps'] or 'all'} steps, clip_sample="
        f"{s['clip_sample']}; batch {record['batch_size']}; {record['gradient']} gradient",
        f"  {record['iterations']} iterations in {record['seconds']:.1f} s "
        f"({record['unet_evals_per_second']:.0f} UNet evaluations/s); seed {record['seed']}",
        f"  wrote {Path(out_dir) / 'trigger.safetensors'}, trigger.png, samples.png, record.json"])
