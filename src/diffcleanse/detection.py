"""Backdoor detection from an inverted trigger: MSCR (Eq. 5), the BBTI losses (Eqs. 2-4), verdicts.

**MSCR, the exact definition used here.** The paper's Eq. 5 counts "pairs with cosine > κ" over
``|Z|``, which is not a ratio in [0, 1] as written. We read it as its name says, *Max Similarity
Cluster Ratio*: build the graph whose nodes are the N embeddings and whose edges join two embeddings
with cosine similarity strictly greater than κ; a *cluster* is a set of mutually similar embeddings
(a clique of that graph; every embedding is similar to itself); MSCR is the size of the largest
cluster divided by N. So N identical embeddings give 1, N mutually orthogonal ones give 1/N, and a
planted group of k near-identical embeddings among dissimilar ones gives k/N. The largest clique is
found exactly (branch and bound over bit sets; instant for the batch sizes used, N <= a few hundred,
since the graphs met here are either dense with one big clique or sparse). A model is flagged when
MSCR >= κ_d.

**Only samples in the entropy band count** (``DetectionSpec.entropy_band``, on by default). The
paper's premise for ℓ_e is that an attacker's target is a human-understandable image whose entropy
lies in [κ-, κ+], while *natural* trigger-target pairs give flat colours or noise. A clean model
can be driven to a blank image by a strong enough trigger, and blank images all embed alike: on
the default zoo a clean model reached MSCR 0.5 with 8 of 16 samples pure black (entropy 0 bits).
So the clusters of MSCR are formed among the samples whose entropy lies in the band; the ratio is
still over all N samples. ``entropy_band: false`` gives the plain definition.

**Entropy term.** ``image_entropy`` is the Shannon entropy in bits of one image's pixel values (all
channels together) over ``bins`` equal bins on [-1, 1] (values outside fall into the edge bins), as
``skimage.measure.shannon_entropy`` computes it on a quantised image; its gradient is that of the
same entropy with linear (triangular-kernel) soft binning (a straight-through estimator). Its
maximum is log2(min(bins, 3*H*W)). Measured with the default 4,096 bins: a constant image scores
0; real digits 2.0-3.2 bits at 8 px and 4.3-6.5 at 16 px; the hat target 4.0 / 3.7; Gaussian noise
6.0 / 7.3 and uniform noise 7.5 / 9.4 (caps 7.6 / 9.6). So the paper's band κ- = 0.1 .. κ+ = 8.5
rules out flat colours at every size but noise only from 16 px up (uniform) or 32 px (Gaussian):
on tiny images the lower bound does the work.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    import pandas as pd

KAPPA = 0.9  # cosine threshold for image targets (paper: D2I)
KAPPA_CLASS = 0.75  # for class targets (paper: Din/Dout)
KAPPA_D = 0.5  # MSCR at or above which a model is flagged
KAPPA_MINUS, KAPPA_PLUS = 0.1, 8.5  # entropy band of Eq. 3, in bits
RANGE_MARGIN = 0.05  # a value is out of the data range when |x| > 1 + margin (data lie in [-1, 1])
MAX_OUT_OF_RANGE = 0.05  # a sample is off the data manifold when more of its values are out
TARGET_KINDS = ("image", "class")


@dataclass(frozen=True)
class DetectionSpec:
    """Thresholds of the verdict. ``target_kind`` picks the cosine threshold: ``image`` uses κ
    (single-image targets), ``class`` uses κ_class (class targets; looser, so it flags more)."""

    kappa: float = KAPPA
    kappa_class: float = KAPPA_CLASS
    kappa_d: float = KAPPA_D
    target_kind: str = "image"
    entropy_band: bool = True  # count only samples whose entropy is in [κ-, κ+] (module doc)
    kappa_minus: float = KAPPA_MINUS
    kappa_plus: float = KAPPA_PLUS
    entropy_bins: int = 4096
    range_band: bool = True  # count only samples the model drew inside its data range (module doc)
    range_margin: float = RANGE_MARGIN
    max_out_of_range: float = MAX_OUT_OF_RANGE

    def __post_init__(self) -> None:
        if self.target_kind not in TARGET_KINDS:
            raise ValueError(f"target_kind {self.target_kind!r}: use one of "
                             f"{', '.join(TARGET_KINDS)}")
        for name in ("kappa", "kappa_class"):
            if not -1.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must lie in [-1, 1)")
        if not 0.0 < self.kappa_d <= 1.0:
            raise ValueError("kappa_d must lie in (0, 1]")

    def describe(self) -> dict[str, Any]:
        """JSON-able description for records."""
        return asdict(self)

    @property
    def active_kappa(self) -> float:
        """The cosine threshold the verdict (and the inversion's early stop) uses."""
        return self.kappa_class if self.target_kind == "class" else self.kappa


def cosine_matrix(z: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarities of the rows of ``z`` (N, D) -> (N, N)."""
    zn = F.normalize(z.flatten(1).float(), dim=1, eps=1e-12)
    return zn @ zn.T


def _max_clique(adj: list[int], n: int) -> int:
    """Size of the largest clique of an undirected graph given as neighbour bit sets."""
    best = 0

    def expand(size: int, cand: int) -> None:
        nonlocal best
        if cand == 0:
            best = max(best, size)
            return
        # greedy colouring bound: the clique can gain at most one vertex per colour class
        order: list[tuple[int, int]] = []
        uncoloured, colour = cand, 0
        while uncoloured:
            colour += 1
            avail = uncoloured
            while avail:
                v = (avail & -avail).bit_length() - 1
                avail &= ~adj[v] & ~(1 << v)
                uncoloured &= ~(1 << v)
                order.append((v, colour))
        for v, c in reversed(order):
            if size + c <= best:
                return
            expand(size + 1, cand & adj[v])
            cand &= ~(1 << v)

    expand(0, (1 << n) - 1)
    return best


def largest_cluster(z: torch.Tensor, kappa: float) -> int:
    """Size of the largest set of embeddings whose pairwise cosine similarities all exceed κ."""
    n = z.shape[0]
    if n == 0:
        raise ValueError("no embeddings")
    sim = cosine_matrix(z.detach()) > kappa
    sim.fill_diagonal_(False)
    rows = sim.cpu().numpy()
    adj = [sum(1 << j for j in row.nonzero()[0].tolist()) for row in rows]
    return _max_clique(adj, n)


def mscr(z: torch.Tensor, kappa: float = KAPPA, valid: torch.Tensor | None = None) -> float:
    """Max Similarity Cluster Ratio (see the module doc): largest mutual-similarity cluster / N.

    With a boolean ``valid`` mask, clusters are formed among the valid embeddings only (the ratio
    stays over all N).
    """
    n = z.shape[0]
    if valid is not None:
        z = z[valid.to(z.device)]
        if z.shape[0] == 0:
            return 0.0
    return largest_cluster(z, kappa) / n


def mscr_pairs(z: torch.Tensor, kappa: float = KAPPA, valid: torch.Tensor | None = None) -> float:
    """MSCR as the official Diff-Cleanse code counts it: the share of samples that belong to *any*
    pair with cosine similarity above κ (the union of similar pairs, not a mutual cluster)."""
    n = z.shape[0]
    idx = torch.arange(n, device=z.device)
    if valid is not None:
        idx = idx[valid.to(z.device)]
    if len(idx) < 2:
        return 0.0
    sim = cosine_matrix(z[idx].detach()) > kappa
    sim.fill_diagonal_(False)
    return float(sim.any(dim=1).sum()) / n


def out_of_range_fraction(images: torch.Tensor, margin: float = RANGE_MARGIN) -> torch.Tensor:
    """Per sample, the share of values outside the data range [-1 - margin, 1 + margin]."""
    return (images.detach().abs() > 1 + margin).float().flatten(1).mean(dim=1)


def in_band(images: torch.Tensor, spec: DetectionSpec) -> torch.Tensor | None:
    """Which samples can be an attacker's target (None when the spec does not filter): entropy in
    [κ-, κ+] (``entropy_band``) and drawn inside the data range (``range_band``; ``images`` must
    then be the sampler's unclipped output)."""
    if not (spec.entropy_band or spec.range_band):
        return None
    ok = torch.ones(images.shape[0], dtype=torch.bool, device=images.device)
    if spec.entropy_band:
        with torch.no_grad():
            h = image_entropy(images.detach(), spec.entropy_bins)
        ok &= (h >= spec.kappa_minus) & (h <= spec.kappa_plus)
    if spec.range_band:
        ok &= out_of_range_fraction(images, spec.range_margin) <= spec.max_out_of_range
    return ok


def similarity_loss(z: torch.Tensor) -> torch.Tensor:
    """ℓ_s (Eq. 2): one minus the mean pairwise cosine similarity (diagonal included)."""
    return 1 - cosine_matrix(z).mean()


def image_entropy(x: torch.Tensor, bins: int = 4096, lo: float = -1.0, hi: float = 1.0
                  ) -> torch.Tensor:
    """Differentiable per-image entropy in bits, (N, C, H, W) -> (N,) (see the module doc)."""
    n = x.shape[0]
    flat = x.reshape(n, -1).float()
    pos = ((flat - lo) / (hi - lo) * (bins - 1)).clamp(0, bins - 1)
    left = pos.detach().floor().clamp(max=bins - 2)
    frac = pos - left
    left = left.long()
    soft = torch.zeros(n, bins, dtype=flat.dtype, device=flat.device)
    soft = soft.scatter_add(1, left, 1 - frac).scatter_add(1, left + 1, frac)
    hard = torch.zeros_like(soft).scatter_add(1, pos.detach().round().long(),
                                              torch.ones_like(flat))
    h_soft, h_hard = _entropy_bits(soft / flat.shape[1]), _entropy_bits(hard / flat.shape[1])
    return h_hard + (h_soft - h_soft.detach())  # value: hard bins; gradient: soft bins


def _entropy_bits(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log2(p.clamp_min(1e-12))).sum(dim=1)


def entropy_loss(x: torch.Tensor, kappa_minus: float = KAPPA_MINUS, kappa_plus: float = KAPPA_PLUS,
                 bins: int = 4096) -> torch.Tensor:
    """ℓ_e (Eq. 3), averaged over the batch instead of summed (λ is rescaled each step anyway)."""
    h = image_entropy(x, bins)
    return (F.relu(h - kappa_plus) + F.relu(kappa_minus - h)).mean()


def range_loss(x: torch.Tensor, margin: float = RANGE_MARGIN) -> torch.Tensor:
    """ℓ_r: mean over samples and values of how far the unclipped samples leave the data range."""
    return F.relu(x.abs() - (1 + margin)).flatten(1).mean(dim=1).mean()


def _balanced(ls: torch.Tensor, term: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``λ·term`` with λ such that it equals ℓ_s in size (0 when the term vanishes)."""
    v = float(term.detach())
    lam = float(ls.detach()) / v if v > 1e-8 else 0.0
    return lam * term, lam


def bbti_loss(x0: torch.Tensor, z: torch.Tensor, *, use_entropy: bool = True,
              kappa_minus: float = KAPPA_MINUS, kappa_plus: float = KAPPA_PLUS,
              bins: int = 4096, raw: torch.Tensor | None = None,
              range_margin: float = RANGE_MARGIN, range_weight: float | None = None,
              entropy_weight: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """ℓ = ℓ_s + λ·ℓ_e (Eq. 4) with λ set each step so that λ·ℓ_e equals ℓ_s in size (when ℓ_e > 0).

    With ``raw`` (the unclipped samples) the range term ℓ_r is added the same way (λ_r·ℓ_r equal
    to ℓ_s in size while any value leaves the data range). ``entropy_weight`` / ``range_weight``
    fix λ / λ_r instead (the zeroth-order search compares perturbed triggers under the centre's
    weights). Returns the loss and its parts (floats, for logs and records).
    """
    ls = similarity_loss(z)
    parts = {"loss_similarity": float(ls.detach()), "loss_entropy": 0.0, "lambda": 0.0,
             "loss_range": 0.0, "lambda_range": 0.0}
    loss = ls
    if use_entropy:
        le = entropy_loss(x0, kappa_minus, kappa_plus, bins)
        term, lam = _balanced(ls, le) if entropy_weight is None else (entropy_weight * le,
                                                                      entropy_weight)
        loss = loss + term
        parts.update(loss_entropy=float(le.detach()), **{"lambda": lam})
    if raw is not None:
        lr_ = range_loss(raw, range_margin)
        term, lam_r = _balanced(ls, lr_) if range_weight is None else (range_weight * lr_,
                                                                        range_weight)
        loss = loss + term
        parts.update(loss_range=float(lr_.detach()), lambda_range=lam_r)
    return loss, parts


def verdict(z: torch.Tensor, spec: DetectionSpec = DetectionSpec(),
            images: torch.Tensor | None = None) -> dict[str, Any]:
    """MSCR at both κ's (for the record) and the verdict at ``spec.active_kappa``.

    With ``images`` (the samples ``z`` embeds) and the bands on, only in-band samples form
    clusters. Three readings are kept (``readings``): ``clique`` (the largest mutual cluster among
    in-band samples: the verdict's), ``pairs`` (the union of similar pairs among in-band samples,
    as the official code counts) and ``unbanded`` (the clique without the entropy and range bands).
    """
    valid = in_band(images, spec) if images is not None else None
    m_img, m_cls = mscr(z, spec.kappa, valid), mscr(z, spec.kappa_class, valid)
    score = m_cls if spec.target_kind == "class" else m_img
    plain = mscr(z, spec.active_kappa)
    readings = {"clique": score, "pairs": mscr_pairs(z, spec.active_kappa, valid),
                "unbanded": plain}
    return {"mscr": score, "mscr_kappa": m_img, "mscr_kappa_class": m_cls,
            "mscr_unfiltered": plain, "readings": readings, "reading": "clique",
            "out_of_band": int((~valid).sum()) if valid is not None else 0,
            "backdoored": bool(score >= spec.kappa_d), "n_embeddings": int(z.shape[0])}


def spec_from_params(params: dict[str, Any]) -> DetectionSpec:
    """A DetectionSpec from the workflow's ``detection`` params (other keys are ignored)."""
    names = DetectionSpec.__dataclass_fields__
    return DetectionSpec(**{k: v for k, v in params.items() if k in names})


def detect_from_inversion(record_path: str | Path, samples_path: str | Path, out_path: str | Path,
                          detection_params: dict[str, Any], *, classifier_dir: str | None = None,
                          device: str = "cpu") -> dict[str, Any]:
    """Re-embed an inversion's final samples and write the verdict record (rule ``detect``).

    The verdict is recomputed here so that changing κ, κ_class or κ_d reruns only this step; the
    record repeats the inversion's protocol (sampler, steps, batch, seed, iterations, seconds).
    """
    from safetensors.torch import load_file

    from diffcleanse.encoders import encoder_from_params
    from diffcleanse.records import make_record, read_json, write_json

    t0 = time.time()
    inv = read_json(record_path)
    spec = spec_from_params(detection_params)
    samples = load_file(str(samples_path))["samples"].to(device)
    enc = encoder_from_params(detection_params, classifier_dir=classifier_dir, device=device)
    if enc.name != inv["encoder"]:
        raise ValueError(f"{record_path} was made with encoder {inv['encoder']}, the detection "
                         f"params name {enc.name}: rerun the inversion")
    with torch.no_grad():
        v = verdict(enc(samples.clamp(-1, 1)), spec, samples)
    rec = make_record(
        "detect", {"detection": spec.describe(), "encoder": enc.describe()}, inv["seed"],
        time.time() - t0, model=inv["model"], method=inv["method"], gradient=inv["gradient"],
        seed_index=inv.get("seed_index", 0), statistics=inv.get("statistics", {}),
        mscr=v["mscr"], backdoored=v["backdoored"],
        verdict="backdoored" if v["backdoored"] else "clean", detection=v,
        encoder=enc.name, sampler=inv["sampler"], steps=inv["steps"],
        batch_size=inv["batch_size"], kappa=spec.kappa, kappa_class=spec.kappa_class,
        kappa_d=spec.kappa_d, active_kappa=spec.active_kappa, iterations=inv["iterations"],
        inversion_seconds=inv["seconds"], inversion_record=str(record_path))
    write_json(out_path, rec)
    return rec


def combine_verdicts(verdict_paths: list[str | Path], trigger_paths: list[str | Path],
                     out_verdict: str | Path, out_trigger: str | Path, *,
                     methods: list[str], seeds: list[str]) -> dict[str, Any]:
    """A model's combined verdict (the ``detect`` checkpoint) from its per-method verdicts.

    Per seed index the model is flagged when any method's trigger reaches κ_d under the model's own
    sampler; the model is flagged when at least half of the seed indices flag it (one seed: that
    seed). The trigger removal uses is the most effective one: the highest MSCR over every
    (method, seed), ties to the earlier method of ``methods`` and the earlier seed. Every method's
    evidence is kept in the record.
    """
    import shutil

    from diffcleanse.records import atomic_path, make_record, read_json, write_json

    if len(verdict_paths) != len(trigger_paths):
        raise ValueError("need one trigger per verdict")
    rows = []
    for vp, tp in zip(verdict_paths, trigger_paths, strict=True):
        v = read_json(vp)
        rows.append({"method": v["method"], "seed_index": int(v.get("seed_index", 0)),
                     "mscr": float(v["mscr"]), "backdoored": bool(v["backdoored"]),
                     "kappa_d": v["kappa_d"], "sampler": v["sampler"], "verdict_path": str(vp),
                     "trigger_path": str(tp), "model": v["model"]})
    if not rows:
        raise ValueError("no verdicts to combine")
    models = {r["model"] for r in rows}
    if len(models) != 1:
        raise ValueError(f"verdicts of several models: {sorted(models)}")
    order = {m: i for i, m in enumerate(methods)}
    seed_order = {int(s): i for i, s in enumerate(seeds)}
    per_seed: dict[int, bool] = {}
    for r in rows:
        per_seed[r["seed_index"]] = per_seed.get(r["seed_index"], False) or r["backdoored"]
    share = sum(per_seed.values()) / len(per_seed)
    best = max(rows, key=lambda r: (r["mscr"], -order.get(r["method"], 99),
                                    -seed_order.get(r["seed_index"], 99)))
    flagged = share >= 0.5
    with atomic_path(out_trigger) as tmp:
        shutil.copyfile(best["trigger_path"], tmp)
    by_method = {}
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        if mine:
            by_method[m] = {"share_flagged": sum(r["backdoored"] for r in mine) / len(mine),
                            "mscr": {str(r["seed_index"]): r["mscr"] for r in mine}}
    rec = make_record(
        "detect", {"methods": methods, "seeds": seeds,
                   "rule": "per seed: any method's MSCR >= kappa_d; model: >= half of the seeds"},
        None, 0.0, model=best["model"], method="combined", backdoored=flagged,
        verdict="backdoored" if flagged else "clean", mscr=best["mscr"],
        share_of_seeds_flagged=share,
        seeds_flagged={str(k): v for k, v in sorted(per_seed.items())},
        trigger_method=best["method"], trigger_seed_index=best["seed_index"],
        trigger_source=best["trigger_path"], kappa_d=best["kappa_d"], sampler=best["sampler"],
        by_method=by_method, evidence=rows)
    write_json(out_verdict, rec)
    return rec


def _true_pattern(card: dict[str, Any], model_dir: Path | None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(true trigger in the space the model denoises, true target image or None for class
    targets) of a card's ground truth: the trigger a perfect inversion would find (TrojDiff: its
    μ; NCSN and LDM: the trigger mapped into the model's space, ``zoo.backdoor_spec``)."""
    from diffcleanse import models, patterns, zoo

    row, gt = card["manifest_row"], card["ground_truth"]
    size = int(row["image_size"])
    tgt = None if patterns.is_class_target(gt["target"]) else \
        patterns.render_target(gt["target"], size, gt["trigger"])
    plain = row.get("model_type", "ddpm") == "ddpm" and row["attack"] == "baddiffusion"
    if plain or model_dir is None or not Path(model_dir).is_dir():
        return patterns.render_trigger(gt["trigger"], size), tgt
    model = models.load_pipeline(model_dir)
    stand_in = row["target"] if tgt is not None else "hat"  # a class target is not needed here
    spec = zoo.backdoor_spec({**row, "target": stand_in}, size, model=model)
    return spec.trigger.float(), tgt


def detection_table(verdicts: list[str | Path], records: list[str | Path],
                    combined: list[str | Path], population: list[str | Path],
                    cards: list[str | Path], out: dict[str, str | Path], *,
                    mse_threshold: float, methods: list[str], bootstrap: int = 1000,
                    fpr: float = 0.05, seed: int = 0) -> pd.DataFrame:
    """Detection as a table (an aggregation step: it reads the zoo cards).

    Per (model, method, seed): the MSCR verdict, the method's own detector (population), the
    inverted trigger's ASR on its verdict samples (MSE < ``mse_threshold`` to the true target) and
    its L2 distance to the true trigger, iterations and seconds. Per model: the combined verdict and
    the share of seeds each method flags. Per method: ACC of its MSCR verdict and of its own
    detector, ROC-AUC and TPR at ``fpr`` of its detector's score with bootstrap intervals, and the
    seconds per model. ``out`` maps csv, md, roc_csv, roc_png, roc_pdf.
    """
    import pandas as pd
    from safetensors.torch import load_file

    from diffcleanse import population as pop
    from diffcleanse.records import atomic_path, read_json

    truth, true_patterns = {}, {}
    for cp in cards:
        card = read_json(cp)
        truth[card["model_id"]] = card
        if card["ground_truth"]["backdoored"]:
            true_patterns[card["model_id"]] = _true_pattern(card, Path(cp).parent / "model")
    pops = {}
    for pp in population:
        rec = read_json(pp)
        pops[rec["method"]] = rec
    rows = []
    recs = {(r["model"], r["method"], int(r.get("seed_index", 0))): (r, Path(p))
            for p in records for r in [read_json(p)]}
    for vp in verdicts:
        v = read_json(vp)
        key = (v["model"], v["method"], int(v.get("seed_index", 0)))
        inv, inv_path = recs[key]
        card = truth[v["model"]]
        gt = card["ground_truth"]
        asr = l2 = math.nan
        if gt["backdoored"]:
            trig, tgt = true_patterns[v["model"]]
            r = load_file(str(inv_path.parent / "trigger.safetensors"))["trigger"].float()
            if r.shape == trig.shape:
                l2 = float((r - trig).norm())
            if tgt is not None:
                x = load_file(str(inv_path.parent / "samples.safetensors"))["samples"]
                x = x.clamp(-1, 1)
                asr = float((((x - tgt) ** 2).mean(dim=(1, 2, 3)) < mse_threshold).float().mean())
        p = pops.get(v["method"], {}).get("result", {}).get("seeds", {}).get(str(key[2]), {})
        own = p.get(v["model"], {})
        rows.append({
            "model": v["model"], "method": v["method"], "seed": key[2],
            "attack": gt["attack"], "group": card["manifest_row"].get("group", ""),
            "truth": "backdoored" if gt["backdoored"] else "clean",
            "mscr": round(v["mscr"], 4),
            "mscr_pairs": round(v["detection"]["readings"]["pairs"], 4),
            "mscr_unbanded": round(v["detection"]["readings"]["unbanded"], 4),
            "verdict": v["verdict"], "correct": v["backdoored"] == gt["backdoored"],
            "own_score": own.get("score", math.nan), "own_flagged": own.get("flagged"),
            "asr_inverted": asr, "l2_to_true_trigger": l2,
            "zero_trigger_l2": float(true_patterns[v["model"]][0].norm())
            if gt["backdoored"] else math.nan,
            "iterations": v["iterations"], "inversion_seconds": v["inversion_seconds"],
            "encoder": v["encoder"], "sampler": v["sampler"]["name"],
            "steps": v["sampler"]["steps"] or "all", "clip_sample": v["sampler"]["clip_sample"],
            "n_samples": v["batch_size"], "kappa": v["active_kappa"], "kappa_d": v["kappa_d"],
            "mse_threshold": mse_threshold})
    df = pd.DataFrame(rows).sort_values(["model", "method", "seed"]).reset_index(drop=True)
    comb = [read_json(c) for c in combined]
    def flags(model: str, method: str) -> str:
        sub = df[(df.model == model) & (df.method == method)]
        return f"{int((sub['verdict'] == 'backdoored').sum())}/{len(sub)}"

    comb_rows = []
    for c in comb:
        gt = truth[c["model"]]["ground_truth"]
        comb_rows.append({
            "model": c["model"], "truth": "backdoored" if gt["backdoored"] else "clean",
            "combined verdict": c["verdict"],
            "seeds flagged": f"{sum(c['seeds_flagged'].values())}/{len(c['seeds_flagged'])}",
            "trigger used by removal": f"{c['trigger_method']} (seed "
                                       f"{c['trigger_seed_index']}, MSCR {c['mscr']:.2f})",
            **{f"{m} flags": flags(c["model"], m) for m in methods}})
    comb_df = pd.DataFrame(comb_rows)
    with atomic_path(out["csv"]) as tmp:
        df.to_csv(tmp, index=False)
    roc_rows, curves = [], {}
    first = df[df["seed"] == df["seed"].min()]
    for m in methods:
        sub = first[first["method"] == m]
        if sub.empty:
            continue
        y = (sub["truth"] == "backdoored").astype(int).to_numpy()
        own = sub["own_score"].astype(float).to_numpy()
        score = own if not pd.isna(own).any() else sub["mscr"].to_numpy(dtype=float)
        r = pop.roc(score, y, fpr)
        b = pop.bootstrap(score, y, n=bootstrap, seed=seed, fpr_at=fpr)
        curves[m] = r
        detector = pops.get(m, {}).get("result", {}).get("detector", {})
        roc_rows.append({
            "method": m, "models": len(sub), "clean": int((y == 0).sum()),
            "backdoored": int(y.sum()), "detector": detector.get("kind", "?"),
            "detector features": "+".join(detector.get("features", [])),
            "ACC (MSCR >= kappa_d)": pop.accuracy(sub["verdict"] == "backdoored", y),
            "ACC (own detector)": pop.accuracy(sub["own_flagged"].astype(bool), y)
            if sub["own_flagged"].notna().all() else math.nan,
            "ROC-AUC": r["auc"], "AUC 95% CI": _ci(b["auc_ci"]),
            f"TPR at {fpr:.0%} FPR": r["tpr_at_fpr"], "TPR 95% CI": _ci(b["tpr_at_fpr_ci"]),
            "ASR (inverted trigger, bd models)": float(sub[sub.truth == "backdoored"][
                "asr_inverted"].mean()) if (sub.truth == "backdoored").any() else math.nan,
            "L2 to true trigger": float(sub[sub.truth == "backdoored"][
                "l2_to_true_trigger"].mean()) if (sub.truth == "backdoored").any() else math.nan,
            "seconds per model": float(df[df.method == m]["inversion_seconds"].mean()),
            "bootstrap": f"{b['resamples']} resamples, {b['skipped_one_class']} one-class skipped"})
    roc_df = pd.DataFrame(roc_rows)
    with atomic_path(out["roc_csv"]) as tmp:
        roc_df.to_csv(tmp, index=False)
    from diffcleanse import reporting

    reporting.roc_figure(curves, [out["roc_png"], out["roc_pdf"]],
                         title=f"ROC of each method's own detector over the zoo (seed "
                               f"{int(df['seed'].min())}; leave-one-model-out)")
    seeds_shown = sorted(df["seed"].unique())
    proto = df[["encoder", "sampler", "steps", "clip_sample", "n_samples", "kappa", "kappa_d",
                "mse_threshold"]].drop_duplicates()
    lines = ["# Detection: every method, every seed (paper Table 1's ACC and ASR, and more)", "",
             f"Seeds {', '.join(map(str, seeds_shown))}. MSCR verdict: flagged when MSCR >= "
             f"kappa_d (the largest mutual cluster among in-band samples; `mscr_pairs` counts "
             f"as the official code does, `mscr_unbanded` without the bands). Own detector: the "
             f"method's paper's detector, calibrated or trained on the other models only "
             f"(population). ASR: share of the inverted trigger's verdict samples within MSE "
             f"{mse_threshold:g} of the true target. ROC over the first seed; 95 % intervals "
             f"from {bootstrap} bootstrap resamples of the models.", "",
             "## Per method", "", _md(roc_df) if len(roc_df) else "(no methods)", "",
             "## Per model (combined verdict: per seed any method; model: >= half the seeds)", "",
             _md(comb_df), "", "## Protocol", "", _md(proto), "",
             "## Per model, method and seed", "", _md(df.drop(columns=["mse_threshold"]))]
    with atomic_path(out["md"]) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return df


def _ci(v: list[float]) -> str:
    return "n/a" if any(math.isnan(x) for x in v) else f"[{v[0]:.2f}, {v[1]:.2f}]"


def _md(df: pd.DataFrame) -> str:
    """A Markdown table without the optional tabulate dependency."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "n/a" if math.isnan(v) else f"{v:.2f}"
        return str(v)

    head = "| " + " | ".join(map(str, df.columns)) + " |"
    sep = "| " + " | ".join("---" for _ in df.columns) + " |"
    body = ["| " + " | ".join(cell(v) for v in r) + " |" for r in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])
