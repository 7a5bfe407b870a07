"""The ``diffcleanse`` command: version, and (from the detection stage on) ``scan`` of one model."""

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


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "patterns":
        return _patterns(args)
    build_parser().print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
