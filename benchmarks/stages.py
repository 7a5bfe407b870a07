"""Benchmark every heavy stage's UNet throughput against the plain batched UNet of the same model.

Per stage and architecture, prints the UNet evaluations per second (one evaluation = one image
through the UNet at one timestep, counted by ``inversion.base.UNetCounter``'s forward hook) and
their ratio to the plain batched forward (no grad) of the same model at the stage's batch,
measured in the same run: each repetition times the references, then runs the stage once, so the
machine's noise hits both; the best of ``--reps`` is kept for each. For stages that differentiate
it also prints the ratio to the plain forward+backward: the seconds the plain references take for
the stage's UNet work (rows without a graph at the forward rate, rows with one at the
forward+backward rate, each checkpoint recompute and each row of loss_p's frozen teacher as one
more forward) over the stage's seconds; the backward is with respect to the weights where they
train, to the input where the UNet is frozen (inversion). For a stage of plain forward+backward
rows alone this is its evaluations/s over the plain forward+backward's.

The stages call the package: ``samplers.denoise`` (DDPM, no grad); ``inversion.run_method`` for
BBTI (black-box and white-box gradients, one start, no early stop, pixel encoder), Elijah,
PureDiffusion (its surrogate fine-tuning and scale estimate run on a copy of the UNet that no hook
sees: their rows are added from its record and its spec) and TERD, each with its verdict pass;
``removal.compute_importance`` (Diff-Cleanse's clean and backdoor passes over t > T);
``removal.finetune.finetune`` (loss_p, the unpruned model as its own teacher); and the FID pass of
``evaluation.evaluate_model`` (``zoo.clean_samples``, then ``evaluation.frechet_distance`` against
as many reference images, with a random classifier's features unless ``--inception-weights``).
Targets: sampling and BBTI black-box >= 0.9 x forward; BBTI white-box, importance and fine-tuning
>= 0.8 x forward+backward.

Architectures, random weights (speed does not depend on them): ``default``, the default zoo's
(config.yaml ``models.unet``, 16 px, 100 timesteps; full 100-step chains), and ``cifar``,
DDPM-CIFAR10's (``cost_model.HUB_ARCHITECTURES["hub-ddpm-32"]``: 35.7 M parameters, 32 px, 1000
timesteps; strided 10-step DDPM chains unless ``--steps``). Budgets are tiny (``--iters``,
``--finetune-steps``, ``--importance-steps``), so fixed set-up costs weigh more than in a run.

    # both architectures on CPU, one thread (about 4 minutes on this machine)
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/stages.py --arch both --iters 1 --markdown

    # the paper's batches on a GPU, seconds at the paper's budgets (what benchmarks/gpu.sh runs)
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/stages.py --arch cifar --device cuda --steps 50 \\
        --batch 100 terd=16 purediffusion=40 importance=16 finetune=128 fid=128 \\
        --importance-steps 50 --finetune-steps 50 --paper

Not a test: timings depend on the machine and its load; compare within one run.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffcleanse import (
    detection,
    encoders,
    evaluation,
    inversion,
    models,
    precision,
    samplers,
    zoo,
)
from diffcleanse.classifiers import SmallCNN, save_classifier
from diffcleanse.cost_model import HUB_ARCHITECTURES
from diffcleanse.inversion.base import UNetCounter
from diffcleanse.removal import FinetuneConfig, ImportanceConfig, compute_importance
from diffcleanse.removal.finetune import finetune

REPO = Path(__file__).resolve().parents[1]
STAGES = ("sampling", "bbti-blackbox", "bbti-whitebox", "elijah", "purediffusion", "terd",
          "importance", "finetune", "fid")
# stage: (reference, least ratio); "fwd": x plain forward, "fwd+bwd": x plain forward+backward
TARGETS = {"sampling": ("fwd", 0.9), "bbti-blackbox": ("fwd", 0.9),
           "bbti-whitebox": ("fwd+bwd", 0.8), "importance": ("fwd+bwd", 0.8),
           "finetune": ("fwd+bwd", 0.8)}
# the plain forward+backward each stage's graphs need: w (weights train), x (frozen: input only)
BACKWARDS = {"bbti-whitebox": "x", "elijah": "x", "purediffusion": "wx", "terd": "x",
             "importance": "w", "finetune": "w"}
# Paper Table 7 (DDPM, CIFAR-10 32 px, 1000 timesteps; one V100): BadDiff, VillanDiff, TrojDiff
PAPER_TABLE7 = {"bbti-blackbox": "BBTI 8.41 / 5.15 / 2.17 min",
                "importance": "removal (importance + pruning) 60.74 / 58.85 / 53.64 s",
                "finetune": "fine-tuning 40.43 / 42.74 / 38.48 min"}
# the paper's work per stage in evaluations (32 px, 1000-step chains), for --paper
PAPER_WORK = {
    "sampling": (6000 * 1000, "6,000 synthetic clean images (Appendix D)"),
    "bbti-blackbox": (100 * 1000, "one iteration: batch 100 x 1000 steps"),
    "bbti-whitebox": (100 * 1000, "one iteration: batch 100 x 1000 steps"),
    "importance": (2 * 50 * 16, "2 passes x 50 timesteps (t > 950) x batch 16"),
    "finetune": (1875 * 128, "1,875 steps x batch 128 (40 epochs of 6,000)"),
    "fid": (10000 * 1000, "10,000 samples x 1000 steps + features"),
}


def in_backward() -> bool:
    """Whether autograd is running a backward pass now (torch has no public call for it)."""
    return torch._C._current_graph_task_id() != -1


class StageCounter(UNetCounter):
    """``UNetCounter``'s rows (every evaluation, outside the backward pass), sorted: ``grad_w`` /
    ``grad_x`` build a graph (weights trainable / frozen, the gradient reaching the input), and
    ``recomputed`` counts the checkpoint recomputes in the backward pass. A pre-hook sees those:
    torch's non-reentrant checkpoint stops a recompute early, before the forward hook fires."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__(unet)
        self.grad_w = self.grad_x = self.recomputed = 0
        self._pre = unet.register_forward_pre_hook(self._pre_hook)

    def _pre_hook(self, module, args) -> None:
        if in_backward():
            self.recomputed += int(args[0].shape[0])

    def _hook(self, module, args, out) -> None:
        if in_backward():
            return  # a recompute (counted by the pre-hook), not an evaluation
        super()._hook(module, args, out)
        if torch.is_grad_enabled():
            if next(module.parameters()).requires_grad:
                self.grad_w += int(args[0].shape[0])
            elif args[0].requires_grad:
                self.grad_x += int(args[0].shape[0])

    def close(self) -> None:
        super().close()
        self._pre.remove()


