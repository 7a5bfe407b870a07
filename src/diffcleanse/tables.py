"""The paper's tables (1, 2, 3, 4, 7) from evaluation records, verdicts and benchmark files.

Tables are built only from records (``evaluation.evaluate_model``'s ``metrics.json``, the detection
verdicts, the ablation records) and Snakemake benchmark TSVs (column ``s``), never from logs. Rows
follow the paper's grouping (attack, then model group) and list every group of the paper's table,
with "no model in this zoo" where the zoo has none, followed by the zoo's own groups (e.g. the
default zoo's ``DDPM-D``, DDPMs on digits). Every Markdown table starts with a caption naming the
protocol: utility metric and feature extractor, sample counts, samplers, steps and κ_m.

Grouping. Table 1 groups by the manifest's ``group`` column; a clean model belongs to its group's
attack row (the attack of the group's backdoored models, or the paper's, e.g. DDPM-C -> BadDiff),
since ACC is over clean and backdoored models. Tables 2 and 4 group TrojDiff models by sampler and
dataset as the paper does (DDPM-C, DDIM-A, ...) and average over backdoored models only.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from diffcleanse.records import atomic_path, read_json

NO_MODEL = "no model in this zoo"
NOT_RUN = "not run"
ATTACK_LABELS = {
    "baddiffusion": "BadDiff",
    "villandiffusion": "VillanDiff",
    "trojdiff": "TrojDiff",
    "none": "Clean",
}
PAPER_GROUP_ATTACK = {
    "DDPM-C": "baddiffusion",
    "DDPM-A": "baddiffusion",
    "ODE-C": "villandiffusion",
    "ODE-A": "villandiffusion",
    "NCSN-C": "villandiffusion",
    "LDM-A": "villandiffusion",
    "D2I": "trojdiff",
    "Din": "trojdiff",
    "Dout": "trojdiff",
}
_BV = [
    ("BadDiff", "DDPM-C"),
    ("BadDiff", "DDPM-A"),
    ("VillanDiff", "ODE-C"),
    ("VillanDiff", "ODE-A"),
    ("VillanDiff", "NCSN-C"),
    ("VillanDiff", "LDM-A"),
]
PAPER_ROWS: dict[str, list[tuple[str, ...]]] = {
    "table1": [*_BV, ("TrojDiff", "D2I"), ("TrojDiff", "Din"), ("TrojDiff", "Dout")],
    "table2": [
        *_BV,
        ("TrojDiff", "DDPM-C"),
        ("TrojDiff", "DDIM-C"),
        ("TrojDiff", "DDPM-A"),
        ("TrojDiff", "DDIM-A"),
    ],
    "table3": [("BadDiff",), ("VillanDiff",), ("TrojDiff",)],
    "table4": [*_BV, ("TrojDiff", "DDIM-C"), ("TrojDiff", "DDIM-A")],
    "table7": [("BadDiff",), ("VillanDiff",), ("TrojDiff",)],
}
STRATEGY_LABELS = {"diffpruning": "Diff-Pruning", "diffcleanse": "Diff-Cleanse"}
METHOD_LABELS = {"elijah": "Elijah", "bbti": "BBTI", "purediffusion": "PureDiffusion",
                 "terd": "TERD", "combined": "Combined"}
DATASET_LETTERS = {"cifar10": "C", "celeba": "A", "celebahq": "A", "digits": "D", "mnist": "M"}


# ---- loading -----------------------------------------------------------------------------------


def as_paths(paths: str | Path | Iterable[str | Path] | None) -> list[str | Path]:
    """A list of paths from one path, a list of them, or None (Snakemake gives a str for one)."""
    if paths is None:
        return []
    if isinstance(paths, str | Path):
        return [paths]
    return list(paths)


_EVAL_KEYS = (
    "model",
    "state",
    "strategy",
    "ratio",
    "loss",
    "attack",
    "group",
    "dataset",
    "image_size",
    "sampler",
    "backdoored",
    "target_kind",
    "utility_metric",
    "utility",
    "asr_real",
    "asr_inverted",
    "clean_hit_rate",
    "seconds",
    "trigger",
    "target",
    "uniform_real",
    "inverted_by_method",
)


def load_evaluations(paths: Iterable[str | Path]) -> pd.DataFrame:
    """One row per evaluation record, with the protocol flattened (``protocol.<key>``) and the
    paired deltas to the model's original state (``delta_utility``, ``delta_asr_real``,
    ``delta_asr_inverted``; NaN for the original state itself)."""
    rows = []
    for p in as_paths(paths):
        r = read_json(p)
        rows.append(
            {k: r.get(k) for k in _EVAL_KEYS}
            | {f"protocol.{k}": v for k, v in r.get("protocol", {}).items()}
            | {"record": str(p)}
        )
    cols = [*_EVAL_KEYS, "record"]
    df = pd.DataFrame(rows, columns=cols if not rows else None)
    for c in ("utility", "asr_real", "asr_inverted", "clean_hit_rate", "seconds"):
        df[c] = pd.to_numeric(df[c], errors="coerce")
    df["ratio"] = df["ratio"].map(lambda v: None if v is None or v == "" else str(v))
    orig = df[df["state"] == "original"].drop_duplicates("model").set_index("model")
    for col in ("utility", "asr_real", "asr_inverted"):
        base = df["model"].map(orig[col]) if len(orig) else math.nan
        df[f"delta_{col}"] = (df[col] - base).where(df["state"] != "original")
    return df


def load_verdicts(paths: Iterable[str | Path]) -> pd.DataFrame:
    """One row per detection verdict: model, method, verdict (bool) and MSCR."""
    rows = [
        {
            "model": r["model"],
            "method": r.get("method", "bbti"),
            "flagged": bool(r["backdoored"]),
            "mscr": float(r["mscr"]),
        }
        for r in map(read_json, as_paths(paths))
    ]
    return pd.DataFrame(rows, columns=["model", "method", "flagged", "mscr"])


def load_benchmarks(entries: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Wall-clock seconds from Snakemake benchmark TSVs (column ``s``, first row).

    ``entries`` name the rule, the path and any wildcards (model, strategy, ratio, loss); paths
    that do not exist (e.g. a fetched model has no training benchmark) are skipped.
    """
    rows = []
    for e in entries:
        p = Path(e["path"])
        if not p.is_file():
            continue
        s = pd.read_csv(p, sep="\t")["s"]
        rows.append({**{k: v for k, v in e.items() if k != "path"}, "s": float(s.iloc[0])})
    return pd.DataFrame(rows, columns=None if rows else ["rule", "model", "s"])


