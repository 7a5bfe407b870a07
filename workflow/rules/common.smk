# Bookkeeping done once: validate the config and the manifest, constrain wildcards to the zoo's
# ids, and define the input/param functions the rules use (rules hold no lambdas or loops).
import json
import re

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from diffcleanse.manifest import load_manifest

validate(config, schema="../schemas/config.schema.yaml")

MANIFEST = load_manifest(config["manifest"])
MODEL_IDS = list(MANIFEST.index)
TRAINED = [m for m in MODEL_IDS if MANIFEST.loc[m, "source"] == "train"]
FETCHED = [m for m in MODEL_IDS if m not in TRAINED]


def _alternatives(ids):
    """A regex matching exactly these ids (and nothing when there are none)."""
    return "|".join(re.escape(i) for i in ids) if ids else "(?!)"


def canonical(obj):
    """A JSON-able copy with sorted keys: params compare equal however the config was written
    (Snakemake compares params as written, so a reordered YAML would otherwise rerun jobs)."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def row(model):
    """The manifest row of a model as a plain dict of JSON-able values."""
    return canonical(
        {k: (v.item() if hasattr(v, "item") else v) for k, v in MANIFEST.loc[model].items()}
    )


def get_row(wildcards):
    return row(wildcards.model)


def get_init_model(wildcards):
    """The model a trained row fine-tunes from (its `init` column), if any."""
    init = MANIFEST.loc[wildcards.model, "init"]
    return {"init": f"results/models/{init}/model"} if init else {}


def get_train_params(wildcards):
    """Every hyperparameter train_model uses (tracked by Snakemake for reruns)."""
    return canonical(
        {
            "data_root": config["data"]["root"],
            "download": config["data"]["download"],
            "unet": config["models"]["unet"],
            "scheduler": config["models"]["scheduler"],
            **{k: v for k, v in config["train"].items() if k != "threads"},
        }
    )


# ---- stage 1 (detection.smk): classifier per dataset, inversion, verdict, table ----


def classifier_key(model):
    """Name of the classifier a model's encoder uses: ``<dataset>_<image size>`` (path-safe)."""
    ds = re.sub(r"[^A-Za-z0-9.+-]+", "-", str(MANIFEST.loc[model, "dataset"]))
    return f"{ds}_{int(MANIFEST.loc[model, 'image_size'])}"


CLASSIFIERS = {classifier_key(m): m for m in MODEL_IDS}  # key -> one model with that data


def get_classifier_dataset(wildcards):
    return str(MANIFEST.loc[CLASSIFIERS[wildcards.classifier], "dataset"])


def get_classifier_image_size(wildcards):
    return int(MANIFEST.loc[CLASSIFIERS[wildcards.classifier], "image_size"])


def get_classifier_params(wildcards):
    """Every hyperparameter train_classifier uses."""
    return canonical(
        {
            "data_root": config["data"]["root"],
            "download": config["data"]["download"],
            **{k: v for k, v in config["classifier"].items() if k != "threads"},
        }
    )


def get_encoder_input(wildcards):
    """The classifier directory, when the detection encoder is the dataset's classifier."""
    if config["detection"]["encoder"] != "classifier":
        return {}
    return {"classifier": f"results/classifiers/{classifier_key(wildcards.model)}"}


def get_inversion_params(wildcards):
    """Every inversion hyperparameter; the sampler is the model's own (manifest column)."""
    inv = {k: v for k, v in config["inversion"].items() if k != "threads"}
    return canonical({**inv, "sampler": str(MANIFEST.loc[wildcards.model, "sampler"])})


def get_detection_params(wildcards):
    """κ's, encoder and the target kind (``manifest``: from the row's target, paper protocol)."""
    det = dict(config["detection"])
    for key in ("kappa_minus", "kappa_plus", "entropy_bins"):  # one entropy band for both stages
        det[key] = config["inversion"][key]
    if det["target_kind"] == "manifest":
        target = str(MANIFEST.loc[wildcards.model, "target"])
        det["target_kind"] = "class" if target.startswith(("class:", "mnist:")) else "image"
    return canonical(det)


def get_detection_table_inputs(wildcards):
    """Every model's verdict, final inverted-trigger samples and card (for the ground truth)."""
    return {
        "verdicts": expand("results/detection/{model}/method~bbti/verdict.json", model=MODEL_IDS),
        "samples": expand(
            "results/inversion/{model}/method~bbti/samples.safetensors", model=MODEL_IDS
        ),
        "cards": expand("results/models/{model}/card.json", model=MODEL_IDS),
    }


