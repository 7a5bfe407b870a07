"""Rule finetune: fine-tune one pruned model (loss_p or loss_c); resumes from its checkpoint."""

from diffcleanse.logs import log_to

log = log_to(snakemake.log[0], snakemake.threads)  # noqa: F821

from diffcleanse.precision import set_precision  # noqa: E402

set_precision(snakemake.params.precision)  # noqa: F821

from diffcleanse import sampling  # noqa: E402
from diffcleanse.oom import lower_on_oom  # noqa: E402
from diffcleanse.records import derive_seed  # noqa: E402
from diffcleanse.removal import FinetuneConfig, stages  # noqa: E402

wc, params = snakemake.wildcards, snakemake.params  # noqa: F821
with lower_on_oom("removal.finetune.batch_size", stage="fine-tuning"):
    rec = stages.run_finetune(
        snakemake.input.pruned,  # noqa: F821
        snakemake.input.reference,  # noqa: F821
        snakemake.input.data,  # noqa: F821
        snakemake.output.model,  # noqa: F821
        snakemake.output.record,  # noqa: F821
        cfg=FinetuneConfig(**params.finetune),
        seed=derive_seed(params.seed, wc.model, "finetune", wc.strategy, wc.ratio, wc.loss),
        checkpoint_dir=params.checkpoint_dir,
        device=str(sampling.resolve_device(params.device)),
        extra={"model": wc.model, "trigger": wc.trigger, "strategy": wc.strategy,
               "ratio": wc.ratio},
        allow_pickle=params.allow_pickle,
    )
log.info("%d steps (resumed from %d), final loss %.4f, %.1f s", rec["steps"],
         rec["resumed_from_step"], rec["final_loss"], rec["seconds"])