# ---- grouping ----------------------------------------------------------------------------------


def group_attacks(models: pd.DataFrame) -> dict[str, str]:
    """group -> attack: the attack of the group's backdoored models, else the paper's, else none."""
    out = dict(PAPER_GROUP_ATTACK)
    bd = models[models["attack"] != "none"]
    for g, sub in bd.groupby("group"):
        out[str(g)] = str(sub["attack"].mode().iloc[0])
    for g in models["group"].unique():
        out.setdefault(str(g), "none")
    return out


def row_keys(models: pd.DataFrame, table: str) -> pd.Series:
    """Each model's row of ``table`` as a tuple (attack label, group) or (attack label,)."""
    gmap = group_attacks(models)

    def key(r: pd.Series) -> tuple[str, ...]:
        attack = r["attack"] if r["attack"] != "none" else gmap.get(str(r["group"]), "none")
        label = ATTACK_LABELS.get(attack, attack)
        if table in ("table3", "table7"):
            return (label,)
        if table in ("table2", "table4") and attack == "trojdiff":
            letter = DATASET_LETTERS.get(str(r["dataset"]), str(r["dataset"]))
            return (label, f"{str(r['sampler']).upper()}-{letter}")
        return (label, str(r["group"]))

    return models.apply(key, axis=1) if len(models) else pd.Series([], dtype=object)


def paper_order(names: Sequence[str], order: Sequence[str]) -> list[str]:
    """``names`` in the paper's column order (``order``), unknown ones after, duplicates dropped."""
    names = list(dict.fromkeys(names))
    return [n for n in order if n in names] + [n for n in names if n not in order]