def get_final_output():
    """The targets of the default target: a gallery figure and a detection verdict per model,
    the detection table, and a removal summary per model removal may run on."""
    return [
        *expand("results/gallery/{model}.png", model=MODEL_IDS),
        *expand("results/detection/{model}/method~bbti/verdict.json", model=MODEL_IDS),
        "results/tables/detection.csv",
        "results/tables/detection.md",
        *removal_summaries(),
        *evaluation_outputs(),  # evaluation.smk: records, tables, figures
    ]


def memory(base_mb):
    """A resources callable: ``base_mb`` MB on the first attempt, growing with every retry."""

    def mem_mb(wildcards, attempt):
        return base_mb * attempt

    return mem_mb


# ---- stage 2 (removal.smk): clean data, importance, pruning, fine-tuning ----

REMOVAL = config["removal"]


def ratio_label(ratio):
    """A pruning ratio as it appears in paths (``ratio~0.02``)."""
    return f"{float(ratio):g}"


def removal_targets(model):
    """The fine-tuning records of one model: every strategy, its ratios, every loss."""
    return [
        f"results/removal/{model}/strategy~{s}/ratio~{ratio_label(r)}/loss~{loss}/finetune.json"
        for s in REMOVAL["strategies"]
        for r in REMOVAL["ratios"][s]
        for loss in REMOVAL["finetune"]["losses"]
    ]


def flagged(model):
    """Stage 1's verdict for a model (an input function's helper: waits for the checkpoint)."""
    wc = {"model": model}
    if "method" in checkpoints.detect.rule.wildcard_names:
        wc["method"] = "bbti"
    checkpoints.detect.get(**wc)
    with open(f"results/detection/{model}/method~bbti/verdict.json") as fh:
        return bool(json.load(fh)["backdoored"])


def removal_summaries():
    """One summary per model removal may run on: every model, or with removal.run_on backdoored
    only the manifest's backdoored models (the paper's Table 2; the manifest only picks models)."""
    if REMOVAL["run_on"] == "backdoored":
        models = [m for m in MODEL_IDS if MANIFEST.loc[m, "attack"] != "none"]
    else:
        models = MODEL_IDS
    return expand("results/removal/{model}/summary.json", model=models)


def get_removal_inputs(wildcards):
    """What a model's removal summary needs: with run_on flagged the detection verdict (through
    the checkpoint, so models are decided independently) and, if flagged, every fine-tuned model;
    with backdoored or all, every fine-tuned model."""
    model = wildcards.model
    if REMOVAL["run_on"] != "flagged":
        return {"finetuned": removal_targets(model)}
    if getattr(checkpoints, "detect", None) is None:
        raise WorkflowError("removal.run_on: flagged needs the detection checkpoint `detect`")
    verdict = f"results/detection/{model}/method~bbti/verdict.json"
    return {"verdict": verdict, "finetuned": removal_targets(model) if flagged(model) else []}


def get_clean_data(wildcards):
    """The clean images importance and fine-tuning use (removal.clean_data picks the source)."""
    return {"data": f"results/removal/{wildcards.model}/{REMOVAL['clean_data']}.safetensors"}


def get_clean_data_params(wildcards):
    """How many clean images (Appendix D counts per dataset, times synthetic_scale) and how."""
    dataset = str(MANIFEST.loc[wildcards.model, "dataset"])
    counts = REMOVAL["synthetic_samples"]
    n = max(1, round(counts.get(dataset, counts["default"]) * REMOVAL["synthetic_scale"]))
    sampler = REMOVAL["synthetic_sampler"]
    return canonical(
        {
            "n": n,
            "dataset": dataset,
            "data_root": config["data"]["root"],
            "sampler": str(MANIFEST.loc[wildcards.model, "sampler"])
            if sampler["name"] == "manifest"
            else sampler["name"],
            "steps": sampler["steps"],
            "batch_size": sampler["batch_size"],
        }
    )


def get_importance_params(wildcards):
    """Every hyperparameter of the Taylor importance (Eqs. 8-9)."""
    return canonical(
        {
            "t_threshold_frac": REMOVAL["t_threshold_frac"],
            "batch_size": REMOVAL["importance_batch"],
            "rho_start": REMOVAL["rho_start"],
            "rho_end": REMOVAL["rho_end"],
            "diffpruning_thr": REMOVAL["diffpruning_threshold"],
        }
    )


def get_strategy(wildcards):
    return wildcards.strategy


