"""What a wider default-zoo UNet costs: a training step and a batched forward of candidate
architectures, as ratios to the default's (config.yaml ``models.unet``), measured in one run.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/architectures.py
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/architectures.py --candidates 32,32 32,64

Random weights, 16 px, one thread; a training step is Adam on batch 32, a forward is batch 128
without grad (the evaluations' batch). Not a test: compare within one run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml

from diffcleanse.models import build_unet


def timing(channels: tuple[int, ...], cfg: dict, reps: int) -> tuple[int, float, float]:
    """Parameters, seconds per training step (batch 32) and per forward (batch 128)."""
    torch.manual_seed(0)
    m = build_unet(16, channels, cfg["layers_per_block"], cfg["attention"],
                   cfg["norm_num_groups"], cfg["attention_head_dim"])
    opt = torch.optim.Adam(m.parameters())
    x, t = torch.randn(32, 3, 16, 16), torch.randint(0, 100, (32,))
    xf, tf = torch.randn(128, 3, 16, 16), torch.randint(0, 100, (128,))

    def step() -> None:
        opt.zero_grad()
        m(x, t).sample.square().mean().backward()
        opt.step()

    def forward() -> None:
        with torch.no_grad():
            m(xf, tf)

    out = []
    for fn in (step, forward):
        fn()
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        out.append(best)
    return sum(p.numel() for p in m.parameters()), out[0], out[1]


def main() -> None:
    """Print each candidate's cost beside the default architecture's."""
    root = Path(__file__).resolve().parents[1]
    cfg = yaml.safe_load((root / "config.yaml").read_text())["models"]["unet"]
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--candidates", nargs="+", default=["32,32", "32,64"],
                    help="block_out_channels to compare, comma-separated")
    ap.add_argument("--reps", type=int, default=10)
    a = ap.parse_args()
    torch.set_num_threads(1)
    base = tuple(cfg["block_out_channels"])
    archs = [base, *(tuple(int(c) for c in s.split(",")) for s in a.candidates)]
    rows = [(ch, *timing(ch, cfg, a.reps)) for ch in archs]
    _, _, s0, f0 = rows[0]
    print(f"GroupNorm groups: {cfg['norm_num_groups']}; best of {a.reps}; one thread")
    print("| block_out_channels | channels per group (first level) | parameters | train step | "
          "x default | forward (128) | x default |")
    print("|---|---|---|---|---|---|---|")
    for ch, n, s, f in rows:
        print(f"| {ch} | {ch[0] // cfg['norm_num_groups']} | {n:,} | {s * 1e3:.0f} ms | "
              f"{s / s0:.2f} | {f * 1e3:.0f} ms | {f / f0:.2f} |")


if __name__ == "__main__":
    main()
