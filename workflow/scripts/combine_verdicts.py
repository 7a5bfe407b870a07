"""Checkpoint detect: a model's combined verdict over its methods and seeds, and its trigger."""

from diffcleanse.logs import log_to

log = log_to(snakemake.log[0])  # noqa: F821

from diffcleanse import detection  # noqa: E402

rec = detection.combine_verdicts(
    list(snakemake.input.verdicts),  # noqa: F821
    list(snakemake.input.triggers),  # noqa: F821
    snakemake.output.verdict,  # noqa: F821
    snakemake.output.trigger,  # noqa: F821
    methods=list(snakemake.params.methods),  # noqa: F821
    seeds=list(snakemake.params.seeds),  # noqa: F821
)
log.info("%s: %s (%.0f%% of seeds); removal uses the %s trigger", rec["model"], rec["verdict"],
         100 * rec["share_of_seeds_flagged"], rec["trigger_method"])
