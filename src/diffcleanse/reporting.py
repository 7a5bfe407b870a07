"""Figures and tables for people. Figures are written atomically as PNG (and PDF where asked)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from diffcleanse import patterns, sampling  # noqa: E402
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
    from diffcleanse import models, zoo  # diffusers: only the rules that draw samples pay for it

    card = read_json(card_path)
    row = card["manifest_row"]
    model = models.load_pipeline(model_dir)
    size = int(row["image_size"])
    gt = card["ground_truth"]
    attacked = gt["backdoored"]
    trig_name = gt["trigger"] if attacked else control_trigger
    spec = sampling.SamplerSpec(name=row["sampler"], steps=steps)
    seed = derive_seed(base_seed, row["model_id"], "gallery")
    clean = zoo.clean_samples(model, spec, n_samples, seed, desc="clean")
    if attacked:  # as the attacker samples it (its input, its sampler, its model's decoder)
        bd, _, spec_bd = zoo.real_trigger_samples(model_dir, row, steps, n_samples, seed)
    else:
        r = patterns.render_trigger(trig_name, size)
        bd = zoo.decode_images(model, sampling.sample(
            model.unet, model.scheduler_config, n_samples, spec=spec, trigger=r, seed=seed,
            desc="backdoor", clamp=False)) if model.space_shape[-1] == size else clean[:0]
        spec_bd = spec
    trigger = patterns.render_trigger(trig_name, size)
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
        f"{spec_bd.name} {steps or 'all'} steps, clip_sample={spec.clip_sample}"
    )
    rows = [("clean noise", clean)] + ([(label, bd)] if len(bd) else [])
    image_rows(rows, title, out_png, extras)


# ---- evaluation figures (paper Figs. 4, 5, 6 and 11-13) ----------------------------------------


def save_figure(fig, paths: list[str | Path] | tuple[str | Path, ...]) -> None:
    """Save a matplotlib figure atomically to every path (format from the suffix), then close it."""
    for p in paths:
        with atomic_path(p) as tmp:
            fig.savefig(tmp, dpi=150, format=Path(p).suffix.lstrip(".") or "png",
                        bbox_inches="tight")
    plt.close(fig)


def _note_figure(text: str, title: str, paths) -> None:
    """A placeholder figure that says why there is nothing to plot."""
    fig, ax = plt.subplots(figsize=(5, 2.2))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=9)
    ax.set_title(title, fontsize=9)
    save_figure(fig, paths)


def entropy_sets(
    datasets: list[tuple[str, int]],
    *,
    data_root: str = "data",
    n_images: int | None = 2000,
    n_random: int = 2000,
    bins: int = 4096,
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Per-image entropies (bits) of each (dataset, size) and of Gaussian noise at each size.

    Returns ({label: entropies}, {label: reason}) where the second lists datasets that could not
    be loaded (not on disk here) instead of failing.
    """
    from diffcleanse import data
    from diffcleanse.evaluation import entropy_values

    values: dict[str, torch.Tensor] = {}
    skipped: dict[str, str] = {}
    for name, size in datasets:
        label = f"{name}@{size}"
        try:
            x, _ = data.load_dataset(name, size, data_root, limit=n_images)
        except (data.DatasetUnavailable, ValueError) as err:
            skipped[label] = str(err).split(".")[0]
            continue
        values[label] = entropy_values(x, bins)
    for size in sorted({s for _, s in datasets}):
        g = torch.Generator().manual_seed(derive_seed(seed, "fig4", size))
        noise = torch.randn((n_random, 3, size, size), generator=g)
        values[f"random@{size}"] = entropy_values(noise, bins)
    return values, skipped


