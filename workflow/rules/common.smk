# Bookkeeping done once: validate the config and the manifest, constrain wildcards to the zoo's
# ids, and define the input/param functions the rules use (rules hold no lambdas or loops).
import re

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


def row(model):
    """The manifest row of a model as a plain dict of JSON-able values."""
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in MANIFEST.loc[model].items()}


def get_row(wildcards):
    return row(wildcards.model)


def get_init_model(wildcards):
    """The model a trained row fine-tunes from (its `init` column), if any."""
    init = MANIFEST.loc[wildcards.model, "init"]
    return {"init": f"results/models/{init}/model"} if init else {}


def get_train_params(wildcards):
    """Every hyperparameter train_model uses (tracked by Snakemake for reruns)."""
    return {
        "data_root": config["data"]["root"],
        "download": config["data"]["download"],
        "unet": config["models"]["unet"],
        "scheduler": config["models"]["scheduler"],
        **{k: v for k, v in config["train"].items() if k != "threads"},
    }


def get_final_output():
    """The targets of the default target: for now, a gallery figure per model."""
    return expand("results/gallery/{model}.png", model=MODEL_IDS)


def memory(base_mb):
    """A resources callable: ``base_mb`` MB on the first attempt, growing with every retry."""

    def mem_mb(wildcards, attempt):
        return base_mb * attempt

    return mem_mb
