"""Rule fetch_model: copy a hub or local model into the zoo (safetensors only) with its card."""

from diffcleanse.logs import log_to

log = log_to(snakemake.log[0])  # noqa: F821

from diffcleanse import zoo  # noqa: E402

zoo.fetch_model(
    snakemake.params.row,  # noqa: F821
    snakemake.output.model,  # noqa: F821
    snakemake.output.card,  # noqa: F821
    allow_pickle=snakemake.params.allow_pickle,  # noqa: F821
)