def entropy_boxplot(
    values: dict[str, torch.Tensor],
    paths,
    *,
    kappa_minus: float | None = None,
    kappa_plus: float | None = None,
    note: str = "",
) -> None:
    """Fig. 4: boxplot of image entropy per dataset, with random noise, and the ℓ_e band."""
    import pandas as pd
    import seaborn as sns

    df = pd.concat(
        [pd.DataFrame({"set": k, "entropy (bits)": v.numpy()}) for k, v in values.items()],
        ignore_index=True,
    )
    fig, ax = plt.subplots(figsize=(1.3 * len(values) + 2.5, 3.6))
    sns.boxplot(data=df, x="set", y="entropy (bits)", hue="set", ax=ax, fliersize=1,
                palette="deep", legend=False)
    for k, ls in ((kappa_minus, ":"), (kappa_plus, "--")):
        if k is not None:
            ax.axhline(k, color="0.3", ls=ls, lw=1)
    if kappa_minus is not None and kappa_plus is not None:
        ax.text(1.01, kappa_plus, f"κ+ = {kappa_plus:g}", transform=ax.get_yaxis_transform(),
                fontsize=7, va="center")
        ax.text(1.01, kappa_minus, f"κ- = {kappa_minus:g}", transform=ax.get_yaxis_transform(),
                fontsize=7, va="center")
    ax.set_xlabel("")
    ax.set_title("Image entropy per dataset (Fig. 4)" + (f"\n{note}" if note else ""), fontsize=9)
    save_figure(fig, paths)


