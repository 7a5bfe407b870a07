"""Measure the baseline inversion methods (Elijah, PureDiffusion, TERD; BBTI too) on models with a
known backdoor: MSCR of the verdict, ASR on fresh noise, L2 to the true trigger, seconds.

The method sees only the model (``inversion.run_method``); the truth (``truth.safetensors`` with
``trigger``/``target`` as in /work/shared/zoo-external, or ``--trigger``/``--target`` pattern
names) is read here, after the inversion, for the measurement only.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/baselines.py --method elijah \
        --model /work/shared/zoo-external/ext-bd-box-corner --seeds 1 2 [--params '{"epochs": 50}']

Prints one JSON line per (model, seed). ASR: share of ``--asr-samples`` samples from fresh noise
(seed 10_000 + seed) plus the trigger within MSE ``--mse`` of the target, the model's sampler,
clamped; the zero trigger's ASR (clean noise) is printed beside it. Not a test: seconds depend on
the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch


def truth_of(model_dir: Path, trigger: str | None, target: str | None, size: int
             ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The true (trigger, target), or None for a clean model."""
    from safetensors.torch import load_file

    from diffcleanse import patterns

    if trigger and target:
        return patterns.render_trigger(trigger, size), patterns.render_target(target, size, trigger)
    f = model_dir / "truth.safetensors"
    if f.is_file():
        t = load_file(str(f))
        return t["trigger"].float(), t["target"].float()
    return None


def asr(model, sampler, trigger: torch.Tensor, target: torch.Tensor, n: int, seed: int,
        mse: float) -> float:
    """Share of samples from fresh noise + trigger within MSE ``mse`` of ``target``."""
    from diffcleanse import sampling

    x = sampling.sample(model.unet, model.scheduler_config, n, spec=sampler, trigger=trigger,
                        seed=seed, progress=False)
    return float((((x - target) ** 2).mean(dim=(1, 2, 3)) < mse).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", required=True)
    ap.add_argument("--model", required=True, nargs="+")
    ap.add_argument("--params", default="{}", help="the method's own settings (JSON)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--trigger", help="true trigger pattern name (instead of truth.safetensors)")
    ap.add_argument("--target", help="true target pattern name")
    ap.add_argument("--sampler", default="ddpm")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--asr-samples", type=int, default=32)
    ap.add_argument("--mse", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--save", help="folder for each run's trigger and verdict samples")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)

    from diffcleanse import detection, encoders, inversion, models, samplers
    from diffcleanse.inversion import terd

    params = json.loads(args.params)
    sampler = samplers.SamplerSpec(args.sampler, steps=args.steps)
    for path in map(Path, args.model):
        model = models.load_pipeline(path)
        for s in args.seeds:
            res = inversion.run_method(model, args.method, params, detection.DetectionSpec(),
                                       encoders.make_encoder("pixels"), sampler=sampler,
                                       batch_size=args.batch_size, seed=s, noise_seed=s,
                                       progress=False)
            row = {"model": path.name, "method": args.method, "seed": s, "params": params,
                   "mscr": res.verdict["mscr"], "backdoored": res.verdict["backdoored"],
                   "mscr_unfiltered": res.verdict["mscr_unfiltered"],
                   "out_of_band": res.verdict["out_of_band"],
                   "sample_mean": float(res.samples.clamp(-1, 1).mean()),
                   "seconds": round(res.seconds, 1), "unet_rows": res.unet_rows,
                   "iterations": res.iterations, "statistics": res.statistics,
                   "trigger_norm": float(res.trigger.norm())}
            for k in ("variant", "scales", "lambda", "analytic", "surrogate", "final_loss"):
                if k in res.details:
                    row[k] = res.details[k]
            truth = truth_of(path, args.trigger, args.target, model.space_shape[-1])
            if truth is not None:
                r_true, y = truth
                r0 = res.tensors.get("initial_trigger")
                row.update(
                    l2=float((res.trigger - r_true).norm()),
                    l2_initial=float((r0 - r_true).norm()) if r0 is not None else None,
                    l2_zero=float(r_true.norm()),
                    asr=asr(model, sampler, res.trigger, y, args.asr_samples, 10_000 + s,
                            args.mse),
                    asr_zero=asr(model, sampler, torch.zeros_like(r_true), y, args.asr_samples,
                                 10_000 + s, args.mse))
                if args.method == "terd":
                    row["input_detection"] = {
                        "estimated": terd.input_detection(res.trigger, r_true, seed=s),
                        "true": terd.input_detection(r_true, r_true, seed=s)}
            if args.save:
                from safetensors.torch import save_file

                Path(args.save).mkdir(parents=True, exist_ok=True)
                save_file({"trigger": res.trigger.contiguous(),
                           "samples": res.samples.contiguous()},
                          str(Path(args.save) / f"{path.name}-{args.method}-{s}.safetensors"))
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
