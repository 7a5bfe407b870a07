# Bookkeeping done once: validate the config and the manifest, constrain wildcards to the zoo's
# ids, and define the input/param functions the rules use (rules hold no lambdas or loops).
import json
import re
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from diffcleanse.attacks import is_class_target
from diffcleanse.inversion import get_method
from diffcleanse import memory as data_memory
from diffcleanse import permodel
from diffcleanse import samplers
from diffcleanse.manifest import load_manifest, schema_path
from diffcleanse.population import PopulationError
from diffcleanse.safety import InputRefused, check_manifest_paths

validate(config, schema=str(schema_path("config.schema.yaml")))  # the package ships it

def _from_workflow(path):
    """A relative path as given when it exists here, else relative to the workflow's directory
    (so `snakemake --directory runs/<name>` finds the repository's configs and data)."""
    p = Path(path)
    if p.is_absolute() or p.exists() or not (WORKFLOW_DIR / p).exists():
        return str(path)
    return str(WORKFLOW_DIR / p)


def _resolve_row_paths(manifest):
    """Relative local: sources and file:/tensor: patterns resolved by ``_from_workflow``."""
    for col, prefix in (("source", "local:"), ("trigger", "file:"), ("target", "file:"),
                        ("trigger", "tensor:"), ("target", "tensor:")):
        for m in manifest.index:
            v = str(manifest.loc[m, col])
            if v.startswith(prefix):
                body = v[len(prefix):]
                key, sep, path = body.partition(":") if prefix == "tensor:" else ("", "", body)
                manifest.loc[m, col] = prefix + key + sep + _from_workflow(path)
    return manifest


onstart:
    # `device: cuda` where this machine runs the jobs and has no GPU stops here, before any job
    # (under a cluster executor the jobs run on its nodes: each checks its own node as it starts)
    if workflow.local_exec and config["device"] == "cuda":
        from diffcleanse.sampling import DeviceUnavailable, resolve_device

        try:
            resolve_device(config["device"])
        except DeviceUnavailable as err:
            raise WorkflowError(f"nothing was run: {err}") from None


WORKFLOW_DIR = Path(workflow.basedir)
MANIFEST = _resolve_row_paths(load_manifest(_from_workflow(config["manifest"])))
try:  # local paths must stay inside data.root when data.confine_local says so (issue 15)
    check_manifest_paths(
        MANIFEST.reset_index(drop=True).to_dict("records"),
        config["data"]["root"],
        config["data"]["confine_local"],
    )
except InputRefused as err:
    raise WorkflowError(str(err)) from None
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


# Training first among ready jobs: models are the zoo's critical path (the backdoored ones
# fine-tune a clean one), and a 2-core run that inverts triggers before training finishes waits
# on its last model at the end (get_train_priority, rules train_model and train_adaptive).
TRAIN_PRIORITY = 10


def _training_chains():
    """Per trained model, the training steps from the start of its training to the end of the
    longest chain of rows that fine-tune from it (its own steps plus its heaviest descendant's
    chain); computed once, children first."""
    children = {}
    for m in TRAINED:
        children.setdefault(MANIFEST.loc[m, "init"], []).append(m)
    chains = {}

    def chain(model):
        if model not in chains:
            chains[model] = int(MANIFEST.loc[model, "train_steps"]) + max(
                (chain(c) for c in children.get(model, [])), default=0)
        return chains[model]

    return {m: chain(m) for m in TRAINED}


TRAINING_CHAINS = _training_chains()
LONGEST_TRAINING_CHAIN = max(TRAINING_CHAINS.values(), default=0) or 1


def get_train_priority(wildcards):
    """Training runs first among ready jobs (models are the zoo's critical path), and of the
    trainings the one heading the longest chain of training steps first: a backdoored row
    fine-tunes a clean one, so on 2 cores a long fine-tune started last is waited on at the end.
    Between TRAIN_PRIORITY and TRAIN_PRIORITY + 1, so the order among other rules is unchanged."""
    return TRAIN_PRIORITY + TRAINING_CHAINS[wildcards.model] / LONGEST_TRAINING_CHAIN


