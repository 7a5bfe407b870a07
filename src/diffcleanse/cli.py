"""The ``diffcleanse`` command: version, patterns, ``scan`` (stage 1 on one model, optionally
repairing it) and ``repair`` (stage 2 with a trigger you have)."""

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
        "scan", help="invert triggers and decide whether one model is backdoored",
        description="Trigger inversion and MSCR detection on one model (a local diffusers "
                    "directory or a hub id) with one, several or all inversion methods. Exit "
                    "status: 0 clean, 1 backdoored, 2 error (message printed, nothing written).")
    scan.add_argument("model", help="local model directory, or hub id (hub:<repo>[@rev])")
    scan.add_argument("--out", default=None,
                      help="output directory (default: scan-<model name>)")
    scan.add_argument("--method", action="append", default=None, metavar="NAME",
                      help="inversion method: bbti (default), elijah, purediffusion, terd, or all; "
                           "repeat or comma-separate for several (flagged when any method's "
                           "trigger reaches κ_d)")
    _sampling_args(scan)
    scan.add_argument("--encoder", default=None,
                      help="pixels (default: needs no weights), classifier:<dir> (a classifier of "
                           "the model's data, made by the workflow's train_classifier), or "
                           "clip:<hub tag or local weights file>; with --config, the config's "
                           "detection.encoder")
    scan.add_argument("--clip-model", default=None, help="open_clip architecture for clip")
    scan.add_argument("--batch-size", type=int, default=None,
                      help="the verdict batch (default: the paper's 100/50/20 by image size, "
                           "16 for other sizes; or the config's inversion.batch_size)")
    bb = scan.add_argument_group("BBTI (inversion.bbti.*)",
                                 "Defaults: the paper's protocol, after --explore 24.")
    bb.add_argument("--gradient", choices=["blackbox", "blackbox_partial", "whitebox",
                                           "zeroth_order"],
                    default=None, help="trigger gradient (default blackbox: Eq. 1's total "
                    "derivative, the paper's; whitebox: exact; zeroth_order: a coarse-to-fine "
                    "antithetic search without sampler derivatives; docs/detection.md)")
    bb.add_argument("--whitebox-steps", type=int, default=None,
                    help="sampler steps the white-box gradient differentiates (default: all)")
    bb.add_argument("--init-scale", type=float, default=None,
                    help="the trigger starts as SCALE x N(0, 1) (default 1, the paper's)")
    bb.add_argument("--range-loss", action="store_true",
                    help="add the range loss (not in the paper; README)")
    bb.add_argument("--max-iters", type=int, default=None)
    bb.add_argument("--restarts", type=int, default=None,
                    help="independent starts sharing --max-iters, run side by side (default 1)")
    bb.add_argument("--explore", type=int, default=None, metavar="N",
                    help="sample N coarse random triggers (grids of 1, 2, 4 cells, values "
                         "U(-1, 1)) before the first step and start from the best; one that "
                         "reaches kappa_d flags at once (default 24, or the --config's; 0: "
                         "the paper's Algorithm 1 alone; docs/detection.md)")
    bb.add_argument("--explore-patches", type=int, nargs="*", default=None, metavar="G",
                    help="after the random triggers, try one cell of each G x G grid at a time "
                         "at ±0.25 and ±0.5 (default 2, or the --config's; none given: no "
                         "patches; they run only with --explore > 0; docs/detection.md)")
    bb.add_argument("--no-entropy-loss", action="store_true", help="ℓ_s alone (ablation)")
    scan.add_argument("--config", default=None, metavar="YAML",
                      help="take the inversion: and detection: settings of a workflow config "
                           "(e.g. config.yaml; methods, batch, each method's settings, κ's, "
                           "encoder) instead of the paper's; the options above override")
    scan.add_argument("--target-kind", choices=["image", "class"], default="image",
                      help="image: κ = 0.9; class: κ = 0.75 (class-target attacks)")
    scan.add_argument("--seed", type=int, default=0)
    scan.add_argument("--allow-pickle", action="store_true",
                      help="accept pickle-only checkpoints (runs code from the file: trust it)")
    scan.add_argument("--image-size", type=int, default=None,
                      help="refuse the model unless its sample size is this")
    scan.add_argument("--device", default="auto", help="auto, cpu or cuda")
    scan.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="fp32",
                      help="of the UNet evaluations: fp32, tf32 (CUDA tensor cores) or bf16 "
                           "autocast (docs/cluster.md, Precision)")
    scan.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    scan.add_argument("--verbose", "-v", action="store_true",
                      help="print every iteration of every method (default: a progress bar)")
    rep = scan.add_argument_group(
        "repair (stage 2)", "With --repair, a flagged model is pruned and fine-tuned with the "
        "chosen inverted trigger (Diff-Cleanse) and written to OUT; defaults are the paper's.")
    rep.add_argument("--repair", metavar="OUT", default=None,
                     help="write the repaired model here when the model is flagged")
    _repair_args(rep, prefix="repair-")
    fix = sub.add_parser(
        "repair", help="prune and fine-tune a model with a given trigger (stage 2 alone)",
        description="Repair a model with a trigger you already have (e.g. a scan's "
                    "trigger.safetensors): importance, pruning, fine-tuning on clean samples of "
                    "the model itself. Exit status 0 done, 2 error.")
    fix.add_argument("model", help="local model directory, or hub id")
    fix.add_argument("--trigger", required=True, metavar="FILE",
                     help="a trigger file (safetensors with tensor `trigger`, additive offset)")
    fix.add_argument("--out", required=True, metavar="OUT", help="where the repaired model goes")
    _sampling_args(fix)
    _repair_args(fix, prefix="")
    fix.add_argument("--seed", type=int, default=0)
    fix.add_argument("--allow-pickle", action="store_true")
    fix.add_argument("--device", default="auto")
    fix.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="fp32")
    fix.add_argument("--threads", type=int, default=None)
    return p