@dataclass
class Arch:
    """One architecture with random weights, on the benchmark's device."""

    name: str
    unet: torch.nn.Module
    scheduler_config: dict[str, Any]
    steps: int  # sampler steps of every chain

    @property
    def model(self) -> models.DiffusionModel:
        return models.DiffusionModel(self.unet, self.scheduler_config, "ddpm")

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.model.space_shape

    @property
    def timesteps(self) -> int:
        return int(self.scheduler_config["num_train_timesteps"])

    def describe(self) -> str:
        n = sum(p.numel() for p in self.unet.parameters())
        return (f"{self.name}: {n / 1e6:.2f} M parameters, {self.shape[-1]} px, "
                f"{self.timesteps} timesteps; DDPM chains of {self.steps} strided steps")


def build_arch(name: str, device: str, steps: int | None) -> Arch:
    """``default`` (config.yaml's zoo UNet, 16 px) or ``cifar`` (DDPM-CIFAR10's), random weights."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    if name == "default":
        import yaml

        cfg = yaml.safe_load((REPO / "config.yaml").read_text())["models"]
        unet = models.build_unet(16, **cfg["unet"])
        sched = models.build_scheduler(**cfg["scheduler"])
    else:
        arch = HUB_ARCHITECTURES["hub-ddpm-32"]
        unet = UNet2DModel(**{k: v for k, v in arch.items() if k != "timesteps"})
        sched = models.build_scheduler(int(arch["timesteps"]))
    unet = precision.attach(unet.to(device).eval().requires_grad_(False))  # --precision
    T = int(sched.config.num_train_timesteps)
    return Arch(name, unet, dict(sched.config), steps or (T if name == "default" else 10))


# ---- the stages: each sets up, then returns a closure that runs the stage once
Run = Callable[[], dict[str, int]]  # returns the rows no counter sees, by kind (fwd, grad_w)


@dataclass
class Prepared:
    """A stage ready to run: ``unet``'s rows are its evaluations; ``helpers`` are other UNets it
    calls (loss_p's frozen teacher), whose rows count in the reference work only."""

    run: Run
    unet: torch.nn.Module
    helpers: tuple[torch.nn.Module, ...] = ()


def stage_sampling(a: Arch, b: int, o: argparse.Namespace) -> Prepared:
    x_T = torch.randn((b, *a.shape), generator=torch.Generator().manual_seed(0)).to(o.device)
    seeds = samplers.sample_seeds(0, 0, b)
    spec = samplers.SamplerSpec("ddpm", steps=a.steps)

    def run() -> dict[str, int]:
        with torch.no_grad():
            samplers.denoise(a.unet, a.scheduler_config, x_T, spec, seeds=seeds)
        return {}
    return Prepared(run, a.unet)


def stage_inversion(method: str, params: Callable[[Arch, int, argparse.Namespace], dict]
                    ) -> Callable[[Arch, int, argparse.Namespace], Prepared]:
    """A stage that runs ``inversion.run_method(method)`` with ``params(arch, batch, options)``."""
    def make(a: Arch, b: int, o: argparse.Namespace) -> Prepared:
        enc, p = encoders.make_encoder("pixels"), params(a, b, o)
        spec = samplers.SamplerSpec("ddpm", steps=a.steps)

        def run() -> dict[str, int]:
            res = inversion.run_method(a.model, method, p, detection.DetectionSpec(), enc,
                                       sampler=spec, batch_size=b, seed=0, noise_seed=0,
                                       progress=False)
            sur = res.details.get("surrogate")
            if not sur:
                return {}
            # PureDiffusion's surrogate copy: its counter's training rows, and the scale
            # estimate's k x scale_batch forwards (on the copy's EMA, counted by nobody)
            return {"grad_w": int(sur["training_unet_rows"]), "fwd": p["k"] * p["scale_batch"]}
        return Prepared(run, a.unet)
    return make


def stage_importance(a: Arch, b: int, o: argparse.Namespace) -> Prepared:
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand((b, *a.shape), generator=g) * 2 - 1
    trigger = 0.5 * torch.randn(a.shape, generator=g)
    cfg = ImportanceConfig(t_threshold_frac=1 - o.importance_steps / a.timesteps, batch_size=b)
    sched = models.scheduler_from_config(a.scheduler_config)

    def run() -> dict[str, int]:  # Diff-Cleanse's two passes (Eq. 9), t > T
        compute_importance(a.unet, sched, x0.to(o.device), trigger, cfg,
                           kinds=("clean", "backdoor"))
        return {}
    return Prepared(run, a.unet)


def stage_finetune(a: Arch, b: int, o: argparse.Namespace) -> Prepared:
    student = copy.deepcopy(a.unet)  # unpruned (ratio 0): the same model as the references
    data = torch.rand((b, *a.shape), generator=torch.Generator().manual_seed(0)) * 2 - 1
    cfg = FinetuneConfig(epochs=o.finetune_steps, batch_size=b, loss="p", warmup_steps=0,
                         checkpoint_every=10**9)
    sched = models.scheduler_from_config(a.scheduler_config)

    def run() -> dict[str, int]:
        finetune(student, sched, data, cfg, reference=a.unet, device=o.device, progress=False)
        return {}
    return Prepared(run, student, helpers=(a.unet,))


def stage_fid(a: Arch, b: int, o: argparse.Namespace) -> Prepared:
    n = o.fid_samples or b
    tmp = tempfile.TemporaryDirectory(prefix="stages-fid-")  # removed at exit
    torch.manual_seed(0)
    save_classifier(SmallCNN(10, a.shape[-1]), Path(tmp.name) / "classifier")
    ref = torch.rand((n, *a.shape), generator=torch.Generator().manual_seed(1)) * 2 - 1
    spec = samplers.SamplerSpec("ddpm", steps=a.steps)
    extractor = "inception" if o.inception_weights else "classifier"

    def run() -> dict[str, int]:  # evaluation.evaluate_model's utility: samples, then features
        clean = zoo.clean_samples(a.model, spec, n, 0, batch_size=b, progress=False)
        evaluation.frechet_distance(clean, ref, feature_extractor=extractor,
                                    classifier_dir=Path(tmp.name) / "classifier",
                                    inception_weights=o.inception_weights, batch_size=b,
                                    device=o.device)
        return {}
    return Prepared(run, a.unet)


MAKERS: dict[str, Callable[[Arch, int, argparse.Namespace], Prepared]] = {
    "sampling": stage_sampling,
    "bbti-blackbox": stage_inversion("bbti", lambda a, b, o: {
        "gradient": "blackbox", "max_iters": o.iters, "restarts": 1, "early_stop": False}),
    "bbti-whitebox": stage_inversion("bbti", lambda a, b, o: {
        "gradient": "whitebox", "max_iters": o.iters, "restarts": 1, "early_stop": False}),
    "elijah": stage_inversion("elijah", lambda a, b, o: {  # its statistic trims 4 a side
        "epochs": o.iters, "batch": b, "uniformity_trim": min(4, (b - 1) // 2)}),
    "purediffusion": stage_inversion("purediffusion", lambda a, b, o: {
        "surrogate_images": b, "surrogate_steps": o.iters, "surrogate_batch": b,
        "scale_batch": b, "k": min(2, a.steps), "batch": b, "epochs": o.iters}),
    "terd": stage_inversion("terd", lambda a, b, o: {
        "iterations": o.iters, "refine_iterations": o.iters, "batch": b,
        "refine_steps": min(10, a.steps)}),
    "importance": stage_importance,
    "finetune": stage_finetune,
    "fid": stage_fid,
}


# ---- measuring
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    """Seconds of one call of ``fn`` (the device synchronised on both sides) and its result."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def references(a: Arch, b: int, device: str) -> dict[str, Callable[[], None]]:
    """The plain batched UNet calls at batch ``b``: forward (no grad), forward+backward with
    respect to the weights (``w``) and to the input with the weights frozen (``x``)."""
    x = torch.randn((b, *a.shape), device=device)
    t = torch.full((b,), a.timesteps // 2, device=device, dtype=torch.long)

    def fwd() -> None:
        with torch.no_grad():
            a.unet(x, t)

    def fwd_bwd_w() -> None:
        a.unet.requires_grad_(True)
        a.unet(x, t).sample.square().mean().backward()
        a.unet.zero_grad(set_to_none=True)
        a.unet.requires_grad_(False)

    def fwd_bwd_x() -> None:
        a.unet(x.clone().requires_grad_(True), t).sample.square().mean().backward()

    return {"fwd": fwd, "w": fwd_bwd_w, "x": fwd_bwd_x}


def measure(stage: str, a: Arch, b: int, o: argparse.Namespace) -> dict[str, Any]:
    """Alternate the references and the stage ``o.reps`` times; keep the best of each."""
    prep = MAKERS[stage](a, b, o)
    refs = {k: f for k, f in references(a, b, o.device).items()
            if k == "fwd" or k in BACKWARDS.get(stage, "")}
    cuda = o.device.startswith("cuda")
    for f in refs.values():  # warm-up
        f()
    per_image = dict.fromkeys(refs, math.inf)
    best: dict[str, Any] | None = None
    for _ in range(o.reps):
        for k, f in refs.items():
            for _ in range(o.ref_calls):
                per_image[k] = min(per_image[k], timed(f, o.device)[0] / b)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        counters = [StageCounter(m) for m in (prep.unet, *prep.helpers)]
        try:
            dt, extra = timed(prep.run, o.device)
        finally:
            for c in counters:
                c.close()
        if best is None or dt < best["s"]:
            best = {"s": dt, "evals": counters[0].rows + sum(extra.values()),
                    "rows": sum(c.rows for c in counters) + sum(extra.values()),
                    "grad_w": sum(c.grad_w for c in counters) + extra.get("grad_w", 0),
                    "grad_x": sum(c.grad_x for c in counters),
                    "recomputed": sum(c.recomputed for c in counters)}
            if cuda:
                best["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    a.unet.eval().requires_grad_(False)  # as the references expect, whatever the stage left
    rate = best["evals"] / best["s"]
    out = {"stage": stage, "arch": a.name, "batch": b, **best, "rate": rate,
           "x_fwd": rate * per_image["fwd"], "x_fwd_bwd": None}
    if best["grad_w"] or best["grad_x"]:  # the references' seconds for the same work
        plain = best["rows"] - best["grad_w"] - best["grad_x"] + best["recomputed"]
        work = plain * per_image["fwd"] + sum(best[f"grad_{k}"] * per_image.get(k, math.nan)
                                              for k in "wx" if best[f"grad_{k}"])
        out["x_fwd_bwd"] = work / best["s"]
    return out


# ---- output
def verdict(row: dict[str, Any]) -> tuple[str, str]:
    """The stage's target and whether it is met."""
    if row["stage"] not in TARGETS:
        return "-", "-"
    ref, least = TARGETS[row["stage"]]
    value = row["x_fwd"] if ref == "fwd" else row["x_fwd_bwd"]
    return f">= {least} x {ref}", "yes" if value >= least else "NO"


def table(rows: list[dict[str, Any]], markdown: bool, cuda: bool) -> str:
    """The results, one row per stage and architecture (markdown or aligned text)."""
    head = ["stage", "architecture", "batch", "evaluations", "s", "evaluations/s", "x forward",
            "x fwd+bwd", "target", "met"] + (["peak GPU MiB"] if cuda else [])
    body = []
    for r in rows:
        target, met = verdict(r)
        fb = "-" if r["x_fwd_bwd"] is None else f"{r['x_fwd_bwd']:.2f}"
        body.append([r["stage"], r["arch"], str(r["batch"]), f"{r['evals']:,}", f"{r['s']:.2f}",
                     f"{r['rate']:,.1f}", f"{r['x_fwd']:.2f}", fb, target, met]
                    + ([f"{r['peak_mib']:,.0f}"] if cuda else []))
    width = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    if markdown:
        lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, width, strict=True)) + " |",
                 "|" + "|".join("-" * (w + 2) for w in width) + "|"]
        lines += ["| " + " | ".join(x.ljust(w) for x, w in zip(b, width, strict=True)) + " |"
                  for b in body]
    else:
        lines = ["  ".join(h.ljust(w) for h, w in zip(head, width, strict=True))]
        lines += ["  ".join(x.ljust(w) for x, w in zip(b, width, strict=True)) for b in body]
    return "\n".join(line.rstrip() for line in lines)


def paper_table(rows: list[dict[str, Any]]) -> str:
    """Seconds at the paper's budgets (its work over the measured rate) beside its Table 7."""
    lines = ["| stage | the paper's work | evaluations | s at the rate measured (batch) | paper "
             "Table 7, V100 (BadDiff / VillanDiff / TrojDiff) |", "|---|---|---|---|---|"]
    for r in rows:
        if r["arch"] != "cifar" or r["stage"] not in PAPER_WORK:
            continue
        n, what = PAPER_WORK[r["stage"]]
        s = n / r["rate"]
        lines.append(f"| {r['stage']} | {what} | {n:,} | {s:,.1f} s = {s / 60:,.2f} min "
                     f"({r['batch']}) | {PAPER_TABLE7.get(r['stage'], '-')} |")
    return "\n".join(lines)


def parse_batches(items: list[str]) -> tuple[int | None, dict[str, int]]:
    """``--batch``: a plain number for every stage, ``stage=N`` for one."""
    default, per = None, {}
    for item in items:
        name, _, value = item.rpartition("=")
        if name and name not in STAGES:
            raise SystemExit(f"--batch {item}: unknown stage {name} (stages: {', '.join(STAGES)})")
        if name:
            per[name] = int(value)
        else:
            default = int(value)
    return default, per


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=["default", "cifar", "both"], default="default")
    p.add_argument("--batch", nargs="+", default=[], metavar="N|STAGE=N",
                   help="batch of every stage, and/or of one stage (default: 8 at 16 px, 2 for "
                        "cifar; BBTI's verdict batch, 2 at least)")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--precision", choices=precision.PRECISIONS, default="fp32",
                   help="of every UNet evaluation, the references' too (diffcleanse.precision)")
    p.add_argument("--reps", type=int, default=2, help="repetitions (the best is kept)")
    p.add_argument("--ref-calls", type=int, default=2,
                   help="reference calls of each kind per repetition")
    p.add_argument("--steps", type=int, default=None,
                   help="DDPM sampler steps of every chain (default: the full 100 at 16 px, 10 "
                        "strided of 1000 for cifar)")
    p.add_argument("--iters", type=int, default=2,
                   help="optimiser iterations: BBTI, Elijah and PureDiffusion epochs, TERD per "
                        "stage, PureDiffusion's surrogate steps")
    p.add_argument("--finetune-steps", type=int, default=5,
                   help="fine-tuning steps (its set-up, an EMA copy, weighs on fewer)")
    p.add_argument("--importance-steps", type=int, default=2,
                   help="timesteps above T per importance pass (paper: 50 of 1000)")
    p.add_argument("--fid-samples", type=int, default=None, help="default: one batch")
    p.add_argument("--inception-weights", help="torch-fidelity Inception weights for the FID "
                   "pass (default: a random small classifier, the offline extractor)")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    p.add_argument("--paper", action="store_true",
                   help="also print seconds at the paper's budgets beside its Table 7 (cifar)")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    precision.set_precision(args.precision)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA GPU here")
    default, per = parse_batches(args.batch)
    rows, archs = [], []
    for name in ("default", "cifar") if args.arch == "both" else (args.arch,):
        a = build_arch(name, args.device, args.steps)
        archs.append(a.describe())
        print(archs[-1], file=sys.stderr, flush=True)
        for stage in args.stages:
            b = max(2, per.get(stage) or default or (8 if name == "default" else 2))
            rows.append(measure(stage, a, b, args))
            r = rows[-1]
            print(f"  {stage} (batch {b}): {r['evals']:,} evaluations in {r['s']:.2f} s, "
                  f"{r['rate']:,.1f}/s = {r['x_fwd']:.2f} x forward", file=sys.stderr, flush=True)
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"CPU ({os.cpu_count()} cores visible)"
    print(f"\n{dev}, torch {torch.__version__}, {torch.get_num_threads()} torch threads; best of "
          f"{args.reps} repetitions, each alternating {args.ref_calls} reference calls with one "
          f"run; {args.iters} optimiser iterations per stage, {args.finetune_steps} "
          f"fine-tuning steps, {args.importance_steps} timesteps per importance pass, "
          f"random weights, pixel encoder, "
          f"{'Inception' if args.inception_weights else 'random-classifier'} FID features")
    print("\n".join(archs) + "\n")
    print(table(rows, args.markdown, args.device.startswith("cuda")))
    print("\nx forward: evaluations/s over the plain batched forward's (no grad, same batch).\n"
          "x fwd+bwd: the seconds the plain forward and forward+backward take for the stage's "
          "UNet work\n(checkpoint recomputes and loss_p's teacher rows as forwards) over the "
          "stage's seconds.")
    if args.paper:
        print("\nAt the paper's budgets (32 px, 1000 steps; the paper's BBTI stops when flagged: "
              "its iterations are not reported; its removal includes pruning):\n")
        print(paper_table(rows))


if __name__ == "__main__":
    main()
