"""Rule detect_population: one method's own detector over the zoo, leave one model out."""

from diffcleanse.logs import log_to

log = log_to(snakemake.log[0])  # noqa: F821

from diffcleanse import population  # noqa: E402

rec = population.population_step(
    list(snakemake.input.records),  # noqa: F821
    list(snakemake.input.cards),  # noqa: F821
    snakemake.output[0],  # noqa: F821
    method=snakemake.wildcards.method,  # noqa: F821
    seed=snakemake.params.population.get("seed", 0),  # noqa: F821
)
log.info("%s: %s", rec["method"], rec["summary"])
