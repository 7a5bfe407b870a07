"""Rule importance: the Taylor scores (clean, backdoor, Diff-Pruning, ...) of one model and
trigger source (Eqs. 8-9)."""

from diffcleanse.logs import log_to

log = log_to(snakemake.log[0], snakemake.threads)  # noqa: F821

from diffcleanse.precision import set_precision  # noqa: E402

set_precision(snakemake.params.precision)  # noqa: F821

from diffcleanse import sampling  # noqa: E402
from diffcleanse.oom import lower_on_oom  # noqa: E402
from diffcleanse.records import derive_seed  # noqa: E402
from diffcleanse.removal import ImportanceConfig, stages  # noqa: E402

inp, wc, params = snakemake.input, snakemake.wildcards, snakemake.params  # noqa: F821
with lower_on_oom("removal.importance_batch", stage="the importance"):
    rec = stages.run_importance(
        inp.model,
        inp.data,
        inp.get("trigger"),
        snakemake.output.scores,  # noqa: F821
        snakemake.output.record,  # noqa: F821
        cfg=ImportanceConfig(**params.importance),
        kinds=tuple(params.kinds),
        seed=derive_seed(params.seed, wc.model, "importance"),
        device=str(sampling.resolve_device(params.device)),
        allow_pickle=params.allow_pickle,
    )
log.info("T = %d (%d timesteps), kinds %s, %d groups, %.1f s", rec["T"], len(rec["timesteps"]),
         ", ".join(params.kinds), len(rec["groups"]), rec["seconds"])
