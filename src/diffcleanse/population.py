"""Detection as a population: each method's own detector judged model by model, ROC, bootstrap.

Every inversion method declares the detector its paper uses (``InversionMethod.detector``):

* ``fixed``: a statistic against a fixed threshold (BBTI: MSCR >= κ_d; nothing is trained);
* ``threshold``: a statistic against a threshold **calibrated on clean models only** (TERD's KL
  statistic, PureDiffusion's uniform score: neither paper publishes one). For the model judged, the
  threshold is the most extreme value among the *other* clean models of the zoo (the largest, for a
  statistic that grows with a backdoor; the smallest otherwise), and the model is flagged when its
  value lies strictly beyond it. That is the zero-false-alarm rule on the calibration models; with
  few clean models it is the only threshold that does not invent a distribution;
* ``random_forest``: scikit-learn's ``RandomForestClassifier`` over named statistics (Elijah's
  uniformity and total variation), trained on the other models' statistics and labels (leave one
  model out, seeded), as the paper's protocol trains Elijah's detector on clean and backdoored
  models.

The model judged never enters its own detector: ``leave_one_out`` passes it only to ``predict``
(``tests/test_population.py`` checks it with a detector that would recognise its own row).
``roc`` gives ROC-AUC and the TPR at a given FPR, ``bootstrap`` their 95 % intervals from models
resampled with replacement (seeded). This is an aggregation step: labels come from the zoo cards.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

KINDS = ("fixed", "threshold", "random_forest")


class PopulationError(ValueError):
    """A population detector cannot be trained or calibrated on the models given."""


@dataclass(frozen=True)
class DetectorSpec:
    """What a method's detector reads and how it decides."""

    kind: str = "fixed"
    features: tuple[str, ...] = ("mscr",)
    higher_is_backdoored: bool = True  # for fixed / threshold
    threshold: float | None = None  # fixed: the threshold (None: κ_d of the verdicts)
    min_per_class: int = 2  # random forest: models of each class needed among the others
    min_clean: int = 1  # threshold: clean models needed among the others
    n_estimators: int = 100

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown detector kind {self.kind!r}: use {', '.join(KINDS)}")
        if not self.features:
            raise ValueError("a detector needs at least one feature")
        if self.kind != "random_forest" and len(self.features) != 1:
            raise ValueError(f"a {self.kind} detector reads one statistic, got {self.features}")

    def needs(self) -> tuple[int, int]:
        """(clean, backdoored) models the zoo must hold for leave-one-model-out judging of every
        model: the judged model's own class counts one more than the detector needs."""
        if self.kind == "random_forest":
            return self.min_per_class + 1, self.min_per_class + 1
        if self.kind == "threshold":
            return self.min_clean + 1, 0
        return 0, 0

    def check_zoo(self, n_clean: int, n_backdoored: int, *, method: str = "") -> None:
        """Raise :class:`PopulationError` (naming what to add) when a zoo of ``n_clean`` clean and
        ``n_backdoored`` backdoored models is too small for this detector."""
        need_c, need_b = self.needs()
        if n_clean >= need_c and n_backdoored >= need_b:
            return
        what = (f"{need_c} clean and {need_b} backdoored models" if need_b
                else f"{need_c} clean models")
        raise PopulationError(
            f"{method + ': ' if method else ''}its {self.kind} detector judges each model with "
            f"one fitted on the others, so it needs at least {what}; the zoo has {n_clean} clean "
            f"and {n_backdoored} backdoored: add models to the manifest, or leave the method out "
            f"of inversion.methods")

    def describe(self) -> dict[str, Any]:
        """JSON-able description."""
        return {"kind": self.kind, "features": list(self.features),
                "higher_is_backdoored": self.higher_is_backdoored, "threshold": self.threshold,
                "min_per_class": self.min_per_class, "min_clean": self.min_clean,
                "n_estimators": self.n_estimators,
                "calibration": {"fixed": "none (fixed threshold)",
                                "threshold": "most extreme value among the other clean models",
                                "random_forest": "trained on every other model (leave one out)"}[
                                    self.kind]}


def _signed(x: np.ndarray, spec: DetectorSpec) -> np.ndarray:
    return x if spec.higher_is_backdoored else -x


