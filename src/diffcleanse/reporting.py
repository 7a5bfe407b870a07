"""Figures and tables for people. Figures are written atomically as PNG (and PDF where asked)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from diffcleanse import models, patterns, sampling  # noqa: E402
from diffcleanse.records import atomic_path, derive_seed, read_json  # noqa: E402


def to_image(x: torch.Tensor):
    """(3, H, W) in [-1, 1] -> (H, W, 3) numpy in [0, 1] for imshow."""
    return ((x.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()


def image_rows(
    rows: list[tuple[str, torch.Tensor]],
    title: str,
    path: str | Path,
    extras: list[tuple[str, torch.Tensor]] = (),
) -> None:
    """A figure of labelled image rows, with optional extra panels (trigger, target) at right."""
    n = max(len(r[1]) for r in rows)
    cols = n + (1 if extras else 0)
    fig, axes = plt.subplots(
        len(rows), cols, figsize=(0.9 * cols + 1.2, 1.0 * len(rows) + 0.6), squeeze=False
    )
    for i, (label, imgs) in enumerate(rows):
        for j in range(cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if j < len(imgs):
                ax.imshow(to_image(imgs[j]), interpolation="nearest")
            elif j == n and i < len(extras):
                ax.imshow(to_image(extras[i][1]), interpolation="nearest")
                ax.set_title(extras[i][0], fontsize=7)
        axes[i][0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)


def model_gallery(
    model_dir: str | Path,
    card_path: str | Path,
    out_png: str | Path,
    *,
    n_samples: int = 8,
    steps: int | None = None,
    control_trigger: str = "box_14",
    base_seed: int = 0,
) -> None:
    """Clean samples beside backdoor samples for one zoo model (uses its card's ground truth)."""
    card = read_json(card_path)
    row = card["manifest_row"]
    unet, sched_cfg = models.load_model(model_dir)
    size = unet.config.sample_size
    gt = card["ground_truth"]
    attacked = gt["backdoored"]
    trig_name = gt["trigger"] if attacked else control_trigger
    trigger = patterns.render_trigger(trig_name, size)
    spec = sampling.SamplerSpec(name=row["sampler"], steps=steps)
    seed = derive_seed(base_seed, row["model_id"], "gallery")
    clean = sampling.sample(unet, sched_cfg, n_samples, spec=spec, seed=seed, desc="clean")
    bd = sampling.sample(
        unet, sched_cfg, n_samples, spec=spec, trigger=trigger, seed=seed, desc="backdoor"
    )
    extras = [(f"trigger {trig_name}", patterns.stamp(torch.full_like(trigger, -1), trigger))]
    if attacked and not patterns.is_class_target(gt["target"]):
        extras.append(
            (f"target {gt['target']}", patterns.render_target(gt["target"], size, gt["trigger"]))
        )
    label = "noise + trigger" if attacked else "noise + control\ntrigger"
    check = card.get("attack_check") or {}
    asr = f", attack ASR {check['asr']:.2f}" if check else ""
    title = (
        f"{row['model_id']}: {row['attack']} ({gt['trigger']} -> {gt['target']}{asr})\n"
        f"{spec.name} {steps or 'all'} steps, clip_sample={spec.clip_sample}"
    )
    image_rows([("clean noise", clean), (label, bd)], title, out_png, extras)
