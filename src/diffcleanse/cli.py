"""The ``diffcleanse`` command: version, patterns, and ``scan`` (stage 1 on one model)."""

from __future__ import annotations

import argparse
import sys

from diffcleanse import __version__


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (subcommands register themselves here)."""
    p = argparse.ArgumentParser(prog="diffcleanse",
                                description="Find and remove backdoors in diffusion models.")
    p.add_argument("--version", action="version", version=f"diffcleanse {__version__}")
    sub = p.add_subparsers(dest="command")
    pat = sub.add_parser("patterns", help="render a trigger or target to a PNG")
    pat.add_argument("name", help="trigger (box_14, stop_8, ...) or target (hat, shift, ...)")
    pat.add_argument("--size", type=int, default=32)
    pat.add_argument("--trigger", help="the trigger, for the targets 'trigger' and 'shift'")
    pat.add_argument("-o", "--out", required=True)
    scan = sub.add_parser(
        "scan", help="invert a trigger and decide whether one model is backdoored",
        description="Run BBTI trigger inversion and MSCR detection on one model (a local diffusers "
                    "directory or a hub id). Exit status: 0 clean, 1 backdoored, 2 error.")
    scan.add_argument("model", help="local model directory, or hub id (hub:<repo>[@rev])")
    scan.add_argument("--out", default=None,
                      help="output directory (default: scan-<model name>)")
    scan.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm",
                      help="backdoor sampler (paper: ddpm for BadDiffusion, ddim otherwise)")
    scan.add_argument("--steps", type=int, default=None,
                      help="sampler steps (default: every training timestep)")
    scan.add_argument("--encoder", default="pixels",
                      help="pixels (default: needs no weights), classifier:<dir> (a classifier of "
                           "the model's data, made by the workflow's train_classifier), or "
                           "clip:<hub tag or local weights file>")
    scan.add_argument("--clip-model", default="ViT-B-32", help="open_clip architecture for clip")
    scan.add_argument("--gradient", choices=["blackbox", "whitebox"], default=None,
                      help="trigger gradient (default: blackbox, the paper's Eq. 1 gradient; "
                           "whitebox: exact, what the default zoo's config uses)")
    scan.add_argument("--whitebox-steps", type=int, default=None,
                      help="sampler steps the white-box gradient differentiates (default: all)")
    scan.add_argument("--init-scale", type=float, default=None,
                      help="the trigger starts as SCALE x N(0, 1) (default 1, the paper's)")
    scan.add_argument("--range-loss", action="store_true",
                      help="add the range loss (not in the paper; README)")
    scan.add_argument("--batch-size", type=int, default=None)
    scan.add_argument("--max-iters", type=int, default=None)
    scan.add_argument("--restarts", type=int, default=None,
                      help="independent starts sharing --max-iters (default 1, the paper's)")
    scan.add_argument("--config", default=None, metavar="YAML",
                      help="take the inversion: and detection: settings of a workflow config "
                           "(e.g. config.yaml) instead of the paper's; the flags above override")
    scan.add_argument("--target-kind", choices=["image", "class"], default="image",
                      help="image: κ = 0.9; class: κ = 0.75 (class-target attacks)")
    scan.add_argument("--no-entropy-loss", action="store_true", help="ℓ_s alone (ablation)")
    scan.add_argument("--seed", type=int, default=0)
    scan.add_argument("--allow-pickle", action="store_true",
                      help="accept pickle-only checkpoints (runs code from the file: trust it)")
    scan.add_argument("--image-size", type=int, default=None,
                      help="refuse the model unless its sample size is this")
    scan.add_argument("--device", default="auto", help="auto, cpu or cuda")
    scan.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    rep = scan.add_argument_group(
        "repair (stage 2)", "With --repair, a flagged model is pruned and fine-tuned with the "
        "inverted trigger (Diff-Cleanse) and written to OUT; defaults are the paper's.")
    rep.add_argument("--repair", metavar="OUT", default=None,
                     help="write the repaired model here when the model is flagged")
    rep.add_argument("--repair-strategy", choices=["diffcleanse", "diffpruning"],
                     default="diffcleanse")
    rep.add_argument("--repair-ratio", type=float, default=0.02,
                     help="share of every layer's channels to remove (paper: 0.01-0.02)")
    rep.add_argument("--repair-loss", choices=["p", "c"], default="p",
                     help="p: loss_c + loss_b (paper), c: loss_c alone")
    rep.add_argument("--repair-samples", type=int, default=6000,
                     help="clean images sampled from the model for fine-tuning (paper: 6000)")
    rep.add_argument("--repair-epochs", type=float, default=40.0)
    rep.add_argument("--repair-lr", type=float, default=2e-4)
    rep.add_argument("--repair-batch-size", type=int, default=128)
    return p


def _patterns(args: argparse.Namespace) -> int:
    import torch

    from diffcleanse import patterns, reporting

    if args.name in patterns.TRIGGERS or args.name.startswith("file:"):
        r = patterns.render_trigger(args.name, args.size)
        img = patterns.stamp(torch.full_like(r, -1), r)
    else:
        img = patterns.render_target(args.name, args.size, args.trigger)
    reporting.image_rows([(args.name, img[None])], f"{args.name} at {args.size} px", args.out)
    return 0


def _scan(args: argparse.Namespace) -> int:
    """``diffcleanse scan``: 0 clean, 1 backdoored, 2 error (printed; nothing written)."""
    import logging
    import os
    from pathlib import Path

    from diffcleanse import inversion

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    overrides = {k: v for k, v in {"gradient": args.gradient, "batch_size": args.batch_size,
                                   "max_iters": args.max_iters, "steps": args.steps,
                                   "whitebox_steps": args.whitebox_steps,
                                   "init_scale": args.init_scale,
                                   "restarts": args.restarts}.items()
                 if v is not None}
    if args.no_entropy_loss:
        overrides["entropy_loss"] = False
    if args.range_loss:
        overrides["range_loss"] = True
    out = Path(args.out) if args.out else Path(f"scan-{Path(args.model.rstrip('/')).name}")
    try:
        rec = inversion.scan_model(args.model, out, sampler=args.sampler, encoder=args.encoder,
                              clip_model=args.clip_model, target_kind=args.target_kind,
                              seed=args.seed, allow_pickle=args.allow_pickle,
                              image_size=args.image_size, device=args.device,
                              threads=args.threads, inversion_overrides=overrides,
                              config=inversion.load_scan_config(args.config)
                              if args.config else None)
    except Exception as err:  # every failure becomes exit status 2 with its message
        print(f"diffcleanse scan: error: {err}", file=sys.stderr)
        return 2
    print(inversion.scan_summary(rec, out))
    if args.repair and rec["backdoored"]:
        return _repair(args, out)
    if args.repair:
        print(f"  not flagged: nothing repaired ({args.repair} not written)")
    return 1 if rec["backdoored"] else 0


def _repair(args: argparse.Namespace, scan_out) -> int:
    """``scan --repair OUT``: prune and fine-tune a flagged model; 1 when done, 2 on error."""
    from pathlib import Path

    from diffcleanse import models, sampling
    from diffcleanse.removal import FinetuneConfig, stages

    try:
        model_dir = models.fetch(args.model, allow_pickle=args.allow_pickle)
        trigger = stages.load_trigger(Path(scan_out) / "trigger.safetensors")
        cfg = FinetuneConfig(epochs=args.repair_epochs, lr=args.repair_lr,
                             batch_size=args.repair_batch_size)
        rec = stages.repair_model(model_dir, trigger, Path(args.repair),
                                  strategy=args.repair_strategy, ratio=args.repair_ratio,
                                  loss=args.repair_loss, n_synthetic=args.repair_samples,
                                  sampler=args.sampler, finetune=cfg, seed=args.seed,
                                  device=str(sampling.resolve_device(args.device)))
    except Exception as err:  # every failure becomes exit status 2 with its message
        print(f"diffcleanse scan --repair: error: {err}", file=sys.stderr)
        return 2
    if rec:
        print(f"  repaired: {rec['prune']['out_channels']['fraction_removed']:.1%} of the "
              f"channels removed, {rec['finetune_steps']} fine-tuning steps -> {args.repair}")
    return 1


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "patterns":
        return _patterns(args)
    if args.command == "scan":
        return _scan(args)
    build_parser().print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