def get_train_params(wildcards):
    """Every hyperparameter train_model uses (tracked by Snakemake for reruns)."""
    return canonical(
        {
            "data_root": config["data"]["root"],
            "download": config["data"]["download"],
            "unet": config["models"]["unet"],
            "scheduler": config["models"]["scheduler"],
            "ncsn": config["models"].get("ncsn", {}),
            "autoencoder": config["models"].get("autoencoder", {}),
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


INVERSION = config["inversion"]
METHODS = list(INVERSION["methods"])
SEEDS = [str(s) for s in INVERSION["seeds"]]
FIRST_SEED = SEEDS[0]


def _check_methods():
    """Every configured method's settings against its Spec before anything runs; the (model,
    method) pairs whose model type a method does not support are left out of the plan (and
    named once here; the tables mark them)."""
    problems, skipped, pairs = [], [], set()
    for m in METHODS:
        method = get_method(m)
        try:
            method.make_spec(INVERSION.get(m) or {}, where=f"inversion.{m}")
        except (TypeError, ValueError) as err:
            problems.append(str(err))
        for model in MODEL_IDS:
            mt = str(MANIFEST.loc[model, "model_type"])
            if mt in method.model_types:
                pairs.add((model, m))
            else:
                skipped.append(f"{m} on {model} ({mt}; {m} supports "
                               f"{', '.join(method.model_types)})")
    for m in METHODS:  # each method's population detector must be able to judge every model
        method = get_method(m)
        try:
            detector = method.detector_for(method.make_spec(INVERSION.get(m) or {}))
        except (TypeError, ValueError):
            continue  # reported above
        models = [model for model in MODEL_IDS if (model, m) in pairs]
        n_clean = sum(str(MANIFEST.loc[model, "attack"]) == "none" for model in models)
        try:
            detector.check_zoo(n_clean, len(models) - n_clean, method=f"inversion method {m}")
        except PopulationError as err:
            problems.append(str(err))
    if problems:
        raise WorkflowError("config inversion: " + "; ".join(problems))
    if skipped:
        print("inversion: not planned (model type not supported): " + "; ".join(skipped),
              file=sys.stderr)
    return pairs


SUPPORTED = _check_methods()


def model_methods(model, methods=None):
    """The configured methods that support a model's type, in config order."""
    return [m for m in (methods or METHODS) if (model, m) in SUPPORTED]


def get_model_methods(wildcards):
    return model_methods(wildcards.model)


def inversion_dir(model, method, seed):
    """Where one inversion's outputs live."""
    return f"results/inversion/{model}/method~{method}/seed~{seed}"


def per_model(value, model, key):
    """A setting given as one value or as a mapping resolved for the model (image size,
    model_type/dataset, model_type, dataset, group, default: diffcleanse.permodel)."""
    try:
        return permodel.resolve(value, row(model), key)
    except KeyError as err:
        raise WorkflowError(str(err)) from None


def inversion_sampler(m):
    """The sampler model ``m`` is inverted with: ``inversion.sampler`` resolved for its row
    (``diffcleanse.samplers.configured``; ``manifest``: the row's own sampler column)."""
    try:
        return samplers.configured(INVERSION.get("sampler"), row(m), str(MANIFEST.loc[m, "sampler"]))
    except (KeyError, ValueError) as err:
        raise WorkflowError(str(err.args[0])) from None


def get_inversion_params(wildcards):
    """The common inversion settings and the method's own (so changing one method's settings
    reruns only that method); the sampler is ``inversion_sampler``."""
    return inversion_params(wildcards.model, wildcards.method)


def inversion_params(m, method):
    """``get_inversion_params`` for model ``m`` and ``method``."""
    return canonical(
        {
            "sampler": inversion_sampler(m),
            "steps": INVERSION["steps"],
            "batch_size": per_model(INVERSION["batch_size"], m, "inversion.batch_size"),
            method: INVERSION.get(method) or {},
        }
    )


def _check_inversion_samplers():
    """``inversion.sampler`` resolved for every model before anything runs."""
    for model in MODEL_IDS:
        try:
            inversion_sampler(model)
        except WorkflowError as err:
            raise WorkflowError(f"config inversion: {err}") from None


_check_inversion_samplers()


def get_bbti_params(wildcards):
    """BBTI's inversion params for a model (the Table 3 ablation turns its entropy loss off)."""
    return inversion_params(wildcards.model, "bbti")


def get_detection_params(wildcards):
    """κ's, encoder, bands and the target kind (``manifest``: from the row's target, the paper's
    protocol)."""
    det = {k: v for k, v in config["detection"].items() if k != "population"}
    if det["target_kind"] == "manifest":
        target = str(MANIFEST.loc[wildcards.model, "target"])
        det["target_kind"] = "class" if is_class_target(target) else "image"
    return canonical(det)


def method_records(model, methods=None, seeds=None):
    """The inversion records of a model, every (method, seed)."""
    return [
        f"{inversion_dir(model, m, s)}/record.json"
        for m in model_methods(model, methods)
        for s in (seeds or SEEDS)
    ]


def method_verdicts(model, methods=None, seeds=None):
    """The per-method verdicts of a model, every (method, seed)."""
    return [
        f"results/detection/{model}/method~{m}/seed~{s}/verdict.json"
        for m in model_methods(model, methods)
        for s in (seeds or SEEDS)
    ]


def get_combine_inputs(wildcards):
    m = wildcards.model
    return {
        "verdicts": method_verdicts(m),
        "triggers": [
            f"{inversion_dir(m, meth, s)}/trigger.safetensors"
            for meth in model_methods(m)
            for s in SEEDS
        ],
    }


def get_population_inputs(wildcards):
    """Every model's records of one method (all seeds) and the cards (labels: an aggregation)."""
    return {
        "records": [r for m in MODEL_IDS for r in method_records(m, [wildcards.method])],
        "cards": expand("results/models/{model}/card.json", model=MODEL_IDS),
    }


def get_detection_table_inputs(wildcards):
    """Every model's per-method verdicts and records, the combined verdicts, the population
    detectors and the cards (for the ground truth)."""
    return {
        "verdicts": [v for m in MODEL_IDS for v in method_verdicts(m)],
        "records": [r for m in MODEL_IDS for r in method_records(m)],
        "combined": expand("results/detection/{model}/verdict.json", model=MODEL_IDS),
        "population": expand("results/detection/population/method~{method}.json", method=METHODS),
        "cards": expand("results/models/{model}/card.json", model=MODEL_IDS),
    }


def get_final_output():
    """The targets of the default target: a gallery figure and a detection verdict per model,
    the detection table, and a removal summary per model removal may run on."""
    return [
        *expand("results/gallery/{model}.png", model=MODEL_IDS),
        *expand("results/detection/{model}/verdict.json", model=MODEL_IDS),
        "results/tables/detection.csv",
        "results/tables/detection.md",
        "results/tables/detection_roc.csv",
        *expand("results/figures/roc.{ext}", ext=["png", "pdf"]),
        *removal_summaries(),
        *evaluation_outputs(),  # evaluation.smk: records, tables, figures
        *adaptive_outputs(),  # adaptive.smk: Fig. 14 and Table 8 (adaptive rows only)
        *removal_ablation_outputs(),  # removal_ablation.smk: the generalised Fig. 6
    ]


def memory(base_mb, data=None):
    """A resources callable: ``base_mb`` MB (the interpreter, torch and the model) plus, with
    ``data``, the MB of the images the job loads whole (``data(wildcards)``, from
    diffcleanse.memory), on the first attempt; growing with every retry."""

    def mem_mb(wildcards, attempt):
        return (base_mb + (data(wildcards) if data else 0)) * attempt

    return mem_mb


def _row_data(model, kind):
    row = MANIFEST.loc[model]
    limit = config["evaluation"]["fid"]["n_reference"] if kind == "reference" else None
    return data_memory.data_mb(row["dataset"], int(row["image_size"]), config["data"]["root"],
                               limit)


def training_data(wildcards):
    """MB of a model's training set and, for a distribution target, its target pool."""
    row = MANIFEST.loc[wildcards.model]
    return _row_data(wildcards.model, "train") + data_memory.target_data_mb(
        row["target"], row["dataset"], int(row["image_size"]), config["data"]["root"])


def classifier_data(wildcards):
    """MB of the training set of the encoder classifier ``wildcards.classifier``."""
    return _row_data(CLASSIFIERS[wildcards.classifier], "train")


def target_classifier_data(wildcards):
    """MB of the Dout dataset a target classifier trains on."""
    return data_memory.data_mb(wildcards.dataset, int(wildcards.size), config["data"]["root"])


def real_clean_data(wildcards):
    """MB of the training set that removal's clean data is drawn from (removal.clean_data: real;
    0 for synthetic clean data)."""
    if config["removal"].get("clean_data", "synthetic") != "real":
        return 0
    return _row_data(wildcards.model, "train")


# ---- stage 2 (removal.smk): clean data, importance, pruning, fine-tuning ----
# Paths: results/removal/{model}/trigger~{trigger}/strategy~{strategy}/ratio~{ratio}/...; the
# trigger source is `detected` (stage 1's chosen trigger), `true` (the card's real trigger: the
# oracle of the ablation) or an inversion method's name (its first seed). Values that vary by
# model (a mapping by image size, model_type/dataset, model_type, dataset, group or default;
# diffcleanse.permodel) are resolved here, per model.

from diffcleanse import permodel
from diffcleanse.removal import methods as removal_methods

REMOVAL = config["removal"]
for _where in (REMOVAL, REMOVAL["ablation"]):  # YAML reads an unquoted `true` as a boolean
    _where["triggers"] = ["true" if t is True else str(t) for t in _where["triggers"]]
PRUNING_STRATEGIES = [s for s in REMOVAL["strategies"] if removal_methods.get(s).prunes]
REMOVAL_LOSSES = ["p", "c", *[m for m in removal_methods.METHODS if m not in removal_methods.PRUNING_METHODS]]


def _check_removal():
    """Strategies against the registry, trigger sources against what can produce them, and every
    per-model value against the zoo, before anything runs."""
    problems = []
    for s in REMOVAL["strategies"]:
        try:
            removal_methods.get(s)
        except ValueError as err:
            problems.append(str(err))
        if removal_methods.METHODS.get(s) is not None and removal_methods.get(s).prunes:
            if s not in REMOVAL["ratios"]:
                problems.append(f"removal.ratios has no ratios for strategy {s}")
    for src in trigger_sources():
        if src not in ("detected", "true") and src not in INVERSION["methods"]:
            problems.append(
                f"removal trigger source {src!r} is neither detected, true nor one of "
                f"inversion.methods ({', '.join(INVERSION['methods'])})"
            )
    listed = {
        "removal.run_on": REMOVAL["run_on"] if isinstance(REMOVAL["run_on"], list) else [],
        "evaluation.ablation.t_models": config["evaluation"]["ablation"].get("t_models") or [],
    }
    for key, ids in listed.items():
        unknown = [m for m in ids if m not in MODEL_IDS]
        if unknown:
            problems.append(
                f"{key} names models that are not in the manifest ({config['manifest']}): "
                f"{', '.join(unknown)}; list model ids of its model_id column"
                + (", or use flagged, backdoored or all" if key == "removal.run_on" else
                   ", or null for every backdoored model")
            )
    for m in MODEL_IDS:
        try:
            for s in PRUNING_STRATEGIES:
                strategy_ratios(m, s)
            finetune_settings(m)
        except KeyError as err:
            problems.append(str(err).strip("'\""))
    if problems:
        raise WorkflowError("config removal: " + "; ".join(problems))


def trigger_sources():
    """Trigger sources of the removal chain and of the ablation (without `none`)."""
    abl = REMOVAL["ablation"]["triggers"] if REMOVAL["ablation"]["models"] != [] else []
    return list(dict.fromkeys([*REMOVAL["triggers"], *abl]))


def ratio_label(ratio):
    """A pruning ratio as it appears in paths (``ratio~0.02``)."""
    return f"{float(ratio):g}"


def strategy_ratios(model, strategy):
    """The ratios of a strategy for one model (removal.ratios.<strategy>, a list or a per-model
    mapping of lists); a method that prunes nothing has the one ratio 0."""
    if not removal_methods.get(strategy).prunes:
        return [0.0]
    value = permodel.resolve(REMOVAL["ratios"][strategy], row(model), f"removal.ratios.{strategy}")
    return [float(r) for r in value]


def strategy_losses(strategy):
    """The fine-tuning losses of a strategy's runs: removal.finetune.losses, or the method's own."""
    return list(REMOVAL["finetune"]["losses"]) if removal_methods.get(strategy).prunes else [strategy]


def removal_runs(model):
    """(trigger, strategy, ratio label, loss) of every fine-tuned (repaired) model of a model."""
    return [
        (src, s, ratio_label(r), loss)
        for src in REMOVAL["triggers"]
        for s in REMOVAL["strategies"]
        for r in strategy_ratios(model, s)
        for loss in strategy_losses(s)
    ]


def removal_dir(model, trigger, strategy=None, ratio=None):
    """Where one model's removal outputs for a trigger source (and strategy, ratio) live."""
    base = f"results/removal/{model}/trigger~{trigger}"
    if strategy is None:
        return base
    return f"{base}/strategy~{strategy}/ratio~{ratio}"


def removal_targets(model):
    """The fine-tuning records of one model: every trigger, strategy, its ratios, every loss."""
    return [
        f"{removal_dir(model, src, s, r)}/loss~{loss}/finetune.json"
        for src, s, r, loss in removal_runs(model)
    ]


def flagged(model):
    """Stage 1's verdict for a model (an input function's helper: waits for the checkpoint)."""
    checkpoints.detect.get(model=model)
    with open(f"results/detection/{model}/verdict.json") as fh:
        return bool(json.load(fh)["backdoored"])


def removal_summaries():
    """One summary per model removal may run on: every model, or with removal.run_on backdoored
    only the manifest's backdoored models (the paper's Table 2; the manifest only picks models),
    or the models that removal.run_on lists."""
    if isinstance(REMOVAL["run_on"], list):
        models = [m for m in MODEL_IDS if m in REMOVAL["run_on"]]
    elif REMOVAL["run_on"] == "backdoored":
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
    verdict = f"results/detection/{model}/verdict.json"
    return {"verdict": verdict, "finetuned": removal_targets(model) if flagged(model) else []}


def trigger_file(model, trigger):
    """The trigger file of a source: stage 1's chosen trigger, the card's real one, or a method's."""
    if trigger == "detected":
        return f"results/detection/{model}/trigger.safetensors"
    if trigger == "true":
        return f"results/removal/{model}/trigger~true/trigger.safetensors"
    return f"{inversion_dir(model, trigger, FIRST_SEED)}/trigger.safetensors"


def get_clean_data(wildcards):
    """The clean images importance and fine-tuning use (removal.clean_data picks the source)."""
    return {"data": f"results/removal/{wildcards.model}/{REMOVAL['clean_data']}.safetensors"}


def get_clean_data_params(wildcards):
    """How many clean images (Appendix D counts per dataset, times synthetic_scale) and how."""
    r = row(wildcards.model)
    base = permodel.resolve(REMOVAL["synthetic_samples"], r, "removal.synthetic_samples")
    sampler = REMOVAL["synthetic_sampler"]
    return canonical(
        {
            "n": max(1, round(base * REMOVAL["synthetic_scale"])),
            "dataset": r["dataset"],
            "data_root": config["data"]["root"],
            "sampler": r["sampler"] if sampler["name"] == "manifest" else sampler["name"],
            "steps": sampler["steps"],
            "batch_size": sampler["batch_size"],
        }
    )


def score_spec():
    """How the pruning methods read the importance (removal.importance)."""
    imp_cfg = REMOVAL["importance"]
    return removal_methods.ScoreSpec(
        normaliser=imp_cfg["normaliser"],
        clean_timesteps=imp_cfg["clean_timesteps"],
        backdoor_timesteps=imp_cfg["backdoor_timesteps"],
        seed=int(config["seed"]),
    )


def importance_kinds():
    """The importance kinds the configured pruning strategies read."""
    spec = score_spec()
    return sorted({k for s in PRUNING_STRATEGIES for k in removal_methods.get(s).kinds(spec)})


def get_importance_inputs(wildcards):
    """Model, clean data and, when a configured strategy reads the backdoor score, the trigger."""
    out = {**get_clean_data(wildcards), "model": f"results/models/{wildcards.model}/model"}
    if any(k.startswith("backdoor") for k in importance_kinds()):
        out["trigger"] = trigger_file(wildcards.model, wildcards.trigger)
    return out


def importance_config():
    """Every hyperparameter of the Taylor importance (Eqs. 8-9)."""
    return {
        "t_threshold_frac": REMOVAL["t_threshold_frac"],
        "batch_size": REMOVAL["importance_batch"],
        "rho_start": REMOVAL["rho_start"],
        "rho_end": REMOVAL["rho_end"],
        "diffpruning_thr": REMOVAL["diffpruning_threshold"],
    }


def get_importance_params(wildcards):
    """The importance hyperparameters (the kinds are a separate param)."""
    return canonical(importance_config())


def get_importance_kinds(wildcards):
    return importance_kinds()


def get_strategy(wildcards):
    return wildcards.strategy


def get_ratio(wildcards):
    return float(wildcards.ratio)


def get_score_spec(wildcards):
    """The normaliser and timestep sets of the pruning (removal.importance) and the seed."""
    return canonical(score_spec().describe())


def finetune_settings(model):
    """removal.finetune with its per-model values resolved (batch size by image size, ...)."""
    ft = {k: v for k, v in REMOVAL["finetune"].items() if k not in ("losses", "threads")}
    return permodel.resolve_tree(ft, row(model), set(ft), "")


def get_finetune_params(wildcards):
    """Every fine-tuning hyperparameter, with the loss from the path (p or c)."""
    return canonical({**finetune_settings(wildcards.model), "loss": wildcards.loss})


def get_elijah_params(wildcards):
    """Elijah's removal settings (removal.elijah), resolved per model."""
    el = {k: v for k, v in REMOVAL["elijah"].items() if k != "threads"}
    return canonical(permodel.resolve_tree(el, row(wildcards.model), set(el), ""))


def get_removal_trigger_inputs(wildcards):
    return {"trigger": trigger_file(wildcards.model, wildcards.trigger)}


_check_removal()


# ---- evaluation (evaluation.smk): model states, tables, figures, ablations ----

EVAL = config["evaluation"]


def eval_paths(model, trigger=None, strategy=None, ratio=None, loss=None):
    """The metrics record of one model state (original, pruned, or fine-tuned)."""
    base = f"results/evaluation/{model}"
    if strategy is None:
        return f"{base}/state~original/metrics.json"
    base = f"{base}/trigger~{trigger}/strategy~{strategy}/ratio~{ratio}"
    if loss is None:
        return f"{base}/state~pruned/metrics.json"
    return f"{base}/loss~{loss}/state~finetuned/metrics.json"


def removal_ran(model):
    """Whether stage 2 ran on a model (removal.run_on; with `flagged` this waits for detection)."""
    run_on = REMOVAL["run_on"]
    if isinstance(run_on, list):
        return model in run_on
    if run_on == "all":
        return True
    if run_on == "backdoored":
        return MANIFEST.loc[model, "attack"] != "none"
    return flagged(model)


def removal_states(model):
    """(trigger, strategy, ratio label, loss or None) of every removed state of a model: the
    pruned model (methods that prune) and every fine-tuned one."""
    out = []
    for src, s, r, loss in removal_runs(model):
        pruned = (src, s, r, None)
        if removal_methods.get(s).prunes and pruned not in out:
            out.append(pruned)
        out.append((src, s, r, loss))
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
    """Every model's per-method verdicts at the first seed, and its combined verdict."""
    return [
        *[v for m in MODEL_IDS for v in method_verdicts(m, seeds=[FIRST_SEED])],
        *expand("results/detection/{model}/verdict.json", model=MODEL_IDS),
    ]


def class_classifier_path(model):
    """The classifier for a class target's ASR: evaluation.asr.class_classifier, the model's
    dataset classifier (class:k, TrojDiff Din) or one of the out-of-domain dataset at the model's
    size (<dataset>:k, Dout: mnist, letters)."""
    target = str(MANIFEST.loc[model, "target"])
    if EVAL["asr"]["class_classifier"] or not is_class_target(target):
        return None
    kind = target.partition(":")[0]
    if kind == "class":
        return f"results/classifiers/{classifier_key(model)}"
    return f"results/evaluation/classifiers/{kind}_{int(MANIFEST.loc[model, 'image_size'])}"


def fid_inputs(model):
    """What a model's utility needs: the FID reference's feature statistics (rule fid_reference,
    one per dataset and size) and, for the classifier extractor, that classifier."""
    out = {"fid_reference": f"results/fid_reference/{classifier_key(model)}.safetensors"}
    if EVAL["fid"]["feature_extractor"] == "classifier":
        out["fid_classifier"] = f"results/classifiers/{classifier_key(model)}"
    return out


def get_fid_reference_inputs(wildcards):
    if EVAL["fid"]["feature_extractor"] == "classifier":
        return {"fid_classifier": f"results/classifiers/{wildcards.reference}"}
    return {}


def get_fid_reference_params(wildcards):
    """The dataset and what the statistics depend on (not the generated side's settings, so
    changing the sample count or sampler does not recompute them)."""
    m = CLASSIFIERS[wildcards.reference]
    fid = EVAL["fid"]
    return canonical(
        {
            "dataset": str(MANIFEST.loc[m, "dataset"]),
            "image_size": int(MANIFEST.loc[m, "image_size"]),
            "feature_extractor": fid["feature_extractor"],
            "inception_weights": fid["inception_weights"],
            "n_reference": fid["n_reference"],
            "batch_size": fid["batch_size"],
            "data_root": config["data"]["root"],
            "download": config["data"]["download"],
        }
    )


def fid_reference_data(wildcards):
    """MB of the FID reference set the rule fid_reference loads (evaluation.fid.n_reference)."""
    return _row_data(CLASSIFIERS[wildcards.reference], "reference")


def _eval_common_inputs(model):
    out = {
        "card": f"results/models/{model}/card.json",
        "trigger": f"results/detection/{model}/trigger.safetensors",
        **fid_inputs(model),
    }
    cls = class_classifier_path(model)
    if cls:
        out["class_classifier"] = cls
    return out


def get_eval_original_inputs(wildcards):
    """The original state is evaluated with every method's first-seed trigger too (Table 1's
    ASR per method, PureDiffusion's Table I)."""
    m = wildcards.model
    return {
        **_eval_common_inputs(m),
        "model": f"results/models/{m}/model",
        "method_triggers": [
            f"{inversion_dir(m, meth, FIRST_SEED)}/trigger.safetensors"
            for meth in model_methods(m)
        ],
    }


def get_eval_pruned_inputs(wildcards):
    w = wildcards
    return {
        **_eval_common_inputs(w.model),
        "model": f"{removal_dir(w.model, w.trigger, w.strategy, w.ratio)}/pruned",
    }


def get_eval_finetuned_inputs(wildcards):
    w = wildcards
    return {
        **_eval_common_inputs(w.model),
        "model": f"{removal_dir(w.model, w.trigger, w.strategy, w.ratio)}/loss~{w.loss}/finetuned",
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
    keys = ("trigger", "strategy", "ratio", "loss")
    return {k: wildcards.get(k) for k in keys if wildcards.get(k)}


def get_threshold(wildcards):
    return float(wildcards.t)


def get_threshold_ratio(wildcards):
    """Fig. 6 prunes at the model's first Diff-Cleanse ratio."""
    return strategy_ratios(wildcards.model, "diffcleanse")[0]


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
        for meth in model_methods(m):
            for seed in SEEDS:
                add("invert_trigger", model=m, method=meth, seed=seed)
        if removal_ran(m):
            for src in REMOVAL["triggers"]:
                add("importance", model=m, trigger=src)
            for src, s, r, loss in removal_states(m):
                if loss is None:
                    add("prune", model=m, trigger=src, strategy=s, ratio=r)
                elif removal_methods.get(s).prunes:
                    add("finetune", model=m, trigger=src, strategy=s, ratio=r, loss=loss)
                else:
                    add(f"{s}_removal", model=m, trigger=src)
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
    """The state the before/after figure shows: evaluation.figures.after (first trigger source,
    first ratio)."""
    want = EVAL["figures"]["after"]
    strategies = REMOVAL["strategies"]
    s = want["strategy"] if want["strategy"] in strategies else strategies[0]
    losses = strategy_losses(s)
    loss = None
    if want["state"] == "finetuned" or not removal_methods.get(s).prunes:
        loss = want["loss"] if want["loss"] in losses else losses[0]
    return REMOVAL["triggers"][0], s, ratio_label(strategy_ratios(model, s)[0]), loss


def _state_dir(record_path):
    return record_path.rsplit("/", 1)[0]


def get_before_after_inputs(wildcards):
    m = wildcards.model
    before = _state_dir(eval_paths(m))
    out = {"before": f"{before}/metrics.json", "before_samples": f"{before}/samples.safetensors"}
    if REMOVAL["run_on"] == "flagged":
        out["verdict"] = f"results/detection/{m}/verdict.json"
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
            t=["table1", "tableI", "table2", "table4", "table7"],
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