def _sampling_args(p) -> None:
    from diffcleanse.samplers import SAMPLERS

    p.add_argument("--sampler", choices=list(SAMPLERS), default=None,
                   help="the backdoor sampler (paper: ddpm for BadDiffusion, ddim otherwise; "
                        "default: --config's inversion.sampler, else ddpm)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampler steps (default: every training timestep); also the steps of "
                        "the synthetic clean data a repair samples")


def _repair_args(p, prefix: str) -> None:
    from diffcleanse.removal.methods import METHODS

    p.add_argument(f"--{prefix}strategy", choices=list(METHODS), default="diffcleanse",
                   help="removal method (diffcleanse: the paper's; diffpruning, random: pruning "
                        "baselines; elijah: Elijah's fine-tuning, no pruning)")
    p.add_argument(f"--{prefix}ratio", type=float, default=0.02,
                   help="share of every layer's channels to remove (paper: 0.01-0.02)")
    p.add_argument(f"--{prefix}loss", choices=["p", "c"], default="p",
                   help="p: loss_c + loss_b (paper), c: loss_c alone")
    p.add_argument(f"--{prefix}samples", type=int, default=6000,
                   help="clean images sampled from the model for fine-tuning (paper: 6000)")
    p.add_argument(f"--{prefix}epochs", type=float, default=40.0)
    p.add_argument(f"--{prefix}lr", type=float, default=2e-4)
    p.add_argument(f"--{prefix}batch-size", type=int, default=128)


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


def _methods(values: list[str] | None) -> list[str] | None:
    from diffcleanse.inversion import METHODS

    if not values:
        return None
    from diffcleanse.inversion import get_method

    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    if "all" in names:
        return list(METHODS)
    for n in names:
        get_method(n)  # an unknown name is an error naming the registered ones
    return names


