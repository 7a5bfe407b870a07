"""Benchmark stage 2 (backdoor removal) per model: seconds for importance, pruning, fine-tuning.

Prints, per model, the seconds of clean-data synthesis, the Taylor importance (gradient
accumulation over t > T, clean and backdoor, plus Diff-Pruning's own clean pass), pruning and
fine-tuning, beside the paper's Table 7 (DDPM on CIFAR-10, one V100 GPU). The paper's "Backdoor
Removal" column is importance + pruning. Two ways to get the numbers:

    # time the stages here, in process, on models and triggers you name
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/removal.py run \
        --model results/models/bd-box-hat/model \
        --trigger results/inversion/bd-box-hat/method~bbti/trigger.safetensors

    # read them from the records of a workflow run (importance.json, prune.json, finetune.json)
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/removal.py records --results results

Not a test: timings depend on the machine and its load. The hardware, the model size, the image
size, the number of timesteps (hence of t > T steps) and the fine-tuning budget all differ from the
paper's; the printout states each.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

# Paper Table 7 (DDPM, CIFAR-10 32 px, 35.7 M parameters, 1000 timesteps; one V100 GPU).
PAPER_TABLE7 = {  # attack: (backdoor removal seconds, fine-tuning seconds)
    "BadDiff": (60.74, 40.43 * 60),
    "VillanDiff": (58.85, 42.74 * 60),
    "TrojDiff": (53.64, 38.48 * 60),
}


def _paper_lines() -> list[str]:
    lines = ["", "Paper Table 7 (DDPM on CIFAR-10, 32 px, 35.7 M parameters, 1000 timesteps, "
             "6,000 synthetic images, 40 epochs, batch 128; one NVIDIA V100):",
             f"  {'attack':<12}{'removal (importance + pruning)':>32}{'fine-tuning':>16}"]
    for attack, (rem, fin) in PAPER_TABLE7.items():
        lines.append(f"  {attack:<12}{rem:>30.2f} s{fin / 60:>13.2f} min")
    return lines


def _table(rows: list[dict]) -> str:
    head = (f"{'model':<28}{'params':>9}{'px':>4}{'T/steps':>9}{'data s':>8}{'importance s':>14}"
            f"{'prune s':>9}{'removal s':>11}{'finetune s':>12}{'ft steps':>10}")
    out = [head, "-" * len(head)]
    for r in rows:
        out.append(f"{r['model']:<28}{r['params'] / 1e6:>8.2f}M{r['px']:>4}{r['T']:>9}"
                   f"{r['data_s']:>8.1f}{r['importance_s']:>14.2f}{r['prune_s']:>9.2f}"
                   f"{r['importance_s'] + r['prune_s']:>11.2f}{r['finetune_s']:>12.1f}"
                   f"{r['steps']:>10}")
    return "\n".join(out)


def run(args: argparse.Namespace) -> list[dict]:
    """Time every stage in process on each (model, trigger)."""
    from diffcleanse import models, patterns, sampling
    from diffcleanse.removal import FinetuneConfig, ImportanceConfig, pruning, stages
    from diffcleanse.removal import finetune as ft
    from diffcleanse.removal import importance as imp

    rows = []
    triggers = args.trigger or [None] * len(args.model)
    for model_dir, trig in zip(args.model, triggers, strict=True):
        unet, sched_cfg = models.load_model(model_dir)
        sched = models.scheduler_from_config(sched_cfg)
        size = unet.config.sample_size
        if trig and Path(trig).is_file():
            r = stages.load_trigger(trig, (3, size, size))
        else:
            r = patterns.render_trigger(trig or "box_14", size)
        t0 = time.perf_counter()
        data = ft.synthesise(unet, sched_cfg, args.samples, seed=1, progress=False,
                             spec=sampling.SamplerSpec(args.sampler, args.sampler_steps))
        t1 = time.perf_counter()
        cfg = ImportanceConfig(t_threshold_frac=args.t_threshold_frac)
        vectors, info = imp.compute_importance(unet, sched, data[:cfg.batch_size], r, cfg)
        t2 = time.perf_counter()
        pruned = models.load_model(model_dir)[0]
        pruning.prune_unet(pruned, vectors, args.strategy, args.ratio)
        t3 = time.perf_counter()
        fcfg = FinetuneConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size)
        _, hist = ft.finetune(pruned, sched, data, fcfg, reference=unet, progress=False)
        t4 = time.perf_counter()
        rows.append({"model": Path(model_dir).parent.name or str(model_dir),
                     "params": sum(p.numel() for p in unet.parameters()), "px": size,
                     "T": f"{info['T']}/{len(info['timesteps'])}", "data_s": t1 - t0,
                     "importance_s": t2 - t1, "prune_s": t3 - t2, "finetune_s": t4 - t3,
                     "steps": hist["steps"]})
    return rows


def records(args: argparse.Namespace) -> list[dict]:
    """Read the seconds from a workflow run's records (one row per fine-tuned variant)."""
    import json

    from diffcleanse import models

    rows = []
    root = Path(args.results) / "removal"
    for imp_rec in sorted(root.glob("*/importance.json")):
        model = imp_rec.parent.name
        ir = json.loads(imp_rec.read_text())
        unet, _ = models.load_model(Path(args.results) / "models" / model / "model")
        data_rec = [json.loads(p.read_text()) for p in imp_rec.parent.glob("*.json")
                    if json.loads(p.read_text()).get("stage") == "clean_data"]
        for ft_rec in sorted(imp_rec.parent.glob("strategy~*/ratio~*/loss~*/finetune.json")):
            fr = json.loads(ft_rec.read_text())
            pr = json.loads((ft_rec.parent.parent / "prune.json").read_text())
            label = f"{model} {pr['strategy'][:5]} {pr['ratio']:g} {fr['params']['loss']}"
            rows.append({"model": label, "params": sum(p.numel() for p in unet.parameters()),
                         "px": unet.config.sample_size,
                         "T": f"{ir['T']}/{len(ir['timesteps'])}",
                         "data_s": data_rec[0]["seconds"] if data_rec else float("nan"),
                         "importance_s": ir["seconds"], "prune_s": pr["seconds"],
                         "finetune_s": fr["seconds"], "steps": fr["steps"]})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("run", help="time the stages here on given models")
    r.add_argument("--model", nargs="+", required=True, help="model directories")
    r.add_argument("--trigger", nargs="+", help="inverted trigger files (or trigger names), "
                   "one per model (default: box_14, a stand-in)")
    r.add_argument("--strategy", default="diffcleanse", choices=["diffcleanse", "diffpruning"])
    r.add_argument("--ratio", type=float, default=0.02)
    r.add_argument("--t-threshold-frac", type=float, default=0.95)
    r.add_argument("--samples", type=int, default=600, help="synthetic clean images")
    r.add_argument("--sampler", default="ddpm")
    r.add_argument("--sampler-steps", type=int, default=None)
    r.add_argument("--epochs", type=float, default=20)
    r.add_argument("--lr", type=float, default=5e-4)
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument("--threads", type=int, default=1)
    rec = sub.add_parser("records", help="read the seconds from a workflow run's records")
    rec.add_argument("--results", default="results")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(getattr(args, "threads", 1))
    rows = run(args) if args.mode == "run" else records(args)
    print(f"Stage 2 seconds on this machine ({os.cpu_count()} CPU cores visible, "
          f"{torch.get_num_threads()} torch threads, CUDA: {torch.cuda.is_available()}):")
    print(_table(rows))
    print("\n".join(_paper_lines()))
    print("\nThe hardware differs (here: CPU; paper: one V100), and so do the model (parameters "
          "above), the image size, the timesteps accumulated (T/steps: the threshold and the "
          "number of t > T) and the fine-tuning budget (steps). Compare orders of magnitude, "
          "not seconds.")


if __name__ == "__main__":
    main()
