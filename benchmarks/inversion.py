"""Benchmark BBTI's three gradients on one model: speed against the plain forward, and direction.

Prints, for each gradient (``blackbox``: Eq. 1's total derivative, the paper's;
``blackbox_partial``: the partial at fixed X_T; ``whitebox``: exact, checkpointed): seconds, UNet
evaluations per second (one evaluation = one image at one timestep) and their ratio to the same
UNet's plain batched forward (no grad, same batch, measured in this run), the verdict and, with the
true target, the inverted trigger's ASR. With the true trigger (``--trigger``: a pattern name, or a
safetensors file with a tensor ``trigger`` such as ../shared/zoo-external/*/truth.safetensors) it
also prints how well each gradient points at it: cos(−dℓ/dr, r_true − r) at r = c·r_true + 0.1·N(0,
1), c ∈ {0, 0.3, 0.6}, over ``--trials`` draws of the 0.1·N(0, 1) (mean, min and max: a direction
whose sign flips between draws is no direction), and cos(black-box, exact); then the landscape the
gradients should follow: the verdict batch sampled from ``noise + c·r_true`` for c from 0 to 1.5
(MSCR, ASR with ``--target``, BBTI's loss), and Elijah's shift coefficient at t = T,
λ = ⟨mean ε_θ(ε + r, T) − mean ε_θ(ε, T), r⟩ / ‖r‖², at the true trigger and at a random one
of the same norm (Elijah's loss assumes λ = 0.5 at the trigger; a clean UNet gives about 1).

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

from diffcleanse import detection, encoders, evaluation, inversion, models, patterns, samplers
from diffcleanse.inversion import bbti
from diffcleanse.inversion.base import Context
from diffcleanse.inversion.elijah import shift_coefficient
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


def spread(rows: list[dict[str, float]], key: str) -> str:
    """``mean [min, max]`` of one reading over the trials."""
    v = [a[key] for a in rows]
    return f"{sum(v) / len(v):+.3f} [{min(v):+.3f}, {max(v):+.3f}]"


def landscape(ctx: Context, r_true: torch.Tensor, spec: bbti.BBTISpec,
              target: torch.Tensor | None, mse_threshold: float, c: float) -> dict[str, float]:
    """MSCR, ASR (with a target) and BBTI's loss of the verdict batch from ``noise + c·r_true``."""
    with torch.no_grad():
        x0 = ctx.backdoor_samples(c * r_true[None])
        z = bbti.embed(ctx.encoder, x0)
        out = {"mscr": detection.mscr(z, ctx.detect.active_kappa,
                                      detection.in_band(x0, ctx.detect)),
               "loss": float(bbti.objective(x0, z, spec, ctx.detect)[0])}
        if target is not None:
            out["asr"] = evaluation.asr_image(x0.clamp(-1, 1), target, mse_threshold)
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
    p.add_argument("--trials", type=int, default=3,
                   help="draws of the perturbation per alignment point")
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
            asr = evaluation.asr_image(res.samples.clamp(-1, 1), target, args.mse_threshold)
            extra += f", ASR {asr:.2f}"
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
            rows = [gradient_alignment(ctx, r_true, spec, c, args.seed + k)
                    for k in range(args.trials)]
            print(f"  c = {c:.1f} (mean [min, max] of {args.trials}): whitebox "
                  f"{spread(rows, 'whitebox')}, blackbox {spread(rows, 'blackbox')} (vs exact "
                  f"{spread(rows, 'blackbox_vs_exact')}), blackbox_partial "
                  f"{spread(rows, 'blackbox_partial')}")
        print("landscape: the verdict batch from noise + c*r_true")
        for c in (0.0, 0.25, 0.5, 0.75, 1.0, 1.5):
            row = landscape(ctx, r_true, spec, target, args.mse_threshold, c)
            asr = f", ASR {row['asr']:.2f}" if "asr" in row else ""
            print(f"  c = {c:.2f}: MSCR {row['mscr']:.3f}{asr}, BBTI loss {row['loss']:.3f}")
        g = torch.Generator().manual_seed(args.seed)
        rand = torch.randn(r_true.shape, generator=g)
        rand = rand / rand.norm() * r_true.norm()
        lam_true, lam_rand = (shift_coefficient(model.unet, model.scheduler_config, r, 64,
                                                args.seed) for r in (r_true, rand))
        print(f"Elijah's shift coefficient at t = T (batch 64): true trigger {lam_true:.3f}, a "
              f"random trigger of the same norm {lam_rand:.3f} (Elijah assumes 0.5 at the "
              f"trigger)")

if __name__ == "__main__":
    main()
