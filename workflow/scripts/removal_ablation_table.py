"""Rule removal_ablation_table: the ablation's table (CSV numbers, Markdown with its caption)."""

from diffcleanse.logs import log_to

log = log_to(snakemake.log[0])  # noqa: F821

from diffcleanse import tables  # noqa: E402

rows, protocols = tables.load_removal_ablation(snakemake.input.records)  # noqa: F821
table = tables.removal_ablation_table(rows)
tables.write_table(table, snakemake.output.csv, snakemake.output.md,  # noqa: F821
                   "Removal ablation", tables.removal_ablation_caption(protocols))
log.info("%d lines", len(table))
