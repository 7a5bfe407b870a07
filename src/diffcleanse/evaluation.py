"""Evaluation of a model state: utility (FID, or a labelled substitute), ASR (Eq. 15), ACC, deltas.

**Utility.** The paper's FID: Inception-v3 features of clean samples against the training
data, through torch-fidelity (``feature_extractor="inception"``; weights from torch-fidelity's own
download, or a local file). Offline, the default is a Fréchet distance over the features of a small
classifier trained by the workflow on the zoo's dataset (``diffcleanse.classifiers``), registered
with torch-fidelity as the feature extractor ``diffcleanse-classifier``. It is **not** FID and is
labelled ``FD-<dataset>-cls`` (e.g. ``FD-digits-cls``) in every record, table and figure; only
Inception features are labelled ``FID`` (``utility_label``). Both go through the same
torch-fidelity code.

**ASR** (Eq. 15). Image targets: the share of backdoor samples whose MSE to the target image is
*strictly* below κ_m, with MSE taken over all pixels and channels of images in [-1, 1] (the
project's value range; the card's ``attack_check`` and the detection table use the same). Class
targets (``class:k``, ``mnist:k``): the share a classifier assigns to class k.

**ACC**: share of models whose verdict matches the truth. **ΔFID, ΔASR**: value after removal
minus value before (so a fully removed backdoor has ΔASR = -ASR_before, the paper's -1.00).

A state is sampled with seeds derived from (seed, model id, kind) but *not* from the state, so the
original, pruned and fine-tuned models start from the same noise: deltas are paired.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from diffcleanse import data, models, patterns, sampling
from diffcleanse.records import (
    atomic_path,
    derive_seed,
    make_record,
    read_json,
    scratch_dir,
    write_json,
)

log = logging.getLogger(__name__)

INCEPTION = "inception-v3-compat"  # torch-fidelity's name for the FID Inception network
CLASSIFIER_EXTRACTOR = "diffcleanse-classifier"
FEATURE_EXTRACTORS = ("classifier", "inception")
STATES = ("original", "pruned", "finetuned")
GRID_SAMPLES = 8  # samples per kind kept beside each record for the before/after figures


class EvaluationError(RuntimeError):
    """A metric cannot be computed as configured (missing weights, classifier or target)."""


def utility_label(feature_extractor: str, dataset: str) -> str:
    """``FID`` for Inception features, ``FD-<dataset>-cls`` for the classifier substitute."""
    if feature_extractor == "inception":
        return "FID"
    if feature_extractor == "classifier":
        return f"FD-{dataset}-cls"
    raise ValueError(
        f"unknown feature extractor {feature_extractor!r}: use {', '.join(FEATURE_EXTRACTORS)}"
    )


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (N, 3, H, W) -> uint8 in [0, 255] (what torch-fidelity consumes), on
    the CPU; ``data.chunk_rows`` images at a time, so a reference set costs one byte per value
    more, not its float temporaries."""
    out = torch.empty(x.shape, dtype=torch.uint8)
    rows = data.chunk_rows(x)
    for i in range(0, len(x), rows):
        c = x[i:i + rows].detach().float()
        out[i:i + rows] = ((c.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    return out


class UInt8Images(Dataset):
    """A torch Dataset over a uint8 tensor (N, 3, H, W): torch-fidelity's input type."""

    def __init__(self, images: torch.Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"need uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


class ClassifierFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity feature extractor over a ``classifiers.SmallCNN`` directory.

    The directory comes as torch-fidelity's ``feature_extractor_weights_path``. Features:
    ``features`` (the penultimate layer, used for the Fréchet distance) and ``logits``.
    """

    def __init__(
        self,
        name: str,
        features_list: Sequence[str],
        feature_extractor_weights_path: str | None = None,
        **kwargs: Any,
    ):
        super().__init__(name, list(features_list))
        if not feature_extractor_weights_path:
            raise EvaluationError(
                "the classifier feature extractor needs the classifier directory "
                "(feature_extractor_weights_path)"
            )
        from diffcleanse.classifiers import load_classifier

        self.classifier = load_classifier(feature_extractor_weights_path)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("features", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return "features"

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.dtype != torch.uint8:
            raise EvaluationError(f"expected uint8 images, got {x.dtype}")
        feats = self.classifier.features(x.float() / 127.5 - 1)
        out = {"features": feats, "logits": self.classifier.head(feats)}
        return tuple(out[k] for k in self.features_list)


if CLASSIFIER_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(CLASSIFIER_EXTRACTOR, ClassifierFeatureExtractor)


@dataclass(frozen=True)
class FidStatistics:
    """The Gaussian of a set's features that a Fréchet distance compares (torch-fidelity's
    ``mu`` and ``sigma``, in the dtypes it computes them in), with what extracted them."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    feature_extractor: dict[str, Any]  # name, layer, weights or classifier (frechet_distance)


def _extractor_kwargs(feature_extractor: str, classifier_dir: str | Path | None,
                      inception_weights: str | Path | None) -> tuple[dict[str, Any], dict]:
    """torch-fidelity's keyword arguments for an extractor, and the record's description."""
    if feature_extractor not in FEATURE_EXTRACTORS:
        raise ValueError(
            f"unknown feature extractor {feature_extractor!r}: use {', '.join(FEATURE_EXTRACTORS)}"
        )
    kwargs: dict[str, Any] = {}
    if feature_extractor == "inception":
        kwargs |= {"feature_extractor": INCEPTION, "feature_layer_fid": "2048"}
        if inception_weights:
            if not Path(inception_weights).is_file():
                raise EvaluationError(
                    f"Inception weights file {inception_weights} does not exist "
                    f"(config key evaluation.fid.inception_weights)"
                )
            kwargs["feature_extractor_weights_path"] = str(inception_weights)
        detail = {
            "name": INCEPTION,
            "layer": "2048",
            "weights": str(inception_weights) if inception_weights else "torch-fidelity",
        }
    else:
        if not classifier_dir:
            raise EvaluationError("feature extractor 'classifier' needs a classifier directory")
        kwargs |= {
            "feature_extractor": CLASSIFIER_EXTRACTOR,
            "feature_layer_fid": "features",
            "feature_extractor_weights_path": str(classifier_dir),
        }
        meta = read_json(Path(classifier_dir) / "config.json")
        detail = {
            "name": CLASSIFIER_EXTRACTOR,
            "layer": "features",
            "classifier": str(classifier_dir),
            "classifier_holdout_accuracy": meta.get("meta", {}).get("holdout_accuracy"),
        }
    return kwargs, detail


def _feature_extractor(feature_extractor: str, classifier_dir: str | Path | None,
                       inception_weights: str | Path | None, device: str | torch.device
                       ) -> tuple[FeatureExtractorBase, str, dict[str, Any], bool]:
    """torch-fidelity's extractor (built once per call site), its FID layer, its description
    and whether it runs on CUDA."""
    from torch_fidelity.utils import create_feature_extractor

    kwargs, detail = _extractor_kwargs(feature_extractor, classifier_dir, inception_weights)
    cuda = torch.device(device).type == "cuda"
    name, layer = kwargs.pop("feature_extractor"), kwargs.pop("feature_layer_fid")
    try:
        extractor = create_feature_extractor(name, [layer], cuda=cuda, verbose=False, **kwargs)
    except (OSError, RuntimeError) as err:  # urllib's URLError is an OSError
        if feature_extractor == "inception" and not inception_weights:
            raise EvaluationError(
                f"could not get torch-fidelity's Inception weights ({err}). Offline? Download "
                f"weights-inception-2015-12-05-6726825d.pth where there is internet and set "
                f"evaluation.fid.inception_weights to its path, or use "
                f"evaluation.fid.feature_extractor: classifier (reported as FD-<dataset>-cls)."
            ) from err
        raise
    return extractor, layer, detail, cuda


def _statistics(images: torch.Tensor, extractor: FeatureExtractorBase, layer: str,
                detail: dict[str, Any], batch_size: int, cuda: bool) -> FidStatistics:
    """torch-fidelity's extraction and statistics of one set (``get_featuresdict_from_dataset``,
    ``fid_featuresdict_to_statistics``: what ``calculate_metrics`` does for each input)."""
    from torch_fidelity.metric_fid import fid_featuresdict_to_statistics
    from torch_fidelity.utils import get_featuresdict_from_dataset

    feats = get_featuresdict_from_dataset(UInt8Images(to_uint8(images)), extractor, batch_size,
                                          cuda, True, False)
    stats = fid_featuresdict_to_statistics(feats, layer)
    return FidStatistics(mu=stats["mu"], sigma=stats["sigma"], n=len(images),
                         feature_extractor=detail)


def fid_statistics(
    images: torch.Tensor,
    *,
    feature_extractor: str = "classifier",
    classifier_dir: str | Path | None = None,
    inception_weights: str | Path | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> FidStatistics:
    """The feature statistics of ``images`` in [-1, 1], as ``calculate_metrics`` computes them
    for each input of a FID, so a reference set's statistics can be computed once and compared
    with many generated sets (``frechet_distance``)."""
    if len(images) < 2:
        raise ValueError("need at least two images in each set for a Fréchet distance")
    extractor, layer, detail, cuda = _feature_extractor(feature_extractor, classifier_dir,
                                                        inception_weights, device)
    return _statistics(images, extractor, layer, detail, batch_size, cuda)


def save_fid_statistics(stats: FidStatistics, path: str | Path) -> None:
    """Write ``stats`` as one safetensors file (its description in the file's metadata)."""
    import json

    from safetensors.numpy import save_file

    with atomic_path(path) as tmp:
        arrays = {"mu": np.ascontiguousarray(stats.mu), "sigma": np.ascontiguousarray(stats.sigma)}
        save_file(arrays, str(tmp), metadata={
            "n": str(stats.n), "feature_extractor": json.dumps(stats.feature_extractor)})


def load_fid_statistics(path: str | Path) -> FidStatistics:
    """Read what ``save_fid_statistics`` wrote (safetensors: no pickle), checking its shapes."""
    import json

    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            mu, sigma = f.get_tensor("mu"), f.get_tensor("sigma")
        stats = FidStatistics(mu=mu, sigma=sigma, n=int(meta["n"]),
                              feature_extractor=json.loads(meta["feature_extractor"]))
    except (OSError, KeyError, ValueError, SafetensorError) as err:
        raise EvaluationError(f"{path} is not a FID statistics file ({err}): rerun the rule "
                              f"fid_reference (delete the file)") from err
    d = len(stats.mu)
    if stats.mu.ndim != 1 or stats.sigma.shape != (d, d):
        raise EvaluationError(f"{path}: mu {stats.mu.shape} and sigma {stats.sigma.shape} do "
                              f"not describe one Gaussian: rerun the rule fid_reference")
    return stats


def reference_statistics(
    dataset: str,
    image_size: int,
    *,
    feature_extractor: str = "classifier",
    classifier_dir: str | Path | None = None,
    inception_weights: str | Path | None = None,
    n_reference: int | None = None,
    batch_size: int = 64,
    data_root: str = "data",
    download: bool = False,
    device: str | torch.device = "cpu",
) -> FidStatistics:
    """The feature statistics of a dataset's FID reference: its first ``n_reference`` training
    images (all when None)."""
    ref, _ = data.load_dataset(dataset, int(image_size), data_root, limit=n_reference,
                               download=download)
    return fid_statistics(ref, feature_extractor=feature_extractor, classifier_dir=classifier_dir,
                          inception_weights=inception_weights, batch_size=batch_size,
                          device=device)


def write_reference_statistics(
    path: str | Path,
    dataset: str,
    image_size: int,
    *,
    feature_extractor: str = "classifier",
    classifier_dir: str | Path | None = None,
    inception_weights: str | Path | None = None,
    n_reference: int | None = None,
    batch_size: int = 64,
    data_root: str = "data",
    download: bool = False,
    device: str | torch.device = "cpu",
) -> FidStatistics:
    """Write ``reference_statistics`` to ``path`` (what ``evaluate_model`` reads)."""
    stats = reference_statistics(dataset, image_size, feature_extractor=feature_extractor,
                                 classifier_dir=classifier_dir,
                                 inception_weights=inception_weights, n_reference=n_reference,
                                 batch_size=batch_size, data_root=data_root, download=download,
                                 device=device)
    save_fid_statistics(stats, path)
    return stats


def _same_extractor(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = ("name", "layer", "weights", "classifier")
    return all(str(a.get(k)) == str(b.get(k)) for k in keys)


def frechet_distance(
    generated: torch.Tensor,
    reference: torch.Tensor | FidStatistics,
    *,
    feature_extractor: str = "classifier",
    classifier_dir: str | Path | None = None,
    inception_weights: str | Path | None = None,
    dataset: str = "data",
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Fréchet distance of two image sets in [-1, 1], by torch-fidelity's extraction and its
    ``fid_statistics_to_metric`` (the computation of ``calculate_metrics``).

    ``reference`` is images or their ``FidStatistics`` (computed once per dataset by the rule
    fid_reference; its extractor must be this one). ``inception``: FID with Inception-v3
    (``inception_weights``: a local torch-fidelity weights file, loaded by torch-fidelity with
    ``torch.load``, so name only a file you trust; None: torch-fidelity downloads its own).
    ``classifier``: the registered classifier extractor over ``classifier_dir``. Returns the
    value, its label and what produced it.
    """
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    if min(len(generated), reference.n if isinstance(reference, FidStatistics)
           else len(reference)) < 2:
        raise ValueError("need at least two images in each set for a Fréchet distance")
    extractor, layer, detail, cuda = _feature_extractor(feature_extractor, classifier_dir,
                                                        inception_weights, device)
    gen = _statistics(generated, extractor, layer, detail, batch_size, cuda)
    ref = reference if isinstance(reference, FidStatistics) \
        else _statistics(reference, extractor, layer, detail, batch_size, cuda)
    if not _same_extractor(gen.feature_extractor, ref.feature_extractor):
        raise EvaluationError(
            f"the reference statistics were extracted with {ref.feature_extractor}, this "
            f"evaluation extracts with {gen.feature_extractor}: rerun the rule fid_reference")
    value = fid_statistics_to_metric({"mu": gen.mu, "sigma": gen.sigma},
                                     {"mu": ref.mu, "sigma": ref.sigma}, False)[KEY_METRIC_FID]
    return {
        "metric": utility_label(feature_extractor, dataset),
        "value": float(value),
        "feature_extractor": gen.feature_extractor,
        "n_generated": len(generated),
        "n_reference": ref.n,
    }


def mse_to_target(samples: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE (N,) between samples (N, C, H, W) and one target image (C, H, W)."""
    if tuple(samples.shape[1:]) != tuple(target.shape[-3:]):
        raise ValueError(
            f"samples {tuple(samples.shape)} and target {tuple(target.shape)} differ in shape"
        )
    return ((samples.float() - target.float().to(samples.device)) ** 2).mean(dim=(1, 2, 3))


def asr_image(samples: torch.Tensor, target: torch.Tensor, mse_threshold: float) -> float:
    """Eq. 15, image targets: share of samples with MSE to the target strictly below κ_m."""
    if len(samples) == 0:
        raise ValueError("no samples")
    return float((mse_to_target(samples, target) < mse_threshold).float().mean())


@torch.no_grad()
def predict_classes(
    samples: torch.Tensor, classifier: torch.nn.Module, batch_size: int = 256
) -> torch.Tensor:
    """Argmax classes (N,) of a classifier with ``logits`` (or a plain forward) over samples."""
    fn = getattr(classifier, "logits", classifier)
    dev = next(classifier.parameters()).device
    out = [
        fn(samples[i : i + batch_size].to(dev)).argmax(1).cpu()
        for i in range(0, len(samples), batch_size)
    ]
    return torch.cat(out)


def asr_class(
    samples: torch.Tensor, classifier: torch.nn.Module, target_class: int, batch_size: int = 256
) -> float:
    """Eq. 15, class targets: share of samples the classifier assigns to ``target_class``."""
    if len(samples) == 0:
        raise ValueError("no samples")
    return float(
        (predict_classes(samples, classifier, batch_size) == int(target_class)).float().mean()
    )


def class_target(name: str) -> tuple[str, int]:
    """``class:k`` -> ("dataset", k) (a class of the training data, Din); ``mnist:k`` ->
    ("mnist", k) (Dout)."""
    kind, _, k = name.partition(":")
    if not patterns.is_class_target(name):
        raise ValueError(f"{name!r} is not a class target (class:<k> or <dataset>:<k>)")
    return ("dataset" if kind == "class" else kind), int(k)


def detection_accuracy(predicted: Sequence[bool], truth: Sequence[bool]) -> float:
    """ACC: share of models whose verdict equals the truth (NaN for no models)."""
    if len(predicted) != len(truth):
        raise ValueError("need one truth per verdict")
    if not predicted:
        return math.nan
    return sum(bool(p) == bool(t) for p, t in zip(predicted, truth, strict=True)) / len(predicted)


def delta(after: float | None, before: float | None) -> float | None:
    """after - before (ΔFID, ΔASR); None when either is missing."""
    if after is None or before is None or math.isnan(after) or math.isnan(before):
        return None
    return float(after) - float(before)


@dataclass(frozen=True)
class EvalSpec:
    """The protocol of one evaluation (every value lands in the record and the tables' captions)."""

    feature_extractor: str = "classifier"
    inception_weights: str | None = None
    fid_n_samples: int = 512
    fid_sampler: str | None = None  # None: the model's own sampler (manifest column `sampler`)
    fid_steps: int | None = None  # None: the full chain of training timesteps
    n_reference: int | None = None  # None: the whole training set
    batch_size: int = 128
    asr_n_samples: int = 128
    asr_steps: int | None = None  # ASR always samples with the model's backdoor sampler
    mse_threshold: float = 0.01
    class_classifier: str | None = None

    def __post_init__(self) -> None:
        if self.feature_extractor not in FEATURE_EXTRACTORS:
            raise ValueError(f"unknown feature extractor {self.feature_extractor!r}")
        if self.fid_n_samples < 2 or self.asr_n_samples < 1 or self.mse_threshold <= 0:
            raise ValueError("need fid_n_samples >= 2, asr_n_samples >= 1, mse_threshold > 0")

    def describe(self) -> dict[str, Any]:
        """JSON-able description."""
        return asdict(self)


def spec_from_params(params: dict[str, Any]) -> EvalSpec:
    """An EvalSpec from the workflow's ``evaluation`` config section (``fid`` and ``asr``)."""
    fid, asr = params.get("fid", {}), params.get("asr", {})
    return EvalSpec(
        feature_extractor=fid.get("feature_extractor", "classifier"),
        inception_weights=fid.get("inception_weights"),
        fid_n_samples=fid.get("n_samples", 512),
        fid_sampler=fid.get("sampler"),
        fid_steps=fid.get("steps"),
        n_reference=fid.get("n_reference"),
        batch_size=fid.get("batch_size", 128),
        asr_n_samples=asr.get("n_samples", 128),
        asr_steps=asr.get("steps"),
        mse_threshold=asr.get("mse_threshold", 0.01),
        class_classifier=asr.get("class_classifier"),
    )


def _asr(
    samples: torch.Tensor,
    target: str,
    trigger_name: str,
    kind: str,
    spec: EvalSpec,
    classifier: torch.nn.Module | None,
) -> dict[str, Any]:
    """ASR of backdoor samples against a card's target (image or class)."""
    if kind == "image":
        tgt = patterns.render_target(target, samples.shape[-1], trigger_name)
        mse = mse_to_target(samples, tgt)
        return {
            "value": float((mse < spec.mse_threshold).float().mean()),
            "kind": "image",
            "mse_threshold": spec.mse_threshold,
            "median_mse": float(mse.median()),
            "n_samples": len(samples),
        }
    if classifier is None:
        raise EvaluationError(f"target {target!r} is a class: evaluation needs a classifier")
    _, k = class_target(target)
    return {
        "value": asr_class(samples, classifier, k),
        "kind": "class",
        "target_class": k,
        "n_samples": len(samples),
    }


def evaluate_model(
    model_dir: str | Path,
    card_path: str | Path,
    record_path: str | Path,
    samples_path: str | Path,
    params: dict[str, Any],
    *,
    state: str = "original",
    variant: dict[str, Any] | None = None,
    classifier_dir: str | None = None,
    class_classifier_dir: str | None = None,
    inverted_trigger: str | None = None,
    method_triggers: dict[str, str] | None = None,
    data_root: str = "data",
    download: bool = False,
    base_seed: int = 0,
    device: str = "cpu",
    allow_pickle: bool = False,
    utility: bool = True,
    reference_stats: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate one model state and write its metrics record and a few samples (for figures).

    Utility (unless ``utility`` is False): ``fid_n_samples`` clean samples against the training
    data, or against its feature statistics when ``reference_stats`` names them (the rule
    fid_reference's file; ``load_fid_statistics``). For backdoored models
    (card ground truth): ASR of ``asr_n_samples`` backdoor samples with the real trigger and, when
    ``inverted_trigger`` is given, with the inverted one (same noise for both). ``variant`` names
    the removal setting (strategy, ratio, loss) of pruned/fine-tuned states. ``method_triggers``
    (method -> trigger file) adds, per inversion method, the ASR of its trigger, the uniform
    score of its samples (``uniform_score``) and its L2 distance to the true trigger
    (``inverted_by_method``; the real trigger's uniform score is ``uniform_real``): Table 1's ASR
    per method and PureDiffusion's Table I.
    """
    from safetensors.torch import load_file, save_file

    if state not in STATES:
        raise ValueError(f"unknown state {state!r}: use {', '.join(STATES)}")
    t0 = time.time()
    spec = spec_from_params(params)
    card = read_json(card_path)
    row, gt = card["manifest_row"], card["ground_truth"]
    model_id = row["model_id"]
    dev = torch.device(device)
    from diffcleanse import zoo

    dm = models.load_pipeline(model_dir, allow_pickle=allow_pickle, device=dev)
    unet = dm.unet
    size = int(row["image_size"])  # the images' size (an LDM denoises smaller latents)
    kind = None
    if gt["backdoored"]:
        kind = "class" if patterns.is_class_target(gt["target"]) else "image"
    classifier = None
    if kind == "class":
        from diffcleanse.classifiers import load_classifier

        where = spec.class_classifier or class_classifier_dir
        if not where:
            raise EvaluationError(
                f"{model_id}: class target {gt['target']!r} needs a classifier "
                f"(evaluation.asr.class_classifier or the workflow's)"
            )
        classifier = load_classifier(where, device=dev)

    # utility: clean samples against the training data
    fid_sampler = sampling.SamplerSpec(
        name=spec.fid_sampler or row["sampler"], steps=spec.fid_steps
    )
    clean = zoo.clean_samples(  # decoded images (LDM: through its autoencoder)
        dm,
        fid_sampler,
        spec.fid_n_samples if utility else GRID_SAMPLES,
        derive_seed(base_seed, model_id, "evaluate", "clean"),
        batch_size=spec.batch_size,
        desc="clean (utility)",
    )
    util: dict[str, Any] | None = None
    n_ref = None
    if utility:
        if reference_stats:
            ref: torch.Tensor | FidStatistics = load_fid_statistics(reference_stats)
            n_ref = ref.n
        else:
            ref, _ = data.load_dataset(
                row["dataset"], size, data_root, limit=spec.n_reference, download=download
            )
            n_ref = len(ref)
        util = frechet_distance(
            clean,
            ref,
            feature_extractor=spec.feature_extractor,
            classifier_dir=classifier_dir,
            inception_weights=spec.inception_weights,
            dataset=row["dataset"],
            batch_size=spec.batch_size,
            device=dev,
        )
        util |= {
            "sampler": fid_sampler.describe(),
            "reference": f"{row['dataset']} training data at {size}px ({n_ref} images)",
        }
        log.info("%s %s: %s %.4f", model_id, state, util["metric"], util["value"])

    # ASR: backdoor samples with the real and the inverted trigger (the same noise)
    asr_sampler = sampling.SamplerSpec(name=row["sampler"], steps=spec.asr_steps)
    bd_seed = derive_seed(base_seed, model_id, "evaluate", "backdoor")
    grid = {"clean": clean[:GRID_SAMPLES]}
    asr_real = asr_inv = None
    clean_hit = None
    uniform_real = None
    by_method: dict[str, dict[str, Any]] = {}
    if kind is not None:
        # the real trigger, sampled exactly as the attacker samples it: its backdoored input
        # (noise + r; TrojDiff's gamma z + mu) and its backdoor sampler (TrojDiff's own)
        from diffcleanse import zoo

        x, real, real_sampler = zoo.real_trigger_samples(
            model_dir, row, spec.asr_steps, spec.asr_n_samples, bd_seed,
            batch_size=spec.batch_size, allow_pickle=allow_pickle, device=dev, unet=unet)
        asr_real = _asr(x, gt["target"], gt["trigger"], kind, spec, classifier)
        grid["backdoor_real"] = x[:GRID_SAMPLES]
        x_real = x
        if kind == "image":
            tgt = patterns.render_target(gt["target"], size, gt["trigger"])
            clean_hit = asr_image(clean, tgt, spec.mse_threshold)
        else:
            clean_hit = asr_class(clean, classifier, class_target(gt["target"])[1])
        chosen: tuple[torch.Tensor, torch.Tensor] | None = None  # stage 1's trigger, its samples
        if inverted_trigger:
            inv = load_file(str(inverted_trigger))["trigger"]
            x = _defender_samples(dm, inv, asr_sampler, spec, bd_seed, "backdoor (inverted)")
            asr_inv = _asr(x, gt["target"], gt["trigger"], kind, spec, classifier)
            grid["backdoor_inverted"] = x[:GRID_SAMPLES]
            chosen = (inv, x)
        uniform_real = uniform_score(x_real)
        for method, path in (method_triggers or {}).items():
            inv = load_file(str(path))["trigger"]
            if chosen is not None and torch.equal(inv, chosen[0]):
                x = chosen[1]  # the chosen trigger is this method's: same seed, same samples
            else:
                x = _defender_samples(dm, inv, asr_sampler, spec, bd_seed,
                                      f"backdoor ({method})")
            by_method[method] = {
                "asr": _asr(x, gt["target"], gt["trigger"], kind, spec, classifier)["value"],
                "uniform_score": uniform_score(x),
                "l2_to_true_trigger": float((inv.float() - real.float()).norm())
                if tuple(inv.shape) == tuple(real.shape) else None,
                "trigger_norm": float(inv.float().norm()), "trigger": str(path)}
            grid[f"backdoor_{method}"] = x[:GRID_SAMPLES].clone()  # safetensors refuses shares
        log.info(
            "%s %s: ASR real %.3f, inverted %s",
            model_id,
            state,
            asr_real["value"],
            "n/a" if asr_inv is None else f"{asr_inv['value']:.3f}",
        )
    for name in ("asr_real", "asr_inverted"):
        v = asr_real if name == "asr_real" else asr_inv
        if v is not None:
            v["sampler"] = (real_sampler if name == "asr_real" else asr_sampler).describe()
    variant = dict(variant or {})
    protocol = {
        "utility_metric": None if util is None else util["metric"],
        "feature_extractor": spec.feature_extractor,
        "fid_n_samples": spec.fid_n_samples if utility else None,
        "fid_sampler": fid_sampler.name,
        "fid_steps": fid_sampler.steps,
        "n_reference": n_ref,
        "asr_n_samples": spec.asr_n_samples,
        "asr_sampler": asr_sampler.name,
        "asr_steps": asr_sampler.steps,
        "mse_threshold": spec.mse_threshold,
        "clip_sample": asr_sampler.clip_sample,
        "mse_range": "[-1, 1]",
    }
    rec = make_record(
        "evaluate",
        {
            "evaluation": spec.describe(),
            "base_seed": base_seed,
            "model_dir": str(model_dir),
            "inverted_trigger": inverted_trigger,
            "classifier_dir": classifier_dir,
            "class_classifier_dir": class_classifier_dir,
        },
        bd_seed,
        time.time() - t0,
        model=model_id,
        state=state,
        strategy=variant.get("strategy"),
        ratio=variant.get("ratio"),
        loss=variant.get("loss"),
        variant=variant,
        attack=gt["attack"],
        group=row.get("group", ""),
        dataset=row["dataset"],
        image_size=size,
        sampler=row["sampler"],
        backdoored=bool(gt["backdoored"]),
        trigger=gt["trigger"],
        target=gt["target"],
        target_kind=kind,
        utility_metric=None if util is None else util["metric"],
        utility=None if util is None else util["value"],
        asr_real=None if asr_real is None else asr_real["value"],
        asr_inverted=None if asr_inv is None else asr_inv["value"],
        clean_hit_rate=clean_hit,
        uniform_real=uniform_real,
        inverted_by_method=by_method,
        protocol=protocol,
        details={"utility": util, "asr_real": asr_real, "asr_inverted": asr_inv},
        seeds={"clean": derive_seed(base_seed, model_id, "evaluate", "clean"), "backdoor": bd_seed},
    )
    with atomic_path(samples_path) as tmp:
        save_file({k: v.contiguous() for k, v in grid.items()}, str(tmp))
    write_json(record_path, rec)
    return rec


def _defender_samples(dm: models.DiffusionModel, trigger: torch.Tensor,
                      sampler: sampling.SamplerSpec, spec: EvalSpec, seed: int, desc: str
                      ) -> torch.Tensor:
    """Images from ``noise + trigger`` under the model's own sampler (how stage 1 and the defender
    use an inverted trigger), decoded (LDM) and clamped."""
    from diffcleanse import zoo

    x = sampling.sample(dm.unet, dm.scheduler_config, spec.asr_n_samples, spec=sampler,
                        trigger=trigger, seed=seed, batch_size=spec.batch_size, desc=desc,
                        clamp=False)
    return zoo.decode_images(dm, x)


def uniform_score(samples: torch.Tensor) -> float:
    """PureDiffusion's uniform score: the mean MSE over all pairs of samples, with pixels in
    [0, 1] (0 when every sample is the same image; lower is more uniform)."""
    x = ((samples.detach().float().clamp(-1, 1) + 1) / 2).flatten(1)
    n = len(x)
    if n < 2:
        raise ValueError("the uniform score needs at least two samples")
    sq = (x * x).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * x @ x.T).clamp_min(0) / x.shape[1]
    return float(d.sum() / (n * (n - 1)))


def entropy_values(images: torch.Tensor, bins: int = 4096, batch_size: int = 512) -> torch.Tensor:
    """Per-image entropy in bits (N,) with the detection stage's ``image_entropy`` (Fig. 4)."""
    from diffcleanse.detection import image_entropy

    with torch.no_grad():
        return torch.cat(
            [
                image_entropy(images[i : i + batch_size], bins)
                for i in range(0, len(images), batch_size)
            ]
        )


def _ablation_fields(rec: dict[str, Any]) -> dict[str, Any]:
    keys = ("model", "attack", "group", "dataset", "sampler", "backdoored", "target_kind")
    return {k: rec.get(k) for k in keys}


def ablate_entropy_loss(
    model_dir: str | Path,
    card_path: str | Path,
    out: dict[str, str | Path],
    inversion_params: dict[str, Any],
    detection_params: dict[str, Any],
    eval_params: dict[str, Any],
    *,
    classifier_dir: str | None = None,
    class_classifier_dir: str | None = None,
    fid_classifier_dir: str | None = None,
    data_root: str = "data",
    download: bool = False,
    base_seed: int = 0,
    device: str = "cpu",
) -> dict[str, Any]:
    """Table 3: BBTI with the similarity loss alone (``entropy_loss: false``), same seed as the main
    run; then the verdict and the inverted trigger's ASR. ``out`` maps the inversion's outputs
    (trigger, trigger_png, samples_png, samples, inversion_record) and ``metrics``, ``grid`` (the
    evaluation of the ablation trigger) and ``record`` (the ablation record)."""
    from diffcleanse import inversion

    t0 = time.time()
    card = read_json(card_path)
    model_id = card["manifest_row"]["model_id"]
    inv_params = {**inversion_params,
                  "bbti": {**(inversion_params.get("bbti") or {}), "entropy_loss": False}}
    keys = ("trigger", "trigger_png", "samples_png", "samples")
    inv = inversion.invert_model(
        model_dir,
        {**{k: out[k] for k in keys}, "record": out["inversion_record"]},
        inv_params,
        detection_params,
        model_id=model_id,
        method="bbti",
        classifier_dir=classifier_dir,
        seed=base_seed,
        device=device,
    )
    ev = evaluate_model(
        model_dir,
        card_path,
        out["metrics"],
        out["grid"],
        eval_params,
        state="original",
        variant={"ablation": "entropy_loss off"},
        classifier_dir=fid_classifier_dir,
        utility=False,
        class_classifier_dir=class_classifier_dir,
        inverted_trigger=str(out["trigger"]),
        data_root=data_root,
        download=download,
        base_seed=base_seed,
        device=device,
    )
    rec = make_record(
        "ablate_entropy_loss",
        {"inversion": inv_params, "detection": detection_params},
        inv["seed"],
        time.time() - t0,
        **_ablation_fields(ev),
        ablation="entropy_loss",
        value=False,
        flagged=bool(inv["backdoored"]),
        mscr=inv["mscr"],
        asr_inverted=ev["asr_inverted"],
        iterations=inv["iterations"],
        protocol=ev["protocol"],
    )
    write_json(out["record"], rec)
    return rec


def ablate_threshold(
    model_dir: str | Path,
    card_path: str | Path,
    data_path: str | Path,
    trigger_path: str | Path,
    original_metrics: str | Path,
    out: dict[str, str | Path],
    eval_params: dict[str, Any],
    importance_params: dict[str, Any],
    *,
    t_threshold_frac: float,
    ratio: float,
    strategy: str = "diffcleanse",
    groupnorm: str = "exact",
    scores: dict[str, Any] | None = None,
    allow_pickle: bool = False,
    classifier_dir: str | None = None,
    reference_stats: str | Path | None = None,
    class_classifier_dir: str | None = None,
    data_root: str = "data",
    download: bool = False,
    base_seed: int = 0,
    device: str = "cpu",
) -> dict[str, Any]:
    """Fig. 6: importance with threshold ``t_threshold_frac`` (stage 2's ``run_importance``),
    pruning (``run_prune``), then the pruned model's utility and real-trigger ASR against the
    original state's (``original_metrics``). ``out`` maps ``metrics``, ``grid`` and ``record``;
    the importance scores and the pruned model live in a scratch folder beside the record
    (``records.scratch_dir``: one a killed earlier attempt left is cleared first)."""
    from diffcleanse.removal import ScoreSpec, stages
    from diffcleanse.removal import importance as imp

    t0 = time.time()
    names = imp.ImportanceConfig.__dataclass_fields__
    cfg = imp.ImportanceConfig(
        **{
            **{k: v for k, v in importance_params.items() if k in names},
            "t_threshold_frac": float(t_threshold_frac),
        }
    )
    model_id = read_json(card_path)["manifest_row"]["model_id"]
    with scratch_dir(Path(out["record"]).parent, "ablate_threshold") as tmp:  # makes the folder
        irec = stages.run_importance(
            model_dir,
            data_path,
            trigger_path,
            tmp / "importance.st",
            tmp / "importance.json",
            cfg=cfg,
            seed=base_seed,
            device=device,
            allow_pickle=allow_pickle,
        )
        prec = stages.run_prune(
            model_dir,
            tmp / "importance.st",
            tmp / "pruned",
            tmp / "prune.json",
            strategy=strategy,
            ratio=ratio,
            groupnorm=groupnorm,
            spec=ScoreSpec(**(scores or {})),
            allow_pickle=allow_pickle,
        )
        ev = evaluate_model(
            tmp / "pruned",
            card_path,
            out["metrics"],
            out["grid"],
            eval_params,
            state="pruned",
            variant={
                "strategy": strategy,
                "ratio": f"{ratio:g}",
                "t_threshold_frac": float(t_threshold_frac),
            },
            classifier_dir=classifier_dir,
            reference_stats=reference_stats,
            class_classifier_dir=class_classifier_dir,
            inverted_trigger=str(trigger_path),
            data_root=data_root,
            download=download,
            base_seed=base_seed,
            device=device,
        )
    orig = read_json(original_metrics)
    rec = make_record(
        "ablate_threshold",
        {
            "importance": cfg.describe(),
            "strategy": strategy,
            "ratio": ratio,
            "groupnorm": groupnorm,
        },
        base_seed,
        time.time() - t0,
        **_ablation_fields(ev),
        ablation="t_threshold_frac",
        value=float(t_threshold_frac),
        T=irec["T"],
        num_train_timesteps=irec["num_train_timesteps"],
        params_removed=(prec.get("parameters") or {}).get("fraction_removed"),
        utility_metric=ev["utility_metric"],
        utility=ev["utility"],
        asr_real=ev["asr_real"],
        asr_inverted=ev["asr_inverted"],
        delta_utility=delta(ev["utility"], orig["utility"]),
        delta_asr_real=delta(ev["asr_real"], orig["asr_real"]),
        protocol=ev["protocol"],
    )
    write_json(out["record"], rec)
    log.info(
        "%s T=%s: ASR %s, %s %.3f",
        model_id,
        irec["T"],
        ev["asr_real"],
        ev["utility_metric"],
        ev["utility"],
    )
    return rec