def _scan(args: argparse.Namespace, started: float) -> int:
    """``diffcleanse scan``: 0 clean, 1 backdoored, 2 error (printed; nothing written)."""
    import logging
    import os
    from pathlib import Path

    from diffcleanse import scan
    from diffcleanse.oom import lower_on_oom

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    bbti = {k: v for k, v in {"gradient": args.gradient, "max_iters": args.max_iters,
                              "whitebox_steps": args.whitebox_steps,
                              "init_scale": args.init_scale, "restarts": args.restarts,
                              "explore": args.explore,
                              "explore_patches": args.explore_patches}.items()
            if v is not None}
    if args.no_entropy_loss:
        bbti["entropy_loss"] = False
    if args.range_loss:
        bbti["range_loss"] = True
    out = Path(args.out) if args.out else Path(f"scan-{scan.scan_model_id(args.model)}")
    try:
        config = scan.load_scan_config(args.config) if args.config else None
        methods = _methods(args.method)
        if bbti and "bbti" not in (methods or (config or {}).get("inversion", {}).get(
                "methods") or ["bbti"]):
            raise scan.ScanError("BBTI options (--gradient, --max-iters, ...) were given but bbti "
                                 "is not among the methods (--method)")
        if args.clip_model and config is not None:
            config["detection"]["clip_model"] = args.clip_model
        with lower_on_oom("--batch-size", stage="the scan", where="on the command line"):
            rec = scan.scan_model(args.model, out, methods=methods, sampler=args.sampler,
                                  steps=args.steps, encoder=args.encoder,
                                  target_kind=args.target_kind, seed=args.seed,
                                  allow_pickle=args.allow_pickle, image_size=args.image_size,
                                  device=args.device, threads=args.threads,
                                  batch_size=args.batch_size, method_overrides={"bbti": bbti},
                                  config=config, verbose=args.verbose, started=started)
    except KeyboardInterrupt:
        print(f"diffcleanse scan: interrupted; rerun the same command to resume "
              f"({scan.state_dir_for(out)})", file=sys.stderr)
        return 2
    except Exception as err:  # every failure becomes exit status 2 with its message
        print(f"diffcleanse scan: error: {err}", file=sys.stderr)
        return 2
    print(scan.scan_summary(rec, out))
    if args.repair and rec["backdoored"]:
        args.sampler = args.sampler or rec["sampler"]["name"]  # repair samples as the scan did
        status = _do_repair(args, out / "trigger.safetensors", Path(args.repair), "repair_",
                            "diffcleanse scan --repair")
        return 1 if status == 0 else status
    if args.repair:
        print(f"  not flagged: nothing repaired ({args.repair} not written)")
    return 1 if rec["backdoored"] else 0


def _do_repair(args: argparse.Namespace, trigger, out, prefix: str, name: str) -> int:
    """Prune and fine-tune ``args.model`` with ``trigger`` into ``out``; 0 done, 2 error."""
    from diffcleanse import models, sampling
    from diffcleanse.oom import lower_on_oom
    from diffcleanse.removal import ElijahConfig, FinetuneConfig, stages

    def opt(key: str):
        return getattr(args, f"{prefix}{key}")

    try:
        if args.threads:
            import torch

            torch.set_num_threads(int(args.threads))
        model_dir = models.fetch(args.model, allow_pickle=args.allow_pickle)
        cfg = FinetuneConfig(epochs=opt("epochs"), lr=opt("lr"), batch_size=opt("batch_size"))
        eli = ElijahConfig(epochs=opt("epochs"), lr=opt("lr"), batch_size=opt("batch_size"))
        flag = f"--{prefix.replace('_', '-')}batch-size"
        with lower_on_oom(flag, stage="the repair", where="on the command line"):
            rec = stages.repair_model(model_dir, trigger, out, strategy=opt("strategy"),
                                      ratio=opt("ratio"), loss=opt("loss"),
                                      n_synthetic=opt("samples"),
                                      sampler=args.sampler or "ddpm",
                                      sampler_steps=args.steps, finetune=cfg, elijah_cfg=eli,
                                      seed=args.seed, allow_pickle=args.allow_pickle,
                                      device=str(sampling.resolve_device(args.device)))
    except Exception as err:  # every failure becomes exit status 2 with its message
        print(f"{name}: error: {err}", file=sys.stderr)
        return 2
    print(stages.repair_summary(rec, out))
    return 0


def _repair(args: argparse.Namespace) -> int:
    """``diffcleanse repair MODEL --trigger FILE --out DIR``."""
    from pathlib import Path

    return _do_repair(args, Path(args.trigger), Path(args.out), "", "diffcleanse repair")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    import time

    started = time.time()
    args = build_parser().parse_args(argv)
    if args.command == "patterns":
        return _patterns(args)
    if args.command in ("scan", "repair"):
        from diffcleanse.precision import set_precision

        set_precision(args.precision)  # before any model is loaded
    if args.command == "scan":
        return _scan(args, started)
    if args.command == "repair":
        return _repair(args)
    build_parser().print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
