"""Rule elijah_removal: Elijah's removal of one model (fine-tuning, no pruning)."""

from diffcleanse.logs import log_to

log = log_to(snakemake.log[0], snakemake.threads)  # noqa: F821

from diffcleanse.precision import set_precision  # noqa: E402

set_precision(snakemake.params.precision)  # noqa: F821

from diffcleanse import sampling  # noqa: E402
from diffcleanse.oom import lower_on_oom  # noqa: E402
from diffcleanse.records import derive_seed  # noqa: E402
from diffcleanse.removal import ElijahConfig, stages  # noqa: E402

inp, wc, params = snakemake.input, snakemake.wildcards, snakemake.params  # noqa: F821
with lower_on_oom("removal.elijah.batch_size", stage="Elijah's removal"):
    rec = stages.run_elijah(
        inp.model,
        inp.data,
        inp.trigger,
        snakemake.output.model,  # noqa: F821
        snakemake.output.record,  # noqa: F821
        cfg=ElijahConfig(**params.elijah),
        seed=derive_seed(params.seed, wc.model, "elijah", wc.trigger),
        checkpoint_dir=params.checkpoint_dir,
        device=str(sampling.resolve_device(params.device)),
        extra={"model": wc.model, "trigger": wc.trigger},
        allow_pickle=params.allow_pickle,
    )
log.info("%d steps (resumed from %d), final loss %.4f, %.1f s", rec["steps"],
         rec["resumed_from_step"], rec["final_loss"], rec["seconds"])
