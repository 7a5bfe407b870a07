"""Why a TERD refinement iteration costs about ten trigger-estimation iterations.

TERD's stage 1 (``inversion.terd.reversed_loss``) is two UNet forwards and their backward to the
trigger. Stage 2 first generates x̂_0 from ε + μ with a differentiable 10-step DDIM chain, then
takes two such losses (at t near T with the trigger, near 0 without). This script times, in one
run and on one model, a plain batched forward and each part at TERD's batch, and prints each as
a multiple of the plain forward, with the stage-2/stage-1 ratio the parts predict beside the one
measured: with and without ``checkpoint`` (recomputing each UNet call of the chain in the
backward, which the official code does not do).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/terd_stages.py             # default zoo's UNet
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/terd_stages.py --channels 32 64

Random weights (the cost does not depend on them). Not a test: compare within one run.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from diffcleanse import models, samplers
from diffcleanse.inversion.terd import TERDSpec, reversed_loss


def best_of(fn: Callable[[], object], reps: int) -> float:
    """The fastest of ``reps`` calls of ``fn`` (after one warm-up), in seconds."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    """Print the parts of a TERD iteration as multiples of a plain forward."""
    root = Path(__file__).resolve().parents[1]
    unet_cfg = yaml.safe_load((root / "config.yaml").read_text())["models"]["unet"]
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--channels", type=int, nargs="+", default=unet_cfg["block_out_channels"])
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--timesteps", type=int, default=100)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    spec = TERDSpec()
    b, steps = spec.batch, spec.refine_steps
    unet = models.build_unet(a.size, a.channels, unet_cfg["layers_per_block"],
                             unet_cfg["attention"], unet_cfg["norm_num_groups"],
                             unet_cfg["attention_head_dim"]).eval().requires_grad_(False)
    sched = models.build_scheduler(a.timesteps)
    cfg, abar, T = dict(sched.config), sched.alphas_cumprod.float(), a.timesteps
    shape = (b, 3, a.size, a.size)
    g = torch.Generator().manual_seed(0)
    mu = torch.zeros(shape[1:]).requires_grad_(True)
    ddim = samplers.SamplerSpec("ddim", steps=steps)

    def t_hi() -> torch.Tensor:
        return torch.randint(T - spec.window, T, (b,), generator=g)

    def forward() -> None:
        with torch.no_grad():
            unet(torch.randn(shape, generator=g), t_hi())

    def stage1() -> None:
        reversed_loss(unet, abar, torch.randn(shape, generator=g), mu, t_hi(), True, g).backward()

    def chain(checkpoint: bool) -> Callable[[], None]:
        def run() -> None:
            x0 = samplers.denoise(unet, cfg, torch.randn(shape, generator=g) + mu, ddim,
                                  grad=True, checkpoint=checkpoint)
            x0.sum().backward()
        return run

    def stage2(checkpoint: bool) -> Callable[[], None]:
        def run() -> None:
            x0 = samplers.denoise(unet, cfg, torch.randn(shape, generator=g) + mu, ddim,
                                  grad=True, checkpoint=checkpoint)
            t_lo = torch.randint(0, spec.window, (b,), generator=g)
            loss = 0.5 * (reversed_loss(unet, abar, x0, mu, t_hi(), True, g)
                          + reversed_loss(unet, abar, x0, mu, t_lo, False, g))
            loss.backward()
        return run

    f = best_of(forward, a.reps)
    s1 = best_of(stage1, a.reps)
    rows = [("plain forward", f), ("stage 1 iteration (2 forwards + backward)", s1)]
    print(f"UNet {tuple(a.channels)}, {a.size} px, batch {b}, {steps}-step DDIM chain, "
          f"{a.threads} thread(s); best of {a.reps}")
    for ck in (False, True):
        c = best_of(chain(ck), a.reps)
        s2 = best_of(stage2(ck), a.reps)
        tag = "checkpointed" if ck else "graph kept (official)"
        rows += [(f"chain forward+backward, {tag}", c), (f"stage 2 iteration, {tag}", s2)]
        print(f"  {tag}: stage 2 / stage 1 = {s2 / s1:.1f} measured; parts predict "
              f"(chain + 2 x stage 1) / stage 1 = {(c + 2 * s1) / s1:.1f}")
    for name, sec in rows:
        print(f"  {name:48s} {sec * 1e3:8.1f} ms  {sec / f:6.1f} x forward")


if __name__ == "__main__":
    main()