def mscr_vs_asr(evaluations, verdicts, paths) -> int:
    """Fig. 5: MSCR of the inverted trigger vs real-trigger ASR after pruning, one point per
    backdoored model and pruning setting. Returns the number of points plotted."""
    import seaborn as sns

    ev = evaluations[(evaluations["state"] == "pruned") & evaluations["backdoored"].astype(bool)]
    v = verdicts[verdicts["method"] == "bbti"].set_index("model")["mscr"]
    df = ev.assign(MSCR=ev["model"].map(v)).dropna(subset=["MSCR", "asr_real"])
    title = "MSCR of the inverted trigger vs ASR (real trigger) after pruning (Fig. 5)"
    if df.empty:
        _note_figure("No backdoored model was pruned in this run\n(nothing to plot).", title, paths)
        return 0
    df = df.assign(strategy=df["strategy"].map(lambda s: {"diffcleanse": "Diff-Cleanse",
                                                          "diffpruning": "Diff-Pruning"}.get(s, s)),
                   ratio=df["ratio"].astype(str))
    fig, ax = plt.subplots(figsize=(5, 3.6))
    sns.scatterplot(data=df, x="MSCR", y="asr_real", hue="strategy", style="ratio", s=50, ax=ax)
    if len(df) <= 24:
        for _, r in df.iterrows():
            ax.annotate(r["model"], (r["MSCR"], r["asr_real"]), fontsize=6, alpha=0.7,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel("ASR after pruning (real trigger)")
    ax.set_title(title, fontsize=9)
    save_figure(fig, paths)
    return len(df)


def threshold_figure(records, paths) -> int:
    """Fig. 6: Diff-Cleanse with different gradient-accumulation thresholds T: ASR (real trigger)
    and Δutility after pruning, per model. Returns the number of points plotted."""
    import seaborn as sns

    title = "Diff-Cleanse with different thresholds T (Fig. 6)"
    if records.empty:
        _note_figure("The T ablation was not configured (evaluation.ablation.t_thresholds).",
                     title, paths)
        return 0
    metric = records["utility_metric"].dropna().iloc[0]
    x, xlabel = "value", "T as a fraction of the schedule"
    if "T" in records and records["T"].notna().all():
        n = records["num_train_timesteps"].dropna().unique()
        x, xlabel = "T", f"T (of {int(n[0])} timesteps)" if len(n) == 1 else "T"
    fig, axes = plt.subplots(1, 2, figsize=(8.5, 3.4))
    sns.lineplot(data=records, x=x, y="asr_real", hue="model", marker="o", ax=axes[0])
    sns.lineplot(data=records, x=x, y="delta_utility", hue="model", marker="o", ax=axes[1],
                 legend=False)
    axes[0].set_ylim(-0.03, 1.03)
    for ax in axes:
        ax.set_xlabel(f"{xlabel}; gradients from t > T")
    axes[0].set_ylabel("ASR after pruning (real trigger)")
    axes[1].set_ylabel(f"Δ{metric} after pruning")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    save_figure(fig, paths)
    return len(records)


def before_after(
    before_record: str | Path,
    before_samples: str | Path,
    out_png: str | Path,
    *,
    after_record: str | Path | None = None,
    after_samples: str | Path | None = None,
    note: str = "",
) -> None:
    """Figs. 11-13: clean and backdoor samples (real trigger) of a model before and after removal.

    Reads the samples and records of ``evaluation.evaluate_model``; without an after state, the
    figure shows the original model and says why (``note``)."""
    from safetensors.torch import load_file

    rec = read_json(before_record)
    before = load_file(str(before_samples))
    rows = [("(a) clean noise,\nbefore", before["clean"])]
    if "backdoor_real" in before:
        rows.append(("(b) noise + trigger,\nbefore", before["backdoor_real"]))
    title = (f"{rec['model']}: {rec['attack']} ({rec['trigger']} -> {rec['target']})"
             if rec.get("backdoored") else f"{rec['model']}: clean model (no attack)")
    u = rec["utility_metric"]
    line = f"before: {u} {rec['utility']:.3f}" + (
        f", ASR {rec['asr_real']:.2f}" if rec.get("asr_real") is not None else "")
    if after_record and after_samples:
        arec = read_json(after_record)
        after = load_file(str(after_samples))
        rows.append(("(c) clean noise,\nafter", after["clean"]))
        if "backdoor_real" in after:
            rows.append(("(d) noise + trigger,\nafter", after["backdoor_real"]))
        line += (f" | after ({arec['strategy']} {arec['ratio']}, {arec['state']}"
                 f"{', loss_' + arec['loss'] if arec.get('loss') else ''}): {u} "
                 f"{arec['utility']:.3f}")
        if arec.get("asr_real") is not None:
            line += f", ASR {arec['asr_real']:.2f}"
    elif note:
        line += f" | {note}"
    p = rec["protocol"]
    title += (f"\n{line}\nclean: {p['fid_sampler']} {p['fid_steps'] or 'all'} steps; backdoor: "
              f"{p['asr_sampler']} {p['asr_steps'] or 'all'} steps, κ_m={p['mse_threshold']}")
    extras = []
    if rec.get("backdoored"):
        size = int(rec["image_size"])
        trig = patterns.render_trigger(rec["trigger"], size)
        shown = patterns.stamp(torch.full_like(trig, -1), trig)
        extras.append((f"trigger {rec['trigger']}", shown))
        if rec.get("target_kind") == "image":
            extras.append((f"target {rec['target']}",
                           patterns.render_target(rec["target"], size, rec["trigger"])))
    image_rows(rows, title, out_png, extras)


def trigger_figure(trigger: torch.Tensor, record: dict, path: str | Path) -> None:
    """An inverted trigger, min-max scaled for display, with its range, method and encoder."""
    import textwrap

    r = trigger.detach().float().cpu()
    shown = (r - r.min()) / (r.max() - r.min() + 1e-8) * 2 - 1
    title = (f"{record.get('model', '')}: {record.get('method', '')} trigger "
             f"(seed {record.get('seed_index', 0)}), min-max scaled; values in "
             f"[{float(r.min()):.2f}, {float(r.max()):.2f}], L2 norm {float(r.norm()):.2f}")
    fig, ax = plt.subplots(figsize=(3.6, 3.9))
    ax.imshow(to_image(shown), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title("\n".join(textwrap.wrap(title, 44)), fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)


def inversion_samples_figure(samples: torch.Tensor, record: dict, path: str | Path,
                             per_row: int = 8, max_samples: int = 16) -> None:
    """The verdict samples from noise + the inverted trigger, eight a row, with the verdict."""
    n = min(len(samples), max_samples)
    x = samples[:n].detach().float().cpu().clamp(-1, 1)
    rows = [(f"samples\n{i + 1}-{min(i + per_row, n)}", x[i:i + per_row])
            for i in range(0, n, per_row)]
    s = record["sampler"]
    v = record["detection"]
    title = (f"{record.get('model', '')} · {record.get('method', '')}: noise + inverted trigger "
             f"-> MSCR {v['mscr']:.2f} (κ={record['active_kappa']}, κ_d={record['kappa_d']}) -> "
             f"{record['verdict']}\n{s['name']} {s['steps'] or 'all'} steps, clip_sample="
             f"{s['clip_sample']}, encoder {record['encoder']}")
    image_rows(rows, title, path)


def roc_figure(curves: dict[str, dict], paths, title: str) -> None:
    """ROC curves, one per method (seaborn style), with each AUC in the legend."""
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper")
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    ax.plot([0, 1], [0, 1], color="0.7", lw=1, ls="--", label="chance")
    for name, r in curves.items():
        if r.get("fpr"):
            ax.plot(r["fpr"], r["tpr"], lw=1.8, drawstyle="steps-post",
                    label=f"{name} (AUC {r['auc']:.2f})")
        else:
            ax.plot([], [], label=f"{name} ({r.get('note', 'n/a')})")
    ax.set_xlabel("false positive rate (clean models flagged)")
    ax.set_ylabel("true positive rate (backdoored models flagged)")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7, loc="lower right")
    import textwrap

    ax.set_title("\n".join(textwrap.wrap(title, 60)), fontsize=8)
    fig.tight_layout()
    save_figure(fig, paths)


def removal_ablation_figure(rows, utility_metric: str, paths) -> int:
    """The removal ablation (a generalised Fig. 6): per state (pruned, fine-tuned), the real
    trigger's ASR, the utility change and the out-of-range share of the triggered samples against
    the share of channels removed; one line per variant family and trigger source (mean over
    seeds, bars: min-max). Returns the number of points plotted."""
    import seaborn as sns

    title = "Removal ablation: which channels to prune (generalised Fig. 6)"
    if rows is None or len(rows) == 0:
        _note_figure("The removal ablation was not configured (removal.ablation.models).", title,
                     paths)
        return 0
    sns.set_theme(style="whitegrid", context="paper")
    df = rows.copy()
    df["variant"] = df["family"] + df["trigger_source"].map(
        lambda s: "" if s == "none" else f" [{s}]")
    df["channels %"] = 100 * df["channels_fraction"]
    panels = [("asr_real", "ASR (real trigger)"), ("delta_utility", f"Δ{utility_metric}"),
              ("out_of_range_triggered", "out-of-range share, triggered")]
    fig, axes = plt.subplots(2, 3, figsize=(12.5, 6.6), squeeze=False)
    for i, state in enumerate(("pruned", "finetuned")):
        for j, (field, label) in enumerate(panels):
            ax = axes[i][j]
            sns.lineplot(data=df, x="channels %", y=f"{field}_{state}", hue="variant",
                         style="variant", markers=True, dashes=False, errorbar=("pi", 100),
                         err_style="bars", ax=ax, legend=(i == 0 and j == 2))
            ax.set_ylabel(label)
            ax.set_title("after pruning" if i == 0 else "after fine-tuning (loss_p)", fontsize=8)
            ax.set_xlabel("output channels removed (%)")
            if field != "delta_utility":
                ax.set_ylim(-0.03, 1.03)
    leg = axes[0][2].get_legend()
    if leg is not None:
        leg.set_bbox_to_anchor((1.02, 1.0))
        leg._loc = 2  # upper left, outside the axes
        for t in leg.get_texts():
            t.set_fontsize(6)
    models_ = ", ".join(sorted(df["model"].unique()))
    fig.suptitle(f"{title}: {models_}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.86, 0.96))
    save_figure(fig, paths)
    return len(df)


def removal_ablation_samples(samples: dict[str, torch.Tensor], rows, path: str | Path,
                             seed: int | None = None, per_row: int = 8) -> int:
    """What noise + the real trigger generates after each variant (fine-tuned), one row per
    variant, the original first: the check that a removed backdoor left ordinary samples (paper
    Figs. 11-13 (d)) rather than garbage. Returns the number of rows."""
    if rows is None or len(rows) == 0:
        return 0
    seed = int(rows["seed"].min()) if seed is None else seed
    sel = rows[rows["seed"] == seed].sort_values(["trigger_source", "strategy", "family", "ratio"])
    img_rows = [("original", samples["original/triggered"][:per_row])]
    for _, r in sel.iterrows():
        key = f"{r['samples_key']}/finetuned/triggered"
        if key in samples:
            oor = r["out_of_range_triggered_finetuned"]
            label = (f"{r['family']} @{r['ratio']:g}\n[{r['trigger_source']}] ASR "
                     f"{r['asr_real_finetuned']:.2f}, oor {oor:.2f}")
            img_rows.append((label, samples[key][:per_row]))
    model = sel["model"].iloc[0] if len(sel) else ""
    image_rows(img_rows, f"{model}: noise + real trigger after each variant, fine-tuned (seed "
               f"{seed})", path)
    return len(img_rows)
