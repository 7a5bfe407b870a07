"""Rule train_classifier: a small CNN on one zoo dataset (the default BBTI encoder)."""

from diffcleanse.logs import log_to

log = log_to(snakemake.log[0], snakemake.threads)  # noqa: F821

from diffcleanse import classifiers, sampling  # noqa: E402
from diffcleanse.oom import lower_on_oom  # noqa: E402

with lower_on_oom("classifier.batch_size", stage="the classifier's training"):
    rec = classifiers.train_dataset_classifier(
        snakemake.params.dataset,  # noqa: F821
        snakemake.params.image_size,  # noqa: F821
        snakemake.output.classifier,  # noqa: F821
        snakemake.output.record,  # noqa: F821
        snakemake.params.train,  # noqa: F821
        seed=snakemake.params.seed,  # noqa: F821
        device=str(sampling.resolve_device(snakemake.params.device)),  # noqa: F821
    )
log.info("held-out accuracy %.3f in %.1f s", rec["holdout_accuracy"], rec["seconds"])
