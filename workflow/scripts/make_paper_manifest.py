#!/usr/bin/env python
"""Write the paper-scale zoo manifest (373 benchmark models: 177 clean, 196 backdoored; plus the
adaptive attack's four models of Appendix G).

The Diff-Cleanse paper gives the totals, the attacks, the datasets, the samplers, the poison rates
(0.1/0.3/0.5/0.7/0.9), the trigger sizes (8/11/14/18) and the trigger-target pairs of its Tables
5-6, but not the grid it trained. This script fixes one grid that meets every stated fact and the
totals; config/paper/README.md says which choices are the paper's and which are ours.

    python workflow/scripts/make_paper_manifest.py --out config/paper/manifest.tsv --seed 0

The output is deterministic: the same --seed gives the same file, byte for byte. Row seeds are
``seed + row index``. The file is validated with diffcleanse.manifest.load_manifest before the
counts are printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

try:
    from diffcleanse.manifest import columns, load_manifest
except ImportError:  # run from a source checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
    from diffcleanse.manifest import columns, load_manifest

EXPECTED = {"total": 373, "clean": 177, "backdoored": 196}  # the benchmark (Tables 1-2)
ADAPTIVE_LAMBDAS = (0.0, 1e-3, 1e-2, 1e-1)  # Appendix G, Fig. 14 and Table 8
TROJDIFF_GAMMA = {"blend": 0.6, "patch": 0.1}  # TrojDiff README (CIFAR-10; its CelebA patch uses 0)

RATES = (0.1, 0.3, 0.5, 0.7, 0.9)  # paper, appendix D (BadDiff and VillanDiff)
SIZES = (8, 11, 14, 18)  # paper, appendix D: trigger sizes
KINDS = ("box", "stop")  # Table 5: Grey Box, Stop Sign (CIFAR-10)
CIFAR_TARGETS = ("trigger", "shift", "corner", "shoe", "hat")  # Table 5 (CIFAR-10)
ODE_SAMPLERS = (  # the paper's samplers other than DDPM that VillanDiff attacks (all ODE solvers)
    "ddim",
    "pndm",
    "deis",
    "dpmo1",
    "dpmo2",
    "dpmo3",
    "dpmpp_o1",
    "dpmpp_o2",
    "dpmpp_o3",
    "unipc",
    "heun",
)
TROJDIFF_ATTACKS = (  # Table 6 / TrojDiff: group label, id part, target
    ("D2I", "d2i", "mickey"),
    ("Din", "din", "class:7"),  # horse on CIFAR-10; Heavy Makeup+Mouth Open+Smiling on CelebA
    ("Dout", "dout", "mnist:7"),
)
TROJDIFF_TRIGGERS = ("blend", "patch")
TROJDIFF_SAMPLERS = ("ddpm", "ddim")

HUB_C10 = "hub:google/ddpm-cifar10-32"
HUB_CHQ_EMA = "hub:google/ddpm-ema-celebahq-256"
HUB_CHQ = "hub:google/ddpm-celebahq-256"
HUB_LDM = "hub:CompVis/ldm-celebahq-256"

# Optimiser steps (epochs x ceil(train images / batch)); see config/paper/README.md for sources
STEPS = {
    "baddiff_c10": 50 * 391,  # BadDiffusion README: CIFAR-10, batch 128, 50 epochs
    "baddiff_chq": 50 * 1875,  # BadDiffusion README: CelebA-HQ (30k), batch 16, 50 epochs
    "villan_c10": 100 * 391,  # official Diff-Cleanse VillanDiff/train.sh: 100 epochs, batch 128
    "villan_chq": 50 * 1875,  # assumption: as BadDiffusion on CelebA-HQ
    "villan_ncsn": 10 * 391,  # assumption: ~10 epochs, batch 128 (official script: 2-10 epochs)
    "villan_ldm": 50 * 1875,  # assumption: as BadDiffusion on CelebA-HQ
    "trojdiff_c10": 100 * 391,  # assumption: 100 epochs, batch 128
    "trojdiff_celeba": 40 * 1272,  # assumption: 40 epochs over CelebA (162,770), batch 128
    "ncsn_scratch": 1_300_000,  # assumption: score-SDE's NCSN++ CIFAR-10 budget
    "celeba_scratch": 500_000,  # assumption: a DDPM on CelebA-64 from scratch
}


def pct(rate: float) -> str:
    """0.1 -> 'p10' (model_id part)."""
    return f"p{round(rate * 100):02d}"


class Rows:
    """Accumulates manifest rows with a deterministic seed each."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.rows: list[dict[str, object]] = []

    def add(
        self,
        model_id: str,
        source: str,
        *,
        group: str,
        model_type: str = "ddpm",
        dataset: str,
        image_size: int,
        sampler: str,
        init: str = "",
        attack: str = "none",
        trigger: str = "none",
        target: str = "none",
        poison_rate: float = 0.0,
        train_steps: int = 0,
        attack_params: str = "",
    ) -> str:
        self.rows.append(
            {
                "model_id": model_id,
                "source": source,
                "init": init,
                "model_type": model_type,
                "dataset": dataset,
                "image_size": image_size,
                "attack": attack,
                "trigger": trigger,
                "target": target,
                "poison_rate": poison_rate,
                "seed": self.seed + len(self.rows),
                "train_steps": train_steps,
                "sampler": sampler,
                "attack_params": attack_params,
                "group": group,
            }
        )
        return model_id

    def clean_ft(
        self, prefix: str, n: int, *, init: str, steps: int, start: int = 1, **kw: object
    ) -> None:
        """n clean controls: the base fine-tuned on clean data with the attack's budget."""
        for k in range(start, start + n):
            self.add(f"{prefix}-clean-ft{k:02d}", "train", init=init, train_steps=steps, **kw)


