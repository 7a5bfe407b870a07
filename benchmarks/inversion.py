"""Benchmark BBTI trigger inversion on one zoo model: black-box vs white-box gradient.

Prints, for each gradient: inversion seconds, UNet evaluations per second during inversion (one
evaluation = one image at one timestep), and the ratio of that rate to the same UNet's plain
batched forward throughput (no grad, same batch, measured in this run on this machine), plus the
verdict and, when the true target is given, the ASR of the inverted trigger.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/inversion.py \
        --model results/models/bd-box-hat/model --encoder classifier:results/classifiers/digits_16 \
        --target hat --trigger box_14

Not a test: timings depend on the machine and its load. Early stopping is off by default so that
both variants run the same number of iterations (``--early-stop`` to turn it on).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from diffcleanse import encoders, inversion, models, patterns, sampling


def forward_throughput(unet: torch.nn.Module, batch: int, reps: int) -> float:
    """Images per second of plain batched UNet forwards (no grad) at the model's size."""
    size = unet.config.sample_size
    x = torch.randn(batch, unet.config.in_channels, size, size)
    t = torch.tensor(10)
    with torch.no_grad():
        unet(x, t)  # warm-up
        t0 = time.perf_counter()
        for _ in range(reps):
            unet(x, t)
        dt = time.perf_counter() - t0
    return batch * reps / dt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a zoo model directory")
    p.add_argument("--encoder", default="pixels", help="pixels | classifier:<dir> | clip:<file>")
    p.add_argument("--sampler", default="ddpm")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: full chain)")
    p.add_argument("--whitebox-steps", type=int, default=None,
                   help="steps the white-box gradient differentiates (default: --steps)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--lr", type=float, default=inversion.InversionSpec.lr)
    p.add_argument("--early-stop", action="store_true")
    p.add_argument("--target", help="true target name, to report the inverted trigger's ASR")
    p.add_argument("--trigger", help="true trigger name (for targets drawn from it)")
    p.add_argument("--mse-threshold", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)

    unet, cfg = models.load_model(args.model)
    enc = encoders.make_encoder(args.encoder)
    size = unet.config.sample_size
    fwd = forward_throughput(unet, args.batch_size, reps=20)
    print(f"model {args.model}: {size}x{size}, {sum(p.numel() for p in unet.parameters()):,} "
          f"parameters; torch threads {torch.get_num_threads()}; encoder {enc.name}")
    print(f"plain batched forward (batch {args.batch_size}, no grad): {fwd:,.0f} UNet "
          f"evaluations/s")
    target = (patterns.render_target(args.target, size, args.trigger) if args.target else None)
    for gradient in ("blackbox", "whitebox"):
        spec = inversion.InversionSpec(
            gradient=gradient, sampler=args.sampler, steps=args.steps,
            whitebox_steps=args.whitebox_steps, batch_size=args.batch_size, max_iters=args.iters,
            lr=args.lr, early_stop=args.early_stop)
        res = inversion.invert_trigger(unet, cfg, enc, spec, seed=args.seed)
        rate = res.unet_evals_per_second
        asr = ""
        if target is not None:
            hit = ((res.samples - target) ** 2).mean(dim=(1, 2, 3)) < args.mse_threshold
            asr = f", ASR {float(hit.float().mean()):.2f} (MSE < {args.mse_threshold:g})"
        wsteps = spec.sampler_spec(whitebox=gradient == "whitebox").steps
        print(f"{gradient:9s}: {res.seconds:7.1f} s for {res.iterations} iterations "
              f"({res.seconds / res.iterations:.2f} s/iteration, {spec.sampler} "
              f"{wsteps or 'all'} steps); {rate:,.0f} UNet evaluations/s = {rate / fwd:.2f} x "
              f"plain forward; MSCR {res.verdict['mscr']:.2f} -> "
              f"{'backdoored' if res.verdict['backdoored'] else 'clean'}{asr}")
    print(f"sampler spec: {sampling.SamplerSpec(name=args.sampler, steps=args.steps).describe()}")


if __name__ == "__main__":
    main()
