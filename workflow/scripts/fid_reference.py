"""Rule fid_reference: the feature statistics of one dataset's FID reference (one file)."""

from diffcleanse.logs import log_to

log = log_to(snakemake.log[0], snakemake.threads)  # noqa: F821

from diffcleanse.precision import set_precision  # noqa: E402

set_precision(snakemake.params.precision)  # noqa: F821

from diffcleanse import evaluation, sampling  # noqa: E402
from diffcleanse.oom import lower_on_oom  # noqa: E402

p = snakemake.params.reference  # noqa: F821
with lower_on_oom("evaluation.fid.batch_size", stage="the FID reference"):
    stats = evaluation.write_reference_statistics(
        snakemake.output.stats,  # noqa: F821
        p["dataset"],
        p["image_size"],
        feature_extractor=p["feature_extractor"],
        classifier_dir=snakemake.input.get("fid_classifier"),  # noqa: F821
        inception_weights=p["inception_weights"],
        n_reference=p["n_reference"],
        batch_size=p["batch_size"],
        data_root=p["data_root"],
        download=p["download"],
        device=str(sampling.resolve_device(snakemake.params.device)),  # noqa: F821
    )
log.info("%s at %d px: %d images, %d features (%s)", p["dataset"], p["image_size"], stats.n,
         len(stats.mu), stats.feature_extractor["name"])
