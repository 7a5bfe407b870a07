# Inputs and helpers of the removal ablation (removal_ablation.smk): functions only.

ABLATION = REMOVAL["ablation"]


def removal_ablation_models():
    """The models of the ablation: removal.ablation.models, or every backdoored model (null)."""
    ids = ABLATION["models"]
    if ids is None:
        return [m for m in MODEL_IDS if MANIFEST.loc[m, "attack"] != "none"]
    unknown = [m for m in ids if m not in MODEL_IDS]
    if unknown:
        raise WorkflowError(
            f"removal.ablation.models names {', '.join(unknown)}, not in the manifest "
            f"{config['manifest']}"
        )
    clean = [m for m in ids if MANIFEST.loc[m, "attack"] == "none"]
    if clean:
        raise WorkflowError(
            f"removal.ablation.models: {', '.join(clean)} are clean models (the ablation measures "
            f"a backdoor's removal)"
        )
    return list(ids)


def removal_ablation_parts():
    """The jobs of one model: each trigger source (Diff-Cleanse) and `none` (the rest)."""
    return [*[str(t) for t in ABLATION["triggers"]], "none"]


def removal_ablation_records():
    return expand(
        "results/ablation/removal/{model}/trigger~{trigger}/records.json",
        model=removal_ablation_models(),
        trigger=removal_ablation_parts(),
    )


def get_removal_ablation_inputs(wildcards):
    """Model, card (the real trigger and target), clean data, the trigger of the part, and the
    classifiers evaluation uses."""
    m = wildcards.model
    out = {
        **get_clean_data(wildcards),
        "model": f"results/models/{m}/model",
        "card": f"results/models/{m}/card.json",
    }
    if wildcards.trigger != "none":
        out["trigger"] = trigger_file(m, wildcards.trigger)
    out.update(fid_inputs(m))
    cls = class_classifier_path(m)
    if cls:
        out["class_classifier"] = cls
    return out


def get_removal_ablation_params(wildcards):
    """The grid, the importance and fine-tuning settings (removal.finetune under the ablation's
    overrides, resolved per model) and the evaluation protocol (evaluation's metric settings)."""
    grid = {
        k: ABLATION[k]
        for k in ("normalisers", "clean_timesteps", "diffcleanse_ratios", "diffpruning_ratios")
    }
    ft = {**finetune_settings(wildcards.model), **(ABLATION["finetune"] or {})}
    ft = permodel.resolve_tree(ft, row(wildcards.model), set(ft), "")
    ev = {
        **ABLATION["evaluation"],
        "feature_extractor": EVAL["fid"]["feature_extractor"],
        "inception_weights": EVAL["fid"]["inception_weights"],
        "n_reference": EVAL["fid"]["n_reference"],
        "mse_threshold": EVAL["asr"]["mse_threshold"],
    }
    return canonical(
        {
            "grid": {**grid, "random": ABLATION["random"]},
            "importance": importance_config(),
            "finetune": {k: v for k, v in ft.items() if k != "loss"},
            "evaluation": ev,
            "seeds": ABLATION["seeds"],
            "groupnorm": REMOVAL["groupnorm"],
            "data_root": config["data"]["root"],
            "download": config["data"]["download"],
        }
    )


def removal_ablation_outputs():
    """The ablation's final outputs (for the target all): its table, figure and sample grids."""
    if not removal_ablation_models():
        return []
    return [
        *expand("results/tables/removal_ablation.{ext}", ext=["csv", "md"]),
        *expand("results/figures/removal_ablation.{ext}", ext=["png", "pdf"]),
        *expand(
            "results/figures/removal_ablation/{model}.png", model=removal_ablation_models()
        ),
    ]


def get_removal_ablation_model_records(wildcards):
    parts = removal_ablation_parts()
    base = f"results/ablation/removal/{wildcards.model}"
    return {
        "records": [f"{base}/trigger~{p}/records.json" for p in parts],
        "samples": [f"{base}/trigger~{p}/samples.safetensors" for p in parts],
    }