def build(seed: int) -> list[dict[str, object]]:
    """All 373 rows, in table order: per group, clean rows first, then backdoored ones."""
    r = Rows(seed)
    c10 = {"dataset": "cifar10", "image_size": 32}
    chq = {"dataset": "celebahq", "image_size": 256}
    celeba = {"dataset": "celeba", "image_size": 64}

    # --- BadDiffusion, DDPM sampler, CIFAR-10 (DDPM-C): 50 clean, 80 backdoored
    g = {"group": "DDPM-C", "sampler": "ddpm", **c10}
    base_c10 = r.add("c10-ddpm-hub", HUB_C10, **g)
    r.clean_ft("c10-ddpm", 49, init=base_c10, steps=STEPS["baddiff_c10"], **g)
    bd = {"attack": "baddiffusion", "init": base_c10, "train_steps": STEPS["baddiff_c10"], **g}
    for kind in KINDS:  # size 14: every trigger-target pair at every poison rate (50)
        for target in CIFAR_TARGETS:
            for rate in RATES:
                r.add(
                    f"bd-c10-{kind}14-{target}-{pct(rate)}",
                    "train",
                    trigger=f"{kind}_14",
                    target=target,
                    poison_rate=rate,
                    **bd,
                )
    for kind in KINDS:  # sizes 8, 11, 18: every rate once, targets rotated (30)
        for s_i, size in enumerate(s for s in SIZES if s != 14):
            for r_i, rate in enumerate(RATES):
                target = CIFAR_TARGETS[(r_i + s_i) % len(CIFAR_TARGETS)]
                r.add(
                    f"bd-c10-{kind}{size}-{target}-{pct(rate)}",
                    "train",
                    trigger=f"{kind}_{size}",
                    target=target,
                    poison_rate=rate,
                    **bd,
                )

    # --- BadDiffusion, DDPM sampler, CelebA-HQ (DDPM-A): 10 clean, 5 backdoored
    g = {"group": "DDPM-A", "sampler": "ddpm", **chq}
    base_chq = r.add("chq-ddpm-ema-hub", HUB_CHQ_EMA, **g)
    r.add("chq-ddpm-hub", HUB_CHQ, **g)
    r.clean_ft("chq-ddpm", 8, init=base_chq, steps=STEPS["baddiff_chq"], **g)
    for rate in RATES:
        r.add(
            f"bd-chq-glasses-cat-{pct(rate)}",
            "train",
            init=base_chq,
            attack="baddiffusion",
            trigger="glasses",
            target="cat",
            poison_rate=rate,
            train_steps=STEPS["baddiff_chq"],
            **g,
        )

    # --- VillanDiffusion, ODE samplers, CIFAR-10 (ODE-C): 55 clean, 55 backdoored
    pairs = [(f"{k}_{s}", t) for k in KINDS for s in SIZES for t in CIFAR_TARGETS]  # 40 pairs
    for s_i, sampler in enumerate(ODE_SAMPLERS):
        g = {"group": "ODE-C", "sampler": sampler, **c10}
        r.add(f"c10-{sampler}-hub", HUB_C10, **g)
        r.clean_ft(f"c10-{sampler}", 4, init=base_c10, steps=STEPS["villan_c10"], **g)
        for r_i, rate in enumerate(RATES):
            trigger, target = pairs[(s_i * len(RATES) + r_i) % len(pairs)]
            r.add(
                f"vd-c10-{sampler}-{trigger.replace('_', '')}-{target}-{pct(rate)}",
                "train",
                init=base_c10,
                attack="villandiffusion",
                trigger=trigger,
                target=target,
                poison_rate=rate,
                train_steps=STEPS["villan_c10"],
                **g,
            )

    # --- VillanDiffusion, ODE samplers, CelebA-HQ (ODE-A): 22 clean, 22 backdoored
    for s_i, sampler in enumerate(ODE_SAMPLERS):
        g = {"group": "ODE-A", "sampler": sampler, **chq}
        r.add(f"chq-{sampler}-hub", HUB_CHQ_EMA, **g)
        r.clean_ft(f"chq-{sampler}", 1, init=base_chq, steps=STEPS["villan_chq"], **g)
        for rate in (RATES[(2 * s_i) % 5], RATES[(2 * s_i + 1) % 5]):
            r.add(
                f"vd-chq-{sampler}-glasses-cat-{pct(rate)}",
                "train",
                init=base_chq,
                attack="villandiffusion",
                trigger="glasses",
                target="cat",
                poison_rate=rate,
                train_steps=STEPS["villan_chq"],
                **g,
            )

    # --- VillanDiffusion, NCSN (score-based, VE-SDE), CIFAR-10 (NCSN-C): 8 clean, 5 backdoored
    g = {"group": "NCSN-C", "sampler": "score_sde_ve", "model_type": "ncsn", **c10}
    base_ncsn = r.add("c10-ncsn-base", "train", train_steps=STEPS["ncsn_scratch"], **g)
    r.clean_ft("c10-ncsn", 7, init=base_ncsn, steps=STEPS["villan_ncsn"], **g)
    ncsn_pairs = [
        ("stop_14", "hat"),
        ("box_14", "shoe"),
        ("stop_14", "corner"),
        ("box_14", "hat"),
        ("stop_14", "shift"),
    ]
    for (trigger, target), rate in zip(ncsn_pairs, RATES, strict=True):
        r.add(
            f"vd-c10-ncsn-{trigger.replace('_', '')}-{target}-{pct(rate)}",
            "train",
            init=base_ncsn,
            attack="villandiffusion",
            trigger=trigger,
            target=target,
            poison_rate=rate,
            train_steps=STEPS["villan_ncsn"],
            **g,
        )

    # --- VillanDiffusion, latent diffusion, CelebA-HQ (LDM-A): 8 clean, 5 backdoored
    g = {"group": "LDM-A", "sampler": "ddim", "model_type": "ldm", **chq}
    base_ldm = r.add("chq-ldm-hub", HUB_LDM, **g)
    r.clean_ft("chq-ldm", 7, init=base_ldm, steps=STEPS["villan_ldm"], **g)
    for rate in RATES:
        r.add(
            f"vd-chq-ldm-glasses-cat-{pct(rate)}",
            "train",
            init=base_ldm,
            attack="villandiffusion",
            trigger="glasses",
            target="cat",
            poison_rate=rate,
            train_steps=STEPS["villan_ldm"],
            **g,
        )

    # --- TrojDiff, DDPM and DDIM samplers, CIFAR-10 and CelebA-64 (D2I, Din, Dout):
    #     8 clean + 8 backdoored per attack
    base_celeba = None
    for group, short, target in TROJDIFF_ATTACKS:
        for ds_name, ds, steps in (
            ("c10", c10, STEPS["trojdiff_c10"]),
            ("celeba", celeba, STEPS["trojdiff_celeba"]),
        ):
            for sampler in TROJDIFF_SAMPLERS:
                g = {"group": group, "sampler": sampler, **ds}
                prefix = f"tj-{short}-{ds_name}-{sampler}"
                if ds_name == "c10":
                    base = base_c10
                    r.clean_ft(prefix, 2, init=base, steps=steps, **g)
                elif base_celeba is None:  # the CelebA-64 base model, trained once
                    base = base_celeba = r.add(
                        "celeba-ddpm-base", "train", train_steps=STEPS["celeba_scratch"], **g
                    )
                    r.clean_ft(prefix, 1, init=base, steps=steps, start=2, **g)
                else:
                    base = base_celeba
                    r.clean_ft(prefix, 2, init=base, steps=steps, **g)
                for trigger in TROJDIFF_TRIGGERS:
                    r.add(
                        f"{prefix}-{trigger}",
                        "train",
                        init=base,
                        attack="trojdiff",
                        trigger=trigger,
                        target=target,
                        poison_rate=0.5,
                        train_steps=steps,
                        attack_params=f"gamma={TROJDIFF_GAMMA[trigger]:g}",
                        **g,
                    )

    # --- the adaptive attack (Appendix G): BadDiffusion plus lambda ||Delta a_t||^2, CIFAR-10,
    #     Grey Box -> Hat, 50 epochs; outside the 373 (Fig. 14 and Table 8 only)
    g = {"group": "ADAPT", "sampler": "ddpm", **c10}
    for lam in ADAPTIVE_LAMBDAS:
        r.add(
            f"ad-c10-box14-hat-lam{lam:g}",
            "train",
            init=base_c10,
            attack="adaptive",
            trigger="box_14",
            target="hat",
            poison_rate=0.1,
            train_steps=STEPS["baddiff_c10"],
            attack_params=f"lambda={lam:g}; base=baddiffusion",
            **g,
        )
    return r.rows


