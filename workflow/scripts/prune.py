"""Rule prune: remove channels of one model by a removal method's ranking at a ratio per layer."""

from diffcleanse.logs import log_to

log = log_to(snakemake.log[0], snakemake.threads)  # noqa: F821

from diffcleanse.removal import ScoreSpec, stages  # noqa: E402

params = snakemake.params  # noqa: F821
rec = stages.run_prune(
    snakemake.input.model,  # noqa: F821
    snakemake.input.scores,  # noqa: F821
    snakemake.output.model,  # noqa: F821
    snakemake.output.record,  # noqa: F821
    strategy=params.strategy,
    ratio=params.ratio,
    groupnorm=params.groupnorm,
    spec=ScoreSpec(**params.scores),
    allow_pickle=params.allow_pickle,
)
log.info("removed %.1f %% of the output channels, %.1f %% of the parameters, in %.1f s",
         100 * rec["out_channels"]["fraction_removed"], 100 * rec["parameters"]["fraction_removed"],
         rec["seconds"])
