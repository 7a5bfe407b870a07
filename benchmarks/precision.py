"""Do bf16 (or TF32) UNet evaluations keep the verdicts and ASRs of fp32? Measured on a run's zoo.

For every model of a finished workflow run, and each precision of ``--precisions`` (the first is
the reference), the model is loaded under that precision (``diffcleanse.precision``) and sampled
from the same noise with the same per-step seeds: the verdict batch of ``invert_trigger`` (seed
index 0) plus no trigger, the true trigger and the run's BBTI trigger, giving MSCR and the verdict
(MSCR >= κ_d), and ``--asr-samples`` samples from noise + true trigger, giving the ASR. Prints per
model and precision those numbers, the share of per-sample target hits that agree with the
reference, the largest pixel difference of the samples, and the seconds of each precision's
sampling (measured alternately in the same run: a ratio, not a timing).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/precision.py --results results \
        --encoder classifier:results/classifiers/digits_16 [--precisions fp32 bf16] \
        [--model bd-box-hat ...] [--device cuda --precisions fp32 tf32 bf16]

The chain is the model's own sampler over every training timestep (100 on the default zoo), so a
difference in one UNet call compounds over 100 calls: the test is the whole chain, not one call.
Not a test: machine and kernels decide the rounding (a GPU's bf16 kernels differ from a CPU's).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch


def sample(model, sampler, noise: torch.Tensor, seeds: list[int], r: torch.Tensor | None
           ) -> tuple[torch.Tensor, float]:
    """Decoded samples from ``noise (+ r)`` and the seconds they took."""
    from diffcleanse import samplers

    x_T = noise if r is None else noise + r.to(noise.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        x = model.decode(samplers.denoise(model.unet, model.scheduler_config, x_T, sampler,
                                          seeds=seeds))
    return x, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default="results", help="a workflow run's results folder")
    ap.add_argument("--model", nargs="*", default=None, help="model ids (default: all)")
    ap.add_argument("--encoder", default="pixels")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--batch-size", type=int, default=16, help="the verdict batch")
    ap.add_argument("--asr-samples", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0, help="the config's base seed")
    ap.add_argument("--kappa-d", type=float, default=0.5)
    ap.add_argument("--mse", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)

    from safetensors.torch import load_file

    from diffcleanse import detection, encoders, models, precision, samplers
    from diffcleanse.inversion.run import seeds_for, verdict_batch
    from diffcleanse.records import read_json

    enc = encoders.make_encoder(args.encoder)
    detect = detection.DetectionSpec(kappa_d=args.kappa_d)
    results = Path(args.results)
    ids = args.model if args.model is not None else sorted(
        p.parent.name for p in (results / "models").glob("*/card.json"))
    print(f"torch {torch.__version__}, {args.threads} thread(s); verdict batch "
          f"{args.batch_size}, ASR of {args.asr_samples} samples; reference {args.precisions[0]}")
    print("| model | precision | MSCR zero / true / BBTI's | verdict at BBTI's trigger | "
          "ASR true | hits agreeing with " + args.precisions[0] + " | max pixel diff | "
          "sampling s (× " + args.precisions[0] + ") |")
    print("|---" * 8 + "|")
    for mid in ids:
        card = read_json(results / "models" / mid / "card.json")
        mdir = results / "models" / mid / "model"
        sampler = samplers.SamplerSpec(card["manifest_row"]["sampler"])
        truth = target = None
        if card["ground_truth"]["backdoored"]:
            truth, target = detection._true_pattern(card, mdir)
        tfile = results / "inversion" / mid / "method~bbti" / "seed~0" / "trigger.safetensors"
        found = load_file(str(tfile))["trigger"].float() if tfile.is_file() else None
        ref: dict[str, torch.Tensor] = {}
        ref_s = None
        for prec in args.precisions:
            precision.set_precision(prec)
            model = models.load_pipeline(mdir, device=args.device)
            noise, seeds = verdict_batch(model.space_shape, args.batch_size, seeds_for(
                args.seed, mid, "bbti", 0)["verdict_noise"], model.device)
            gen = torch.Generator().manual_seed(args.seed)
            big = torch.randn((args.asr_samples, *model.space_shape), generator=gen).to(args.device)
            big_seeds = samplers.sample_seeds(args.seed, 1, args.asr_samples)
            mscr, secs, outs = {}, 0.0, {}
            for label, r in (("zero", None), ("true", truth), ("bbti", found)):
                if label != "zero" and r is None:
                    continue
                x, s = sample(model, sampler, noise, seeds, r)
                secs += s
                z = enc(x.clamp(-1, 1))
                mscr[label] = detection.mscr(z, detect.active_kappa, detection.in_band(x, detect))
                outs[label] = x
            hits = None
            if truth is not None:
                x, s = sample(model, sampler, big, big_seeds, truth)
                secs += s
                outs["asr"] = x
                hits = ((x.clamp(-1, 1) - target.to(x.device)) ** 2).mean(dim=(1, 2, 3)) < args.mse
                outs["hits"] = hits
            if not ref:
                ref, ref_s = outs, secs
            diff = max(float((outs[k] - ref[k]).abs().max()) for k in outs if k != "hits")
            agree = "—" if hits is None else f"{float((hits == ref['hits']).float().mean()):.3f}"
            verdict = "—" if "bbti" not in mscr else (
                "flag" if mscr["bbti"] >= args.kappa_d else "clean")
            ms = " / ".join(f"{mscr[k]:.2f}" if k in mscr else "—"
                            for k in ("zero", "true", "bbti"))
            asr = "—" if hits is None else f"{float(hits.float().mean()):.3f}"
            print(f"| {mid} | {prec} | {ms} | {verdict} | {asr} | {agree} | {diff:.3f} | "
                  f"{secs:.1f} ({secs / ref_s:.2f}) |", flush=True)
    precision.set_precision("fp32")


if __name__ == "__main__":
    main()