def ordered_keys(table: str, present: Iterable[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """The paper's rows of ``table`` in its order, then the zoo's other rows (sorted)."""
    paper = PAPER_ROWS[table]
    extra = sorted({tuple(k) for k in present} - set(paper))
    return [*paper, *extra]


# ---- formatting --------------------------------------------------------------------------------


def fmt(v: Any, digits: int = 2) -> str:
    """A table cell: numbers rounded, NaN/None as n/a, strings as they are."""
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, numbers.Integral):
        return str(int(v))
    if isinstance(v, numbers.Real):
        return "n/a" if math.isnan(v) else f"{float(v):.{digits}f}"
    return str(v)


def fmt_seconds(s: float | None) -> str:
    """Seconds as the paper writes times: s below 2 min, min below 2 h, else h."""
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "n/a"
    if s < 120:
        return f"{s:.2f}s"
    if s < 7200:
        return f"{s / 60:.2f}min"
    return f"{s / 3600:.2f}h"


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub Markdown table of already formatted cells (no tabulate dependency)."""
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(str(v) for v in r) + " |" for r in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])


def write_table(
    df: pd.DataFrame,
    csv_path: str | Path,
    md_path: str | Path,
    title: str,
    caption: str,
    notes: Sequence[str] = (),
) -> None:
    """Write the CSV (numbers) and the Markdown (caption first, then the formatted table)."""
    with atomic_path(csv_path) as tmp:
        df.to_csv(tmp, index=False)
    shown = df.copy()
    for c in shown.columns:
        shown[c] = shown[c].map(_cell)
    lines = [f"# {title}", "", caption, "", markdown_table(shown)]
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    with atomic_path(md_path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return fmt(v, 3 if abs(v) < 10 else 2)
    return fmt(v)


_SAMPLER_KEYS = ("fid_sampler", "asr_sampler")


def protocol_text(evals: pd.DataFrame) -> str:
    """One sentence per distinct protocol of the records (what every number was measured with);
    protocols that differ only in the sampler (each model's own) share one sentence naming them."""
    if evals.empty:
        return "No evaluation records."
    cols = [c for c in evals.columns if c.startswith("protocol.")]
    rest = [c for c in cols if c.removeprefix("protocol.") not in _SAMPLER_KEYS]
    raw = evals[cols].drop_duplicates().reset_index(drop=True)
    out = []
    for _, grp in raw.astype(str).groupby(rest, sort=False, dropna=False):
        g = {c.removeprefix("protocol."): raw.loc[grp.index[0], c] for c in cols}
        fid_s, asr_s = (_samplers(grp.get(f"protocol.{k}")) for k in _SAMPLER_KEYS)
        fe = (
            "Inception-v3 features (torch-fidelity inception-v3-compat, pool 2048)"
            if g.get("feature_extractor") == "inception"
            else "the penultimate-layer features of a classifier trained here on the dataset "
            "(not Inception: not comparable with published FIDs)"
        )
        out.append(
            f"Utility {g.get('utility_metric')}: Fréchet distance of {g.get('fid_n_samples')} "
            f"clean samples ({fid_s}, {_steps(g.get('fid_steps'))}) to "
            f"{g.get('n_reference')} training images, {fe}, via torch-fidelity. "
            f"ASR (Eq. 15): {g.get('asr_n_samples')} backdoor samples ({asr_s}, "
            f"{_steps(g.get('asr_steps'))}, clip_sample={g.get('clip_sample')}); image targets "
            f"count MSE < κ_m = {g.get('mse_threshold')} (pixels in {g.get('mse_range')}), class "
            f"targets the classifier's target-class share."
        )
    return " ".join(out)


def _samplers(column: pd.Series | None) -> str:
    """One sampler's name, or several as each model's own (in order of appearance)."""
    names = list(dict.fromkeys(column)) if column is not None else ["None"]
    return names[0] if len(names) == 1 else f"each model's own sampler ({', '.join(names)})"


def _steps(s: Any) -> str:
    return (
        "all steps" if s is None or (isinstance(s, float) and math.isnan(s)) else f"{int(s)} steps"
    )


def _mean(s: pd.Series) -> float:
    s = pd.to_numeric(s, errors="coerce").dropna()
    return float(s.mean()) if len(s) else math.nan


def utility_name(evals: pd.DataFrame) -> str:
    """The utility metric's label when the records agree (``FID`` or ``FD-<data>-cls``), else a
    neutral name (each row then names its metric)."""
    labels = evals["utility_metric"].dropna().unique()
    return str(labels[0]) if len(labels) == 1 else "utility (FID/FD, see metric column)"


# ---- Table 1: trigger inversion and detection --------------------------------------------------


def _method_asr(sub: pd.DataFrame, method: str) -> float:
    """Mean ASR of a method's (first-seed) trigger over backdoored models of ``sub``."""
    vals = [r.get(method, {}).get("asr") for r in sub["inverted_by_method"] if isinstance(r, dict)]
    vals = [v for v in vals if v is not None]
    return float(sum(vals) / len(vals)) if vals else math.nan


def table1(evals: pd.DataFrame, verdicts: pd.DataFrame) -> pd.DataFrame:
    """ACC (clean and backdoored models of the group) and ASR of the inverted trigger (mean over
    backdoored models, original state) per attack and group, per inversion method; ACC of the
    combined verdict (any method's trigger reaching κ_d) last."""
    orig = evals[evals["state"] == "original"].drop_duplicates("model").copy()
    orig["key"] = row_keys(orig, "table1")
    present = [m for m in verdicts["method"].unique() if m != "combined"]
    methods = list(dict.fromkeys(["elijah", "bbti", *present]))
    rows = []
    for key in ordered_keys("table1", orig["key"]):
        sub = orig[orig["key"] == key]
        r: dict[str, Any] = {"Attack": key[0], "Model": key[1]}
        if sub.empty:
            r["Models"] = NO_MODEL
        else:
            r["Models"] = (
                f"{int((~sub['backdoored']).sum())} clean / {int(sub['backdoored'].sum())} bd"
            )
        for m in [*methods, "combined"]:
            lab = METHOD_LABELS.get(m, m)
            v = verdicts[(verdicts["method"] == m) & verdicts["model"].isin(sub["model"])]
            cols = [f"{lab} ACC"] if m == "combined" else [f"{lab} ACC", f"{lab} ASR"]
            if sub.empty:
                r |= dict.fromkeys(cols, NO_MODEL)
                continue
            if v.empty:
                r |= dict.fromkeys(cols, NOT_RUN)
                continue
            truth = v["model"].map(sub.set_index("model")["backdoored"])
            r[f"{lab} ACC"] = float((v["flagged"] == truth).mean())
            if m != "combined":
                bd = sub[sub["backdoored"]]
                r[f"{lab} ASR"] = _method_asr(bd, m) if len(bd) else "no backdoored model"
        rows.append(r)
    return pd.DataFrame(rows)


def table_i(evals: pd.DataFrame, methods: Sequence[str] = ("elijah", "purediffusion")
            ) -> pd.DataFrame:
    """PureDiffusion's Table I: per backdoored model (original state), the uniform score, ASR and
    L2 distance to the true trigger of the ground-truth trigger (GT) and of each method's
    first-seed inverted trigger (same noise for all)."""
    orig = evals[(evals["state"] == "original") & evals["backdoored"].astype(bool)]
    orig = orig.drop_duplicates("model").sort_values("model")
    rows = []
    for _, e in orig.iterrows():
        by = e["inverted_by_method"] if isinstance(e["inverted_by_method"], dict) else {}
        base = {"Model": e["model"], "Trigger": e["trigger"], "Target": e["target"]}
        rows.append(base | {"Method": "GT", "Uniform": e["uniform_real"], "ASR": e["asr_real"],
                            "L2 dist": 0.0})
        for m in methods:
            d = by.get(m)
            if d is None:
                rows.append(base | {"Method": METHOD_LABELS.get(m, m), "Uniform": NOT_RUN,
                                    "ASR": NOT_RUN, "L2 dist": NOT_RUN})
                continue
            rows.append(base | {"Method": METHOD_LABELS.get(m, m), "Uniform": d["uniform_score"],
                                "ASR": d["asr"], "L2 dist": d["l2_to_true_trigger"]})
    cols = ["Model", "Trigger", "Target", "Method", "Uniform", "ASR", "L2 dist"]
    return pd.DataFrame(rows, columns=cols)


# ---- Tables 2 and 4: removal -------------------------------------------------------------------


NO_REMOVAL = "removal not run"


def _removal_rows(evals: pd.DataFrame, table: str) -> tuple[pd.DataFrame, set[tuple[str, ...]]]:
    """Removed states of backdoored models (with their row key), and the keys of every group
    that has backdoored models in the zoo (removed or not)."""
    bd = evals[evals["backdoored"].astype(bool)].copy()
    bd["key"] = row_keys(bd, table)
    zoo = set(bd["key"])
    return bd[bd["state"] != "original"], zoo


def _empty_cell(key: tuple[str, ...], zoo: set[tuple[str, ...]]) -> str:
    """What a cell without data says: the zoo has no such model, or removal did not run on it."""
    return NO_REMOVAL if key in zoo else NO_MODEL


def table2(
    evals: pd.DataFrame,
    strategies: Sequence[str] = ("diffpruning", "diffcleanse"),
    finetune_loss: str = "p",
) -> pd.DataFrame:
    """ΔFID/ΔFD and ΔASR (real trigger) per attack and group, per pruning strategy, after pruning
    and after fine-tuning with ``finetune_loss``; mean over backdoored models. The k-th ratio of
    each strategy shares a row."""
    strategies = paper_order(strategies, ("diffpruning", "diffcleanse"))
    rem, zoo = _removal_rows(evals, "table2")
    name = utility_name(evals)
    labels = [STRATEGY_LABELS.get(s, s) for s in strategies]
    rows = []
    for key in ordered_keys("table2", zoo):
        sub = rem[rem["key"] == key]
        if sub.empty:
            empty = _empty_cell(key, zoo)
            r: dict[str, Any] = {"Attack": key[0], "Model": key[1], "State": "-"}
            for lab in labels:
                r |= {
                    f"{lab} ratio": empty,
                    f"{lab} n": 0,
                    f"{lab} Δ{name}": empty,
                    f"{lab} ΔASR": empty,
                }
            rows.append(r)
            continue
        for state in ("pruned", "finetuned"):
            st = sub[sub["state"] == state]
            if state == "finetuned":
                st = st[st["loss"] == finetune_loss]
            ratios = {
                s: sorted(st[st["strategy"] == s]["ratio"].dropna().unique(), key=float)
                for s in strategies
            }
            for i in range(max([len(v) for v in ratios.values()] + [1])):
                r = {
                    "Attack": key[0],
                    "Model": key[1],
                    "State": "pruned"
                    if state == "pruned"
                    else f"fine-tuned (loss_{finetune_loss})",
                }
                for s, lab in zip(strategies, labels, strict=True):
                    if i >= len(ratios[s]):
                        r |= {
                            f"{lab} ratio": NOT_RUN,
                            f"{lab} n": 0,
                            f"{lab} Δ{name}": NOT_RUN,
                            f"{lab} ΔASR": NOT_RUN,
                        }
                        continue
                    cell = st[(st["strategy"] == s) & (st["ratio"] == ratios[s][i])]
                    r |= {
                        f"{lab} ratio": ratios[s][i],
                        f"{lab} n": int(cell["model"].nunique()),
                        f"{lab} Δ{name}": _mean(cell["delta_utility"]),
                        f"{lab} ΔASR": _mean(cell["delta_asr_real"]),
                    }
                rows.append(r)
    return pd.DataFrame(rows)


def table4(
    evals: pd.DataFrame, strategy: str = "diffcleanse", losses: Sequence[str] = ("c", "p")
) -> pd.DataFrame:
    """Fine-tuning with loss_c vs loss_p (Diff-Cleanse pruning): ΔFID/ΔFD and ΔASR per attack and
    group and ratio, mean over backdoored models."""
    losses = paper_order(losses, ("c", "p"))
    rem, zoo = _removal_rows(evals, "table4")
    rem = rem[(rem["state"] == "finetuned") & (rem["strategy"] == strategy)]
    name = utility_name(evals)
    rows = []
    for key in ordered_keys("table4", zoo):
        sub = rem[rem["key"] == key]
        ratios = sorted(sub["ratio"].dropna().unique(), key=float) or [None]
        for ratio in ratios:
            r: dict[str, Any] = {
                "Attack": key[0],
                "Model": key[1],
                "ratio": ratio if ratio is not None else "-",
            }
            for loss in losses:
                cell = sub[(sub["ratio"] == ratio) & (sub["loss"] == loss)]
                if sub.empty:
                    empty = _empty_cell(key, zoo)
                    r |= {f"loss_{loss} Δ{name}": empty, f"loss_{loss} ΔASR": empty}
                elif cell.empty:
                    r |= {f"loss_{loss} Δ{name}": NOT_RUN, f"loss_{loss} ΔASR": NOT_RUN}
                else:
                    r |= {
                        f"loss_{loss} Δ{name}": _mean(cell["delta_utility"]),
                        f"loss_{loss} ΔASR": _mean(cell["delta_asr_real"]),
                    }
            r["n"] = int(sub[sub["ratio"] == ratio]["model"].nunique()) if ratio else 0
            rows.append(r)
    return pd.DataFrame(rows)


# ---- Table 3: the entropy-loss ablation --------------------------------------------------------


def table3(evals: pd.DataFrame, verdicts: pd.DataFrame, ablation: pd.DataFrame) -> pd.DataFrame:
    """ACC and inverted-trigger ASR of BBTI with ℓ_s alone (``ablation``: model, flagged,
    asr_inverted) and with ℓ_s + ℓ_e (the main run), per attack."""
    orig = evals[evals["state"] == "original"].drop_duplicates("model").copy()
    orig["key"] = row_keys(orig, "table3")
    main = verdicts[verdicts["method"] == "bbti"].set_index("model")
    abl = ablation.set_index("model") if len(ablation) else ablation
    rows = []
    for key in ordered_keys("table3", orig["key"]):
        sub = orig[orig["key"] == key]
        r: dict[str, Any] = {"Attack": key[0], "Models": len(sub) if len(sub) else NO_MODEL}
        for lab, flags, asr in (
            (
                "ℓ_s",
                abl.get("flagged") if len(abl) else None,
                abl.get("asr_inverted") if len(abl) else None,
            ),
            ("ℓ_s + ℓ_e", main.get("flagged"), sub.set_index("model")["asr_inverted"]),
        ):
            if sub.empty:
                r[f"{lab} ACC"] = r[f"{lab} ASR"] = NO_MODEL
                continue
            ids = [m for m in sub["model"] if flags is not None and m in flags.index]
            if not ids:
                r[f"{lab} ACC"] = r[f"{lab} ASR"] = NOT_RUN
                continue
            truth = sub.set_index("model")["backdoored"]
            r[f"{lab} ACC"] = float((flags[ids].astype(bool) == truth[ids]).mean())
            bd = [m for m in ids if truth[m]]
            r[f"{lab} ASR"] = _mean(pd.Series([asr.get(m) for m in bd], dtype=float))
        rows.append(r)
    return pd.DataFrame(rows)


def load_ablation(paths: Iterable[str | Path]) -> pd.DataFrame:
    """Ablation records (``evaluation.ablate_entropy_loss``/``ablate_threshold``) as a table."""
    rows = [read_json(p) for p in as_paths(paths)]
    keep = (
        "model",
        "ablation",
        "value",
        "flagged",
        "mscr",
        "asr_inverted",
        "asr_real",
        "utility",
        "utility_metric",
        "delta_utility",
        "delta_asr_real",
        "attack",
        "group",
        "backdoored",
        "T",
        "num_train_timesteps",
    )
    return pd.DataFrame([{k: r.get(k) for k in keep} for r in rows], columns=list(keep))


# ---- Table 7: time costs -----------------------------------------------------------------------


def table7(
    evals: pd.DataFrame,
    bench: pd.DataFrame,
    *,
    strategy: str = "diffcleanse",
    finetune_loss: str = "p",
    methods: Sequence[str] = ("bbti",),
) -> pd.DataFrame:
    """Mean wall-clock time per model of training, each inversion method (first seed), backdoor
    removal (importance + pruning) and fine-tuning, per attack (clean models: their own row),
    from benchmark files."""
    orig = evals[evals["state"] == "original"].drop_duplicates("model").copy()
    orig["key"] = [(ATTACK_LABELS.get(a, a),) for a in orig["attack"]]
    b = bench.copy()
    for c in ("strategy", "loss", "ratio", "method", "seed"):
        if c not in b.columns:
            b[c] = None
    first_seed = b.loc[b["rule"] == "invert_trigger", "seed"].dropna()
    if len(first_seed):
        b = b[(b["rule"] != "invert_trigger") | (b["seed"] == min(first_seed, key=int))]

    def per_model(rule: str, ids: Sequence[str], **match: Any) -> pd.Series:
        sel = b[(b["rule"] == rule) & b["model"].isin(ids)]
        for k, v in match.items():
            sel = sel[sel[k].isna() | (sel[k] == v)]
        return sel.groupby("model")["s"].sum()

    rows = []
    keys = ordered_keys("table7", orig["key"])
    for key in keys:
        sub = orig[orig["key"] == key]
        ids = list(sub["model"])
        r: dict[str, Any] = {"Attack": key[0], "Models": len(ids) if ids else NO_MODEL}
        if not ids:
            r |= dict.fromkeys(("Training", *[METHOD_LABELS.get(m, m) for m in methods],
                                "Backdoor Removal", "Fine-tuning"), NO_MODEL)
            rows.append(r)
            continue
        train = per_model("train_model", ids)
        removal_models = per_model("importance", ids)
        prune = b[(b["rule"] == "prune") & b["model"].isin(ids) & (b["strategy"] == strategy)]
        ft = b[
            (b["rule"] == "finetune")
            & b["model"].isin(ids)
            & (b["strategy"] == strategy)
            & (b["loss"] == finetune_loss)
        ]
        r["Training"] = float(train.mean()) if len(train) else "not trained here"
        for m in methods:
            inv = per_model("invert_trigger", ids, method=m)
            r[METHOD_LABELS.get(m, m)] = float(inv.mean()) if len(inv) else NOT_RUN
        if len(removal_models) and len(prune):
            # per run of removal: the model's importance plus one pruning
            r["Backdoor Removal"] = float(removal_models.mean() + prune["s"].mean())
        else:
            r["Backdoor Removal"] = NOT_RUN
        r["Fine-tuning"] = float(ft["s"].mean()) if len(ft) else NOT_RUN
        rows.append(r)
    return pd.DataFrame(rows)


def _seconds_cells(df: pd.DataFrame, cols: Sequence[str]) -> pd.DataFrame:
    out = df.copy()
    for c in cols:
        out[c] = out[c].map(lambda v: fmt_seconds(v) if isinstance(v, float) else v)
    return out


# ---- everything at once ------------------------------------------------------------------------


def build_tables(
    evaluations: Sequence[str | Path],
    verdicts: Sequence[str | Path],
    outputs: dict[str, str | Path],
    *,
    benchmarks: Sequence[dict[str, Any]] = (),
    entropy_ablation: Sequence[str | Path] | None = None,
    strategies: Sequence[str] = ("diffpruning", "diffcleanse"),
    losses: Sequence[str] = ("c", "p"),
    finetune_loss: str = "p",
    device: str = "cpu",
    methods: Sequence[str] = ("bbti",),
) -> dict[str, pd.DataFrame]:
    """Write the tables named in ``outputs`` (keys ``evaluation_csv``, ``table1_csv``,
    ``table1_md``, ... ``table7_md``; ``table3_*`` only with ``entropy_ablation``)."""
    ev = load_evaluations(evaluations)
    vd = load_verdicts(verdicts)
    proto = protocol_text(ev)
    out: dict[str, pd.DataFrame] = {"evaluation": ev}
    if "evaluation_csv" in outputs:
        flat = ev.drop(columns=["record", "inverted_by_method"], errors="ignore")
        for m in methods:
            for key, col in (("asr", "asr"), ("uniform_score", "uniform"),
                             ("l2_to_true_trigger", "l2_to_true")):
                flat[f"{col}_{m}"] = [
                    (d.get(m) or {}).get(key) if isinstance(d, dict) else None
                    for d in ev.get("inverted_by_method", [None] * len(ev))]
        with atomic_path(outputs["evaluation_csv"]) as tmp:
            flat.to_csv(tmp, index=False)
    name = utility_name(ev)
    empty_note = (
        f"Rows reading '{NO_MODEL}' are groups of the paper's table the zoo has no model of."
    )
    if "table1_csv" in outputs:
        t = table1(ev, vd)
        write_table(
            t,
            outputs["table1_csv"],
            outputs["table1_md"],
            "Table 1: trigger inversion and backdoor detection",
            f"ACC: share of the group's clean and backdoored models whose verdict "
            f"(MSCR ≥ κ_d of the method's first-seed trigger, under the model's own sampler) "
            f"is right; Combined: flagged when any method's trigger reaches κ_d (at least half "
            f"of the seeds). ASR: attack success rate of the method's inverted trigger on the "
            f"original model, mean over the group's backdoored models. Each method's own "
            f"detector (Elijah's random forest, TERD's and PureDiffusion's calibrated "
            f"thresholds) is in results/tables/detection.md. {proto}",
            [empty_note, "'not run': the method is not in inversion.methods."],
        )
        out["table1"] = t
    if "tableI_csv" in outputs:
        t = table_i(ev, [m for m in methods if m != "bbti"] or ["elijah", "purediffusion"])
        write_table(
            t,
            outputs["tableI_csv"],
            outputs["tableI_md"],
            "PureDiffusion's Table I: ground truth vs each method's inverted trigger",
            f"Per backdoored model, original state: Uniform = mean pairwise MSE (pixels in "
            f"[0, 1]) of samples from noise + trigger (lower: more uniform); ASR with the "
            f"same noise; L2 dist = L2 distance of the trigger to the true trigger (the "
            f"attack's additive offset). {proto}",
            ["'not run': the method is not in inversion.methods."],
        )
        out["tableI"] = t
    removal_note = (
        f"'{NO_REMOVAL}': the zoo has backdoored models of the group, but removal ran on none "
        f"of them (removal.run_on; with 'flagged', none was flagged)."
    )
    if "table2_csv" in outputs:
        t = table2(ev, strategies, finetune_loss)
        write_table(
            t,
            outputs["table2_csv"],
            outputs["table2_md"],
            "Table 2: pruning-based removal, Diff-Pruning vs Diff-Cleanse",
            f"Δ{name} and ΔASR (real trigger) after minus before removal, mean over the "
            f"group's backdoored models that removal ran on, after pruning and after "
            f"fine-tuning (loss_{finetune_loss}); ratio is the per-layer pruning ratio. "
            f"Lower is better. {proto}",
            [empty_note, removal_note],
        )
        out["table2"] = t
    if "table3_csv" in outputs:
        abl = load_ablation(entropy_ablation or [])
        t = table3(ev, vd, abl)
        write_table(
            t,
            outputs["table3_csv"],
            outputs["table3_md"],
            "Table 3: BBTI with ℓ_s alone vs ℓ_s + ℓ_e",
            f"ACC and inverted-trigger ASR of BBTI without the entropy loss (ablation "
            f"runs) and with it (the main run), per attack. {proto}",
            [empty_note],
        )
        out["table3"] = t
    if "table4_csv" in outputs:
        t = table4(ev, "diffcleanse", losses)
        write_table(
            t,
            outputs["table4_csv"],
            outputs["table4_md"],
            "Table 4: fine-tuning with loss_c vs loss_p (Diff-Cleanse)",
            f"Δ{name} and ΔASR (real trigger) of Diff-Cleanse-pruned models after "
            f"fine-tuning with loss_c (clean loss) or loss_p = loss_c + loss_b, mean over "
            f"backdoored models. {proto}",
            [empty_note, removal_note],
        )
        out["table4"] = t
    if "table7_csv" in outputs:
        bench = load_benchmarks(benchmarks)
        t = table7(ev, bench, finetune_loss=finetune_loss, methods=methods)
        cols = ["Training", *[METHOD_LABELS.get(m, m) for m in methods], "Backdoor Removal",
                "Fine-tuning"]
        with atomic_path(outputs["table7_csv"]) as tmp:
            t.to_csv(tmp, index=False)
        shown = _seconds_cells(t, cols)
        lines = [
            "# Table 7: time cost per model",
            "",
            f"Mean wall-clock time per model from Snakemake benchmark files (column s), "
            f"device '{device}': training (rule train_model; fetched models are not trained "
            f"here), each inversion method (invert_trigger, first seed), backdoor removal "
            f"(importance + prune, "
            f"Diff-Cleanse, per pruning run), fine-tuning (finetune, Diff-Cleanse, "
            f"loss_{finetune_loss}). Clean models form their own row.",
            "",
            markdown_table(shown.map(str)),
            "",
            f"- {empty_note}",
        ]
        with atomic_path(outputs["table7_md"]) as tmp:
            tmp.write_text("\n".join(lines) + "\n")
        out["table7"] = t
    return out


# ---- the removal ablation (a generalised Fig. 6) -------------------------------------------------


def load_removal_ablation(paths: Iterable[str | Path]) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Every row of the ``removal_ablation`` records (one per variant, trigger source and seed),
    and the records' protocols."""
    rows, protocols = [], []
    for p in as_paths(paths):
        rec = read_json(p)
        protocols.append({"model": rec["model"], "trigger_source": rec["trigger_source"],
                          "utility_metric": rec["utility_metric"], **rec["protocol"]})
        rows += rec["rows"]
    return pd.DataFrame(rows), protocols


ABLATION_VALUES = {  # column of the table -> record field
    "channels": "channels_removed",
    "channels %": "channels_fraction",
    "params %": "params_fraction",
    "ASR pruned": "asr_real_pruned",
    "ASR fine-tuned": "asr_real_finetuned",
    "ΔU pruned": "delta_utility_pruned",
    "ΔU fine-tuned": "delta_utility_finetuned",
    "out-of-range (trig.)": "out_of_range_triggered_finetuned",
    "U of triggered": "fd_triggered_finetuned",
}


def _spread(s: pd.Series) -> str:
    """``mean`` for one value, ``mean (min–max)`` over seeds."""
    v = pd.to_numeric(s, errors="coerce").dropna()
    if v.empty:
        return "n/a"
    if (v == v.round()).all() and v.abs().max() >= 1:
        v = v.round().astype(int)
        mean = float(v.mean())
        m = str(int(mean)) if mean == int(mean) else f"{mean:.1f}"
        return m if v.min() == v.max() else f"{m} ({v.min()}–{v.max()})"
    m = _cell(float(v.mean()))
    return m if len(v) == 1 or v.min() == v.max() else f"{m} ({_cell(float(v.min()))}–" \
        f"{_cell(float(v.max()))})"


def removal_ablation_table(rows: pd.DataFrame) -> pd.DataFrame:
    """One line per model, trigger source and variant (family and ratio): removal and its cost,
    after pruning and after fine-tuning, as mean (min–max) over the seeds. ``U`` is the utility
    metric (FID, or the labelled classifier FD); "out-of-range" and "U of triggered" describe
    what noise + the real trigger generates after fine-tuning."""
    if rows.empty:
        return pd.DataFrame(columns=["model", "trigger", "variant", "ratio", "seeds",
                                     *ABLATION_VALUES])
    order = {"diffcleanse": 0, "diffpruning": 1, "random": 2}
    rows = rows.assign(_o=rows["strategy"].map(order).fillna(9))
    out = []
    keys = ["model", "trigger_source", "_o", "family", "ratio"]
    for (model, src, _, family, ratio), g in rows.sort_values(keys).groupby(keys, sort=False):
        line: dict[str, Any] = {"model": model, "trigger": src, "variant": family,
                                "ratio": ratio, "seeds": len(g)}
        for col, field in ABLATION_VALUES.items():
            line[col] = _spread(g[field]) if field in g else "n/a"
        out.append(line)
    return pd.DataFrame(out)


def removal_ablation_caption(protocols: Sequence[dict[str, Any]]) -> str:
    """What every number of the ablation table was measured with."""
    if not protocols:
        return "The removal ablation was not configured (removal.ablation.models)."
    p = protocols[0]
    s = p["sampler"]
    ft = p["finetune"]
    return (
        f"Removal ablation (generalised Fig. 6). U = {p['utility_metric']} of "
        f"{p['fid_n_samples']} clean samples; ASR with the real trigger over {p['asr_n_samples']} "
        f"samples ({s['name']}, {_steps(s['steps'])}, clip_sample={s['clip_sample']}), MSE < "
        f"κ_m = {p['mse_threshold']}; ΔU against the original model on the same noise. After "
        f"fine-tuning (loss_p, {ft['epochs']:g} epochs, lr {ft['lr']:g}, batch "
        f"{ft['batch_size']}): "
        f"the share of values of the triggered samples beyond ±{1 + p['range_margin']:g} "
        f"(before clamping) and U of the triggered samples (a backdoor replaced by garbage has "
        f"ASR 0 and a large U). Channels: output channels removed over the whole UNet (exact "
        f"per-layer budget, ceil(ratio × C)). Diff-Cleanse variants: normaliser (none = the "
        f"paper's raw I_b − I_c; mean = each group's scores over their mean, the official code), "
        f"I_c at t > T (T = {p['importance']['t_threshold_frac']:g} of the schedule) or over all "
        f"t; I_b at t > T. Values: mean (min–max) over seeds."
    )
