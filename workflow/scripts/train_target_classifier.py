"""Rule train_target_classifier: a classifier for out-of-domain class targets (TrojDiff Dout)."""

from diffcleanse.logs import log_to

log = log_to(snakemake.log[0], snakemake.threads)  # noqa: F821

from diffcleanse import classifiers, sampling  # noqa: E402
from diffcleanse.oom import lower_on_oom  # noqa: E402
from diffcleanse.records import derive_seed  # noqa: E402

wc, params = snakemake.wildcards, snakemake.params  # noqa: F821
with lower_on_oom("classifier.batch_size", stage="the classifier's training"):
    rec = classifiers.train_dataset_classifier(
        wc.dataset,
        int(wc.size),
        snakemake.output.classifier,  # noqa: F821
        snakemake.output.record,  # noqa: F821
        params.train,
        seed=derive_seed(params.seed, "target_classifier", wc.dataset, wc.size),
        device=str(sampling.resolve_device(params.device)),
    )
log.info("held-out accuracy %.3f", rec["holdout_accuracy"])