def to_tsv(rows: list[dict[str, object]], seed: int) -> str:
    """The manifest text: provenance comments, header, one line a row."""
    cols = columns()
    head = [
        "# Paper-scale zoo manifest for the Diff-Cleanse reproduction: 373 benchmark models "
        "(177 clean, 196 backdoored) and the adaptive attack's 4 (group ADAPT).",
        f"# Generated by workflow/scripts/make_paper_manifest.py --seed {seed}; do not edit by "
        "hand, regenerate.",
        "# The paper does not list its grid: config/paper/README.md says which parts are the "
        "paper's and which are assumptions.",
    ]

    def cell(v: object) -> str:
        return f"{v:g}" if isinstance(v, float) else str(v)

    body = ["\t".join(cols)] + ["\t".join(cell(row[c]) for c in cols) for row in rows]
    return "\n".join(head + body) + "\n"


def write_atomic(path: Path, text: str) -> None:
    """Write text to path via a temporary sibling and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def summary(path: Path) -> str:
    """Counts per attack and per group of the manifest at path (validating it on the way)."""
    full = load_manifest(path)
    df = full[full["group"] != "ADAPT"]
    clean = int((df["attack"] == "none").sum())
    lines = [f"{path}: {len(df)} models, {clean} clean, {len(df) - clean} backdoored "
             f"(benchmark), and {len(full) - len(df)} adaptive-attack models (group ADAPT)"]
    lines.append("per attack:")
    for attack, n in Counter(full["attack"]).items():
        lines.append(f"  {attack:<16} {n:>4}")
    lines.append("per group (clean / backdoored):")
    for group, sub in full.groupby("group", sort=False):
        nc = int((sub["attack"] == "none").sum())
        lines.append(f"  {group:<8} {nc:>4} / {len(sub) - nc:<4} {sorted(set(sub['attack']))}")
    trained = int((df["source"] == "train").sum())
    fetched = df.loc[df["source"] != "train", "source"].nunique()
    lines.append(
        f"distinct weight sets: {trained + fetched} ({trained} trained here, "
        f"{fetched} distinct hub/local checkpoints in "
        f"{int((df['source'] != 'train').sum())} rows)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--out",
        type=Path,
        default=Path("config/paper/manifest.tsv"),
        help="where to write the TSV (default: %(default)s)",
    )
    ap.add_argument(
        "--seed", type=int, default=0, help="base seed; row i gets seed + i (default: %(default)s)"
    )
    args = ap.parse_args(argv)
    if args.seed < 0:
        ap.error("--seed must be >= 0")
    rows = build(args.seed)
    bench = [row for row in rows if row["group"] != "ADAPT"]
    n_clean = sum(row["attack"] == "none" for row in bench)
    got = {"total": len(bench), "clean": n_clean, "backdoored": len(bench) - n_clean}
    if got != EXPECTED:
        raise SystemExit(f"internal error: grid gives {got}, the paper has {EXPECTED}")
    write_atomic(args.out, to_tsv(rows, args.seed))
    print(summary(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
