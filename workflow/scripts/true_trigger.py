"""Rule true_trigger: the model card's real trigger as a trigger file (the oracle source `true`)."""

from diffcleanse.logs import log_to

log = log_to(snakemake.log[0])  # noqa: F821

from diffcleanse.removal import stages  # noqa: E402

inp = snakemake.input  # noqa: F821
shape = stages.write_true_trigger(inp.card, snakemake.output.trigger, inp.model,  # noqa: F821
                                  allow_pickle=snakemake.params.allow_pickle)  # noqa: F821
log.info("real trigger of shape %s", shape)
