"""What MSCR can detect at all: the true trigger under the defender's protocol.

A defender samples ``noise + r`` with the model's sampler (never clipping) on the workflow's verdict
batch and flags the model when MSCR >= κ_d. This prints, per model and seed index, MSCR and the
ASR of that very batch with r = 0 (clean noise) and with r = the true trigger (the trigger a
perfect inversion would find, in the model's own space: ``detection._true_pattern``). A backdoor
whose own trigger stays below κ_d under this protocol cannot be flagged by an MSCR rule, however
good the search; one far above it can. The verdict batch is the one ``invert_trigger`` uses for
the same (config seed, model id, seed index), so the numbers sit beside the detection table's.

Two more readings of how wide the way in is: ``--coarse G ...`` adds the MSCR of the true
trigger averaged over G × G cells per channel (what a coarse search can represent), and
``--random N`` the share of N random coarse triggers of BBTI's exploration pool (grids 1, 2, 4;
grey and rgb in turn; U(−1, 1)) that reach κ_d on the batch (``inversion.bbti.explore_candidates``,
seeded by the seed index): a model many random shifts flag answers a wide trigger space, a clean
model none. ``--shift`` adds Elijah's premise, the first-step shift coefficient λ (the batch mean
of ε_θ(ε + r, T) − ε_θ(ε, T) projected on r, over 100 noise draws;
``inversion.elijah.shift_coefficient``) at the true trigger, at its 1 × 1 average and at a
white-noise direction of the same norm. ``--probe FILE`` gives clean models a trigger to read (a
``truth.safetensors``), so that their λ and MSCR at someone else's trigger sit beside the
backdoored models'.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/detectability.py --results results \
        --encoder classifier:results/classifiers/digits_16 --seeds 0 1 2 3 4 \
        [--model bd-box-hat ...] [--external ../shared/zoo-external/ext-bd-box-corner ...] \
        [--coarse 1 2] [--random 24] [--sampler ddpm ddim]

External models (``--external``) carry their truth in ``truth.safetensors`` (trigger and target
in the attack code's own convention) and are sampled with DDPM. Prints a markdown table. Not a
test: the encoder and the batch decide the numbers.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch


def coarse(r: torch.Tensor, cells: int) -> torch.Tensor:
    """``r`` (C, H, W) averaged over ``cells`` × ``cells`` blocks per channel, spread back."""
    f = torch.nn.functional
    return f.interpolate(f.adaptive_avg_pool2d(r[None], cells), size=r.shape[-2:],
                         mode="nearest")[0]


def rows_for(model, model_id: str, sampler, trigger: torch.Tensor | None,
             target: torch.Tensor | None, encoder, detect, seeds: list[int], batch: int,
             base_seed: int, mse: float, grids: list[int], n_random: int, shift: bool = False
             ) -> list[dict[str, object]]:
    """MSCR and ASR of the verdict batch from ``noise`` plus no trigger, the true one and its
    coarse averages; the share of random coarse triggers that flag; per seed index."""
    from diffcleanse import detection, samplers
    from diffcleanse.inversion import bbti
    from diffcleanse.inversion.run import seeds_for, verdict_batch

    def sample(noise: torch.Tensor, step_seeds: list[int], r: torch.Tensor | None
               ) -> tuple[float, torch.Tensor]:
        x_T = noise if r is None else noise + r.to(noise.device)
        with torch.no_grad():
            x = model.decode(samplers.denoise(model.unet, model.scheduler_config, x_T, sampler,
                                              seeds=step_seeds))
            z = encoder(x.clamp(-1, 1))
        return detection.mscr(z, detect.active_kappa, detection.in_band(x, detect)), x

    out = []
    for s in seeds:
        noise, step_seeds = verdict_batch(model.space_shape, batch,
                                          seeds_for(base_seed, model_id, "bbti", s)[
                                              "verdict_noise"], model.device)
        row: dict[str, object] = {"model": model_id, "seed": s, "sampler": sampler.name}
        cands = [("zero", None)]
        if trigger is not None:
            cands += [("true", trigger)] + [(f"true@{g}", coarse(trigger, g)) for g in grids]
        for label, r in cands:
            row[f"mscr_{label}"], x = sample(noise, step_seeds, r)
            if target is not None and label in ("zero", "true"):
                hit = ((x.clamp(-1, 1) - target.to(x.device)) ** 2).mean(dim=(1, 2, 3)) < mse
                row[f"asr_{label}"] = float(hit.float().mean())
        if shift and trigger is not None and s == seeds[0]:
            from diffcleanse.inversion.elijah import shift_coefficient

            w = torch.randn(trigger.shape, generator=torch.Generator().manual_seed(s))
            for label, r in (("true", trigger), ("true@1", coarse(trigger, 1)),
                             ("noise", w * trigger.norm() / w.norm())):
                row[f"lambda_{label}"] = shift_coefficient(model.unet, model.scheduler_config,
                                                           r.to(model.device), 100, s)
        if n_random:
            spec = bbti.BBTISpec(explore=n_random + 1)
            pool, _ = bbti.explore_candidates(spec, torch.zeros((1, *model.space_shape)),
                                              torch.Generator().manual_seed(s))
            flags = [sample(noise, step_seeds, r)[0] >= detect.kappa_d for r in pool[1:]]
            row["random_flagging"] = sum(flags) / len(flags)
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default="results", help="a workflow run's results folder")
    ap.add_argument("--model", nargs="*", default=None,
                    help="model ids of that run (default: every model with a card)")
    ap.add_argument("--external", nargs="*", default=[],
                    help="model dirs with truth.safetensors (e.g. ../shared/zoo-external/*)")
    ap.add_argument("--encoder", default="pixels")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0, help="the config's base seed")
    ap.add_argument("--kappa-d", type=float, default=0.5)
    ap.add_argument("--mse", type=float, default=0.01)
    ap.add_argument("--coarse", type=int, nargs="*", default=[],
                    help="also the true trigger averaged over G x G cells, for each G")
    ap.add_argument("--random", type=int, default=0,
                    help="also the share of N random coarse triggers that reach kappa_d")
    ap.add_argument("--shift", action="store_true",
                    help="also Elijah's shift coefficient at the true trigger (module doc)")
    ap.add_argument("--probe", default=None, metavar="FILE",
                    help="a truth.safetensors whose trigger clean models are read at")
    ap.add_argument("--sampler", nargs="*", default=None, metavar="NAME",
                    help="sample with these samplers (a row each) instead of each model's own, "
                         "e.g. ddpm ddim (the paper inverts VillanDiffusion, TrojDiff with DDIM)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)

    from safetensors.torch import load_file

    from diffcleanse import detection, encoders, models, samplers
    from diffcleanse.records import read_json

    enc = encoders.make_encoder(args.encoder)
    detect = detection.DetectionSpec(kappa_d=args.kappa_d)
    results = Path(args.results)
    probe = load_file(args.probe)["trigger"].float() if args.probe else None
    todo = []
    ids = args.model if args.model is not None else sorted(
        p.parent.name for p in (results / "models").glob("*/card.json"))
    for mid in ids:
        card = read_json(results / "models" / mid / "card.json")
        mdir = results / "models" / mid / "model"
        trig = tgt = None
        if card["ground_truth"]["backdoored"]:
            trig, tgt = detection._true_pattern(card, mdir)
        elif probe is not None:
            trig = probe
        todo.append((mid, mdir, samplers.SamplerSpec(card["manifest_row"]["sampler"]), trig, tgt))
    for d in map(Path, args.external):
        f = d / "truth.safetensors"
        t = load_file(str(f)) if f.is_file() else {}
        todo.append((d.name, d, samplers.SamplerSpec("ddpm"),
                     t["trigger"].float() if t else probe, t["target"].float() if t else None))
    extra = [f"MSCR, true @ {g}x{g}" for g in args.coarse] + (
        [f"random coarse triggers flagging (of {args.random})"] if args.random else []) + (
        ["λ true", "λ true @ 1x1", "λ white noise"] if args.shift else [])
    print("| model | seed | sampler | MSCR, zero trigger | MSCR, true trigger | ASR, zero | "
          "ASR, true | detectable (true MSCR >= κ_d) | " + " | ".join(extra) + " |")
    print("|---" * (8 + len(extra)) + "|")
    rows = ((model, mid, s, trig, tgt) for mid, mdir, own, trig, tgt in todo
            for model in [models.load_pipeline(mdir)]
            for s in ([samplers.SamplerSpec(n) for n in args.sampler] if args.sampler else [own]))
    for model, mid, sampler, trig, tgt in rows:
        for r in rows_for(model, mid, sampler, trig, tgt, enc, detect, args.seeds,
                          args.batch_size, args.seed, args.mse, args.coarse, args.random,
                          args.shift):
            def f(k: str, r: dict[str, object] = r) -> str:
                return f"{r[k]:.2f}" if k in r else "—"
            det = "—" if "mscr_true" not in r else (
                "yes" if r["mscr_true"] >= args.kappa_d else "no")
            cols = [f(f"mscr_true@{g}") for g in args.coarse] + (
                [f("random_flagging")] if args.random else []) + (
                [f(f"lambda_{k}") for k in ("true", "true@1", "noise")] if args.shift else [])
            print(f"| {mid} | {r['seed']} | {r['sampler']} | {f('mscr_zero')} | "
                  f"{f('mscr_true')} | {f('asr_zero')} | {f('asr_true')} | {det} | "
                  + " | ".join(cols) + " |", flush=True)


if __name__ == "__main__":
    main()
