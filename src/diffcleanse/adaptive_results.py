"""The adaptive attack's results (Diff-Cleanse Appendix G): Fig. 14 (utility of checkpoints taken
during its training, one line per lambda) and Table 8 (detected, delta utility, delta ASR after
Diff-Cleanse's removal, one row per lambda). Both read the evaluation records the workflow writes
(``evaluation.evaluate_model``) and the detection verdicts; nothing here samples a model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from diffcleanse import attacks, tables
from diffcleanse.records import read_json


def lambda_of(card: dict[str, Any]) -> float:
    """The lambda of an adaptive model's card (its manifest row's attack_params)."""
    params = attacks.parse_params(card["manifest_row"].get("attack_params", ""))
    return float(params.get("lambda", math.nan))


def fig14_frame(snapshot_records: Iterable[str | Path], cards: dict[str, str | Path]
                ) -> pd.DataFrame:
    """One row per (model, training step): lambda, utility, its label, real-trigger ASR. A record
    without a ``snapshot_step`` is the trained model's own evaluation: its step is the card's
    ``train_steps``."""
    rows = []
    for p in snapshot_records:
        r = read_json(p)
        card = read_json(cards[r["model"]])
        step = (r.get("variant") or {}).get("snapshot_step")
        if step is None:
            step = card["manifest_row"]["train_steps"]
        rows.append({"model": r["model"], "lambda": lambda_of(card),
                     "step": int(step), "utility": r["utility"],
                     "utility_metric": r["utility_metric"], "asr_real": r["asr_real"],
                     "sampler": r["sampler"]})
    cols = ["model", "lambda", "step", "utility", "utility_metric", "asr_real", "sampler"]
    return pd.DataFrame(rows, columns=cols).sort_values(["lambda", "model", "step"])


def plot_fig14(df: pd.DataFrame, paths: Sequence[str | Path]) -> None:
    """Utility against training step, one line per lambda (and model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffcleanse.reporting import save_figure

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(8, 3.2))
    for (lam, model), sub in df.groupby(["lambda", "model"], sort=True):
        label = f"λ = {lam:g}" + ("" if df["lambda"].eq(lam).sum() == len(sub) else f" ({model})")
        ax.plot(sub["step"], sub["utility"], marker="o", label=label)
        bx.plot(sub["step"], sub["asr_real"], marker="o", label=label)
    metric = ", ".join(sorted(set(df["utility_metric"].dropna()))) or "utility"
    ax.set(xlabel="training step", ylabel=f"{metric} (lower is better)",
           title="Fig. 14: utility during adaptive training")
    bx.set(xlabel="training step", ylabel="ASR (real trigger)", ylim=(-0.05, 1.05),
           title="backdoor during training")
    ax.legend(fontsize=8)
    save_figure(fig, list(paths))


def table8(evaluations: Iterable[str | Path], verdicts: Iterable[str | Path],
           cards: dict[str, str | Path], *, strategy: str = "diffcleanse",
           loss: str = "p") -> pd.DataFrame:
    """Table 8: per adaptive model, lambda, detected (stage 1's verdict), and the deltas of the
    fine-tuned Diff-Cleanse state to the original one (utility and real-trigger ASR)."""
    ev = tables.load_evaluations(evaluations)
    vd = tables.load_verdicts(verdicts).drop_duplicates("model").set_index("model")
    rows = []
    for model, card_path in cards.items():
        card = read_json(card_path)
        sub = ev[ev["model"] == model]
        orig = sub[sub["state"] == "original"]
        after = sub[(sub["state"] == "finetuned") & (sub["strategy"] == strategy)
                    & (sub["loss"] == loss)]
        base = attacks.parse_params(card["manifest_row"].get("attack_params", "")).get(
            "base", "baddiffusion")
        row = {"model": model, "lambda": lambda_of(card), "base attack": base,
               "detected": bool(vd.loc[model, "flagged"]) if model in vd.index else None,
               "utility_metric": orig["utility_metric"].iloc[0] if len(orig) else None,
               "utility": float(orig["utility"].iloc[0]) if len(orig) else math.nan,
               "asr_real": float(orig["asr_real"].iloc[0]) if len(orig) else math.nan,
               "delta_utility": math.nan, "delta_asr_real": math.nan, "removal": "not run"}
        if len(after):
            a = after.iloc[0]
            row |= {"delta_utility": float(a["delta_utility"]),
                    "delta_asr_real": float(a["delta_asr_real"]),
                    "removal": f"{strategy} ratio {a['ratio']}, loss {loss}"}
        rows.append(row)
    return pd.DataFrame(rows).sort_values(["lambda", "model"]).reset_index(drop=True)


def write_table8(df: pd.DataFrame, csv_path: str | Path, md_path: str | Path,
                 evaluations: Iterable[str | Path]) -> None:
    """CSV and Markdown of Table 8, with the protocol of its numbers."""
    ev = tables.load_evaluations(evaluations)
    tables.write_table(
        df, csv_path, md_path, "Table 8: Diff-Cleanse against the adaptive attack",
        "One row per adaptive model (base attack's loss plus lambda times the activation gap "
        "between clean and backdoored inputs, Appendix G). Detected: stage 1's verdict; deltas: "
        "the fine-tuned Diff-Cleanse state minus the original (ΔASR = -ASR: fully removed). "
        + tables.protocol_text(ev))
