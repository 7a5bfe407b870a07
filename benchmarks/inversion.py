"""Benchmark BBTI's three gradients on one model: speed against the plain forward, and direction.

Prints, for each gradient (``blackbox``: Eq. 1's total derivative, the paper's;
``blackbox_partial``: the partial at fixed X_T; ``whitebox``: exact, checkpointed): seconds, UNet
evaluations per second (one evaluation = one image at one timestep) and their ratio to the same
UNet's plain batched forward (no grad, same batch, measured in this run), the verdict and, with the
true target, the inverted trigger's ASR. With the true trigger (``--trigger``: a pattern name, or a
safetensors file with a tensor ``trigger`` such as ../shared/zoo-external/*/truth.safetensors) it
also prints how well each gradient points at it: cos(−dℓ/dr, r_true − r) at r = c·r_true + 0.1·N(0,
1), c ∈ {0, 0.3, 0.6}, and cos(black-box, exact).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/inversion.py \\
        --model ../shared/zoo-external/ext-bd-box-corner \\
        --trigger ../shared/zoo-external/ext-bd-box-corner/truth.safetensors --alignment-only

Not a test: timings depend on the machine and its load; compare the variants within one run.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from diffcleanse import detection, encoders, inversion, models, patterns, samplers
from diffcleanse.inversion import bbti
from diffcleanse.inversion.base import Context
from diffcleanse.inversion.run import verdict_batch

GRADIENTS = ("blackbox", "blackbox_partial", "whitebox")


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


def true_pattern(name: str | None, key: str, size: int) -> torch.Tensor | None:
    """A pattern by name, or a tensor from a safetensors file (``trigger``/``target``)."""
    if not name:
        return None
    if Path(name).suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(name)[key].float()
    return patterns.render_trigger(name, size) if key == "trigger" else \
        patterns.render_target(name, size)


def gradient_alignment(ctx: Context, r_true: torch.Tensor, spec: bbti.BBTISpec, c: float,
                       seed: int) -> dict[str, float]:
    """cos(−dℓ/dr, r_true − r) for every gradient at r = c·r_true + 0.1·N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    r0 = c * r_true[None] + 0.1 * torch.randn((1, *r_true.shape), generator=g)
    towards = (r_true[None] - r0).flatten()

    def loss_of(x0: torch.Tensor) -> torch.Tensor:
        return bbti.objective(x0, bbti.embed(ctx.encoder, x0), spec, ctx.detect)[0]

    def cos(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))

    r = r0.clone().requires_grad_(True)
    loss_of(ctx.backdoor_samples(r, grad=True)).backward()
    x0 = ctx.backdoor_samples(r0).detach().requires_grad_(True)
    loss_of(x0).backward()
    mean = x0.grad.mean(dim=0, keepdim=True)
    cfg = ctx.model.scheduler_config
    out = {"whitebox": cos(-r.grad, towards)}
    for name in ("blackbox", "blackbox_partial"):
        grad = bbti.blackbox_scale(name, cfg) * mean
        out[name] = cos(-grad, towards)
        out[f"{name}_vs_exact"] = cos(grad, r.grad)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a model directory")
    p.add_argument("--encoder", default="pixels", help="pixels | classifier:<dir> | clip:<file>")
    p.add_argument("--sampler", default="ddpm")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: full chain)")
    p.add_argument("--whitebox-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--init-scale", type=float, default=1.0)
    p.add_argument("--no-early-stop", action="store_true")
    p.add_argument("--alignment-only", action="store_true", help="only the gradient alignment")
    p.add_argument("--target", help="true target (name or safetensors file), for the ASR")
    p.add_argument("--trigger", help="true trigger (name or safetensors file)")
    p.add_argument("--mse-threshold", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)

    model = models.load_pipeline(args.model)
    unet = model.unet.requires_grad_(False)
    enc = encoders.make_encoder(args.encoder)
    size = model.space_shape[-1]
    sampler = samplers.SamplerSpec(args.sampler, steps=args.steps)
    detect = detection.DetectionSpec()
    fwd = forward_throughput(unet, args.batch_size, reps=20)
    print(f"model {args.model}: {size}x{size}, {sum(p.numel() for p in unet.parameters()):,} "
          f"parameters; torch threads {torch.get_num_threads()}; encoder {enc.name}")
    print(f"plain batched forward (batch {args.batch_size}, no grad): {fwd:,.0f} UNet "
          f"evaluations/s")
    target = true_pattern(args.target, "target", size)
    r_true = true_pattern(args.trigger, "trigger", size)
    for gradient in () if args.alignment_only else GRADIENTS:
        params = {"gradient": gradient, "max_iters": args.iters, "init_scale": args.init_scale,
                  "whitebox_steps": args.whitebox_steps, "early_stop": not args.no_early_stop}
        res = inversion.run_method(model, "bbti", params, detect, enc, sampler=sampler,
                                   batch_size=args.batch_size, seed=args.seed,
                                   noise_seed=args.seed, progress=False)
        rate = res.unet_evals_per_second
        extra = ""
        if target is not None:
            hit = ((res.samples.clamp(-1, 1) - target) ** 2).mean(dim=(1, 2, 3))
            extra += f", ASR {float((hit < args.mse_threshold).float().mean()):.2f}"
        if r_true is not None:
            extra += f", L2 to the true trigger {float((res.trigger - r_true).norm()):.1f}"
        print(f"{gradient:16s}: {res.seconds:7.1f} s for {res.iterations} iterations "
              f"({res.seconds / res.iterations:.2f} s/iteration); {rate:,.0f} UNet "
              f"evaluations/s = {rate / fwd:.2f} x plain forward; MSCR "
              f"{res.verdict['mscr']:.2f} -> "
              f"{'backdoored' if res.verdict['backdoored'] else 'clean'}{extra}")
    if r_true is not None:
        noise, seeds = verdict_batch(model.space_shape, args.batch_size, args.seed, "cpu")
        ctx = Context(model=model, sampler=sampler, noise=noise, noise_seeds=seeds,
                      seed=args.seed, detect=detect, encoder=enc)
        spec = bbti.BBTISpec(range_loss=True)
        print(f"zero-trigger L2 to the true trigger: {float(r_true.norm()):.1f}")
        print("gradient alignment at r = c*r_true + 0.1*N(0, 1): cos(-dl/dr, r_true - r), and "
              "cos(black-box variant, exact)")
        for c in (0.0, 0.3, 0.6):
            a = gradient_alignment(ctx, r_true, spec, c, args.seed)
            print(f"  c = {c:.1f}: whitebox {a['whitebox']:+.3f}, blackbox {a['blackbox']:+.3f} "
                  f"(vs exact {a['blackbox_vs_exact']:+.3f}), blackbox_partial "
                  f"{a['blackbox_partial']:+.3f} (vs exact {a['blackbox_partial_vs_exact']:+.3f})")


if __name__ == "__main__":
    main()