def get_ratio(wildcards):
    return float(wildcards.ratio)


def get_finetune_params(wildcards):
    """Every fine-tuning hyperparameter, with the loss from the path (p or c)."""
    ft = {k: v for k, v in REMOVAL["finetune"].items() if k not in ("losses", "threads")}
    return canonical({**ft, "loss": wildcards.loss})


# ---- evaluation (evaluation.smk): model states, tables, figures, ablations ----

EVAL = config["evaluation"]


def eval_paths(model, strategy=None, ratio=None, loss=None):
    """The metrics record of one model state (original, pruned, or fine-tuned)."""
    base = f"results/evaluation/{model}"
    if strategy is None:
        return f"{base}/state~original/metrics.json"
    if loss is None:
        return f"{base}/strategy~{strategy}/ratio~{ratio}/state~pruned/metrics.json"
    return f"{base}/strategy~{strategy}/ratio~{ratio}/loss~{loss}/state~finetuned/metrics.json"


def removal_ran(model):
    """Whether stage 2 ran on a model (removal.run_on; with `flagged` this waits for detection)."""
    run_on = REMOVAL["run_on"]
    if run_on == "all":
        return True
    if run_on == "backdoored":
        return MANIFEST.loc[model, "attack"] != "none"
    return flagged(model)


def removal_states(model):
    """(strategy, ratio label, loss or None) of every removed state of a model."""
    out = []
    for s in REMOVAL["strategies"]:
        for r in REMOVAL["ratios"][s]:
            out.append((s, ratio_label(r), None))
            out += [(s, ratio_label(r), loss) for loss in REMOVAL["finetune"]["losses"]]
    return out


def evaluation_records(models=None):
    """Every metrics record of the zoo (input functions only: may wait for the checkpoint)."""
    out = []
    for m in models or MODEL_IDS:
        out.append(eval_paths(m))
        if removal_ran(m):
            out += [eval_paths(m, *st) for st in removal_states(m)]
    return out


def verdict_paths():
    return expand("results/detection/{model}/method~bbti/verdict.json", model=MODEL_IDS)


def class_classifier_path(model):
    """The classifier for a class target's ASR: evaluation.asr.class_classifier, the model's
    dataset classifier (class:k, TrojDiff Din) or an MNIST one at the model's size (mnist:k)."""
    target = str(MANIFEST.loc[model, "target"])
    if EVAL["asr"]["class_classifier"] or not target.startswith(("class:", "mnist:")):
        return None
    if target.startswith("class:"):
        return f"results/classifiers/{classifier_key(model)}"
    return f"results/evaluation/classifiers/mnist_{int(MANIFEST.loc[model, 'image_size'])}"


def _eval_common_inputs(model):
    out = {
        "card": f"results/models/{model}/card.json",
        "trigger": f"results/inversion/{model}/method~bbti/trigger.safetensors",
    }
    if EVAL["fid"]["feature_extractor"] == "classifier":
        out["fid_classifier"] = f"results/classifiers/{classifier_key(model)}"
    cls = class_classifier_path(model)
    if cls:
        out["class_classifier"] = cls
    return out


def get_eval_original_inputs(wildcards):
    m = wildcards.model
    return {**_eval_common_inputs(m), "model": f"results/models/{m}/model"}


def get_eval_pruned_inputs(wildcards):
    w = wildcards
    return {
        **_eval_common_inputs(w.model),
        "model": f"results/removal/{w.model}/strategy~{w.strategy}/ratio~{w.ratio}/pruned",
    }


def get_eval_finetuned_inputs(wildcards):
    w = wildcards
    return {
        **_eval_common_inputs(w.model),
        "model": (
            f"results/removal/{w.model}/strategy~{w.strategy}/"
            f"ratio~{w.ratio}/loss~{w.loss}/finetuned"
        ),
    }


def get_eval_params(wildcards):
    """Every hyperparameter of an evaluation (tracked by Snakemake for reruns)."""
    return canonical(
        {
            "fid": EVAL["fid"],
            "asr": EVAL["asr"],
            "data_root": config["data"]["root"],
            "download": config["data"]["download"],
        }
    )


def get_variant(wildcards):
    """The removal setting of a state, from its path."""
    return {k: wildcards.get(k) for k in ("strategy", "ratio", "loss") if wildcards.get(k)}


def get_threshold(wildcards):
    return float(wildcards.t)


