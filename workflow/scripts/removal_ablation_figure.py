"""Rule removal_ablation_figure: the generalised Fig. 6 from the ablation's records."""

from diffcleanse.logs import log_to

log = log_to(snakemake.log[0])  # noqa: F821

from diffcleanse import reporting, tables  # noqa: E402

rows, protocols = tables.load_removal_ablation(snakemake.input.records)  # noqa: F821
metric = protocols[0]["utility_metric"] if protocols else "utility"
n = reporting.removal_ablation_figure(rows, metric, list(snakemake.output))  # noqa: F821
log.info("%d points", n)
