"""Rule importance: clean, backdoor and Diff-Pruning Taylor scores of one model (Eqs. 8-9)."""

from diffcleanse.logs import log_to

log = log_to(snakemake.log[0], snakemake.threads)  # noqa: F821

from diffcleanse import sampling  # noqa: E402
from diffcleanse.records import derive_seed  # noqa: E402
from diffcleanse.removal import ImportanceConfig, stages  # noqa: E402

wc, params = snakemake.wildcards, snakemake.params  # noqa: F821
rec = stages.run_importance(
    snakemake.input.model,  # noqa: F821
    snakemake.input.data,  # noqa: F821
    snakemake.input.trigger,  # noqa: F821
    snakemake.output.scores,  # noqa: F821
    snakemake.output.record,  # noqa: F821
    cfg=ImportanceConfig(**params.importance),
    seed=derive_seed(params.seed, wc.model, "importance"),
    device=str(sampling.resolve_device(params.device)),
)
log.info("T = %d (%d timesteps), %d groups, %.1f s", rec["T"], len(rec["timesteps"]),
         len(rec["groups"]), rec["seconds"])
