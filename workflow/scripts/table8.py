"""Rule table8: Diff-Cleanse against the adaptive attack (paper Table 8)."""

from diffcleanse.logs import log_to

log = log_to(snakemake.log[0])  # noqa: F821

from diffcleanse import adaptive_results  # noqa: E402

inp, out, params = snakemake.input, snakemake.output, snakemake.params  # noqa: F821
df = adaptive_results.table8(inp.evaluations, inp.verdicts,
                             dict(zip(params.models, inp.cards, strict=True)),
                             strategy=params.strategy, loss=params.loss)
adaptive_results.write_table8(df, out.csv, out.md, inp.evaluations)
log.info("Table 8: %d adaptive models", len(df))
