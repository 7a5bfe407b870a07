"""Rule figure_threshold: Fig. 6, Diff-Cleanse with different thresholds T."""

from diffcleanse.logs import log_to

log = log_to(snakemake.log[0])  # noqa: F821

from diffcleanse import reporting, tables  # noqa: E402

inp, out = snakemake.input, snakemake.output  # noqa: F821
n = reporting.threshold_figure(tables.load_ablation(inp.records), [out.png, out.pdf])
log.info("%d points", n)
