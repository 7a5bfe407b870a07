"""Rule detection_table: ACC per attack/group and the inverted triggers' ASR (paper Table 1)."""

from diffcleanse.logs import log_to

log = log_to(snakemake.log[0])  # noqa: F821

from diffcleanse import detection  # noqa: E402

df = detection.detection_table(
    list(snakemake.input.verdicts),  # noqa: F821
    list(snakemake.input.cards),  # noqa: F821
    list(snakemake.input.samples),  # noqa: F821
    snakemake.output.csv,  # noqa: F821
    snakemake.output.md,  # noqa: F821
    mse_threshold=snakemake.params.mse_threshold,  # noqa: F821
)
log.info("%d models, ACC %.2f", len(df), df["correct"].mean())