def get_target_classifier_params(wildcards):
    return canonical(
        {
            "data_root": config["data"]["root"],
            "download": config["data"]["download"],
            **{k: v for k, v in config["classifier"].items() if k != "threads"},
        }
    )


# evaluation: tables and figures


def benchmark_entries():
    """Benchmark files Table 7 reads (paths from the rules' own benchmark patterns)."""
    out = []

    def add(rule_name, **wc):
        proxy = getattr(rules, rule_name, None)
        if proxy is not None:
            out.append({"rule": rule_name, **wc, "path": str(proxy.benchmark).format(**wc)})

    for m in MODEL_IDS:
        add("train_model", model=m)
        add("invert_trigger", model=m)
        if removal_ran(m):
            add("importance", model=m)
            for s, r, loss in removal_states(m):
                if loss is None:
                    add("prune", model=m, strategy=s, ratio=r)
                else:
                    add("finetune", model=m, strategy=s, ratio=r, loss=loss)
    return out


def get_tables_inputs(wildcards):
    return {"evaluations": evaluation_records(), "verdicts": verdict_paths()}


def get_benchmarks(wildcards):
    """As a param: the benchmark paths (and their wildcards) of every job Table 7 summarises."""
    return benchmark_entries()


def entropy_ablation_records():
    return expand("results/ablation/entropy_loss~off/{model}/record.json", model=MODEL_IDS)


def threshold_models():
    ids = EVAL["ablation"]["t_models"]
    return ids if ids else [m for m in MODEL_IDS if MANIFEST.loc[m, "attack"] != "none"]


def threshold_ablation_records():
    return expand(
        "results/ablation/threshold~{t}/{model}/record.json",
        t=[f"{float(t):g}" for t in EVAL["ablation"]["t_thresholds"]],
        model=threshold_models(),
    )


def get_table3_inputs(wildcards):
    return {
        "evaluations": [eval_paths(m) for m in MODEL_IDS],
        "verdicts": verdict_paths(),
        "ablation": entropy_ablation_records(),
    }


def entropy_sets_param():
    """Fig. 4's image sets: the zoo's (dataset, size) pairs and any extra datasets configured."""
    pairs = {
        (str(MANIFEST.loc[m, "dataset"]), int(MANIFEST.loc[m, "image_size"])) for m in MODEL_IDS
    }
    sizes = sorted({s for _, s in pairs})
    for name in EVAL["figures"]["entropy_datasets"]:
        pairs |= {(name, s) for s in sizes}
    return sorted(pairs)


def after_state(model):
    """The state the before/after figure shows: evaluation.figures.after (first ratio)."""
    want = EVAL["figures"]["after"]
    strategies = REMOVAL["strategies"]
    s = want["strategy"] if want["strategy"] in strategies else strategies[0]
    losses = REMOVAL["finetune"]["losses"]
    loss = None
    if want["state"] == "finetuned" and losses:
        loss = want["loss"] if want["loss"] in losses else losses[0]
    return s, ratio_label(REMOVAL["ratios"][s][0]), loss


def _state_dir(record_path):
    return record_path.rsplit("/", 1)[0]


def get_before_after_inputs(wildcards):
    m = wildcards.model
    before = _state_dir(eval_paths(m))
    out = {"before": f"{before}/metrics.json", "before_samples": f"{before}/samples.safetensors"}
    if REMOVAL["run_on"] == "flagged":
        out["verdict"] = f"results/detection/{m}/method~bbti/verdict.json"
    if removal_ran(m):
        after = _state_dir(eval_paths(m, *after_state(m)))
        out |= {"after": f"{after}/metrics.json", "after_samples": f"{after}/samples.safetensors"}
    return out


def evaluation_outputs():
    """What the default target asks of this stage: tables, figures, and every model's original
    record (the removed states come in through the tables, which wait for detection)."""
    out = [
        *[eval_paths(m) for m in MODEL_IDS],
        *expand(
            "results/tables/{t}.{ext}",
            t=["table1", "table2", "table4", "table7"],
            ext=["csv", "md"],
        ),
        "results/tables/evaluation.csv",
        *expand("results/figures/{f}.{ext}", f=["fig4", "fig5"], ext=["png", "pdf"]),
        *expand("results/figures/before_after/{model}.png", model=MODEL_IDS),
    ]
    if EVAL["ablation"]["entropy_loss"]:
        out += expand("results/tables/table3.{ext}", ext=["csv", "md"])
    if EVAL["ablation"]["t_thresholds"]:
        out += expand("results/figures/fig6.{ext}", ext=["png", "pdf"])
    return out