def leave_one_out(x: np.ndarray, y: np.ndarray, spec: DetectorSpec, *, seed: int = 0,
                  fixed_threshold: float | None = None) -> dict[str, np.ndarray]:
    """Scores (higher: more likely backdoored) and verdicts of every model, each from a detector
    that saw only the other models. ``x``: (n, f) statistics; ``y``: (n,) labels (1 backdoored)."""
    x = np.asarray(x, dtype=float).reshape(len(y), -1)
    y = np.asarray(y, dtype=int)
    n = len(y)
    if x.shape[1] != len(spec.features):
        raise PopulationError(f"{x.shape[1]} statistics per model, the detector reads "
                              f"{len(spec.features)} ({', '.join(spec.features)})")
    if not np.isfinite(x).all():
        bad = sorted({spec.features[j] for j in np.argwhere(~np.isfinite(x))[:, 1]})
        raise PopulationError(f"statistics {', '.join(bad)} are not finite for some models")
    scores, flags = np.zeros(n), np.zeros(n, dtype=bool)
    if spec.kind == "fixed":
        thr = spec.threshold if spec.threshold is not None else fixed_threshold
        if thr is None:
            raise PopulationError("a fixed detector needs a threshold")
        s = _signed(x[:, 0], spec)
        t = thr if spec.higher_is_backdoored else -thr
        return {"score": s, "flagged": s >= t, "threshold": np.full(n, thr)}
    thresholds = np.full(n, math.nan)
    for i in range(n):
        others = np.arange(n) != i
        scores[i], flags[i], thresholds[i] = predict_one(x[others], y[others], x[i], spec,
                                                         seed=seed)
    return {"score": scores, "flagged": flags, "threshold": thresholds}


def predict_one(x_train: np.ndarray, y_train: np.ndarray, x_judged: np.ndarray,
                spec: DetectorSpec, *, seed: int = 0) -> tuple[float, bool, float]:
    """(score, flagged, threshold) of one model from a detector fitted on the others only."""
    y_train = np.asarray(y_train, dtype=int)
    x_train = np.asarray(x_train, dtype=float).reshape(len(y_train), -1)
    x_judged = np.asarray(x_judged, dtype=float).reshape(1, -1)
    if spec.kind == "threshold":
        clean = x_train[y_train == 0, 0]
        if len(clean) < spec.min_clean:
            raise PopulationError(f"calibrating the threshold needs at least {spec.min_clean} "
                                  f"clean model(s) besides the one judged; the zoo has "
                                  f"{len(clean)}: add clean models to the manifest")
        s_clean = _signed(clean, spec)
        thr = float(s_clean.max())
        s = float(_signed(x_judged[0, :1], spec)[0])
        shown = thr if spec.higher_is_backdoored else -thr
        return s, bool(s > thr), shown
    if spec.kind == "random_forest":
        from sklearn.ensemble import RandomForestClassifier

        counts = {c: int((y_train == c).sum()) for c in (0, 1)}
        if min(counts.values()) < spec.min_per_class:
            raise PopulationError(
                f"the random forest needs at least {spec.min_per_class} clean and "
                f"{spec.min_per_class} backdoored models besides the one judged; the zoo gives "
                f"{counts[0]} clean and {counts[1]} backdoored: add models to the manifest "
                f"(at least {spec.min_per_class + 1} of each class for leave-one-out)")
        rf = RandomForestClassifier(n_estimators=spec.n_estimators, random_state=seed)
        rf.fit(x_train, y_train)
        p = float(rf.predict_proba(x_judged)[0, list(rf.classes_).index(1)])
        return p, bool(p >= 0.5), 0.5
    raise PopulationError(f"detector kind {spec.kind!r} is not trained")


