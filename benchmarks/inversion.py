"""Benchmark BBTI trigger inversion on one zoo model: black-box vs white-box gradient.

Prints, for each gradient: inversion seconds, UNet evaluations per second during inversion (one
evaluation = one image at one timestep), and the ratio of that rate to the same UNet's plain
batched forward throughput (no grad, same batch, measured in this run on this machine), plus the
verdict and, when the true target is given, the ASR of the inverted trigger. With the true
trigger (``--trigger``) it also prints how well each gradient points at it: the cosine between
the descent direction -dℓ/dr and (r_true - r) at r = c·r_true + 0.1·N(0, 1), c in 0, 0.3, 0.6.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/inversion.py \
        --model results/models/bd-box-hat/model --encoder classifier:results/classifiers/digits_16 \
        --target hat --trigger box_14

Not a test: timings depend on the machine and its load. Both variants run the workflow's
protocol (early stop once MSCR >= κ_d, confirmed by the verdict's sampler); ``--no-early-stop``
runs every iteration.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from diffcleanse import detection, encoders, inversion, models, patterns, sampling


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


def gradient_alignment(unet: torch.nn.Module, cfg: dict, enc: encoders.Encoder,
                       r_true: torch.Tensor, spec: inversion.InversionSpec, c: float,
                       seed: int) -> dict[str, float]:
    """cos(-dℓ/dr, r_true - r) for both gradients at r = c·r_true + 0.1·N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    noise = torch.randn(spec.batch_size, 3, size, size, generator=g)
    r0 = c * r_true[None] + 0.1 * torch.randn(1, 3, size, size, generator=g)
    towards = (r_true[None] - r0).flatten()
    full = spec.sampler_spec()

    detect = detection.DetectionSpec()

    def loss_of(x0: torch.Tensor) -> torch.Tensor:
        return inversion.objective(x0, inversion.embed(enc, x0), spec, detect)[0]

    def cos(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))

    r = r0.clone().requires_grad_(True)
    loss_of(inversion.backdoor_sample(unet, cfg, noise + r, full, seed,
                                      differentiable=True)).backward()
    x0 = inversion.backdoor_sample(unet, cfg, noise + r0, full, seed).requires_grad_(True)
    loss_of(x0).backward()
    grad = -x0.grad.mean(dim=0) / inversion.blackbox_alpha_hat(cfg)  # the Eq. 1 gradient
    return {"whitebox": cos(-r.grad, towards), "blackbox": cos(-grad, towards),
            "agreement": cos(grad, r.grad)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a zoo model directory")
    p.add_argument("--encoder", default="pixels", help="pixels | classifier:<dir> | clip:<file>")
    p.add_argument("--sampler", default="ddpm")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: full chain)")
    p.add_argument("--whitebox-steps", type=int, default=None,
                   help="steps the white-box gradient differentiates (default: --steps)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--lr", type=float, default=inversion.InversionSpec.lr)
    p.add_argument("--no-early-stop", action="store_true")
    p.add_argument("--alignment-only", action="store_true",
                   help="only the gradient alignment (needs --trigger)")
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
    for gradient in () if args.alignment_only else ("blackbox", "whitebox"):
        spec = inversion.InversionSpec(
            gradient=gradient, sampler=args.sampler, steps=args.steps,
            whitebox_steps=args.whitebox_steps, batch_size=args.batch_size, max_iters=args.iters,
            lr=args.lr, early_stop=not args.no_early_stop)
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
    if args.trigger:
        r_true = patterns.render_trigger(args.trigger, size)
        spec = inversion.InversionSpec(sampler=args.sampler, steps=args.steps,
                                       batch_size=args.batch_size, range_loss=True)
        print("gradient alignment at r = c*r_true + 0.1*N(0, 1): cos(-dl/dr, r_true - r) per "
              "gradient, and cos(black-box, exact) (how well Eq. 1 approximates the gradient)")
        for c in (0.0, 0.3, 0.6):
            cos = gradient_alignment(unet, cfg, enc, r_true, spec, c, args.seed)
            print(f"  c = {c:.1f}: whitebox {cos['whitebox']:+.3f}, blackbox "
                  f"{cos['blackbox']:+.3f}; cos(black-box, exact) {cos['agreement']:+.3f}")


if __name__ == "__main__":
    main()
