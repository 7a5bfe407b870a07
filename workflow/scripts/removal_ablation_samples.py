"""Rule removal_ablation_samples: what noise + the real trigger generates after each variant."""

from diffcleanse.logs import log_to

log = log_to(snakemake.log[0])  # noqa: F821

from safetensors.torch import load_file  # noqa: E402

from diffcleanse import reporting, tables  # noqa: E402

inp = snakemake.input  # noqa: F821
rows, _ = tables.load_removal_ablation(inp.records)
samples = {}
for path in inp.samples:
    samples |= load_file(str(path))
n = reporting.removal_ablation_samples(samples, rows, snakemake.output[0])  # noqa: F821
log.info("%d rows", n)
