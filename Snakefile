# Diff-Cleanse benchmark workflow: zoo -> inversion -> detection -> removal -> evaluation -> report.
# Run: snakemake --cores 2            (embedded default config.yaml)
#      snakemake --profile slurm --configfile config/paper.yaml
from snakemake.utils import min_version

min_version("9.0")


# the embedded defaults, found from the Snakefile's directory: a relative path would be looked up in
# the working directory, and under `--directory runs/<name>` with a `--configfile` overlay Snakemake
# skips a configfile it cannot find without a word (the overlay then runs on the schema's defaults)
configfile: f"{workflow.basedir}/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/common_adaptive.smk"
include: "workflow/rules/common_removal_ablation.smk"


wildcard_constraints:
    model=_alternatives(MODEL_IDS),


include: "workflow/rules/models.smk"
include: "workflow/rules/adaptive.smk"
include: "workflow/rules/gallery.smk"
include: "workflow/rules/detection.smk"
include: "workflow/rules/removal.smk"
include: "workflow/rules/removal_ablation.smk"
include: "workflow/rules/evaluation.smk"


rule all:
    input:
        get_final_output(),
    default_target: True
