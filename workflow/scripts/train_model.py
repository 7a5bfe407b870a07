"""Rule train_model: train a zoo model (clean, or with its row's attack) and write its card."""

from diffcleanse.logs import log_to

log = log_to(snakemake.log[0], snakemake.threads)  # noqa: F821

from diffcleanse import sampling, zoo  # noqa: E402

card = zoo.train_model(
    snakemake.params.row,  # noqa: F821
    snakemake.params.train,  # noqa: F821
    snakemake.output.model,  # noqa: F821
    snakemake.output.card,  # noqa: F821
    init_dir=snakemake.input.get("init"),  # noqa: F821
    checkpoint_dir=snakemake.params.checkpoint_dir,  # noqa: F821
    device=str(sampling.resolve_device(snakemake.params.device)),  # noqa: F821
    base_seed=snakemake.params.seed,  # noqa: F821
)
log.info("done in %.1f s", card["seconds"])