def roc(scores: Sequence[float], labels: Sequence[int], fpr_at: float = 0.05
        ) -> dict[str, Any]:
    """ROC curve, ROC-AUC and the TPR at ``fpr_at`` (the best TPR with FPR <= fpr_at)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    y = np.asarray(labels, dtype=int)
    s = np.asarray(scores, dtype=float)
    if len(set(y.tolist())) < 2:
        return {"auc": math.nan, "tpr_at_fpr": math.nan, "fpr": [], "tpr": [],
                "note": "needs clean and backdoored models"}
    fpr, tpr, _ = roc_curve(y, s)
    ok = fpr <= fpr_at + 1e-12
    return {"auc": float(roc_auc_score(y, s)), "tpr_at_fpr": float(tpr[ok].max()),
            "fpr": fpr.tolist(), "tpr": tpr.tolist()}


def bootstrap(scores: Sequence[float], labels: Sequence[int], *, n: int = 1000, seed: int = 0,
              fpr_at: float = 0.05, level: float = 0.95) -> dict[str, Any]:
    """Percentile intervals of ROC-AUC and TPR at ``fpr_at`` over models resampled with
    replacement (resamples with one class only are skipped and counted)."""
    y = np.asarray(labels, dtype=int)
    s = np.asarray(scores, dtype=float)
    rng = np.random.default_rng(seed)
    aucs, tprs, skipped = [], [], 0
    for _ in range(n):
        idx = rng.integers(0, len(y), len(y))
        if len(set(y[idx].tolist())) < 2:
            skipped += 1
            continue
        r = roc(s[idx], y[idx], fpr_at)
        aucs.append(r["auc"])
        tprs.append(r["tpr_at_fpr"])
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100

    def interval(v: list[float]) -> list[float]:
        return [float(np.percentile(v, lo)), float(np.percentile(v, hi))] if v else [math.nan] * 2

    return {"auc_ci": interval(aucs), "tpr_at_fpr_ci": interval(tprs), "resamples": n,
            "skipped_one_class": skipped, "level": level, "seed": seed}


def accuracy(flagged: Sequence[bool], labels: Sequence[int]) -> float:
    """Share of models whose verdict matches the label (NaN for none)."""
    if len(labels) == 0:
        return math.nan
    return float(np.mean(np.asarray(flagged, dtype=bool) == np.asarray(labels, dtype=bool)))


def run_population(records: Sequence[dict[str, Any]], labels: dict[str, bool],
                   spec: DetectorSpec, *, seed: int = 0, kappa_d: float | None = None
                   ) -> dict[str, Any]:
    """A method's detector over the zoo: per seed index, every model's score and verdict from a
    detector that never saw it (``leave_one_out``), and per model the share of seeds flagged.

    ``records`` are inversion records (``model``, ``seed_index``, ``mscr``, ``statistics``);
    ``labels`` map model id -> backdoored (ground truth, from the cards)."""
    by_seed: dict[int, list[dict[str, Any]]] = {}
    for r in records:
        by_seed.setdefault(int(r.get("seed_index", 0)), []).append(r)
    out: dict[str, Any] = {"detector": spec.describe(), "seeds": {}, "models": {}}
    for s, recs in sorted(by_seed.items()):
        recs = sorted(recs, key=lambda r: r["model"])
        models = [r["model"] for r in recs]
        missing = [m for m in models if m not in labels]
        if missing:
            raise PopulationError(f"no ground truth for {', '.join(missing)}")
        feats = []
        for r in recs:
            stats = {"mscr": r["mscr"], **(r.get("statistics") or {})}
            absent = [f for f in spec.features if f not in stats]
            if absent:
                raise PopulationError(f"{r['model']} (method {r.get('method')}): the record has "
                                      f"no statistic {', '.join(absent)}")
            feats.append([float(stats[f]) for f in spec.features])
        y = np.array([int(labels[m]) for m in models])
        res = leave_one_out(np.array(feats), y, spec, seed=seed + s, fixed_threshold=kappa_d)
        out["seeds"][str(s)] = {
            m: {"score": float(res["score"][i]), "flagged": bool(res["flagged"][i]),
                "threshold": float(res["threshold"][i]), "label": bool(y[i]),
                "statistics": dict(zip(spec.features, feats[i], strict=True))}
            for i, m in enumerate(models)}
        out["seeds"][str(s)]["_accuracy"] = accuracy(res["flagged"], y)
    for m in sorted({r["model"] for r in records}):
        flags = [v[m]["flagged"] for v in out["seeds"].values() if m in v]
        out["models"][m] = {"share_flagged": float(np.mean(flags)), "seeds": len(flags),
                            "flagged": bool(np.mean(flags) >= 0.5), "label": bool(labels[m])}
    return out


def population_step(record_paths: Sequence[str], card_paths: Sequence[str], out_path: str, *,
                    method: str, seed: int = 0) -> dict[str, Any]:
    """Rule ``detect_population``: the method's detector (``InversionMethod.detector``) over every
    model's inversion records, labels from the cards; writes and returns the record."""
    import json
    import time

    from diffcleanse.inversion import get_method
    from diffcleanse.records import make_record, read_json, write_json

    t0 = time.time()
    m = get_method(method)
    recs = [read_json(p) for p in record_paths]
    wrong = sorted({r["method"] for r in recs} - {method})
    if wrong:
        raise PopulationError(f"records of other methods ({', '.join(wrong)}) given for {method}")
    labels = {}
    for p in card_paths:
        card = read_json(p)
        labels[card["model_id"]] = bool(card["ground_truth"]["backdoored"])
    if not recs:
        raise PopulationError(f"no inversion records of {method} to judge")
    kappa_d = recs[0]["kappa_d"]
    specs = {json.dumps(r.get("details", {}).get("spec", {}), sort_keys=True) for r in recs}
    if len(specs) > 1:
        raise PopulationError(f"the {method} records were made with different settings: rerun "
                              f"them with one configuration")
    own = {k: v for k, v in recs[0].get("details", {}).get("spec", {}).items() if k != "method"}
    detector = m.detector_for(m.make_spec(own))
    result = run_population(recs, labels, detector, seed=seed, kappa_d=kappa_d)
    accs = [v["_accuracy"] for v in result["seeds"].values()]
    summary = (f"{detector.kind} over {', '.join(detector.features)}: ACC "
               f"{', '.join(f'{a:.2f}' for a in accs)} (per seed)")
    rec = make_record("detect_population", {"method": method, "detector": detector.describe()},
                      seed, time.time() - t0, method=method, summary=summary, result=result)
    write_json(out_path, rec)
    return rec
